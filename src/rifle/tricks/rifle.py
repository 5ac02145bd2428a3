"""RIFLE: periodic re-initialization of the fully-connected head.

Li, Xiong, An, Xu, Dou. "RIFLE: Backpropagation in Depth for Deep Transfer Learning through Re-Initializing the
Fully-connected LayEr." ICML 2020.

Faithful to the official code (lixingjian/RIFLE, train.py):
- K = `reinit_times` re-initializations split the run into K+1 equal periods; the run is truncated to a multiple
  of K+1 epochs (`config.resolve`, which also gives the re-init epochs);
- after the validation pass of epoch e with (e+1) % period == 0, the head is reset in place with PyTorch's default
  `nn.Linear` initialization (weight and bias; `reinit_init=default`); backbone and BN statistics untouched;
- SGD momentum buffers are kept (official), or zeroed with `reset_head_momentum`;
- head learning rate `follow` (the backbone's cosine) or `cyclic` (a cosine restarted every period; the official
  `fc_lr_util=cyclic`, also the method `head_lr_restart` without any re-init, its control).
Logged at an epoch that ends with a re-init: `head_reinit` 1 (else 0), `head_norm_pre_reinit` and
`head_norm_post_reinit` (Frobenius norm of the head's weight just before and just after the reset), and
`reinit_weight_spread`.
`reinit_init=he_normal` draws the new head as the Paddle port does (haozhe-an/RIFLE-Paddle-Implementation,
fine_tuning/run.py: every parameter named 'fc' set to np.random.normal(0, sqrt(2 / shape[0]))): weight ~ N(0, 2 /
fan_in) (Paddle stores the weight as [in, out], so shape[0] is fan_in) and bias ~ N(0, 2 / out_features) (the bias's
shape[0] is the number of classes).
Deviations, each stated: no reset after the final epoch (it cannot affect the result); the new weights are drawn
from a generator seeded by (seed, re-init index), identical on every process (the official code is single-GPU;
under DDP a per-process draw would silently diverge, as DDP never re-broadcasts; the Paddle port draws from numpy's
global stream). `reinit_guard_epochs` only refuses a configuration (config.resolve). The rest of the Paddle port is
not reproduced: it trains all E epochs (no truncation) and skips a re-init after epoch e > E - 5.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config import REINIT_INITS, reinit_epochs
from ..keys import HEAD_NORM_POST, HEAD_NORM_PRE, HEAD_REINIT, REINIT_WEIGHT_SPREAD
from ..schedules import rifle_cyclic_head_lr
from ..seeds import reinit_seed
from .base import Trick


def reinit_linear_(head: nn.Linear, seed: int, init: str = "default") -> None:
    """Reset `head` in place from `seed` (the same on every process): `default`, a fresh nn.Linear's own init
    (reset_parameters, drawn from the global generator forked and seeded), or `he_normal`, the Paddle port's
    weight ~ N(0, 2 / fan_in) and bias ~ N(0, 2 / out_features), drawn from a generator seeded the same way."""
    if init == "default":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fresh = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None)
        weight, bias = fresh.weight, fresh.bias
    elif init == "he_normal":
        g = torch.Generator().manual_seed(seed)  # the stream torch.manual_seed(seed) starts too
        weight = torch.randn(head.weight.shape, generator=g) * math.sqrt(2.0 / head.in_features)
        bias = torch.randn(head.out_features, generator=g) * math.sqrt(2.0 / head.out_features)
    else:
        raise ValueError(f"reinit_init: got {init!r}, allowed: {', '.join(REINIT_INITS)}")
    with torch.no_grad():
        head.weight.copy_(weight)
        if head.bias is not None:
            head.bias.copy_(bias)


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
                   t.reset_head_momentum, t.reinit_init)

    def __init__(self, reinit_epochs: list[int], seed: int, epochs: int, reinit_times: int, head_lr: float,
                 head_lr_policy: str = "follow", reset_momentum: bool = False, init: str = "default"):
        if init not in REINIT_INITS:
            raise ValueError(f"reinit_init: got {init!r}, allowed: {', '.join(REINIT_INITS)}")
        self.schedule, self.seed, self.reset_momentum, self.init = set(reinit_epochs), seed, reset_momentum, init
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
        metrics[HEAD_NORM_PRE] = float(head.weight.detach().float().norm())
        reinit_linear_(head, seed=reinit_seed(self.seed, self.done + 1), init=self.init)
        metrics[HEAD_NORM_POST] = float(head.weight.detach().float().norm())
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
        metrics[REINIT_WEIGHT_SPREAD] = spread

    def state_dict(self):
        return {"done": self.done}

    def load_state_dict(self, state):
        self.done = int(state.get("done", 0))
