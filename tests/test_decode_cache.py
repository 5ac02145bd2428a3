"""The decode cache: images decoded and resized once (HF Datasets' map, keyed by what they depend on), cropped
and flipped as uint8 tensors, normalized by the model on its device; the same pixels and draws as the PIL
path, so the same training."""
import io
import json
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from helpers import data_config, tiny_config
from PIL import Image

from conftest import mlflow_runs, subprocess_env
from rifle.data import decode_cache, load
from rifle.data.transforms import build_cached_transform, build_transform, resize_for
from rifle.models import Classifier

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def photos(n=12, seed=0):
    """JPEG photographs of several sizes and aspect ratios (crops of scikit-image's), as a Hub dataset holds."""
    from skimage import data as sk
    rng = np.random.default_rng(seed)
    src = [Image.fromarray(np.ascontiguousarray(getattr(sk, n)()[..., :3])) for n in ("astronaut", "chelsea", "coffee")]
    images = []
    for i in range(n):
        im = src[i % 3]
        w, h = (int(s * rng.uniform(0.3, 1.0)) for s in im.size)
        buf = io.BytesIO()
        im.crop((0, 0, w, h)).save(buf, format="JPEG", quality=90)
        images.append({"bytes": buf.getvalue(), "path": None})
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    return datasets.DatasetDict(train=datasets.Dataset.from_dict({"image": images, "label": [i % 3 for i in range(n)]},
                                                                 features=features))


@pytest.mark.parametrize("size", [48, 224])
def test_crops_and_flips_are_the_pil_transforms_own(tmp_path, size):
    """Over 10 draws of every image, with the same seed: the cached uint8 path, normalized as the model does,
    gives exactly the tensors of the PIL path (same resize, crop positions, flips, ToTensor and Normalize)."""
    ds = photos()
    cached = decode_cache.cached(ds, resize_for(size), "raw", cache_dir=tmp_path)["train"]
    model = Classifier(torch.nn.Flatten(), 1, 2, MEAN, STD)
    for train in (True, False):
        old = build_transform(size, MEAN, STD, train=train, hflip=True)
        new = build_cached_transform(size, train=train, hflip=True)
        for draw in range(10):
            torch.manual_seed(draw)
            want = old({"image": ds["train"]["image"], "label": ds["train"]["label"]})["pixel_values"]
            torch.manual_seed(draw)
            got = new({"pixels": cached["pixels"], "shape": cached["shape"], "label": cached["label"]})["pixel_values"]
            assert all(g.dtype == torch.uint8 for g in got)
            prepared = [model.prepare(g.unsqueeze(0))[0] for g in got]
            assert all(torch.equal(w, p) for w, p in zip(want, prepared)), (train, draw)


def test_jpeg_cache_has_the_same_crops_with_recompressed_pixels(tmp_path):
    ds = photos()
    raw = decode_cache.cached(ds, resize_for(64), "raw", cache_dir=tmp_path)["train"]
    jpeg = decode_cache.cached(ds, resize_for(64), "jpeg", cache_dir=tmp_path)["train"]
    a, b = build_cached_transform(64, train=True, fmt="raw"), build_cached_transform(64, train=True, fmt="jpeg")
    torch.manual_seed(0)
    x = torch.stack(a({"pixels": raw["pixels"], "shape": raw["shape"], "label": raw["label"]})["pixel_values"])
    torch.manual_seed(0)
    y = torch.stack(b({"image": jpeg["image"], "label": jpeg["label"]})["pixel_values"])
    diff = (x.float() - y.float()).abs()
    assert x.shape == y.shape and 0 < diff.mean() < 3 and diff.max() <= 80  # quality 90: the same crops, close pixels


