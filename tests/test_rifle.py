import math

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from rifle import config as C
from rifle.models import build_model, param_groups
from rifle.tricks import build_tricks
from rifle.tricks.base import FitContext
from rifle.tricks.rifle import reinit_linear_


def test_reinit_is_identical_whatever_the_global_rng():
    a, b = nn.Linear(16, 5), nn.Linear(16, 5)
    weight_before = a.weight
    torch.manual_seed(1)
    reinit_linear_(a, seed=42)
    torch.manual_seed(2)  # another process, another RNG state
    reinit_linear_(b, seed=42)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert a.weight is weight_before  # in place: the optimizer still holds the same tensors
    bound = 1 / math.sqrt(16)  # PyTorch's default nn.Linear init, as the official reset_parameters()
    assert a.weight.abs().max() <= bound and a.bias.abs().max() <= bound and a.weight.std() > bound / 3
    c = nn.Linear(16, 5)
    reinit_linear_(c, seed=43)
    assert not torch.equal(a.weight, c.weight)


def _fit_context(cfg, model):
    optimizer = torch.optim.SGD(param_groups(model), lr=0.1, momentum=0.9)
    acc = Accelerator()
    return FitContext(model, optimizer, acc, 3, {}, lambda: None, None)


def _train_step(model, optimizer):
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


@pytest.mark.parametrize("reset_momentum", [False, True])
def test_reinit_at_official_epochs_changes_only_the_head(reset_momentum):
    cfg = C.build({"epochs": 6, "reinit_times": 2, "reset_head_momentum": reset_momentum})
    torch.manual_seed(0)
    model = build_model("torchvision:resnet18", num_classes=3, pretrained=False)
    ctx = _fit_context(cfg, model)
    (rifle,) = build_tricks(cfg)
    rifle.on_fit_start(ctx)
    reinit_epochs = []
    for epoch in range(cfg.optim.epochs):
        _train_step(model, ctx.optimizer)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        metrics = {"head_reinit": 0.0}
        rifle.on_epoch_end(epoch, metrics)
        after = model.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        if metrics["head_reinit"]:
            reinit_epochs.append(epoch)
            assert changed == {"head.weight", "head.bias"}
            assert metrics["reinit_weight_spread"] == 0.0
            momentum = ctx.optimizer.state[model.head.weight]["momentum_buffer"]
            assert (momentum.abs().sum() == 0) == reset_momentum  # the official code keeps momentum
        else:
            assert not changed
    assert reinit_epochs == [1, 3] and rifle.state_dict() == {"done": 2}


def test_cyclic_head_policy_only_moves_the_head_lr():
    cfg = C.build({"epochs": 12, "reinit_times": 2, "head_lr_policy": "cyclic", "lr": 0.01})
    (rifle,) = build_tricks(cfg)
    lrs = rifle.lr({"backbone": 0.003, "head": 0.003}, progress=4.5)  # first epoch of period 2
    assert lrs == {"backbone": 0.003, "head": pytest.approx(0.01)}
    assert build_tricks(C.build({"epochs": 12}))[0].lr({"backbone": 1, "head": 1}, 4.5) == {"backbone": 1, "head": 1}
