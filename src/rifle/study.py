"""The offline reproduction study: plain fine-tuning vs RIFLE vs each baseline, same settings, paired seeds.

    python -m rifle.study                      # both protocols, ~30 min on 2 CPU cores; resumable
    python -m rifle.study --protocol authors --seeds 3 --methods plain,rifle epochs=10
    python -m rifle.study --storage optuna.journal   # started N times: N workers share the cells

Two protocols, each its own parent run and table: `validated` (20% of train held out, test accuracy at the
best-validation checkpoint) and `authors` (the official RIFLE code's: all of train, no validation, the
last epoch's test accuracy). Every (method, seed) is one cell: one `fit` and one MLflow child run
(rifle.paired), so an interrupted study resumes. Settings are each method's defaults (untuned: the study
compares the published recipes under one budget, not the best of each); all methods share data, model,
epochs, learning rate, threads and the seeds. rifle.evidence then builds the tables and figures.
"""
from __future__ import annotations

import sys
from pathlib import Path

from . import paired
from .paired import BASE, PROTOCOLS  # noqa: F401  (the offline setting and the protocols, used by others)

# method label (rifle.methods) -> options (the rest are the shared base and each trick's defaults); the
# tricks come from the label, so the study, sweeps, comparisons and reports share one name per method.
METHODS = paired.method_options(("plain", "rifle", "dropout", "dropconnect", "stochastic_depth", "disturb_label",
                                 "cyclic_lr", "l2sp", "rifle+l2sp", "delta"))


def main(argv: list[str] | None = None) -> int:
    p = paired.paired_parser("study", __doc__, experiment="rifle-offline-study", runs="study's", example="epochs=10",
                             output_help="runs go to <root>/<name>-<protocol>/<method>/seed-<s>; an interrupted "
                             "study resumes from there", report_help="where the table and figures go")
    p.add_argument("--methods", default=",".join(m for m in METHODS if m != "delta"),
                   help=f"comma-separated, from {', '.join(METHODS)} (default: all but delta, whose channel-"
                   "attention pass makes a run ~10x longer on the CPU)")
    p.add_argument("--name", default="offline-study", help="study name; each protocol's parent run and output "
                   "folder is <name>-<protocol>")
    args = p.parse_args(argv)
    plan = paired.paired_plan(args, "study", lambda protocol, shared: {f"{args.name}-{protocol}": {
        label: shared | options for label, options in paired.chosen_methods(args.methods, METHODS).items()}})
    if plan is None:
        return 2
    status, parents = paired.run("study", args.name, plan, list(range(args.seeds)), args)
    code = paired.exit_code("study", status)
    if code is not None:
        return code
    from .evidence.build import build_report
    for group, parent in parents.items():
        protocol = group.removeprefix(f"{args.name}-")
        report_dir = str(Path(args.report_dir) / protocol)
        built = build_report(args.tracking_uri, args.experiment, parent_run_id=parent, output_dir=report_dir)
        print(f"protocol {protocol}:\n{built['markdown']}")
        print(f"table and figures: {report_dir} (also artifacts report/ of run {parent})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
