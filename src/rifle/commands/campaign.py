"""`rifle campaign`: a plan's paired cells (groups x methods x seeds x protocols), on one worker or many.

    rifle campaign --datasets digits,imagefolder:/data/x --methods plain,rifle --seeds 5
    rifle campaign --config configs/campaign/table1.yaml --storage env:RIFLE_STORAGE   # started N times: N workers
    rifle campaign --config configs/campaign/table1.yaml --storage env:RIFLE_STORAGE --status

The plan (rifle.plan: a YAML file's fixed options, groups or datasets, methods, seeds, protocols; then the
command line's options, e.g. --epochs 40) becomes an Optuna study `campaign:<name>` whose queue holds every
cell; every worker started with the same command takes the next cell (rifle.workers.cells). Before any cell a
worker checks every dataset of the plan and stops (exit 2) on one that does not load. A group whose data or
options fail mid-campaign fails once and the workers go on with the others. When no cell is left, the worker
that finished the last one writes a report per complete group (rifle.report), the summary across groups
(methods as rows, datasets as columns: the paper's layout; the groups that failed, with why) and the plan's
views (the regime grid's table). `--status` reads the storage only: cells complete, running, failed and
pending per group, workers whose heartbeat went stale, images per second and the time left.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .. import config as C
from .. import keys as K
from .. import network
from .. import plan as P
from ..track import store
from .options import heartbeat_flags, trainer_options


def parser(prog: str = "rifle campaign", doc: str = __doc__, worker: bool = True) -> argparse.ArgumentParser:
    """The plan's options (rifle preflight takes them too) and, for a `worker`, --status and --prepare."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    p.add_argument("--config", default="", help="the plan, a YAML file (configs/campaign/: table1.yaml, "
                   "offline_study.yaml, regime.yaml); default: the offline setting on digits")
    p.add_argument("--datasets", default="", help="comma-separated datasets, one group each (registered names, "
                   "imagefolder:<root>, disk:<path>, Hub ids): instead of the plan's groups")
    p.add_argument("--methods", default="", help="comma-separated method labels, e.g. plain,rifle,l2sp,rifle+l2sp "
                   "(default: the plan's, else plain,rifle)")
    p.add_argument("--seeds", type=int, default=None, help="paired seeds 0..N-1 (default: the plan's, else 5)")
    p.add_argument("--protocol", default="", choices=("", *P.PROTOCOLS, "both"), help="validated (best-validation "
                   "checkpoint), authors (all of train, last epoch) or both (default: the plan's, else both)")
    p.add_argument("--name", default="", help="campaign name (default: the plan's, else campaign): its Optuna "
                   "study campaign:<name>, its groups <name>-<group>-<protocol>, its report folder")
    p.add_argument("--reference", default="", help="the method whose paired differences the tables show "
                   "(default: the plan's, else rifle)")
    p.add_argument("--storage", default="", help="Optuna storage of the cells, shared by every worker started with "
                   "the same command: a journal file, postgresql://..., redis://... or env:VAR (default: one "
                   "worker in this process)")
    heartbeat_flags(p)
    p.add_argument("--output_root", default="outputs/campaign", help="runs go to <root>/<group>/<method>/seed-<s>")
    p.add_argument("--report_dir", default="", help="reports (default: <output_root>/reports/<name>): per group "
                   "<dir>/<group>/<protocol>/, and summary.md, summary.csv, summary_paired.csv")
    p.add_argument("--allow_mixed_env", action="store_true", help="pair runs measured in different environments "
                   "(several GPU models, say); refused by default")
    if worker:
        p.add_argument("--status", action="store_true", help="print how far the campaign is, from its storage only")
        p.add_argument("--prepare", action="store_true", help="check the datasets, freeze their commits, make the "
                       "campaign's study with its cells, train nothing (a job the workers depend on)")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table (with --status)")
    trainer_options(p, skip=("seed",), what="for every cell (e.g. --epochs 40); paired verbs fix --threads 1 "
                    "unless given")
    return p


def build(args) -> P.Plan:
    """The plan of `args`: the file's, then the command line's (ConfigError naming the option)."""
    overrides = {k: v for k, v in vars(args).items() if k in C.all_fields() and k not in ("tracking_uri", "experiment")}
    overrides.setdefault("threads", 1)  # results differ at float level between thread counts
    return P.load(args.config or None, datasets=args.datasets, methods=args.methods, seeds=args.seeds,
                  protocol=args.protocol, name=args.name, reference=args.reference, overrides=overrides)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.tracking_uri = store.tracking_uri(getattr(args, "tracking_uri", None))
    args.experiment = store.experiment_name(getattr(args, "experiment", None), "rifle-campaign")
    from ..workers.storage import SweepError, scrub
    try:
        plan = build(args)
        network.apply(int(plan.overrides.get("network_timeout", network.DEFAULT_TIMEOUT)))
        if args.status:
            return status(plan, args)
        return run(plan, args)
    except (C.ConfigError, SweepError, ValueError) as e:
        print(f"rifle campaign: error: {scrub(str(e), args.storage if '://' in args.storage else None)}",
              file=sys.stderr)
        return 2


