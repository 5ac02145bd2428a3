"""Training tricks: RIFLE and the baselines it is compared with.

Method `name` (one of config.TRICK_NAMES) is the module tricks/<name>.py holding one `base.Trick`
subclass; the trainer calls its hooks and knows no trick by name. `arguments` is the one place a trick
meets the Config: every trick is built from plain values, already validated by `config.resolve`.
"""
from __future__ import annotations

import importlib
import inspect

from ..config import Config, clr_bounds, reinit_epochs


def arguments(cfg: Config, name: str) -> dict:
    """Constructor arguments of trick `name` from a resolved Config."""
    t, o = cfg.tricks, cfg.optim
    if name == "delta":
        from .delta import KEY_OPTIONS, default_cache_dir
        flat = cfg.flat()
        return dict(alpha=t.delta_alpha, beta=t.delta_beta, layers=t.delta_layers,
                    cache_dir=cfg.run.delta_cache_dir or str(default_cache_dir()),
                    options={k: flat[k] for k in KEY_OPTIONS})
    return {
        "rifle": lambda: dict(reinit_epochs=reinit_epochs(cfg), seed=cfg.run.seed, epochs=o.epochs,
                              reinit_times=t.reinit_times, head_lr=o.head_lr, head_lr_policy=t.head_lr_policy,
                              reset_momentum=t.reset_head_momentum),
        "dropout": lambda: dict(p=t.dropout_p),
        "dropconnect": lambda: dict(p=t.dropconnect_p),
        "stochastic_depth": lambda: dict(p_last=t.sd_survival_last, per_sample=t.sd_mode == "sample",
                                         seed=cfg.run.seed),
        "disturb_label": lambda: dict(alpha=t.disturb_alpha),
        "cyclic_lr": lambda: dict(bounds=clr_bounds(cfg), step_epochs=t.clr_step_epochs,
                                  head_ratio=(o.head_lr or o.lr) / o.lr),
        "l2": lambda: dict(alpha=t.l2_alpha),
        "l2sp": lambda: dict(alpha=t.l2sp_alpha, beta=t.l2sp_beta),
    }[name]()


def trick_class(name: str) -> type:
    """The Trick subclass defined in tricks/<name>.py."""
    from .base import Trick
    module = importlib.import_module(f"{__name__}.{name}")
    (cls,) = [c for _, c in inspect.getmembers(module, inspect.isclass)
              if issubclass(c, Trick) and c.__module__ == module.__name__]
    return cls


def build_tricks(cfg: Config) -> list:
    """The selected tricks in the order given on the command line."""
    return [trick_class(name)(**arguments(cfg, name)) for name in cfg.trick_list]
