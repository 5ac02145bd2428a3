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
}


def check_combination(cfg: Config) -> None:
    """Reject combinations that make no sense, before any data or model is loaded."""
    names = set(cfg.trick_list)
    missing = sorted(n for n in names if n not in REGISTRY)
    if missing:
        raise ConfigError("tricks", f"method {missing[0]!r} is not available in this version; "
                          f"available: {', '.join(REGISTRY)}")


def build_tricks(cfg: Config) -> list:
    """Instantiate the selected tricks in the order given on the command line."""
    tricks = []
    for name in cfg.trick_list:
        module, cls = REGISTRY[name].split(":")
        tricks.append(getattr(importlib.import_module(f"{__name__}.{module}"), cls)(cfg))
    return tricks
