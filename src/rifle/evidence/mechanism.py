"""What a period boundary does to the gradient reaching each backbone block, for every method.

The block probe (rifle.probes.BlockProbe) measures every run at the boundaries of the K+1 periods of (epochs,
reinit_times): the mean gradient norm over the last steps before the boundary (`grad_norm_pre_reinit/<block>`,
logged at the epoch that ends there) and over the first steps after it (`grad_norm_post_reinit/<block>`, logged an
epoch later). RIFLE re-initializes its head there; plain fine-tuning and head_lr_restart do not, so their post / pre
ratio at the same boundary is what the schedule alone does, and RIFLE's ratio beside it is the fresh head's effect.
Pure functions of a history frame (rifle.track.reads.fetch_histories: run_id, dataset, method, seed, key, step,
value); no pandas import until called.
"""
from __future__ import annotations

import re

from ..keys import POST, PRE
from ..methods import method_sort_key


def natural_key(name: str) -> list:
    """Sort key of a block name with its numbers as numbers (blocks.2 before blocks.10)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def boundary_ratios(histories):
    """Per run, boundary and block: post / pre gradient norm. Columns: run_id, dataset, method, seed, boundary
    (1-based, per run), epoch (that ended at the boundary), block, ratio. A boundary without both windows (the
    run stopped after it) is left out."""
    h = histories
    pre = h[h["key"].str.startswith(PRE)].assign(block=lambda d: d["key"].str.slice(len(PRE)))
    post = h[h["key"].str.startswith(POST)].assign(  # logged an epoch later
        block=lambda d: d["key"].str.slice(len(POST)), step=lambda d: d["step"] - 1)
    both = pre.merge(post[["run_id", "block", "step", "value"]], on=["run_id", "block", "step"],
                     suffixes=("_pre", "_post")).sort_values(["seed", "run_id"], kind="stable")  # sums in seed order
    both["boundary"] = both.groupby("run_id")["step"].rank(method="dense").astype(int)
    both["epoch"] = both["step"].astype(int)
    both["ratio"] = both["value_post"] / both["value_pre"]
    return both[["run_id", "dataset", "method", "seed", "boundary", "epoch", "block", "ratio"]].reset_index(drop=True)


def gradient_ratio_table(histories, blocks: list[str] | None = None):
    """Per dataset, method, boundary epoch and block: the post / pre gradient-norm ratio, mean over seeds (each
    run's ratio first, then their mean), with `n` the seeds averaged. Rows: datasets, methods in label order
    (rifle.methods), epochs, then blocks in `blocks`' order (input side first: figures.block_order), else
    natural order. Columns: dataset, method, epoch, block, ratio_mean, n."""
    import pandas as pd

    ratios = boundary_ratios(histories)
    table = (ratios.groupby(["dataset", "method", "epoch", "block"], sort=False)["ratio"]
             .agg(ratio_mean="mean", n="count").reset_index())
    if table.empty:
        return table
    order = blocks or sorted(table["block"].unique(), key=natural_key)
    rank = {b: i for i, b in enumerate(order)}
    table["_block"] = table["block"].map(lambda b: rank.get(b, len(rank)))
    table["_method"] = table["method"].map(method_sort_key)
    table = table.sort_values(["dataset", "_method", "epoch", "_block", "block"], kind="stable")
    return pd.DataFrame(table.drop(columns=["_block", "_method"])).reset_index(drop=True)


def ratio_markdown(table) -> str:
    """`gradient_ratio_table` as Markdown: per dataset and boundary epoch, a row per method, a column per block."""
    lines = []
    for (dataset, epoch), g in table.groupby(["dataset", "epoch"], sort=False):
        blocks = list(dict.fromkeys(g["block"]))
        cells = g.pivot_table(index="method", columns="block", values="ratio_mean", sort=False)
        n = g.groupby("method", sort=False)["n"].max()
        lines += [f"### {dataset or 'runs'}: gradient norm after / before the period boundary after epoch {epoch}", "",
                  "| method | n | " + " | ".join(blocks) + " |", "|---" * (len(blocks) + 2) + "|",
                  *(f"| {m} | {n[m]} | " + " | ".join(f"{cells.loc[m, b]:.2f}" for b in blocks) + " |"
                    for m in cells.index), ""]
    return "\n".join(lines + ["Mean over seeds of each run's post / pre ratio of the block's gradient norm (the first "
                              "steps after the boundary over the last steps before it; > 1: larger gradients after). "
                              "RIFLE re-initializes its head there; plain fine-tuning and head_lr_restart do not, so "
                              "their ratio is what the schedule alone does."]) + "\n"
