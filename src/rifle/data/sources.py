"""Target datasets as a Hugging Face `DatasetDict` with splits train / val / test and columns
`image` (PIL) and `label` (ClassLabel).

Sources: a registered name (`cub200`, see `registry.py` and `datasets.yaml`), the built-in offline
`digits` (scikit-learn's handwritten digits), an ImageFolder in the official RIFLE layout
(`root/train/<class>/*`, `root/test/<class>/*`), a `save_to_disk` folder, and a Hugging Face Hub dataset
(`owner/name` or `hub:<id>`; `hub:<local folder>` takes the same code path for a folder laid out like a
Hub repository, e.g. `data/train-00000-of-00001.parquet`).

One entry point, `load(d)`: a run's DataConfig (dataset, revision, columns, val_fraction, the k-shot or label-rate
subset, split_seed, registry file, bad_images, num_proc) -> `Loaded` (the splits, the scan's report, the Hub commit).

Order: source -> columns renamed to image/label -> label checks -> image scan (bad files stop the run, or
are dropped with `bad_images="skip"`) -> test carved (seeds.TEST_SPLIT_SEED) if missing -> val carved
(stratified, `split_seed`) if missing, or no val at all with `val_fraction=0` -> k-shot or label-rate subset of
what remains of train -> checks. Test images never influence training or selection, and subsets are nested: the
same split_seed draws the 15% subset inside the 30% one, k=5 inside k=10.
"""
from __future__ import annotations

import hashlib
import logging
import os
import sys
from pathlib import Path
from typing import NamedTuple

import datasets
import numpy as np
from datasets import ClassLabel, DatasetDict
from datasets.exceptions import DatasetGenerationError

from .. import network
from ..seeds import TEST_SPLIT_SEED
from . import registry
from .hf import quiet_progress
from .scan import ScanReport
from .scan import scan as scan_images

VAL_NAMES = ("val", "validation", "valid", "dev")
log = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad dataset content, named by dataset, split and column."""


def digits_source() -> DatasetDict:
    """scikit-learn's 1,797 handwritten 8x8 digits as RGB images; half of each class is the test set."""
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = (bunch.images * (255.0 / 16.0)).round().astype(np.uint8)
    images = [Image.fromarray(p, mode="L").convert("RGB") for p in pixels]
    features = datasets.Features({"image": datasets.Image(),
                                  "label": ClassLabel(names=[str(d) for d in range(10)])})
    full = datasets.Dataset.from_dict({"image": images, "label": bunch.target.tolist()}, features=features)
    # The train/test division is fixed whatever split_seed is, so test sets are comparable.
    parts = full.train_test_split(test_size=0.5, stratify_by_column="label", seed=TEST_SPLIT_SEED)
    return DatasetDict(train=parts["train"], test=parts["test"])


def load_source(spec: str, revision: str | None = None, num_proc: int | None = None,
                splits: dict[str, str] | None = None) -> DatasetDict:
    """The source's splits (only those `splits` maps our split names to, when given); a Hub id at `revision`."""
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
        try:
            return datasets.load_dataset("imagefolder", data_dir=str(root), num_proc=num_proc)
        except DatasetGenerationError as e:
            raise DataError(f"dataset {spec}: datasets cannot build it ({_cause(e)})") from None
    if spec.startswith("disk:"):
        try:
            loaded = datasets.load_from_disk(spec[len("disk:"):])
        except Exception as e:  # not a save_to_disk folder, or one datasets cannot read (a 0-row split)
            raise DataError(f"dataset {spec}: datasets cannot load it ({_cause(e)})") from None
        if not isinstance(loaded, DatasetDict):
            raise DataError(f"dataset {spec}: expected a DatasetDict with splits, found a single Dataset")
        return loaded
    hub_id = spec[len("hub:"):] if spec.startswith("hub:") else spec
    try:
        return network.with_retries(lambda: _load_hub(hub_id, revision, num_proc, splits), f"dataset {spec}",
                                    log=_warn)
    except DataError:
        raise
    except DatasetGenerationError as e:  # e.g. splits whose parquet schemas disagree
        raise DataError(f"dataset {spec}: datasets cannot build {hub_id!r} ({_cause(e)})") from None
    except Exception as e:
        offline = " (HF_HUB_OFFLINE is set: only cached datasets load)" if datasets.config.HF_HUB_OFFLINE else ""
        raise DataError(f"dataset {spec}: cannot load {hub_id!r} at revision {revision or 'main'!r} "
                        f"({_cause(e)}){offline}") from None


