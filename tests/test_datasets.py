"""Dataset registry, label-rate / k-shot subsets, bad input found before training, output hygiene.

Every case runs the real loading code on real files written here: Hub-like parquet folders named by a
user registry entry, ImageFolders holding broken and unusual images made with Pillow and raw bytes.
"""
import io
import json
import re
import struct
import sys
import zlib
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import TINY, mlflow_runs, run_cli
from helpers import data_config
from rifle import config as C
from rifle.data import registry
from rifle.data import DataError, load
from rifle.data.scan import check_image, scan, to_rgb

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """A private datasets cache (arrow files and the scan's JSON verdicts) per test."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    return tmp_path / "hf"


def _noise(color, size=16, seed=0):
    rng = np.random.default_rng([*color, seed])
    arr = np.clip(np.array(color)[None, None, :] + rng.integers(-20, 20, (size, size, 3)), 0, 255)
    return Image.fromarray(arr.astype(np.uint8))


def _png_bytes(im, fmt="PNG", **kw):
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb(width, height) -> bytes:
    """A valid PNG header announcing width x height 1-bit pixels, with a few bytes of data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 1000))
            + _png_chunk(b"IEND", b""))


def _parquet_repo(root: Path, splits: dict, image_column="img", label_column="fine_label", shards=None):
    """A folder laid out like a Hub parquet repository: data/<split>-0000i-of-0000n.parquet."""
    (root / "data").mkdir(parents=True)
    for split, rows in splits.items():
        n = (shards or {}).get(split, 1)
        for s in range(n):
            part = rows[s::n]
            table = pa.table({image_column: [{"bytes": b, "path": f"{split}-{i}.png"} for i, (b, _) in enumerate(part)],
                              label_column: [lab for _, lab in part], "caption": ["a photo"] * len(part)})
            pq.write_table(table, root / "data" / f"{split}-{s:05d}-of-{n:05d}.parquet")
    return root


def _rows(classes, n, seed=0):
    colors = {"cat": (200, 40, 40), "dog": (40, 200, 40), "owl": (40, 40, 200)}
    return [(_png_bytes(_noise(colors[c], seed=seed * 1000 + 10 * k + i)), c) for k, c in enumerate(classes)
            for i in range(n)]


