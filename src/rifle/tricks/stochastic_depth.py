"""Stochastic Depth: residual branches dropped at random during training.

Huang, Sun, Liu, Sedra, Weinberger. "Deep Networks with Stochastic Depth." ECCV 2016.

As in the paper: the residual blocks l = 1..L (input side first) get survival probabilities decaying linearly with
depth, p_l = 1 - (l / L)(1 - p_L) (p_L = `sd_survival_last`, the paper's 0.5), and in training each block's residual
branch f_l is kept or removed by a Bernoulli(p_l) draw, leaving the block's shortcut (identity or projection) alone.
`sd_mode=batch` (default) draws once per block and mini-batch, as the paper does; `sd_mode=sample` draws per example
(timm's and torchvision's drop path / StochasticDepth "row"), a variant offered for comparison. Under several
processes the mini-batch is the global batch, so batch-mode draws come from a generator of the trick seeded each
epoch from (seed, epoch) without the rank (rifle.seeds, stream "depth") and advanced in lockstep (every process runs
the same gates in the same order). Per-sample draws use each process's own stream.
Deviations, stated:
- Scaling: a kept branch is multiplied by 1/p_l in training and the block is left unchanged at evaluation, instead
  of the paper's unscaled training and p_l f_l at test time: the same expected branch, and the evaluated network
  stays the plain pretrained architecture (the saved weights load without this trick).
- A dropped branch is still computed and multiplied by 0, so its parameters get zero gradients (SGD's momentum and
  weight decay still act on them) and every parameter takes part in every step, as distributed data parallel
  requires. The paper's training speed-up is therefore not reproduced. In batch mode the draw is made before the
  block runs, and the BatchNorm layers of a dropped branch (those outside its shortcut) keep their running
  statistics, as the paper's skipped block would; in sample mode every sample passes through them, dropped or not
  (as in timm's and torchvision's drop path).
- Only blocks with a shortcut that bypasses the gated branch count (`residual_blocks`; e.g. 9 of the 16 blocks of
  EfficientNet-Lite0). A drop-path rate the model was built with is replaced. Blocks with two branches
  (transformers) gate each with p_l.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

from ..config import ConfigError
from ..seeds import stream_seed
from .base import Trick

SLOTS = ("drop_path", "drop_path1", "drop_path2", "stochastic_depth")
SHORTCUTS = ("downsample", "shortcut", "conv_skip")  # a block's shortcut modules (torchvision, timm)


def survival_probs(num_blocks: int, p_last: float) -> list[float]:
    """p_l = 1 - (l / L)(1 - p_L) for l = 1..L (Huang et al. 2016, Eq. 4)."""
    if num_blocks < 1:
        raise ValueError("stochastic depth needs at least one residual block")
    if not 0.0 < p_last <= 1.0:
        raise ValueError(f"p_L must be in (0, 1], got {p_last}")
    return [1.0 - (l / num_blocks) * (1.0 - p_last) for l in range(1, num_blocks + 1)]


def branch_gate(branch: torch.Tensor, survival: float, per_sample: bool,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | int, int]:
    """(branch * b / p, number dropped, number drawn) with b ~ Bernoulli(p) per batch or per sample."""
    if per_sample:
        shape = (branch.shape[0],) + (1,) * (branch.dim() - 1)
        keep = (torch.rand(shape, generator=generator, device=branch.device) < survival).to(branch.dtype)
        return branch * (keep / survival), (keep == 0).sum(), shape[0]
    # One draw from the CPU generator: no device round trip to decide.
    keep = bool(torch.rand((), generator=generator) < survival)
    return branch * (1.0 / survival if keep else 0.0), int(not keep), 1


class BranchGate(nn.Module):
    """Gates one residual branch; no parameters or buffers, so state-dict keys are unchanged. In batch mode with
    `norms` (the branch's BatchNorm layers), `before_block` draws the decision and, for a dropped branch, sets
    their momentum to 0 so the block's forward leaves their running statistics as they were; `after_block`
    restores them."""

    def __init__(self, survival: float, per_sample: bool, generator: torch.Generator | None = None,
                 norms: tuple = ()):
        super().__init__()
        self.survival, self.per_sample = survival, per_sample
        self.generator = generator  # batch mode: shared by all gates, the same sequence on every process
        self.norms, self.keep, self.saved = norms, None, []
        self.dropped: torch.Tensor | int = 0
        self.drawn = 0

    def active(self) -> bool:
        return self.training and self.survival < 1.0

    def before_block(self, module, args) -> None:
        if not self.active() or self.per_sample:
            return
        # The same draw, in the same order, as at the branch's output: one per gate, blocks in forward order.
        self.keep = bool(torch.rand((), generator=self.generator) < self.survival)
        if not self.keep:
            self.saved = [bn.momentum for bn in self.norms]
            for bn in self.norms:
                bn.momentum = 0.0  # running = (1 - 0) * running + 0 * batch statistic

    def after_block(self, module, args, output) -> None:
        for bn, momentum in zip(self.norms, self.saved):
            bn.momentum = momentum
            if bn.num_batches_tracked is not None:
                bn.num_batches_tracked.sub_(1)  # the forward counted a batch it did not use
        self.saved, self.keep = [], None

    def forward(self, branch: torch.Tensor) -> torch.Tensor:
        if not self.active():
            return branch
        if self.keep is not None:  # decided before the block
            out, dropped, drawn = branch * (1.0 / self.survival if self.keep else 0.0), int(not self.keep), 1
        else:
            out, dropped, drawn = branch_gate(branch, self.survival, self.per_sample,
                                              None if self.per_sample else self.generator)
        self.dropped = self.dropped + dropped
        self.drawn += drawn
        return out

    def extra_repr(self) -> str:
        return f"survival={self.survival:.4f}, per_sample={self.per_sample}"


def _gate_output(gate: BranchGate, module, args, output):
    return gate(output)


def residual_blocks(backbone: nn.Module) -> list[tuple[str, nn.Module, list[str]]]:
    """(name, block, where to gate) for every residual block, input side first.

    Where to gate: "bn2"/"bn3" for torchvision ResNet blocks (their branch ends in that BatchNorm, before the
    addition), else the drop-path slots (SLOTS) of torchvision MBConv/ConvNeXt and timm blocks, skipping blocks
    without a skip connection (timm's `has_skip`, torchvision's `use_res_connect`).
    """
    from torchvision.models.resnet import BasicBlock, Bottleneck

    found = []
    for name, module in backbone.named_modules():
        if isinstance(module, (BasicBlock, Bottleneck)):
            found.append((name, module, ["bn2" if isinstance(module, BasicBlock) else "bn3"]))
        else:
            slots = [s for s in SLOTS if hasattr(module, s) and _is_slot(getattr(module, s))]
            has_skip = getattr(module, "has_skip", getattr(module, "use_res_connect", True))
            if slots and has_skip:
                found.append((name, module, slots))
    return found


def _is_slot(value) -> bool:
    """A drop-path slot: empty, identity, or an existing drop path (timm DropPath, torchvision StochasticDepth)."""
    return value is None or isinstance(value, (nn.Identity, BranchGate)) or type(value).__name__ in (
        "DropPath", "StochasticDepth")


def install_gates(backbone: nn.Module, p_last: float, per_sample: bool,
                  generator: torch.Generator | None = None) -> list[BranchGate]:
    """Gates on every residual block; batch-mode gates draw from `generator` (None: the global one)."""
    blocks = residual_blocks(backbone)
    if not blocks:
        raise ConfigError("model", f"stochastic_depth needs residual blocks, and {type(backbone).__name__} "
                          "has none it can gate (supported: torchvision ResNet BasicBlock/Bottleneck, "
                          "torchvision MBConv/ConvNeXt blocks, timm blocks with a skip connection and a "
                          "drop-path slot)")
    gates = []
    for (name, block, where), p in zip(blocks, survival_probs(len(blocks), p_last)):
        # One branch per block (not a transformer's two): its BatchNorm layers, those of the shortcut aside.
        norms = () if len(where) > 1 else tuple(
            m for n, m in block.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats and not n.split(".")[0] in SHORTCUTS)
        for k, slot in enumerate(where):
            gate = BranchGate(p, per_sample, generator, norms)
            if norms:
                block.register_forward_pre_hook(gate.before_block)
                block.register_forward_hook(gate.after_block)
            if slot in ("bn2", "bn3"):
                block.add_module(f"sd_gate{k}", gate)
                # functools.partial keeps the hook tied to the copied gate under copy.deepcopy.
                getattr(block, slot).register_forward_hook(partial(_gate_output, gate))
            else:
                setattr(block, slot, gate)
            gates.append(gate)
    return gates


class StochasticDepth(Trick):
    metrics = ("stochastic_depth/skip_rate",)

    @classmethod
    def from_config(cls, cfg):
        t = cfg.tricks
        return cls(p_last=t.sd_survival_last, per_sample=t.sd_mode == "sample", seed=cfg.run.seed)

    def __init__(self, p_last: float, per_sample: bool, seed: int):
        self.p_last, self.per_sample, self.seed = p_last, per_sample, seed
        self.generator = torch.Generator()  # batch-mode decisions (CPU: no device round trip to decide)

    def prepare_model(self, model: nn.Module) -> None:
        self.gates = install_gates(model.backbone, self.p_last, self.per_sample, self.generator)

    def on_epoch_start(self, epoch):
        # Seeded per epoch, so a resumed run draws what the uninterrupted one drew.
        self.generator.manual_seed(stream_seed(self.seed, epoch, purpose="depth"))
        for g in self.gates:
            g.dropped, g.drawn = 0, 0

    def on_epoch_end(self, epoch, metrics):
        for g in self.gates:
            self.meter.add("stochastic_depth/skip_rate", g.dropped, g.drawn)
