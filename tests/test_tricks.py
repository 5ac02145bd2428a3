"""The baselines and regularizers: each pure function against a reference computed here, the hooks on
tiny models (32x32 inputs, batch 4, no downloads), deterministic evaluation, and the combination rules."""
import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import CANONICAL, EVIDENCE, NUM_CLASSES, WITH_RIFLE, images, resnet10t, tiny_classifier
from torch import nn

from rifle import config as C
from rifle import probes
from rifle.schedules import clr_cycles, triangular_lr
from rifle.tricks import build_tricks
from rifle.tricks.base import FitContext
from rifle.tricks.delta import channel_attention, channel_loss_increase, default_layers, delta_feature_penalty
from rifle.tricks.disturb_label import disturb_labels
from rifle.tricks.dropconnect import DropConnectLinear, dropconnect_linear, dropconnect_mask
from rifle.tricks.dropout import dropout_mask
from rifle.tricks.l2 import l2_penalty
from rifle.tricks.l2sp import l2sp_penalty
from rifle.tricks.rifle import reinit_linear_
from rifle.tricks.stochastic_depth import BranchGate, branch_gate, install_gates, residual_blocks, survival_probs

def binomial_ok(hits: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(hits - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


class ConvNet(nn.Module):
    """No BatchNorm, no skip connection: train and eval compute the same function."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.stage = nn.Sequential(nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.pool(self.stage(self.stem(x)))


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state()  # an earlier test in this process may have left bf16 autocast on
    return Accelerator(cpu=True, mixed_precision="no")


def fit_context(model, cfg, accelerator, source_fn, n_batches=2, batch=4):
    """What the trainer hands the tricks: optimizer with named groups, snapshot, a tiny loader."""
    from rifle.models import param_groups
    opt = torch.optim.SGD(param_groups(model), lr=cfg.optim.lr, momentum=0.9, weight_decay=cfg.optim.weight_decay)
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(batch, 3, 32, 32, generator=g), torch.randint(NUM_CLASSES, (batch,), generator=g))
            for _ in range(n_batches)]
    return FitContext(model, opt, accelerator, NUM_CLASSES, probes.snapshot(model.backbone), source_fn, data)


def epoch_end(tricks, epoch, metrics=None, accelerator=None):
    """The tricks' epoch end as the trainer runs it: each trick's hook, then its meter's averages."""
    metrics = {} if metrics is None else metrics
    for t in tricks:
        t.on_epoch_end(epoch, metrics)
        metrics |= t.meter.pop(accelerator)
    return metrics


def run_steps(tricks, ctx, cfg, epochs=1):
    """The trainer's own batch loop (trainer.train_epoch) and the tricks' epoch end, for a few steps."""
    from tqdm import tqdm

    from rifle.trainer import Session, train_epoch
    losses, all_metrics = [], []
    for epoch in range(epochs):
        for t in tricks:
            t.meter.reset()
            t.on_epoch_start(epoch)
        session = Session(cfg, ctx.accelerator, Path("."), ctx.model, ctx.model, ctx.optimizer, (ctx.train_loader,),
                          tricks, {}, None, None, {})  # what train_epoch reads; no probe, tracker or checkpoint
        metrics = train_epoch(session, epoch, tqdm(disable=True))
        losses.append(metrics["train_loss"])
        all_metrics.append(epoch_end(tricks, epoch, metrics, ctx.accelerator))
    return losses, all_metrics


# ---------------------------------------------------------------- configuration and registry

@pytest.mark.parametrize("values,option,words", [
    ({"tricks": "rifle,cyclic_lr", "head_lr_policy": "cyclic"}, "head_lr_policy", ["cyclic_lr", "head_lr_policy"]),
    ({"tricks": "l2,l2sp"}, "tricks", ["l2", "l2sp"]),
    ({"tricks": "rifle,l2sp,delta"}, "tricks", ["l2sp", "delta"]),
    ({"tricks": "l2,delta"}, "tricks", ["l2", "delta"]),
    ({"tricks": "dropout", "dropout_p": "1"}, "dropout_p", ["< 1"]),
    ({"tricks": "dropconnect", "dropconnect_p": "1.5"}, "dropconnect_p", ["< 1"]),
    ({"tricks": "disturb_label", "disturb_alpha": "1.5"}, "disturb_alpha", ["<= 1"]),
    ({"tricks": "stochastic_depth", "sd_survival_last": "0"}, "sd_survival_last", ["> 0"]),
    ({"tricks": "stochastic_depth", "sd_mode": "row"}, "sd_mode", ["batch", "sample"]),
    ({"tricks": "cyclic_lr", "clr_base_lr": "0.02"}, "clr_base_lr", ["below"]),
    ({"tricks": "rifle,head_lr_restart"}, "tricks", ["control", "head_lr_policy=cyclic"]),
    ({"tricks": "head_lr_restart,cyclic_lr"}, "tricks", ["two learning-rate policies"]),
    ({"tricks": "head_lr_restart", "epochs": "2", "reinit_times": "2"}, "reinit_times",
     ["3 head learning-rate periods"]),
    ({"tricks": "rifle", "reinit_init": "xavier_uniform"}, "reinit_init", ["default, he_normal"]),
])
def test_bad_combinations_fail_before_training(values, option, words):
    with pytest.raises(C.ConfigError) as err:
        C.build(values)
    assert err.value.option == option
    assert all(w in str(err.value) for w in words)


def test_every_method_composes_with_rifle_and_has_canonical_settings():
    assert set(C.TRICK_NAMES) == set(CANONICAL) == set(EVIDENCE)
    for name in C.TRICK_NAMES:
        for tricks in (name, f"rifle,{name}" if name in WITH_RIFLE else name):
            cfg = C.build({"tricks": tricks, **CANONICAL[name]})
            assert [t.name for t in build_tricks(cfg)] == tricks.split(",")
    # cyclic_lr with RIFLE's default head policy (follow) is fine
    C.build({"tricks": "rifle,cyclic_lr", "head_lr_policy": "follow"})


# ---------------------------------------------------------------- DisturbLabel

def test_disturb_labels_flip_rate_within_binomial_bound():
    n, classes, alpha = 20000, 10, 0.3
    labels = torch.randint(classes, (n,), generator=torch.Generator().manual_seed(0))
    out = disturb_labels(labels, classes, alpha, generator=torch.Generator().manual_seed(1))
    # a replaced label is drawn from all classes, the true one included: it changes w.p. alpha (C-1)/C
    assert binomial_ok(int((out != labels).sum()), n, alpha * (classes - 1) / classes)
    assert out.min() >= 0 and out.max() < classes and out.dtype == labels.dtype
    fully = disturb_labels(torch.zeros(n, dtype=torch.long), classes, 1.0, torch.Generator().manual_seed(2))
    counts = torch.bincount(fully, minlength=classes)
    assert all(binomial_ok(int(c), n, 1 / classes) for c in counts)  # uniform over all classes
    assert torch.equal(disturb_labels(labels, classes, 0.0), labels)


def test_disturb_label_acts_only_in_training(accelerator):
    cfg = C.build({"tricks": "disturb_label", "disturb_alpha": "0.5"})
    model = tiny_classifier()
    (trick,) = build_tricks(cfg)
    trick.on_fit_start(fit_context(model, cfg, accelerator, None))
    trick.on_epoch_start(0)
    labels = torch.arange(NUM_CLASSES).repeat(400)
    model.eval()
    assert torch.equal(trick.before_loss(None, labels), labels)
    model.train()
    trick.before_loss(None, labels)
    metrics = epoch_end([trick], 0)
    assert metrics["disturb_label/flip_rate"] == pytest.approx(0.5 * 4 / 5, abs=0.05)


# ---------------------------------------------------------------- Cyclic LR

def test_triangular_lr_at_chosen_iterations():
    base, top, step = 0.001, 0.006, 2000  # the paper's CIFAR-10 example
    expect = {0: base, 500: base + 0.25 * (top - base), 1000: (base + top) / 2, 2000: top,
              3000: (base + top) / 2, 4000: base, 5000: (base + top) / 2, 6000: top, 8000: base}
    for it, lr in expect.items():
        assert triangular_lr(it, base, top, step) == pytest.approx(lr), it


def test_cyclic_lr_overrides_both_groups_and_keeps_head_ratio(accelerator):
    cfg = C.build({"tricks": "cyclic_lr", "lr": "0.01", "head_lr": "0.1", "clr_step_epochs": "2", "epochs": "8"})
    (trick,) = build_tricks(cfg)
    with pytest.raises(RuntimeError, match="on_fit_start"):
        trick.lr({"backbone": 1.0, "head": 1.0}, 0.0)
    trick.on_fit_start(fit_context(tiny_classifier(ConvNet), cfg, accelerator, None, n_batches=5))
    at = lambda p: trick.lr({"backbone": 123.0, "head": 456.0}, p)  # noqa: E731
    # 8 epochs of 5 steps, 2 cycles: T = 40 iterations, half-cycle 39/4 = 9.75 iterations (1.95 epochs)
    assert at(0.0) == {"backbone": 0.0025, "head": pytest.approx(0.025)}   # base = max/4, max = lr
    assert at(7.8) == {"backbone": 0.0025, "head": pytest.approx(0.025)}   # the last step: the base again
    assert at(2.0)["backbone"] == pytest.approx(0.0025 + 0.0075 * (1 - 0.25 / 9.75))  # iteration 10, past a peak
    assert at(3.0) == pytest.approx({"backbone": triangular_lr(15, 0.0025, 0.01, 9.75),
                                     "head": 10 * triangular_lr(15, 0.0025, 0.01, 9.75)})


@pytest.mark.parametrize("epochs,step,cycles", [(30, 2, 8), (7, 2, 2), (40, 2, 10), (1, 2, 1), (40, 10, 2),
                                                 (10, 2, 2), (6, 0.5, 6)])
def test_cyclic_lr_cycle_count_is_logged_from_config(epochs, step, cycles):
    from rifle.trainer import run_params
    cfg = C.build({"tricks": "cyclic_lr", "epochs": epochs, "clr_step_epochs": step})
    assert clr_cycles(epochs, step) == cycles == run_params(cfg)["clr_cycles"]
    assert run_params(C.build({"tricks": "none", "epochs": epochs}))["clr_cycles"] == 0  # no cyclic_lr, no cycles


# ---------------------------------------------------------------- head_lr_restart (RIFLE's control)

def test_head_lr_restart_is_rifle_cyclic_without_reinits():
    """The same budget as RIFLE (truncated to a multiple of K+1), the same head learning rate as RIFLE's cyclic
    policy at every step, no re-init (head_reinit 0 every epoch), the backbone's rate untouched."""
    control = C.build({"tricks": "head_lr_restart", "epochs": 41, "reinit_times": 2, "lr": 0.01, "head_lr": 0.1})
    rifle = C.build({"tricks": "rifle", "epochs": 41, "reinit_times": 2, "lr": 0.01, "head_lr": 0.1,
                     "head_lr_policy": "cyclic"})
    assert control.optim.epochs == rifle.optim.epochs == 39 and C.reinit_count(control) == 0
    (c,), (r,) = build_tricks(control), build_tricks(rifle)
    for progress in (0.0, 0.5, 12.9, 13.0, 25.99, 26.0, 38.75):
        lrs = {"backbone": 0.003, "head": 0.03}
        assert c.lr(lrs, progress) == r.lr(lrs, progress) and c.lr(lrs, progress)["backbone"] == 0.003
    assert c.lr(lrs, 13.0)["head"] == pytest.approx(0.1)  # restarted at the second period
    for epoch in range(39):
        metrics = {}
        c.on_epoch_end(epoch, metrics)
        assert metrics == {"head_reinit": 0.0}


# ---------------------------------------------------------------- L2 and L2-SP

def test_l2sp_penalty_by_hand_on_a_tiny_model(accelerator):
    cfg = C.build({"tricks": "l2sp", "l2sp_alpha": "0.1", "l2sp_beta": "0.01"})
    model = tiny_classifier(ConvNet)
    ctx = fit_context(model, cfg, accelerator, None)
    (trick,) = build_tricks(cfg)
    trick.on_fit_start(ctx)
    assert all(g["weight_decay"] == 0.0 for g in ctx.optimizer.param_groups)
    head_sq = sum(float((p.detach().double() ** 2).sum()) for p in model.head.parameters())
    # at the starting point only the head term is left
    assert float(trick.penalty(model, None)) == pytest.approx(0.01 / 2 * head_sq, rel=1e-6)
    n_backbone = sum(p.numel() for p in model.backbone.parameters())
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(0.5)
    value = trick.penalty(model, None)
    assert float(value) == pytest.approx(0.1 / 2 * 0.25 * n_backbone + 0.01 / 2 * head_sq, rel=1e-5)
    value.backward()  # d/dw alpha/2 ||w - w0||^2 = alpha (w - w0)
    conv = model.backbone.stem[0].weight
    assert torch.allclose(conv.grad, torch.full_like(conv, 0.1 * 0.5))
    assert torch.allclose(model.head.weight.grad, 0.01 * model.head.weight)
    # the pure function on explicit tensors
    assert float(l2sp_penalty([torch.tensor([1.0, 2.0])], [torch.tensor([0.0, 4.0])], 2.0)) == pytest.approx(5.0)
    metrics = epoch_end([trick], 0)
    assert metrics["penalty/l2sp"] == pytest.approx((0.01 / 2 * head_sq + float(value)) / 2, rel=1e-5)


def test_l2_penalty_is_the_official_weight_decay(accelerator):
    """Penalty alpha/2||w||^2 with weight_decay 0 takes the same SGD steps as weight_decay=alpha."""
    assert float(l2_penalty([torch.tensor([3.0, 4.0])], 0.2)) == pytest.approx(2.5)
    cfg = C.build({"tricks": "l2", "l2_alpha": "0.01"})
    models = [tiny_classifier(ConvNet) for _ in range(2)]
    x, y = images(), torch.tensor([0, 1, 2, 3])
    with_trick = fit_context(models[0], cfg, accelerator, None)
    (trick,) = build_tricks(cfg)
    trick.on_fit_start(with_trick)
    assert all(g["weight_decay"] == 0.0 for g in with_trick.optimizer.param_groups)
    from rifle.models import param_groups
    plain = torch.optim.SGD(param_groups(models[1]), lr=0.01, momentum=0.9, weight_decay=0.01)
    for _ in range(3):
        loss = F.cross_entropy(models[0](x), y) + trick.penalty(models[0], x)
        loss.backward()
        with_trick.optimizer.step()
        with_trick.optimizer.zero_grad()
        F.cross_entropy(models[1](x), y).backward()
        plain.step()
        plain.zero_grad()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.allclose(a, b, atol=1e-6)


# ---------------------------------------------------------------- Stochastic depth

def test_survival_probs_decay_linearly_to_p_last():
    assert survival_probs(4, 0.5) == pytest.approx([0.875, 0.75, 0.625, 0.5])
    assert survival_probs(1, 0.3) == pytest.approx([0.3])
    assert survival_probs(3, 1.0) == pytest.approx([1.0, 1.0, 1.0])


def test_stochastic_depth_survival_per_block_on_torchvision_resnet18():
    import torchvision
    net = torchvision.models.resnet18(weights=None)
    gates = install_gates(net, 0.5, per_sample=False)
    blocks = [n for n, m in net.named_modules() if type(m).__name__ == "BasicBlock"]
    assert len(blocks) == len(gates) == 8
    assert [g.survival for g in gates] == pytest.approx([1 - l / 8 * 0.5 for l in range(1, 9)])
    assert all(isinstance(net.get_submodule(b).sd_gate0, BranchGate) for b in blocks)
    assert set(net.state_dict()) == set(torchvision.models.resnet18(weights=None).state_dict())
    net50 = torchvision.models.resnet50(weights=None)
    assert len(install_gates(net50, 0.5, per_sample=True)) == 16  # Bottleneck blocks


def test_stochastic_depth_gates_only_blocks_with_a_skip_on_efficientnet_lite0():
    import timm
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    skip = [n for n, m in net.named_modules() if getattr(m, "has_skip", False)]
    gates = install_gates(net, 0.5, per_sample=False)
    assert len(skip) == len(gates) == 9  # the first block of each stage changes shape: no skip
    assert [net.get_submodule(n).drop_path for n in skip] == gates
    assert [g.survival for g in gates] == pytest.approx(survival_probs(9, 0.5))
    no_skip = [m for m in net.modules() if hasattr(m, "has_skip") and not m.has_skip]
    assert all(isinstance(m.drop_path, nn.Identity) for m in no_skip)
    import torchvision  # torchvision's MBConv: its own StochasticDepth slot, only where use_res_connect
    tv = torchvision.models.efficientnet_b0(weights=None)
    residual = [m for m in tv.modules() if getattr(m, "use_res_connect", False)]
    gates = install_gates(tv, 0.5, per_sample=True)
    assert len(residual) == 9 and [m.stochastic_depth for m in residual] == gates


@pytest.mark.parametrize("model", ["resnet18", "efficientnet_lite0"])
def test_a_dropped_branch_keeps_its_batchnorm_statistics(model):
    """Batch mode: each block is kept or dropped by the draws the gates made before (one per gate, in forward
    order); a dropped branch's BatchNorm running statistics and batch count stay as they were, a kept one's
    and every shortcut's (the projection's BatchNorm) move."""
    import timm
    import torchvision
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None) if model == "resnet18" else \
        timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    generator = torch.Generator()
    gates = install_gates(net, 0.5, per_sample=False, generator=generator)
    blocks = [block for _, block, _ in residual_blocks(net)]
    generator.manual_seed(3)
    draws = torch.Generator().manual_seed(3)  # the same stream, drawn here in the gates' order
    expected = [bool(torch.rand((), generator=draws) < g.survival) for g in gates]
    assert not all(expected) and any(expected)  # this seed drops some blocks and keeps others
    bns = {b: [(n, m) for n, m in b.named_modules() if isinstance(m, nn.BatchNorm2d)] for b in blocks}
    before = {id(m): (m.running_mean.clone(), int(m.num_batches_tracked)) for ms in bns.values() for _, m in ms}
    net.train()
    net(torch.randn(4, 3, 64, 64))
    assert [g.dropped for g in gates] == [int(not k) for k in expected]
    for block, keep in zip(blocks, expected):
        for name, bn in bns[block]:
            mean, count = before[id(bn)]
            moved = not torch.equal(mean, bn.running_mean)
            shortcut = name.split(".")[0] == "downsample"
            assert moved == (keep or shortcut) and int(bn.num_batches_tracked) == count + (keep or shortcut), name
    assert all(bn.momentum == 0.1 for ms in bns.values() for _, bn in ms)  # restored after each block


def test_stochastic_depth_rejects_a_model_without_residual_blocks():
    with pytest.raises(C.ConfigError, match="residual blocks"):
        install_gates(ConvNet(), 0.5, per_sample=False)


def test_branch_gate_rates_and_scaling():
    g = torch.Generator().manual_seed(0)
    branch = torch.ones(64, 3, 2, 2)
    kept = 0
    for _ in range(2000):
        out, dropped, drawn = branch_gate(branch, 0.7, per_sample=False, generator=g)
        assert drawn == 1 and torch.unique(out).tolist() in ([0.0], [pytest.approx(1 / 0.7)])
        kept += 1 - dropped
    assert binomial_ok(kept, 2000, 0.7)
    out, dropped, drawn = branch_gate(torch.ones(4000, 3), 0.7, per_sample=True, generator=g)
    assert drawn == 4000 and binomial_ok(4000 - int(dropped), 4000, 0.7)
    rows = out[:, 0]
    assert torch.equal(out, rows[:, None].expand_as(out))  # one draw per sample
    assert torch.unique(rows).tolist() == [0.0, pytest.approx(1 / 0.7)]


def test_stochastic_depth_training_drops_blocks_and_keeps_every_gradient(accelerator):
    cfg = C.build({"tricks": "stochastic_depth", "sd_survival_last": "0.05"})
    model = tiny_classifier()
    (trick,) = build_tricks(cfg)
    trick.prepare_model(model)
    trick.on_fit_start(fit_context(model, cfg, accelerator, None))
    trick.on_epoch_start(0)
    model.train()
    F.cross_entropy(model(images()), torch.arange(4)).backward()
    # a dropped branch is multiplied by 0, not skipped: DDP needs every parameter in every step
    assert all(p.grad is not None for p in model.parameters())
    metrics = epoch_end([trick], 0)
    assert 0.0 < metrics["stochastic_depth/skip_rate"] <= 1.0


# ---------------------------------------------------------------- DropConnect and Dropout

def test_dropconnect_mask_rate_and_per_example_product():
    mask = dropconnect_mask((200, 50, 20), 0.3, generator=torch.Generator().manual_seed(0))
    assert binomial_ok(int((mask == 0).sum()), mask.numel(), 0.3)
    assert set(torch.unique(mask).tolist()) <= {0.0, 1.0}
    x, w, b = torch.randn(3, 4), torch.randn(2, 4), torch.randn(2)
    wm = dropconnect_mask((3, 2, 4), 0.5, generator=torch.Generator().manual_seed(1))
    bm = dropconnect_mask((3, 2), 0.5, generator=torch.Generator().manual_seed(2))
    ref = torch.stack([(wm[n] * w) @ x[n] + bm[n] * b for n in range(3)])
    assert torch.allclose(dropconnect_linear(x, w, b, wm, bm), ref, atol=1e-6)


def test_dropconnect_head_train_and_expected_weights_at_eval():
    lin = nn.Linear(16, 3)
    head = DropConnectLinear.from_linear(lin, 0.4)
    assert head.weight is lin.weight and head.bias is lin.bias
    assert set(head.state_dict()) == {"weight", "bias"}
    x = torch.randn(2, 16).repeat(500, 1)
    head.eval()
    assert torch.equal(head(x), head(x))
    assert torch.allclose(head(x), F.linear(x, 0.6 * lin.weight, 0.6 * lin.bias), atol=1e-6)
    head.train()
    out = head(x)
    assert not torch.equal(out[0], out[2])  # the same input gets a different mask per example
    assert binomial_ok(int(head.dropped), head.seen, 0.4)
    # in expectation the training output is the evaluation output
    assert torch.allclose(out.view(500, 2, 3).mean(0), F.linear(x[:2], 0.6 * lin.weight, 0.6 * lin.bias),
                          atol=0.35)
    reinit_linear_(head, seed=5)  # RIFLE's in-place reset works on the subclass
    assert isinstance(head, DropConnectLinear) and head.weight is lin.weight


def test_dropout_mask_rate_and_scale():
    mask = dropout_mask((100000,), 0.25, generator=torch.Generator().manual_seed(0))
    assert binomial_ok(int((mask == 0).sum()), 100000, 0.25)
    assert torch.unique(mask).tolist() == [0.0, pytest.approx(1 / 0.75)]


# ---------------------------------------------------------------- DELTA

def test_channel_attention_is_a_softmax_over_channels():
    rise = torch.tensor([0.0, 0.1, 0.5, 0.2])
    att = channel_attention(rise)
    assert att.shape == (4,) and float(att.sum()) == pytest.approx(1.0) and (att > 0).all()
    assert att.argsort().tolist() == rise.argsort().tolist()  # a more useful channel weighs more
    z = (rise - rise.mean()) / rise.std(unbiased=False)
    assert torch.allclose(att, torch.softmax(z / 5, 0), atol=1e-6)
    assert torch.allclose(channel_attention(torch.full((6,), 0.3)), torch.full((6,), 1 / 6))


def test_delta_feature_penalty_by_hand():
    t = torch.zeros(2, 3, 2, 2)
    assert float(delta_feature_penalty([t], [t.clone()], [torch.full((3,), 1 / 3)])) == 0.0
    s = t.clone()
    s[1, 2] = 1.0  # channel 2 of sample 1 differs by 1 at each of the 4 positions
    att = torch.tensor([0.2, 0.3, 0.5])
    # 1/2 * C * a_2 * ||.||^2 / (HW) = 0.5 * 3 * 0.5 * 4 / 4
    assert float(delta_feature_penalty([t], [s], [att])) == pytest.approx(0.75)


@pytest.mark.parametrize("layer", ["layer1", "layer1.0.conv1",  # a stage output; in blocks
                                   pytest.param("layer2.1.conv2", marks=pytest.mark.slow)])  # 128 channels
def test_channel_loss_increase_matches_one_forward_per_channel(layer):
    import torchvision
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=NUM_CLASSES).eval()
    head, net.fc = net.fc, nn.Identity()
    x, y = images(2), torch.tensor([1, 3])
    module = net.get_submodule(layer)
    fast = channel_loss_increase(net, head, layer, x, y, max_batch=64)
    with torch.no_grad():
        base = F.cross_entropy(head(net(x)), y)
        ref = []
        for j in range(fast.numel()):
            def zero(m, a, out, j=j):
                out = out.clone()
                out[:, j] = 0
                return out
            h = module.register_forward_hook(zero)
            ref.append(float(F.cross_entropy(head(net(x)), y) - base))
            h.remove()
    assert fast.numel() == (128 if layer.startswith("layer2") else 64)
    assert torch.allclose(fast, torch.tensor(ref, dtype=torch.float64), atol=1e-4)


