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
