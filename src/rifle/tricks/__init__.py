"""Training tricks: RIFLE and the baselines it is compared with, one file each.

The table of methods (`TRICKS`, `OPTIONS`, `register`) is rifle.catalog's, re-exported here: it loads nothing, so
rifle.config validates names and options before torch loads. Each class builds itself from a resolved Config
(`from_config`); the trainer calls its hooks and knows no trick by name. A trick outside this package joins with
`register(name, cls, options)`, its options a dataclass of `config.opt` fields declared in its own file; the
built-in tricks' options are in `config.TricksConfig`, so that a bad value fails before torch loads.
"""
from __future__ import annotations

import importlib

from .. import catalog
from ..catalog import OPTIONS, TRICKS, register  # noqa: F401  (the table, as `rifle.tricks.register` is documented)


def trick_class(name: str) -> type:
    """The class of trick `name`, imported on first use."""
    entry = catalog.TRICKS[name]
    if isinstance(entry, str):
        module, attr = entry.split(":")
        entry = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    entry.name = name
    return entry


def build_tricks(cfg) -> list:
    """The selected tricks, in the order given on the command line."""
    return [trick_class(name).from_config(cfg) for name in cfg.trick_list]
