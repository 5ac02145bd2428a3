"""Every registered dataset states what it must be (a pinned commit, its classes, its split sizes), and every load
checks the data against it: here each built-in entry is loaded through the real registry code from a folder laid
out like its Hub repository (parquet under data/, the entry's split and column names, its class count and split
sizes), and a wrong column, a wrong split size and an unpinned revision are refused in one line."""
import io
import subprocess
import sys

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from conftest import subprocess_env
from helpers import data_config
from rifle.data import DataError, load, registry

PNG = io.BytesIO()
Image.new("RGB", (8, 8), (120, 30, 60)).save(PNG, "PNG")
PNG = PNG.getvalue()


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv(registry.ENV_VAR, raising=False)


def hub_folder(root, entry: registry.Entry, sizes: dict, classes: int, extra_columns: dict | None = None,
               first_label: int = 0, extra_splits: tuple = ()):
    """A folder laid out like the entry's Hub repository: the source's split names (and `extra_splits`, which
    must never be loaded), the entry's columns, `classes` labels spread over every split, tiny images."""
    ours_to_theirs = entry.splits or {s: s for s in sizes}
    (root / "data").mkdir(parents=True)
    for ours, n in [*sizes.items(), *((s, 5) for s in extra_splits)]:
        labels = [first_label + i % classes for i in range(n)]
        columns = {entry.image_column: [{"bytes": PNG, "path": None}] * n, entry.label_column: labels}
        for name, count in (extra_columns or {}).items():
            columns[name] = [i % count for i in range(n)]
        pq.write_table(pa.table(columns), root / "data" / f"{ours_to_theirs.get(ours, ours)}-00000-of-00001.parquet")
    return root


def user_registry(tmp_path, name: str, entry: registry.Entry, folder, **changes) -> str:
    """The entry as a user's registry file, on `folder` instead of the Hub (same splits, columns, classes, sizes)."""
    raw = {"hub": str(folder), "image_column": entry.image_column, "label_column": entry.label_column,
           "splits": dict(entry.splits), "classes": entry.classes, "sizes": dict(entry.sizes)} | changes
    path = tmp_path / "registry.yaml"
    path.write_text(yaml.safe_dump({name: {k: v for k, v in raw.items() if v not in (None, {})}}))
    return str(path)


def test_every_hub_entry_is_pinned_or_says_why_and_states_its_classes():
    entries = registry.load()
    hub = {name: e for name, e in entries.items() if e.hub_id}
    assert {"cub200", "cars", "aircraft", "dogs", "dtd", "food101", "caltech256", "flowers102"} <= set(hub)
    for name, e in hub.items():
        assert e.classes, name
        assert e.pinned or e.revision == "main", name  # unpinned only where no page gave the full commit
    unpinned = sorted(name for name, e in hub.items() if not e.pinned)
    assert unpinned == ["caltech256", "caltech256_30", "caltech256_60", "dtd"]
    assert entries["aircraft"].label_column == "variation" and entries["aircraft"].classes == 100
    assert entries["dogs"].sizes == {"train": 12000, "test": 8580} and entries["dogs"].classes == 120
    assert entries["cars"].splits == {"train": "train", "test": "test"}  # never its 7 corrupted test copies
    assert entries["food101"].splits == {"train": "train", "test": "validation"}
    assert (entries["caltech256_30"].train_per_class, entries["caltech256_60"].train_per_class) == (30, 60)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cub200", "cars", "aircraft", "dogs", "dtd", "food101", "caltech256_30",
                                  "flowers102"])
