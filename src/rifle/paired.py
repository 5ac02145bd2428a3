"""Paired comparisons: methods x paired seeds, as cells that one or many workers train.

The engine of rifle.study, rifle.regime, rifle.compare and rifle.campaign. A plan is {group: {method label:
trainer options}} (a group is one parent run and one table, e.g. offline-study-validated), every option
built before the first run; `check_budget` refuses a group whose methods would train for different numbers
of epochs or optimizer steps (RIFLE truncates epochs to a multiple of K+1). Its cells go in the order group,
seed, method, so a partial campaign holds complete pairs, and are trained by `rifle.sweep.cells.run_cells`:
one local worker by default, any number with `--storage` (a journal file, PostgreSQL or Redis).
"""
from __future__ import annotations

import argparse
import math
import sys
from importlib import resources
from typing import Callable

import yaml

from . import config as C
from .methods import method_tricks
from .track import store

# The two evaluation protocols: the validated one (the trainer's defaults) and the official RIFLE code's.
PROTOCOLS = {"validated": {"val_fraction": 0.2, "selection": "best_val"},
             "authors": {"val_fraction": 0, "selection": "last"}}
# The offline setting the sweeps share too (sweeps/base.yaml extends it).
BASE = yaml.safe_load(resources.files("rifle").joinpath("offline.yaml").read_text())["fixed"]
# Options that set a run's budget: equal for every method of a group, so a paired difference is the method's.
BUDGET = ("epochs", "batch_size", "grad_accum_steps", *(n for n, (s, _) in C.all_fields().items()
                                                         if s == "data" and n not in C.RUN_ONLY))


