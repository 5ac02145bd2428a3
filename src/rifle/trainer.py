"""The fine-tuning loop on Accelerate: one process on a laptop, `accelerate launch` on clusters.

Tricks (RIFLE and the baselines) plug in through hooks (tricks/base.py); with no trick this is plain
fine-tuning with the official RIFLE recipe: SGD momentum 0.9, weight decay, per-epoch cosine.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import checkpoint, probes
from .config import RUN_ONLY, Config, ConfigError, to_yaml
from .data import fingerprint, load_splits
from .models import block_names, build_model, param_groups
from .schedules import cosine_lr
from .tracking import Tracker, git_commit, redact
from .transforms import build_transform, collate
from .tricks import build_tricks
from .tricks.base import FitContext


class NonFiniteLoss(RuntimeError):
    pass


def check_output_dir(path: str) -> None:
    """Fail before training if checkpoints cannot be written there."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        probe = Path(path) / f".write-test-{os.getpid()}"
        probe.write_bytes(b"0" * 65536)
        probe.unlink()
    except OSError as e:
        raise ConfigError("output_dir", f"cannot write to {path!r}: {e.strerror or e}") from None


def make_loaders(cfg: Config, data, mean, std):
    d = cfg.data
    train_tf = build_transform(d.image_size, mean, std, train=True, hflip=d.hflip)
    eval_tf = build_transform(d.image_size, mean, std, train=False)
    kw = dict(batch_size=cfg.optim.batch_size, num_workers=d.num_workers, collate_fn=collate,
              persistent_workers=d.num_workers > 0)
    return (DataLoader(data["train"].with_transform(train_tf), shuffle=True, drop_last=False, **kw),
            DataLoader(data["val"].with_transform(eval_tf), shuffle=False, **kw),
            DataLoader(data["test"].with_transform(eval_tf), shuffle=False, **kw))


def base_lrs(cfg: Config, epoch: int) -> dict[str, float]:
    o = cfg.optim
    return {"backbone": cosine_lr(epoch, o.epochs, o.lr), "head": cosine_lr(epoch, o.epochs, o.head_lr)}


@torch.no_grad()
def evaluate(model, loader, acc: Accelerator) -> float:
    model.eval()
    correct = total = 0
    for images, labels in loader:
        preds, labels = acc.gather_for_metrics((model(images).argmax(1), labels))
        correct += int((preds == labels).sum())
        total += labels.numel()
    return correct / max(total, 1)


def train_epoch(model, raw, loader, optimizer, tricks, acc, cfg, epoch, bar) -> dict[str, float]:
    model.train()
    losses, correct, seen = [], torch.zeros((), device=acc.device), 0
    for i, (images, labels) in enumerate(loader):
        lrs = base_lrs(cfg, epoch)
        for t in tricks:
            lrs = t.lr(lrs, epoch + i / len(loader))
        for group in optimizer.param_groups:
            group["lr"] = lrs[group["name"]]
        with acc.accumulate(model):
            logits = model(images)
            targets = labels
            for t in tricks:
                targets = t.before_loss(logits, targets)
            loss = F.cross_entropy(logits, targets)
            for t in tricks:
                extra = t.penalty(raw, images)
                loss = loss if extra is None else loss + extra
            acc.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        for t in tricks:
            t.after_step()
        losses.append(loss.detach().float())
        correct += (logits.argmax(1) == labels).sum()  # against the true labels, whatever a trick did
        seen += labels.numel()
        bar.update(1)
    per_step = torch.stack(losses)
    totals = acc.reduce(torch.stack([per_step.nansum(), correct.float(),
                                     torch.tensor(float(seen), device=acc.device),
                                     (~torch.isfinite(per_step)).sum().float()]), reduction="sum")
    if totals[3] > 0:  # every process sees the reduced count, so all stop together
        bad = torch.nonzero(~torch.isfinite(per_step)).flatten()
        step = int(bad[0]) if bad.numel() else -1
        raise NonFiniteLoss(f"loss became non-finite at epoch {epoch}, step {step} "
                            f"(lr={lrs['backbone']:g}); the last good checkpoint is kept")
    return {"train_loss": float(totals[0] / (len(losses) * acc.num_processes)),
            "train_acc": float(totals[1] / totals[2]),
            "lr_backbone": lrs["backbone"], "lr_head": lrs["head"]}


