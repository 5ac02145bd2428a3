"""Where does RIFLE help? A report view over a regime grid (configs/campaign/regime.yaml): RIFLE − plain paired
differences over what its mechanism depends on.

The paper's argument is about optimizer steps: a re-initialized head needs steps to fit again, and the
backbone gets its "meaningful updates" while it does. So the grid varies what sets the steps per period
(images per class at batch 32 -> steps per epoch; K re-inits -> epochs per period) and the head's learning
rate after a re-init (`follow`: the backbone's decaying cosine; `cyclic`: the official `fc_lr_util=cyclic`,
a fresh cosine each period), under both evaluation protocols (validated: best-validation checkpoint;
authors': all of train, last epoch). Every cell is paired with plain fine-tuning on the same seeds and
data; each difference gets a 95% t interval and a paired t-test whose p-value is Holm-adjusted over every
cell of the grid (the family). A cell "helps" or "hurts" (by the sign of the mean difference) only when its
Holm-adjusted p is below 0.05, otherwise it "cannot be told apart": an interval off 0 before the correction
is one of 16 chances, not a finding. What a row describes is read from its runs' params (train_per_class,
reinit_times, head_lr_policy; steps per epoch = optimizer_steps / epochs_trained), not from the plan.
"""
from __future__ import annotations

import math

from ..keys import EPOCHS_TRAINED, OPTIMIZER_STEPS, TEST_ACC
from ..schedules import period_steps
from .stats import MDE_ALPHA, MDE_POWER

BASELINE = "plain"


# What sets a regime row's steps per period, beside a report's seeds.csv columns.
PARAMS = ("train_per_class", "reinit_times", "head_lr_policy", "tricks")


def seeds(tracking_uri: str | None, parents: list[str], allow_mixed_env: bool = False) -> "pd.DataFrame":
    """The grid's runs, one row per (group, method, seed), read from the groups' parent runs (in the order given):
    the group's index, a report's seeds.csv columns (tables.seeds_frame: accuracies, selected epoch, env.* tags,
    budget) and PARAMS: what `table` needs, and what docs/ publishes so that anyone can rebuild it."""
    import pandas as pd

    from .. import env
    from ..track.reads import fetch_runs
    from .tables import SEED_COLUMNS, SEED_EXTRA, check_environments, seeds_frame

    columns = ["group", *SEED_COLUMNS, *env.KEYS, *SEED_EXTRA, *PARAMS]
    frames = []
    for i, parent in enumerate(parents):
        runs = fetch_runs(tracking_uri, parent_run_id=parent)
        check_environments(runs, allow_mixed_env)
        params = pd.DataFrame(list(runs["params"]), index=runs.index)
        frames.append(seeds_frame(runs).assign(group=i, **{k: params.get(k) for k in PARAMS}))
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def collect(tracking_uri: str | None, parents: list[str], methods: list[str], allow_mixed_env: bool = False,
            baseline: str = BASELINE) -> "pd.DataFrame":
    """`table` of the groups' runs (the grid read from its parent runs)."""
    return table(seeds(tracking_uri, parents, allow_mixed_env), methods, baseline)


def write(tracking_uri: str | None, parents: list[str], methods: list[str], out, allow_mixed_env: bool = False) -> str:
    """The view's files in `out`: regime_seeds.csv (its runs, from which `table` rebuilds it), regime.csv,
    regime.md and regime.png; returns the Markdown."""
    from pathlib import Path
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = seeds(tracking_uri, parents, allow_mixed_env)
    grid = table(runs, methods)
    runs.to_csv(out / "regime_seeds.csv", index=False)
    grid.to_csv(out / "regime.csv", index=False)
    (out / "regime.md").write_text(markdown(grid))
    plot(grid).savefig(out / "regime.png", dpi=110)
    return markdown(grid)


FILES = ("regime_seeds.csv", "regime.csv", "regime.md", "regime.png")


