"""Training tricks: RIFLE and the baselines it is compared with, one file each.

`TRICKS` is the table of methods, in the canonical order of method labels (rifle.methods): name -> the
`base.Trick` subclass, written "module:Class" so the table loads nothing (rifle.config validates names and
options before torch loads). Each class builds itself from a resolved Config (`from_config`); the trainer
calls its hooks and knows no trick by name. A trick outside this package joins with `register(name, cls,
options)`, its options a dataclass of `config.opt` fields declared in its own file; the built-in tricks'
options are in `config.TricksConfig`, so that a bad value fails before torch loads.
"""
from __future__ import annotations

import dataclasses
import importlib

TRICKS: dict[str, str | type] = {
    "rifle": "rifle:Rifle",
    "head_lr_restart": "head_lr_restart:HeadLRRestart",
    "dropout": "dropout:Dropout",
    "dropconnect": "dropconnect:DropConnect",
    "stochastic_depth": "stochastic_depth:StochasticDepth",
    "disturb_label": "disturb_label:DisturbLabel",
    "cyclic_lr": "cyclic_lr:CyclicLR",
    "l2": "l2:L2",
    "l2sp": "l2sp:L2SP",
    "delta": "delta:Delta",
}
# option name -> (the options dataclass of a registered trick, its field): config's "extra" options
OPTIONS: dict[str, tuple[type, dataclasses.Field]] = {}


def register(name: str, cls: type, options: type | None = None) -> None:
    """Add a trick (a base.Trick subclass with `from_config`) and its options dataclass to the table."""
    if name in TRICKS:
        raise ValueError(f"trick {name!r} is registered already")
    for f in dataclasses.fields(options) if options else ():
        OPTIONS[f.name] = (options, f)
    TRICKS[name] = cls


def trick_class(name: str) -> type:
    """The class of trick `name`, imported on first use."""
    entry = TRICKS[name]
    if isinstance(entry, str):
        module, attr = entry.split(":")
        entry = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    entry.name = name
    return entry


def build_tricks(cfg) -> list:
    """The selected tricks, in the order given on the command line."""
    return [trick_class(name).from_config(cfg) for name in cfg.trick_list]
