"""Where does RIFLE help? RIFLE − plain paired differences over a grid of what its mechanism depends on.

    python -m rifle.regime                 # 2 protocols x 2 data sizes x (plain + 4 RIFLE variants) x 5 seeds
    python -m rifle.regime --seeds 3 epochs=12

The paper's argument is about optimizer steps: a re-initialized head needs steps to fit again, and the
backbone gets its "meaningful updates" while it does. So the grid varies what sets the steps per period
(images per class at batch 32 -> steps per epoch; K re-inits -> epochs per period) and the head's learning
rate after a re-init (`follow`: the backbone's decaying cosine; `cyclic`: the official `fc_lr_util=cyclic`,
a fresh cosine each period), under both evaluation protocols (validated: best-validation checkpoint;
authors': all of train, last epoch). Every cell is paired with plain fine-tuning on the same seeds and
data; each difference gets a 95% t interval and a paired t-test whose p-value is Holm-adjusted over every
cell of the grid (the family). A cell "helps" or "hurts" (by the sign of the mean difference) only when its
Holm-adjusted p is below 0.05, otherwise it "cannot be told apart": an interval off 0 before the correction
is one of 16 chances, not a finding.
Every (protocol, data size) is one parent run of rifle.paired, so an interrupted grid resumes, and
`--storage` shares its cells between workers.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

from . import config as C
from . import paired

DATA = {10: {"train_per_class": 10}, 30: {"train_per_class": 30}}  # images per class -> options
CLASSES = 10  # digits
REINITS = (1, 2)
POLICIES = ("follow", "cyclic")


def variants() -> dict[str, dict]:
    """label -> options: plain and every (K, head-LR policy) of RIFLE."""
    return {"plain": {"tricks": ""}} | {f"rifle-K{k}-{policy}": {"tricks": "rifle", "reinit_times": k,
                                                                 "head_lr_policy": policy}
                                        for k in REINITS for policy in POLICIES}


def group_name(protocol: str, per_class: int) -> str:
    return f"regime-{protocol}-{per_class}pc"


def collect(tracking_uri: str, parents: dict, plan: dict, allow_mixed_env: bool = False) -> "pd.DataFrame":
    """One row per (protocol, data, K, policy): plain and RIFLE mean test_acc over the shared seeds and the
    paired difference RIFLE − plain with its 95% t interval, p, p Holm-adjusted over the grid and the verdict
    on it."""
    import pandas as pd

    from .evidence.stats import holm
    from .evidence.tables import check_environments, paired_differences
    from .track.reads import fetch_runs

    rows = []
    for (protocol, per_class), parent in parents.items():
        runs = fetch_runs(tracking_uri, parent_run_id=parent)
        check_environments(runs, allow_mixed_env)
        acc = runs.pivot_table(index="seed", columns="method", values="test_acc", aggfunc="last")
        methods = plan[group_name(protocol, per_class)]
        for label, options in variants().items():
            if label == "plain" or label not in acc or "plain" not in acc:
                continue
            both = acc[[label, "plain"]].dropna()
            cfg = C.build(methods[label])
            # optimizer steps of one epoch: the k-shot train set (CLASSES classes) at the batch size
            spe = math.ceil(CLASSES * cfg.data.train_per_class / cfg.optim.batch_size)
            (stats,) = paired_differences(runs, pairs=[(label, "plain")]).drop(
                columns=["dataset", "protocol", "method", "versus", "p_holm", "seeds"]).to_dict("records")
            rows.append({"protocol": protocol, "images_per_class": per_class, "steps_per_epoch": spe,
                         "K": options["reinit_times"], "head_lr": options["head_lr_policy"],
                         "steps_per_period": spe * cfg.optim.epochs // (options["reinit_times"] + 1),
                         "plain": both["plain"].mean() if len(both) else math.nan,
                         "rifle": both[label].mean() if len(both) else math.nan, **stats})
    table = pd.DataFrame(rows)
    if len(table):
        table["p_holm"] = holm(table["p_value"])
        table["verdict"] = [verdict(d, p) for d, p in zip(table["mean_diff"], table["p_holm"])]
    return table


ALPHA = 0.05  # on the Holm-adjusted p: the familywise error rate over the grid's cells


def verdict(mean_diff: float, p_holm: float, alpha: float = ALPHA) -> str:
    """helps / hurts (by the sign of RIFLE − plain) when the Holm-adjusted p is below `alpha`, else "cannot be
    told apart" (also without a test: p nan)."""
    if math.isfinite(p_holm) and p_holm < alpha and mean_diff != 0:
        return "helps" if mean_diff > 0 else "hurts"
    return "cannot be told apart"


