"""A trick from outside the package, as a user would write one: its options in its own file, registered with
one line (`rifle.tricks.register`). It shifts every training label by `toy_shift` classes: the loss then
trains towards the wrong class, which the test can see."""
from __future__ import annotations

from dataclasses import dataclass

from rifle.config import opt
from rifle.tricks.base import Trick


@dataclass
class ToyOptions:
    toy_shift: int = opt(0, "toy: classes every training label is shifted by", minimum=0)


class Toy(Trick):
    metrics = ("toy/shifted",)

    def __init__(self, shift: int):
        self.shift = shift

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg.extra.get("toy_shift", 0))

    def before_loss(self, logits, labels):
        self.meter.add("toy/shifted", labels.numel() if self.shift % logits.shape[1] else 0, labels.numel())
        return (labels + self.shift) % logits.shape[1]
