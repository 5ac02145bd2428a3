"""Cyclical learning rate, triangular policy, for the whole network.

Smith. "Cyclical Learning Rates for Training Neural Networks." WACV 2017.

As in the paper (Section 3.1): the learning rate rises linearly from `clr_base_lr` to `clr_max_lr` over `stepsize`
iterations and falls back over the next `stepsize`, cycle after cycle:
    cycle = floor(1 + it / (2 stepsize)),  x = |it / stepsize - 2 cycle + 1|,
    lr = base_lr + (max_lr - base_lr) max(0, 1 - x).
The stepsize is in epochs (`clr_step_epochs`, default 2; the paper advises 2-10 epochs' iterations), evaluated at
every optimizer step (at the fractional epoch); it replaces the trainer's cosine for backbone and head. Defaults,
stated: max_lr = `lr` and base_lr = max_lr / 4 (the paper suggests 1/3-1/4 of max_lr); the paper's LR range test is
not run. The head's policy is scaled by head_lr/lr. Cannot be combined with RIFLE's `head_lr_policy=cyclic`
(rejected by `config.resolve`).
"""
from __future__ import annotations

import math

from ..config import clr_bounds
from .base import Trick


def triangular_lr(iteration: float, base_lr: float, max_lr: float, step_size: float) -> float:
    """Smith's triangular policy at `iteration` (any unit, the same as `step_size`; fractions allowed)."""
    if step_size <= 0:
        raise ValueError(f"step_size must be > 0, got {step_size}")
    cycle = math.floor(1 + iteration / (2 * step_size))
    x = abs(iteration / step_size - 2 * cycle + 1)
    return base_lr + (max_lr - base_lr) * max(0.0, 1.0 - x)


class CyclicLR(Trick):
    @classmethod
    def from_config(cls, cfg):
        o = cfg.optim
        return cls(clr_bounds(cfg), cfg.tricks.clr_step_epochs, head_ratio=(o.head_lr or o.lr) / o.lr)

    def __init__(self, bounds: tuple[float, float], step_epochs: float, head_ratio: float = 1.0):
        """`bounds`: (base_lr, max_lr) of the backbone (config.clr_bounds); the head's are `head_ratio` times."""
        (self.base_lr, self.max_lr), self.step_epochs, self.head_ratio = bounds, step_epochs, head_ratio

    def lr(self, lrs, progress):
        value = triangular_lr(progress, self.base_lr, self.max_lr, self.step_epochs)
        return dict(lrs, backbone=value, head=value * self.head_ratio)
