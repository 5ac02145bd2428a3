"""(b) Input pipeline versus the model: images/s that the DataLoader decodes and augments from a Hugging Face
dataset (the trainer's transforms and collate, the configured worker count) against images/s the model trains
at on ready tensors (forward, backward, SGD step; same image size and batch). Target: pipeline >= 3x model.

Two datasets: the benchmark's digits (tiny 8x8 images: decoding is nearly free) and JPEG photographs of the
size of the paper's datasets (CUB-200 images are about 500x375): random crops of scikit-image's photos,
re-encoded as JPEG, in an HF dataset with an Image column decoded on access, as a Hub dataset is.

`--image_size 224` instead measures images/s per core (one process, one torch thread, no worker) of the
three input paths at that size, on the JPEG photo set and on the same photos as an ImageFolder of files:
(a) today's: decode the JPEG, resize, crop, flip, ToTensor, Normalize per image (decode_cache off);
(b) the decode cache (images stored resized, rifle.data.decode_cache) with the same PIL crop, flip,
ToTensor and Normalize per image; (c) the decode cache with the crop and flip on uint8 tensors and the
normalization per batch (the trainer's path: models.Classifier.prepare), for the raw and the JPEG cache.
The last line is JSON with `img_per_s_per_core` per path and dataset. Target: (c) >= 5x (a).
"""
from __future__ import annotations

import argparse
import io
import time

from common import Clock, Others, build, load, median, wait_until_idle, workdir

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "colorwheel",
          "stereo_motorcycle", "retina", "logo")


def photo_dataset(n: int = 320, size=(500, 375), seed: int = 0):
    """n JPEG images of `size`: random crops (40-100% of each side) of scikit-image's colour photographs."""
    import datasets
    import numpy as np
    from PIL import Image
    from skimage import data as sk

    rng = np.random.default_rng(seed)
    sources = []
    for name in PHOTOS:
        im = getattr(sk, name)()
        im = im[0] if isinstance(im, tuple) else im
        sources.append(Image.fromarray(np.ascontiguousarray(im[..., :3])).convert("RGB"))
    images, labels = [], []
    for i in range(n):
        label = i % len(sources)
        src = sources[label]
        w, h = (int(s * rng.uniform(0.4, 1.0)) for s in src.size)
        x, y = rng.integers(0, src.size[0] - w + 1), rng.integers(0, src.size[1] - h + 1)
        buf = io.BytesIO()
        src.crop((x, y, x + w, y + h)).resize(size).save(buf, format="JPEG", quality=90)
        images.append({"bytes": buf.getvalue(), "path": None})
        labels.append(label)
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=list(PHOTOS))})
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def pipeline_rate(ds, image_size: int, batch_size: int, workers: int, mean, std, hflip=True, passes: int = 2) -> float:
    """Images/s out of the trainer's DataLoader recipe, after the first batch (worker start-up excluded)."""
    from torch.utils.data import DataLoader

    from rifle.data.transforms import build_transform, collate
    loader = DataLoader(ds.with_transform(build_transform(image_size, mean, std, True, hflip)), batch_size=batch_size,
                        shuffle=True, num_workers=workers, collate_fn=collate, persistent_workers=workers > 0)
    rates = []
    for _ in range(passes):
        it = iter(loader)
        next(it)
        count, start = 0, time.perf_counter()
        for images, _ in it:
            count += images.shape[0]
        rates.append(count / (time.perf_counter() - start))
    return median(rates)


def model_rate(model_spec: str, num_classes: int, image_size: int, batch_size: int, steps: int = 6) -> float:
    """Training images/s of the model on ready tensors (after one warm-up step)."""
    import torch
    import torch.nn.functional as F

    from rifle.models import build_model
    model = build_model(model_spec, num_classes).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch_size, 3, image_size, image_size)
    y = torch.randint(0, num_classes, (batch_size,))
    times = []
    for step in range(steps + 1):
        with Clock() as c:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if step:
            times.append(c.seconds)
    return batch_size / median(times)


def run(workers: int | None = None) -> dict:
    import rifle.data  # its `load`, not common's load average
    tmp = workdir()
    cfg = build({}, tmp, "pipeline")
    workers = cfg.data.num_workers if workers is None else workers
    size, batch = cfg.data.image_size, cfg.optim.batch_size
    digits = rifle.data.load(cfg.data).data["train"]
    mean = std = (0.5, 0.5, 0.5)  # the bundled EfficientNet-Lite0's normalization
    out = {"workers": workers, "image_size": size, "batch_size": batch}
    photos = photo_dataset()
    for key, measure in (("model", lambda: model_rate(cfg.model.model, 10, size, batch)),
                         ("digits", lambda: pipeline_rate(digits, size, batch, workers, mean, std, hflip=cfg.data.hflip)),
                         ("photos", lambda: pipeline_rate(photos, size, batch, workers, mean, std))):
        wait_until_idle()
        with Others():
            out[f"{key}_img_s"] = measure()
    for key in ("digits", "photos"):
        out[f"{key}_ratio"] = out[f"{key}_img_s"] / out["model_img_s"]
    print(f"  model trains at {out['model_img_s']:.1f} img/s; pipeline: digits {out['digits_img_s']:.0f} img/s, "
          f"500x375 JPEG photos {out['photos_img_s']:.0f} img/s (workers={workers}, load {load()})", flush=True)
    return out


