"""DisturbLabel: label noise as a regularizer in the loss layer.

Xie, Wang, Wang, Tian. "DisturbLabel: Regularizing CNN on the Loss Layer." CVPR 2016.

As in the paper: at every iteration each training label is, with probability alpha = `disturb_alpha` (the paper's
10% is the default), replaced by a label drawn uniformly from all C classes, the true one included, so a fraction
alpha (C-1)/C of labels change (logged as `disturb_label/flip_rate`). Only the training loss sees the disturbed
labels (accuracy and evaluation use the true ones). The noise comes from each process's seeded global generator.
"""
from __future__ import annotations

import torch

from .base import Trick


def disturb_labels(labels: torch.Tensor, num_classes: int, alpha: float,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Each label replaced with probability alpha by a uniform draw over all `num_classes` classes."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    device = generator.device if generator is not None else labels.device
    replace = torch.rand(labels.shape, generator=generator, device=device) < alpha
    drawn = torch.randint(num_classes, labels.shape, generator=generator, device=device)
    return torch.where(replace, drawn, labels.to(device)).to(labels.device)


class DisturbLabel(Trick):
    metrics = ("disturb_label/flip_rate",)

    @classmethod
    def from_config(cls, cfg):
        return cls(alpha=cfg.tricks.disturb_alpha)

    def __init__(self, alpha: float):
        self.alpha = alpha

    def on_fit_start(self, ctx):
        self.model, self.num_classes = ctx.model, ctx.num_classes

    def before_loss(self, logits, labels):
        if not self.model.training:
            return labels
        disturbed = disturb_labels(labels, self.num_classes, self.alpha)
        self.meter.add("disturb_label/flip_rate", (disturbed != labels).sum(), labels.numel())
        return disturbed