def _load_hub(hub_id: str, revision: str | None, num_proc: int | None, splits: dict[str, str] | None) -> DatasetDict:
    if not splits:
        return datasets.load_dataset(hub_id, revision=revision, num_proc=num_proc)
    # Only the splits asked for: load_dataset(split=...) would still download and prepare every split (Stanford
    # Cars: 6.3 GB instead of 2), so the data files are those of the builder's own split patterns.
    builder = datasets.load_dataset_builder(hub_id, revision=revision)
    files = builder.config.data_files or {}
    for ours, theirs in splits.items():
        if theirs not in files:
            raise DataError(f"dataset hub:{hub_id}: the registry maps split {ours} to the source's {theirs!r}, which "
                            f"does not exist (splits: {', '.join(files) or 'none'})")
    return datasets.load_dataset(hub_id, revision=revision, num_proc=num_proc, features=builder.info.features,
                                 data_files={theirs: files[theirs] for theirs in splits.values()})


def resolve_revision(hub_id: str, revision: str | None, name: str) -> str:
    """The commit a Hub dataset's `revision` (a commit, branch or tag; None: main) names, asked of the Hub in one
    request within the network deadline, which also finds an unreachable Hub or a missing revision in one line
    instead of the downloader's retries. With HF_HUB_OFFLINE a commit is taken as is and a branch refused."""
    if datasets.config.HF_HUB_OFFLINE and revision and registry.COMMIT.match(revision):
        return revision
    from huggingface_hub import HfApi
    try:
        return HfApi().dataset_info(hub_id, revision=revision or "main", timeout=network.timeout()).sha
    except Exception as e:
        pin = "" if revision and registry.COMMIT.match(revision) else \
            f"; revision {revision or 'main'!r} is not a commit: pin the 40-hex commit of the dataset's Hub page " \
            "(--dataset_revision, or revision: in a registry file)"
        offline = " (HF_HUB_OFFLINE is set)" if datasets.config.HF_HUB_OFFLINE else \
            "; offline, set HF_HUB_OFFLINE=1 to load a pinned copy an earlier run cached"
        raise DataError(f"dataset {name}: the Hub cannot resolve {hub_id} at revision {revision or 'main'!r} "
                        f"({_cause(e)}){pin or offline}") from None


def _cause(e: BaseException) -> str:
    """The innermost exception of a chain, on one line."""
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


def _select_splits(source: DatasetDict, name: str, mapping: dict) -> DatasetDict:
    """Our train/val/test from the source's splits: by the registry's mapping, else by name."""
    if mapping:
        missing = {ours: theirs for ours, theirs in mapping.items() if theirs not in source}
        if missing:
            ours, theirs = next(iter(missing.items()))
            raise DataError(f"dataset {name}: the registry maps split {ours} to the source's {theirs!r}, which "
                            f"does not exist (splits: {', '.join(source)})")
        return DatasetDict({ours: source[theirs] for ours, theirs in mapping.items()})
    picked = {}
    if "train" in source:
        picked["train"] = source["train"]
    if "test" in source:
        picked["test"] = source["test"]
    val = next((v for v in VAL_NAMES if v in source), None)
    if val is not None:
        picked["val"] = source[val]
    if "train" not in picked:
        raise DataError(f"dataset {name}: no 'train' split (splits: {', '.join(source)}); name one with "
                        "'splits' in a registry entry")
    return DatasetDict(picked)


def _normalize_columns(ds: DatasetDict, name: str, image_column: str, label_column: str) -> DatasetDict:
    for split, part in ds.items():
        for wanted, role in ((image_column, "image"), (label_column, "label")):
            if wanted not in part.column_names:
                raise DataError(f"dataset {name}, split {split}: no {role} column {wanted!r} "
                                f"(columns: {', '.join(part.column_names)}); set --{role}_column")
        nulls = part.data.column(label_column).null_count
        if nulls:
            first = next(i for i, v in enumerate(part[label_column]) if v is None)
            raise DataError(f"dataset {name}, split {split}, column {label_column}: {nulls} row(s) without a "
                            f"label (first: row {first})")
    if image_column == label_column:
        raise DataError(f"dataset {name}: image_column and label_column are both {image_column!r}")
    # Other columns go first, so one that happens to be called image or label cannot collide.
    ds = DatasetDict({split: part.select_columns([image_column, label_column]) for split, part in ds.items()})
    if image_column != "image" or label_column != "label":
        temp = {image_column: "__rifle_image", label_column: "__rifle_label"}  # also handles swapped names
        ds = ds.rename_columns(temp).rename_columns({"__rifle_image": "image", "__rifle_label": "label"})
    feature = ds["train"].features["label"]
    if not isinstance(feature, ClassLabel):
        if not _is_label_type(feature):
            raise DataError(f"dataset {name}, split train, column {label_column}: holds {feature}, not class "
                            "labels (integers or strings); set --label_column")
        for split, part in ds.items():
            values = part["label"]
            negative = next((v for v in values if isinstance(v, (int, np.integer)) and v < 0), None)
            if negative is not None:  # Hub datasets mark unlabelled rows with -1
                raise DataError(f"dataset {name}, split {split}, column {label_column}: value {negative} is not "
                                "a class (-1 marks unlabelled rows on the Hub)")
        # Integer or string labels: one class list over all splits, so ids agree between splits.
        names = sorted({str(v) for part in ds.values() for v in part["label"]},
                       key=lambda v: (not v.lstrip("-").isdigit(), int(v) if v.lstrip("-").isdigit() else 0, v))
        label = ClassLabel(names=names)
        ds = ds.cast_column("label", datasets.Value("string")).cast_column("label", label)
    else:
        for split, part in ds.items():
            if part.features["label"] != feature:
                raise DataError(f"dataset {name}, split {split}, column {label_column}: class names differ from "
                                "the train split's")
    feature = ds["train"].features["image"]
    if (isinstance(feature, dict) and "bytes" in feature) or getattr(feature, "dtype", None) == "string":
        ds = ds.cast_column("image", datasets.Image())  # parquet written without HF metadata, or file paths
    if not isinstance(ds["train"].features["image"], datasets.Image):
        raise DataError(f"dataset {name}, split train, column {image_column}: does not hold images "
                        f"({ds['train'].features['image']})")
    return ds