def test_builtin_entry_loads_what_it_states_from_a_hub_layout_folder(tmp_path, name):
    entry = registry.load()[name]
    sizes = entry.sizes or {"train": 40 * entry.classes, "val": 3 * entry.classes, "test": 2 * entry.classes}
    first = 1 if name.startswith("caltech256") else 0  # the copy's labels run 1..257
    extra = ("contrast", "gaussian_noise") if name == "cars" else ()
    folder = hub_folder(tmp_path / name, entry, sizes, entry.classes, first_label=first, extra_splits=extra)
    reg = user_registry(tmp_path, name, entry, folder, train_per_class=entry.train_per_class)
    ds = load(data_config(name, dataset_registry=reg, val_fraction=0.2, train_per_class=entry.train_per_class or 0),
              scan=False).data
    assert len(ds["train"].features["label"].names) == entry.classes
    assert sorted(set(ds["test"]["label"]))[:1] == [0]  # 1..257 mapped to 0..256
    assert len(ds["test"]) == sizes["test"]
    if entry.train_per_class:
        assert len(ds["train"]) == entry.train_per_class * entry.classes
    if "val" in entry.splits:  # the source's own validation split, not a carve-out
        assert len(ds["val"]) == sizes["val"]
    # only the mapped splits were prepared: the extra ones of the folder never reach the cache
    cached = [p.name for p in (tmp_path / "hf").rglob("*.arrow")]
    assert any(f"-{entry.splits['test']}." in f for f in cached) and not any(s in f for f in cached for s in extra)


def test_a_wrong_label_column_is_refused_in_one_line(tmp_path):
    """FGVC-Aircraft on the Hub: `label` is the 70 families, `variation` the paper's 100 variants."""
    entry = registry.load()["aircraft"]
    sizes = {"train": 140, "val": 70, "test": 70}
    folder = hub_folder(tmp_path / "air", registry.Entry("air", "hub:x", label_column="label", splits=entry.splits),
                        sizes, 70, extra_columns={"variation": 100})
    reg = user_registry(tmp_path, "aircraft", entry, folder, label_column="label", sizes=sizes)
    with pytest.raises(DataError) as e:
        load(data_config("aircraft", dataset_registry=reg), scan=False)
    assert str(e.value).startswith("aircraft: label column 'label' has 70 classes, the entry states 100")
    assert "\n" not in str(e.value)
    # the entry's own column loads
    reg = user_registry(tmp_path, "aircraft", entry, folder, sizes=sizes)
    ds = load(data_config("aircraft", dataset_registry=reg), scan=False).data
    assert len(ds["train"].features["label"].names) == 100


def test_a_wrong_split_size_is_refused_in_one_line(tmp_path):
    """A re-split copy (amaye15/stanford-dogs: 14.4k / 6.17k) against the official 12,000 / 8,580."""
    entry = registry.load()["dogs"]
    folder = hub_folder(tmp_path / "dogs", entry, {"train": 1440, "test": 617}, 120)
    reg = user_registry(tmp_path, "dogs", entry, folder, sizes={"train": 1200, "test": 617})
    with pytest.raises(DataError) as e:
        load(data_config("dogs", dataset_registry=reg), scan=False)
    assert str(e.value).startswith("dogs: split train has 1,440 images, the entry states 1,200")
    reg = user_registry(tmp_path, "dogs", entry, folder, sizes={"train": 1440, "test": 617, "val": 10})
    with pytest.raises(DataError, match="dogs: the entry states 10 images in split val, which the source does not"):
        load(data_config("dogs", dataset_registry=reg), scan=False)


@pytest.mark.parametrize("text,needle", [
    ("x:\n  hub: a/b\n  classes: many\n", "classes must be a positive integer"),
    ("x:\n  hub: a/b\n  sizes: {training: 5}\n", "'sizes' maps our splits (train, val, test)"),
    ("x:\n  hub: a/b\n  sizes: {train: -5}\n", "'sizes' maps our splits"),
])
def test_bad_classes_and_sizes_fields_are_registry_errors(tmp_path, text, needle):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(registry.RegistryError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        registry.load(str(path))


@pytest.mark.slow
def test_an_unpinned_hub_revision_offline_is_refused_in_one_line_at_once(tmp_path):
    """No Hub access: a branch cannot be resolved to a commit, and nothing is retried."""
    reg = tmp_path / "r.yaml"
    reg.write_text("birds:\n  hub: someone/birds\n  revision: main\n  classes: 2\n")
    code = ("from rifle import config\nfrom rifle.data import load\n"
            f"load(config.build({{'dataset': 'birds', 'dataset_registry': {str(reg)!r}}}).data, scan=False)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=subprocess_env(HF_HUB_OFFLINE="1"))
    last = done.stderr.strip().splitlines()[-1]
    assert "Retrying" not in done.stderr
    assert "DataError: dataset birds (hub:someone/birds): the Hub cannot resolve someone/birds at revision 'main'" \
        in last and "pin the 40-hex commit" in last
