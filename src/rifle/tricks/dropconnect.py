"""DropConnect on the classifier head.

Wan, Zeiler, Zhang, LeCun, Fergus. "Regularization of Neural Networks using DropConnect." ICML 2013.

As in the paper, each weight (and bias) of the fully-connected head is kept with probability 1 - p
(p = `dropconnect_p`, the paper uses 0.5) during training, r = (M * W) v + m * b, and the mask is drawn anew for
every example (the paper stresses that one mask per mini-batch does not regularize enough). Nothing is rescaled in
training, as in the paper.
Deviation, stated: at evaluation we use the expected weights, (1 - p) W and (1 - p) b (the paper's "mean
inference"), not the paper's inference that samples from a moment-matched Gaussian per unit and averages: for a
linear head followed by softmax, the mean is exact for the logits and deterministic. The head stays an `nn.Linear`
(a subclass holding the same parameters), so RIFLE's in-place re-initialization, the optimizer's head group and the
state-dict keys are unchanged.
Memory: one mask of batch x classes x features per step (52 MB for CUB on a ResNet-50, batch 32).
Not to be confused with timm's `drop_connect`/`drop_path`: per-sample dropping of residual paths, a different method
(see `stochastic_depth`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .dropout import Dropout


def dropconnect_mask(shape, p: float, device=None, dtype=torch.float32,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Bernoulli mask: 1 (keep) with probability 1 - p, 0 (drop) with probability p."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"DropConnect probability must be in [0, 1), got {p}")
    return (torch.rand(shape, generator=generator, device=device) >= p).to(dtype)


def dropconnect_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       weight_mask: torch.Tensor, bias_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example masked linear map: out[n] = (M[n] * W) x[n] + m[n] * b.

    x: (N, in); weight: (out, in); weight_mask: (N, out, in); bias_mask: (N, out).
    """
    out = torch.bmm(weight_mask * weight, x.unsqueeze(2)).squeeze(2)
    if bias is not None:
        out = out + bias_mask * bias
    return out


class DropConnectLinear(nn.Linear):
    """nn.Linear with DropConnect in training and the expected weights at evaluation."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, p: float = 0.5,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.p = p
        self.dropped: torch.Tensor | float = 0.0
        self.seen = 0

    @classmethod
    def from_linear(cls, linear: nn.Linear, p: float) -> "DropConnectLinear":
        """Wrap the same Parameter objects (no copy, no new random init)."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, p=p, device="meta")
        new.weight = linear.weight
        new.bias = linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            keep = 1.0 - self.p
            return F.linear(x, self.weight * keep, None if self.bias is None else self.bias * keep)
        flat = x.reshape(-1, self.in_features)
        params = [self.weight] if self.bias is None else [self.weight, self.bias]
        masks = [dropconnect_mask((len(flat), *t.shape), self.p, device=x.device, dtype=self.weight.dtype)
                 for t in params]  # weight mask, then bias mask
        self.dropped = self.dropped + sum((m == 0).sum() for m in masks)
        self.seen += sum(m.numel() for m in masks)
        return dropconnect_linear(flat, self.weight, self.bias, *masks).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", p={self.p}"


class DropConnect(Dropout):
    metrics = ("dropconnect/drop_rate",)

    @classmethod
    def from_config(cls, cfg):
        return cls(p=cfg.tricks.dropconnect_p)

    def prepare_model(self, model: nn.Module) -> None:
        if not isinstance(model.head, nn.Linear):
            raise TypeError(f"dropconnect needs an nn.Linear head, got {type(model.head).__name__}")
        model.head = self.module = DropConnectLinear.from_linear(model.head, self.p)
