"""`rifle compare --studies rifle,plain,dropout ...`: the paper's "same settings" comparison of tuned methods.

Each study's (`rifle sweep`, one per method) best trial, chosen on validation accuracy, is re-trained with the
same N seeds for every method: a plan of one group (rifle.plan), its cells on the studies' storage (the same
command resumes; started N times it runs N workers). Tuning is fair when every method had the same number of
finished trials and evaluation seeds are disjoint from the seed the studies tuned with: both are checked. The
comparison run carries, for `--metric`, mean and std per method and the paired difference reference − method
(the reference being the first study listed; 95% t interval, paired t-test, the sign convention of rifle report),
the report's tables and figures, and the chosen hyperparameters printed with the table.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
import time
from typing import NamedTuple

from .. import config as C
from .. import keys as K
from .. import network
from .. import plan as P
from ..evidence.stats import METRICS
from ..methods import method_label
from ..network import redact
from ..track import store
from ..workers.storage import STUDY_ATTR, SweepError, open_storage, resolve_url, scrub
from .options import heartbeat_flags, trainer_options

# Options that must agree between the studies for the comparison to be "under the same settings".
SAME_SETTINGS = C.with_role("same_settings")


class Tuned(NamedTuple):
    method: str      # the label of what it trains
    trial: int       # the best trial's number
    value: float     # its validation accuracy
    options: dict    # the trainer options it was tuned with, its best parameters among them
    finished: int    # trials the study finished (complete or pruned)
    chosen: dict     # the best parameters


def best_settings(study_name: str, storage) -> Tuned:
    """What one study chose, on validation."""
    import optuna
    from optuna.trial import TrialState
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        raise SweepError(f"--studies: no study named {study_name!r} in the storage") from None
    info = study.user_attrs.get(STUDY_ATTR)
    if info is None:
        raise SweepError(f"--studies: study {study_name!r} was not made by rifle sweep")
    try:
        best = study.best_trial
    except ValueError:
        raise SweepError(f"--studies: study {study_name!r} has no complete trial yet") from None
    # Options a conditional parameter left out take their defaults, as in the trial itself.
    values = dict(info["space"]["fixed"]) | best.params
    # The label of what trains, not the name the study recorded (older studies wrote e.g. rifle_l2sp).
    method = method_label(values.get("tricks", C.TricksConfig.tricks))
    finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.get_trials(deepcopy=False))
    return Tuned(method, best.number, best.value, values, finished, dict(best.params))


def check_fair_tuning(found: dict, seeds: list[int]) -> None:
    """SweepError unless every study finished the same number of trials and no evaluation seed was a tuning
    seed (a hyperparameter chosen on seed s, then evaluated on s, is evaluated on its own selection noise)."""
    counts = {s: f.finished for s, f in found.items()}
    if len(set(counts.values())) > 1:
        raise SweepError("--studies: the studies were tuned with different numbers of finished trials ("
                         + ", ".join(f"{s}: {n}" for s, n in counts.items()) + "): give every method the same "
                         "budget (rifle sweep --n_trials) before comparing them")
    tuned = {int(C.convert("seed", f.options.get("seed", 0))) for f in found.values()}
    if tuned & set(seeds):
        raise SweepError(f"--seeds: {sorted(tuned & set(seeds))} tuned the studies; evaluate on other seeds "
                         f"(e.g. --seeds {','.join(str(max(tuned) + 1 + i) for i in range(len(seeds)))})")


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


def parent_metrics(summary, paired, metric: str) -> dict:
    """The comparison run's metrics: <metric>_mean/_std/n_seeds per method and the paired difference reference −
    method (mean, se, 95% CI, p) named <metric>_paired_diff_*/<mlflow_key(method)>."""
    out = {}
    for r in summary.itertuples():
        k = mlflow_key(r.method)
        out |= {K.method_metric(f"{metric}_mean", k): r.mean,
                K.method_metric(f"{metric}_std", k): 0.0 if r.n == 1 else r.std, K.method_metric(K.N_SEEDS, k): r.n}
    key = f"{metric}_paired_diff"
    for r in paired.itertuples():
        if r.n > 0:
            k = mlflow_key(r.versus)
            out |= {K.method_metric(f"{key}_{stat}", k): value for stat, value in (
                ("mean", r.mean_diff), ("se", r.sd_diff / math.sqrt(r.n)), ("ci_low", r.ci_low),
                ("ci_high", r.ci_high), ("p", r.p_value))}
    return out


def run(args) -> int:
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    from ..evidence.build import build_report
    from ..workers.cells import run_campaign
    from ..workers.outcomes import EXIT, Status
    from ..workers.worker import WorkerOptions
    uri = store.tracking_uri(args.tracking_uri)
    url = resolve_url(args.storage)
    storage = open_storage(url)
    studies = [s.strip() for s in args.studies.split(",") if s.strip()]
    if len(set(studies)) != len(studies):
        raise SweepError(f"--studies: expected distinct study names, got {args.studies!r}")
    found = {s: best_settings(s, storage) for s in studies}
    check_fair_tuning(found, args.seeds)
    methods = [found[s].method for s in studies]
    labels = dict(zip(studies, methods if len(set(methods)) == len(methods) else studies))
    settings = {s: found[s].options | args.overrides for s in studies}
    check_same_settings(settings)
    shown = redact(url)
    # one group, no protocol of its own: each study's settings are what it was tuned under
    plan = P.Plan(name=args.name, groups={"": {}}, methods={labels[s]: settings[s] for s in studies}, fixed={},
                  seeds=args.seeds, protocols=[""], reference=labels[studies[0]])
    plan.check()  # fail now, not after three methods have trained; and one budget for every method
    o = WorkerOptions("rifle compare", f"campaign:{args.name}", args.storage or url, args.output_root, uri,
                      args.experiment, args.heartbeat_interval, args.grace_period)
    result = run_campaign(plan, o, cell_tags={labels[s]: {K.COMPARE_STUDY: s, K.COMPARE_TRIAL: str(found[s].trial)}
                                              for s in studies},
                          group_tags={args.name: {K.COMPARE_STUDIES: ",".join(studies), K.COMPARE_STORAGE: shown}})
    if result.status != Status.REPORT:
        return EXIT[result.status] if result.status != Status.COMPLETE or not result.failed else 1
    parent = result.parents[args.name]
    ref = labels[studies[0]]
    built = build_report(uri, parent_run_id=parent, output_dir=f"{args.output_root}/{args.name}/report",
                         reference=ref, metric=args.metric, pairs=[(ref, labels[s]) for s in studies[1:]])
    chosen = "; ".join(f"{labels[s]} (trial {found[s].trial}): " + ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in found[s].chosen.items()) for s in studies)
    text = built["markdown"] + f"\nChosen on validation (each study's best trial): {chosen}.\n"
    client = MlflowClient(uri)
    have = client.get_run(parent).data.params  # a resumed comparison logs its params once
    params = {"studies": ",".join(studies), "seeds": ",".join(map(str, args.seeds)), "storage": shown,
              **{K.override_param(k): v for k, v in args.overrides.items()}}
    now = int(time.time() * 1000)
    best = {K.best_trial_tag(mlflow_key(labels[s])): f"{s}#{found[s].trial} (val_acc {found[s].value:.4f})"
            for s in studies}
    metrics = parent_metrics(built["summary"], built["paired"], args.metric)
    client.log_batch(parent, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items() if not math.isnan(v)],
                     params=[Param(k, str(v)) for k, v in params.items() if k not in have],
                     tags=[RunTag(k, v) for k, v in best.items()])
    client.log_text(parent, built["seeds"].to_csv(index=False), "comparison.csv")
    client.log_text(parent, text, "comparison.md")
    print(text + f"rifle compare: comparison run {parent}", flush=True)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rifle compare", description="Re-train each study's best "
                                "parameters with the same N seeds and record test accuracy per seed. The first "
                                "study listed is the reference: the table's differences are reference − each "
                                "other method, paired over seeds (the sign convention of rifle.report).")
    p.add_argument("--studies", required=True, help="comma-separated study names, the reference first (rows are "
                   "reference − method), e.g. rifle,plain,dropout")
    p.add_argument("--metric", default=K.TEST_ACC, choices=tuple(METRICS), help="the number the table and the "
                   "parent's metrics show: " + "; ".join(f"{k}: {v}" for k, v in METRICS.items()))
    p.add_argument("--storage", default="", help="the studies' storage (as for rifle sweep; default optuna.journal); "
                   "the comparison's cells go there too, so the same command started N times runs N workers")
    p.add_argument("--seeds", default="", help="comma-separated training seeds (default: 1..n_seeds; the studies "
                   "tuned with the space's seed, 0 in sweeps/base.yaml)")
    p.add_argument("--n_seeds", default="", help="number of seeds when --seeds is not given (default 5)")
    p.add_argument("--name", default="", help="the comparison run's name; the same name resumes it "
                   "(default: compare-<studies>)")
    p.add_argument("--output_root", default="", help="runs go to <root>/<name>/<method>/seed-<s> "
                   "(default outputs/compare)")
    heartbeat_flags(p)
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
        network.apply(int(args.overrides.get("network_timeout", network.DEFAULT_TIMEOUT)))
        return run(args)
    except (SweepError, C.ConfigError) as e:
        url = args.storage if args is not None and args.storage and not args.storage.startswith("env:") else None
        print(f"rifle compare: error: {scrub(str(e), url)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
