"""Observers that change nothing: how far each backbone block moved from its pretrained weights."""
from __future__ import annotations

import torch
from torch import nn


def snapshot(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copy of the backbone's parameters (the pretrained reference)."""
    return {name: p.detach().to("cpu", copy=True) for name, p in backbone.named_parameters()}


def block_of(name: str, blocks: list[str]) -> str | None:
    """The block (from `models.block_names`) a parameter name belongs to, or None (e.g. the head)."""
    return next((b for b in blocks if name == b or name.startswith(b + ".")), None)


def weight_distances(backbone: nn.Module, reference: dict[str, torch.Tensor], blocks: list[str]) -> dict[str, float]:
    """`weight_dist/<block>`: L2 distance of the block's parameters to the reference, per block."""
    sq = dict.fromkeys(blocks, 0.0)
    with torch.no_grad():
        for name, p in backbone.named_parameters():
            block = block_of(name, blocks)
            if block is not None:
                sq[block] += float((p.detach().float().cpu() - reference[name].float()).pow(2).sum())
    return {f"weight_dist/{b}": v ** 0.5 for b, v in sq.items()}


class GradNorms:
    """`grad_norm/<block>`: the L2 norm of each backbone block's gradient, averaged over an epoch's optimizer
    steps, plus the same over short windows around each head re-initialization:
    `grad_norm_pre_reinit/<block>` over the last `window` steps of the epoch that ends with a re-init
    (logged at that epoch) and `grad_norm_post_reinit/<block>` over the first `window` steps of the next
    epoch (logged at it), so the spike or dip a fresh head causes is visible as post / pre.

    Observe only: read after backward, before the optimizer step, on the gradients of the step the
    optimizer takes (with accumulation, the summed micro-batches). Under several processes DDP has already
    averaged the gradients over processes, so every process measures the same global-batch gradient and
    nothing more is reduced; the main process's values are logged. Under fp16 the loss scale is divided out.
    Kept on the device, one `_foreach_norm` per step: no host sync until the epoch ends.
    """

    def __init__(self, backbone: nn.Module, blocks: list[str], window: int):
        named = [(block_of(n, blocks), p) for n, p in backbone.named_parameters() if p.requires_grad]
        named = [(b, p) for b, p in named if b is not None]
        self.blocks, self.window = blocks, window
        self.params = [p for _, p in named]
        self.index = torch.tensor([blocks.index(b) for b, _ in named])
        self.post_reinit = False

    def start_epoch(self, after_reinit: bool) -> None:
        """`after_reinit`: the previous epoch ended with a re-init (known from the run's history on resume)."""
        self.steps: list[torch.Tensor] = []
        self.post_reinit = after_reinit

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

    def end_epoch(self, reinit: bool) -> dict[str, float]:
        """The epoch's metrics; `reinit`: this epoch ended with a head re-initialization."""
        if not self.steps:
            return {}
        steps = torch.stack(self.steps).cpu()
        out = dict(zip((f"grad_norm/{b}" for b in self.blocks), steps.mean(0).tolist()))
        if self.post_reinit and self.window:
            out |= dict(zip((f"grad_norm_post_reinit/{b}" for b in self.blocks), steps[:self.window].mean(0).tolist()))
        if reinit and self.window:
            out |= dict(zip((f"grad_norm_pre_reinit/{b}" for b in self.blocks), steps[-self.window:].mean(0).tolist()))
        return out
