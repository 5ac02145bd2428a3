"""DELTA: feature maps kept close to the pretrained network's, weighted by channel attention.

Li, Xiong, Wang, Rao, Liu, Chen, Huan. "DELTA: DEep Learning Transfer using Feature Map
with Attention for Convolutional Networks." ICLR 2019.

As in the paper: loss = CE + alpha * Omega' + beta * Omega'', with
    Omega'(w) = sum_layers sum_j W_j ||FM_j(w, x) - FM_j(w*, x)||^2       (j: a channel of the layer)
the distance between the feature maps of the network being fine-tuned (w) and of the frozen pretrained
network (w*), and Omega'' = 1/2 ||w_head||^2 on the new head; weight decay is switched off (the
penalties replace it). The channel attention is "supervised" and computed once from the pretrained
network: W_j = softmax_j(L(z(x, w* without channel j), y) - L(z(x, w*), y)), the rise of the target
loss when channel j is removed, where the loss uses a linear classifier fitted on the frozen pretrained
features of the training set.
As in the public implementation (TLlib's DELTA, thuml/Transfer-Learning-Library): per layer of C
channels and HxW positions the term is 1/2 sum_batch sum_j C W_j ||.||^2 / (HW), summed (not averaged)
over the batch, so alpha is per batch of `batch_size`; the loss increases are z-scored per layer
before a softmax at temperature 5; the classifier for the attention is trained for
`delta_attention_epochs` epochs (SGD, momentum 0.9, Nesterov, the head's learning rate decayed by 10x
over 6 epochs) and the loss increases are averaged over `delta_attention_batches` training batches;
defaults alpha = beta = 0.01.
Deviations, stated:
- BatchNorm: when the penalty compares feature maps, the pretrained network's BatchNorm layers use the
  batch's statistics, as the fine-tuned network's do in training (their running statistics stay
  frozen); the reference code runs it in evaluation mode. Otherwise the distance measures the gap
  between batch and ImageNet statistics rather than how far the weights moved: it is not 0 at the
  starting point, and on a shifted target (the offline digits at 32 px) it started near 1.7e3 with
  alpha = 0.01, hundreds of times the cross-entropy. The attention is measured in evaluation mode
  (zeroed copies share a batch there, and must not share statistics).
- Layers: the outputs of the last four stages (`delta_layers=auto`: a ResNet's layer1..layer4, the
  stages at each resolution of a timm model from its `feature_info`, e.g. blocks.1, blocks.2, blocks.4,
  blocks.6 of EfficientNet-Lite0) rather than the last convolution inside each stage; "removing
  channel j" zeroes channel j of exactly the feature map that Omega' compares (TLlib zeroes the j-th
  filter of that convolution). Any module names can be given instead.
- The attention classifier is fitted on features computed once (one pass over the training loader,
  with its augmentation) from the truly frozen pretrained backbone; TLlib's example re-augments
  every epoch and, through `backbone.requires_grad = False` (a no-op on a module), also updates the
  backbone.
- The attention is computed at the first epoch's start and saved in the trick's state, so a resumed run
  reuses it. With several processes the features are gathered so that every process fits the same
  classifier, and the loss increases are averaged over all processes' batches: identical attention
  everywhere. The global random state is restored afterwards, so the training randomness is unchanged.
Scale, measured: the term is 0 at the starting point, but on the offline default (EfficientNet-Lite0,
digits at 32 or 64 px, batch 32, lr 0.01) the first SGD step moves the stage outputs by about 60% of
their RMS, and with alpha = 0.01 the weighted term is then about 1e3 per batch against a cross-entropy
of 2.3. The reference alpha was set for ResNets at 224 px; sweep `delta_alpha` downwards there.
The frozen pretrained network is built only by this trick, given the starting weights (the trainer's
snapshot), never handed to the optimizer, and runs without gradients.
"""
from __future__ import annotations

import contextlib
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from ._common import disable_weight_decay, split_batch, squared_norm
from .base import FitContext, Trick

TEMPERATURE = 5.0  # of the attention softmax, as in TLlib
PROBE_LR_DECAY_EPOCHS = 6  # the attention classifier's learning rate falls 10x over this many epochs


