"""The hooks a trick may implement (any subset; the defaults do nothing)."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable

import torch
from torch import nn

from ._common import EpochMeter


@dataclass
class FitContext:
    """What a trick may use once the model, optimizer and data are prepared."""
    model: nn.Module              # the unwrapped Classifier (backbone, pre_head, head)
    optimizer: torch.optim.Optimizer
    accelerator: Any              # accelerate.Accelerator (None outside the trainer)
    num_classes: int
    pretrained: dict[str, torch.Tensor]   # backbone parameters at the start of fine-tuning (CPU)
    build_source_model: Callable[[], nn.Module]  # a fresh frozen pretrained backbone, on demand
    train_loader: Any
    data_fingerprint: str = ""    # rifle.data.fingerprint of the loaded splits; "": unknown (nothing is cached)


class Trick:
    """Hooks, in the order the trainer calls them:

    prepare_model(model)                 before the optimizer exists: module surgery only
    on_fit_start(ctx)                    after accelerate.prepare (and before load_state_dict on resume)
    on_epoch_start(epoch)
    stand_in(model, images)              rifle.preflight only, instead of the first epoch's measurements
    lr(lrs, progress) -> lrs             before every optimizer step; progress = epoch + fraction done
    before_loss(logits, labels) -> labels
    penalty(model, images) -> tensor     added to the loss (None: nothing)
    on_epoch_end(epoch, metrics)         after validation and best-checkpoint selection; may add metrics
    state_dict() / load_state_dict(d)    JSON-able state for resuming
    artifacts() -> {name: text}          files logged with the run (main process), at the end of fit

    Per-epoch averages: name them in `metrics` and feed `self.meter`; the trainer resets it at each epoch
    start and adds its averages over all processes to the epoch's metrics after `on_epoch_end`.
    """
    metrics: tuple[str, ...] = ()
    name: str = ""  # its key in rifle.tricks.TRICKS (set when the table loads the class)

    @classmethod
    def from_config(cls, cfg) -> "Trick":
        """The trick as a resolved Config asks for it (a trick without options: no arguments)."""
        return cls()

    @cached_property
    def meter(self) -> EpochMeter:
        return EpochMeter(self.metrics)

    def prepare_model(self, model: nn.Module) -> None:
        pass

    def on_fit_start(self, ctx: FitContext) -> None:
        pass

    def on_epoch_start(self, epoch: int) -> None:
        pass

    def stand_in(self, model: nn.Module, images: torch.Tensor) -> None:
        """Before a step is timed without an epoch (rifle.preflight): set up what `on_epoch_start` would measure
        first (DELTA's channel attention) with placeholders of the right shapes. Nothing by default."""

    def lr(self, lrs: dict[str, float], progress: float) -> dict[str, float]:
        return lrs

    def before_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return labels

    def penalty(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor | None:
        return None

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def artifacts(self) -> dict[str, str]:
        return {}
