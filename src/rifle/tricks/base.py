"""The hook interface every trick implements (any subset; the defaults do nothing)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ._common import EpochMeter


@dataclass
class FitContext:
    """What a trick may use once the model, optimizer and data are prepared."""
    model: nn.Module              # the unwrapped Classifier (backbone, pre_head, head)
    optimizer: torch.optim.Optimizer
    accelerator: Any              # accelerate.Accelerator
    cfg: Any                      # rifle.config.Config
    num_classes: int
    steps_per_epoch: int          # optimizer steps per epoch
    pretrained: dict[str, torch.Tensor]   # backbone parameters at the start of fine-tuning (CPU)
    build_source_model: Callable[[], nn.Module]  # a fresh frozen pretrained backbone, on demand
    train_loader: Any
    data_fingerprint: str = ""    # rifle.data.fingerprint of the loaded splits; "": unknown (nothing is cached)


class Trick:
    """Base with no-op hooks. Order of calls in the trainer:

    prepare_model(model)                 before the optimizer exists: module surgery only
    on_fit_start(ctx)                    after accelerate.prepare
    on_epoch_start(epoch)
    lr(lrs, progress) -> lrs             before every optimizer step; progress = epoch + fraction done
    before_loss(logits, labels) -> labels
    penalty(model, images) -> tensor     added to the loss (None: nothing)
    after_step()
    on_epoch_end(epoch, metrics)         after validation and best-checkpoint selection; may add metrics
    state_dict() / load_state_dict(d)    JSON-able state for resuming
    artifacts() -> {name: text}          files logged with the run (main process), at the end of fit

    Per-epoch metrics: name them in `metrics`, feed `self.meter` during the epoch; the default hooks keep
    `ctx`, reset the meter at the epoch start and add its averages (over all processes) at the epoch end,
    so an override calls super() to keep that.
    """
    name = "trick"
    metrics: tuple[str, ...] = ()

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.ctx: FitContext | None = None
        self.meter = EpochMeter(self.metrics)

    def prepare_model(self, model: nn.Module) -> None:
        pass

    def on_fit_start(self, ctx: FitContext) -> None:
        self.ctx = ctx

    def on_epoch_start(self, epoch: int) -> None:
        self.meter.reset()

    def lr(self, lrs: dict[str, float], progress: float) -> dict[str, float]:
        return lrs

    def before_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return labels

    def penalty(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor | None:
        return None

    def after_step(self) -> None:
        pass

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        metrics.update(self.meter.pop(self.ctx.accelerator if self.ctx is not None else None))

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def artifacts(self) -> dict[str, str]:
        return {}
