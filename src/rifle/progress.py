"""Progress a person can follow: a tqdm bar on a terminal, otherwise one line per epoch (under `mlflow run`,
in sweeps, in cluster logs, whenever stderr is not a terminal). Main process only; the others stay silent."""
from __future__ import annotations

import os
import time

from tqdm.auto import tqdm

from .track import keys as K


def epoch_line(epoch: int, epochs: int, metrics: dict, seconds: float, left: float) -> str:
    """'epoch 3/20: train_loss 0.512, val_acc 0.870, lr 0.0090/0.0090 (backbone/head), head re-initialized,
    2.1 s/epoch, ~34 s left' (val_acc only with validation, the re-init only when one happened)."""
    parts = [f"{K.TRAIN_LOSS} {metrics[K.TRAIN_LOSS]:.3f}"]
    if K.VAL_ACC in metrics:
        parts.append(f"{K.VAL_ACC} {metrics[K.VAL_ACC]:.3f}")
    parts.append(f"lr {metrics[K.LR_BACKBONE]:.3g}/{metrics[K.LR_HEAD]:.3g} (backbone/head)")
    if metrics.get(K.HEAD_REINIT):
        parts.append("head re-initialized")
    duration = f"{left:.0f} s" if left < 90 else f"{left / 60:.0f} min" if left < 5400 else f"{left / 3600:.1f} h"
    parts.append(f"{seconds:.1f} s/epoch, ~{duration} left")
    return f"epoch {epoch + 1}/{epochs}: " + ", ".join(parts)


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
            self.bar.set_postfix(loss=f"{metrics['train_loss']:.3f}",
                                 val=f"{metrics.get('val_acc', float('nan')):.3f}")
