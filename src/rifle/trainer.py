"""The fine-tuning loop on Accelerate: one process on a laptop, `accelerate launch` on clusters.

Tricks (RIFLE and the baselines) change training through hooks (tricks/base.py); callbacks only observe it
(see `fit`). With no trick this is plain fine-tuning with the official RIFLE recipe: SGD momentum 0.9,
weight decay, per-epoch cosine.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, is_compiled_module, set_seed
from torch.utils.data import DataLoader

from . import checkpoint, env, launch, network, probes
from . import keys as K
from .callbacks import Callback, as_callback
from .config import RUN_ONLY, Config, ConfigError, clr_cycle_count, reinit_count, reinit_epochs, to_yaml
from .data import decode_cache, fingerprint, load
from .data.transforms import build_cached_transform, build_transform, collate, resize_for
from .models import block_names, build_model, param_groups
from .network import redact
from .progress import Progress
from .schedules import cosine_lr, period_boundaries
from .seeds import EpochOrder, seed_process, stream_seed
from .track.signals import unmasked
from .track.tracker import Tracker, TrackingLost
from .tricks import build_tricks
from .tricks.base import FitContext


class NonFiniteLoss(RuntimeError):
    pass


def make_loaders(cfg: Config, data, mean, std):
    """Train, val (with validation) and test loaders. With the decode cache (`data` from `cached_data`) they
    give uint8 batches, which the model normalizes on its device (models.Classifier.prepare)."""
    d = cfg.data
    if d.decode_cache == "off":
        train_tf = build_transform(d.image_size, mean, std, train=True, hflip=d.hflip)
        eval_tf = build_transform(d.image_size, mean, std, train=False)
    else:
        train_tf = build_cached_transform(d.image_size, train=True, hflip=d.hflip, fmt=d.decode_cache)
        eval_tf = build_cached_transform(d.image_size, train=False, fmt=d.decode_cache)
    kw = dict(batch_size=cfg.optim.batch_size, num_workers=d.num_workers,
              collate_fn=collate_channels_last if cfg.run.channels_last and d.decode_cache == "off" else collate,
              pin_memory=cfg.run.pin_memory and torch.cuda.is_available())  # CPU-only torch warns and ignores it
    # Training workers are started anew every epoch from the loader's generator, which `fit` seeds per epoch
    # and process: kept workers would carry their random state across epochs, and a resumed run would then
    # augment differently from the uninterrupted one. The order comes from (seed, epoch) only (EpochOrder).
    train = DataLoader(data["train"].with_transform(train_tf), drop_last=False, persistent_workers=False,
                       sampler=EpochOrder(len(data["train"]), cfg.run.seed), generator=torch.Generator(), **kw)
    return (train, *(DataLoader(data[split].with_transform(eval_tf), shuffle=False,
                                persistent_workers=d.num_workers > 0, **kw)
                     for split in ("val", "test") if split in data))  # no val with val_fraction=0


def cached_data(cfg: Config, data):
    """`data` with every image decoded and resized once (rifle.data.decode_cache), or as is with
    decode_cache off."""
    if cfg.data.decode_cache == "off":
        return data
    return decode_cache.cached(data, resize_for(cfg.data.image_size), cfg.data.decode_cache,
                               num_proc=cfg.data.num_proc or None)


def collate_channels_last(items: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """`collate` with the images in channels-last layout, matching a channels-last model (module level so
    worker processes can pickle it)."""
    images, labels = collate(items)
    return images.contiguous(memory_format=torch.channels_last), labels


@torch.no_grad()
def evaluate(model, loader, acc: Accelerator) -> float:
    model.eval()
    correct = total = 0
    for images, labels in loader:
        preds, labels = acc.gather_for_metrics((model(images).argmax(1), labels))
        correct += int((preds == labels).sum())
        total += labels.numel()
    return correct / max(total, 1)


def train_step(s: "Session", images, labels, epoch: int, fraction: float, callbacks: tuple = ()) -> tuple:
    """One batch: the tricks' learning rates at epoch + fraction, forward, the tricks' targets and penalties, backward,
    the callbacks' after_backward (the gradient the optimizer is about to use), the optimizer step. (loss, logits,
    lrs)."""
    cfg, acc, optimizer = s.cfg, s.acc, s.optimizer
    lrs = {"backbone": cosine_lr(epoch, cfg.optim.epochs, cfg.optim.lr),
           "head": cosine_lr(epoch, cfg.optim.epochs, cfg.optim.head_lr)}
    for t in s.tricks:
        lrs = t.lr(lrs, epoch + fraction)
    for group in optimizer.param_groups:
        group["lr"] = lrs[group["name"]]
    with acc.accumulate(s.model):
        logits = s.model(images)
        targets = labels
        for t in s.tricks:
            targets = t.before_loss(logits, targets)
        loss = F.cross_entropy(logits, targets)
        for t in s.tricks:
            extra = t.penalty(s.raw, images)
            loss = loss if extra is None else loss + extra
        if s.grads_spent:  # the last optimizer step used them. Freed here, while the forward's activations hold
            # the heap: freed right after the step, glibc returns their pages and the next forward faults them
            # in again, 9% of a CPU step (docs/results/performance.md). Same values: backward starts from None.
            s.model.zero_grad(set_to_none=True)
        acc.backward(loss)
        if callbacks and acc.sync_gradients:
            scale = acc.scaler.get_scale() if acc.scaler is not None else 1.0
            for c in callbacks:
                c.after_backward(scale)
        optimizer.step()  # Accelerate steps only at the end of an accumulation window
        s.grads_spent = acc.sync_gradients
    return loss, logits, lrs


def train_epoch(s: "Session", epoch: int, bar, callbacks: tuple[Callback, ...] = ()) -> dict[str, float]:
    s.model.train()
    loader, acc = s.loaders[0], s.acc
    losses, correct, seen = [], torch.zeros((), device=acc.device), 0
    for i, (images, labels) in enumerate(loader):
        loss, logits, lrs = train_step(s, images, labels, epoch, i / len(loader), callbacks)
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
    return {K.TRAIN_LOSS: float(totals[0] / (len(losses) * acc.num_processes)),
            K.TRAIN_ACC: float(totals[1] / totals[2]),
            K.LR_BACKBONE: lrs["backbone"], K.LR_HEAD: lrs["head"]}


@dataclass
class Session:
    """Everything one run holds, built by `setup`."""
    cfg: Config
    acc: Accelerator
    out: Path
    raw: torch.nn.Module          # the unwrapped Classifier (tricks and checkpoints use it)
    model: torch.nn.Module        # what accelerate prepared (DDP-wrapped under several processes)
    optimizer: torch.optim.Optimizer
    loaders: tuple                # train, val, test
    tricks: list
    pretrained: dict              # backbone weights before fine-tuning (CPU), for the probes
    probe: probes.BlockProbe      # weight distances and gradient flow per block, a callback of every run
    tracker: Tracker
    state: dict                   # what a checkpoint stores: counters, best record, history
    grads_spent: bool = True      # the parameters' gradients were used by an optimizer step (train_step)


def setup(cfg: Config, mlflow_run_id: str | None = None) -> Session:
    """Accelerator, data, model, tricks, optimizer; resumes from the newest checkpoint in output_dir."""
    acc, out, o = make_accelerator(cfg), Path(cfg.run.output_dir), cfg.optim
    if acc.is_main_process:
        checkpoint.check_output_dir(str(out))
    with acc.main_process_first():  # the main process fills the datasets caches, the others read them
        loaded = load(cfg.data)  # checks every image once (cached): bad files stop here or are skipped
        data, scan = loaded.data, loaded.scan
        decoded = cached_data(cfg, data)
    num_classes = len(data["train"].features["label"].names)
    raw, tricks = make_model(cfg, acc, num_classes, out)
    pretrained = probes.snapshot(raw.backbone)
    optimizer = torch.optim.SGD(param_groups(raw), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    model, optimizer, *loaders = acc.prepare(raw, optimizer, *make_loaders(cfg, decoded, raw.mean, raw.std))
    if "val" not in data:
        loaders.insert(1, None)
    if cfg.run.compile and not is_compiled_module(model):
        # Here rather than Accelerator(dynamo_backend=...): Accelerate keeps the first run's backend for
        # every later Accelerator of the process (sweeps, tests). Wraps DDP, as Accelerate does.
        model = torch.compile(model, backend=cfg.run.compile_backend)
    ctx = FitContext(raw, optimizer, acc, num_classes, pretrained,
                     lambda: build_model(cfg.model.model, num_classes, cfg.model.pretrained,
                                         cfg.model.backbone_dropout, cfg.model.weights).backbone,
                     loaders[0], data_fingerprint=fingerprint(data))
    for t in tricks:
        t.on_fit_start(ctx)
    state = resume(cfg, out, raw, optimizer, tricks)
    tracker = start_tracking(cfg, acc, state, mlflow_run_id)
    tracker.log_params({K.OPTIMIZER_STEPS: o.epochs * math.ceil(len(loaders[0]) / o.grad_accum_steps),
                        K.WEIGHTS_RESOLVED: raw.weights_resolved})  # the weights the backbone loaded
    tracker.set_tags({K.DATASET_FINGERPRINT: ctx.data_fingerprint, K.DATASET_COMMIT: loaded.revision})
    tracker.log_data(cfg.data.dataset, cfg.data.dataset_registry, data, loaded.revision, ctx.data_fingerprint)
    tracker.log_classes(data["train"].features["label"].names)  # label index -> name, for the logged model
    if scan is not None:  # which images were checked, their modes, and any skipped (bad_images=skip)
        tracker.log_artifact_text(scan.to_json(), "data/image_scan.json")
        tracker.set_tags({K.IMAGES_SKIPPED: len(scan.bad)})
    # every method measured at the period boundaries, where RIFLE (if trained) re-initializes: ratios side by side
    blocks = block_names(raw.backbone)
    probe = probes.BlockProbe(raw.backbone, blocks, pretrained, cfg.run.probe_reinit_steps,
                              period_boundaries(o.epochs, cfg.tricks.reinit_times))
    tracker.set_tags({K.BLOCK_ORDER: ",".join(blocks)})  # the report orders its per-block panels by it
    return Session(cfg, acc, out, raw, model, optimizer, tuple(loaders), tricks, pretrained, probe, tracker, state)


def make_accelerator(cfg: Config) -> Accelerator:
    """The run's Accelerator, after the threads and deterministic settings (rifle.env) are applied."""
    if cfg.optim.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("mixed_precision", "fp16 needs a CUDA GPU; use bf16 or no on the CPU")
    launch.warn_one_process_launch()
    env.apply(cfg.run.threads, cfg.run.deterministic)
    from accelerate.state import AcceleratorState
    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != cfg.optim.mixed_precision:
        # The state is process-wide: a second run in this process (a sweep, tests) with another precision
        # needs it rebuilt; the distributed setup (PartialState) is kept.
        AcceleratorState._reset_state()
    return Accelerator(cpu=launch.cpu_processes(), mixed_precision=cfg.optim.mixed_precision,
                       gradient_accumulation_steps=cfg.optim.grad_accum_steps,
                       # no seedable sampler: the training sampler is our own EpochOrder
                       dataloader_config=DataLoaderConfiguration(non_blocking=cfg.run.pin_memory))


