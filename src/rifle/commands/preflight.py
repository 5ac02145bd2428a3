"""Before the first GPU-hour: a campaign's plan checked and priced on the machine it will train on, leaving nothing
behind (no MLflow run, no Optuna study, no checkpoint).

    rifle preflight --config configs/campaign/table1.yaml --storage env:RIFLE_STORAGE \
        --tracking_uri http://mlflow.example:5000 --output_root /scratch/rifle --workers 16

It takes the campaign's own arguments, so it checks the very plan the campaign will run: every dataset loads at
its pinned commit with the stated classes and split sizes, and a sample of its images decodes; one training step
of every method runs at the plan's batch and image size on this machine's device (images per second, peak
memory), and the input pipeline keeps up with the slowest; the Optuna storage takes a study and holds no other
campaign of this name; the tracking server answers within the network deadline; the output root is writable with
room for the checkpoints. Then it prices the plan: per cell, the epochs' images at the measured rates, validation,
the epochs' ends and the test passes, in hours in all and per worker. A table for people, or with --json one
object {"ok", "checks": [{"name", "ok", "detail"}], "estimate": {"hours", "hours_per_worker", "cells", ...}}.
Exit 0 when every check passes, 2 when one fails (each failure one line naming the dataset, path or URI).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

from .. import config as C
from .. import network
from ..track import store
from . import campaign

GIB = 2**30


@dataclasses.dataclass
class Check:
    name: str
    ok: bool
    detail: str


def parser():
    p = campaign.parser("rifle preflight", __doc__, worker=False)
    p.add_argument("--workers", type=int, default=1, help="workers (GPUs) the campaign will train on at once: the "
                   "time per worker and the checkpoints on disk at once")
    p.add_argument("--sample", type=int, default=16, help="images decoded per split of every dataset")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.tracking_uri = store.tracking_uri(getattr(args, "tracking_uri", None))
    try:
        built = campaign.build(args)
    except C.ConfigError as e:
        print(f"rifle preflight: error: {e}", file=sys.stderr)
        return 2
    configs = {(group, label): C.build(options | {"seed": 0, "output_dir": "unused"})
               for group, methods in built.runs().items() for label, options in methods.items()}
    network.apply(next(iter(configs.values())).run.network_timeout)
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no line for the throwaway study
    root = Path(args.output_root)
    made = next((p for p in (root, *root.parents) if p.exists()), None)  # what exists already stays
    try:
        return run_checks(args, built, configs, root)
    finally:
        for folder in (root, *root.parents):  # the folders the checks made, if they stayed empty
            if folder == made or not folder.is_dir() or any(folder.iterdir()):
                break
            folder.rmdir()


def run_checks(args, built, configs: dict, root: Path) -> int:
    checks, data = [], {}
    for key, cfg in _distinct(configs, data_key).items():  # every dataset and protocol once
        check, info = check_data(cfg, args.sample)
        checks.append(check)
        data[key] = info
    checks.append(check_output_root(root))
    scratch = root if checks[-1].ok else None
    steps = {}
    for key, cfg in _distinct(configs, step_key).items():  # every method (and model, size, batch) once
        info = next((data[data_key(c)] for c in configs.values() if step_key(c) == key and data[data_key(c)]), None)
        if info is not None:
            check, steps[key] = check_step(cfg, info["classes"], scratch)
            checks.append(check)
    for key, cfg in _distinct(configs, data_key).items():
        rates = [steps[step_key(c)]["train_images_per_s"] for c in configs.values()
                 if data_key(c) == key and steps.get(step_key(c))]
        if data[key] and rates:
            check, data[key]["input_images_per_s"] = check_input(cfg, data[key], min(rates))
            checks.append(check)
    checks.append(check_storage(args, built))
    checks.append(check_tracking(args.tracking_uri))
    estimate = price(built, configs, data, steps, args.workers)
    need = disk_need(built, configs, steps, args.workers)
    if need is not None and scratch is not None:
        free = shutil.disk_usage(root).free
        checks[checks.index(next(c for c in checks if c.name == "output root"))] = Check(
            "output root", free >= need, f"{root}: {free / GIB:,.1f} GiB free, the plan needs about {need / GIB:,.1f} "
            f"GiB at once ({args.workers} worker(s) checkpointing, every finished cell's selected weights)")
    ok = all(c.ok for c in checks)
    if args.json:
        print(json.dumps({"ok": ok, "checks": [dataclasses.asdict(c) for c in checks], "estimate": estimate}))
    else:
        print(table(built, checks, estimate))
    return 0 if ok else 2


def _distinct(configs: dict, key) -> dict:
    """One config per distinct key, in plan order."""
    out = {}
    for cfg in configs.values():
        out.setdefault(key(cfg), cfg)
    return out


def data_key(cfg: C.Config) -> str:
    """What loading depends on: the data options but those that only change how an image reaches the model."""
    d = dataclasses.asdict(cfg.data)
    return json.dumps({k: v for k, v in d.items() if k not in C.with_role("delivery")}, sort_keys=True)


def step_key(cfg: C.Config) -> str:
    """What a training step's cost depends on: every option but the data's, and the protocol's, and where runs go,
    except the image size (the number of classes only sizes the head)."""
    flat = cfg.flat()
    skip = set(C.with_role("run_only", "data", "step_free"))
    return json.dumps({k: v for k, v in flat.items() if k not in skip} | {"image_size": cfg.data.image_size},
                      sort_keys=True)


def check_data(cfg: C.Config, sample: int) -> tuple[Check, dict | None]:
    from ..data import DataError, load
    from ..data.scan import sample_problems
    name = f"dataset {cfg.data.dataset} ({'validated' if cfg.data.val_fraction else 'authors'})"
    start = time.perf_counter()
    try:
        loaded = load(cfg.data, scan=False)  # the run scans every image
    except DataError as e:
        return Check(name, False, str(e)), None
    checked, bad = sample_problems(loaded.data, sample)
    sizes = {split: len(part) for split, part in loaded.data.items()}
    classes = len(loaded.data["train"].features["label"].names)
    commit = f"commit {loaded.revision[:7]}, " if loaded.revision else ""
    detail = (f"{commit}{classes} classes, " + " / ".join(f"{s} {n:,}" for s, n in sizes.items()) +
              f"; {checked - len(bad)} of {checked} sampled images decode")
    if bad:
        detail += f" ({bad[0]}{'; ...' if len(bad) > 1 else ''}: the run stops unless --bad_images skip)"
    return Check(name, not bad, detail), {"data": loaded.data, "classes": classes, "sizes": sizes,
                                           "load_s": time.perf_counter() - start}


def check_step(cfg: C.Config, classes: int, scratch: Path | None) -> tuple[Check, dict | None]:
    from ..methods import method_label
    from ..trainer import measure_steps
    shape = f"{cfg.model.model}, {cfg.data.image_size} px, batch {cfg.optim.batch_size}"
    name = f"step {method_label(cfg.trick_list)} ({shape})"
    try:
        m = measure_steps(cfg, classes, scratch=scratch)
    except Exception as e:  # out of memory, a model that cannot be built: one line, the others go on
        text = " ".join(str(e).split())[:300]
        return Check(name, False, f"{type(e).__name__}: {text}"), None
    memory = f", peak {m['peak_memory_bytes'] / GIB:.1f} GiB" if m["peak_memory_bytes"] else ""
    return Check(name, True, f"{m['train_images_per_s']:,.0f} img/s training, {m['eval_images_per_s']:,.0f} "
                             f"evaluating on {m['device']}{memory}"), m


def check_input(cfg: C.Config, info: dict, needed: float, batches: int = 8) -> tuple[Check, float]:
    """The training loader's images per second over a sample of train (its worker start included, as every epoch
    pays it), against the slowest method's training rate."""
    from ..trainer import cached_data, make_loaders
    part = info["data"]["train"]
    sub = {"train": part.select(range(min(len(part), batches * cfg.optim.batch_size)))}
    start = time.perf_counter()
    cached_data(cfg, sub)  # decoding it once, as the run decodes every image once
    decode_per_image = (time.perf_counter() - start) / len(sub["train"])
    train = make_loaders(cfg, cached_data(cfg, sub), (0.5,) * 3, (0.5,) * 3)[0]
    start, seen = time.perf_counter(), 0
    for images, _ in train:
        seen += len(images)
    rate = seen / (time.perf_counter() - start)
    info["decode_s_per_image"] = decode_per_image if cfg.data.decode_cache != "off" else 0.0
    name = f"input {cfg.data.dataset}"
    how = f"{cfg.data.num_workers} loader worker(s), decode cache {cfg.data.decode_cache}"
    if rate >= needed:
        return Check(name, True, f"{rate:,.0f} img/s ({how}) >= {needed:,.0f} img/s of the slowest method"), rate
    return Check(name, False, f"{rate:,.0f} img/s ({how}) < {needed:,.0f} img/s of the slowest method: the GPU would "
                              "wait for data; raise --num_workers or keep --decode_cache raw"), rate


