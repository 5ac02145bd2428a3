"""Every figure: the per-run training curve the trainer logs, and the report's figures from training
histories in long form (`report.fetch_histories`: run_id, dataset, method, seed, key, step, value).

The paper's claim is about what a fresh head does to the backbone, so the figures show it per block, input
side first: distance to the pretrained weights (mechanism), the gradient reaching each block and what each
re-initialization does to it (post / pre window ratio), plus accuracy and head LR over epochs (dynamics).

matplotlib's object API (Figure, no pyplot state or backend switch inside notebooks). No pandas import here:
the trainer draws its curve in environments without it; the histories arrive as DataFrames.
"""
from __future__ import annotations

import math
import re
import warnings

import numpy as np

from .methods import PLAIN, method_label, method_sort_key, method_tricks
from .stats import trick_set

WEIGHT, GRAD = "weight_dist/", "grad_norm/"
PRE, POST = "grad_norm_pre_reinit/", "grad_norm_post_reinit/"


def _figure(width: float, height: float):
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), layout="constrained")


def _mark_reinits(ax, epochs, color="tab:red", label=True):
    for i, e in enumerate(epochs):  # a re-init happens after epoch e's evaluation, before epoch e+1
        ax.axvline(e + 0.5, color=color, linestyle="--", linewidth=1, alpha=0.8,
                   label="head re-initialized" if label and i == 0 else None)


def _band(ax, g, color, label=None, alpha=0.15):
    """Mean ± std over seeds of one grouped-by-step series."""
    mean, std = g.mean(), g.std(ddof=1).fillna(0)
    ax.plot(mean.index, mean.values, color=color, label=label)
    ax.fill_between(mean.index, mean - std, mean + std, color=color, alpha=alpha, linewidth=0)


def reinit_epochs(histories, method: str) -> list[int]:
    """Epochs that ended with a head re-initialization in any run of `method`."""
    h = histories[(histories["method"] == method) & (histories["key"] == "head_reinit") & (histories["value"] > 0)]
    return sorted(set(int(s) for s in h["step"]))


def final_weight_dist(histories):
    """Per run and block, weight_dist at the last logged epoch: run_id, dataset, method, seed, block, value."""
    wd = histories[histories["key"].str.startswith(WEIGHT)]
    last = wd.loc[wd.groupby(["run_id", "key"])["step"].idxmax()].copy()
    last["block"] = last["key"].str.slice(len(WEIGHT))
    return last[["run_id", "dataset", "method", "seed", "block", "value"]].reset_index(drop=True)


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def block_order(model_spec: str, blocks) -> list[str]:
    """`blocks` from the input side to the head: the order of rifle.models.block_names on the model (built
    without weights), else a natural sort (an unknown or unavailable model)."""
    blocks = list(blocks)
    try:
        from .models import block_names, build_backbone
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            order = block_names(build_backbone(model_spec, pretrained=False)[0])
    except Exception:
        return sorted(blocks, key=_natural)
    known = [b for b in order if b in blocks]
    return known + sorted(set(blocks) - set(known), key=_natural)