def markdown(table) -> str:
    lines = ["| protocol | images/class | steps/epoch | K | head LR | steps/period | n | plain (%) | RIFLE (%) | "
             "RIFLE − plain (points) [95% CI] | p | p (Holm) | verdict (Holm p < 0.05) |", "|---" * 13 + "|"]
    for r in table.itertuples(index=False):
        lines.append(f"| {r.protocol} | {r.images_per_class} | {r.steps_per_epoch} | {r.K} | {r.head_lr} | "
                     f"{r.steps_per_period} | {r.n} | {100 * r.plain:.1f} | {100 * r.rifle:.1f} | "
                     f"{100 * r.mean_diff:+.2f} [{100 * r.ci_low:+.2f}, {100 * r.ci_high:+.2f}] | "
                     f"{r.p_value:.3f} | {r.p_holm:.3f} | {r.verdict} |")
    m = int(table["p_holm"].notna().sum()) if len(table) else 0
    lines += ["", f"Verdict: helps / hurts (by the sign of the mean difference) only where p, Holm-adjusted over "
              f"the {m} cells with a test (the family), is below {ALPHA:g}; otherwise cannot be told apart. The "
              "95% intervals are per cell, not corrected: one that misses 0 is not a verdict."]
    return "\n".join(lines) + "\n"


def plot(table):
    """Forest plot: RIFLE − plain with its 95% interval per cell, one colour per protocol."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(8, 0.42 * len(table) + 1.4), layout="constrained")
    ax = fig.add_subplot()
    colors = {"validated": "tab:blue", "authors": "tab:orange"}
    labels = []
    for i, r in enumerate(table.itertuples(index=False)):
        ax.errorbar(100 * r.mean_diff, len(table) - 1 - i, fmt="o", color=colors.get(r.protocol, "gray"), capsize=3,
                    xerr=[[100 * (r.mean_diff - r.ci_low)], [100 * (r.ci_high - r.mean_diff)]],
                    label=r.protocol if r.protocol not in [lab[0] for lab in labels] else None)
        labels.append((r.protocol, f"{r.images_per_class}/class, K={r.K}, {r.head_lr} "
                                   f"({r.steps_per_period} steps/period)"))
    ax.set_yticks(range(len(table)), [text for _, text in reversed(labels)], fontsize=8)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("RIFLE − plain test accuracy (points), mean and 95% t interval over paired seeds")
    ax.legend(title="protocol", fontsize=8)
    ax.set_title("Where RIFLE helps: digits, EfficientNet-Lite0, 48 px, 30 epochs")
    return fig


def main(argv: list[str] | None = None) -> int:
    p = paired.paired_parser("regime", __doc__, experiment="rifle-regime", runs="grid's", example="epochs=12",
                             output_help="runs go to <root>/<cell>/<method>/seed-<s>",
                             report_help="where regime.md/.csv/.png go")
    p.add_argument("--allow_mixed_env", action="store_true", help="pair runs measured in different environments")
    args = p.parse_args(argv)
    # every configuration is valid before the first of ~100 runs starts
    plan = paired.paired_plan(args, "regime", lambda protocol, shared: {
        group_name(protocol, per_class): {label: shared | data | options for label, options in variants().items()}
        for per_class, data in DATA.items()})
    if plan is None:
        return 2
    status, parents = paired.run("regime", "regime", plan, list(range(args.seeds)), args)
    code = paired.exit_code("regime", status)
    if code is not None:
        return code
    cells = {group_name(protocol, per_class): (protocol, per_class) for protocol in paired.PROTOCOLS
             for per_class in DATA}
    table = collect(args.tracking_uri, {cells[g]: parent for g, parent in parents.items()}, plan,
                    args.allow_mixed_env)
    out = Path(args.report_dir)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "regime.csv", index=False)
    (out / "regime.md").write_text(markdown(table))
    plot(table).savefig(out / "regime.png", dpi=110)
    print(markdown(table))
    print(f"table and figure: {out}/regime.md, regime.csv, regime.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