def table(runs, methods: list[str], baseline: str = BASELINE) -> "pd.DataFrame":
    """One row per group (a protocol and a data size, in the order of `runs`) and method other than `baseline`, in
    the order given: plain and RIFLE mean test_acc over the shared seeds and the paired difference RIFLE − plain
    with its 95% t interval, p, p Holm-adjusted over the grid and the verdict on it. Pure: `runs` has `seeds`' columns."""
    import pandas as pd

    from .stats import holm
    from .tables import paired_differences

    rows = []
    for _, g in runs.groupby("group", sort=False):
        g = g.assign(dataset="")
        acc = g.pivot_table(index="seed", columns="method", values=TEST_ACC, aggfunc="last")
        for label in methods:
            if label == baseline or label not in acc or baseline not in acc:
                continue
            both = acc[[label, baseline]].dropna()
            run = g[g["method"] == label].iloc[0]
            k, epochs = int(float(run["reinit_times"])), int(float(run[EPOCHS_TRAINED]))
            spe = int(float(run[OPTIMIZER_STEPS])) // epochs  # optimizer steps of one epoch
            (stats,) = paired_differences(g, pairs=[(label, baseline)]).drop(
                columns=["dataset", "protocol", "method", "versus", "p_holm", "seeds"]).to_dict("records")
            # the control restarts the head's learning rate as cyclic does, and never re-initializes
            head_lr = "restart, no re-init" if "head_lr_restart" in str(run["tricks"]) else run["head_lr_policy"]
            rows.append({"protocol": run["protocol"], "images_per_class": int(float(run["train_per_class"])),
                         "steps_per_epoch": spe, "K": k, "head_lr": head_lr,
                         "steps_per_period": period_steps(spe, epochs, k),
                         "plain": both[baseline].mean() if len(both) else math.nan,
                         "rifle": both[label].mean() if len(both) else math.nan, **stats})
    grid = pd.DataFrame(rows)
    if len(grid):
        grid["p_holm"] = holm(grid["p_value"])
        grid["verdict"] = [verdict(d, p) for d, p in zip(grid["mean_diff"], grid["p_holm"])]
    return grid


ALPHA = 0.05  # on the Holm-adjusted p: the familywise error rate over the grid's cells


def verdict(mean_diff: float, p_holm: float, alpha: float = ALPHA) -> str:
    """helps / hurts (by the sign of RIFLE − plain) when the Holm-adjusted p is below `alpha`, else "cannot be
    told apart" (also without a test: p nan)."""
    if math.isfinite(p_holm) and p_holm < alpha and mean_diff != 0:
        return "helps" if mean_diff > 0 else "hurts"
    return "cannot be told apart"


def markdown(table) -> str:
    lines = ["| protocol | images/class | steps/epoch | K | head LR | steps/period | n | plain (%) | RIFLE (%) | "
             "RIFLE − plain (points) [95% CI] | p | p (Holm) | p (sign-flip) | MDE (points) | "
             "verdict (Holm p < 0.05) |", "|---" * 15 + "|"]
    for r in table.itertuples(index=False):
        lines.append(f"| {r.protocol} | {r.images_per_class} | {r.steps_per_epoch} | {r.K} | {r.head_lr} | "
                     f"{r.steps_per_period} | {r.n} | {100 * r.plain:.1f} | {100 * r.rifle:.1f} | "
                     f"{100 * r.mean_diff:+.2f} [{100 * r.ci_low:+.2f}, {100 * r.ci_high:+.2f}] | "
                     f"{r.p_value:.3f} | {r.p_holm:.3f} | {r.p_signflip:.3f} | {100 * r.mde:.2f} | {r.verdict} |")
    m = int(table["p_holm"].notna().sum()) if len(table) else 0
    lines += ["", f"Verdict: helps / hurts (by the sign of the mean difference) only where p, Holm-adjusted over "
              f"the {m} cells with a test (the family), is below {ALPHA:g}; otherwise cannot be told apart. The "
              "95% intervals are per cell, not corrected: one that misses 0 is not a verdict. p (sign-flip): the "
              "exact paired permutation test (no normality assumed; at least 2/2^n with n seeds). MDE: the smallest "
              f"difference the cell's seeds resolve (a paired t-test at two-sided {MDE_ALPHA:g} finds it with "
              f"probability {MDE_POWER:g}, from the observed sd of the differences)."]
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