def make_model(cfg: Config, acc: Accelerator, num_classes: int, out: Path | None) -> tuple[torch.nn.Module, list]:
    """The Classifier (the same head init on every process) with the tricks' module surgery, and the tricks; the
    free space for its checkpoints in `out` checked (None: no files)."""
    set_seed(cfg.run.seed)
    raw = build_model(cfg.model.model, num_classes, cfg.model.pretrained, cfg.model.backbone_dropout,
                      cfg.model.weights)
    if cfg.optim.sync_bn and acc.num_processes > 1:  # before the tricks hook BatchNorm modules: it replaces them
        from .sync_bn import convert_sync_batchnorm
        raw = convert_sync_batchnorm(raw, cpu=acc.device.type == "cpu")
    if acc.is_main_process and out is not None:
        checkpoint.check_free_space(out, raw, cfg.run.keep_checkpoints, momentum=cfg.optim.momentum > 0)
    tricks = build_tricks(cfg)
    for t in tricks:
        t.prepare_model(raw)
    if cfg.run.channels_last:  # after module surgery, so modules the tricks add are converted too
        raw.to(memory_format=torch.channels_last)
        raw.channels_last = True
    return raw, tricks


def resume(cfg: Config, out: Path, raw, optimizer, tricks) -> dict:
    """The state of the newest checkpoint in `out` (weights, optimizer and tricks loaded), else a fresh one."""
    last = checkpoint.latest(out)
    if last is None:
        return {"epoch": 0, "best_val_acc": -1.0, "best_epoch": -1, "best_file": None, "history": [],
                "run_id": None, "tricks": {}, "config": cfg.flat() | {"tracking_uri": None}}
    state = checkpoint.load(last, raw, optimizer)
    check_same_run(cfg, state["config"])
    for t in tricks:
        t.load_state_dict(state["tricks"].get(t.name, {}))
    return state


