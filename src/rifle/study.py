"""The offline reproduction study: plain fine-tuning vs RIFLE vs each baseline, same settings, paired seeds.

    python -m rifle.study                      # both protocols, ~30 min on 2 CPU cores; resumable
    python -m rifle.study --protocol authors --seeds 3 --methods plain,rifle epochs=10

Two protocols, each its own parent run and table: `validated` (20% of train held out, test accuracy at the
best-validation checkpoint) and `authors` (the official RIFLE code's: all of train, no validation, the
last epoch's test accuracy). Every (method, seed) is one `fit` and one MLflow child run (`run_paired`), so
an interrupted study resumes. Settings are each method's defaults (untuned: the study compares the
published recipes under one budget, not the best of each); all methods share data, model, epochs,
learning rate and the seeds. The report module then builds the table and figures from the MLflow runs.
"""
from __future__ import annotations

import argparse
import os
import sys
from importlib import resources
from pathlib import Path
from typing import Callable

import yaml

from . import config as C
from .methods import method_tricks
from .tracking import claim_parent, find_runs

# method label (rifle.methods) -> options (the rest are the shared base below and each trick's defaults);
# the tricks come from the label, so the study, sweeps, comparisons and reports share one name per method.
METHODS = {label: {"tricks": ",".join(method_tricks(label))} for label in (
    "plain", "rifle", "dropout", "dropconnect", "stochastic_depth", "disturb_label", "cyclic_lr", "l2sp",
    "rifle+l2sp", "delta")}
# The two evaluation protocols: the validated one (the trainer's defaults) and the official RIFLE code's.
PROTOCOLS = {"validated": {"val_fraction": 0.2, "selection": "best_val"},
             "authors": {"val_fraction": 0, "selection": "last"}}
# The offline setting the sweeps share too (sweeps/base.yaml extends it).
BASE = yaml.safe_load(resources.files("rifle").joinpath("offline.yaml").read_text())["fixed"]


def run_paired(methods: dict[str, dict], seeds: list[int], name: str, tracking_uri: str, experiment: str,
               output_root: str, tags: dict | None = None, child_tags: dict | None = None) -> tuple[str, dict]:
    """Train every (label, seed) of `methods` (label -> trainer options) as a child run of the parent run named
    `name`, in <output_root>/<name>/<label>/seed-<s>: an interrupted call resumes, finished children are read
    back. Seeds are the outer loop, so a study cut short holds complete pairs. Under `accelerate launch` the
    main process tracks and every process trains. Returns (parent run id, {(label, seed): finished run})."""
    from mlflow.tracking import MlflowClient

    from .sweep.worker import broadcast, distributed_state
    from .trainer import fit
    state = distributed_state()
    main = state.is_main_process
    if main:
        client = MlflowClient(tracking_uri)
        parent = claim_parent(client, {"compare.name": name}, "compare.role", experiment, name, tags or {})
        exp_id = client.get_run(parent).info.experiment_id
        experiment = client.get_experiment(exp_id).name
    runs = {}
    for seed in seeds:
        for label, options in methods.items():
            run = None
            if main:
                child = {"compare.name": name, "compare.role": "seed", "compare.method": label,
                         "compare.seed": str(seed)}
                found = find_runs(client, child)
                run = found[0] if found else client.create_run(exp_id, run_name=f"{label}-seed-{seed}", tags={
                    "mlflow.parentRunId": parent, **child, **(child_tags or {}).get(label, {})})
            todo = broadcast(None if run is None else (run.info.run_id, not (
                run.info.status == "FINISHED" and "test_acc" in run.data.metrics)), state)
            if todo[1]:
                output_dir = str(Path(output_root) / name / label / f"seed-{seed}")
                result = fit(C.build(options | {"seed": seed, "tracking_uri": tracking_uri, "experiment": experiment,
                                                "run_name": None, "output_dir": output_dir}),
                             mlflow_run_id=todo[0] if main else None)
                print(f"{label:>18} seed {seed}: test_acc={result['test_acc']:.4f} "
                      f"test_acc_last={result['test_acc_last']:.4f}", flush=True)
            if main:
                runs[label, seed] = client.get_run(todo[0])
    if main and parent != os.environ.get("MLFLOW_RUN_ID"):
        client.set_terminated(parent)
    return (parent if main else None), runs


