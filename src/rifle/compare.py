"""The paper's "same settings" comparison: `python -m rifle.compare --studies rifle,plain,dropout ...`.

Each study's (`python -m rifle.sweep`, one per method) best trial, chosen on validation accuracy, is
re-trained with the same N seeds for every method (rifle.paired: every (method, seed) a cell in the studies'
storage, so the same command resumes, and started N times runs N workers). The
comparison run carries, for `--metric`, mean and std per method and the paired difference reference −
method, the reference being the first study listed (95% t interval, paired t-test; the sign convention of
rifle.report), and `comparison.csv` / `comparison.md`. A method's label is that of its study's `tricks`.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import re
import sys
import time

from . import config as C
from .cli import trainer_options
from .evidence.stats import (
    DEFAULT_SELECTION,
    METRICS,
    mean_std,
    metric_note,
)
from .methods import method_label
from .track import store
from .network import redact
from .workers.storage import STUDY_ATTR, SweepError, open_storage, resolve_url, scrub

# Options that must agree between the studies for the comparison to be "under the same settings".
SAME_SETTINGS = tuple(n for n, (section, _) in C.all_fields().items() if section in ("data", "model")) + (
    "epochs", "batch_size", "grad_accum_steps", "mixed_precision", "momentum", "selection")


def best_settings(study_name: str, storage) -> tuple[str, int, float, dict]:
    """(method, best trial number, its validation accuracy, trainer options) of one study."""
    import optuna
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        raise SweepError(f"--studies: no study named {study_name!r} in the storage") from None
    info = study.user_attrs.get(STUDY_ATTR)
    if info is None:
        raise SweepError(f"--studies: study {study_name!r} was not made by rifle.sweep")
    try:
        best = study.best_trial
    except ValueError:
        raise SweepError(f"--studies: study {study_name!r} has no complete trial yet") from None
    # Options a conditional parameter left out take their defaults, as in the trial itself.
    values = dict(info["space"]["fixed"]) | best.params
    # The label of what trains, not the name the study recorded (older studies wrote e.g. rifle_l2sp).
    method = method_label(values.get("tricks", C.TricksConfig.tricks))
    return method, best.number, best.value, values


def check_same_settings(settings: dict[str, dict]) -> None:
    names = list(settings)
    ref = settings[names[0]]
    for name in names[1:]:
        for key in SAME_SETTINGS:
            a = C.convert(key, ref[key]) if key in ref else None
            b = C.convert(key, settings[name][key]) if key in settings[name] else None
            if a != b:
                raise SweepError(f"studies {names[0]!r} and {name!r} were tuned under different settings: "
                                 f"{key}={a!r} vs {b!r}; a comparison needs the same settings (or pass "
                                 f"--{key} to re-train all of them with one value)")


def mlflow_key(label: str) -> str:
    """A label in an MLflow key, where '+' is not allowed: rifle+l2sp -> rifle.l2sp ('-' would read as a
    difference)."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]", ".", label)