def check_output_root(root: Path) -> Check:
    from ..checkpoint import check_output_dir
    try:
        check_output_dir(str(root))
    except C.ConfigError as e:
        return Check("output root", False, str(e).removeprefix("--output_dir: "))
    return Check("output root", True, f"{root}: writable")


def check_storage(args, built) -> Check:
    from ..workers.cells import CellPolicy
    from ..workers.storage import MEMORY, SweepError, check_storage, resolve_url
    if not args.storage:
        return Check("storage", True, "none: one worker in this process keeps the cells in memory")
    try:
        url = resolve_url(args.storage)
        if url == MEMORY:
            return Check("storage", True, "in memory")
        return Check("storage", True, check_storage(url, f"campaign:{built.name}", CellPolicy(built)))
    except SweepError as e:
        return Check("storage", False, str(e))


def check_tracking(uri: str) -> Check:
    from ..track.store import check_tracking
    try:
        return Check("tracking", True, check_tracking(uri))
    except (network.Unreachable, OSError) as e:
        return Check("tracking", False, str(e))


def cell_seconds(cfg: C.Config, data: dict, step: dict) -> float:
    """A cell's time: building the model and reading the data, each epoch's training images (the input pipeline's
    time added to the model's when the loader runs in the training process, `num_workers` 0; overlapped, the slower
    of the two, when worker processes prepare the batches), its validation images and its end (checkpoint, probes),
    then the two test passes (last and selected weights)."""
    sizes = data["sizes"]
    model, feed = 1 / step["train_images_per_s"], 1 / (data.get("input_images_per_s") or float("inf"))
    per_image = model + feed if cfg.data.num_workers == 0 else max(model, feed)
    epoch = sizes["train"] * per_image + sizes.get("val", 0) / step["eval_images_per_s"] + step["epoch_end_s"]
    return step["build_s"] + data["load_s"] + cfg.optim.epochs * epoch + 2 * sizes["test"] / step["eval_images_per_s"]