def test_the_cache_is_built_once_and_rebuilt_when_an_input_changes(tmp_path, monkeypatch):
    """A second use reads the Arrow file (no image decoded again); a changed file, image size or format
    misses it."""
    root = tmp_path / "folder"
    for split in ("train", "test"):
        for c in range(2):
            (root / split / str(c)).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((40 + i, 30, 3), 60 * c + i, np.uint8)).save(root / split / str(c) / f"{i}.jpg")
    calls = []
    resize = decode_cache.resize_batch
    monkeypatch.setattr(decode_cache, "resize_batch", lambda batch, **kw: calls.append(len(batch["image"])) or
                        resize(batch, **kw))
    spec = f"imagefolder:{root}"

    def use(size=48, fmt="raw", **options):
        before = len(calls)
        splits = load(data_config(spec, val_fraction=0, **options), scan=False).data
        out = decode_cache.cached(splits, resize_for(size), fmt, cache_dir=tmp_path / "cache")
        return out, sum(calls[before:])

    first, decoded = use()
    assert decoded == 12 and sorted(first) == ["test", "train"] and first["train"].column_names == ["pixels", "shape",
                                                                                                    "label"]
    again, decoded = use()
    assert decoded == 0 and again["train"]["pixels"] == first["train"]["pixels"]  # read back, not decoded
    assert use(size=64)[1] == 12 and use(fmt="jpeg")[1] == 12
    Image.fromarray(np.zeros((41, 30, 3), np.uint8)).save(root / "train" / "0" / "1.jpg")  # one file changes
    changed, decoded = use()
    assert decoded > 0 and changed["train"]["pixels"] != first["train"]["pixels"]
    assert use(train_per_class=2)[1] > 0  # another selection of images: another cache


@pytest.mark.slow
def test_a_run_on_the_cache_trains_exactly_as_one_without(tmp_path, digits_folder):
    """raw: the same pixels, crops, flips and normalization, so the same losses and test accuracies (RIFLE,
    stochastic depth's draws and channels_last included); jpeg trains too, on recompressed pixels."""
    from rifle.trainer import fit
    results = {}
    for mode in ("off", "raw", "jpeg"):
        cfg = tiny_config(tmp_path / mode, digits_folder, decode_cache=mode, tricks="rifle,stochastic_depth",
                          hflip=True, channels_last=True)
        result = fit(cfg)
        client, (run,) = mlflow_runs(cfg.run.tracking_uri)
        results[mode] = ([m.value for m in client.get_metric_history(run.info.run_id, "train_loss")],
                         result["test_acc"], result["test_acc_last"])
    assert results["raw"] == results["off"]
    assert len(results["jpeg"][0]) == 2 and results["jpeg"][0] != results["off"][0]


@pytest.mark.slow
def test_every_data_cache_lies_under_hf_home(tmp_path, digits_folder):
    """With only $HF_HOME set, datasets' Arrow files, the image scan's verdict and the decoded images (the trainer's
    path: load, then cached_data) all land in $HF_HOME/datasets, one root. A fresh process: datasets reads HF_HOME
    when it is imported."""
    code = f"""
import json
from rifle import config
from rifle.data import load
from rifle.trainer import cached_data
cfg = config.build({{"dataset": "imagefolder:{digits_folder}", "image_size": 48, "val_fraction": 0.25}})
loaded = load(cfg.data)
decoded = cached_data(cfg, loaded.data)
print(json.dumps({{"arrow": [f["filename"] for f in loaded.data["train"].cache_files], "scan": loaded.scan.cache_file,
                  "decoded": [f["filename"] for part in decoded.values() for f in part.cache_files]}}))
"""
    env = {k: v for k, v in subprocess_env(HF_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1").items()
           if k != "HF_DATASETS_CACHE"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    files = json.loads(done.stdout.strip().splitlines()[-1])
    root = tmp_path / "home" / "datasets"
    assert Path(files["scan"]).parent == root / "rifle_image_scan"
    assert files["decoded"] and all(Path(f).parent == root / "rifle_decode" for f in files["decoded"])
    assert files["arrow"] and all(Path(f).is_relative_to(root) for f in files["arrow"])