def _registry_file(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------- registry

def test_user_entry_loads_a_sharded_parquet_repo_with_other_column_names(tmp_path, monkeypatch):
    _parquet_repo(tmp_path / "birds", {"train": _rows(["cat", "dog", "owl"], 10), "test": _rows(["cat", "dog", "owl"], 3, 1)},
                  shards={"train": 2})
    reg = _registry_file(tmp_path / "reg.yaml", "birds:\n  hub: ./birds\n  image_column: img\n"
                         "  label_column: fine_label\n  verified: true\n")
    ds = load(data_config("birds", dataset_registry=reg, val_fraction=0.2), scan=False).data
    assert ds["train"].features["label"].names == ["cat", "dog", "owl"]
    assert (len(ds["train"]), len(ds["val"]), len(ds["test"])) == (24, 6, 9)
    assert ds["train"].column_names == ["image", "label"] and ds["test"][0]["image"].size == (16, 16)
    # The same entry through $RIFLE_DATASET_REGISTRY, and `--dataset birds` resolves through it.
    monkeypatch.setenv(registry.ENV_VAR, reg)
    assert load(data_config("birds"), scan=False).data["test"]["label"] == ds["test"]["label"]
    cfg = C.build({"dataset": "birds"})
    assert cfg.data.dataset_registry == str(Path(reg).resolve()) and cfg.data.train_per_class == 0
    # The loaded copy is cached by datasets: the second load reads the same arrow files.
    files = [f["filename"] for f in ds["train"].cache_files]
    assert files and all(str(tmp_path / "hf") in f for f in files)
    assert {f["filename"] for f in load(data_config("birds"), scan=False).data["train"].cache_files} == set(files)


def test_entry_maps_a_test_set_published_as_validation(tmp_path):
    """food101 on the Hub: train + 'validation', which is the official test set."""
    _parquet_repo(tmp_path / "food", {"train": _rows(["cat", "dog"], 10), "validation": _rows(["cat", "dog"], 4, 1)},
                  image_column="image", label_column="label")
    reg = _registry_file(tmp_path / "reg.yaml", "food:\n  hub: ./food\n  splits: {train: train, test: validation}\n")
    ds = load(data_config("food", dataset_registry=reg, val_fraction=0.2, num_proc=2), scan=False).data
    assert (len(ds["train"]), len(ds["val"]), len(ds["test"])) == (16, 4, 8)
    valid = pq.read_table(tmp_path / "food" / "data" / "validation-00000-of-00001.parquet")
    test_bytes = {c["bytes"] for c in ds["test"].cast_column("image", datasets.Image(decode=False))["image"]}
    assert test_bytes == {c["bytes"] for c in valid.column("image").to_pylist()}
    bad = _registry_file(tmp_path / "bad.yaml", "food:\n  hub: ./food\n  splits: {train: train, test: test}\n")
    with pytest.raises(DataError, match="maps split test to the source's 'test', which does not exist"):
        load(data_config("food", dataset_registry=bad), scan=False)


def test_only_train_holds_out_a_fixed_test_set_then_val(tmp_path):
    _parquet_repo(tmp_path / "c256", {"train": _rows(["cat", "dog", "owl"], 20)})
    reg = _registry_file(tmp_path / "reg.yaml", "c256:\n  hub: ./c256\n  image_column: img\n"
                         "  label_column: fine_label\n  test_fraction: 0.25\n")
    a = load(data_config("c256", dataset_registry=reg, val_fraction=0.2, split_seed=1), scan=False).data
    b = load(data_config("c256", dataset_registry=reg, val_fraction=0.2, split_seed=2), scan=False).data
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (36, 9, 15)
    assert np.bincount(a["test"]["label"]).tolist() == [5, 5, 5]  # stratified
    assert a["test"]["image"] == b["test"]["image"] and a["val"]["image"] != b["val"]["image"]


def test_source_val_split_is_used_as_validation(tmp_path):
    _parquet_repo(tmp_path / "air", {"train": _rows(["cat", "dog"], 6), "val": _rows(["cat", "dog"], 2, 1),
                                     "test": _rows(["cat", "dog"], 3, 2)}, image_column="image", label_column="label")
    ds = load(data_config(f"hub:{tmp_path / 'air'}"), scan=False).data
    assert (len(ds["train"]), len(ds["val"]), len(ds["test"])) == (12, 4, 6)


@pytest.mark.parametrize("text,needle", [
    ("x:\n  hub: a/b\n  colour: red\n", "entry 'x': unknown field 'colour'"),
    ("x:\n  hub: a/b\n  source: digits\n", "give exactly one of 'hub'"),
    ("x:\n  hub: a/b\n  splits: {test: test}\n", "'splits' maps train (required)"),
    ("x:\n  hub: a/b\n  test_fraction: 2\n", "test_fraction must be a number in (0, 1)"),
    ("x: [1, 2\n", "not valid YAML"),
])
def test_bad_registry_file_is_a_config_error(tmp_path, text, needle):
    reg = _registry_file(tmp_path / "reg.yaml", text)
    with pytest.raises(C.ConfigError, match=re.escape(needle)) as err:
        C.build({"dataset_registry": reg})
    assert err.value.option == "dataset_registry"


def test_unknown_name_lists_the_registry_and_missing_folder_names_the_entry(tmp_path):
    with pytest.raises(C.ConfigError, match="unknown dataset 'cub': registered are aircraft, caltech256, caltech256_30"):
        C.build({"dataset": "cub"})
    reg = _registry_file(tmp_path / "reg.yaml", "mine:\n  source: imagefolder:./nowhere\n")
    with pytest.raises(C.ConfigError, match="directory not found: .*nowhere' \\(registry entry 'mine'\\)"):
        C.build({"dataset": "mine", "dataset_registry": reg})


# ---------------------------------------------------------------- label rate and k-shot

def _raw(part):
    return [c["bytes"] for c in part.cast_column("image", datasets.Image(decode=False))["image"]]


def test_label_rate_is_stratified_seeded_and_nested():
    def digits(**values):
        return load(data_config("digits", **{"split_seed": 3} | values), scan=False).data

    full = digits(train_per_class=0)
    per_class = np.bincount(full["train"]["label"])
    subsets = {}
    for rate in (15, 30, 50):
        ds = digits(label_rate=rate)
        counts = np.bincount(ds["train"]["label"], minlength=10)
        assert counts.tolist() == [max(1, int(np.floor(n * rate / 100 + 0.5))) for n in per_class], rate
        assert ds["val"]["label"] == full["val"]["label"] and ds["test"]["label"] == full["test"]["label"]
        subsets[rate] = Counter(_raw(ds["train"]))
    assert not subsets[15] - subsets[30] and not subsets[30] - subsets[50]  # 15% inside 30% inside 50%
    assert Counter(_raw(digits(label_rate=15)["train"])) == subsets[15]
    assert Counter(_raw(digits(label_rate=15, split_seed=4)["train"])) != subsets[15]
    assert Counter(_raw(digits(train_per_class=3)["train"])) <= Counter(_raw(digits(train_per_class=6)["train"]))


def test_label_rate_and_k_shot_are_exclusive():
    with pytest.raises(C.ConfigError, match="--label_rate: label_rate=30 and train_per_class=5 both subset train"):
        C.build({"label_rate": 30, "train_per_class": 5})
    assert C.build({"label_rate": 30}).data.train_per_class == 0  # digits' default k=20 gives way
    assert C.build({}).data.train_per_class == 20 and C.build({"dataset": "cars"}).data.train_per_class == 0
    with pytest.raises(C.ConfigError, match="--label_rate: must be > 0"):
        C.build({"label_rate": 0})


# ---------------------------------------------------------------- images: conversions and bad files

BAD = {  # file name in train/cat -> words its reason must contain
    "zero.jpg": "empty file",
    "notes.jpg": "not an image",
    "cut.jpg": "truncated",
    "broken.png": "corrupt",
    "bomb.png": "decompression bomb",
    "bomb_warn.png": "decompression bomb",
}


def _convertible() -> dict:
    """name -> (PIL image to save, save kwargs): each must come out as a correct RGB image."""
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([255, 0, 0, 0, 255, 0])
    palette.paste(1, (8, 0, 16, 16))
    rgba = Image.new("RGBA", (16, 16), (0, 0, 255, 255))
    rgba.paste((255, 0, 0, 0), (8, 0, 16, 16))  # right half: red, fully transparent
    rotated = Image.new("RGB", (20, 10), (0, 0, 255))
    rotated.paste((255, 0, 0), (0, 0, 10, 10))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    return {"gray.png": (Image.new("L", (16, 16), 128), {}),
            "gray16.png": (Image.fromarray(np.full((16, 16), 128 * 257, np.uint16)), {}),
            "rgba.png": (rgba, {}),
            "palette.png": (palette, {"transparency": 1}),
            "cmyk.jpg": (Image.new("CMYK", (16, 16), (0, 255, 255, 0)), {"quality": 95}),
            "exif.jpg": (rotated, {"exif": exif, "quality": 95}),
            "bits.png": (Image.new("1", (16, 16), 1), {})}


@pytest.fixture
def bad_folder(tmp_path):
    """Official layout, 2 classes; train/cat also holds unusual-but-valid images and broken files."""
    root = tmp_path / "pets"
    for split, n in (("train", 8), ("test", 3)):
        for c, color in (("cat", (200, 40, 40)), ("dog", (40, 200, 40))):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                _noise(color, seed=100 * (split == "test") + i).save(root / split / c / f"{i}.png")
    cat = root / "train" / "cat"
    for name, (im, kw) in _convertible().items():
        im.save(cat / name, **kw)
    (cat / "zero.jpg").write_bytes(b"")
    (cat / "notes.jpg").write_text("not a picture, a text file named .jpg\n")
    jpeg = _png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)), "JPEG")
    (cat / "cut.jpg").write_bytes(jpeg[: len(jpeg) * 6 // 10])
    png = bytearray(_png_bytes(_noise((90, 90, 90), size=32)))
    at = png.index(b"IDAT") + 8
    png[at:at + 32] = b"\xff" * 32  # garbage in the compressed pixel stream
    (cat / "broken.png").write_bytes(bytes(png))
    (cat / "bomb.png").write_bytes(_bomb(20_000, 20_000))      # PIL raises DecompressionBombError
    (cat / "bomb_warn.png").write_bytes(_bomb(10_000, 10_000))  # PIL only warns, then would decode 100 MP
    (cat / "readme.txt").write_text("ignored: not an image extension\n")
    return root


def test_to_rgb_converts_unusual_modes_correctly(bad_folder):
    cat = bad_folder / "train" / "cat"
    px = {n: to_rgb(Image.open(cat / n)) for n in _convertible()}
    assert all(im.mode == "RGB" for im in px.values())
    assert px["gray.png"].getpixel((3, 3)) == (128, 128, 128)
    assert px["gray16.png"].getpixel((3, 3)) == (128, 128, 128)  # PIL's convert would give white
    assert Image.open(cat / "gray16.png").convert("RGB").getpixel((3, 3)) == (255, 255, 255)
    assert px["rgba.png"].getpixel((2, 2)) == (0, 0, 255) and px["rgba.png"].getpixel((12, 2)) == (255, 255, 255)
    assert px["palette.png"].getpixel((2, 2)) == (255, 0, 0) and px["palette.png"].getpixel((12, 2)) == (255, 255, 255)
    assert np.abs(np.subtract(px["cmyk.jpg"].getpixel((8, 8)), (255, 0, 0))).max() <= 3
    assert px["exif.jpg"].size == (10, 20)  # portrait after the EXIF rotation
    top, bottom = px["exif.jpg"].getpixel((5, 3)), px["exif.jpg"].getpixel((5, 16))
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]  # the red left half is now on top
    assert px["bits.png"].getpixel((0, 0)) == (255, 255, 255)


def test_training_transform_applies_exif_orientation(bad_folder):
    from rifle.data.transforms import build_transform
    tf = build_transform(20, (0.5,) * 3, (0.5,) * 3, train=False)
    # An image opened directly (not through datasets, which also transposes): the transform rotates it.
    out = tf({"image": [Image.open(bad_folder / "train" / "cat" / "exif.jpg")], "label": [0]})["pixel_values"][0]
    red = (out[0] - out[2]).mean(dim=1)  # per row: red minus blue
    assert red[:8].min() > 0.5 and red[-8:].max() < -0.5


def test_scan_reports_every_bad_file_by_name_and_converts_the_rest(bad_folder, tmp_path):
    ds = load(data_config(f"imagefolder:{bad_folder}", val_fraction=0.25), scan=False).data  # the raw split, to count
    source = datasets.load_dataset("imagefolder", data_dir=str(bad_folder))
    report = scan(source, "pets", cache_dir=tmp_path / "scan", progress=False)
    found = {Path(b.file).name: b.reason for b in report.bad}
    assert set(found) == set(BAD), found
    for name, words in BAD.items():
        assert words in found[name], (name, found[name])
        assert str(bad_folder) in next(b.file for b in report.bad if Path(b.file).name == name)  # full path
    assert report.total == 16 + len(_convertible()) + len(BAD) + 6 == sum(map(len, ds.values()))
    assert {"L", "I;16", "RGBA", "P", "CMYK", "1", "RGB"} <= set(report.modes)
    assert sum(report.modes.values()) == report.total - len(BAD)


def test_bad_images_error_names_dataset_files_and_the_way_out(bad_folder):
    with pytest.raises(DataError) as err:
        load(data_config(f"imagefolder:{bad_folder}", bad_images="error", val_fraction=0.25))
    msg = str(err.value)
    assert msg.startswith(f"dataset imagefolder:{bad_folder}, column image: 6 of 35 images cannot be used (")
    assert "and 1 more" in msg and "full list: " in msg and msg.endswith("or pass --bad_images skip")
    assert sum(name in msg for name in BAD) == 5 and "\n" not in msg
    full_list = json.loads(Path(msg.split("full list: ")[1].split(")")[0]).read_text())
    assert {Path(b["file"]).name for b in full_list["bad"]} == set(BAD)


def test_bad_images_skip_drops_them_and_the_verdict_is_cached(bad_folder, hf_cache):
    first = load(data_config(f"imagefolder:{bad_folder}", bad_images="skip", val_fraction=0.25))
    assert sum(map(len, first.data.values())) == 35 - len(BAD)
    assert not first.scan.cached and len(first.scan.bad) == len(BAD) and first.scan.policy == "skip"
    assert Path(first.scan.cache_file).parent == hf_cache / "rifle_image_scan"
    again = load(data_config(f"imagefolder:{bad_folder}", bad_images="skip", val_fraction=0.25, label_rate=50))
    assert again.scan.cached and [b.file for b in again.scan.bad] == [b.file for b in first.scan.bad]
    images = again.data["train"]["image"]  # every kept image decodes
    assert all(im.size[0] > 0 for im in images)
    # A repaired file changes the dataset's fingerprint: scanned afresh, one bad file fewer.
    _noise((200, 40, 40), seed=77).save(bad_folder / "train" / "cat" / "broken.png")
    fixed = load(data_config(f"imagefolder:{bad_folder}", bad_images="skip", val_fraction=0.25))
    assert not fixed.scan.cached and len(fixed.scan.bad) == len(BAD) - 1


def test_split_emptied_by_skipping_is_named(tmp_path):
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            (tmp_path / "p" / split / c).mkdir(parents=True)
            for i in range(4):
                path = tmp_path / "p" / split / c / f"{i}.png"
                path.write_bytes(b"") if split == "test" else _noise((50, 50, 50), seed=i).save(path)
    with pytest.raises(DataError, match="split 'test' is empty \\(after skipping 8 bad images\\)"):
        load(data_config(f"imagefolder:{tmp_path / 'p'}", bad_images="skip", val_fraction=0.25))


def test_check_image_on_raw_bytes():
    assert check_image(b"", None)[0] == "empty file (0 bytes)"
    assert check_image(None, "/nonexistent/x.jpg")[0] == "file not found"
    assert check_image(_png_bytes(Image.new("LA", (4, 4), (10, 0))), None) == (None, "LA")
    assert "decompression bomb" in check_image(_bomb(20_000, 20_000), None)[0]


# ---------------------------------------------------------------- labels, columns, splits

def _labels_repo(tmp_path, train, test, **kw):
    return _parquet_repo(tmp_path / "r", {"train": train, "test": test}, **kw)


def test_label_problems_name_dataset_split_and_column(tmp_path):
    spec = f"hub:{tmp_path / 'r'}"
    _labels_repo(tmp_path, _rows(["cat", "dog"], 4), _rows(["cat", "dog", "owl"], 2, 1))
    with pytest.raises(DataError, match=f"dataset {re.escape(spec)}, split test, column fine_label: class 'owl' has no training image"):
        load(data_config(spec, image_column="img", label_column="fine_label"), scan=False)
    with pytest.raises(DataError, match="split train: no label column 'label' \\(columns: img, fine_label, caption\\); set --label_column"):
        load(data_config(spec, image_column="img"), scan=False)
    with pytest.raises(DataError, match="column caption: a classifier needs at least 2 classes, found 1 \\('a photo'\\) in splits train, test"):
        load(data_config(spec, image_column="img", label_column="caption"), scan=False)


def test_unlabelled_rows_empty_split_and_out_of_range(tmp_path):
    train = _rows(["cat", "dog"], 4)
    _parquet_repo(tmp_path / "neg", {"train": [(b, i % 2) for i, (b, _) in enumerate(train)],
                                     "test": [(b, -1) for b, _ in train[:3]]})
    with pytest.raises(DataError, match="split test, column fine_label: value -1 is not a class"):
        load(data_config(f"hub:{tmp_path / 'neg'}", image_column="img", label_column="fine_label"), scan=False)
    _parquet_repo(tmp_path / "empty", {"train": train, "test": train[:1]})
    shard = tmp_path / "empty" / "data" / "test-00000-of-00001.parquet"
    pq.write_table(pq.read_table(shard).slice(0, 0), shard)  # same schema, no rows: datasets 5 cannot read it
    with pytest.raises(DataError, match="dataset hub:.*empty: datasets cannot build .*ArrowInvalid"):
        load(data_config(f"hub:{tmp_path / 'empty'}", image_column="img", label_column="fine_label"), scan=False)
    saved = datasets.load_dataset(str(tmp_path / "neg"))
    saved["test"] = saved["test"].select([])
    saved.save_to_disk(tmp_path / "saved")
    # datasets 5 writes a 0-row split it cannot read back; the error still names the dataset.
    with pytest.raises(DataError, match=f"dataset disk:{re.escape(str(tmp_path))}/saved: datasets cannot load it"):
        load(data_config(f"disk:{tmp_path / 'saved'}", image_column="img", label_column="fine_label"), scan=False)
    # ClassLabel metadata with 2 names, and a stored value 5 (written by hand, datasets does not check it).
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])})
    (tmp_path / "oor" / "data").mkdir(parents=True)
    for split, labels in (("train", [0, 1, 0, 1]), ("test", [0, 5])):
        part = datasets.Dataset.from_dict({"image": [_noise((9, 9, 9), seed=i) for i in range(len(labels))],
                                           "label": [0] * len(labels)}, features=feats)
        table = part.data.table.set_column(1, "label", pa.array(labels, pa.int64()))
        pq.write_table(table.replace_schema_metadata(part.data.table.schema.metadata),
                       tmp_path / "oor" / "data" / f"{split}-00000-of-00001.parquet")
    with pytest.raises(DataError, match="split test, column label: value 5 outside 0..1 \\(2 classes\\)"):
        load(data_config(f"hub:{tmp_path / 'oor'}", val_fraction=0.5), scan=False)


