"""Several processes: synchronized BatchNorm equals one process with the global batch, and stochastic
depth's batch-mode decisions are the same on every rank.

This file is also the worker `accelerate launch` runs (see `__main__` at the bottom): two gloo CPU processes.
"""
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

STEPS, GLOBAL_BATCH = 3, 16


def small_bn_net() -> nn.Module:
    """BatchNorm in the three forms the backbones use: torch 2d, timm's norm+act, torch 1d."""
    from timm.layers import BatchNormAct2d
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 8, 3),
                         BatchNormAct2d(8, act_layer=nn.ReLU), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.BatchNorm1d(8), nn.Linear(8, 4))


def batches():
    """STEPS global batches, offset from zero so a one-pass variance would cancel badly."""
    g = torch.Generator().manual_seed(1)
    return [(3.0 + 2.0 * torch.randn(GLOBAL_BATCH, 3, 10, 10, generator=g),
             torch.randint(4, (GLOBAL_BATCH,), generator=g)) for _ in range(STEPS)]


def train(model, optimizer, data, backward=None, reduce=None):
    losses = []
    for x, y in data:
        loss = F.cross_entropy(model(x), y)
        (backward or torch.Tensor.backward)(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(reduce(loss.detach()) if reduce else loss.detach()))
    return losses


def reference():
    """One process, the whole global batch, plain BatchNorm."""
    net = small_bn_net().train()
    losses = train(net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), batches())
    return net.state_dict(), losses


@pytest.mark.slow
def test_two_processes_sync_bn_equals_one_process_with_the_global_batch(tmp_path, digits_folder):
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    from conftest import subprocess_env
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", __file__, str(tmp_path / "result.pt"), str(digits_folder), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "result.pt", weights_only=True)
    want_state, want_losses = reference()

    synced = got["sync"]
    assert synced["losses"] == pytest.approx(want_losses, abs=1e-5)
    for key, value in want_state.items():  # running statistics, and weights after 3 SGD steps
        assert torch.allclose(synced["state"][key].to(value.dtype), value, atol=1e-5, rtol=0), key
    # Without synchronization each process normalizes its own 8 images: the statistics differ (so the
    # comparison above can fail).
    plain = got["plain"]["state"]
    assert (plain["1.running_mean"] - want_state["1.running_mean"]).abs().max() > 1e-3

    # The trainer with --sync_bn: every BatchNorm converted (timm's norm+act included, activation kept),
    # stochastic depth's hooks still on the converted ResNet blocks, and one decision per block and batch
    # shared by both ranks.
    trainer = got["trainer"]
    assert trainer["plain_bn"] == 0 and trainer["sync_bn"] == 20  # resnet18: 20 BatchNorm layers
    decisions = trainer["decisions"]  # per rank: blocks dropped per step
    assert torch.equal(decisions[0], decisions[1])
    assert 0 < int(decisions[0].sum()) < 8 * decisions[0].numel()  # 8 gated BasicBlocks per step
    assert trainer["loss_finite"]


def test_cpu_conversion_keeps_the_tensors_and_is_batchnorm_in_one_process():
    """The conversion --sync_bn does on the CPU: every BatchNorm replaced, holding the same tensors; without
    other processes a training step normalizes and updates running statistics exactly as BatchNorm."""
    from rifle.sync_bn import CpuSyncBatchNorm, convert_sync_batchnorm
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))
    with torch.no_grad():
        plain[1].weight.uniform_(0.5, 2)
    reference = copy.deepcopy(plain)
    synced = convert_sync_batchnorm(plain, cpu=True)
    assert [type(m) for m in synced if isinstance(m, nn.modules.batchnorm._BatchNorm)] == [CpuSyncBatchNorm] * 2
    assert synced[1].weight is plain[1].weight and synced[1].running_mean is plain[1].running_mean
    x = torch.randn(6, 3, 8, 8) * 3 + 1
    assert torch.allclose(synced(x), reference(x), atol=1e-5)
    assert torch.allclose(synced[1].running_var, reference[1].running_var, atol=1e-6)
    synced.eval(), reference.eval()
    assert torch.allclose(synced(x), reference(x), atol=1e-5)