def start_tracking(cfg: Config, acc: Accelerator, state: dict, mlflow_run_id: str | None) -> Tracker:
    """The run's tracker, started (the resumed run, `mlflow_run_id`, `mlflow run`'s or a new one), with the
    params, tags, environment (env.*, git_commit and git_dirty) and source (mlflow.source.*) every run has, and
    the checkpointed epochs the run does not have yet."""
    tracker = Tracker(acc.is_main_process, cfg.run.tracking_uri, cfg.run.experiment, cfg.run.system_metrics)
    state["run_id"] = tracker.start(state["run_id"], cfg.run.run_name, forced_run_id=mlflow_run_id)
    tracker.log_params(run_params(cfg))
    git = env.git_state() if acc.is_main_process else {}
    tracker.set_tags({K.TRICKS_TAG: ",".join(cfg.trick_list) or "none", K.NUM_PROCESSES: acc.num_processes}
                     | git | env.environment(acc.device))
    tracker.set_source(git.get(K.GIT_COMMIT))
    tracker.sync_history(state["history"])
    return tracker


def run_params(cfg: Config) -> dict:
    """A run's MLflow params: every resolved option (the tracking URI without its password), the number of
    re-inits RIFLE really makes, the whole cycles cyclic_lr fits to the budget (0 without either) and the epochs
    it really trains (after RIFLE's truncation to a multiple of K+1)."""
    return cfg.flat() | {"tracking_uri": redact(cfg.run.tracking_uri), K.REINIT_COUNT: reinit_count(cfg),
                         K.CLR_CYCLES: clr_cycle_count(cfg), K.EPOCHS_TRAINED: cfg.optim.epochs}