def test_delta_trick_attention_penalty_and_resume_state(accelerator):
    cfg = C.build({"tricks": "delta", "delta_layers": "stem,stage", "delta_alpha": "0.5", "delta_beta": "0.01",
                   "delta_attention_epochs": "2", "delta_attention_batches": "2"})
    model = tiny_classifier(ConvNet)
    (trick,) = build_tricks(cfg)
    trick.prepare_model(model)
    ctx = fit_context(model, cfg, accelerator, lambda: tiny_classifier(ConvNet, seed=99).backbone)
    trick.on_fit_start(ctx)
    assert all(g["weight_decay"] == 0.0 for g in ctx.optimizer.param_groups)
    assert not any(p.requires_grad for p in trick.source.parameters())
    assert not {id(p) for p in trick.source.parameters()} & {id(p) for g in ctx.optimizer.param_groups
                                                               for p in g["params"]}
    rng = torch.get_rng_state()
    trick.on_epoch_start(0)
    assert torch.equal(rng, torch.get_rng_state())  # the attention pass leaves the training randomness alone
    assert [len(a) for a in trick.attention] == [6, 8]
    assert all(sum(a) == pytest.approx(1.0) and min(a) > 0 for a in trick.attention)
    x = images()
    head_term = 0.01 / 2 * sum(float((p.detach().double() ** 2).sum()) for p in model.head.parameters())
    model.train()
    model(x)
    # the source is the starting point (the snapshot), not the other random init it was built with
    assert float(trick.penalty(model, x)) == pytest.approx(head_term, rel=1e-6)
    with torch.no_grad():
        model.backbone.stage[0].weight.add_(0.3)
    model(x)
    value = trick.penalty(model, x)
    assert float(value) > head_term * 1.01
    value.backward()
    assert model.backbone.stage[0].weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        model(x)
    with pytest.raises(RuntimeError, match="no feature maps"):
        trick.penalty(model, x)  # evaluation forwards are not captured
    state = json.loads(json.dumps(trick.state_dict()))
    (again,) = build_tricks(cfg)
    again.prepare_model(tiny_classifier(ConvNet))
    again.load_state_dict(state)
    assert again.attention == trick.attention