def test_stochastic_depth_batch_decisions_agree_across_ranks_and_resume():
    """Two ranks (own global random state, own shard of the batch) draw the same batch-mode decisions in
    every step; per-sample mode draws per rank; an epoch started anew draws what it drew before."""
    from rifle import config as C
    from rifle.seeds import seed_process, stream_seed
    from rifle.tricks import build_tricks
    from helpers import images, tiny_classifier

    def decisions(mode, rank, epochs=(0, 1), steps=6):
        cfg = C.build({"tricks": "stochastic_depth", "sd_survival_last": "0.3", "sd_mode": mode, "seed": 5})
        model = tiny_classifier().train()
        (trick,) = build_tricks(cfg)
        trick.prepare_model(model)
        out = {}
        for epoch in epochs:
            seed_process(stream_seed(5, epoch, rank))  # what fit does: each rank its own global stream
            trick.on_epoch_start(epoch)
            rows = []
            for step in range(steps):
                before = [float(g.dropped) for g in trick.gates]
                with torch.no_grad():
                    model(images(n=2, seed=10 * rank + step))
                rows.append([float(g.dropped) - b for g, b in zip(trick.gates, before)])
            out[epoch] = torch.tensor(rows)
        return out

    rank0, rank1 = decisions("batch", 0), decisions("batch", 1)
    for epoch in (0, 1):
        assert torch.equal(rank0[epoch], rank1[epoch])
        assert 0 < int(rank0[epoch].sum()) < rank0[epoch].numel()
    assert not torch.equal(rank0[0], rank0[1])  # each epoch its own draws
    assert torch.equal(decisions("batch", 1, epochs=(1,))[1], rank0[1])  # resumed at epoch 1
    per_sample = decisions("sample", 0), decisions("sample", 1)
    assert not torch.equal(per_sample[0][0], per_sample[1][0])


def worker(result_path: str, digits_folder: str, tmp: str) -> None:
    from accelerate import Accelerator
    from accelerate.utils import extract_model_from_parallel

    from rifle.sync_bn import convert_sync_batchnorm
    acc = Accelerator(cpu=True)
    rank, half = acc.process_index, GLOBAL_BATCH // 2
    shard = [(x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]) for x, y in batches()]
    result = {}
    for name in ("sync", "plain"):
        net = small_bn_net().train()
        if name == "sync":
            net = convert_sync_batchnorm(net, cpu=True)
        model, optimizer = acc.prepare(net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9))
        losses = train(model, optimizer, shard, backward=acc.backward,
                       reduce=lambda t: acc.reduce(t, reduction="mean"))
        result[name] = {"state": {k: v.detach().clone() for k, v in
                                  extract_model_from_parallel(model).state_dict().items()}, "losses": losses}
    result["trainer"] = trainer_check(acc, digits_folder, tmp)
    if acc.is_main_process:
        torch.save(result, result_path)
    acc.wait_for_everyone()


def trainer_check(acc, digits_folder: str, tmp: str) -> dict:
    from tqdm import tqdm

    from rifle import config as C
    from rifle.seeds import seed_process, stream_seed
    from rifle.sync_bn import CpuSyncBatchNorm
    from rifle.trainer import setup, train_epoch
    cfg = C.build({"dataset": f"imagefolder:{digits_folder}", "image_size": 48, "batch_size": 4,
                   "val_fraction": 0.25, "train_per_class": 0, "epochs": 1, "model": "torchvision:resnet18",
                   "pretrained": False, "tricks": "stochastic_depth", "sync_bn": True,
                   "output_dir": f"{tmp}/out", "tracking_uri": f"sqlite:///{tmp}/m.db", "log_weights": False})
    s = setup(cfg)
    (trick,) = s.tricks
    norms = [m for m in s.raw.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    seed_process(stream_seed(cfg.run.seed, 0, acc.process_index))
    s.loaders[0].set_epoch(0)
    trick.on_epoch_start(0)
    steps = []

    def record(module, args, output):  # per step: how many blocks this rank dropped
        steps.append(sum(float(g.dropped) for g in trick.gates) - sum(steps))
    s.raw.register_forward_hook(record)
    metrics = train_epoch(s, 0, tqdm(disable=True))
    s.tracker.end()
    mine = torch.tensor(steps)
    return {"sync_bn": sum(isinstance(m, CpuSyncBatchNorm) for m in norms),
            "plain_bn": sum(not isinstance(m, CpuSyncBatchNorm) for m in norms),
            "decisions": acc.gather(mine.unsqueeze(0)).reshape(acc.num_processes, -1),
            "loss_finite": bool(torch.isfinite(torch.tensor(metrics["train_loss"])))}


if __name__ == "__main__":
    worker(*sys.argv[1:4])