def fit(cfg: Config, on_epoch_end: Callable[[int, dict], None] | None = None) -> dict:
    """Train, select on validation, report test. `on_epoch_end(epoch, metrics)` may raise to stop (sweeps)."""
    if cfg.optim.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("mixed_precision", "fp16 needs a CUDA GPU; use bf16 or no on the CPU")
    # Without a GPU, processes started by `accelerate launch` must be told to use the CPU (gloo),
    # otherwise each one trains alone as rank 0.
    cpu_ddp = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    acc = Accelerator(cpu=cpu_ddp, mixed_precision=cfg.optim.mixed_precision,
                      gradient_accumulation_steps=cfg.optim.grad_accum_steps,
                      dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    out = Path(cfg.run.output_dir)
    if acc.is_main_process:
        check_output_dir(str(out))
    with acc.main_process_first():
        data = load_splits(cfg.data.dataset, val_fraction=cfg.data.val_fraction,
                           train_per_class=cfg.data.train_per_class, split_seed=cfg.data.split_seed,
                           revision=cfg.data.dataset_revision, image_column=cfg.data.image_column,
                           label_column=cfg.data.label_column)
    num_classes = len(data["train"].features["label"].names)
    set_seed(cfg.run.seed)  # same head init on every process
    raw = build_model(cfg.model.model, num_classes, cfg.model.pretrained)
    tricks = build_tricks(cfg)
    for t in tricks:
        t.prepare_model(raw)
    pretrained = probes.snapshot(raw.backbone)
    o = cfg.optim
    optimizer = torch.optim.SGD(param_groups(raw), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    loaders = make_loaders(cfg, data, raw.mean, raw.std)
    model, optimizer, train_loader, val_loader, test_loader = acc.prepare(raw, optimizer, *loaders)
    ctx = FitContext(raw, optimizer, acc, cfg, num_classes, math.ceil(len(train_loader) / o.grad_accum_steps),
                     pretrained, lambda: build_model(cfg.model.model, num_classes, cfg.model.pretrained).backbone,
                     train_loader)
    for t in tricks:
        t.on_fit_start(ctx)

    state = {"epoch": 0, "best_val_acc": -1.0, "best_epoch": -1, "best_file": None, "history": [],
             "run_id": None, "tricks": {}, "config": cfg.flat() | {"tracking_uri": None}}
    last = checkpoint.latest(out)
    if last is not None:
        state = checkpoint.load(last, raw, optimizer)
        changed = {k: (v, cfg.flat().get(k)) for k, v in state["config"].items()
                   if k not in RUN_ONLY and cfg.flat().get(k) != v}
        if changed:
            k, (was, now) = next(iter(changed.items()))
            raise ConfigError(k, f"{out} holds a run made with {k}={was!r}, not {now!r}: use another output_dir")
        for t in tricks:
            t.load_state_dict(state["tricks"].get(t.name, {}))
    tracker = Tracker(acc.is_main_process, cfg.run.tracking_uri, cfg.run.experiment)
    state["run_id"] = tracker.start(state["run_id"], cfg.run.run_name)
    tracker.log_params(cfg.flat() | {"tracking_uri": redact(cfg.run.tracking_uri)})
    tracker.set_tags({"git_commit": git_commit(), "dataset_fingerprint": fingerprint(data),
                      "tricks": ",".join(cfg.trick_list) or "none", "num_processes": acc.num_processes})
    tracker.sync_history(state["history"])
    blocks = block_names(raw.backbone)
    bar = tqdm(total=(o.epochs - state["epoch"]) * len(train_loader), desc="train", dynamic_ncols=True,
               disable=not (acc.is_main_process and os.isatty(2)))

    try:
        for epoch in range(state["epoch"], o.epochs):
            set_seed(cfg.run.seed * 10_007 + epoch, device_specific=True)  # an epoch's randomness is its own
            train_loader.set_epoch(epoch)
            for t in tricks:
                t.on_epoch_start(epoch)
            metrics = train_epoch(model, raw, train_loader, optimizer, tricks, acc, cfg, epoch, bar)
            metrics |= {"val_acc": evaluate(model, val_loader, acc), "head_reinit": 0.0}
            metrics |= probes.weight_distances(raw.backbone, pretrained, blocks)
            if metrics["val_acc"] > state["best_val_acc"]:  # before any re-init: the selected weights
                state |= {"best_val_acc": metrics["val_acc"], "best_epoch": epoch,
                          "best_file": f"best-{epoch:04d}.safetensors"}
                if acc.is_main_process:
                    checkpoint.save_weights(raw, out / state["best_file"])
            for t in tricks:
                t.on_epoch_end(epoch, metrics)
            state |= {"epoch": epoch + 1, "history": state["history"] + [{"epoch": epoch, **metrics}],
                      "tricks": {t.name: t.state_dict() for t in tricks}}
            if acc.is_main_process:
                checkpoint.save(out, epoch, raw, optimizer, state, cfg.run.keep_checkpoints)
                for stale in out.glob("best-*.safetensors"):
                    if stale.name != state["best_file"]:
                        stale.unlink()
            acc.wait_for_everyone()
            tracker.log_metrics(metrics, step=epoch)
            bar.set_postfix(loss=f"{metrics['train_loss']:.3f}", val=f"{metrics['val_acc']:.3f}")
            if on_epoch_end is not None:
                on_epoch_end(epoch, metrics)
        bar.close()
        final = {"test_acc_last": evaluate(model, test_loader, acc)}
        checkpoint.load_weights(raw, out / state["best_file"])
        final |= {"test_acc": evaluate(model, test_loader, acc), "best_val_acc": state["best_val_acc"],
                  "best_epoch": state["best_epoch"]}
        tracker.log_final(final)
        _log_artifacts(tracker, cfg, state, out)
    except BaseException as e:
        bar.close()
        tracker.end("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    tracker.end()
    return final | {"run_id": state["run_id"], "epochs": o.epochs}


def _log_artifacts(tracker: Tracker, cfg: Config, state: dict, out: Path) -> None:
    if not tracker.active:
        return
    from .report import plot_training
    tracker.log_artifact_text(to_yaml(cfg), "config.yaml")
    tracker.log_figure(plot_training(state["history"], f"{cfg.model.model} on {cfg.data.dataset}, "
                                     f"tricks: {','.join(cfg.trick_list) or 'none'}"), "training.png")
    if cfg.run.log_weights:
        tracker.log_file(out / state["best_file"], "model")