def _is_label_type(feature) -> bool:
    return isinstance(feature, datasets.Value) and (feature.dtype.startswith(("int", "uint")) or
                                                    feature.dtype in ("string", "large_string"))


def _check(ds: DatasetDict, name: str, label_column: str = "label", after: str = "") -> None:
    names = ds["train"].features["label"].names
    if len(names) < 2:
        raise DataError(f"dataset {name}, column {label_column}: a classifier needs at least 2 classes, found "
                        f"{len(names)} ({', '.join(map(repr, names[:1]))}) in splits {', '.join(ds)}")
    train_classes = set(ds["train"]["label"])
    for split, part in ds.items():
        if len(part) == 0:
            raise DataError(f"dataset {name}: split {split!r} is empty{after}")
        labels = np.asarray(part["label"])
        bad = labels[(labels < 0) | (labels >= len(names))]
        if bad.size:
            raise DataError(f"dataset {name}, split {split}, column {label_column}: value {int(bad[0])} outside "
                            f"0..{len(names) - 1} ({len(names)} classes)")
        unseen = set(labels.tolist()) - train_classes
        if unseen:
            raise DataError(f"dataset {name}, split {split}, column {label_column}: class {names[min(unseen)]!r} "
                            f"has no training image{after}")
    if len(train_classes) < 2:
        raise DataError(f"dataset {name}, split train, column {label_column}: a classifier needs at least 2 "
                        f"classes, train holds only {names[min(train_classes)]!r}{after}")


def _subset(part: datasets.Dataset, seed: int, count) -> datasets.Dataset:
    """`count(n_c)` images of every class c, the first of a per-class permutation drawn with `seed`: the
    permutations do not depend on `count`, so a smaller subset lies inside a larger one."""
    labels = np.asarray(part["label"])
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        keep += rng.permutation(members)[:count(len(members))].tolist()
    return part.select(sorted(keep))


def per_class_subset(part: datasets.Dataset, k: int, seed: int) -> datasets.Dataset:
    """k images of every class (all of a class that has fewer), drawn with `seed`."""
    return _subset(part, seed, lambda n: k)


def label_rate_subset(part: datasets.Dataset, rate: float, seed: int) -> datasets.Dataset:
    """`rate` percent of every class (rounded, at least one image), drawn with `seed`: stratified."""
    return _subset(part, seed, lambda n: max(1, int(np.floor(n * rate / 100.0 + 0.5))))


def _carve(part: datasets.Dataset, fraction: float, seed: int, name: str, what: str) -> tuple:
    try:
        parts = part.train_test_split(test_size=fraction, stratify_by_column="label", seed=seed)
    except ValueError as e:
        raise DataError(f"dataset {name}, split train: cannot hold out {what} ({fraction:g} of "
                        f"{len(part)} images, stratified): {e}") from None
    return parts["train"], parts["test"]


class Loaded(NamedTuple):
    data: DatasetDict
    scan: ScanReport | None
    revision: str | None = None  # the Hub commit loaded (a branch or tag resolved); None for other sources


