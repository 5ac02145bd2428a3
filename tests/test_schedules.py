import math

import pytest

from rifle import config as C
from rifle.schedules import (
    clr_cycles,
    cosine_lr,
    fitted_triangular_lr,
    period_boundaries,
    period_steps,
    rifle_cyclic_head_lr,
    rifle_period,
    rifle_periods,
    rifle_reinit_epochs,
    shared_epochs,
    triangular_lr,
    truncated_epochs,
)


def test_cosine_matches_official_formula():
    assert cosine_lr(0, 40, 0.01) == pytest.approx(0.01)
    assert cosine_lr(20, 40, 0.01) == pytest.approx(0.005)
    assert cosine_lr(39, 40, 0.01) == pytest.approx(0.5 * 0.01 * (1 + math.cos(math.pi * 39 / 40)))


@pytest.mark.parametrize("epochs,k,expected", [
    (6, 2, [1, 3]),          # the acceptance example: periods of 2 epochs
    (40, 1, [19]),
    (40, 3, [9, 19, 29]),
    (12, 2, [3, 7]),
])
def test_reinit_epochs_are_the_official_ones(epochs, k, expected):
    official = [e for e in range(epochs) if (e + 1) % (epochs // (k + 1)) == 0]
    assert official[-1] == epochs - 1          # the official code also resets after the last epoch...
    assert rifle_reinit_epochs(epochs, k) == official[:-1] == expected  # ...which changes nothing: skipped
    assert len(expected) == k


def test_epochs_truncated_to_a_multiple_of_periods():
    assert C.build({"epochs": 41, "reinit_times": 2}).optim.epochs == 39 == truncated_epochs(41, 2)
    assert C.build({"epochs": 40, "reinit_times": 3}).optim.epochs == 40 == truncated_epochs(40, 3)
    assert C.build({"epochs": 41, "reinit_times": 2, "tricks": ""}).optim.epochs == 41  # plain: untouched
    assert C.build({"epochs": 41, "reinit_times": 2, "tricks": "head_lr_restart"}).optim.epochs == 39  # the control
    assert rifle_period(39, 2) == rifle_period(41, 2) == 13 and rifle_periods(2) == 3
    assert truncated_epochs(2, 2) == 0  # no period fits: config refuses it
    with pytest.raises(C.ConfigError, match="--reinit_times: 2 re-initializations need at least 3 epochs"):
        C.build({"epochs": 2, "reinit_times": 2})


@pytest.mark.parametrize("epochs,k", [(41, 2), (30, 3), (7, 1), (3, 2)])
def test_reinit_epochs_are_those_of_the_truncated_run(epochs, k):
    """Asked 41 epochs with K=2, RIFLE trains 39: its re-inits are those of 39 (an untruncated 41 would put a third
    one after epoch 38)."""
    assert rifle_reinit_epochs(epochs, k) == rifle_reinit_epochs(truncated_epochs(epochs, k), k)
    assert len(rifle_reinit_epochs(epochs, k)) == k
    with pytest.raises(ValueError, match="3 periods need at least as many epochs, got 2"):
        rifle_reinit_epochs(2, 2)


def test_period_steps_and_a_budget_every_k_divides():
    assert period_steps(7, 12, 2) == 28 and period_steps(7, 13, 2) == 28
    assert shared_epochs(20, [1, 2]) == 24 and shared_epochs(24, [1, 2]) == 24  # lcm(2, 3) = 6
    assert shared_epochs(10, [3, 3]) == 12 and shared_epochs(10, []) == 10  # no periodic method: any budget


def test_cyclic_head_lr_restarts_every_period():
    lrs = [rifle_cyclic_head_lr(e, 12, 2, 0.01) for e in range(12)]
    assert lrs[0] == lrs[4] == lrs[8] == pytest.approx(0.01)
    assert lrs[3] == pytest.approx(0.5 * 0.01 * (1 + math.cos(math.pi * 3 / 4)))
    assert lrs[3] < lrs[2] < lrs[1] < lrs[0]


@pytest.mark.parametrize("epochs,steps", [(30, 4), (7, 3), (40, 190), (1, 5), (10, 1)])
def test_fitted_cyclic_lr_starts_and_ends_at_the_base_with_whole_cycles(epochs, steps):
    """Smith 2017, Sec. 3.3: stop at the end of a cycle. With the default half-cycle of 2 epochs, 30 epochs run 8
    whole cycles (not 7.5), and the very last optimizer step is at the base rate exactly."""
    base, top = 0.0025, 0.01
    total, cycles = epochs * steps, clr_cycles(epochs, 2.0)
    lrs = [fitted_triangular_lr(i, total, cycles, base, top) for i in range(total)]
    assert lrs[0] == base and lrs[-1] == base  # exactly, not within an ulp
    assert all(base <= v <= top for v in lrs)
    peaks = [i for i in range(1, total - 1) if lrs[i] > lrs[i - 1] and lrs[i] >= lrs[i + 1]]
    assert len(peaks) == cycles
    half = (total - 1) / (2 * cycles)
    for k in range(cycles):  # each peak, between iterations where it falls between two, is max_lr
        assert fitted_triangular_lr((2 * k + 1) * half, total, cycles, base, top) == pytest.approx(top, abs=1e-15)
    if (total - 1) % (2 * cycles) == 0:  # the peaks fall on iterations: reached exactly, c times
        assert lrs.count(top) == cycles
    else:  # the iteration nearest each peak is within one step's rise of it
        assert all(top - lrs[i] <= (top - base) / half + 1e-15 for i in peaks)
    # between the ends it is Smith's triangular policy with that half-cycle
    assert lrs == pytest.approx([triangular_lr(i, base, top, half) for i in range(total)], abs=1e-15)


def test_fitted_cyclic_lr_edge_cases():
    assert fitted_triangular_lr(0, 1, 1, 0.1, 0.4) == 0.1  # a single step is the start and the end
    assert [fitted_triangular_lr(i, 5, 1, 0.1, 0.4) for i in range(5)] == pytest.approx([0.1, 0.25, 0.4, 0.25, 0.1])
    assert clr_cycles(30, 2) == 8 and clr_cycles(1, 2) == 1 and clr_cycles(9, 2) == 2  # 9/4 = 2.25 -> 2
    with pytest.raises(ValueError, match="cycles >= 1"):
        fitted_triangular_lr(0, 10, 0, 0.1, 0.4)


@pytest.mark.parametrize("epochs,k,expected", [(40, 1, [19]), (41, 2, [12, 25]), (30, 3, [6, 13, 20]), (3, 3, []),
                                               (4, 3, [0, 1, 2])])
def test_period_boundaries_are_where_rifle_would_reinit(epochs, k, expected):
    """Every method is probed at RIFLE's boundaries for its (epochs, reinit_times): RIFLE's re-init epochs on the
    truncated run (30 epochs, K=3: RIFLE trains 28, so no fourth boundary after epoch 27)."""
    assert period_boundaries(epochs, k) == expected
    if epochs >= k + 1:
        assert period_boundaries(epochs, k) == C.reinit_epochs(C.build({"epochs": epochs, "reinit_times": k}))
