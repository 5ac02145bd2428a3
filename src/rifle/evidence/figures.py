"""Every figure: the trainer's training curve, and the report's from the runs' histories (`history_keys` names
what they draw; rifle.track.reads.fetch_histories reads it). The paper's claim
is about what a fresh head does to the backbone, so they show it per block, input side first: distance to the
pretrained weights, gradient norms and what each re-init does to them. matplotlib's object API (no pyplot
state); no pandas import, as the trainer draws its curve where pandas may be missing.
"""
from __future__ import annotations

import math
import warnings

import numpy as np

from ..keys import (
    BLOCK_ORDER,
    GRAD,
    HEAD_REINIT,
    LR_HEAD,
    POST,
    PRE,
    TEST_ACC,
    TRAIN_ACC,
    VAL_ACC,
    WEIGHT,
    block_metric,
)
from ..methods import PLAIN, method_label, method_sort_key, method_tricks
from .mechanism import boundary_ratios, natural_key
from .stats import trick_set


def _figure(width: float, height: float, mosaic=None, **grid):
    """A figure and its axes: `fig.subplot_mosaic(mosaic)`, else `fig.subplots(**grid)`."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplot_mosaic(mosaic) if mosaic else fig.subplots(**grid)


def _mark_reinits(ax, epochs, color="tab:red", label=True):
    for i, e in enumerate(epochs):  # a re-init happens after epoch e's evaluation, before epoch e+1
        ax.axvline(e + 0.5, color=color, linestyle="--", linewidth=1, alpha=0.8,
                   label="head re-initialized" if label and i == 0 else None)


def _band(ax, series, color, label=None, alpha=0.15):
    """Mean ± std over seeds of one metric's rows of a history, per step."""
    g = series.groupby("step")["value"]
    mean, std = g.mean(), g.std(ddof=1).fillna(0)
    ax.plot(mean.index, mean.values, color=color, label=label)
    ax.fill_between(mean.index, mean - std, mean + std, color=color, alpha=alpha, linewidth=0)


def _versus(histories, dataset: str, reference: str, baseline: str):
    """The dataset's rows of the two methods, their colors (baseline first) and the reference's re-inits."""
    h = histories[(histories["dataset"] == dataset) & histories["method"].isin([reference, baseline])]
    return h, {baseline: "tab:blue", reference: "tab:red"}, reinit_epochs(h, reference)


def _block_axis(ax, blocks, ylabel: str, title: str, ratio: bool = False, legend_size=None):
    """Labels, legend and one tick per block of a finished per-block panel (`ratio`: a line at 1)."""
    ax.set_xticks(np.arange(len(blocks)), blocks, rotation=45, ha="right")
    ax.set(ylabel=ylabel, title=title)
    if ratio:
        ax.axhline(1.0, color="black", linewidth=0.8)
    ax.legend(fontsize=legend_size)


def reinit_epochs(histories, method: str) -> list[int]:
    """Epochs that ended with a head re-initialization in any run of `method`."""
    h = histories[(histories["method"] == method) & (histories["key"] == HEAD_REINIT) & (histories["value"] > 0)]
    return sorted(set(int(s) for s in h["step"]))


def final_weight_dist(histories):
    """Per run and block, weight_dist at the last logged epoch: run_id, dataset, method, seed, block, value."""
    wd = histories[histories["key"].str.startswith(WEIGHT)]
    last = wd.loc[wd.groupby(["run_id", "key"])["step"].idxmax()].copy()
    last["block"] = last["key"].str.slice(len(WEIGHT))
    return last[["run_id", "dataset", "method", "seed", "block", "value"]].reset_index(drop=True)


def logged_order(runs) -> list[str] | None:
    """The block order the runs' trainer logged (rifle.track.reads.fetch_runs' `block_order`, tag block_order):
    the first run's that has one, None when none has (runs from before the tag)."""
    if BLOCK_ORDER not in runs:
        return None
    return next((order for order in runs[BLOCK_ORDER] if order), None)


