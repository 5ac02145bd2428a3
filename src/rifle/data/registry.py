"""Named target datasets (`--dataset cub200`): where each lives and how its splits are formed.

Built-in entries: `datasets.yaml` next to this module (its header documents the fields). A YAML file of the
same form named by `--dataset_registry`, else `$RIFLE_DATASET_REGISTRY`, adds entries or replaces them whole.
Light on purpose (yaml only): `config.resolve` validates dataset names with it before torch loads.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

import yaml

ENV_VAR = "RIFLE_DATASET_REGISTRY"
SPLITS = ("train", "val", "test")
FIELDS = ("title", "hub", "source", "revision", "image_column", "label_column", "splits", "test_fraction",
          "classes", "sizes", "train_per_class", "verified", "notes")
COMMIT = re.compile(r"^[0-9a-f]{40}$")  # a Hub commit: what a pinned revision is
NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


class RegistryError(ValueError):
    """A registry file that cannot be used; the message names the file and the entry."""


@dataclass(frozen=True)
class Entry:
    name: str
    source: str                   # a dataset spec for data.load_source: digits, imagefolder:, disk:, hub:
    revision: str | None = None
    image_column: str = "image"
    label_column: str = "label"
    splits: dict = field(default_factory=dict)   # our split name -> the source's; empty: detect by name
    test_fraction: float | None = None           # held out of train when the source has no test split
    classes: int | None = None                   # what the label column must hold, checked at every load
    sizes: dict = field(default_factory=dict)    # our split name -> images it must hold (before subsets)
    train_per_class: int | None = None           # the entry's default for --train_per_class (a k-shot protocol)
    verified: bool = False                       # older files' flag; the stated classes and sizes now check

    @property
    def hub_id(self) -> str | None:
        return self.source[len("hub:"):] if self.source.startswith("hub:") else None

    @property
    def remote(self) -> bool:
        """A dataset on the Hub (not a local folder laid out like one): it has revisions."""
        hub = self.hub_id
        return hub is not None and not Path(hub).expanduser().is_dir()

    @property
    def pinned(self) -> bool:
        return self.revision is not None and bool(COMMIT.match(self.revision))


def registry_path(option: str | None) -> str | None:
    """The user registry file in effect: the option, else the environment variable, else none."""
    return option or os.environ.get(ENV_VAR) or None


def _parse(text: str, origin: str) -> dict[str, Entry]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RegistryError(f"{origin}: not valid YAML ({e})".replace("\n", " ")) from None
    if data is not None and not isinstance(data, dict):
        raise RegistryError(f"{origin}: expected a mapping of dataset name -> entry")
    return {name: _entry(name, raw, f"{origin}, entry {name!r}") for name, raw in (data or {}).items()}


def _entry(name, raw, where: str) -> Entry:
    if not isinstance(name, str) or not NAME.match(name):
        raise RegistryError(f"{where}: a name is lower-case letters, digits, '_', '-' or '.'")
    if not isinstance(raw, dict):
        raise RegistryError(f"{where}: expected a mapping of fields ({', '.join(FIELDS)})")
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise RegistryError(f"{where}: unknown field {unknown[0]!r} (fields: {', '.join(FIELDS)})")
    if ("hub" in raw) == ("source" in raw):
        raise RegistryError(f"{where}: give exactly one of 'hub' (a Hub id or a Hub-style folder) and "
                            "'source' (imagefolder:<root>, disk:<path> or digits)")
    source = f"hub:{_text(raw['hub'], where, 'hub')}" if "hub" in raw else _text(raw["source"], where, "source")
    if not (source == "digits" or source.startswith(("imagefolder:", "disk:", "hub:"))):
        raise RegistryError(f"{where}: source {source!r} is not digits, imagefolder:<root>, disk:<path> or hub:<id>")
    splits = raw.get("splits") or {}
    if not isinstance(splits, dict) or not set(splits) <= set(SPLITS) or (splits and "train" not in splits):
        raise RegistryError(f"{where}: 'splits' maps train (required), val and test to the source's "
                            "split names, e.g. {train: train, test: validation}")
    test_fraction = raw.get("test_fraction")
    if test_fraction is not None and not (isinstance(test_fraction, (int, float)) and 0 < test_fraction < 1):
        raise RegistryError(f"{where}: test_fraction must be a number in (0, 1), got {test_fraction!r}")
    revision = raw.get("revision")
    sizes = raw.get("sizes") or {}
    if not isinstance(sizes, dict) or not set(sizes) <= set(SPLITS) or not all(_count(n) for n in sizes.values()):
        raise RegistryError(f"{where}: 'sizes' maps our splits (train, val, test) to the number of images each "
                            "must hold, e.g. {train: 5994, test: 5794}")
    for key in ("classes", "train_per_class"):
        if raw.get(key) is not None and not _count(raw[key]):
            raise RegistryError(f"{where}: {key} must be a positive integer, got {raw[key]!r}")
    return Entry(name=name, source=source, revision=None if revision is None else _text(revision, where, "revision"),
                 image_column=_text(raw.get("image_column", "image"), where, "image_column"),
                 label_column=_text(raw.get("label_column", "label"), where, "label_column"),
                 splits={k: _text(v, where, f"splits.{k}") for k, v in splits.items()},
                 test_fraction=test_fraction, classes=raw.get("classes"), sizes=dict(sizes),
                 train_per_class=raw.get("train_per_class"), verified=bool(raw.get("verified", False)))


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _text(value, where: str, key: str) -> str:
    if not isinstance(value, (str, int, float)) or isinstance(value, bool) or str(value).strip() == "":
        raise RegistryError(f"{where}: {key} must be a non-empty string, got {value!r}")
    return str(value)


def load(user_file: str | None = None) -> dict[str, Entry]:
    """Built-in entries, then the user's (`user_file`, else $RIFLE_DATASET_REGISTRY) on top."""
    entries = _parse(resources.files("rifle.data").joinpath("datasets.yaml").read_text(), "rifle/data/datasets.yaml")
    path = registry_path(user_file)
    if path:
        p = Path(path)
        if not p.is_file():
            raise RegistryError(f"dataset registry file not found: {path}")
        user = _parse(p.read_text(), str(p))
        # A relative folder in a user's file is relative to that file, not to the working directory.
        for name, e in user.items():
            prefix, _, rest = e.source.partition(":")
            if rest.startswith(("./", "../")):
                user[name] = replace(e, source=f"{prefix}:{(p.resolve().parent / rest).resolve()}")
        entries.update(user)
    return entries


def is_name(spec: str) -> bool:
    """True for a registry-style name (no ':' or '/'), whether or not such an entry exists."""
    return ":" not in spec and "/" not in spec


def lookup(spec: str, user_file: str | None = None) -> Entry | None:
    """The entry for a registry name; None for other specs; RegistryError for an unknown name."""
    if not is_name(spec):
        return None
    entries = load(user_file)
    if spec not in entries:
        raise RegistryError(f"unknown dataset {spec!r}: registered are {', '.join(sorted(entries))}; or use "
                            "imagefolder:<root>, disk:<path> or a Hub id (owner/name or hub:<id or folder>)")
    return entries[spec]