def paired_parser(tool: str, doc: str, *, experiment: str, runs: str, output_help: str, report_help: str,
                  example: str) -> argparse.ArgumentParser:
    """The options rifle.study and rifle.regime share; outputs go under outputs/<tool> by default."""
    p = argparse.ArgumentParser(prog=f"python -m rifle.{tool}", description=doc.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=5, help="paired seeds 0..N-1")
    p.add_argument("--protocol", default="both", choices=(*PROTOCOLS, "both"),
                   help="validated (best-validation checkpoint), authors (all of train, last epoch) or both")
    p.add_argument("--tracking_uri", default="sqlite:///mlflow.db", help="MLflow store")
    p.add_argument("--experiment", default=experiment, help=f"MLflow experiment of the {runs} runs")
    p.add_argument("--output_root", default=f"outputs/{tool}", help=output_help)
    p.add_argument("--report_dir", default=f"outputs/{tool}/report", help=report_help)
    p.add_argument("overrides", nargs="*", metavar="option=value", help=f"any trainer option, e.g. {example}")
    return p


def paired_plan(args, tool: str, cells: Callable[[], dict]) -> dict | None:
    """(protocol, cell) -> label -> options (BASE | the cell's | the protocol's | the command line's), each
    built here, before hours of compute; None after printing the error of a bad value."""
    try:
        grid = cells()
        overrides = dict(item.split("=", 1) for item in args.overrides)
        protocols = list(PROTOCOLS) if args.protocol == "both" else [args.protocol]
        plan = {(protocol, cell): {label: BASE | options | PROTOCOLS[protocol] | overrides
                                   for label, options in methods.items()}
                for protocol in protocols for cell, methods in grid.items()}
        for methods in plan.values():
            for options in methods.values():
                C.build(options)
        return plan
    except (C.ConfigError, ValueError) as e:
        print(f"rifle.{tool}: error: {e}", file=sys.stderr)
        return None


def chosen_methods(text: str) -> dict[str, dict]:
    methods = [m for m in text.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise C.ConfigError("methods", f"unknown method {unknown[0]!r}, allowed: {', '.join(METHODS)}")
    return {m: METHODS[m] for m in methods}


def main(argv: list[str] | None = None) -> int:
    p = paired_parser("study", __doc__, experiment="rifle-offline-study", runs="study's", example="epochs=10",
                      output_help="runs go to <root>/<name>-<protocol>/<method>/seed-<s>; an interrupted study "
                      "resumes from there", report_help="where the table and figures go")
    p.add_argument("--methods", default=",".join(m for m in METHODS if m != "delta"),
                   help=f"comma-separated, from {', '.join(METHODS)} (default: all but delta, whose channel-"
                   "attention pass makes a run ~10x longer on the CPU)")
    p.add_argument("--name", default="offline-study", help="study name; each protocol's parent run and output "
                   "folder is <name>-<protocol>")
    args = p.parse_args(argv)
    plan = paired_plan(args, "study", lambda: {None: chosen_methods(args.methods)})
    if plan is None:
        return 2
    from . import report
    for (protocol, _), methods in plan.items():
        name, report_dir = f"{args.name}-{protocol}", str(Path(args.report_dir) / protocol)
        parent, _ = run_paired(methods, list(range(args.seeds)), name, args.tracking_uri, args.experiment,
                               args.output_root)
        built = report.build_report(args.tracking_uri, args.experiment, parent_run_id=parent, output_dir=report_dir)
        print(f"protocol {protocol}:\n{built['markdown']}")
        print(f"table and figures: {report_dir} (also artifacts report/ of run {parent})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
