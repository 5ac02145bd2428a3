"""Synchronized BatchNorm (--sync_bn): batch statistics over the global batch of all processes.

Under several processes each one normalizes with the statistics of its own shard of the batch; with
synchronization every BatchNorm layer uses the mean and variance of the whole global batch, as one
process with the global batch would (Peng et al., "MegDet: A Large Mini-Batch Object Detector", CVPR
2018, Sec. 3.3, cross-GPU batch normalization).

GPUs use torch.nn.SyncBatchNorm through timm's converter, which also converts timm's BatchNormAct2d
(norm and activation in one module, as in EfficientNet-Lite0) keeping its activation; torch's own
converter would drop it. torch.nn.SyncBatchNorm refuses CPU tensors under torch.distributed ("SyncBatchNorm
expected input tensor to be on GPU ...", and DDP: "SyncBatchNorm layers only work with GPU modules"), so
CPU processes (gloo) get `CpuSyncBatchNorm`: the same statistics reduced with
torch.distributed.nn.functional.all_reduce, which is differentiable (its backward all-reduces the
gradient), so gradients flow through the other processes' statistics as in torch's SyncBatchNorm.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class CpuSyncBatchNorm(_BatchNorm):
    """BatchNorm over the global batch of all processes, computed with differentiable all_reduce (CPU).

    Two passes (global mean, then the global mean squared deviation) rather than E[x^2] - E[x]^2, which
    cancels badly when the mean is large against the spread. Running statistics are updated as
    nn.BatchNorm does: the unbiased variance over the global count, momentum or cumulative average.
    In evaluation, or with one process, it is plain BatchNorm.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        distributed = dist.is_available() and dist.is_initialized()
        group = self.process_group or (dist.group.WORLD if distributed else None)
        if not self.training or not distributed or dist.get_world_size(group) == 1:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        self._check_input_dim(x)
        dims = [0] + list(range(2, x.dim()))
        shape = (1, -1) + (1,) * (x.dim() - 2)
        xf = x.float()
        # The per-channel sums and the count travel in float64: the count stays exact on large batches.
        local_count = torch.tensor([x.numel() // x.shape[1]], dtype=torch.float64, device=x.device)
        summed = all_reduce(torch.cat([xf.sum(dims).double(), local_count]), group=group)
        count = summed[-1]
        mean = (summed[:-1] / count).float()
        centred = xf - mean.view(shape)
        var = (all_reduce(centred.pow(2).sum(dims).double(), group=group) / count).float()
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * float(count / (count - 1).clamp(min=1))
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        return out.to(x.dtype)


class CpuSyncBatchNormAct(CpuSyncBatchNorm):
    """timm's BatchNormAct2d with CpuSyncBatchNorm's statistics: normalize, then its `drop` and `act`
    (as timm's SyncBatchNormAct does after nn.SyncBatchNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


def _cpu_convert(module: nn.Module) -> nn.Module:
    """timm's convert_sync_batchnorm (timm/layers/norm_act.py) with the CPU classes."""
    from timm.layers import BatchNormAct2d

    out = module
    if isinstance(module, _BatchNorm):
        cls = CpuSyncBatchNormAct if isinstance(module, BatchNormAct2d) else CpuSyncBatchNorm
        out = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
    for name, child in module.named_children():  # BatchNormAct2d's act and drop come along here
        out.add_module(name, _cpu_convert(child))
    return out


def convert_sync_batchnorm(model: nn.Module, cpu: bool) -> nn.Module:
    """`model` with every BatchNorm synchronized (the CPU version when `cpu`), holding the same parameter
    and buffer tensors. Call it before hooks are put on BatchNorm modules: the modules are replaced."""
    if cpu:
        return _cpu_convert(model)
    from timm.layers import convert_sync_batchnorm as timm_convert
    return timm_convert(model)
