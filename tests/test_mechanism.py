"""The gradient ratio at the period boundaries, per method, from a synthetic history frame."""
import pandas as pd
import pytest

from rifle.evidence import figures
from rifle.evidence.mechanism import boundary_ratios, gradient_ratio_table

BLOCKS = ["conv_stem", "blocks.2", "blocks.10"]


def history(rows):
    return pd.DataFrame(rows, columns=["run_id", "dataset", "method", "seed", "key", "step", "value"])


def run_rows(run_id, method, seed, ratios, dataset="digits", pre=2.0):
    """pre/post windows of each boundary epoch e (pre logged at e, post at e + 1) with post = ratio * pre, per
    block; plus the per-epoch keys a real history also holds."""
    rows = [(run_id, dataset, method, seed, "val_acc", e, 0.5) for e in range(6)]
    for epoch, by_block in ratios.items():
        for block, ratio in by_block.items():
            rows.append((run_id, dataset, method, seed, f"grad_norm_pre_reinit/{block}", epoch, pre))
            rows.append((run_id, dataset, method, seed, f"grad_norm_post_reinit/{block}", epoch + 1, ratio * pre))
            rows.append((run_id, dataset, method, seed, f"grad_norm/{block}", epoch, 9.0))
    return rows


def test_gradient_ratio_table_per_method_boundary_and_block():
    def at(r):  # block i: ratio r (i + 1)
        return {b: r * (i + 1) for i, b in enumerate(BLOCKS)}

    rows = (run_rows("r0", "rifle", 0, {1: at(3.0), 3: at(5.0)}) + run_rows("r1", "rifle", 1, {1: at(1.0), 3: at(3.0)})
            + run_rows("p0", "plain", 0, {1: at(1.0), 3: at(1.0)}) + run_rows("p1", "plain", 1, {1: at(0.5)})
            + run_rows("h0", "head_lr_restart", 0, {1: at(2.0)}) + run_rows("o0", "rifle", 0, {1: at(7.0)}, "other"))
    h = history(rows)
    h = h[~((h["run_id"] == "p1") & (h["key"] == "grad_norm_post_reinit/blocks.2"))]  # a window the run lacks
    table = gradient_ratio_table(h, BLOCKS)
    assert list(table.columns) == ["dataset", "method", "epoch", "block", "ratio_mean", "n"]
    digits = table[table["dataset"] == "digits"]
    assert list(dict.fromkeys(digits["method"])) == ["plain", "rifle", "head_lr_restart"]  # label order
    assert list(digits[(digits["method"] == "rifle") & (digits["epoch"] == 1)]["block"]) == BLOCKS  # input side first
    cell = digits.set_index(["method", "epoch", "block"])[["ratio_mean", "n"]]
    assert cell.loc[("rifle", 1, "conv_stem")].tolist() == [pytest.approx(2.0), 2]  # mean of 3 and 1 over seeds
    assert cell.loc[("rifle", 3, "blocks.10")].tolist() == [pytest.approx(12.0), 2]  # (15 + 9) / 2
    assert cell.loc[("plain", 1, "blocks.10")].tolist() == [pytest.approx(2.25), 2]  # (3 + 1.5) / 2
    assert cell.loc[("plain", 1, "blocks.2")].tolist() == [pytest.approx(2.0), 1]  # seed 1 has no post window
    assert cell.loc[("plain", 3, "conv_stem")].tolist() == [pytest.approx(1.0), 1]
    assert cell.loc[("head_lr_restart", 1, "conv_stem")].tolist() == [pytest.approx(2.0), 1]
    assert table[table["dataset"] == "other"]["ratio_mean"].tolist() == pytest.approx([7.0, 14.0, 21.0])
    assert len(table) == 3 * (2 + 2 + 1) + 3 and gradient_ratio_table(h[h["method"] == "x"]).empty
    # without a block order: natural order (blocks.2 before blocks.10)
    assert list(gradient_ratio_table(h)["block"][:3]) == ["blocks.2", "blocks.10", "conv_stem"]


def test_boundary_ratios_number_each_runs_boundaries_and_rifles_figure_reads_them():
    h = history(run_rows("r0", "rifle", 0, {1: {"conv_stem": 3.0}, 3: {"conv_stem": 4.0}})
                + run_rows("p0", "plain", 0, {1: {"conv_stem": 0.5}}))
    ratios = boundary_ratios(h)
    assert ratios[["run_id", "method", "boundary", "epoch", "ratio"]].values.tolist() == [
        ["p0", "plain", 1, 1, 0.5], ["r0", "rifle", 1, 1, 3.0], ["r0", "rifle", 2, 3, 4.0]]
    assert figures.reinit_ratios(h, "rifle").to_dict("list") == {
        "run_id": ["r0", "r0"], "seed": [0, 0], "reinit": [1, 2], "epoch": [1, 3], "block": ["conv_stem"] * 2,
        "ratio": [3.0, 4.0]}