def load(d: DataConfig, *, scan: bool = True) -> Loaded:  # noqa: F821  (rifle.config's: data sits below config)
    """Train/val/test of a run's data options `d` (as config.build resolved them: combinations of options are
    refused there, not checked again here), with the image scan's report; `scan=False` skips the scan (no report:
    bad images surface only when read)."""
    with quiet_progress():
        spec = d.dataset
        try:
            entry = registry.lookup(spec, d.dataset_registry)
        except registry.RegistryError as e:
            raise DataError(f"dataset {spec}: {e}") from None
        name, source_spec, mapping, test_fraction = spec, spec, {}, None
        revision, image_column, label_column = d.dataset_revision, d.image_column, d.label_column
        if entry is not None:
            source_spec, mapping, test_fraction = entry.source, entry.splits, entry.test_fraction
            revision = revision or entry.revision
            image_column, label_column = image_column or entry.image_column, label_column or entry.label_column
            if entry.source != spec:
                name = f"{spec} ({entry.source})"
        image_column, label_column = image_column or "image", label_column or "label"
        hub_id = None if source_spec == "digits" or source_spec.startswith(("imagefolder:", "disk:")) else \
            source_spec.removeprefix("hub:")
        if hub_id is not None and not Path(hub_id).expanduser().is_dir():  # on the Hub: a commit, asked once
            revision = resolve_revision(hub_id, revision, name)
        else:
            revision = None
        try:
            source = load_source(source_spec, revision, d.num_proc or None, mapping)
        except DataError as e:
            raise DataError(str(e).replace(f"dataset {source_spec}", f"dataset {name}", 1)) from None
        ds = _normalize_columns(_select_splits(source, name, mapping), name, image_column, label_column)
        _check(ds, name, label_column)
        if entry is not None:
            check_entry(ds, entry, name, label_column)
        report = None
        if scan:
            ds, report = _scanned(ds, name, image_column, d.bad_images, d.num_proc)
        after = f" (after skipping {len(report.bad)} bad images)" if report is not None and report.bad else ""
        if "test" not in ds:
            # Some Hub repos ship only train: hold out a fixed test set before anything else.
            ds["train"], ds["test"] = _carve(ds["train"], test_fraction or d.val_fraction or 0.2, TEST_SPLIT_SEED,
                                             name, "a test split")
        if d.val_fraction == 0:
            ds.pop("val", None)  # no validation (the authors' protocol): a source's val split stays unused
        elif "val" not in ds:
            ds["train"], ds["val"] = _carve(ds["train"], d.val_fraction, d.split_seed, name, "a validation split")
        if d.train_per_class:  # config refuses it with label_rate < 100
            ds["train"] = per_class_subset(ds["train"], d.train_per_class, d.split_seed)
        elif d.label_rate < 100:
            ds["train"] = label_rate_subset(ds["train"], d.label_rate, d.split_seed)
        ds = DatasetDict({split: ds[split] for split in ("train", "val", "test") if split in ds})
        _check(ds, name, label_column, after)
        return Loaded(ds, report, revision)



def check_entry(ds: DatasetDict, entry: registry.Entry, name: str, label_column: str) -> None:
    """The data against what its registry entry states (classes, and each split's size before any subset):
    one line naming the entry, the column or split, the stated and the found numbers."""
    found = len(ds["train"].features["label"].names)
    if entry.classes is not None and found != entry.classes:
        raise DataError(f"{entry.name}: label column {label_column!r} has {found} classes, the entry states "
                        f"{entry.classes} (dataset {name})")
    for split, stated in entry.sizes.items():
        if split not in ds:
            raise DataError(f"{entry.name}: the entry states {stated:,} images in split {split}, which the source "
                            f"does not have (splits: {', '.join(ds)}; dataset {name})")
        if len(ds[split]) != stated:
            raise DataError(f"{entry.name}: split {split} has {len(ds[split]):,} images, the entry states "
                            f"{stated:,} (dataset {name})")


def _scanned(ds: DatasetDict, name: str, image_column: str, bad_images: str, num_proc):
    """(ds, scan report) after the image scan: bad images stop the load (`error`) or are dropped (`skip`)."""
    report = scan_images(ds, name, threads=num_proc or None)
    report.policy = bad_images
    if report.bad and bad_images == "error":
        raise DataError(f"dataset {name}, column {image_column}: {report.summary()}; fix or remove them, "
                        "or pass --bad_images skip")
    if report.bad:
        drop = {}
        for b in report.bad:
            drop.setdefault(b.split, set()).add(b.index)
        ds = DatasetDict({split: part.select([i for i in range(len(part)) if i not in drop.get(split, ())])
                          if split in drop else part for split, part in ds.items()})
        if _is_rank0():
            log.warning("dataset %s: skipped %s (bad_images=skip)", name, report.summary())
    return ds, report


def _is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _warn(text: str) -> None:
    if _is_rank0():
        print(text, file=sys.stderr, flush=True)


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
