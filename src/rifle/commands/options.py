"""Command-line flags built from the option dataclasses: `--<name> VALUE` for every trainer option (rifle train,
and the verbs that fix options for all their runs: sweep, campaign, compare, preflight) and for a verb's own
options (the sweep's `Options`). One builder, so every verb says the same of an option."""
from __future__ import annotations

import argparse

from ..config import all_fields, with_role


def add_options(group, fields, hidden: tuple = (), empty_default: bool = False) -> None:
    """A `--<name>` flag per dataclass field with `opt` metadata (the trainer's options, a tool's own): its help
    with the choices and the default. Not given: absent from the namespace, or with `empty_default` ""
    (which `mlflow run -P x=` passes, so "" means "not given" and the choices admit it). `hidden`: flags
    accepted but left out of --help."""
    for f in fields:
        meta = f.metadata
        text = meta["help"] + (f" [{'|'.join(meta['choices'])}]" if meta["choices"] else "")
        if "(default:" not in text and "(required)" not in text:  # a default set by other options says so
            text += f" (default: {f.default!r})"
        kwargs = {"default": "" if empty_default else argparse.SUPPRESS,
                  "help": argparse.SUPPRESS if f.name in hidden else text,
                  "metavar": str(f.type).split("|")[0].strip().upper()}
        if empty_default and meta["choices"]:
            kwargs["choices"] = ("", *meta["choices"])
        group.add_argument(f"--{f.name}", **kwargs)


def trainer_options(p, skip: tuple = (), what: str = "") -> None:
    """Every trainer option as --name VALUE on a tool's parser (sweep, compare), applied over the values it
    reads elsewhere; output_dir and run_name are the tool's to set, and only tracking_uri and experiment show
    in its --help."""
    per_run = with_role("per_run")
    group = p.add_argument_group("trainer options", "any option of `rifle train --help` (except "
                                 f"{' and '.join(per_run)}, which {p.prog} sets), {what}")
    shown = with_role("managed", without=("per_run",))  # where the tool's runs go
    add_options(group, [f for name, (_, f) in all_fields().items() if name not in (*per_run, *skip)],
                hidden=tuple(n for n in all_fields() if n not in shown))


def heartbeat_flags(p) -> None:
    """--heartbeat_interval and --grace_period of a verb whose workers share a storage (campaign, compare); the
    sweep declares the same two in its Options."""
    p.add_argument("--heartbeat_interval", type=int, default=30, help="seconds between a worker's heartbeats")
    p.add_argument("--grace_period", type=int, default=120, help="seconds without a heartbeat before another "
                   "worker retries the cell from its last checkpoint")