def worker_options(plan: P.Plan, args):
    from ..workers.worker import WorkerOptions
    return WorkerOptions("rifle campaign", f"campaign:{plan.name}", args.storage, args.output_root, args.tracking_uri,
                         args.experiment, args.heartbeat_interval, args.grace_period)


def run(plan: P.Plan, args) -> int:
    from ..workers.cells import CampaignError, run_campaign
    from ..workers.outcomes import EXIT, Status
    try:
        result = run_campaign(plan, worker_options(plan, args), prepare=args.prepare)
    except CampaignError as e:
        for line in str(e).splitlines():
            print(f"rifle campaign: error: {line}", file=sys.stderr)
        print("rifle campaign: nothing was trained: fix the datasets above (`rifle preflight` checks a plan)",
              file=sys.stderr)
        return 2
    if args.prepare:
        print(f"rifle campaign: campaign {plan.name!r} prepared: its datasets load and its cells wait in the storage",
              flush=True)
        return 0
    if result.status != Status.REPORT:
        if result.status == Status.COMPLETE:
            print("rifle campaign: every cell is done; the worker that finished the last one writes the reports",
                  flush=True)
        return EXIT[result.status]
    return write_reports(plan, args, result.parents, result.failed)


def status(plan: P.Plan, args) -> int:
    import optuna

    from ..workers.cells import status as read_status
    from ..workers.storage import MEMORY, SweepError, open_storage, resolve_url
    url = resolve_url(args.storage) if args.storage else MEMORY
    if url == MEMORY:
        raise SweepError("--status reads a campaign's shared storage: give the workers' --storage")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=f"campaign:{plan.name}", storage=open_storage(url))
    except KeyError:
        raise SweepError(f"no campaign {plan.name!r} in {network.redact(url)}: no worker has started it") from None
    found = read_status(study, plan, args.grace_period)
    if args.json:
        print(json.dumps(found))
        return 0
    width = max(len(g) for g in found["groups"])
    lines = [f"campaign {plan.name!r} in {network.redact(url)}:",
             f"  {'group':<{width}}  complete  running  failed  pending"]
    lines += [f"  {g:<{width}}  {c['complete']:>8}  {c['running']:>7}  {c['failed']:>6}  {c['pending']:>7}"
              for g, c in found["groups"].items()]
    lines += [f"  {g} failed: {why}" for g, why in found["failed_groups"].items()]
    lines += [f"  stale: cell {s['cell']} (trial {s['trial']}), no heartbeat for {s['heartbeat_age_s']} s: the next "
              "worker retries it" for s in found["stale"]]
    rate = f"{found['images_per_second']:,.0f} training images/s per cell" if found["images_per_second"] else \
        "no training rate yet (no cell completed)"
    left = f"~{found['hours_left']:.1f} h left with {max(found['live_workers'], 1)} worker(s)" \
        if found["hours_left"] is not None else "time left unknown until a cell completes"
    lines.append(f"  {found['live_workers']} live worker(s); {rate}; {left}")
    print("\n".join(lines))
    return 0


def write_reports(plan: P.Plan, args, parents: dict[str, str], failed: dict[str, str]) -> int:
    """A report per complete group, the summary across groups (naming the failed ones) and the plan's views."""
    from mlflow.tracking import MlflowClient

    from ..evidence import regime
    from ..evidence.build import build_report
    from ..evidence.tables import by_group, campaign_summary
    from ..track.parents import claim_parent
    out = Path(args.report_dir or Path(args.output_root) / "reports" / plan.name)
    by_protocol: dict[str, dict] = {}
    for group, parent in parents.items():
        key, protocol = plan.group_of(group)
        built = build_report(args.tracking_uri, args.experiment, parent_run_id=parent,
                             output_dir=out / key / protocol, reference=plan.reference,
                             allow_mixed_env=args.allow_mixed_env)
        by_protocol.setdefault(protocol, {})[key] = built["runs"]
        print(f"{key}, {protocol}: {out / key / protocol} (also artifacts report/ of run {parent})")
    text, table, tests = campaign_summary({p: by_group(groups) for p, groups in by_protocol.items()},
                                          plan.reference, plan.references, failed)
    out.mkdir(parents=True, exist_ok=True)
    files = {"summary.md": text}
    (out / "summary.md").write_text(text)
    table.to_csv(out / "summary.csv", index=False)
    tests.to_csv(out / "summary_paired.csv", index=False)
    files |= {"summary.csv": None, "summary_paired.csv": None}
    if "regime" in plan.views:
        print(regime.write(args.tracking_uri, list(parents.values()), list(plan.methods), out, args.allow_mixed_env))
        files |= dict.fromkeys(regime.FILES)
    client = MlflowClient(args.tracking_uri)
    run = claim_parent(client, {K.CAMPAIGN_SUMMARY: plan.name}, K.CAMPAIGN_ROLE, args.experiment,
                       f"{plan.name}-summary", {K.REPORT_TAG: "true"}, adopt=False)
    for file in files:
        client.log_artifact(run, str(out / file), "report")
    if client.get_run(run).info.status != "FINISHED":
        client.set_terminated(run)
    print(text)
    print(f"summary: {out / 'summary.md'}, summary.csv, summary_paired.csv (also artifacts report/ of run {run})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
