"""The paper's "same settings" comparison: `python -m rifle.compare --studies rifle,plain,dropout ...`.

For each study (one per method, made by `python -m rifle.sweep`), take the best trial's parameters (chosen
on validation accuracy), re-train them with N seeds, the same seeds for every method (paired), and record
each seed's test accuracy in a child run of one comparison run. The comparison run carries mean and
standard deviation per method, the paired difference to the first method listed (95% t interval,
paired t-test), and a table (`comparison.csv`, `comparison.md`). Every (method, seed) trains in its own
output directory and MLflow run, so the same command resumes an interrupted comparison and skips what is
finished.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from . import config as C
from .sweep import (STUDY_ATTR, SweepError, claim_parent, distributed_state, broadcast, find_runs,
                    open_storage, scrub, trainer_options)
from .tracking import DEFAULT_URI

# Options that must agree between the studies for the comparison to be "under the same settings".
SAME_SETTINGS = tuple(n for n, (section, _) in C.all_fields().items() if section in ("data", "model")) + (
    "epochs", "batch_size", "grad_accum_steps", "mixed_precision", "momentum")


@dataclass
class Job:
    label: str          # the method's name in the table
    study: str
    trial: int          # the best trial of the study
    seed: int
    values: dict        # trainer options


def best_settings(study_name: str, storage) -> tuple[str, int, float, dict, str]:
    """(method, best trial number, its validation accuracy, trainer options, study uuid) of one study."""
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
    return info["method"], best.number, best.value, values, info["uuid"]


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


def summarize(rows: list[dict], labels: list[str]) -> tuple[dict, str, str]:
    """Metrics (mean, std, paired difference to the first method with a 95% t interval and the paired
    t-test, from rifle.report), CSV and Markdown tables."""
    from .report import mean_std, paired_difference

    by = {lab: {r["seed"]: r["test_acc"] for r in rows if r["method"] == lab} for lab in labels}
    metrics, lines = {}, [f"| method | n | test_acc mean ± std | paired diff. to {labels[0]} [95% CI] | p |",
                          "|---|---|---|---|---|"]
    for lab in labels:
        mean, std, n = mean_std(by[lab].values())
        std = 0.0 if n == 1 else std
        metrics |= {f"test_acc_mean/{lab}": mean, f"test_acc_std/{lab}": std, f"n_seeds/{lab}": n}
        diff, p = "", ""
        common = sorted(set(by[lab]) & set(by[labels[0]]))
        if lab != labels[0] and common:
            d = paired_difference([by[lab][s] for s in common], [by[labels[0]][s] for s in common])
            se = d["sd_diff"] / math.sqrt(d["n"])
            metrics |= {f"paired_diff_mean/{lab}": d["mean_diff"], f"paired_diff_se/{lab}": se,
                        f"paired_diff_ci_low/{lab}": d["ci_low"], f"paired_diff_ci_high/{lab}": d["ci_high"],
                        f"paired_diff_p/{lab}": d["p_value"]}
            diff = f"{100 * d['mean_diff']:+.2f}" + ("" if math.isnan(d["ci_low"]) else
                                                      f" [{100 * d['ci_low']:+.2f}, {100 * d['ci_high']:+.2f}]")
            p = "" if math.isnan(d["p_value"]) else f"{d['p_value']:.3f}"
        lines.append(f"| {lab} | {n} | {100 * mean:.2f} ± {100 * std:.2f} | {diff} | {p} |")
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=["method", "study", "trial", "seed", "test_acc", "best_val_acc", "run_id"])
    w.writeheader()
    for r in sorted(rows, key=lambda r: (labels.index(r["method"]), r["seed"])):
        w.writerow({k: r[k] for k in w.fieldnames})
    return metrics, out.getvalue(), "\n".join(lines) + "\n"


def plan(args) -> tuple[list[Job], dict]:
    """Main process: read the studies, check the settings, list the (method, seed) runs."""
    handle = open_storage(args.storage, 60, 120, None)
    studies = [s.strip() for s in args.studies.split(",") if s.strip()]
    if len(studies) < 1 or len(set(studies)) != len(studies):
        raise SweepError(f"--studies: expected distinct study names, got {args.studies!r}")
    found = {s: best_settings(s, handle.storage) for s in studies}
    methods = [found[s][0] for s in studies]
    labels = dict(zip(studies, methods if len(set(methods)) == len(methods) else studies))
    check_same_settings({s: found[s][3] | args.overrides for s in studies})
    jobs = []
    for s in studies:
        method, number, _, values, _ = found[s]
        for seed in args.seeds:
            v = values | args.overrides | {"seed": seed, "output_dir": str(Path(args.output_root).resolve() / args.name
                                                                         / labels[s] / f"seed-{seed}")}
            C.build(v)  # fail now, not after three methods have trained
            jobs.append(Job(labels[s], s, number, seed, v))
    meta = {"storage": handle.shown, "studies": studies, "labels": [labels[s] for s in studies],
            "best": {labels[s]: {"study": s, "trial": found[s][1], "val_acc": found[s][2]} for s in studies}}
    return jobs, meta


def run(args) -> int:
    from mlflow.tracking import MlflowClient

    from .trainer import fit
    state = distributed_state()
    main = state.is_main_process
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    setup = None
    if main:
        jobs, meta = plan(args)
        client = MlflowClient(uri)
        parent = claim_parent(client, {"compare.name": args.name}, "compare.role", args.experiment, args.name,
                              {"compare.studies": ",".join(meta["studies"]), "compare.storage": meta["storage"]})
        exp_id = client.get_run(parent).info.experiment_id
        experiment = client.get_experiment(exp_id).name
        have = client.get_run(parent).data.params
        params = {"studies": ",".join(meta["studies"]), "seeds": ",".join(map(str, args.seeds)),
                  "storage": meta["storage"], **{f"override.{k}": v for k, v in args.overrides.items()}}
        for k, v in params.items():
            if k not in have:
                client.log_param(parent, k, str(v))
        for lab, best in meta["best"].items():
            client.set_tag(parent, f"best_trial.{lab}",
                           f"{best['study']}#{best['trial']} (val_acc {best['val_acc']:.4f})")
        setup = {"jobs": jobs, "experiment": experiment, "labels": meta["labels"]}
    setup = broadcast(setup, state)
    rows = []
    for job in setup["jobs"]:
        decision = None
        if main:
            decision = _child(client, exp_id, parent, args.name, job)
        decision = broadcast(decision, state)
        if decision["done"]:
            rows.append(decision["row"])
            continue
        values = job.values | {"tracking_uri": uri, "experiment": setup["experiment"], "run_name": None}
        result = fit(C.build(values), mlflow_run_id=decision["run_id"] if main else None)
        if main:
            client.set_tag(decision["run_id"], "compare.state", "complete")
            rows.append(_row(job, result["test_acc"], result["best_val_acc"], decision["run_id"]))
            print(f"rifle.compare: {job.label} seed {job.seed}: test_acc {result['test_acc']:.4f}", flush=True)
    if main:
        metrics, table_csv, table_md = summarize(rows, setup["labels"])
        for k, v in metrics.items():
            if not math.isnan(v):
                client.log_metric(parent, k, v)
        client.log_text(parent, table_csv, "comparison.csv")
        client.log_text(parent, table_md, "comparison.md")
        if parent != os.environ.get("MLFLOW_RUN_ID"):
            client.set_terminated(parent, "FINISHED")
        print(table_md + f"rifle.compare: comparison run {parent}", flush=True)
    return 0


def _row(job: Job, test_acc: float, best_val_acc: float, run_id: str) -> dict:
    return {"method": job.label, "study": job.study, "trial": job.trial, "seed": job.seed, "test_acc": test_acc,
            "best_val_acc": best_val_acc, "run_id": run_id}


def _child(client, exp_id: str, parent: str, name: str, job: Job) -> dict:
    """The (method, seed) run: finished ones are read back, others (new or interrupted) are trained."""
    found = find_runs(client, {"compare.name": name, "compare.role": "seed", "compare.method": job.label,
                               "compare.seed": str(job.seed)})
    if found:
        run = found[0]
        m = run.data.metrics
        if run.info.status == "FINISHED" and "test_acc" in m:
            return {"done": True, "row": _row(job, m["test_acc"], m.get("best_val_acc", float("nan")), run.info.run_id)}
        return {"done": False, "run_id": run.info.run_id}
    run = client.create_run(exp_id, run_name=f"{job.label}-seed-{job.seed}", tags={
        "mlflow.parentRunId": parent, "compare.name": name, "compare.role": "seed", "compare.method": job.label,
        "compare.seed": str(job.seed), "compare.study": job.study, "compare.trial": str(job.trial)})
    return {"done": False, "run_id": run.info.run_id}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rifle.compare", description="Re-train each study's best "
                                "parameters with the same N seeds and record test accuracy per seed.")
    p.add_argument("--studies", required=True, help="comma-separated study names, the reference method first "
                   "(paired differences are to it), e.g. plain,rifle,dropout")
    p.add_argument("--storage", default="", help="the studies' storage (as for rifle.sweep; default optuna.journal)")
    p.add_argument("--seeds", default="", help="comma-separated training seeds (default: 1..n_seeds; the studies "
                   "tuned with the space's seed, 0 in sweeps/base.yaml)")
    p.add_argument("--n_seeds", default="", help="number of seeds when --seeds is not given (default 5)")
    p.add_argument("--name", default="", help="the comparison run's name; the same name resumes it "
                   "(default: compare-<studies>)")
    p.add_argument("--output_root", default="", help="runs go to <root>/<name>/<method>/seed-<s> "
                   "(default outputs/compare)")
    trainer_options(p, skip=("seed",))
    return p


def parse(argv: list[str] | None = None):
    ns = parser().parse_args(argv)
    own = {"studies", "storage", "seeds", "n_seeds", "name", "output_root"}
    overrides = {k: v for k, v in vars(ns).items() if k not in own and v != ""}
    ns.tracking_uri = overrides.pop("tracking_uri", None)
    ns.experiment = overrides.pop("experiment", None) or "rifle"
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
