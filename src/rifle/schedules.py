"""Learning-rate and re-initialization schedules as pure functions of the epoch.

Epochs are 0-based, as in the official RIFLE code (lixingjian/RIFLE, train.py).
"""
from __future__ import annotations

import math


def cosine_lr(epoch: float, total_epochs: int, base_lr: float) -> float:
    """Official per-epoch cosine: 0.5 * lr * (1 + cos(pi * epoch / E)), epoch in [0, E)."""
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * epoch / total_epochs))


def rifle_period(epochs: int, reinit_times: int) -> int:
    """Length in epochs of one of the K+1 equal periods (epochs already truncated to a multiple)."""
    return epochs // (reinit_times + 1)


def rifle_reinit_epochs(epochs: int, reinit_times: int) -> list[int]:
    """Epochs after whose validation pass the head is re-initialized.

    Official rule: after epoch e if (e + 1) % period == 0. The official code also resets after the very
    last epoch, which has no effect on training; we skip it so exactly K re-inits happen.
    """
    period = rifle_period(epochs, reinit_times)
    return [e for e in range(epochs - 1) if (e + 1) % period == 0]


def rifle_cyclic_head_lr(epoch: float, epochs: int, reinit_times: int, base_lr: float) -> float:
    """Official `fc_lr_util=cyclic`: the head's cosine restarts at every period."""
    period = rifle_period(epochs, reinit_times)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * (epoch % period) / period))
