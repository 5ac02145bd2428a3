"""(b) Input pipeline versus the model: images/s that the DataLoader decodes and augments from a Hugging Face
dataset (the trainer's transforms and collate, the configured worker count) against images/s the model trains
at on ready tensors (forward, backward, SGD step; same image size and batch). Target: pipeline >= 3x model.

Two datasets: the benchmark's digits (tiny 8x8 images: decoding is nearly free) and JPEG photographs of the
size of the paper's datasets (CUB-200 images are about 500x375): random crops of scikit-image's photos,
re-encoded as JPEG, in an HF dataset with an Image column decoded on access, as a Hub dataset is.
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
    from rifle.data import load_data
    tmp = workdir()
    cfg = build({}, tmp, "pipeline")
    workers = cfg.data.num_workers if workers is None else workers
    size, batch = cfg.data.image_size, cfg.optim.batch_size
    digits = load_data(cfg.data)[0]["train"]
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


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num_workers", type=int, default=None, help="default: the trainer's configured num_workers")
    args = p.parse_args(argv)
    r = run(args.num_workers)
    print(f"(b) input pipeline / model: digits {r['digits_ratio']:.1f}x, JPEG photos {r['photos_ratio']:.1f}x "
          f"({r['image_size']} px, batch {r['batch_size']}, workers={r['workers']}); target >= 3x")
    return r


if __name__ == "__main__":
    main()