def check_same_run(cfg: Config, recorded: dict) -> None:
    """A run resumes (or is found finished) only in an output_dir made with the same training options."""
    changed = [(k, v) for k, v in recorded.items() if k not in RUN_ONLY and cfg.flat().get(k) != v]
    if changed:
        k, was = changed[0]
        raise ConfigError(k, f"{cfg.run.output_dir} holds a run made with {k}={was!r}, not {cfg.flat()[k]!r}: "
                          "use another output_dir")


def already_finished(cfg: Config, done: dict, mlflow_run_id: str | None) -> dict:
    """A finished output_dir is not trained again: say so and return its result. A run made for this call
    (`mlflow run`'s, or a sweep's or study's child run) becomes a complete copy of the finished run (its params,
    tags, dataset inputs and metrics, tagged finished_earlier_in_run; Tracker.copy_finished), which the report
    counts as the finished run's one result."""
    check_same_run(cfg, done["config"])
    result = done["result"]
    if not launch.distributed_state().is_main_process:
        return result
    target = mlflow_run_id or os.environ.get("MLFLOW_RUN_ID")
    copy = bool(target) and target != result["run_id"]
    where = f"; its result follows, copied into run {target} (tag {K.COPY_TAG})" if copy else "; its result follows"
    print(f"rifle: {cfg.run.output_dir} holds the finished run {result['run_id']} ({result['epochs']} epochs): not "
          f"trained again (another --output_dir or --seed trains anew){where}", flush=True)
    if copy:
        tracker = Tracker(True, cfg.run.tracking_uri, cfg.run.experiment, system_metrics=False)
        tracker.start(None, forced_run_id=mlflow_run_id)  # not resumed_from_run: nothing resumes here
        try:
            tracker.copy_finished(result["run_id"], done, run_params(cfg))
        except BaseException as e:
            tracker.end("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise
        tracker.end()
    return result


def end_epoch(s: Session, epoch: int, metrics: dict, callbacks: tuple[Callback, ...] = ()) -> None:
    """Track the best validation epoch (before any re-init; its weights kept when selection is best_val), run
    the tricks' epoch end and the callbacks' `on_epoch_metrics`, checkpoint, then log (asynchronously: the
    queue is flushed before the next checkpoint, so a kill leaves at most that one epoch to log on resume)."""
    state, main = s.state, s.acc.is_main_process
    if K.VAL_ACC in metrics and metrics[K.VAL_ACC] > state["best_val_acc"]:
        state |= {"best_val_acc": metrics[K.VAL_ACC], "best_epoch": epoch}
        if s.cfg.run.selection == "best_val":
            state["best_file"] = f"best-{epoch:04d}.safetensors"
            if main:
                checkpoint.save_weights(s.raw, s.out / state["best_file"])
    for t in s.tricks:
        t.on_epoch_end(epoch, metrics)
        metrics |= t.meter.pop(s.acc)
    for c in callbacks:
        c.on_epoch_metrics(epoch, metrics)
    state |= {"epoch": epoch + 1, "history": state["history"] + [{"epoch": epoch, **metrics}],
              "tricks": {t.name: t.state_dict() for t in s.tricks}}
    lost = None
    if main:
        try:
            s.tracker.flush()  # the previous epoch is stored before this one is checkpointed (see Tracker.flush)
        except Exception as e:  # e.g. the server went away: this epoch is still checkpointed, then fit stops
            lost = e
        checkpoint.save(s.out, epoch, s.raw, s.optimizer, state, s.cfg.run.keep_checkpoints)
        for stale in s.out.glob("best-*.safetensors"):
            if stale.name != state["best_file"]:
                stale.unlink()
    # Waits for every process, as wait_for_everyone would, and tells them all whether to stop together.
    if float(s.acc.reduce(torch.tensor(float(lost is not None), device=s.acc.device), "sum")) > 0:
        raise lost or TrackingLost("the main process could not log to MLflow")
    s.tracker.log_metrics(metrics, step=epoch, synchronous=False)


def fit(cfg: Config, callbacks=(), mlflow_run_id: str | None = None) -> dict:
    """Train, then test at the checkpoint `selection` names and at the last epoch. `mlflow_run_id` (main
    process): an existing run to log into (a trial's child run) instead of `mlflow run`'s or a new one.
    `callbacks` observe, after the block probe: `rifle.callbacks.Callback`s (their events and when they fire),
    or plain functions (epoch, metrics) run as an `on_epoch_end`."""
    callbacks = (*map(as_callback, callbacks),)  # a bad callback fails before any work
    network.apply(cfg.run.network_timeout)
    done = checkpoint.finished(cfg.run.output_dir)
    if done is not None:
        return already_finished(cfg, done, mlflow_run_id)
    s = setup(cfg, mlflow_run_id)
    callbacks = (s.probe, *callbacks)
    train_loader, val_loader, _ = s.loaders
    bar = Progress(s.acc.is_main_process, s.state["epoch"], cfg.optim.epochs, len(train_loader))
    try:
        for epoch in range(s.state["epoch"], cfg.optim.epochs):
            # Every epoch and process its own independent stream (rifle.seeds): resumable, never shared.
            seed_process(stream_seed(cfg.run.seed, epoch, s.acc.process_index))
            train_loader.set_epoch(epoch)
            for t in s.tricks:
                t.meter.reset()
                t.on_epoch_start(epoch)
            # After the tricks' epoch start, so DELTA's extra pass over the loader cannot move the workers' seed.
            train_loader.generator.manual_seed(stream_seed(cfg.run.seed, epoch, s.acc.process_index, "workers"))
            for c in callbacks:
                c.on_epoch_start(epoch)
            metrics = train_epoch(s, epoch, bar, callbacks)
            if val_loader is not None:
                metrics[K.VAL_ACC] = evaluate(s.model, val_loader, s.acc)
            end_epoch(s, epoch, metrics, callbacks)
            bar.epoch_end(epoch, metrics)
            for c in callbacks:
                c.on_epoch_end(epoch, metrics)
        bar.close()
        final = test_and_log(s)
    except BaseException as error:
        e = unmasked(error)  # an interrupt stays an interrupt (KILLED, 130/143, the trial handed back)
        bar.close()
        reason = s.tracker.lost(e)
        if reason:  # nothing to end on a server that is gone: the same command resumes the run once it is back
            s.tracker.abandon()
            saved = s.state["epoch"]  # epochs count from 0: the newest checkpoint is epoch saved - 1
            where = f"with epoch {saved - 1} (of 0..{cfg.optim.epochs - 1}) checkpointed" if saved else \
                "before its first epoch (0) was checkpointed"
            raise TrackingLost(f"{reason}; the run stopped {where} in {s.out}: run the same command again once the "
                               "server answers") from None
        s.tracker.end("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        if e is not error:
            raise e from None
        raise
    s.tracker.end()
    # the last epoch's training accuracy (a campaign cell's value without validation) and the images trained
    result = final | {"run_id": s.state["run_id"], "epochs": cfg.optim.epochs,
                      K.TRAIN_ACC: s.state["history"][-1][K.TRAIN_ACC] if s.state["history"] else None,
                      "images": cfg.optim.epochs * len(train_loader.dataset)}
    if s.acc.is_main_process:  # after the run is closed: a kill before this re-runs the final evaluation
        checkpoint.save_finished(s.out, {"config": s.state["config"], "history": s.state["history"],
                                         "result": result, "logged": s.tracker.record},  # for a copy of the run
                                 cfg.run.keep_finished_checkpoints)
    s.acc.wait_for_everyone()
    return result


def test_and_log(s: Session) -> dict:
    """Test accuracy at the last epoch and at the checkpoint `selection` names; results, tags, artifacts."""
    cfg, (_, val_loader, test_loader) = s.cfg, s.loaders
    final = {K.TEST_ACC_LAST: evaluate(s.model, test_loader, s.acc)}
    if cfg.run.selection == "last":
        final[K.TEST_ACC], selected = final[K.TEST_ACC_LAST], cfg.optim.epochs - 1
        if s.acc.is_main_process and cfg.run.log_weights:
            s.state["best_file"] = "last.safetensors"
            checkpoint.save_weights(s.raw, s.out / s.state["best_file"])
    else:
        checkpoint.load_weights(s.raw, s.out / s.state["best_file"])
        final[K.TEST_ACC], selected = evaluate(s.model, test_loader, s.acc), s.state["best_epoch"]
    final[K.SELECTED_EPOCH] = selected
    if val_loader is not None:
        final |= {K.BEST_VAL_ACC: s.state["best_val_acc"], K.BEST_EPOCH: s.state["best_epoch"]}
    s.tracker.log_final(final)
    s.tracker.set_tags(reinit_tags(cfg, selected))
    _log_artifacts(s.tracker, cfg, s.state, s.out)
    for t in s.tricks:  # e.g. DELTA's channel attention
        for name, text in t.artifacts().items():
            s.tracker.log_artifact_text(text, name)
    return final


def reinit_tags(cfg: Config, selected: int) -> dict[str, str]:
    """A RIFLE run's tags saying whether the selected checkpoint (its validation precedes the reset of the same
    epoch) came before its first re-init (the "RIFLE" number is then plain fine-tuning's trajectory) and before
    its last (the last period's fresh head did not give it); none without RIFLE."""
    epochs = reinit_epochs(cfg)
    if not epochs:
        return {}
    return {K.BEFORE_REINIT_TAG: str(selected <= epochs[0]).lower(),
            K.BEFORE_LAST_REINIT_TAG: str(selected <= epochs[-1]).lower()}


def result_line(cfg: Config, result: dict) -> str:
    """The line `rifle train` ends with: 'run 6e31…: test_acc=0.9612 (selection best_val: checkpoint of epoch 14,
    best_val_acc=0.9700), test_acc_last=0.9580, epochs=20', saying when the selected checkpoint precedes RIFLE's
    last head re-init (or every one of them). Epochs count from 0."""
    epochs, selected = reinit_epochs(cfg), int(result[K.SELECTED_EPOCH])
    where = f"checkpoint of epoch {selected}"
    if epochs and selected <= epochs[0]:
        which = "its head re-init" if len(epochs) == 1 else f"all {len(epochs)} head re-inits"
        where += f", before {which} (the first after epoch {epochs[0]}): plain fine-tuning's trajectory"
    elif epochs and selected <= epochs[-1]:
        where += f", before the last head re-init (after epoch {epochs[-1]})"
    val = f", best_val_acc={result[K.BEST_VAL_ACC]:.4f}" if K.BEST_VAL_ACC in result else ""
    return (f"run {result['run_id']}: test_acc={result[K.TEST_ACC]:.4f} (selection {cfg.run.selection}: {where}{val}), "
            f"test_acc_last={result[K.TEST_ACC_LAST]:.4f}, epochs={result['epochs']}")


def _log_artifacts(tracker: Tracker, cfg: Config, state: dict, out: Path) -> None:
    if not tracker.active:
        return
    from .evidence.figures import plot_training
    redacted = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, tracking_uri=redact(cfg.run.tracking_uri)))
    tracker.log_artifact_text(to_yaml(redacted), "config.yaml")  # no password of the tracking URI
    tracker.log_figure(plot_training(state["history"], f"{cfg.model.model} on {cfg.data.dataset}, "
                                     f"tricks: {','.join(cfg.trick_list) or 'none'}"), "training.png")
    if cfg.run.log_weights:  # weights/<file> and the MLflow model runs:/<run_id>/model (rifle/serving.py)
        from .track.serving import log_model
        log_model(tracker, cfg, out / state["best_file"])


