import math

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from rifle import config as C
from rifle.models import build_model, param_groups
from rifle.seeds import reinit_seed
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


def test_default_reinit_is_a_fresh_nn_linear_seeded_the_same_way():
    """`reinit_init=default` is today's draw, bit for bit: nn.Linear's own init from torch.manual_seed(seed)."""
    head = nn.Linear(64, 10)
    torch.manual_seed(123)
    reference = nn.Linear(64, 10)
    torch.manual_seed(7)
    reinit_linear_(head, seed=123)
    assert torch.equal(head.weight, reference.weight) and torch.equal(head.bias, reference.bias)
    reinit_linear_(head, seed=5, init="default")
    torch.manual_seed(5)
    assert torch.equal(head.weight, nn.Linear(64, 10).weight)


def test_he_normal_reinit_draws_the_paddle_ports_distribution():
    """`reinit_init=he_normal`: weight ~ N(0, 2 / fan_in), bias ~ N(0, 2 / out_features), from the seed only."""
    head = nn.Linear(2048, 1000)
    weight_before = head.weight
    torch.manual_seed(1)
    reinit_linear_(head, seed=42, init="he_normal")
    w, b = head.weight.detach().double(), head.bias.detach().double()
    assert head.weight is weight_before
    assert float(w.std()) == pytest.approx(math.sqrt(2 / 2048), rel=0.01)  # 2M draws: within a percent
    assert abs(float(w.mean())) < 3 * math.sqrt(2 / 2048) / math.sqrt(w.numel())
    assert float(b.std()) == pytest.approx(math.sqrt(2 / 1000), rel=0.1)  # 1000 draws
    assert float(w.abs().max()) > 1 / math.sqrt(2048)  # unbounded: not the default's uniform
    again = nn.Linear(2048, 1000)
    torch.manual_seed(2)  # another global state: the same draw
    reinit_linear_(again, seed=42, init="he_normal")
    assert torch.equal(again.weight, head.weight) and torch.equal(again.bias, head.bias)
    reinit_linear_(again, seed=43, init="he_normal")
    assert not torch.equal(again.weight, head.weight)
    with pytest.raises(ValueError, match="allowed: default, he_normal"):
        reinit_linear_(again, seed=1, init="xavier")
    with pytest.raises(C.ConfigError, match="--reinit_init: got 'xavier', allowed: default, he_normal"):
        C.build({"reinit_init": "xavier"})


def _fit_context(cfg, model):
    optimizer = torch.optim.SGD(param_groups(model), lr=0.1, momentum=0.9)
    acc = Accelerator()
    return FitContext(model, optimizer, acc, 3, {}, lambda: None, None)


def _train_step(model, optimizer):
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


@pytest.mark.parametrize("reset_momentum,init", [(False, "default"), (True, "default"), (False, "he_normal")])
def test_reinit_at_official_epochs_changes_only_the_head(reset_momentum, init):
    cfg = C.build({"epochs": 6, "reinit_times": 2, "reset_head_momentum": reset_momentum, "reinit_init": init})
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
            # the head weight's Frobenius norm just before and just after the reset
            assert metrics["head_norm_pre_reinit"] == pytest.approx(float(before["head.weight"].norm()))
            assert metrics["head_norm_post_reinit"] == pytest.approx(float(after["head.weight"].norm()))
            fresh = nn.Linear(model.head.in_features, 3)
            reinit_linear_(fresh, seed=reinit_seed(cfg.run.seed, len(reinit_epochs)), init=init)
            assert torch.equal(after["head.weight"], fresh.weight)  # the chosen initializer, the seeded draw
            assert metrics["reinit_weight_spread"] == 0.0
            momentum = ctx.optimizer.state[model.head.weight]["momentum_buffer"]
            assert (momentum.abs().sum() == 0) == reset_momentum  # the official code keeps momentum
        else:
            assert not changed and not any(k.startswith("head_norm") for k in metrics)
    assert reinit_epochs == [1, 3] and rifle.state_dict() == {"done": 2}


def test_cyclic_head_policy_only_moves_the_head_lr():
    cfg = C.build({"epochs": 12, "reinit_times": 2, "head_lr_policy": "cyclic", "lr": 0.01})
    (rifle,) = build_tricks(cfg)
    lrs = rifle.lr({"backbone": 0.003, "head": 0.003}, progress=4.5)  # first epoch of period 2
    assert lrs == {"backbone": 0.003, "head": pytest.approx(0.01)}
    assert build_tricks(C.build({"epochs": 12}))[0].lr({"backbone": 1, "head": 1}, 4.5) == {"backbone": 1, "head": 1}
