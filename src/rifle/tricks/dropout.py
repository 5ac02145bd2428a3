"""Dropout on the features entering the classifier head.

Srivastava, Hinton, Krizhevsky, Sutskever, Salakhutdinov. "Dropout: A Simple Way to Prevent Neural Networks from
Overfitting." JMLR 15(56):1929-1958, 2014.

During training each pooled backbone feature (the head's input) is zeroed independently with probability
p = `dropout_p` (default 0.5, the paper's rate for hidden units), a new mask per example and step; evaluation uses
every feature.
Deviation, stated: the paper keeps units unscaled in training and multiplies the outgoing weights by the retention
probability (1 - p) at test time; we use the equivalent "inverted" form (kept features scaled by 1/(1-p) in
training, nothing at evaluation): the evaluated network stays a plain model, so the saved weights load without this
trick and RIFLE's re-init of the head needs no rescaling. Only the head's input is dropped, the usual placement of a
dropout baseline for fine-tuning (the RIFLE paper does not say where its dropout baseline acts); the backbone is
left as pretrained.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import Trick


def dropout_mask(shape, p: float, device=None, dtype=torch.float32, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
    """Inverted-dropout mask: 0 with probability p, else 1/(1-p) (so the mask has mean 1)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    keep = torch.rand(shape, generator=generator, device=device) >= p
    return keep.to(dtype) / (1.0 - p)


class FeatureDropout(nn.Dropout):
    """nn.Dropout drawing its mask with `dropout_mask`, counting what it dropped."""
    dropped: torch.Tensor | float = 0.0
    seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        mask = dropout_mask(x.shape, self.p, device=x.device, dtype=x.dtype)
        self.dropped = self.dropped + (mask == 0).sum()
        self.seen += mask.numel()
        return x * mask


class Dropout(Trick):
    """Feature dropout; DropConnect reuses its drop-rate bookkeeping on `self.module`."""
    metrics = ("dropout/drop_rate",)

    @classmethod
    def from_config(cls, cfg):
        return cls(p=cfg.tricks.dropout_p)

    def __init__(self, p: float):
        self.p = p

    def prepare_model(self, model: nn.Module) -> None:
        self.module = FeatureDropout(self.p)
        # pre_head is the Classifier's slot for this; keep anything another trick put there.
        model.pre_head = self.module if isinstance(model.pre_head, nn.Identity) else nn.Sequential(
            model.pre_head, self.module)

    def on_epoch_start(self, epoch):
        self.module.dropped, self.module.seen = 0.0, 0

    def on_epoch_end(self, epoch, metrics):
        self.meter.add(self.metrics[0], self.module.dropped, self.module.seen)