def measure_steps(cfg: Config, num_classes: int, steps: int = 3, seconds: float = 2.0,
                  scratch: Path | None = None) -> dict:
    """What one training step of `cfg` costs on this machine's device, every trick acting: images per second of
    `steps` steps (more until `seconds` have passed) after a warm-up one and of evaluation batches alike, the
    peak device memory (bytes; None on the CPU), the seconds to build the model, the bytes of its weights and
    of a checkpoint, and (given a `scratch` folder, emptied again) the seconds an epoch's end takes beyond
    validation: a checkpoint written there and the block probe's weight distances. Random uint8 batches at the
    config's batch and image size (what the decode cache gives): no data and no MLflow run. For rifle.preflight."""
    import time

    start = time.perf_counter()
    acc = make_accelerator(cfg)
    raw, tricks = make_model(cfg, acc, num_classes, None)
    pretrained = probes.snapshot(raw.backbone)
    optimizer = torch.optim.SGD(param_groups(raw), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay)
    model, optimizer = acc.prepare(raw, optimizer)
    b, size = cfg.optim.batch_size, cfg.data.image_size
    images = torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, device=acc.device)
    labels = torch.arange(b, device=acc.device) % num_classes
    ctx = FitContext(raw, optimizer, acc, num_classes, pretrained,
                     lambda: build_model(cfg.model.model, num_classes, cfg.model.pretrained,
                                         cfg.model.backbone_dropout, cfg.model.weights).backbone, None)
    s = Session(cfg, acc, Path("."), raw, model, optimizer, (), tricks, pretrained, None, None, {})
    for t in tricks:
        t.on_fit_start(ctx)
        t.stand_in(raw, images)  # e.g. DELTA's attention, which its first epoch would measure
        t.on_epoch_start(0)
    built = time.perf_counter() - start
    if acc.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(acc.device)

    def timed(step) -> float:
        """Images per second over `steps` steps or more, until `seconds` have passed (at most 20 times `steps`)."""
        step()  # warm-up: allocations, cuDNN's choice of kernels
        if acc.device.type == "cuda":
            torch.cuda.synchronize(acc.device)
        begin, done = time.perf_counter(), 0
        while done < steps or (time.perf_counter() - begin < seconds and done < 20 * steps):
            step()
            done += 1
            if acc.device.type == "cuda":
                torch.cuda.synchronize(acc.device)
        return done * b / (time.perf_counter() - begin)

    model.train()
    train_rate = timed(lambda: train_step(s, images, labels, 0, 0.0))
    model.eval()
    with torch.no_grad():
        eval_rate = timed(lambda: model(images))
    peak = torch.cuda.max_memory_allocated(acc.device) if acc.device.type == "cuda" else None
    weights, momentum = checkpoint.sizes(raw, cfg.optim.momentum > 0)
    epoch_end = 0.0
    if scratch is not None:
        import tempfile
        with tempfile.TemporaryDirectory(dir=scratch, prefix=".preflight-") as tmp:
            begin = time.perf_counter()
            checkpoint.save(tmp, 0, raw, optimizer, {"epoch": 1}, keep=1)
            probes.weight_distances(raw.backbone, pretrained, block_names(raw.backbone))
            epoch_end = time.perf_counter() - begin
    return {"train_images_per_s": train_rate, "eval_images_per_s": eval_rate, "peak_memory_bytes": peak,
            "build_s": built, "weights_bytes": weights, "checkpoint_bytes": weights + momentum,
            "epoch_end_s": epoch_end, "device": str(acc.device)}
