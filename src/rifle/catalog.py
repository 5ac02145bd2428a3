"""The table of methods: trick name -> its class, written "module:Class" (a module of rifle.tricks), so the table
loads nothing. Below rifle.config, which validates trick names and a registered trick's options before torch
loads; rifle.tricks imports the classes on use (`trick_class`) and re-exports this table.

`TRICKS` is in the canonical order of method labels (rifle.methods). A trick outside the package joins with
`register(name, cls, options)`, its options a dataclass of `config.opt` fields declared in its own file; the
built-in tricks' options are in `config.TricksConfig`, so that a bad value fails before torch loads.
"""
from __future__ import annotations

import dataclasses

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
