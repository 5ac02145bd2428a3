"""Learning-rate and re-initialization schedules as pure functions of the epoch.

Epochs are 0-based, as in the official RIFLE code (lixingjian/RIFLE, train.py).
"""
from __future__ import annotations

import math
from collections.abc import Iterable


def cosine_lr(epoch: float, total_epochs: int, base_lr: float) -> float:
    """Official per-epoch cosine: 0.5 * lr * (1 + cos(pi * epoch / E)), epoch in [0, E)."""
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * epoch / total_epochs))


def rifle_periods(reinit_times: int) -> int:
    """K re-initializations split a run into K+1 equal periods (RIFLE, and head_lr_restart, its control)."""
    return reinit_times + 1


def truncated_epochs(epochs: int, reinit_times: int) -> int:
    """The epochs a periodic method trains when `epochs` are asked: the largest multiple of K+1 not above them, as
    the official code truncates the run to whole periods (0 when epochs < K+1: no period fits)."""
    periods = rifle_periods(reinit_times)
    return periods * (epochs // periods)


def rifle_period(epochs: int, reinit_times: int) -> int:
    """Length in epochs of one of the K+1 equal periods of a run of `epochs` (the same before and after the
    truncation)."""
    return epochs // rifle_periods(reinit_times)


def period_steps(steps_per_epoch: int, epochs: int, reinit_times: int) -> int:
    """Optimizer steps in one period: what sets how long the backbone trains with each fresh head."""
    return steps_per_epoch * rifle_period(epochs, reinit_times)


def rifle_reinit_epochs(epochs: int, reinit_times: int) -> list[int]:
    """Epochs after whose validation pass the head is re-initialized, in the run truncated to whole periods.

    Official rule: after epoch e if (e + 1) % period == 0. The official code also resets after the very
    last epoch, which has no effect on training; we skip it so exactly K re-inits happen.
    """
    trained, period = truncated_epochs(epochs, reinit_times), rifle_period(epochs, reinit_times)
    if period < 1:
        raise ValueError(f"{rifle_periods(reinit_times)} periods need at least as many epochs, got {epochs}")
    return [e for e in range(trained - 1) if (e + 1) % period == 0]


def period_boundaries(epochs: int, reinit_times: int) -> list[int]:
    """The epochs after which RIFLE with (epochs, reinit_times) re-initializes, whatever the method trained: the K
    boundaries of the K+1 periods of the run truncated to a multiple of K+1, as RIFLE truncates it (none when
    epochs < K+1). RIFLE's own `rifle_reinit_epochs`; the gradient probe measures every method there, so plain's
    post / pre ratio at RIFLE's boundary exists."""
    return rifle_reinit_epochs(epochs, reinit_times) if truncated_epochs(epochs, reinit_times) else []


def shared_epochs(epochs: int, reinit_times: Iterable[int]) -> int:
    """The fewest epochs, at least `epochs`, that every K+1 of `reinit_times` divides (a multiple of their lcm):
    a budget that periodic methods with different K all train whole, so a paired plan can share it."""
    step = math.lcm(*(rifle_periods(k) for k in reinit_times))  # lcm() of nothing is 1
    return step * -(-epochs // step)


def rifle_cyclic_head_lr(epoch: float, epochs: int, reinit_times: int, base_lr: float) -> float:
    """Official `fc_lr_util=cyclic`: the head's cosine restarts at every period."""
    period = rifle_period(epochs, reinit_times)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * (epoch % period) / period))


def triangular_lr(iteration: float, base_lr: float, max_lr: float, step_size: float) -> float:
    """Smith's triangular policy (Smith 2017, Sec. 3.1) at `iteration` (any unit, the same as `step_size`):
    cycle = floor(1 + it / (2 step)), x = |it / step - 2 cycle + 1|, lr = base + (max - base) max(0, 1 - x)."""
    if step_size <= 0:
        raise ValueError(f"step_size must be > 0, got {step_size}")
    cycle = math.floor(1 + iteration / (2 * step_size))
    x = abs(iteration / step_size - 2 * cycle + 1)
    return base_lr + (max_lr - base_lr) * max(0.0, 1.0 - x)


def clr_cycles(epochs: int, step_epochs: float) -> int:
    """Whole triangular cycles fitted to a budget: max(1, round(epochs / (2 step_epochs))), the count whose
    half-cycle is nearest the asked `step_epochs` (Python's round: a tie goes to the even count)."""
    return max(1, round(epochs / (2 * step_epochs)))


def fitted_triangular_lr(iteration: int, total: int, cycles: int, base_lr: float, max_lr: float) -> float:
    """The triangular policy over iterations 0..total-1 with `cycles` whole cycles of half-cycle
    (total - 1) / (2 cycles): iteration 0 and the last iteration total-1 are exactly `base_lr`, the `cycles`
    peaks (at odd multiples of the half-cycle) `max_lr`; between them Smith's linear ramps (`triangular_lr`).

    Smith 2017 (Sec. 3.3) advises stopping training at the end of a cycle, where the learning rate is at its
    minimum; a fixed half-cycle would end a budget wherever it falls (30 epochs of 2-epoch half-cycles end
    mid-ramp, near the peak). Computed as `iteration * 2 cycles / (total - 1)` half-cycles done, exact at both
    ends (a correctly rounded quotient of integers), so the last step lands on the base, not an ulp above.
    """
    if total < 1 or cycles < 1:
        raise ValueError(f"need total >= 1 iterations and cycles >= 1, got total={total}, cycles={cycles}")
    if total == 1:  # a single step: start and end at once
        return base_lr
    w = 1.0 - abs((iteration * 2 * cycles / (total - 1)) % 2.0 - 1.0)  # 0 at a minimum, 1 at a peak
    return (1.0 - w) * base_lr + w * max_lr  # exact at w = 0 and w = 1