def summarize(rows: list[dict], labels: list[str], metric: str = "test_acc") -> tuple[dict, str, str]:
    """Metrics of `metric` (mean, std, and the paired difference labels[0] − method with a 95% t interval and
    the paired t-test, named <metric>_paired_diff_*/<mlflow_key(method)>), CSV and Markdown tables."""
    import pandas as pd

    from .evidence.tables import paired_differences
    ref = labels[0]
    by = {lab: {r["seed"]: r[metric] for r in rows if r["method"] == lab and not math.isnan(r[metric])}
          for lab in labels}
    runs = pd.DataFrame([{"dataset": "", "method": r["method"], "seed": r["seed"], metric: r[metric]} for r in rows],
                        columns=["dataset", "method", "seed", metric])
    paired = paired_differences(runs, metric=metric, pairs=[(ref, lab) for lab in labels[1:]]).set_index("versus")
    metrics, lines = {}, [f"| method | n | {metric} (%) mean ± std | {ref} − method (pp) [95% CI] | p |",
                          "|---|---|---|---|---|"]
    for lab in labels:
        mean, std, n = mean_std(by[lab].values())
        std = 0.0 if n == 1 else std
        k = mlflow_key(lab)
        metrics |= {f"{metric}_mean/{k}": mean, f"{metric}_std/{k}": std, f"n_seeds/{k}": n}
        diff, p = "", ""
        if lab != ref and lab in paired.index and paired.loc[lab, "n"] > 0:
            d = paired.loc[lab]
            key = f"{metric}_paired_diff"
            metrics |= {f"{key}_mean/{k}": d["mean_diff"], f"{key}_se/{k}": d["sd_diff"] / math.sqrt(d["n"]),
                        f"{key}_ci_low/{k}": d["ci_low"], f"{key}_ci_high/{k}": d["ci_high"],
                        f"{key}_p/{k}": d["p_value"]}
            diff = f"{100 * d['mean_diff']:+.2f}" + ("" if math.isnan(d["ci_low"]) else
                                                      f" [{100 * d['ci_low']:+.2f}, {100 * d['ci_high']:+.2f}]")
            p = "" if math.isnan(d["p_value"]) else f"{d['p_value']:.3f}"
        shown = f"{100 * mean:.2f} ± {100 * std:.2f}" if n else "–"  # n = 0: no run has the metric
        lines.append(f"| {lab} | {n} | {shown} | {diff} | {p} |")
    selections = {lab: {r["selection"] for r in rows if r["method"] == lab} for lab in labels}
    lines += ["", f"Reference: {ref} (the first study listed); the paired difference is {ref} − method over the "
              f"seeds both ran (> 0: {ref} is better). {metric_note(metric, selections)}"]
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=["method", "study", "trial", "seed", "test_acc", "test_acc_last", "selection",
                                        "best_val_acc", "run_id"], extrasaction="ignore")
    w.writeheader()
    w.writerows(sorted(rows, key=lambda r: (labels.index(r["method"]), r["seed"])))
    return metrics, out.getvalue(), "\n".join(lines) + "\n"


def run(args) -> int:
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    from . import paired
    from .workers.cells import Cell, finished_runs, run_cells
    uri = store.tracking_uri(args.tracking_uri)
    url = resolve_url(args.storage)
    storage = open_storage(url)
    studies = [s.strip() for s in args.studies.split(",") if s.strip()]
    if len(set(studies)) != len(studies):
        raise SweepError(f"--studies: expected distinct study names, got {args.studies!r}")
    found = {s: best_settings(s, storage) for s in studies}
    methods = [found[s][0] for s in studies]
    labels = dict(zip(studies, methods if len(set(methods)) == len(methods) else studies))
    settings = {s: found[s][3] | args.overrides for s in studies}
    check_same_settings(settings)
    # fail now, not after three methods have trained; and one budget for every method
    paired.check_budget(args.name, {labels[s]: C.build(settings[s] | {"output_dir": "unused"}) for s in studies})
    shown = redact(url)
    cells = [Cell(args.name, labels[s], seed, settings[s], {"compare.study": s, "compare.trial": str(found[s][1])})
             for seed in args.seeds for s in studies]
    status, parents = run_cells("rifle.compare", args.name, cells, tracking_uri=uri, experiment=args.experiment,
                                output_root=args.output_root, storage=args.storage or url, heartbeat_interval=
                                args.heartbeat_interval, grace_period=args.grace_period,
                                group_tags={args.name: {"compare.studies": ",".join(studies), "compare.storage": shown}})
    code = paired.exit_code("compare", status)
    if code is not None:
        return code
    parent = parents[args.name]
    client = MlflowClient(uri)
    have = client.get_run(parent).data.params  # a resumed comparison logs its params once
    params = {"studies": ",".join(studies), "seeds": ",".join(map(str, args.seeds)), "storage": shown,
              **{f"override.{k}": v for k, v in args.overrides.items()}}
    rows = [_row(run) for run in finished_runs(uri, parent)]
    metrics, table_csv, table_md = summarize(rows, [labels[s] for s in studies], args.metric)
    now = int(time.time() * 1000)
    best = {f"best_trial.{mlflow_key(labels[s])}": f"{s}#{found[s][1]} (val_acc {found[s][2]:.4f})" for s in studies}
    client.log_batch(parent, metrics=[Metric(k, v, now, 0) for k, v in metrics.items() if not math.isnan(v)],
                     params=[Param(k, str(v)) for k, v in params.items() if k not in have],
                     tags=[RunTag(k, v) for k, v in best.items()])
    client.log_text(parent, table_csv, "comparison.csv")
    client.log_text(parent, table_md, "comparison.md")
    print(table_md + f"rifle.compare: comparison run {parent}", flush=True)
    return 0


