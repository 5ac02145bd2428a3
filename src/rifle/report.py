"""Figures and tables from training histories and MLflow runs."""
from __future__ import annotations


def plot_training(history: list[dict], title: str = ""):
    """Validation accuracy and head learning rate over epochs; dashed lines mark head re-inits."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(epochs, [row["val_acc"] for row in history], marker="o", color="tab:blue", label="val_acc")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy", color="tab:blue")
    lr_ax = ax.twinx()
    lr_ax.plot(epochs, [row["lr_head"] for row in history], color="tab:orange", label="lr_head")
    lr_ax.set_ylabel("head learning rate", color="tab:orange")
    for row in history:
        if row.get("head_reinit"):
            ax.axvline(row["epoch"] + 0.5, color="tab:red", linestyle="--", linewidth=1)
    ax.set_title(title or "validation accuracy and head LR (dashed: head re-initialized)")
    fig.tight_layout()
    return fig
