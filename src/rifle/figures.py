"""Gradient-flow figures from training histories (the long form of `report.fetch_histories`: run_id, dataset,
method, seed, key, step, value). The paper's claim is about gradients: a fresh head "brings meaningful updates
to deep CNN layers". These show, per backbone block, how large the gradient reaching it is over training
(RIFLE vs plain) and what each re-initialization does to it (post / pre window ratio, per seed).

matplotlib's object API only (no pyplot state); nothing here imports pandas itself.
"""
from __future__ import annotations

import math

import numpy as np

GRAD = "grad_norm/"
PRE, POST = "grad_norm_pre_reinit/", "grad_norm_post_reinit/"


def _figure(width: float, height: float):
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), layout="constrained")


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
    reinit = h[(h["method"] == reference) & (h["key"] == "head_reinit") & (h["value"] > 0)]
    reinits = sorted(set(int(s) for s in reinit["step"]))
    for ax, block in zip(axes, blocks):
        series = h[h["key"] == GRAD + block]
        for m in (baseline, reference):
            g = series[series["method"] == m].groupby("step")["value"]
            if not len(g):
                continue
            mean, std = g.mean(), g.std(ddof=1).fillna(0)
            ax.plot(mean.index, mean.values, color=colors[m], label=f"{m} (n={g.size().max()})")
            ax.fill_between(mean.index, mean - std, mean + std, color=colors[m], alpha=0.15, linewidth=0)
        for i, e in enumerate(reinits):  # a re-init follows epoch e's evaluation
            ax.axvline(e + 0.5, color="tab:red", linestyle="--", linewidth=1, alpha=0.7,
                       label="head re-initialized" if i == 0 else None)
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
