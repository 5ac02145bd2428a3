"""(a) Trainer throughput versus a bare PyTorch loop: same model, data, transforms, batch size and threads.

The trainer runs as users run it (`fit`: Accelerate, per-epoch reseeding, the probes, checkpoints and MLflow
logging on SQLite); after each of its epochs, from its epoch-end callback, the bare loop trains and validates one
epoch of its own. So every trainer epoch is measured beside a bare epoch a few seconds later, on the same warm
process: these 2 shared cores drift by 10% and more within a minute, which whole runs measured one after the
other (this benchmark until 2026-12-07) put into the ratio. A trainer epoch is the time from the end of one bare
epoch to the start of the next: its training and validation passes, its epoch end and the callbacks. The first
epoch of each run warms up and is not counted; a run during which other processes took more than 10% of the CPU
is measured again. The figure is the median over epoch pairs of bare epoch time / trainer epoch time (= trainer
images/s / bare images/s). Target: >= 0.97.
"""
from __future__ import annotations

import argparse
import math
import time

from common import BASE, Others, build, median, median_ci, wait_until_idle, workdir


def bare_loop(cfg):
    """The baseline: a plain PyTorch fine-tuning loop on the trainer's input path. A function that trains and
    validates epoch `epoch` (cosine learning rate) and returns its seconds; the numbers of training and validation
    images of an epoch."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from rifle.data import load
    from rifle.data.transforms import build_cached_transform, build_transform, collate
    from rifle.models import build_model
    from rifle.trainer import cached_data

    data = cached_data(cfg, load(cfg.data).data)  # the trainer's input path: the decode cache unless off
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model.model, len(data["train"].features["label"].names))
    d, o = cfg.data, cfg.optim
    if d.decode_cache == "off":
        train_tf = build_transform(d.image_size, model.mean, model.std, True, d.hflip)
        eval_tf = build_transform(d.image_size, model.mean, model.std, False)
    else:  # uint8 batches: the model normalizes them (Classifier.prepare)
        train_tf = build_cached_transform(d.image_size, True, d.hflip, d.decode_cache)
        eval_tf = build_cached_transform(d.image_size, False, fmt=d.decode_cache)
    train = DataLoader(data["train"].with_transform(train_tf), batch_size=o.batch_size, shuffle=True,
                       collate_fn=collate, num_workers=d.num_workers)
    val = DataLoader(data["val"].with_transform(eval_tf), batch_size=o.batch_size, collate_fn=collate,
                     num_workers=d.num_workers)
    opt = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)

    def epoch_seconds(epoch: int) -> float:
        start = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = 0.5 * o.lr * (1 + math.cos(math.pi * epoch / o.epochs))
        model.train()
        for images, labels in train:
            loss = F.cross_entropy(model(images), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for images, labels in val:
                correct += int((model(images).argmax(1) == labels).sum())
        return time.perf_counter() - start

    return epoch_seconds, len(data["train"]), len(data["val"])


def interleaved(cfg) -> tuple[list[float], list[float], int, int]:
    """One `fit` with a bare epoch after each trainer epoch: (trainer seconds, bare seconds) of epochs 1.. (the
    first warms up), and the numbers of training and validation images of an epoch."""
    from rifle.trainer import fit
    bare, images, val_images = bare_loop(cfg)
    ends, starts, bare_s = [], [], []

    def between(epoch, metrics):
        ends.append(time.perf_counter())
        bare_s.append(bare(epoch))
        starts.append(time.perf_counter())

    fit(cfg, callbacks=[between])
    return [e - s for s, e in zip(starts, ends[1:])], bare_s[1:], images, val_images


def run(runs: int = 5, epochs: int = 7, values: dict | None = None, max_others: float = 0.10) -> dict:
    """`runs` runs of `epochs` epochs each (epochs - 1 pairs a run); a run during which other processes took
    more than `max_others` of the CPU is measured again (at most `runs` extra attempts) and its pairs are
    reported as discarded."""
    import common
    tmp = workdir()
    values = values or {}
    ratios, trainer_s, bare_s, discarded = [], [], [], []
    attempt = 0
    while len(ratios) < runs * (epochs - 1) and attempt < 2 * runs:
        cfg = build({"epochs": epochs, "seed": attempt} | values, tmp, f"t{attempt}")
        wait_until_idle()
        with Others():
            t, b, images, val_images = interleaved(cfg)
        attempt += 1
        pairs = [y / x for x, y in zip(t, b)]
        line = (f"  run {attempt}: trainer {median(t):.2f} s/epoch, bare {median(b):.2f} s/epoch, epoch pairs "
                f"{' '.join(f'{r:.3f}' for r in pairs)}, other processes {100 * common.OTHERS[-1]:.0f}% of the CPU")
        if common.OTHERS[-1] > max_others:
            discarded += pairs
            print(line + ": discarded, measured again", flush=True)
            continue
        print(line, flush=True)
        trainer_s += t
        bare_s += b
        ratios += pairs
    if not ratios:
        raise RuntimeError(f"other processes kept more than {100 * max_others:.0f}% of the CPU busy in every run")
    return {"ratio": median(ratios), "ci": median_ci(ratios), "ratios": ratios, "discarded": discarded,
            "trainer_epoch_s": median(trainer_s), "bare_epoch_s": median(bare_s), "train_images": images,
            "val_images": val_images, "trainer_img_s": images / median(trainer_s),
            "bare_img_s": images / median(bare_s)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--epochs", type=int, default=7, help="per run; the first is not timed")
    args = p.parse_args(argv)
    r = run(args.runs, args.epochs)
    lo, hi = r["ci"]
    print(f"(a) trainer / bare loop throughput: median ratio {r['ratio']:.3f} (95% CI {lo:.3f}-{hi:.3f}) "
          f"over {len(r['ratios'])} epoch pairs (trainer {r['trainer_img_s']:.1f} img/s, bare {r['bare_img_s']:.1f} "
          f"img/s, {r['train_images']} training + {r['val_images']} validation images per epoch, "
          f"{BASE['image_size']} px, batch {BASE['batch_size']}); target >= 0.97")
    return r


if __name__ == "__main__":
    main()
