"""Progress a person can follow: a tqdm bar on a terminal, otherwise one line per epoch (under `mlflow run`,
in sweeps, in cluster logs, whenever stderr is not a terminal). Main process only; the others stay silent.

Epochs count from 0 here as everywhere (MLflow's steps, checkpoints epoch-NNNN, selected_epoch, reports, error
lines), and the line says so with the range: "epoch 2 of 0..19" is MLflow's step 2 of a 20-epoch run."""
from __future__ import annotations

import os
import time

from tqdm.auto import tqdm

from . import keys as K


def epoch_line(epoch: int, epochs: int, metrics: dict, seconds: float, left: float) -> str:
    """'epoch 2 of 0..19: train_loss 0.512, val_acc 0.870, lr 0.0090/0.0090 (backbone/head), head re-initialized,
    2.1 s/epoch, ~34 s left' (`epoch` 0-based, as MLflow's step; val_acc only with validation, the re-init only
    when one happened)."""
    parts = [f"{K.TRAIN_LOSS} {metrics[K.TRAIN_LOSS]:.3f}"]
    if K.VAL_ACC in metrics:
        parts.append(f"{K.VAL_ACC} {metrics[K.VAL_ACC]:.3f}")
    parts.append(f"lr {metrics[K.LR_BACKBONE]:.3g}/{metrics[K.LR_HEAD]:.3g} (backbone/head)")
    if metrics.get(K.HEAD_REINIT):
        parts.append("head re-initialized")
    duration = f"{left:.0f} s" if left < 90 else f"{left / 60:.0f} min" if left < 5400 else f"{left / 3600:.1f} h"
    parts.append(f"{seconds:.1f} s/epoch, ~{duration} left")
    return f"epoch {epoch} of 0..{epochs - 1}: " + ", ".join(parts)


class Progress:
    """`update(n)` per optimizer step, `epoch_end(epoch, metrics)` per epoch, `close()` at the end."""

    def __init__(self, main: bool, first_epoch: int, epochs: int, steps_per_epoch: int, terminal: bool | None = None):
        terminal = os.isatty(2) if terminal is None else terminal
        self.epochs, self.first = epochs, first_epoch
        self.bar = tqdm(total=(epochs - first_epoch) * steps_per_epoch, desc="train", dynamic_ncols=True,
                        disable=not (main and terminal))
        self.lines = main and not terminal
        self.start = self.last = time.perf_counter()
        self.update, self.close = self.bar.update, self.bar.close  # per optimizer step, at the end

    def epoch_end(self, epoch: int, metrics: dict) -> None:
        if self.lines:
            now = time.perf_counter()
            seconds, self.last = now - self.last, now
            left = (now - self.start) / (epoch + 1 - self.first) * (self.epochs - epoch - 1)
            print(epoch_line(epoch, self.epochs, metrics, seconds, left), flush=True)
        else:
            self.bar.set_postfix(loss=f"{metrics[K.TRAIN_LOSS]:.3f}",
                                 val=f"{metrics.get(K.VAL_ACC, float('nan')):.3f}")
