"""Target datasets as a Hugging Face `DatasetDict` with splits train / val / test and columns
`image` (PIL) and `label` (ClassLabel).

Sources: the built-in offline `digits` (scikit-learn's handwritten digits), an ImageFolder in the
official RIFLE layout (`root/train/<class>/*`, `root/test/<class>/*`), a `save_to_disk` folder, and a
Hugging Face Hub dataset (`owner/name` or `hub:<id>`; `hub:<local folder>` takes the same code path for a
folder laid out like a Hub repository, e.g. `data/train-00000-of-00001.parquet`).

Validation is carved from train (seeded, stratified) when the source has none, and the k-shot subset is
drawn from what remains of train: test images never influence training or selection.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import datasets
import numpy as np
from datasets import ClassLabel, DatasetDict

VAL_NAMES = ("val", "validation", "valid", "dev")


class DataError(ValueError):
    """Bad dataset content, named by dataset, split and column."""


def digits_source(split_seed: int = 0) -> DatasetDict:
    """scikit-learn's 1,797 handwritten 8x8 digits as RGB images; half of each class is the test set."""
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = (bunch.images * (255.0 / 16.0)).round().astype(np.uint8)
    images = [Image.fromarray(p, mode="L").convert("RGB") for p in pixels]
    features = datasets.Features({"image": datasets.Image(),
                                  "label": ClassLabel(names=[str(d) for d in range(10)])})
    full = datasets.Dataset.from_dict({"image": images, "label": bunch.target.tolist()}, features=features)
    # The train/test division is fixed (seed 0) whatever split_seed is, so test sets are comparable.
    parts = full.train_test_split(test_size=0.5, stratify_by_column="label", seed=0)
    return DatasetDict(train=parts["train"], test=parts["test"])


def load_source(spec: str, revision: str | None = None) -> DatasetDict:
    if spec == "digits":
        return digits_source()
    if spec.startswith("imagefolder:"):
        root = Path(spec[len("imagefolder:"):])
        if not (root / "train").is_dir():
            raise DataError(f"dataset {spec}: expected the layout root/train/<class>/*, root/test/<class>/*; "
                            f"{root / 'train'} is missing")
        classes = [p.name for p in (root / "train").iterdir() if p.is_dir()]
        if len(classes) < 2:  # the imagefolder builder silently drops labels below two folders
            raise DataError(f"dataset {spec}: a classifier needs at least 2 classes, found {len(classes)} "
                            f"class folder(s) in {root / 'train'}")
        return datasets.load_dataset("imagefolder", data_dir=str(root))
    if spec.startswith("disk:"):
        loaded = datasets.load_from_disk(spec[len("disk:"):])
        if not isinstance(loaded, DatasetDict):
            raise DataError(f"dataset {spec}: expected a DatasetDict with splits, found a single Dataset")
        return loaded
    hub_id = spec[len("hub:"):] if spec.startswith("hub:") else spec
    try:
        return datasets.load_dataset(hub_id, revision=revision)
    except (ConnectionError, FileNotFoundError, ValueError) as e:
        raise DataError(f"dataset {spec}: cannot load {hub_id!r} ({type(e).__name__}: {e}); offline, use a "
                        "cached copy with HF_DATASETS_OFFLINE=1, or imagefolder:/disk:") from None