def test_single_class_and_too_few_images_to_stratify(tmp_path):
    _labels_repo(tmp_path, _rows(["cat"], 4), _rows(["cat"], 2, 1))
    with pytest.raises(DataError, match="column fine_label: a classifier needs at least 2 classes, found 1"):
        load(data_config(f"hub:{tmp_path / 'r'}", image_column="img", label_column="fine_label"), scan=False)
    _parquet_repo(tmp_path / "tiny", {"train": _rows(["cat", "dog", "owl"], 1), "test": _rows(["cat", "dog", "owl"], 1)})
    with pytest.raises(DataError, match="split train: cannot hold out a validation split"):
        load(data_config(f"hub:{tmp_path / 'tiny'}", image_column="img", label_column="fine_label", val_fraction=0.2),
             scan=False)


# ---------------------------------------------------------------- the command line

def _one_line(proc):
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    return lines[0]


@pytest.fixture
def cli_env(tmp_path):
    return {"HF_DATASETS_CACHE": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}


@pytest.mark.slow
def test_cli_bad_images_and_bad_labels_exit_2_with_one_line(tmp_path, bad_folder, cli_env):
    line = _one_line(run_cli(["--dataset", f"imagefolder:{bad_folder}", "--output_dir", tmp_path / "o1"],
                             tmp_path, env=cli_env, timeout=120))
    assert line.startswith("rifle train: error: dataset imagefolder:") and "6 of 35 images cannot be used" in line
    _labels_repo(tmp_path, _rows(["cat", "dog"], 4), _rows(["cat", "dog", "owl"], 2, 1))
    reg = _registry_file(tmp_path / "reg.yaml", "zoo:\n  hub: ./r\n  image_column: img\n  label_column: fine_label\n"
                         "  verified: true\n")
    line = _one_line(run_cli(["--dataset", "zoo", "--dataset_registry", reg, "--output_dir", tmp_path / "o2"],
                             tmp_path, env=cli_env, timeout=120))
    assert f"dataset zoo (hub:{tmp_path / 'r'}), split test, column fine_label: class 'owl' has no training image" in line


