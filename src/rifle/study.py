"""The offline reproduction study: plain fine-tuning vs RIFLE vs each baseline, same settings, paired seeds.

    python -m rifle.study                      # both protocols, ~30 min on 2 CPU cores; resumable
    python -m rifle.study --protocol authors --seeds 3 --methods plain,rifle epochs=10

Two protocols, each its own parent run and table: `validated` (20% of train held out, test accuracy at the
best-validation checkpoint) and `authors` (the official RIFLE code's: all of train, no validation, the
last epoch's test accuracy).

Every (method, seed) is one `fit` with its own output_dir (so an interrupted study resumes where it
stopped) and one MLflow child run under a parent run named after the study; runs already finished are
not trained again. Settings are each method's defaults (untuned: the study compares the published
recipes under one budget, not the best of each); all methods share data, model, epochs, learning rate
and the seeds. At the end the report module builds the table and figures from the MLflow runs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import config as C
from .methods import method_tricks

# method label (rifle.methods) -> options (the rest are the shared base below and each trick's defaults);
# the tricks come from the label, so the study, sweeps, comparisons and reports share one name per method.
METHODS = {label: {"tricks": ",".join(method_tricks(label))} for label in (
    "plain", "rifle", "dropout", "dropconnect", "stochastic_depth", "disturb_label", "cyclic_lr", "l2sp",
    "rifle+l2sp", "delta")}
# Not saturated (plain reaches ~90%, DESIGN §5), 4 optimizer steps per epoch, RIFLE K=1: 15-epoch periods.
# channels_last only changes the memory layout: ~1.3x faster per run on the CPU (benchmarks/run.py).
# The two evaluation protocols (options over BASE): the validated one (the trainer's defaults) and the
# official RIFLE code's.
PROTOCOLS = {"validated": {"val_fraction": 0.2, "selection": "best_val"},
             "authors": {"val_fraction": 0, "selection": "last"}}
BASE = {"dataset": "digits", "model": "efficientnet_lite0", "image_size": 48, "train_per_class": 10,
        "epochs": 30, "batch_size": 32, "lr": 0.01, "reinit_times": 1, "log_weights": False,
        "channels_last": True}


def child_run(client, experiment_id: str, parent_id: str, method: str, seed: int) -> str:
    """The child run of (method, seed), created once: a resumed study reuses it."""
    found = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}' "
                               f"and tags.study_method = '{method}' and tags.study_seed = '{seed}'")
    if found:
        return found[0].info.run_id
    return client.create_run(experiment_id, run_name=f"{method}-seed{seed}", tags={
        "mlflow.parentRunId": parent_id, "study_method": method, "study_seed": str(seed)}).info.run_id


def run_study(methods: dict[str, dict], seeds: list[int], overrides: dict, tracking_uri: str, experiment: str,
              name: str, output_root: str) -> str:
    """Train every (method, seed) as a child run of the parent run `name` (made once, found again on a
    resume); `methods`: label -> options over BASE; finished children are not trained again."""
    import mlflow

    from .trainer import fit

    client = mlflow.tracking.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    parents = client.search_runs([exp_id], filter_string=f"tags.study = '{name}' and tags.study_parent = 'yes'")
    if parents:
        parent_id = parents[0].info.run_id
    else:
        parent_id = client.create_run(exp_id, run_name=name, tags={"study": name, "study_parent": "yes"}).info.run_id
        client.log_param(parent_id, "methods", ",".join(methods))
    for seed in seeds:  # seeds outside: a study cut short still holds complete pairs
        for method in methods:
            run_id = child_run(client, exp_id, parent_id, method, seed)
            if client.get_run(run_id).info.status == "FINISHED":
                continue
            cfg = C.build(BASE | methods[method] | overrides | {
                "seed": seed, "tracking_uri": tracking_uri, "experiment": experiment,
                "output_dir": str(Path(output_root) / name / method / f"seed{seed}")})
            result = fit(cfg, mlflow_run_id=run_id)
            print(f"{method:>18} seed {seed}: test_acc={result['test_acc']:.4f} "
                  f"test_acc_last={result['test_acc_last']:.4f}", flush=True)
    client.set_terminated(parent_id)
    return parent_id


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rifle.study", description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(m for m in METHODS if m != "delta"),
                   help=f"comma-separated, from {', '.join(METHODS)} (default: all but delta, whose channel-"
                   "attention pass makes a run ~10x longer on the CPU)")
    p.add_argument("--seeds", type=int, default=5, help="paired seeds 0..N-1")
    p.add_argument("--protocol", default="both", choices=(*PROTOCOLS, "both"),
                   help="validated (best-validation checkpoint), authors (all of train, last epoch) or both")
    p.add_argument("--name", default="offline-study", help="study name; each protocol's parent run and output "
                   "folder is <name>-<protocol>")
    p.add_argument("--tracking_uri", default="sqlite:///mlflow.db", help="MLflow store")
    p.add_argument("--experiment", default="rifle-offline-study", help="MLflow experiment of the study's runs")
    p.add_argument("--output_root", default="outputs/study", help="runs go to <root>/<name>-<protocol>/<method>/"
                   "seed<s>; an interrupted study resumes from there")
    p.add_argument("--report_dir", default="outputs/study/report", help="where the table and figures go")
    p.add_argument("overrides", nargs="*", metavar="option=value", help="any trainer option, e.g. epochs=10")
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    try:
        if unknown:
            raise C.ConfigError("methods", f"unknown method {unknown[0]!r}, allowed: {', '.join(METHODS)}")
        overrides = dict(item.split("=", 1) for item in args.overrides)
        protocols = list(PROTOCOLS) if args.protocol == "both" else [args.protocol]
        for protocol in protocols:  # validate every configuration before hours of compute
            for m in methods:
                C.build(BASE | METHODS[m] | PROTOCOLS[protocol] | overrides)
    except (C.ConfigError, ValueError) as e:
        print(f"rifle.study: error: {e}", file=sys.stderr)
        return 2
    from . import report
    for protocol in protocols:
        name, report_dir = f"{args.name}-{protocol}", str(Path(args.report_dir) / protocol)
        parent = run_study({m: METHODS[m] for m in methods}, list(range(args.seeds)), PROTOCOLS[protocol] | overrides,
                           args.tracking_uri, args.experiment, name, args.output_root)
        built = report.build_report(args.tracking_uri, args.experiment, parent_run_id=parent, output_dir=report_dir)
        print(f"protocol {protocol}:\n{built['markdown']}")
        print(f"table and figures: {report_dir} (also artifacts report/ of run {parent})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
