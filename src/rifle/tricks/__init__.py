"""Registry of training tricks: RIFLE and the baselines it is compared with.

A trick is a small object with hook methods (see `base.Trick`); the trainer calls every hook of every
selected trick at fixed points and knows no trick by name. This module stays light (no torch import at
module level) because `config.resolve` uses `check_combination` before anything heavy loads.
"""
from __future__ import annotations

import importlib

from ..config import Config, ConfigError

# name -> "module:Class", imported only when a run builds its tricks.
REGISTRY = {
    "rifle": "rifle:Rifle",
    "dropout": "dropout:Dropout",
    "dropconnect": "dropconnect:DropConnect",
    "stochastic_depth": "stochastic_depth:StochasticDepth",
    "disturb_label": "disturb_label:DisturbLabel",
    "cyclic_lr": "cyclic_lr:CyclicLR",
    "l2": "l2:L2",
    "l2sp": "l2sp:L2SP",
    "delta": "delta:Delta",
}

# Explicit penalties that each replace weight decay with their own definition of "L2": only one at a time.
EXCLUSIVE_REGULARIZERS = ("l2", "l2sp", "delta")

# Canonical settings for a short run of each method (a few batches on the offline data), with the
# per-epoch metric that shows the method acted (None: visible only in lr_backbone / lr_head).
CANONICAL = {
    "rifle": {"reinit_times": 1},
    "dropout": {"dropout_p": 0.5},
    "dropconnect": {"dropconnect_p": 0.5},
    "stochastic_depth": {"sd_survival_last": 0.5, "sd_mode": "batch"},
    "disturb_label": {"disturb_alpha": 0.5},
    "cyclic_lr": {"clr_base_lr": 0.001, "clr_max_lr": 0.01, "clr_step_epochs": 0.5},
    "l2": {"l2_alpha": 1e-4},
    "l2sp": {"l2sp_alpha": 0.01, "l2sp_beta": 1e-4},
    "delta": {"delta_alpha": 0.01, "delta_beta": 0.01, "delta_attention_epochs": 2, "delta_attention_batches": 1},
}
EVIDENCE = {
    "rifle": "head_reinit",
    "dropout": "dropout/drop_rate",
    "dropconnect": "dropconnect/drop_rate",
    "stochastic_depth": "stochastic_depth/skip_rate",
    "disturb_label": "disturb_label/flip_rate",
    "cyclic_lr": None,
    "l2": "penalty/l2",
    "l2sp": "penalty/l2sp",
    "delta": "penalty/delta",
}


def check_combination(cfg: Config) -> None:
    """Reject combinations that make no sense, before any data or model is loaded."""
    names = set(cfg.trick_list)
    missing = sorted(n for n in names if n not in REGISTRY)
    if missing:
        raise ConfigError("tricks", f"method {missing[0]!r} is not available in this version; "
                          f"available: {', '.join(REGISTRY)}")
    t = cfg.tricks
    if {"rifle", "cyclic_lr"} <= names and t.head_lr_policy == "cyclic":
        raise ConfigError("head_lr_policy", "cyclic_lr and RIFLE's head_lr_policy=cyclic are two learning-rate "
                          "policies for the head; use head_lr_policy=follow with cyclic_lr, or drop cyclic_lr "
                          "from --tricks")
    regs = [n for n in EXCLUSIVE_REGULARIZERS if n in names]
    if len(regs) > 1:
        raise ConfigError("tricks", f"{' and '.join(regs)} are alternative regularizers (each replaces weight "
                          "decay with its own penalty): choose one")
    for option in ("dropout_p", "dropconnect_p"):
        if not getattr(t, option) < 1.0:
            raise ConfigError(option, f"must be < 1 (1 drops everything), got {getattr(t, option)}")
    for option in ("disturb_alpha", "sd_survival_last"):
        if not getattr(t, option) <= 1.0:
            raise ConfigError(option, f"is a probability: must be <= 1, got {getattr(t, option)}")
    if "cyclic_lr" in names:
        top = t.clr_max_lr if t.clr_max_lr is not None else cfg.optim.lr
        base = t.clr_base_lr if t.clr_base_lr is not None else top / 4
        if not base < top:
            raise ConfigError("clr_base_lr", f"must be below clr_max_lr (default: lr), got {base} >= {top}")


def build_tricks(cfg: Config) -> list:
    """Instantiate the selected tricks in the order given on the command line."""
    tricks = []
    for name in cfg.trick_list:
        module, cls = REGISTRY[name].split(":")
        tricks.append(getattr(importlib.import_module(f"{__name__}.{module}"), cls)(cfg))
    return tricks