@pytest.mark.slow
def test_cli_offline_hub_entry_and_unwritable_output_exit_2_with_one_line(tmp_path, cli_env):
    line = _one_line(run_cli(["--dataset", "cub200", "--output_dir", tmp_path / "o"], tmp_path, env=cli_env,
                             timeout=120))
    assert line.startswith("rifle train: error: dataset cub200 (hub:bentrevett/caltech-ucsd-birds-200-2011): ") \
        and "HF_HUB_OFFLINE" in line
    (tmp_path / "a_file").write_text("x")
    line = _one_line(run_cli(["--output_dir", tmp_path / "a_file" / "out"], tmp_path, env=cli_env, timeout=120))
    assert line.startswith("rifle train: error: --output_dir: cannot write to")


@pytest.mark.slow
def test_cli_trains_on_a_registry_entry_skipping_bad_images(tmp_path, bad_folder, cli_env, sqlite_uri):
    """End to end, offline: a user registry entry names the folder, bad files are skipped and logged."""
    reg = _registry_file(tmp_path / "reg.yaml", "pets:\n  source: imagefolder:./pets\n  verified: true\n")
    proc = run_cli([*TINY, "--dataset", "pets", "--dataset_registry", reg, "--bad_images", "skip", "--epochs", "1",
                    "--tricks", "", "--val_fraction", "0.25", "--tracking_uri", sqlite_uri,
                    "--output_dir", tmp_path / "out"], tmp_path, env=cli_env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped 6 of 35 images cannot be used" in proc.stderr
    client, runs = mlflow_runs(sqlite_uri)
    (run,) = runs
    assert run.data.tags["images_skipped"] == "6" and run.data.params["bad_images"] == "skip"
    assert run.data.params["dataset_registry"] == str(Path(reg).resolve())
    report = json.loads(Path(client.download_artifacts(run.info.run_id, "data/image_scan.json", str(tmp_path))).read_text())
    assert {Path(b["file"]).name for b in report["bad"]} == set(BAD) and report["policy"] == "skip"


# ---------------------------------------------------------------- output hygiene

@pytest.mark.parametrize("terminal", [False, True])
def test_data_work_shows_progress_bars_only_on_a_terminal(tmp_path, capsys, monkeypatch, terminal):
    """One rule (data.hf.quiet_progress) for datasets' bars and ours: the scan's bar and the decode cache's map bars
    show on a terminal and nowhere else, and datasets' own switch is left as it was found."""
    from rifle.data import decode_cache, hf
    datasets.enable_progress_bars()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    ds = datasets.DatasetDict(train=datasets.Dataset.from_dict(
        {"image": [_noise((90, 90, 90), seed=i) for i in range(4)], "label": [0, 1, 0, 1]}, features=feats))
    with hf.quiet_progress() as shown:
        assert shown == terminal and datasets.are_progress_bars_disabled() != terminal
        with hf.quiet_progress() as inner:  # nested (the scan inside load): the outer rule holds
            assert inner == terminal
        assert datasets.are_progress_bars_disabled() != terminal
    assert not datasets.are_progress_bars_disabled()
    capsys.readouterr()
    scan(ds, "tiny", cache_dir=tmp_path / "scan")
    decode_cache.cached(ds, 16, "raw", cache_dir=tmp_path / "decoded")
    err = capsys.readouterr().err
    assert ("checking images of tiny" in err) == terminal and ("decode cache (raw" in err) == terminal
    assert not datasets.are_progress_bars_disabled()



def test_free_space_check_refuses_a_run_that_cannot_fit(tmp_path):
    import torch
    from rifle.checkpoint import check_free_space
    small = torch.nn.Linear(10, 10)
    check_free_space(tmp_path, small, keep=2)
    huge = torch.nn.Linear(2**24, 2**24, bias=False, device="meta")  # 1 PiB of float32, never allocated
    with pytest.raises(C.ConfigError, match=r"--output_dir: \d+ MiB free for .*, the run needs about \d+ MiB "
                                            r"\(3 checkpoint\(s\) of 2147483648 MiB"):  # weights + momentum
        check_free_space(tmp_path, huge, keep=3)


def test_config_artifact_masks_the_tracking_password(tmp_path, sqlite_uri):
    from rifle.track.tracker import Tracker
    from rifle.trainer import _log_artifacts
    cfg = C.build({"tracking_uri": "http://alice:s3cret-pw@127.0.0.1:5000", "log_weights": False})
    tracker = Tracker(True, sqlite_uri, "hygiene")
    run_id = tracker.start()
    _log_artifacts(tracker, cfg, {"history": [{"epoch": 0, "val_acc": 0.5, "lr_head": 0.01, "head_reinit": 0.0}]},
                   tmp_path)
    tracker.end()
    import mlflow
    text = mlflow.tracking.MlflowClient(sqlite_uri).download_artifacts(run_id, "config.yaml", str(tmp_path))
    text = Path(text).read_text()
    assert "s3cret-pw" not in text and "http://alice:***@127.0.0.1:5000" in text


def test_torchvision_weights_are_loaded_weights_only(tmp_path, monkeypatch):
    """A tampered torchvision weights file in the cache must not run its pickled code."""
    import torch
    import torchvision
    from rifle.models import build_backbone
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    target = tmp_path / "torch" / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
    target.parent.mkdir(parents=True)
    torch.save({"fc.weight": Payload()}, target)
    with pytest.raises(Exception, match="Weights only load failed"):
        build_backbone("torchvision:resnet18", pretrained=True)
    assert not marker.exists()


def test_no_unsafe_torch_load_in_the_package():
    calls = 0
    for path in (ROOT / "src" / "rifle").rglob("*.py"):
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(", text):
            depth, end = 1, m.end()
            while depth:  # up to the matching parenthesis
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                end += 1
            calls += 1
            assert "weights_only=True" in text[m.start():end], f"{path}: {text[m.start():end]}"
    assert calls >= 2  # checkpoint.py's optimizer state, models.py's bundled weights