def plot_training(history: list[dict], title: str = ""):
    """One run: validation accuracy (training accuracy without validation) and head learning rate over
    epochs; dashed lines mark head re-inits."""
    fig = _figure(6.4, 3.6)
    ax = fig.add_subplot()
    epochs = [row["epoch"] for row in history]
    key = "val_acc" if all("val_acc" in row for row in history) else "train_acc"
    ax.plot(epochs, [row[key] for row in history], marker="o", color="tab:blue", label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel(key.replace("_acc", "") + " accuracy", color="tab:blue")
    lr_ax = ax.twinx()
    lr_ax.plot(epochs, [row["lr_head"] for row in history], color="tab:orange", label="lr_head")
    lr_ax.set_ylabel("head learning rate", color="tab:orange")
    _mark_reinits(ax, [row["epoch"] for row in history if row.get("head_reinit")], label=False)
    ax.set_title(title or "validation accuracy and head LR (dashed: head re-initialized)")
    return fig


def plot_mechanism(histories, dataset: str, reference: str = "rifle", baseline: str = PLAIN,
                   model_spec: str = "", blocks_over_epochs=None):
    """Top left: each block's distance to its pretrained weights at the end of training, mean ± std over
    seeds, reference vs baseline. Top right: the ratio reference / baseline per block, per shared seed (dots)
    and mean (line). Bottom: the distance over epochs for the input side, a middle and the last block, with
    the reference's head re-initializations dashed."""
    reference, baseline = method_label(reference), method_label(baseline)
    h = histories[(histories["dataset"] == dataset) & histories["method"].isin([reference, baseline])]
    final = final_weight_dist(h)
    if final.empty or set(final["method"]) != {reference, baseline}:
        raise ValueError(f"{dataset}: the mechanism figure needs weight_dist/* of both {reference} and {baseline}")
    blocks = block_order(model_spec, final["block"].unique())
    colors = {reference: "tab:red", baseline: "tab:blue"}
    fig = _figure(14, 8.5)
    axd = fig.subplot_mosaic([["bars", "bars", "ratio"], ["e0", "e1", "e2"]])
    x = np.arange(len(blocks))
    for i, m in enumerate((baseline, reference)):
        g = final[final["method"] == m].groupby("block")["value"]
        mean, std, n = g.mean().reindex(blocks), g.std(ddof=1).reindex(blocks), g.size().max()
        axd["bars"].bar(x + (i - 0.5) * 0.4, mean, 0.4, yerr=std.fillna(0), capsize=2, color=colors[m],
                        label=f"{m} (n={n})")
    axd["bars"].set_ylabel("L2 distance to pretrained weights")
    axd["bars"].set_title(f"{dataset}: per-block distance at the end of training (input side → head)")
    wide = final.pivot_table(index=["seed", "block"], columns="method", values="value").dropna()
    ratio = (wide[reference] / wide[baseline]).unstack("block").reindex(columns=blocks)
    for _, row in ratio.iterrows():
        axd["ratio"].plot(x, row.values, "o", color="gray", alpha=0.5, markersize=3)
    axd["ratio"].plot(x, ratio.mean().values, "-o", color="tab:red", label=f"mean over seeds (n={len(ratio)})")
    axd["ratio"].axhline(1.0, color="black", linewidth=0.8)
    axd["ratio"].set_ylabel(f"distance ratio {reference} / {baseline}")
    axd["ratio"].set_title("> 1: the block moved further under " + reference)
    for ax in (axd["bars"], axd["ratio"]):
        ax.set_xticks(x, blocks, rotation=45, ha="right")
        ax.legend()
    chosen = list(blocks_over_epochs or [blocks[0], blocks[len(blocks) // 2], blocks[-1]])
    reinits = reinit_epochs(h, reference)
    for k, block in enumerate(chosen[:3]):
        ax = axd[f"e{k}"]
        series = h[h["key"] == WEIGHT + block]
        for m in (baseline, reference):
            _band(ax, series[series["method"] == m].groupby("step")["value"], colors[m], m)
        _mark_reinits(ax, reinits, label=k == 0)
        ax.set_title(WEIGHT + block)
        ax.set_xlabel("epoch")
        if k == 0:
            ax.set_ylabel("L2 distance (mean ± std over seeds)")
            ax.legend(fontsize=8)
    return fig


def plot_paired(paired, confidence: float = 0.95, metric: str = "test_acc"):
    """The paired differences reference − other with their confidence intervals (percentage points), one row
    per comparison (`report.paired_differences`)."""
    rows = paired[paired["n"] > 0].reset_index(drop=True)
    fig = _figure(7.5, 0.9 + 0.45 * max(len(rows), 1))
    ax = fig.add_subplot()
    y = np.arange(len(rows))[::-1]
    for yi, r in zip(y, rows.itertuples()):
        err = [[100 * (r.mean_diff - r.ci_low)], [100 * (r.ci_high - r.mean_diff)]] if math.isfinite(r.ci_low) else None
        ax.errorbar(100 * r.mean_diff, yi, xerr=err, fmt="o", color="tab:red", capsize=3)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(y, [f"{r.dataset}: {r.method} − {r.versus} (n={r.n})" for r in rows.itertuples()])
    ax.set_xlabel(f"{metric} difference (percentage points), {100 * confidence:g}% CI")
    ax.set_title("reference − other, paired over shared seeds (> 0: the reference is better)")
    return fig


def plot_dynamics(histories, dataset: str, reference: str = "rifle", methods=None):
    """Validation accuracy (training accuracy for runs without validation; mean ± std over seeds) and head
    learning rate (mean) over epochs per method; dashed lines mark the re-initializations of methods that
    contain the reference."""
    from matplotlib import colormaps

    h = histories[histories["dataset"] == dataset]
    key = "val_acc" if (h["key"] == "val_acc").any() else "train_acc"
    methods = sorted(methods or h["method"].unique(), key=method_sort_key)
    ref = set(method_tricks(method_label(reference)))
    fig = _figure(13, 4.5)
    acc_ax, lr_ax = fig.subplots(1, 2)
    for i, m in enumerate(methods):
        color = colormaps["tab10"](i % 10)
        g = h[h["method"] == m]
        _band(acc_ax, g[g["key"] == key].groupby("step")["value"], color, f"{m} (n={g['run_id'].nunique()})", 0.12)
        lr = g[g["key"] == "lr_head"].groupby("step")["value"].mean()
        lr_ax.plot(lr.index, lr.values, color=color, label=m)
        if m != PLAIN and ref <= trick_set(m):
            for ax in (acc_ax, lr_ax):
                _mark_reinits(ax, reinit_epochs(h, m), color=color, label=False)
    what = "validation" if key == "val_acc" else "training"
    acc_ax.set(title=f"{dataset}: {what} accuracy (mean ± std over seeds)", xlabel="epoch", ylabel=f"{what} accuracy")
    acc_ax.legend(fontsize=8)
    lr_ax.set(title="head learning rate (dashed: head re-initialized)", xlabel="epoch", ylabel="lr_head")
    return fig


# ----------------------------------------------------------------------------------------------------
# Gradient flow: does a fresh head send larger gradients into the backbone?

def grad_blocks(histories, order: list[str] | None = None) -> list[str]:
    """Blocks that have grad_norm/<block>, in `order` (input side first) where given."""
    names = sorted({k[len(GRAD):] for k in histories["key"].unique() if k.startswith(GRAD)})
    if order:
        names = [b for b in order if b in names] + [b for b in names if b not in order]
    return names


def reinit_ratios(histories, method: str):
    """Per run, re-init and block: post / pre gradient norm (first steps after the re-init over the last
    steps before it). Columns: run_id, seed, reinit (1-based), epoch (that ended with it), block, ratio."""
    import pandas as pd
    h = histories[histories["method"] == method]
    rows = []
    for run_id, g in h.groupby("run_id"):
        pre = g[g["key"].str.startswith(PRE)]
        post = g[g["key"].str.startswith(POST)].assign(
            block=lambda d: d["key"].str.slice(len(POST)), step=lambda d: d["step"] - 1)  # logged an epoch later
        pre = pre.assign(block=pre["key"].str.slice(len(PRE)))
        both = pre.merge(post[["block", "step", "value"]], on=["block", "step"], suffixes=("_pre", "_post"))
        epochs = sorted(both["step"].unique())
        for r in both.itertuples(index=False):
            rows.append((run_id, r.seed, epochs.index(r.step) + 1, int(r.step), r.block, r.value_post / r.value_pre))
    return pd.DataFrame(rows, columns=["run_id", "seed", "reinit", "epoch", "block", "ratio"])


def plot_gradient_flow(histories, dataset: str, reference: str, baseline: str, blocks: list[str]):
    """One panel per backbone block (input side first): the block's gradient norm averaged over each
    epoch's steps, mean ± std over seeds, reference vs baseline, the reference's re-inits dashed."""
    h = histories[(histories["dataset"] == dataset) & histories["method"].isin([reference, baseline])]
    cols = min(4, len(blocks))
    rows = math.ceil(len(blocks) / cols)
    fig = _figure(3.4 * cols, 2.6 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    colors = {reference: "tab:red", baseline: "tab:blue"}
    reinits = reinit_epochs(h, reference)
    for ax, block in zip(axes, blocks):
        series = h[h["key"] == GRAD + block]
        for m in (baseline, reference):
            g = series[series["method"] == m].groupby("step")["value"]
            if len(g):
                _band(ax, g, colors[m], f"{m} (n={g.size().max()})")
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


def plot_reinit_ratios(ratios, dataset: str, reference: str, blocks: list[str], window: str = ""):
    """Per block: post / pre gradient norm at every re-init, one dot per (seed, re-init), the median as a
    line; above 1 the fresh head sends larger gradients into that block than the trained head did."""
    fig = _figure(max(6.0, 0.6 * len(blocks) + 2), 4.0)
    ax = fig.add_subplot()
    x = np.arange(len(blocks))
    markers = "os^Dv<>"
    for k, (reinit, g) in enumerate(ratios.groupby("reinit")):
        for seed, gs in g.groupby("seed"):
            by_block = gs.set_index("block")["ratio"].reindex(blocks)
            ax.plot(x + 0.08 * (k - 0.5), by_block.values, markers[k % len(markers)], color="gray", alpha=0.6,
                    markersize=4, label=f"re-init {reinit} (one dot per seed)" if seed == g["seed"].min() else None)
    median = ratios.groupby("block")["ratio"].median().reindex(blocks)
    ax.plot(x, median.values, "-o", color="tab:red", label=f"median ({ratios['run_id'].nunique()} runs)")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(x, blocks, rotation=45, ha="right")
    ax.set_ylabel("gradient norm after / before the re-init")
    ax.set_title(f"{dataset}: {reference}'s re-inits, per block{window} (> 1: larger gradients after)")
    ax.legend(fontsize=8)
    return fig


def gradient_figures(histories, dataset: str, reference: str, baseline: str, model_spec: str) -> dict:
    """{"gradients": per-block gradient norm over epochs, reference vs baseline} and, when the reference
    re-initialized, {"reinit_gradients": the post / pre ratios per block and seed}."""
    blocks = block_order(model_spec, grad_blocks(histories))
    out = {"gradients": plot_gradient_flow(histories, dataset, reference, baseline, blocks)}
    ratios = reinit_ratios(histories[histories["dataset"] == dataset], reference)
    if len(ratios):
        out["reinit_gradients"] = plot_reinit_ratios(ratios, dataset, reference, blocks)
    return out
