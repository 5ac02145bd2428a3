"""DELTA: feature maps kept close to the pretrained network's, weighted by channel attention.

Li, Xiong, Wang, Rao, Liu, Chen, Huan. "DELTA: DEep Learning Transfer using Feature Map with Attention for
Convolutional Networks." ICLR 2019. Reference code: the authors' github.com/lixingjian/DELTA (train.py: the penalty;
channel_eval.py: the attention) and TLlib's port (thuml/Transfer-Learning-Library, tllib/regularization/delta.py and
examples/task_adaptation/image_classification/delta.py).

Loss CE + alpha * Omega' + beta * Omega'', weight decay off (the penalties replace it), with
    Omega'(w) = sum_layers 1/2 sum_batch sum_j C W_j ||FM_j(w, x) - FM_j(w*, x)||^2 / (HW)
for a layer of C channels on an HxW grid (the authors' `reg_att_fea_map`: summed over the batch, so alpha is per
training batch: their run.sh trains with 64, so the same alpha at batch 32 weighs the feature term half as much),
FM_j channel j of the layer's output in the network being fine-tuned (w, training mode) and
in the frozen source (w*, the starting weights, in evaluation mode), and Omega'' = 1/2 ||w_head||^2.
Defaults alpha = beta = 0.01 (run.sh; 0.1 on Stanford Dogs).

Channel attention (channel_eval.py): a linear classifier is fitted on the frozen source's pooled features
(`delta_attention_epochs` = 10 epochs of SGD, lr `delta_attention_lr` = 0.01 decayed 10x over 6 epochs, batches of
`delta_attention_batch_size` = 32 as in run.sh, whatever the training batch); then, on
`delta_attention_batches` = 4 batches in evaluation mode, each channel j of each layer is removed (its filter
zeroed: the output is the filter's bias, 0 without one) and the rise of the batch-mean cross-entropy is averaged
over the batches. Per layer the rises are z-scored (population std) and W = softmax(z / 5).
Layers (`delta_layers=auto`): see `default_layers`; ResNet-101 gets its own last blocks (layer3.22.conv3), where
TLlib repeats ResNet-50's list.

Cache: the attention depends on the source weights, the layers, the training data (rifle.data.fingerprint), the
device and torch version, and KEY_OPTIONS only; its random stream comes from `split_seed`, not the training seed,
so a sweep's seeds, learning rates and alphas share one measurement, as the authors reuse one file per dataset
(run.sh). It is stored as JSON in `delta_cache_dir` (default $XDG_CACHE_HOME/rifle/delta, else ~/.cache/rifle/delta) under a hash of the key, checked
against the full key when read, written atomically, logged with each run (ARTIFACT) and kept in the checkpointed
state, so a resumed run needs neither. No dataset fingerprint (outside the trainer): no cache.

Deviations, stated:
- The attention classifier is fitted on the frozen source in evaluation mode, the network the penalty compares
  against; channel_eval.py trains it with the whole network in training mode (BatchNorm statistics drift to the
  target data), and TLlib's example also updates the backbone.
- Removing a channel of a module that is not a convolution (a stage output, Inception's BasicConv2d) zeroes that
  output channel; the authors' code handles convolutions only.
- With several processes the main process measures on the whole training set and sends the result to the others.
  The global random state is restored, so training randomness does not depend on a cache hit.
Scale: on EfficientNet-Lite0 (digits at 64 px, batch 32) alpha * Omega' starts near 225 against a cross-entropy of
2.3, as the network in training mode normalises with batch statistics and the source with running ones;
alpha = 0.01 was set for ResNets on 224-px photos, on other data sweep `delta_alpha` down.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, with_role
from ..env import environment
from ..files import write_text
from ..keys import ENV_DEVICE, ENV_TORCH
from ..seeds import attention_seed
from ._common import disable_weight_decay, squared_norm
from .base import FitContext, Trick

FORMAT = 2                 # of a cached measurement: bump when the measurement changes, so old entries miss
TEMPERATURE = 5.0          # of the attention softmax (train.py: softmax(cw / 5))
CLASSIFIER_LR_DECAY_EPOCHS = 6  # the classifier's learning rate falls 10x over this many epochs (channel_eval.py)
CLASSIFIER_MOMENTUM, CLASSIFIER_WEIGHT_DECAY = 0.9, 1e-4
ARTIFACT = "delta/channel_attention.json"
# The options the measured attention depends on, besides the source weights, layers, data fingerprint, device
# and torch version: the cache key (see the module docstring) and the measurement's own settings. num_workers
# changes which augmentation draws the loader's worker processes make.
KEY_OPTIONS = with_role("delta_key")
PROJECTIONS = ("conv_pwl", "conv3", "conv_pw", "conv2")  # the conv that ends a block, most specific first


def channel_attention(loss_increase: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """softmax(z / T), z the loss increases of one layer's channels z-scored with the population std
    (np.std); uniform when all are equal (the reference divides by 0 there)."""
    x = loss_increase.double()
    std = x.std(unbiased=False)
    z = (x - x.mean()) / std if std > 0 else torch.zeros_like(x)
    return torch.softmax(z / temperature, dim=0).float()


def delta_feature_penalty(targets: list[torch.Tensor], sources: list[torch.Tensor],
                          attentions: list[torch.Tensor]) -> torch.Tensor:
    """sum_layers 1/2 sum_batch sum_j C a_j ||FM_j - FM*_j||^2 / (HW), in float32; sources get no gradient."""
    total = targets[0].new_zeros((), dtype=torch.float32)
    for t, s, a in zip(targets, sources, attentions, strict=True):
        b, c, h, w = t.shape
        sq = (t.float() - s.detach().float()).pow(2).sum(dim=(2, 3))  # (batch, channels)
        total = total + 0.5 * (c * a.to(sq.device) * sq / (h * w)).sum()
    return total


def _last_conv_of_stage(backbone: nn.Module, stage: str) -> str:
    """`<stage>.<last block>.<projection conv>`, or the stage itself when its last block has none."""
    module = backbone.get_submodule(stage)
    if isinstance(module, nn.Sequential) and len(module):
        block_name, block = f"{stage}.{len(module) - 1}", module[-1]
    else:
        block_name, block = stage, module
    for attr in PROJECTIONS:
        if isinstance(getattr(block, attr, None), nn.Conv2d):
            return f"{block_name}.{attr}"
    return stage


def default_layers(backbone: nn.Module) -> list[str]:
    """The authors' layers: a ResNet's last conv per stage (ResNet-50: layer1.2.conv3, layer2.3.conv3,
    layer3.5.conv3, layer4.2.conv3; conv2 of a BasicBlock), Inception-v3's list, else per timm stage the
    projection conv (tf_efficientnet_lite0: blocks.1.1, 2.1, 4.2 and 6.0 .conv_pwl) or the output (ConvNeXt)."""
    modules = dict(backbone.named_modules(remove_duplicate=False))
    if all(isinstance(modules.get(f"layer{i}"), nn.Sequential) for i in range(1, 5)):
        return [_last_conv_of_stage(backbone, f"layer{i}") for i in range(1, 5)]
    inception = ["Conv2d_2b_3x3", "Conv2d_4a_3x3", "Mixed_5d", "Mixed_6e"]
    if all(n in modules for n in inception):
        return inception
    info = getattr(backbone, "feature_info", None)
    if info is not None:
        dicts = info.get_dicts() if hasattr(info, "get_dicts") else list(info)
        stages = [d["module"] for d in dicts if d.get("module") and d["module"] in modules]
        if stages:
            return [_last_conv_of_stage(backbone, s) for s in stages[-4:]]
    raise ConfigError("delta_layers", f"no default layers for {type(backbone).__name__}: give "
                      "comma-separated backbone module names whose outputs are feature maps, e.g. "
                      f"{','.join(n for n, _ in list(backbone.named_children())[-4:])}")


def resolve_layers(backbone: nn.Module, spec: str) -> list[str]:
    names = default_layers(backbone) if spec.strip() in ("", "auto") else [
        n.strip() for n in spec.split(",") if n.strip()]
    modules = dict(backbone.named_modules(remove_duplicate=False))
    for n in names:
        if n not in modules:
            raise ConfigError("delta_layers", f"the backbone has no module {n!r}; top-level modules: "
                              f"{', '.join(n for n, _ in backbone.named_children())}")
    return names


@torch.no_grad()
def channel_loss_increase(backbone: nn.Module, head: nn.Module, layer: str, images: torch.Tensor,
                          labels: torch.Tensor, max_batch: int = 256,
                          autocast=contextlib.nullcontext) -> torch.Tensor:
    """Per output channel j of module `layer` of `backbone`: the batch-mean cross-entropy of head(backbone)
    with channel j removed minus the batch-mean cross-entropy as is (float64, on the CPU).

    k channels are measured per forward on k copies of the batch (about `max_batch` images), copy i with
    channel i of the chunk removed. The copies are made at the layer's output when nothing after it reuses
    an earlier activation; otherwise (the layer sits in a residual block, whose shortcut would meet a k
    times larger batch) at the input of the innermost module around it that works, up to the images.
    (One function of 70 lines on purpose: its two hooks and the search outwards share the state of the
    forward in flight, the channels removed and where the copies are made.)
    """
    b = images.shape[0]
    chans: list[int] = []  # the channels removed in this forward, one per copy of the batch
    width = 0
    anchor = layer         # where the copies are made: the layer's output, an enclosing module's input, "": images

    def remove(module, args, out):
        nonlocal width
        if out.dim() != 4:
            raise ValueError(f"DELTA compares convolutional feature maps (batch, channels, H, W); {layer!r} "
                             f"gives shape {tuple(out.shape)}")
        width = out.shape[1]
        if not chans:
            return out
        k = len(chans)
        out = out.unsqueeze(0).repeat(k, 1, 1, 1, 1) if anchor == layer else out.reshape(k, b, *out.shape[1:]).clone()
        # A removed channel: a convolution with its filter zeroed outputs its bias (channel_eval.py zeroes
        # `<layer>.weight` only); anything else, 0.
        bias = module.bias if isinstance(module, nn.Conv2d) else None
        removed = out.new_zeros(out.shape[2]) if bias is None else bias.detach().to(out.dtype)
        idx = torch.as_tensor(chans, device=out.device)
        out[torch.arange(k, device=out.device), :, idx] = removed[idx].view(k, 1, 1, 1)
        return out.reshape(k * b, *out.shape[2:])

    def repeat_input(module, args):
        return (args[0].repeat(len(chans), *[1] * (args[0].dim() - 1)), *args[1:])

    def logits_of(x):
        with autocast():
            out = head(backbone(x))
        return out.float() if out.dtype in (torch.float16, torch.bfloat16) else out

    hook = backbone.get_submodule(layer).register_forward_hook(remove)
    try:
        base = F.cross_entropy(logits_of(images), labels)
        out, j = torch.empty(width, dtype=torch.float64), 0
        parts = layer.split(".")
        for anchor in [".".join(parts[:i]) for i in range(len(parts), -1, -1)]:  # the layer, then out to the root
            pre = None
            if anchor not in (layer, ""):
                pre = backbone.get_submodule(anchor).register_forward_pre_hook(repeat_input)
            try:
                while j < width:
                    chans[:] = range(j, min(width, j + max(1, max_batch // b)))
                    k = len(chans)
                    logits = logits_of(images.repeat(k, 1, 1, 1) if anchor == "" else images)
                    if logits.shape[0] != k * b:
                        raise RuntimeError("the copies did not reach the output")
                    per_copy = F.cross_entropy(logits, labels.repeat(k), reduction="none").view(k, b)
                    out[chans] = (per_copy.mean(1) - base).double().cpu()
                    j += k
                return out
            except RuntimeError:  # an activation from before the copies met them (a shortcut): copy further out
                if anchor == "":
                    raise
            finally:
                if pre is not None:
                    pre.remove()
    finally:
        chans.clear()
        hook.remove()


def fit_classifier(epoch_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]], num_features: int,
              num_classes: int, epochs: int, lr: float, seed: int, device=None) -> nn.Linear:
    """A linear classifier on fixed features, as channel_eval.py's `train_classifier`: SGD (momentum 0.9,
    weight decay 1e-4), the learning rate multiplied by 0.1^(1/6) after every epoch; `epoch_batches()`
    yields one epoch's (features, labels). Initialized from `seed`, without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        classifier = nn.Linear(num_features, num_classes)
    classifier = classifier.to(device)
    opt = torch.optim.SGD(classifier.parameters(), lr=lr, momentum=CLASSIFIER_MOMENTUM, weight_decay=CLASSIFIER_WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.1 ** (1.0 / CLASSIFIER_LR_DECAY_EPOCHS))
    with torch.enable_grad():
        for _ in range(epochs):
            for features, labels in epoch_batches():
                loss = F.cross_entropy(classifier(features), labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sched.step()
    return classifier.eval().requires_grad_(False)


def measure_loss_increase(source: nn.Module, classifier: nn.Module, layers: list[str],
                          batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                          autocast=contextlib.nullcontext) -> list[torch.Tensor]:
    """Per layer, each channel's loss increase averaged over `batches` (channel_eval.py's running mean)."""
    rises = [[channel_loss_increase(source, classifier, name, images, labels, autocast=autocast) for name in layers]
             for images, labels in batches]
    if not rises:
        raise RuntimeError("delta: the training loader gave no batch to measure the channel attention on")
    return [sum(per_batch) / len(rises) for per_batch in zip(*rises)]


def attention_passes(loader, batch_size: int, seed: int) -> Callable[[], Iterator]:
    """Passes over the training data for the attention: a DataLoader is re-made over the same dataset and
    collate with its own seeded shuffle (each call a new order, as the authors' shuffling loader), so the
    measurement depends on `seed` only; any other iterable (tests) is replayed as it is."""
    from torch.utils.data import DataLoader
    if not isinstance(loader, DataLoader):
        return lambda: iter(loader)
    order = torch.Generator().manual_seed(seed)
    fresh = DataLoader(loader.dataset, batch_size=batch_size, shuffle=True, generator=order,
                       collate_fn=loader.collate_fn, num_workers=loader.num_workers, drop_last=False)
    return lambda: iter(fresh)


def state_hash(module: nn.Module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes and bytes of every tensor)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/rifle/delta: not under datasets' cache (rifle.data.hf.cache_dir, where the data's own caches
    live), as the attention is a measurement of the source network, not a form of the data."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rifle" / "delta"


