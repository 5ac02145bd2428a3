"""Observers that change nothing: how far each backbone block moved from its pretrained weights."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .callbacks import Callback
from .keys import GRAD, POST, PRE, WEIGHT, block_metric


def snapshot(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copy of the backbone's parameters (the pretrained reference)."""
    return {name: p.detach().to("cpu", copy=True) for name, p in backbone.named_parameters()}


def block_of(name: str, blocks: list[str]) -> str | None:
    """The block (from `models.block_names`) a parameter name belongs to, or None (e.g. the head)."""
    return next((b for b in blocks if name == b or name.startswith(b + ".")), None)


def weight_distances(backbone: nn.Module, reference: dict[str, torch.Tensor], blocks: list[str]) -> dict[str, float]:
    """`weight_dist/<block>`: L2 distance of the block's parameters to the reference, per block."""
    sq = dict.fromkeys(blocks, 0.0)
    for name, p in backbone.named_parameters():
        block = block_of(name, blocks)
        if block is not None:
            sq[block] += float((p.detach().float().cpu() - reference[name].float()).pow(2).sum())
    return {block_metric(WEIGHT, b): v ** 0.5 for b, v in sq.items()}


class BlockProbe(Callback):
    """An observe-only callback of `trainer.fit`. Per epoch: `weight_dist/<block>` (weight_distances) and
    `grad_norm/<block>`, the L2 norm of each backbone block's gradient averaged over the epoch's optimizer
    steps; around each period boundary (after the epochs in `boundaries`: the trainer gives those of (epochs,
    reinit_times), schedules.period_boundaries, for every method, where RIFLE re-initializes its head) the same
    over the last `window` steps of the epoch that ends there (`grad_norm_pre_reinit/<block>`) and the first
    `window` steps of the next (`grad_norm_post_reinit/<block>`), so the effect of a fresh head shows as RIFLE's
    post / pre beside plain fine-tuning's at the same boundary (rifle.evidence.mechanism).

    Gradients are read after backward, before the optimizer step (with accumulation, the summed micro-batches;
    under DDP already averaged, so every process measures the same global-batch gradient; under fp16 the loss
    scale is divided out). Kept on the device, one `_foreach_norm` per step: no host sync until the epoch ends.
    """

    def __init__(self, backbone: nn.Module, blocks: list[str], reference: dict[str, torch.Tensor],
                 window: int = 0, boundaries: Iterable[int] = ()):
        named = [(block_of(n, blocks), p) for n, p in backbone.named_parameters() if p.requires_grad]
        named = [(b, p) for b, p in named if b is not None]
        self.backbone, self.blocks, self.reference, self.window = backbone, blocks, reference, window
        self.boundaries = set(boundaries)
        self.params = [p for _, p in named]
        self.index = torch.tensor([blocks.index(b) for b, _ in named])
        self.steps: list[torch.Tensor] = []

    def on_epoch_start(self, epoch: int) -> None:
        self.steps = []

    @torch.no_grad()
    def after_backward(self, scale: float = 1.0) -> None:
        grads = [p.grad for p in self.params]
        if any(g is None for g in grads):  # e.g. a frozen-branch step of stochastic depth: zero gradient
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads)]
        norms = torch.stack(torch._foreach_norm(grads)).float()
        if self.index.device != norms.device:  # once: no host-to-device copy per step
            self.index = self.index.to(norms.device)
        sq = torch.zeros(len(self.blocks), device=norms.device).index_add_(0, self.index, norms ** 2)
        self.steps.append(sq.sqrt() / scale)

    def on_epoch_metrics(self, epoch: int, metrics: dict[str, float]) -> None:
        metrics |= weight_distances(self.backbone, self.reference, self.blocks) | self.grad_norms(epoch)

    def grad_norms(self, epoch: int) -> dict[str, float]:
        if not self.steps:
            return {}
        steps = torch.stack(self.steps).cpu()
        windows = {GRAD: steps}
        if self.window and epoch - 1 in self.boundaries:
            windows[POST] = steps[:self.window]
        if self.window and epoch in self.boundaries:
            windows[PRE] = steps[-self.window:]
        return {block_metric(prefix, b): v for prefix, rows in windows.items()
                for b, v in zip(self.blocks, rows.mean(0).tolist())}
