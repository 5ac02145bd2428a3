"""The head's cosine restarted every period, without re-initialization: RIFLE's learning-rate control.

The official RIFLE code (lixingjian/RIFLE, train.py) offers `fc_lr_util=cyclic`: the fully-connected layer's learning
rate restarts a cosine at each of the K+1 period boundaries (Li, Xiong, An, Xu, Dou, ICML 2020). This method is that
schedule alone, exactly as RIFLE's `head_lr_policy=cyclic` (`schedules.rifle_cyclic_head_lr`, the same periods of
`reinit_times`, the run truncated to a multiple of K+1 epochs by `config.resolve` as for RIFLE, so the control and
RIFLE share one budget), and the head is never re-initialized: `head_reinit` is logged as 0 every epoch, so the
control visibly never resets. RIFLE-cyclic minus this method is the effect of the re-initializations beyond the
restarted head learning rate. The backbone keeps the trainer's cosine.
Refused by `config.resolve`: with rifle (use rifle with head_lr_policy=cyclic instead) and with cyclic_lr (two head
learning-rate policies).
"""
from __future__ import annotations

import math

from ..keys import HEAD_REINIT
from ..schedules import rifle_cyclic_head_lr
from .base import Trick


class HeadLRRestart(Trick):
    @classmethod
    def from_config(cls, cfg):
        return cls(cfg.optim.epochs, cfg.tricks.reinit_times, cfg.optim.head_lr)

    def __init__(self, epochs: int, reinit_times: int, head_lr: float):
        self.cyclic = (epochs, reinit_times, head_lr)

    def lr(self, lrs, progress):
        return dict(lrs, head=rifle_cyclic_head_lr(math.floor(progress), *self.cyclic))  # as Rifle.lr, cyclic

    def on_epoch_end(self, epoch, metrics):
        metrics[HEAD_REINIT] = 0.0