def test_delta_source_runs_on_running_batchnorm_statistics(accelerator):
    cfg = C.build({"tricks": "delta", "delta_attention_epochs": "1", "delta_attention_batches": "1"})
    model = tiny_classifier()
    (trick,) = build_tricks(cfg)
    trick.prepare_model(model)
    trick.on_fit_start(fit_context(model, cfg, accelerator, lambda: tiny_classifier(seed=7).backbone))
    trick.on_epoch_start(0)
    running = {k: v.clone() for k, v in trick.source.state_dict().items() if "running" in k}
    model.train()
    x = images()
    model(x)
    trick.penalty(model, x)
    metrics = epoch_end([trick], 0)
    # As the reference: the source in evaluation mode, so at the starting point the training-mode network's
    # batch statistics already make the feature maps differ (tests/test_delta.py checks the value).
    assert metrics["penalty/delta_features"] > 0
    assert all(torch.equal(v, trick.source.state_dict()[k]) for k, v in running.items())
    assert not any(m.training for m in trick.source.modules())


def test_delta_default_layers():
    import timm
    import torchvision
    lite0 = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    assert default_layers(lite0) == ["blocks.1.1.conv_pwl", "blocks.2.1.conv_pwl", "blocks.4.2.conv_pwl",
                                     "blocks.6.0.conv_pwl"]
    assert default_layers(resnet10t()) == ["layer1.0.conv2", "layer2.0.conv2", "layer3.0.conv2", "layer4.0.conv2"]
    assert default_layers(torchvision.models.resnet18(weights=None)) == [
        "layer1.1.conv2", "layer2.1.conv2", "layer3.1.conv2", "layer4.1.conv2"]
    with pytest.raises(C.ConfigError, match="delta_layers"):
        default_layers(ConvNet())


