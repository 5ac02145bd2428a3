"""`rifle report`: tables and figures from the finished runs in MLflow, the evidence for or against RIFLE.

The paper-style table (datasets x methods, mean ± std over seeds) and the paired difference reference − other
over shared seeds (the method with RIFLE minus the same method without it), each naming its metric and
selection, and the figures of rifle.evidence.figures, logged under artifacts `report/` of a `report` run (or
the parent). `--view regime --campaign NAME` renders the regime grid's view over a campaign's groups. The
library: rifle.evidence (tables, build, figures, regime) and rifle.track.reads.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import keys as K
from ..evidence.build import build_report
from ..evidence.stats import METRICS
from ..methods import PLAIN
from ..track.reads import slug


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rifle report", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tracking_uri", default="", help="MLflow store (default: $MLFLOW_TRACKING_URI, else "
                   "sqlite:///mlflow.db)")
    p.add_argument("--experiment", default="", help="experiment whose finished runs are compared (default: "
                   "every experiment, e.g. Default for `mlflow run .` and rifle for `rifle train`)")
    p.add_argument("--parent_run_id", default="", help="compare this run's child runs (a sweep comparison or "
                   "study) and log the report into it")
    p.add_argument("--output_dir", default="", help="where the files go (default: outputs/reports/<experiment or "
                   "parent run id>)")
    p.add_argument("--metric", default=K.TEST_ACC, choices=tuple(METRICS), help="the number the tables show: "
                   + "; ".join(f"{k}: {v}" for k, v in METRICS.items()))
    p.add_argument("--reference", default="rifle", help="the trick (or method) whose paired differences are "
                   "reported: rows are the method with it minus the same method without it")
    p.add_argument("--baseline", default=PLAIN, help="the method the mechanism figure compares with")
    p.add_argument("--group_by", default="dataset", help="comma-separated params forming the table's rows")
    p.add_argument("--view", default="", choices=("", "regime"), help="a view over a campaign's groups (with "
                   "--campaign): regime, RIFLE − plain per (protocol, images per class, K, head LR)")
    p.add_argument("--campaign", default="", help="the campaign whose groups --view reads (its name)")
    p.add_argument("--no_log", action="store_true", help="write the files only, log nothing to MLflow")
    p.add_argument("--allow_mixed_env", action="store_true", help="pair runs measured in different environments "
                   "(env.* tags: torch, CUDA, device, threads, deterministic); refused by default")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.view:
        return view(args)
    output_dir = args.output_dir or Path("outputs") / "reports" / slug(args.parent_run_id or args.experiment or "all")
    group_by = tuple(k.strip() for k in args.group_by.split(",") if k.strip())
    try:
        result = build_report(args.tracking_uri or None, args.experiment or None, args.parent_run_id or None,
                              output_dir, args.reference, args.baseline, group_by, not args.no_log, metric=args.metric,
                              allow_mixed_env=args.allow_mixed_env)
    except ValueError as e:
        print(f"rifle report: error: {e}", file=sys.stderr)
        return 2
    print(result["markdown"])
    for path in result["files"].values():
        print(f"wrote {path}")
    if result["run_id"]:
        print(f"logged under artifacts report/ of run {result['run_id']}")
    return 0


def view(args) -> int:
    """A campaign-wide view: its groups' parent runs (tag campaign.name), in the order of their names."""
    from ..evidence import regime
    from ..track.parents import find_runs
    from ..track.reads import client
    if not args.campaign:
        print("rifle report: error: --view reads a campaign's groups: give --campaign NAME", file=sys.stderr)
        return 2
    mlflow = client(args.tracking_uri or None)
    parents = find_runs(mlflow, {K.CAMPAIGN_NAME: args.campaign, K.CELL_ROLE: K.Role.PARENT})
    if not parents:
        print(f"rifle report: error: no campaign {args.campaign!r} in the store (no parent run tagged "
              f"{K.CAMPAIGN_NAME}={args.campaign})", file=sys.stderr)
        return 2
    methods = parents[0].data.tags.get(K.CAMPAIGN_METHODS, "").split(",")
    out = Path(args.output_dir or Path("outputs") / "reports" / slug(args.campaign))
    print(regime.write(args.tracking_uri or None, [r.info.run_id for r in parents], methods, out,
                       args.allow_mixed_env) + f"files: {', '.join(str(out / f) for f in regime.FILES)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
