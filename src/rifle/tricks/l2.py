"""L2 regularization (weight decay) as an explicit, logged penalty.

The "L2" baseline of the RIFLE, L2-SP and DELTA papers: alpha/2 ||w||^2 on every trained parameter, pulling the
weights towards zero (see Li, Grandvalet, Davoine, ICML 2018, for its role in fine-tuning).

Choice, stated: the trainer's SGD `weight_decay` (default 1e-4, the official RIFLE setting) already *is* this
penalty (SGD adds weight_decay * w to the gradient before momentum), so `tricks=l2` does not stack a second decay:
it sets `weight_decay` to 0 in every optimizer group and adds alpha/2 ||w||^2 over exactly the parameters the
optimizer trains, alpha = `l2_alpha` (default 1e-4). With the defaults this is the official L2 baseline, plus a
coefficient the sweeps can tune apart from `weight_decay`, the logged `penalty/l2`, and mutual exclusion with the
other explicit regularizers (`l2sp`, `delta`).
"""
from __future__ import annotations

from typing import Iterable

import torch

from ._common import disable_weight_decay, squared_norm
from .base import FitContext, Trick


def l2_penalty(params: Iterable[torch.Tensor], alpha: float) -> torch.Tensor:
    """alpha/2 * sum ||w||^2."""
    return 0.5 * alpha * squared_norm(params)


class L2(Trick):
    metrics = ("penalty/l2",)

    @classmethod
    def from_config(cls, cfg):
        return cls(alpha=cfg.tricks.l2_alpha)

    def __init__(self, alpha: float):
        self.alpha = alpha

    def on_fit_start(self, ctx: FitContext) -> None:
        # The very set weight decay would act on.
        self.params = [p for g in ctx.optimizer.param_groups for p in g["params"]]
        disable_weight_decay(ctx.optimizer)

    def penalty(self, model, images):
        value = l2_penalty(self.params, self.alpha)
        self.meter.add("penalty/l2", value)
        return value
