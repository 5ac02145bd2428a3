"""Train / eval image transforms, applied lazily with `Dataset.with_transform`.

Official RIFLE recipe (lixingjian/RIFLE, train.py): Resize(r) + RandomCrop(size) + horizontal flip for
training; Resize(r) + CenterCrop(size) for evaluation, with the official r for its sizes (224 -> 256,
299 and 300 -> 320) and r = size * 256/224 for any other size. (The official code flips before it
crops; the two orders give the same distribution of images.)
Every image first goes through `scan.to_rgb` (EXIF orientation, 16-bit grey, transparency, CMYK), the
same conversion the pre-training scan checked.

With the decode cache (rifle.data.decode_cache: images stored resized) `build_cached_transform` only crops
and flips uint8 tensors (torchvision.transforms.v2, the same random draws in the same order as the PIL
transforms, so the same crops and flips), and the model normalizes each batch on its device
(models.Classifier.prepare).
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from torchvision import transforms as T

from .scan import to_rgb

OFFICIAL_RESIZE = {224: 256, 299: 320, 300: 320}


def resize_for(image_size: int) -> int:
    """Shorter side before cropping: the official table, else the 256/224 ratio."""
    return OFFICIAL_RESIZE.get(image_size, round(image_size * 256 / 224))


def build_transform(image_size: int, mean, std, train: bool, hflip: bool = True):
    resize = resize_for(image_size)
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


def build_cached_transform(image_size: int, train: bool, hflip: bool = True, fmt: str = "raw"):
    """Crop (random for training, centre for evaluation) and flip the decode cache's uint8 images: CHW uint8."""
    from torchvision.transforms import v2

    steps = ([v2.RandomCrop(image_size)] + ([v2.RandomHorizontalFlip()] if hflip else [])) if train \
        else [v2.CenterCrop(image_size)]
    pipeline = v2.Compose(steps)

    def tensors(batch: dict) -> list[torch.Tensor]:
        if fmt == "raw":  # views of the stored bytes: only the crop is copied (by collate), nothing is written
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # torch: "the given buffer is not writable"
                return [torch.frombuffer(pixels, dtype=torch.uint8).view(*shape).permute(2, 0, 1)
                        for pixels, shape in zip(batch["pixels"], batch["shape"])]
        return [torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1) for im in batch["image"]]

    def apply(batch: dict) -> dict:
        return {"pixel_values": [pipeline(t) for t in tensors(batch)], "label": batch["label"]}
    return apply


def collate(items: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.stack([it["pixel_values"] for it in items]),
            torch.tensor([it["label"] for it in items], dtype=torch.long))