def _row(run) -> dict:
    """A finished (method, seed) run's row (older runs have no test_acc_last nor selection; without validation
    there is no best_val_acc)."""
    m, p, t = run.data.metrics, run.data.params, run.data.tags
    return {"method": t["compare.method"], "study": t.get("compare.study"), "trial": t.get("compare.trial"),
            "seed": int(t["compare.seed"]), "test_acc": m["test_acc"],
            "test_acc_last": m.get("test_acc_last", math.nan), "selection": p.get("selection") or DEFAULT_SELECTION,
            "best_val_acc": m.get("best_val_acc", math.nan), "run_id": run.info.run_id}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rifle.compare", description="Re-train each study's best "
                                "parameters with the same N seeds and record test accuracy per seed. The first "
                                "study listed is the reference: the table's differences are reference − each "
                                "other method, paired over seeds (the sign convention of rifle.report).")
    p.add_argument("--studies", required=True, help="comma-separated study names, the reference first (rows are "
                   "reference − method), e.g. rifle,plain,dropout")
    p.add_argument("--metric", default="test_acc", choices=tuple(METRICS), help="the number the table and the "
                   "parent's metrics show: " + "; ".join(f"{k}: {v}" for k, v in METRICS.items()))
    p.add_argument("--storage", default="", help="the studies' storage (as for rifle.sweep; default optuna.journal); "
                   "the comparison's cells go there too, so the same command started N times runs N workers")
    p.add_argument("--seeds", default="", help="comma-separated training seeds (default: 1..n_seeds; the studies "
                   "tuned with the space's seed, 0 in sweeps/base.yaml)")
    p.add_argument("--n_seeds", default="", help="number of seeds when --seeds is not given (default 5)")
    p.add_argument("--name", default="", help="the comparison run's name; the same name resumes it "
                   "(default: compare-<studies>)")
    p.add_argument("--output_root", default="", help="runs go to <root>/<name>/<method>/seed-<s> "
                   "(default outputs/compare)")
    p.add_argument("--heartbeat_interval", type=int, default=30, help="seconds between a worker's heartbeats")
    p.add_argument("--grace_period", type=int, default=120, help="seconds without a heartbeat before another "
                   "worker retries the cell from its last checkpoint")
    trainer_options(p, skip=("seed",), what="applied to every method's best parameters (e.g. --epochs 40)")
    return p


def parse(argv: list[str] | None = None):
    ns = parser().parse_args(argv)
    overrides = {k: v for k, v in vars(ns).items() if k in C.all_fields() and v != ""}
    ns.tracking_uri = overrides.pop("tracking_uri", None)
    ns.experiment = store.experiment_name(overrides.pop("experiment", None))
    for k, v in overrides.items():
        C.convert(k, v)
    ns.overrides = overrides
    try:
        ns.seeds = ([int(s) for s in ns.seeds.split(",") if s.strip()] if ns.seeds
                    else list(range(1, 1 + int(ns.n_seeds or 5))))
    except ValueError:
        raise SweepError(f"--seeds / --n_seeds: expected integers, got {ns.seeds or ns.n_seeds!r}") from None
    if not ns.seeds or min(ns.seeds) < 0 or len(set(ns.seeds)) != len(ns.seeds):
        raise SweepError(f"--seeds: expected distinct seeds >= 0, got {ns.seeds}")
    ns.name = ns.name or "compare-" + "-".join(s.strip() for s in ns.studies.split(",") if s.strip())
    if "'" in ns.name or "`" in ns.name:
        raise SweepError(f"--name: quotes are not allowed (the name is searched as an MLflow tag), got {ns.name!r}")
    ns.output_root = ns.output_root or "outputs/compare"
    return ns


def main(argv: list[str] | None = None) -> int:
    args = None
    try:
        args = parse(argv)
        return run(args)
    except (SweepError, C.ConfigError) as e:
        url = args.storage if args is not None and args.storage and not args.storage.startswith("env:") else None
        print(f"rifle.compare: error: {scrub(str(e), url)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