def price(built, configs: dict, data: dict, steps: dict, workers: int) -> dict:
    """The plan's time in hours, in all and per worker (cells are whole: at least the longest one), from what the
    checks measured; cells whose dataset or step failed are left out and counted. Each dataset's decode cache is
    built once, by the first of its cells."""
    seconds, priced, per_group = 0.0, 0, {}
    for (group, label), cfg in configs.items():
        info, step = data.get(data_key(cfg)), steps.get(step_key(cfg))
        if info is None or step is None:
            continue
        s = cell_seconds(cfg, info, step)
        per_group.setdefault(group, {})[label] = round(s, 1)
        seconds += s * len(built.seeds)
        priced += len(built.seeds)
    once = sum(info.get("decode_s_per_image", 0.0) * sum(info["sizes"].values()) for info in data.values() if info)
    seconds += once
    longest = max((s for g in per_group.values() for s in g.values()), default=0.0)
    cells = len(configs) * len(built.seeds)
    return {"hours": round(seconds / 3600, 3), "hours_per_worker": round(max(seconds / workers, longest) / 3600, 3),
            "cells": cells, "cells_priced": priced, "workers": workers, "seconds_per_cell": per_group,
            "decode_cache_hours": round(once / 3600, 3)}


def disk_need(built, configs: dict, steps: dict, workers: int) -> int | None:
    """Bytes on the output root at once: `workers` runs checkpointing (checkpoint.footprint) and the selected
    weights every finished cell keeps."""
    sizes = [(steps[step_key(c)], c) for c in configs.values() if steps.get(step_key(c))]
    if not sizes:
        return None
    running = max((c.run.keep_checkpoints + 1) * s["checkpoint_bytes"] + 2 * s["weights_bytes"] for s, c in sizes)
    kept = sum(s["weights_bytes"] for s, c in sizes) * len(built.seeds)
    return min(workers, len(configs) * len(built.seeds)) * running + kept


def table(built, checks: list[Check], estimate: dict) -> str:
    groups, methods = len(built.runs()), len(built.methods)
    lines = [f"rifle preflight: campaign {built.name!r}: {estimate['cells']} cells ({groups} group(s) x {methods} "
             f"method(s) x {len(built.seeds)} seed(s))"]
    width = max(len(c.name) for c in checks)
    lines += [f"  {'ok  ' if c.ok else 'FAIL'}  {c.name:<{width}}  {c.detail}" for c in checks]
    left = estimate["cells"] - estimate["cells_priced"]
    lines.append(f"estimate: {estimate['hours']:,.2f} hours of training in all, {estimate['hours_per_worker']:,.2f} "
                 f"on each of {estimate['workers']} worker(s)"
                 + (f"; {left} cell(s) not priced (their check failed)" if left else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