# ---------------------------------------------------------------- every method in the hook loop

@pytest.mark.parametrize("name", WITH_RIFLE)
def test_each_method_with_rifle_runs_acts_and_evaluates_deterministically(name, accelerator):
    cfg = C.build({"tricks": f"rifle,{name}", "epochs": "2", "reinit_times": "1", **CANONICAL[name],
                   **({"delta_layers": "layer4"} if name == "delta" else {})})
    model = tiny_classifier()
    tricks = build_tricks(cfg)
    for t in tricks:
        t.prepare_model(model)
    ctx = fit_context(model, cfg, accelerator, lambda: tiny_classifier(seed=7).backbone)
    for t in tricks:
        t.on_fit_start(ctx)
    head_before = model.head.weight.detach().clone()
    losses, metrics = run_steps(tricks, ctx, cfg, epochs=1)
    assert all(math.isfinite(v) for v in losses)
    assert metrics[0]["head_reinit"] == 1.0  # RIFLE still re-initialized the head (epoch 0 of 2)
    assert not torch.equal(model.head.weight, head_before)
    if EVIDENCE[name] is not None:
        assert metrics[0][EVIDENCE[name]] > 0
    model.eval()
    x = images()
    with torch.no_grad():
        first, second = model(x), model(x)
    assert torch.equal(first, second)
    json.dumps([t.state_dict() for t in tricks])  # resumable state is JSON


def test_all_model_surgeries_compose():
    cfg = C.build({"tricks": "rifle,dropout,dropconnect,stochastic_depth"})
    model = tiny_classifier()
    plain = copy.deepcopy(model)
    for t in build_tricks(cfg):
        t.prepare_model(model)
    assert set(model.state_dict()) == set(plain.state_dict())
    model.eval()
    plain.eval()
    x = images()
    with torch.no_grad():
        # evaluation: dropout and stochastic depth are the identity, DropConnect uses (1-p) W and (1-p) b
        feats = plain.backbone(x)
        expected = F.linear(feats, 0.5 * plain.head.weight, 0.5 * plain.head.bias)
        assert torch.allclose(model(x), expected, atol=1e-5)
    model.train()
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