def _normalize_columns(ds: DatasetDict, spec: str, image_column: str, label_column: str) -> DatasetDict:
    for split, part in ds.items():
        for wanted, role in ((image_column, "image"), (label_column, "label")):
            if wanted not in part.column_names:
                raise DataError(f"dataset {spec}, split {split}: no {role} column {wanted!r} "
                                f"(columns: {', '.join(part.column_names)}); set --{role}_column")
    if image_column != "image" or label_column != "label":
        ds = ds.rename_columns({c: n for c, n in ((image_column, "image"), (label_column, "label")) if c != n})
    ds = ds.select_columns(["image", "label"])
    if not isinstance(ds["train"].features["label"], ClassLabel):
        # Integer or string labels: one class list over all splits, so ids agree between splits.
        names = sorted({str(v) for part in ds.values() for v in part["label"]},
                       key=lambda v: (not v.lstrip("-").isdigit(), int(v) if v.lstrip("-").isdigit() else 0, v))
        label = ClassLabel(names=names)
        ds = ds.cast_column("label", datasets.Value("string")).cast_column("label", label)
    feature = ds["train"].features["image"]
    if (isinstance(feature, dict) and "bytes" in feature) or getattr(feature, "dtype", None) == "string":
        ds = ds.cast_column("image", datasets.Image())  # parquet written without HF metadata, or file paths
    if not isinstance(ds["train"].features["image"], datasets.Image):
        raise DataError(f"dataset {spec}: column {image_column!r} does not hold images "
                        f"({ds['train'].features['image']})")
    return ds


def _check(ds: DatasetDict, spec: str) -> None:
    names = ds["train"].features["label"].names
    if len(names) < 2:
        raise DataError(f"dataset {spec}: a classifier needs at least 2 classes, found {len(names)}")
    train_classes = set(ds["train"]["label"])
    for split, part in ds.items():
        if len(part) == 0:
            raise DataError(f"dataset {spec}: split {split!r} is empty")
        labels = np.asarray(part["label"])
        bad = labels[(labels < 0) | (labels >= len(names))]
        if bad.size:
            raise DataError(f"dataset {spec}, split {split}, column label: value {int(bad[0])} outside "
                            f"0..{len(names) - 1}")
        unseen = set(labels.tolist()) - train_classes
        if unseen:
            raise DataError(f"dataset {spec}, split {split}: class {names[min(unseen)]!r} has no training image")


def per_class_subset(part: datasets.Dataset, k: int, seed: int) -> datasets.Dataset:
    """k images of every class (all of a class that has fewer), drawn with `seed`."""
    labels = np.asarray(part["label"])
    rng = np.random.default_rng(seed)
    keep = [i for c in np.unique(labels) for i in rng.permutation(np.flatnonzero(labels == c))[:k]]
    return part.select(sorted(keep))


def load_splits(spec: str, *, val_fraction: float = 0.2, train_per_class: int = 0, split_seed: int = 0,
                revision: str | None = None, image_column: str = "image", label_column: str = "label") -> DatasetDict:
    source = load_source(spec, revision)
    renamed = {}
    for split, part in source.items():
        renamed["val" if split in VAL_NAMES else split] = part
    if "train" not in renamed:
        raise DataError(f"dataset {spec}: no 'train' split (splits: {', '.join(source)})")
    ds = _normalize_columns(DatasetDict(renamed), spec, image_column, label_column)
    if "test" not in ds:
        # Some Hub repos ship only train: hold out a fixed test set (seed 0) before anything else.
        parts = ds["train"].train_test_split(test_size=val_fraction, stratify_by_column="label", seed=0)
        ds["train"], ds["test"] = parts["train"], parts["test"]
    if "val" not in ds:
        parts = ds["train"].train_test_split(test_size=val_fraction, stratify_by_column="label", seed=split_seed)
        ds["train"], ds["val"] = parts["train"], parts["test"]
    if train_per_class > 0:
        ds["train"] = per_class_subset(ds["train"], train_per_class, split_seed)
    ds = DatasetDict(train=ds["train"], val=ds["val"], test=ds["test"])
    _check(ds, spec)
    return ds


def fingerprint(ds: DatasetDict) -> str:
    """Short content fingerprint (sizes, all labels, a sample of 32 raw images per split): a run tag."""
    h = hashlib.sha256()
    for split in sorted(ds):
        part = ds[split]
        h.update(f"{split}:{len(part)}".encode())
        h.update(np.asarray(part["label"], dtype=np.int64).tobytes())
        raw = part.cast_column("image", datasets.Image(decode=False))
        for i in np.linspace(0, len(part) - 1, num=min(32, len(part)), dtype=int):
            image = raw[int(i)]["image"]
            h.update(image["bytes"] or (image["path"] or "").encode())
    return h.hexdigest()[:16]
