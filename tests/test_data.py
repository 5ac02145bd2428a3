import io

import numpy as np
import pytest
from helpers import data_config
from PIL import Image

from rifle.data import DataError, fingerprint, load


def _png(color, size=12, seed=0):
    rng = np.random.default_rng([*color, seed])
    arr = np.clip(np.array(color)[None, None, :] + rng.integers(-20, 20, (size, size, 3)), 0, 255)
    return Image.fromarray(arr.astype(np.uint8))


@pytest.fixture
def imagefolder(tmp_path):
    """The official RIFLE layout: root/train/<class>/*.jpg, root/test/<class>/*.jpg."""
    colors = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}
    for split, n in (("train", 10), ("test", 4)):
        for name, color in colors.items():
            (tmp_path / "flowers" / split / name).mkdir(parents=True)
            for i in range(n):
                _png(color, seed=100 * (split == "test") + i).save(tmp_path / "flowers" / split / name / f"{i}.png")
    return tmp_path / "flowers"


def test_digits_splits_are_stratified_and_disjoint():
    ds = load(data_config("digits", val_fraction=0.2, train_per_class=7, split_seed=1), scan=False).data
    assert set(ds) == {"train", "val", "test"}
    assert np.bincount(ds["train"]["label"]).tolist() == [7] * 10
    val_counts = np.bincount(ds["val"]["label"], minlength=10)
    assert val_counts.min() >= 15 and val_counts.max() - val_counts.min() <= 1  # stratified
    assert len(ds["test"]) == 899 and len(ds["val"]) == 180 and ds["train"][0]["image"].mode == "RGB"
    other = load(data_config("digits", val_fraction=0.2, train_per_class=7, split_seed=2), scan=False).data
    assert fingerprint(other) != fingerprint(ds)
    again = load(data_config("digits", val_fraction=0.2, train_per_class=7, split_seed=1), scan=False).data
    assert fingerprint(again) == fingerprint(ds)


def test_digits_test_split_independent_of_split_seed():
    a = load(data_config("digits", split_seed=1), scan=False).data
    b = load(data_config("digits", split_seed=5), scan=False).data
    assert a["test"]["label"] == b["test"]["label"]
    assert [np.asarray(i).sum() for i in a["test"]["image"][:50]] == [np.asarray(i).sum() for i in b["test"]["image"][:50]]


def test_imagefolder_official_layout(imagefolder):
    ds = load(data_config(f"imagefolder:{imagefolder}", val_fraction=0.2), scan=False).data
    assert ds["train"].features["label"].names == ["blue", "green", "red"]
    assert (len(ds["train"]), len(ds["val"]), len(ds["test"])) == (24, 6, 12)
    assert np.bincount(ds["val"]["label"]).tolist() == [2, 2, 2]
    pixels = {s: {np.asarray(im).tobytes() for im in ds[s]["image"]} for s in ds}
    assert sum(map(len, pixels.values())) == 42  # every image is unique...
    assert not (pixels["train"] & pixels["val"] or pixels["train"] & pixels["test"] or pixels["val"] & pixels["test"])
    red = ds["train"].features["label"].str2int("red")
    image = next(im for im, lab in zip(ds["test"]["image"], ds["test"]["label"]) if lab == red)
    assert np.asarray(image)[..., 0].mean() > 150  # labels follow the folders


def test_hub_style_parquet_repo_with_other_column_names(tmp_path):
    """A local folder laid out like a Hub parquet repo goes through datasets.load_dataset, as a Hub id does."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "repo" / "data").mkdir(parents=True)
    names = ["cat", "dog", "owl"]
    for split, n in (("train", 8), ("test", 3)):
        rows = {"img": [], "fine_label": []}
        for c, name in enumerate(names):
            for _ in range(n):
                buf = io.BytesIO()
                _png((60 * c + 20, 90, 150), seed=len(rows["img"])).save(buf, format="PNG")
                rows["img"].append({"bytes": buf.getvalue(), "path": None})
                rows["fine_label"].append(name)
        pq.write_table(pa.table(rows), tmp_path / "repo" / "data" / f"{split}-00000-of-00001.parquet")
    with pytest.raises(DataError, match="split train: no label column 'label'.*fine_label"):
        load(data_config(f"hub:{tmp_path / 'repo'}", image_column="img"), scan=False)
    options = data_config(f"hub:{tmp_path / 'repo'}", image_column="img", label_column="fine_label", val_fraction=0.25)
    ds = load(options, scan=False).data
    assert ds["train"].features["label"].names == names
    assert (len(ds["train"]), len(ds["val"]), len(ds["test"])) == (18, 6, 9)
    assert ds["test"][0]["image"].size == (12, 12)


def test_single_class_is_refused(tmp_path):
    for split in ("train", "test"):
        (tmp_path / "one" / split / "only").mkdir(parents=True)
        for i in range(4):
            _png((10, 10, 10)).save(tmp_path / "one" / split / "only" / f"{i}.png")
    with pytest.raises(DataError, match="at least 2 classes"):
        load(data_config(f"imagefolder:{tmp_path / 'one'}", val_fraction=0.25), scan=False)
