"""Train / eval image transforms, applied lazily with `Dataset.with_transform`.

Official RIFLE recipe scaled to any size: Resize(size * 256/224) + RandomCrop(size) + horizontal flip
for training; Resize(size * 256/224) + CenterCrop(size) for evaluation (256/224 at the paper's 224 px).
Every image first goes through `scan.to_rgb` (EXIF orientation, 16-bit grey, transparency, CMYK), the
same conversion the pre-training scan checked.
"""
from __future__ import annotations

import torch
from torchvision import transforms as T

from .scan import to_rgb


def build_transform(image_size: int, mean, std, train: bool, hflip: bool = True):
    resize = round(image_size * 256 / 224)
    steps = [T.Resize(resize)]
    if train:
        steps += [T.RandomCrop(image_size)] + ([T.RandomHorizontalFlip()] if hflip else [])
    else:
        steps += [T.CenterCrop(image_size)]
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    pipeline = T.Compose(steps)

    def apply(batch: dict) -> dict:
        return {"pixel_values": [pipeline(to_rgb(im)) for im in batch["image"]], "label": batch["label"]}
    return apply


def collate(items: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.stack([it["pixel_values"] for it in items]),
            torch.tensor([it["label"] for it in items], dtype=torch.long))
