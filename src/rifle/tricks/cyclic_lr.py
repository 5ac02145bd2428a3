"""Cyclical learning rate, triangular policy, for the whole network, fitted to the budget.

Smith. "Cyclical Learning Rates for Training Neural Networks." WACV 2017.

As in the paper (Section 3.1): the learning rate rises linearly from `clr_base_lr` to `clr_max_lr` over `stepsize`
iterations and falls back over the next `stepsize`, cycle after cycle (`schedules.triangular_lr`). Section 3.3
advises stopping training at the end of a cycle, when the learning rate is at its minimum, so the cycles are fitted
to the run: c = max(1, round(epochs / (2 clr_step_epochs))) whole cycles (`schedules.clr_cycles`, logged as the
param `clr_cycles`) over the T = epochs x steps-per-epoch optimizer iterations, with half-cycle (T-1) / (2c)
iterations (`schedules.fitted_triangular_lr`): the first and the very last iteration are exactly at clr_base_lr and
the c peaks at clr_max_lr. `clr_step_epochs` (default 2; the paper advises 2-10 epochs' iterations) is therefore the
half-cycle asked for, and the one trained is the nearest that fits a whole number of cycles. The rate is set at
every step (iteration = progress x steps per epoch, with T known from the training loader in `on_fit_start`); it
replaces the trainer's cosine for backbone and head. Defaults, stated: max_lr = `lr` and base_lr = max_lr / 4 (the
paper suggests 1/3-1/4 of max_lr after its LR range test, which is not run). The head's policy is scaled by
head_lr/lr. Cannot be combined with RIFLE's `head_lr_policy=cyclic` nor with `head_lr_restart` (two policies for the
head's rate; refused by `config.resolve`).
Deviation, stated: Smith's stepsize is a fixed number of iterations and a run's length a whole number of cycles
chosen by hand; here the budget is given and the half-cycle is fitted to it.
"""
from __future__ import annotations

from ..config import clr_bounds
from ..schedules import clr_cycles, fitted_triangular_lr
from .base import Trick


class CyclicLR(Trick):
    @classmethod
    def from_config(cls, cfg):
        o = cfg.optim
        return cls(clr_bounds(cfg), clr_cycles(o.epochs, cfg.tricks.clr_step_epochs), o.epochs,
                   head_ratio=(o.head_lr or o.lr) / o.lr)

    def __init__(self, bounds: tuple[float, float], cycles: int, epochs: int, head_ratio: float = 1.0):
        """`bounds`: (base_lr, max_lr) of the backbone (config.clr_bounds); the head's are `head_ratio` times."""
        (self.base_lr, self.max_lr), self.cycles, self.epochs, self.head_ratio = bounds, cycles, epochs, head_ratio
        self.steps_per_epoch: int | None = None

    def on_fit_start(self, ctx):
        self.steps_per_epoch = len(ctx.train_loader)

    def lr(self, lrs, progress):
        if self.steps_per_epoch is None:
            raise RuntimeError("cyclic_lr: on_fit_start must run first (it reads the steps per epoch)")
        # progress = epoch + i / steps: back to the integer iteration (rounding away float noise)
        iteration = round(progress * self.steps_per_epoch)
        value = fitted_triangular_lr(iteration, self.epochs * self.steps_per_epoch, self.cycles, self.base_lr,
                                     self.max_lr)
        return dict(lrs, backbone=value, head=value * self.head_ratio)
