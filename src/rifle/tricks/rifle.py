"""RIFLE: periodic re-initialization of the fully-connected head.

Li, Xiong, An, Xu, Dou. "RIFLE: Backpropagation in Depth for Deep Transfer Learning through Re-Initializing the
Fully-connected LayEr." ICML 2020.

Faithful to the official code (lixingjian/RIFLE, train.py):
- K = `reinit_times` re-initializations split the run into K+1 equal periods; the run is truncated to a multiple
  of K+1 epochs (`config.resolve`, which also gives the re-init epochs);
- after the validation pass of epoch e with (e+1) % period == 0, the head is reset in place with PyTorch's default
  `nn.Linear` initialization (weight and bias); backbone and BN statistics untouched;
- SGD momentum buffers are kept (official), or zeroed with `reset_head_momentum`;
- head learning rate `follow` (the backbone's cosine) or `cyclic` (a cosine restarted every period).
Deviations, each stated: no reset after the final epoch (it cannot affect the result); the new weights are drawn
from a generator seeded by (seed, re-init index), identical on every process (the official code is single-GPU;
under DDP a per-process draw would silently diverge, as DDP never re-broadcasts). `reinit_guard_epochs` only
refuses a configuration (config.resolve). The Paddle port (haozhe-an/RIFLE-Paddle-Implementation) differs and
is not reproduced: it trains all E epochs (no truncation), skips a re-init after epoch e > E - 5, and draws the
new weights from N(0, 2/fan_in).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config import reinit_epochs
from ..schedules import rifle_cyclic_head_lr
from ..track.keys import HEAD_REINIT
from .base import Trick


def reinit_linear_(head: nn.Linear, seed: int) -> None:
    """Reset `head` in place to a fresh default nn.Linear init drawn from `seed` (same on every process)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None)
    with torch.no_grad():
        head.weight.copy_(fresh.weight)
        if head.bias is not None:
            head.bias.copy_(fresh.bias)


def reinit_seed(run_seed: int, index: int) -> int:
    """Generator seed of the `index`-th re-init (1-based) of a run: the same on every process."""
    return run_seed * 100_003 + 7919 * index


def params_checksum(module: nn.Module) -> torch.Tensor:
    """Two float64 numbers that differ if any parameter differs (sum and position-weighted sum)."""
    flat = torch.cat([p.detach().cpu().reshape(-1) for p in module.parameters()]).double()
    return torch.stack([flat.sum(), (flat * torch.arange(1, flat.numel() + 1, dtype=torch.float64)).sum() * 1e-6])


class Rifle(Trick):
    """Re-initializes the head after each epoch of `reinit_epochs` (config.reinit_epochs); with
    `head_lr_policy="cyclic"` the head's cosine restarts every one of the reinit_times + 1 periods."""

    @classmethod
    def from_config(cls, cfg):
        t, o = cfg.tricks, cfg.optim
        return cls(reinit_epochs(cfg), cfg.run.seed, o.epochs, t.reinit_times, o.head_lr, t.head_lr_policy,
                   t.reset_head_momentum)

    def __init__(self, reinit_epochs: list[int], seed: int, epochs: int, reinit_times: int, head_lr: float,
                 head_lr_policy: str = "follow", reset_momentum: bool = False):
        self.schedule, self.seed, self.reset_momentum = set(reinit_epochs), seed, reset_momentum
        self.cyclic = (epochs, reinit_times, head_lr) if head_lr_policy == "cyclic" else None
        self.done = 0  # re-inits so far (part of the resumable state)

    def on_fit_start(self, ctx):
        self.model, self.optimizer, self.accelerator = ctx.model, ctx.optimizer, ctx.accelerator

    def lr(self, lrs, progress):
        return lrs if self.cyclic is None else dict(lrs, head=rifle_cyclic_head_lr(math.floor(progress), *self.cyclic))

    def on_epoch_end(self, epoch, metrics):
        metrics[HEAD_REINIT] = float(epoch in self.schedule)
        if epoch not in self.schedule:
            return
        head = self.model.head
        reinit_linear_(head, seed=reinit_seed(self.seed, self.done + 1))
        if self.reset_momentum:
            for p in head.parameters():
                buf = self.optimizer.state.get(p, {}).get("momentum_buffer")
                if buf is not None:
                    buf.zero_()
        self.done += 1
        # Prove the invariant every process relies on: identical weights after the reset.
        acc = self.accelerator
        sums = acc.gather(params_checksum(self.model).to(acc.device).unsqueeze(0)).cpu()
        spread = float((sums - sums[0]).abs().max())
        if spread > 1e-6 * float(sums[0].abs().max().clamp(min=1.0)):
            raise RuntimeError(f"processes hold different weights after re-init {self.done} (epoch {epoch})")
        metrics["reinit_weight_spread"] = spread

    def state_dict(self):
        return {"done": self.done}

    def load_state_dict(self, state):
        self.done = int(state.get("done", 0))