def read_cache(path: Path, key: dict) -> dict | None:
    """The cached record for exactly `key`, or None (absent, unreadable, or made for another key)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("key") == json.loads(json.dumps(key)) else None


def write_cache(path: Path, record: dict) -> None:
    """Write atomically (rifle.files): readers see all of it or nothing."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(record))
    except OSError as e:
        warnings.warn(f"delta: could not cache the channel attention in {path.parent} ({e.strerror or e}); "
                      "the next run measures it again", stacklevel=2)


def _capture(store: dict, name: str, gate: dict | None, module, args, output):
    """Keep a hooked layer's output: the fine-tuned network's in training forwards only (gate None), the
    source's while the penalty runs it (gate["on"]), not during the attention measurement."""
    if (module.training and torch.is_grad_enabled()) if gate is None else gate["on"]:
        store[name] = output


class Delta(Trick):
    metrics = ("penalty/delta", "penalty/delta_features", "penalty/delta_head")

    @classmethod
    def from_config(cls, cfg):
        t, flat = cfg.tricks, cfg.flat()
        return cls(t.delta_alpha, t.delta_beta, {k: flat[k] for k in KEY_OPTIONS}, t.delta_layers,
                   cfg.run.delta_cache_dir or str(default_cache_dir()))

    def __init__(self, alpha: float, beta: float, options: dict, layers: str = "auto", cache_dir: str = ""):
        """`options`: the KEY_OPTIONS values; `layers`: delta_layers; `cache_dir` "": default_cache_dir()."""
        self.alpha, self.beta, self.options, self.layer_spec, self.cache_dir = alpha, beta, options, layers, cache_dir
        self.attention: list[list[float]] | None = None
        self.record: dict | None = None      # key, layers, loss increases and attention (the cache entry)
        self.cache_file: Path | None = None
        self.cache_hit: bool | None = None   # None: not looked up (resumed from a checkpoint, or no cache)
        self._att: list[torch.Tensor] | None = None  # the attention on the device, built when first used
        self._target, self._source, self._source_on = {}, {}, {"on": False}

    def prepare_model(self, model: nn.Module) -> None:
        self.layers = resolve_layers(model.backbone, self.layer_spec)
        for n in self.layers:
            model.backbone.get_submodule(n).register_forward_hook(partial(_capture, self._target, n, None))

    def on_fit_start(self, ctx: FitContext) -> None:
        self.ctx = ctx
        self.device = next(ctx.model.parameters()).device
        self.head_params = list(ctx.model.head.parameters())
        disable_weight_decay(ctx.optimizer)
        source = ctx.build_source_model()
        # The starting point is the snapshot of the weights fine-tuning began from.
        missing, unexpected = source.load_state_dict(ctx.pretrained, strict=False)
        params = {n for n, _ in source.named_parameters()}
        if unexpected or params & set(missing):
            raise RuntimeError(f"the pretrained snapshot does not fit the source network "
                               f"(missing {sorted(params & set(missing))[:3]}, unexpected {unexpected[:3]})")
        # As the reference: running BatchNorm statistics, no dropout, no gradient, never in the optimizer.
        self.source = source.to(self.device).eval().requires_grad_(False)
        for n in self.layers:
            self.source.get_submodule(n).register_forward_hook(partial(_capture, self._source, n, self._source_on))

    def _autocast(self):
        return self.ctx.accelerator.autocast() if self.ctx.accelerator is not None else contextlib.nullcontext()

    def measure(self) -> list[torch.Tensor]:
        """Fit the classifier on the frozen source, then each channel's loss increase (channel_eval.py)."""
        ctx, o, dev = self.ctx, self.options, self.device
        seed = attention_seed(o["split_seed"])  # the data's stream, not the training seed's
        passes = attention_passes(ctx.train_loader, o["delta_attention_batch_size"], seed)

        def features():
            for images, labels in passes():
                with torch.no_grad(), self._autocast():
                    f = self.source(ctx.model.prepare(images.to(dev))).float()
                yield f, labels.to(dev)  # outside the no_grad block: the classifier's step runs in between

        # Training randomness must not depend on a cache hit: the CPU generator (augmentation in this process)
        # is restored afterwards; nothing here draws on the GPU's (evaluation mode throughout).
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            classifier = fit_classifier(features, ctx.model.head.in_features, ctx.num_classes, o["delta_attention_epochs"],
                              o["delta_attention_lr"], seed, dev)
            kept = islice(passes(), o["delta_attention_batches"])
            return measure_loss_increase(self.source, classifier, self.layers,
                                         ((ctx.model.prepare(x.to(dev)), y.to(dev)) for x, y in kept), self._autocast)

    def load_or_measure(self) -> dict:
        """The record from the cache when it holds this key, else measured (and cached)."""
        where = environment(self.device)  # another device or torch runs other kernels: other numbers
        key = {"format": FORMAT, "source_sha256": state_hash(self.source), "layers": list(self.layers),
               "data_fingerprint": self.ctx.data_fingerprint, "device": where[ENV_DEVICE],
               "torch": where[ENV_TORCH], **self.options} if self.ctx.data_fingerprint else None
        if key is not None:
            digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
            self.cache_file = (Path(self.cache_dir) if self.cache_dir else default_cache_dir()) / f"{digest}.json"
            record = read_cache(self.cache_file, key)
            self.cache_hit = record is not None and record.get("layers") == self.layers
            if self.cache_hit:
                return record
        rises = self.measure()
        record = {"key": key, "layers": self.layers, "loss_increase": [r.tolist() for r in rises],
                  "attention": [channel_attention(r).tolist() for r in rises],
                  "measured_with": {"torch": torch.__version__, "device": self.device.type}}
        if key is not None:
            write_cache(self.cache_file, record)
        return record

    def on_epoch_start(self, epoch):
        if self.attention is not None:
            return
        acc = self.ctx.accelerator
        several = acc is not None and acc.num_processes > 1
        record = self.load_or_measure() if not several or acc.is_main_process else None
        if several:  # the main process measured on the whole training set: one attention everywhere
            from accelerate.utils import broadcast_object_list
            record = broadcast_object_list([record], from_process=0)[0]
        if record["layers"] != self.layers or len(record["attention"]) != len(self.layers):
            raise RuntimeError(f"delta: attention for layers {record['layers']}, this run hooks {self.layers}")
        self.record, self.attention, self._att = record, record["attention"], None

    def stand_in(self, model, images):
        """Uniform attention over each hooked layer's channels (a forward pass of the source counts them): a step
        then costs what a trained run's step costs, without the measurement."""
        self._source_on["on"] = True
        try:
            with torch.no_grad():
                self.source(model.prepare(images))
        finally:
            self._source_on["on"] = False
        channels = [self._source.pop(n).shape[1] for n in self.layers]
        self.load_state_dict({"layers": self.layers, "attention": [[1.0 / c] * c for c in channels]})

    def penalty(self, model, images):
        if any(n not in self._target for n in self.layers):
            raise RuntimeError("delta: no feature maps captured from the training forward; penalty() must "
                               "follow the model's forward pass in training mode")
        targets = [self._target.pop(n) for n in self.layers]
        self._source_on["on"] = True
        try:
            with torch.no_grad(), self._autocast():
                self.source(model.prepare(images))  # uint8 batches of the decode cache: normalized
        finally:
            self._source_on["on"] = False
        sources = [self._source.pop(n) for n in self.layers]
        if self._att is None:
            self._att = [torch.tensor(a, dtype=torch.float32, device=self.device) for a in self.attention]
            for a, s in zip(self._att, sources):
                if a.numel() != s.shape[1]:
                    raise RuntimeError(f"delta: {a.numel()} attention weights for a layer of {s.shape[1]} channels")
        features = self.alpha * delta_feature_penalty(targets, sources, self._att)
        head = 0.5 * self.beta * squared_norm(self.head_params)
        total = features + head
        for name, v in zip(self.metrics, (total, features, head)):
            self.meter.add(name, v)
        return total

    def artifacts(self) -> dict[str, str]:
        if self.record is None:
            return {}
        where = {"cache_file": str(self.cache_file) if self.cache_file else None, "cache_hit": self.cache_hit}
        return {ARTIFACT: json.dumps(self.record | where, indent=1)}

    def state_dict(self):
        return {"layers": self.layers, "attention": self.attention, "record": self.record}

    def load_state_dict(self, state):
        if state.get("attention") is None:
            return
        if list(state.get("layers", [])) != self.layers:
            raise ValueError(f"delta: the checkpoint's attention is for layers {state.get('layers')}, "
                             f"this run uses {self.layers}")
        self.attention = [list(map(float, a)) for a in state["attention"]]
        self.record = state.get("record") or {"layers": self.layers, "attention": self.attention}
        self._att = None