def block_order(model_spec: str, blocks, logged: list[str] | None = None) -> list[str]:
    """`blocks` from the input side to the head: in the order the trainer `logged` (`logged_order`); for runs from
    before it, rifle.models.block_names on the model (built without weights: torch and the model's library load,
    seconds); a natural sort for the blocks neither has (all of them for an unknown or unavailable model)."""
    blocks = set(blocks)
    if logged:
        known = [b for b in logged if b in blocks]
    else:
        try:
            from ..models import block_names, build_backbone
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                known = [b for b in block_names(build_backbone(model_spec, pretrained=False)[0]) if b in blocks]
        except Exception:
            known = []
    return known + sorted(blocks - set(known), key=natural_key)


def plot_training(history: list[dict], title: str = ""):
    """One run: validation (else training) accuracy and head learning rate over epochs, re-inits dashed."""
    fig, ax = _figure(6.4, 3.6)
    epochs = [row["epoch"] for row in history]
    key = VAL_ACC if all(VAL_ACC in row for row in history) else TRAIN_ACC
    ax.plot(epochs, [row[key] for row in history], marker="o", color="tab:blue", label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel(key.replace("_acc", "") + " accuracy", color="tab:blue")
    lr_ax = ax.twinx()
    lr_ax.plot(epochs, [row[LR_HEAD] for row in history], color="tab:orange", label=LR_HEAD)
    lr_ax.set_ylabel("head learning rate", color="tab:orange")
    _mark_reinits(ax, [row["epoch"] for row in history if row.get(HEAD_REINIT)], label=False)
    ax.set_title(title or "validation accuracy and head LR (dashed: head re-initialized)")
    return fig


def plot_mechanism(histories, dataset: str, reference: str = "rifle", baseline: str = PLAIN, model_spec: str = "",
                   logged: list[str] | None = None):
    """Top: each block's final distance to its pretrained weights (mean ± std over seeds) and the ratio
    reference / baseline per shared seed and mean. Bottom: the distance over epochs of three blocks. Blocks in
    `block_order(model_spec, ..., logged)`."""
    reference, baseline = method_label(reference), method_label(baseline)
    h, colors, reinits = _versus(histories, dataset, reference, baseline)
    final = final_weight_dist(h)
    if final.empty or set(final["method"]) != {reference, baseline}:
        raise ValueError(f"{dataset}: the mechanism figure needs weight_dist/* of both {reference} and {baseline}")
    blocks = block_order(model_spec, final["block"].unique(), logged)
    fig, axd = _figure(14, 8.5, [["bars", "bars", "ratio"], ["e0", "e1", "e2"]])
    x = np.arange(len(blocks))
    for i, (m, color) in enumerate(colors.items()):
        g = final[final["method"] == m].groupby("block")["value"]
        axd["bars"].bar(x + (i - 0.5) * 0.4, g.mean().reindex(blocks), 0.4, capsize=2, color=color,
                        yerr=g.std(ddof=1).reindex(blocks).fillna(0), label=f"{m} (n={g.size().max()})")
    _block_axis(axd["bars"], blocks, "L2 distance to pretrained weights",
                f"{dataset}: per-block distance at the end of training (input side → head)")
    wide = final.pivot_table(index=["seed", "block"], columns="method", values="value").dropna()
    ratio = (wide[reference] / wide[baseline]).unstack("block").reindex(columns=blocks)
    for _, row in ratio.iterrows():
        axd["ratio"].plot(x, row.values, "o", color="gray", alpha=0.5, markersize=3)
    axd["ratio"].plot(x, ratio.mean().values, "-o", color="tab:red", label=f"mean over seeds (n={len(ratio)})")
    _block_axis(axd["ratio"], blocks, f"distance ratio {reference} / {baseline}",
                "> 1: the block moved further under " + reference, ratio=True)
    for k, block in enumerate([blocks[0], blocks[len(blocks) // 2], blocks[-1]]):
        ax = axd[f"e{k}"]
        for m, color in colors.items():
            _band(ax, h[(h["key"] == block_metric(WEIGHT, block)) & (h["method"] == m)], color, m)
        _mark_reinits(ax, reinits, label=k == 0)
        ax.set(title=block_metric(WEIGHT, block), xlabel="epoch")
        if k == 0:
            ax.set_ylabel("L2 distance (mean ± std over seeds)")
            ax.legend(fontsize=8)
    return fig


def plot_paired(paired, confidence: float = 0.95, metric: str = TEST_ACC):
    """`report.paired_differences` with their confidence intervals, in percentage points."""
    rows = paired[paired["n"] > 0].reset_index(drop=True)
    fig, ax = _figure(7.5, 0.9 + 0.45 * max(len(rows), 1))
    y = np.arange(len(rows))[::-1]
    for yi, r in zip(y, rows.itertuples()):
        err = [[100 * (r.mean_diff - r.ci_low)], [100 * (r.ci_high - r.mean_diff)]] if math.isfinite(r.ci_low) else None
        ax.errorbar(100 * r.mean_diff, yi, xerr=err, fmt="o", color="tab:red", capsize=3)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(y, [f"{r.dataset}: {r.method} − {r.versus} (n={r.n})" for r in rows.itertuples()])
    ax.set(xlabel=f"{metric} difference (percentage points), {100 * confidence:g}% CI",
           title="reference − other, paired over shared seeds (> 0: the reference is better)")
    return fig


def plot_dynamics(histories, dataset: str, reference: str = "rifle", methods=None):
    """Validation (else training) accuracy, mean ± std over seeds, and mean head learning rate over epochs per
    method; dashed lines mark the re-inits of methods with the reference."""
    from matplotlib import colormaps

    h = histories[histories["dataset"] == dataset]
    key = VAL_ACC if (h["key"] == VAL_ACC).any() else TRAIN_ACC
    ref = set(method_tricks(method_label(reference)))
    fig, (acc_ax, lr_ax) = _figure(13, 4.5, ncols=2)
    for i, m in enumerate(sorted(methods or h["method"].unique(), key=method_sort_key)):
        color = colormaps["tab10"](i % 10)
        g = h[h["method"] == m]
        _band(acc_ax, g[g["key"] == key], color, f"{m} (n={g['run_id'].nunique()})", 0.12)
        lr = g[g["key"] == LR_HEAD].groupby("step")["value"].mean()
        lr_ax.plot(lr.index, lr.values, color=color, label=m)
        if m != PLAIN and ref <= trick_set(m):
            for ax in (acc_ax, lr_ax):
                _mark_reinits(ax, reinit_epochs(h, m), color=color, label=False)
    what = "validation" if key == VAL_ACC else "training"
    acc_ax.set(title=f"{dataset}: {what} accuracy (mean ± std over seeds)", xlabel="epoch", ylabel=f"{what} accuracy")
    acc_ax.legend(fontsize=8)
    lr_ax.set(title="head learning rate (dashed: head re-initialized)", xlabel="epoch", ylabel=LR_HEAD)
    return fig


def reinit_ratios(histories, method: str):
    """Per run, re-init and block: post / pre gradient norm (first steps after the re-init over the last
    steps before it). Columns: run_id, seed, reinit (1-based), epoch (that ended with it), block, ratio."""
    ratios = boundary_ratios(histories[histories["method"] == method]).rename(columns={"boundary": "reinit"})
    return ratios[["run_id", "seed", "reinit", "epoch", "block", "ratio"]]


def plot_gradient_flow(histories, dataset: str, reference: str, baseline: str, blocks: list[str]):
    """Does a fresh head send larger gradients into the backbone? One panel per block (input side first): its
    gradient norm averaged over each epoch's steps, mean ± std over seeds, reference vs baseline."""
    h, colors, reinits = _versus(histories, dataset, reference, baseline)
    cols = min(4, len(blocks))
    rows = math.ceil(len(blocks) / cols)
    fig, axes = _figure(3.4 * cols, 2.6 * rows, nrows=rows, ncols=cols, squeeze=False)
    axes = axes.ravel()
    for ax, block in zip(axes, blocks):
        for m, color in colors.items():
            series = h[(h["key"] == block_metric(GRAD, block)) & (h["method"] == m)]
            if len(series):
                _band(ax, series, color, f"{m} (n={series.groupby('step').size().max()})")
        _mark_reinits(ax, reinits)
        ax.set_title(block, fontsize=9)
        ax.set_yscale("log")
        ax.tick_params(labelsize=7)
    for ax in axes[len(blocks):]:
        ax.set_visible(False)
    axes[0].set_ylabel("gradient L2 norm (mean over steps)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{dataset}: gradient reaching each backbone block, {reference} vs {baseline} (mean ± std "
                 "over seeds; input side first)")
    return fig


def plot_reinit_ratios(ratios, dataset: str, reference: str, blocks: list[str]):
    """Per block: post / pre gradient norm at every re-init, one dot per (seed, re-init), the median as a line."""
    fig, ax = _figure(max(6.0, 0.6 * len(blocks) + 2), 4.0)
    x = np.arange(len(blocks))
    markers = "os^Dv<>"
    for k, (reinit, g) in enumerate(ratios.groupby("reinit")):
        for seed, gs in g.groupby("seed"):
            by_block = gs.set_index("block")["ratio"].reindex(blocks)
            ax.plot(x + 0.08 * (k - 0.5), by_block.values, markers[k % len(markers)], color="gray", alpha=0.6,
                    markersize=4, label=f"re-init {reinit} (one dot per seed)" if seed == g["seed"].min() else None)
    median = ratios.groupby("block")["ratio"].median().reindex(blocks)
    ax.plot(x, median.values, "-o", color="tab:red", label=f"median ({ratios['run_id'].nunique()} runs)")
    ax.set_yscale("log")
    _block_axis(ax, blocks, "gradient norm after / before the re-init",
                f"{dataset}: {reference}'s re-inits, per block (> 1: larger gradients after)", True, 8)
    return fig


def gradient_figures(histories, dataset: str, reference: str, baseline: str, model_spec: str,
                     logged: list[str] | None = None) -> dict:
    """{"gradients": plot_gradient_flow} and, when the reference re-initialized, {"reinit_gradients":
    plot_reinit_ratios}; blocks in `block_order(model_spec, ..., logged)`."""
    blocks = block_order(model_spec, {k[len(GRAD):] for k in histories["key"].unique() if k.startswith(GRAD)},
                         logged)
    out = {"gradients": plot_gradient_flow(histories, dataset, reference, baseline, blocks)}
    ratios = reinit_ratios(histories[histories["dataset"] == dataset], reference)
    if len(ratios):
        out["reinit_gradients"] = plot_reinit_ratios(ratios, dataset, reference, blocks)
    return out


def history_keys(runs, reference: str = "rifle", baseline: str = PLAIN) -> dict[str, list[str]]:
    """key -> run ids: the per-epoch metrics these figures draw, and for which runs of `runs` (rifle.track.
    reads.fetch_runs, whose `metric_keys` say what each run logged). Per dataset: validation accuracy
    (training accuracy where no run has it) and lr_head of every run, head_reinit of the runs with the
    reference's tricks, weight_dist/ and grad_norm/ of the reference's and the baseline's runs, and the
    windows around each period boundary (pre/post) of every run (evidence.mechanism compares their ratios)."""
    ref_name, base_name = method_label(reference), method_label(baseline)
    ref = set(method_tricks(ref_name))
    wanted: dict[str, list[str]] = {}

    def want(rows, keys=(), prefixes=()):
        for r in rows.itertuples(index=False):
            for key in r.metric_keys:
                if key in keys or key.startswith(prefixes):
                    wanted.setdefault(key, []).append(r.run_id)

    for _, g in runs.groupby("dataset"):
        accuracy = VAL_ACC if any(VAL_ACC in k for k in g["metric_keys"]) else TRAIN_ACC
        want(g, {accuracy, LR_HEAD})
        want(g[[m != PLAIN and ref <= trick_set(m) for m in g["method"]]], {HEAD_REINIT})
        want(g[g["method"].isin([ref_name, base_name])], prefixes=(WEIGHT, GRAD))
        want(g, prefixes=(PRE, POST))  # every method is measured at the period boundaries: ratios side by side
    return wanted
