import math

import pytest

from rifle import config as C
from rifle.schedules import cosine_lr, rifle_cyclic_head_lr, rifle_period, rifle_reinit_epochs


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
    assert C.build({"epochs": 41, "reinit_times": 2}).optim.epochs == 39
    assert C.build({"epochs": 40, "reinit_times": 3}).optim.epochs == 40
    assert C.build({"epochs": 41, "reinit_times": 2, "tricks": ""}).optim.epochs == 41  # plain: untouched
    assert rifle_period(39, 2) == 13


def test_cyclic_head_lr_restarts_every_period():
    lrs = [rifle_cyclic_head_lr(e, 12, 2, 0.01) for e in range(12)]
    assert lrs[0] == lrs[4] == lrs[8] == pytest.approx(0.01)
    assert lrs[3] == pytest.approx(0.5 * 0.01 * (1 + math.cos(math.pi * 3 / 4)))
    assert lrs[3] < lrs[2] < lrs[1] < lrs[0]
