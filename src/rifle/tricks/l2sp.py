"""L2-SP: L2 penalty towards the pretrained starting point.

Li, Grandvalet, Davoine. "Explicit Inductive Bias for Transfer Learning with Convolutional Networks." ICML 2018.

As in the paper (Eq. 3): Omega(w) = alpha/2 ||w_S - w0_S||^2 + beta/2 ||w_new||^2, where w_S are the backbone
parameters shared with the source network, w0_S their pretrained values, and w_new the new classifier head; weight
decay is switched off in every optimizer group (the penalty replaces it). As in the official RIFLE code's
`reg_type=l2_sp` (lixingjian/RIFLE, train.py): every backbone parameter (BatchNorm affine parameters included) is
pulled to its pretrained value (the trainer's snapshot), with alpha = `l2sp_alpha` = 0.01, beta = `l2sp_beta` = 1e-4
(the L2-SP paper tunes both per task). Logged per epoch: `penalty/l2sp` (the total, mean over steps) and its parts
`penalty/l2sp_backbone`, `penalty/l2sp_head`.
"""
from __future__ import annotations

from typing import Iterable

import torch

from ._common import disable_weight_decay, squared_norm
from .base import FitContext, Trick


def l2sp_penalty(params: Iterable[torch.Tensor], ref: Iterable[torch.Tensor], alpha: float) -> torch.Tensor:
    """alpha/2 * sum ||w - w0||^2 over matching (parameter, reference) pairs."""
    return 0.5 * alpha * squared_norm(p - r for p, r in zip(params, ref, strict=True))


def matched_reference(backbone: torch.nn.Module, pretrained: dict[str, torch.Tensor], device
                      ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(trainable backbone parameters, their pretrained values on `device`), in the same order."""
    params, refs = [], []
    for name, p in backbone.named_parameters():
        if not p.requires_grad:
            continue
        ref = pretrained.get(name, pretrained.get(f"backbone.{name}"))
        if ref is None or ref.shape != p.shape:
            raise KeyError(f"no pretrained value of shape {tuple(p.shape)} for backbone parameter {name!r}")
        params.append(p)
        refs.append(ref.detach().to(device=device, dtype=p.dtype, copy=True))
    return params, refs


class L2SP(Trick):
    metrics = ("penalty/l2sp", "penalty/l2sp_backbone", "penalty/l2sp_head")

    @classmethod
    def from_config(cls, cfg):
        return cls(alpha=cfg.tricks.l2sp_alpha, beta=cfg.tricks.l2sp_beta)

    def __init__(self, alpha: float, beta: float):
        self.alpha, self.beta = alpha, beta

    def on_fit_start(self, ctx: FitContext) -> None:
        device = next(ctx.model.parameters()).device
        self.params, self.refs = matched_reference(ctx.model.backbone, ctx.pretrained, device)
        self.head_params = list(ctx.model.head.parameters())
        disable_weight_decay(ctx.optimizer)

    def penalty(self, model, images):
        backbone = l2sp_penalty(self.params, self.refs, self.alpha)
        head = 0.5 * self.beta * squared_norm(self.head_params)
        total = backbone + head
        for name, v in zip(self.metrics, (total, backbone, head)):
            self.meter.add(name, v)
        return total