def paired_parser(tool: str, doc: str, *, experiment: str, runs: str, output_help: str, report_help: str,
                  example: str, prog: str = "") -> argparse.ArgumentParser:
    """The options rifle.study, rifle.regime and rifle.campaign share; outputs under outputs/<tool>."""
    p = argparse.ArgumentParser(prog=f"python -m rifle.{prog or tool}", description=doc.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=5, help="paired seeds 0..N-1")
    p.add_argument("--protocol", default="both", choices=(*PROTOCOLS, "both"),
                   help="validated (best-validation checkpoint), authors (all of train, last epoch) or both")
    p.add_argument("--tracking_uri", default=store.tracking_uri(),
                   help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument("--experiment", default=store.experiment_name(None, experiment),
                   help=f"MLflow experiment of the {runs} runs (default: $MLFLOW_EXPERIMENT_NAME, else {experiment})")
    p.add_argument("--output_root", default=f"outputs/{tool}", help=output_help)
    p.add_argument("--report_dir", default=f"outputs/{tool}/report", help=report_help)
    workers(p, "(default: one worker in this process)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads of every run, fixed so that "
                   "tables reproduce (results differ at float level between thread counts); 0: torch's default")
    p.add_argument("--deterministic", action="store_true", help="torch's deterministic algorithms (and cuDNN's) "
                   "in every run")
    p.add_argument("overrides", nargs="*", metavar="option=value", help=f"any trainer option, e.g. {example}")
    return p


def workers(p: argparse.ArgumentParser, default: str) -> None:
    """--storage and the heartbeat options: the cells on a storage several workers share."""
    p.add_argument("--storage", default="", help="Optuna storage of the cells, shared by every worker started "
                   "with the same command: a journal file, postgresql://..., redis://... or env:VAR " + default)
    p.add_argument("--heartbeat_interval", type=int, default=30, help="seconds between a worker's heartbeats")
    p.add_argument("--grace_period", type=int, default=120, help="seconds without a heartbeat before another "
                   "worker retries the cell from its last checkpoint")


def tool_options(args) -> dict:
    """The trainer options the tool's own flags set for every run (a command-line option=value wins)."""
    return {"threads": args.threads} | ({"deterministic": True} if args.deterministic else {})


def check_budget(group: str, methods: dict[str, C.Config]) -> None:
    """ConfigError unless every method of the group trains the same epochs on the same data at the same batch
    (hence the same optimizer steps); RIFLE's truncation to a multiple of K+1 is the usual culprit."""
    (first, a), *rest = methods.items()
    for label, b in rest:
        differs = [k for k in BUDGET if a.flat()[k] != b.flat()[k]]
        if not differs:
            continue
        k = differs[0]
        hint = ""
        if k == "epochs":
            periods = [c.tricks.reinit_times + 1 for c in methods.values()
                       if any(t in C.PERIODIC for t in c.trick_list)]
            step = math.lcm(*periods) if periods else 1
            given = max(c.optim.epochs for c in methods.values())
            hint = (f"; RIFLE trains a multiple of K+1 epochs (the official truncation): choose epochs that every "
                    f"K+1 divides, e.g. epochs={step * math.ceil(given / step)}")
        raise C.ConfigError(k, f"{group}: {first} trains with {k}={a.flat()[k]!r} but {label} with "
                            f"{b.flat()[k]!r}: a paired comparison needs one budget for every method{hint}")


def paired_plan(args, tool: str, groups: Callable[[str, dict], dict[str, dict[str, dict]]],
                base: dict = BASE) -> dict | None:
    """{group: {label: options}} for each protocol asked: `groups(protocol, options)` names the groups and
    their methods' options, given `base` | the protocol's | the tool's flags | the command line's; every
    configuration is built here, before hours of compute, and each group's budget checked. None after
    printing the error of a bad value."""
    try:
        overrides = dict(item.split("=", 1) for item in args.overrides)
        protocols = list(PROTOCOLS) if args.protocol == "both" else [args.protocol]
        plan = {}
        for protocol in protocols:
            plan |= groups(protocol, base | PROTOCOLS[protocol] | tool_options(args) | overrides)
        for group, methods in plan.items():
            check_budget(group, {label: C.build(options) for label, options in methods.items()})
        return plan
    except (C.ConfigError, ValueError) as e:
        print(f"rifle.{tool}: error: {e}", file=sys.stderr)
        return None


def run(tool: str, name: str, plan: dict[str, dict[str, dict]], seeds: list[int], args,
        group_tags: dict | None = None, cell_tags: dict | None = None) -> tuple[str, dict[str, str]]:
    """Train the plan's cells (group, seed, method order) with rifle.sweep.cells.run_cells: (status, parents)."""
    from .workers.cells import cells_of, run_cells
    return run_cells(f"rifle.{tool}", name, cells_of(plan, seeds, cell_tags), tracking_uri=args.tracking_uri, experiment=args.experiment,
                     output_root=args.output_root, storage=args.storage, group_tags=group_tags,
                     heartbeat_interval=args.heartbeat_interval, grace_period=args.grace_period)


def exit_code(tool: str, status: str) -> int | None:
    """What a tool returns instead of writing the reports: 0 for a process that writes none, 1 when a cell
    failed, 130 after Ctrl-C, 143 after SIGTERM (the exit codes of a standalone run); None: write them."""
    if status in ("interrupted", "terminated"):
        return 130 if status == "interrupted" else 143
    if status == "incomplete":
        print(f"rifle.{tool}: some cells failed (their MLflow runs say why), so no report is written",
              file=sys.stderr)
        return 1
    if status in ("follower", "complete"):
        if status == "complete":
            print(f"rifle.{tool}: every cell is complete; the worker that completed the last one writes the "
                  "reports", flush=True)
        return 0
    return None


def chosen_methods(text: str, known: dict[str, dict]) -> dict[str, dict]:
    methods = [m for m in text.split(",") if m]
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise C.ConfigError("methods", f"unknown method {unknown[0]!r}, allowed: {', '.join(known)}")
    return {m: known[m] for m in methods}


def method_options(labels) -> dict[str, dict]:
    """label -> its options (the tricks of the label; everything else is the shared setting)."""
    return {label: {"tricks": ",".join(method_tricks(label))} for label in labels}
