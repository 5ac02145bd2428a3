"""Decode once: every image of a dataset stored resized, so that no epoch, seed, method or worker decodes a
JPEG again (the recipe of FFCV, DALI and fast ImageNet training, on Hugging Face Datasets' own `map`).

`cached(ds, short_side, fmt)` maps each split once: the image is decoded, converted to RGB (scan.to_rgb) and
resized so its shorter side is `short_side` (transforms.resize_for: the trainer's own T.Resize, so the same
pixels), then kept as raw uint8 (`raw`: HWC bytes and shape) or re-encoded as JPEG at `JPEG_QUALITY`
(`jpeg`: about a twelfth of the disk at 224 px, one cheap decode of the small image per use). The result is
an Arrow file in `rifle_decode/` of datasets' cache (hf.cache_dir: $HF_DATASETS_CACHE, else $HF_HOME/datasets)
named by a hash of what it depends on: the split's datasets fingerprint (it changes with any file, the revision,
the selection of images or the subset), the size, the format and its quality, PIL's version and this module's
VERSION; a later run, seed, method or worker reads it ready.
The image scan and the run's dataset fingerprint are computed on the source, before this.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import datasets
import numpy as np

from . import hf

FORMATS = ("raw", "jpeg")
JPEG_QUALITY = 90
VERSION = 1  # bump when what is stored changes, so old files are not read
CACHE = "rifle_decode"  # the decoded images' folder under datasets' cache (hf.cache_dir)


def cache_key(part: datasets.Dataset, short_side: int, fmt: str) -> str:
    import PIL
    key = {"fingerprint": part._fingerprint, "rows": len(part), "short_side": short_side, "format": fmt,
           "quality": JPEG_QUALITY if fmt == "jpeg" else None, "pil": PIL.__version__, "version": VERSION}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def resize_batch(batch: dict, short_side: int, fmt: str) -> dict:
    """The map function: images -> resized uint8 (raw bytes and shape) or JPEG bytes."""
    from torchvision import transforms as T

    from .scan import to_rgb
    resize = T.Resize(short_side)  # the trainer's resize (transforms.build_transform)
    out = {"pixels": [], "shape": []} if fmt == "raw" else {"image": []}
    for im in batch["image"]:
        small = resize(to_rgb(im))
        if fmt == "raw":
            a = np.asarray(small, dtype=np.uint8)
            out["pixels"].append(a.tobytes())
            out["shape"].append(list(a.shape))
        else:
            buf = io.BytesIO()
            small.save(buf, format="JPEG", quality=JPEG_QUALITY)
            out["image"].append({"bytes": buf.getvalue(), "path": None})
    return out


def cached(ds: datasets.DatasetDict, short_side: int, fmt: str, cache_dir: str | Path | None = None,
           num_proc: int | None = None) -> datasets.DatasetDict:
    """`ds` with its images resized once (module docstring): columns pixels and shape (raw) or image (jpeg),
    and label."""
    if fmt not in FORMATS:
        raise ValueError(f"decode_cache: one of off, {', '.join(FORMATS)}, got {fmt!r}")
    root = Path(cache_dir) if cache_dir else hf.cache_dir(CACHE)
    root.mkdir(parents=True, exist_ok=True)
    with hf.quiet_progress():  # a bar per split would bury the one line per epoch in logs
        return datasets.DatasetDict({split: _cached_split(part, short_side, fmt, root, num_proc)
                                     for split, part in ds.items()})


def _cached_split(part: datasets.Dataset, short_side: int, fmt: str, root: Path, num_proc) -> datasets.Dataset:
    kept = {"label": part.features["label"]}
    features = datasets.Features(({"pixels": datasets.Value("binary"),
                                   "shape": datasets.Sequence(datasets.Value("int32"), length=3)}
                                  if fmt == "raw" else {"image": datasets.Image()}) | kept)
    return part.map(resize_batch, batched=True, batch_size=64, fn_kwargs={"short_side": short_side, "fmt": fmt},
                    remove_columns=[c for c in part.column_names if c not in kept], features=features,
                    cache_file_name=str(root / f"{cache_key(part, short_side, fmt)}.arrow"),
                    load_from_cache_file=True, num_proc=num_proc or None,
                    desc=f"decode cache ({fmt}, short side {short_side})")


def to_array(row_pixels: bytes, shape) -> np.ndarray:
    """A raw cached image as an HWC uint8 array."""
    return np.frombuffer(row_pixels, dtype=np.uint8).reshape(shape)