def channel_attention(loss_increase: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """softmax(z / T) with z the z-scored loss increases of one layer's channels (uniform if all equal)."""
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


def _zero_channels(state: dict, module, args, output):
    """Forward hook: replace the layer's output by copies with one channel zeroed in each."""
    channels = state.get("channels")
    if output.dim() != 4:
        raise ValueError(f"DELTA compares convolutional feature maps (batch, channels, H, W); "
                         f"this layer gives shape {tuple(output.shape)}")
    state["num_channels"] = output.shape[1]
    if channels is None:
        return output
    k = len(channels)
    if not state["expand"]:
        out = output.clone()
        out[:, channels[0]] = 0
        return out
    rep = output.unsqueeze(0).repeat(k, 1, 1, 1, 1)
    rep[torch.arange(k, device=output.device), :, torch.as_tensor(channels, device=output.device)] = 0
    return rep.reshape(k * output.shape[0], *output.shape[1:])


@torch.no_grad()
def channel_loss_increase(backbone: nn.Module, head: nn.Module, layer: nn.Module, images: torch.Tensor,
                          labels: torch.Tensor, max_batch: int = 256,
                          autocast=contextlib.nullcontext) -> torch.Tensor:
    """Per channel j of `layer`'s output: mean CE with channel j zeroed minus the mean CE without.

    Zeroed copies of the layer's output are stacked along the batch (up to `max_batch` images per
    forward) so the network before the layer runs once per chunk; if the rest of the network cannot
    take a larger batch there (the layer sits inside a residual block), one copy per forward is used.
    """
    state: dict = {"channels": None, "expand": True}
    handle = layer.register_forward_hook(partial(_zero_channels, state))
    try:
        with autocast():
            base = F.cross_entropy(head(backbone(images)).float(), labels)
        c, b = state["num_channels"], images.shape[0]
        out = torch.empty(c, dtype=torch.float64)
        chunk, j = max(1, max_batch // b), 0
        while j < c:
            chans = list(range(j, min(c, j + (chunk if state["expand"] else 1))))
            state["channels"] = chans
            try:
                with autocast():
                    logits = head(backbone(images)).float()
            except RuntimeError:
                if not state["expand"] or len(chans) == 1:
                    raise
                state["expand"] = False  # a skip connection around the layer: one channel at a time
                continue
            per_copy = F.cross_entropy(logits, labels.repeat(len(chans)), reduction="none").view(len(chans), b)
            out[chans] = (per_copy.mean(1) - base).double().cpu()
            j += len(chans)
        return out
    finally:
        handle.remove()


def fit_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, epochs: int, lr: float,
              batch_size: int, seed: int) -> nn.Linear:
    """A linear classifier on fixed features: SGD (momentum 0.9, Nesterov), lr decayed 10x per 6 epochs."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = nn.Linear(features.shape[1], num_classes)
    probe = probe.to(features.device)
    opt = torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.1 ** (1.0 / PROBE_LR_DECAY_EPOCHS))
    order = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for _ in range(epochs):
            perm = torch.randperm(features.shape[0], generator=order).to(features.device)
            for idx in perm.split(batch_size):
                loss = F.cross_entropy(probe(features[idx]), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sched.step()
    return probe.eval().requires_grad_(False)


def default_layers(backbone: nn.Module) -> list[str]:
    """The last four stage outputs: timm's `feature_info` modules, or a ResNet's layer1..layer4."""
    info = getattr(backbone, "feature_info", None)
    if info is not None:
        dicts = info.get_dicts() if hasattr(info, "get_dicts") else list(info)
        names = [d["module"] for d in dicts if d.get("module") and _find(backbone, d["module"]) is not None]
        if names:
            return names[-4:]
    if all(_find(backbone, f"layer{i}") is not None for i in range(1, 5)):
        return [f"layer{i}" for i in range(1, 5)]
    raise ConfigError("delta_layers", f"no default layers for {type(backbone).__name__}: give "
                      "comma-separated backbone module names whose outputs are feature maps, e.g. "
                      f"{','.join(n for n, _ in list(backbone.named_children())[-4:])}")


def _find(module: nn.Module, name: str) -> nn.Module | None:
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None


def resolve_layers(backbone: nn.Module, spec: str) -> list[str]:
    names = default_layers(backbone) if spec.strip() in ("", "auto") else [
        n.strip() for n in spec.split(",") if n.strip()]
    for n in names:
        if _find(backbone, n) is None:
            raise ConfigError("delta_layers", f"the backbone has no module {n!r}; top-level modules: "
                              f"{', '.join(n for n, _ in backbone.named_children())}")
    return names


def _capture(store: dict, name: str, training_only: bool, module, args, output):
    if not training_only or (module.training and torch.is_grad_enabled()):
        store[name] = output


def gather_rows(accelerator, x: torch.Tensor) -> torch.Tensor:
    """Concatenate every process's rows (uneven counts allowed), in process order."""
    if accelerator is None or accelerator.num_processes == 1:
        return x
    sizes = accelerator.gather(torch.tensor([x.shape[0]], device=x.device)).tolist()
    everything = accelerator.gather(accelerator.pad_across_processes(x, dim=0))
    m = max(sizes)
    return torch.cat([everything[i * m:i * m + s] for i, s in enumerate(sizes)])


class Delta(Trick):
    name = "delta"
    metrics = ("penalty/delta", "penalty/delta_features", "penalty/delta_head")

    def __init__(self, cfg):
        super().__init__(cfg)
        t = cfg.tricks
        self.alpha, self.beta = t.delta_alpha, t.delta_beta
        self.attention: list[list[float]] | None = None
        self._att: list[torch.Tensor] | None = None  # the attention on the device, built when first used
        self._target: dict = {}
        self._source: dict = {}

    def prepare_model(self, model: nn.Module) -> None:
        self.layers = resolve_layers(model.backbone, self.cfg.tricks.delta_layers)
        for n in self.layers:
            model.backbone.get_submodule(n).register_forward_hook(partial(_capture, self._target, n, True))

    def on_fit_start(self, ctx: FitContext) -> None:
        super().on_fit_start(ctx)
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
        self.source = source.to(self.device).eval().requires_grad_(False)
        self._bns = [m for m in self.source.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for m in self._bns:
            m.momentum = 0.0  # batch statistics in the penalty's forward, running ones never updated
        for n in self.layers:
            self.source.get_submodule(n).register_forward_hook(partial(_capture, self._source, n, False))

    def _autocast(self):
        return self.ctx.accelerator.autocast() if self.ctx.accelerator is not None else contextlib.nullcontext()

    def compute_attention(self) -> list[list[float]]:
        """Channel attention of every layer from the pretrained network on the training data (once)."""
        ctx, acc, t = self.ctx, self.ctx.accelerator, self.cfg.tricks
        loader = ctx.train_loader
        epoch_before = getattr(loader, "iteration", None)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            feats, labels, kept = [], [], []
            with torch.no_grad():
                for batch in loader:
                    images, y = (v.to(self.device) for v in split_batch(batch))
                    with self._autocast():
                        feats.append(self.source(images).float())
                    labels.append(y)
                    if len(kept) < t.delta_attention_batches:
                        kept.append((images, y))
            probe = fit_probe(gather_rows(acc, torch.cat(feats)), gather_rows(acc, torch.cat(labels)),
                              ctx.num_classes, t.delta_attention_epochs, self.cfg.optim.head_lr,
                              self.cfg.optim.batch_size, self.cfg.run.seed)
            sums = None
            for images, y in kept:
                rises = [channel_loss_increase(self.source, probe, self.source.get_submodule(n), images, y,
                                               autocast=self._autocast) for n in self.layers]
                flat = torch.cat(rises)
                sums = flat if sums is None else sums + flat
            sizes = [len(r) for r in rises]
            totals = torch.cat([sums, torch.tensor([float(len(kept))], dtype=torch.float64)]).to(self.device)
            if acc is not None and acc.num_processes > 1:
                totals = acc.reduce(totals, reduction="sum")
            mean = (totals[:-1] / totals[-1]).cpu()
        self._source.clear()
        if epoch_before is not None and hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch_before)  # our pass must not move the loader's epoch counter
        return [channel_attention(part).tolist() for part in mean.split(sizes)]

    def on_epoch_start(self, epoch):
        super().on_epoch_start(epoch)
        if self.attention is None:
            self.attention = self.compute_attention()
            self._att = None

    def penalty(self, model, images):
        if any(n not in self._target for n in self.layers):
            raise RuntimeError("delta: no feature maps captured from the training forward; penalty() must "
                               "follow the model's forward pass in training mode")
        targets = [self._target.pop(n) for n in self.layers]
        for m in self._bns:
            m.train()
        try:
            with torch.no_grad(), self._autocast():
                self.source(images)
        finally:
            for m in self._bns:
                m.eval()
        sources = [self._source.pop(n) for n in self.layers]
        if self._att is None:
            self._att = [torch.tensor(a, dtype=torch.float32, device=self.device) for a in self.attention]
        features = self.alpha * delta_feature_penalty(targets, sources, self._att)
        head = 0.5 * self.beta * squared_norm(self.head_params)
        total = features + head
        for name, v in (("penalty/delta", total), ("penalty/delta_features", features), ("penalty/delta_head", head)):
            self.meter.add(name, v)
        return total

    def state_dict(self):
        return {"layers": self.layers, "attention": self.attention}

    def load_state_dict(self, state):
        if state.get("attention") is None:
            return
        if list(state.get("layers", [])) != self.layers:
            raise ValueError(f"delta: the checkpoint's attention is for layers {state.get('layers')}, "
                             f"this run uses {self.layers}")
        self.attention = [list(map(float, a)) for a in state["attention"]]
        self._att = None
