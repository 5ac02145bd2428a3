"""Figures drawn from plain values (the report and the notebooks draw them from MLflow histories)."""
from rifle.evidence import figures


def test_training_figure_marks_the_reinit_between_its_epochs():
    history = [{"epoch": e, "val_acc": 0.5 + 0.1 * e, "lr_head": 0.01 / (e + 1), "head_reinit": int(e == 1)}
               for e in range(4)]
    fig = figures.plot_training(history, "run")
    ax, lr_ax = fig.axes
    acc, *dashed = ax.get_lines()
    assert list(acc.get_xdata()) == [0, 1, 2, 3] and list(acc.get_ydata()) == [r["val_acc"] for r in history]
    assert [list(line.get_xdata()) for line in dashed] == [[1.5, 1.5]]  # after epoch 1's evaluation
    assert list(lr_ax.get_lines()[0].get_ydata()) == [r["lr_head"] for r in history]
    assert ax.get_ylabel() == "val accuracy" and ax.get_title() == "run"
    no_val = [{k: v for k, v in r.items() if k != "val_acc"} | {"train_acc": 0.4} for r in history]
    assert figures.plot_training(no_val).axes[0].get_ylabel() == "train accuracy"  # --val_fraction 0


def test_the_logged_block_order_needs_no_network(monkeypatch):
    """Runs that logged their block order (tag block_order) are ordered by it; only older runs build the model."""
    import pandas as pd
    import pytest

    from rifle import models

    def built(*args, **kwargs):
        pytest.fail("the network was built")
    monkeypatch.setattr(models, "build_backbone", built)
    logged = ["conv1", "layer1", "layer2"]
    assert figures.block_order("timm:resnet50", {"layer2", "conv1", "extra.10", "extra.2"}, logged) == [
        "conv1", "layer2", "extra.2", "extra.10"]  # what the order lacks: natural order, last
    runs = pd.DataFrame({"block_order": [None, logged]})
    assert figures.logged_order(runs) == logged and figures.logged_order(runs.iloc[:1]) is None
    assert figures.logged_order(pd.DataFrame({"seed": [0]})) is None  # a frame built by hand