def folder_of(ds, root):
    """The dataset's JPEGs as files in the official layout root/train/<class>/*.jpg (one test image a class)."""
    names = ds.features["label"].names
    for i, row in enumerate(ds.cast_column("image", __import__("datasets").Image(decode=False))):
        for split in ("train", "test") if i < len(names) else ("train",):
            (root / split / names[row["label"]]).mkdir(parents=True, exist_ok=True)
            (root / split / names[row["label"]] / f"{i}.jpg").write_bytes(row["image"]["bytes"])
    return root


def path_rate(part, transform, size, batch_size, normalize=None, passes: int = 3) -> float:
    """Images/s of one pass over `part` with `transform` and the trainer's collate, in this process."""
    from torch.utils.data import DataLoader

    from rifle.data.transforms import collate
    loader = DataLoader(part.with_transform(transform), batch_size=batch_size, shuffle=True, collate_fn=collate)
    rates = []
    for _ in range(passes):
        count, start = 0, time.perf_counter()
        for images, _ in loader:
            if normalize is not None:
                images = normalize(images)
            count += images.shape[0]
        rates.append(count / (time.perf_counter() - start))
    return median(rates)


def per_core(image_size: int, batch_size: int = 32) -> dict:
    """Images/s per core of paths (a), (b) and (c) on the photo set and the ImageFolder (module docstring)."""
    import torch
    from PIL import Image
    from torchvision import transforms as T

    import rifle.data  # its `load`, not common's load average
    from rifle import config as C
    from rifle.data import decode_cache
    from rifle.data.transforms import build_cached_transform, build_transform, resize_for
    from rifle.models import Classifier
    torch.set_num_threads(1)
    tmp = workdir()
    mean = std = (0.5, 0.5, 0.5)
    model = Classifier(torch.nn.Flatten(), 1, 2, mean, std)  # only its input step: uint8 batch -> normalized
    photos = photo_dataset(n=256)
    folder = C.build({"dataset": f"imagefolder:{folder_of(photos, tmp / 'folder')}", "val_fraction": 0,
                      "selection": "last"}).data
    sets = {"photos": photos, "imagefolder": rifle.data.load(folder, scan=False).data["train"]}
    pil_tail = T.Compose([T.RandomCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])

    def pil_from_cache(batch):  # (b): the cached pixels through the PIL steps after the resize
        arrays = [decode_cache.to_array(p, s) for p, s in zip(batch["pixels"], batch["shape"])]
        return {"pixel_values": [pil_tail(Image.fromarray(a)) for a in arrays], "label": batch["label"]}

    out = {"image_size": image_size, "batch_size": batch_size, "img_per_s_per_core": {}, "cache_build_s": {}}
    for name, part in sets.items():
        wait_until_idle()
        rates = {"a_decode_each_epoch": path_rate(part, build_transform(image_size, mean, std, True), image_size,
                                                  batch_size)}
        for fmt in ("raw", "jpeg"):
            start = time.perf_counter()
            cached = decode_cache.cached(__import__("datasets").DatasetDict(train=part), resize_for(image_size), fmt,
                                         cache_dir=tmp / "cache")["train"]
            out["cache_build_s"][f"{name}_{fmt}"] = round(time.perf_counter() - start, 2)
            if fmt == "raw":
                rates["b_cache_pil_augment"] = path_rate(cached, pil_from_cache, image_size, batch_size)
            rates[f"c_cache_{fmt}_batch_augment"] = path_rate(cached, build_cached_transform(image_size, True, fmt=fmt),
                                                              image_size, batch_size, normalize=model.prepare)
        out["img_per_s_per_core"][name] = {k: round(v, 1) for k, v in rates.items()}
        a = rates["a_decode_each_epoch"]
        print(f"  {name}: " + ", ".join(f"{k} {v:.0f} img/s ({v / a:.1f}x)" for k, v in rates.items()), flush=True)
    return out


def main(argv=None) -> dict:
    import json
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num_workers", type=int, default=None, help="default: the trainer's configured num_workers")
    p.add_argument("--image_size", type=int, default=0, help="measure the three input paths per core at this size")
    args = p.parse_args(argv)
    if args.image_size:
        r = per_core(args.image_size)
        print(json.dumps(r))
        return r
    r = run(args.num_workers)
    print(f"(b) input pipeline / model: digits {r['digits_ratio']:.1f}x, JPEG photos {r['photos_ratio']:.1f}x "
          f"({r['image_size']} px, batch {r['batch_size']}, workers={r['workers']}); target >= 3x")
    return r


if __name__ == "__main__":
    main()
