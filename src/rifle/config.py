"""Typed, validated run configuration.

One dataclass per concern (data, model, optimization, tricks, run). Every field name is unique across
sections, so the command line (`--lr 0.01`), YAML files (flat, or grouped under the section names),
`key=value` overrides from sweeps and the MLflow params all use the same flat names.

This module imports nothing heavy: bad input must fail in well under a second, before torch loads.
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import catalog, schedules  # the trick table (names, no classes) and pure arithmetic: no torch
from . import keys as K
from .data import BAD_IMAGES  # rifle.data itself loads nothing until a source is asked for

# The built-in methods, in the canonical order of method labels (rifle.methods): the table rifle.catalog.TRICKS
# (which loads nothing), so a bad name fails before torch loads. `trick_names()` adds registered ones.
TRICK_NAMES = tuple(catalog.TRICKS)
# RIFLE's initializers of the new head (rifle.tricks.rifle.reinit_linear_): the layer's own, or the Paddle port's.
REINIT_INITS = ("default", "he_normal")
# Methods that split the run into reinit_times + 1 equal periods, truncating epochs to a multiple of K+1 as the
# official code does: RIFLE, and its control restarting only the head's learning rate (one budget for both).
PERIODIC = ("rifle", "head_lr_restart")
# Explicit penalties that each replace weight decay with their own definition of "L2": one at a time.
EXCLUSIVE_REGULARIZERS = ("l2", "l2sp", "delta")


class ConfigError(ValueError):
    """A bad option value: `option` names the flag, the message says what is allowed."""

    def __init__(self, option: str, message: str):
        super().__init__(f"--{option}: {message}")
        self.option = option


# What an option is to the tools, declared on its field (`opt(roles=...)`) or its section (SECTION_ROLES); every
# list of options by role comes from `with_role`, so an option's role is said once.
ROLES = {
    "data": "an option of the data section",
    "trick": "an option of a method (the tricks section, a registered trick's options; reinit_count, clr_cycles)",
    "run_only": "changes how, not what, is trained: outside the digest, free to change on resume, never compared",
    "pair_free": "may differ between paired runs besides the run-only options (the seed, the method, loader workers)",
    "budget": "sets a run's budget: one value for every method of a plan's group (rifle.plan.check_budget)",
    "budget_param": "a param recording the budget the run trained, compared by the report's budget notes",
    "same_settings": "must agree between the tuned studies rifle compare compares (data, model and these)",
    "delta_key": "DELTA's measured channel attention depends on it (the key of its cache)",
    "managed": "a sweep or campaign sets it for each trial: a search space may not",
    "per_run": "a tool names it for each run it starts: no flag of a tool's parser",
    "delivery": "changes how an image reaches the model, not which images load (rifle preflight loads data once)",
    "step_free": "leaves a training step's cost as it is (rifle preflight measures a step once per the rest)",
}


def opt(default: Any, help: str, choices: tuple | None = None, minimum: float | None = None,
        exclusive_minimum: bool = False, roles: tuple[str, ...] = ()) -> Any:
    unknown = set(roles) - set(ROLES)
    if unknown:
        raise ValueError(f"unknown role(s) {sorted(unknown)}, known: {', '.join(ROLES)}")
    meta = {"help": help, "choices": choices, "minimum": minimum, "exclusive_minimum": exclusive_minimum,
            "roles": tuple(roles)}
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    dataset: str = opt("digits", "target dataset: a registered name (digits, cub200, cars, aircraft, dogs, "
                       "dtd, food101, caltech256, or an entry of --dataset_registry), 'imagefolder:<root>' "
                       "(root/train/<class>/*, root/test/<class>/*), 'disk:<path>' (datasets.save_to_disk), "
                       "or a Hugging Face Hub id / local Hub-style folder ('hub:<id or path>')",
                       roles=("budget", "delta_key"))
    dataset_revision: str | None = opt(None, "Hub revision (commit or tag) to pin for a Hub dataset "
                                       "(default: the registry entry's, else main)", roles=("budget", "delta_key"))
    image_column: str | None = opt(None, "name of the image column in the source dataset (default: the "
                                   "registry entry's, else 'image')", roles=("budget", "delta_key"))
    label_column: str | None = opt(None, "name of the label column in the source dataset (default: the "
                                   "registry entry's, else 'label')", roles=("budget", "delta_key"))
    image_size: int = opt(64, "square input size in pixels (the paper uses 224)", minimum=8,
                          roles=("budget", "delta_key", "delivery"))
    hflip: bool | None = opt(None, "random horizontal flip in training (default: on, off for digits)",
                             roles=("budget", "delta_key", "delivery"))
    val_fraction: float = opt(0.2, "fraction of train carved out (stratified) as validation when the "
                              "source has no validation split; 0: no validation at all, train on the whole "
                              "train split (the authors' protocol, with --selection last)", minimum=0.0,
                              roles=("budget", "delta_key"))
    train_per_class: int | None = opt(None, "k training images per class (k-shot subset of train after the "
                                      "validation split is carved out); 0 keeps all (default: the registry entry's "
                                      "protocol, "
                                      "e.g. 20 for digits and 30 for caltech256_30, else all)", minimum=0,
                                      roles=("budget", "delta_key"))
    split_seed: int = opt(0, "seed of the validation carve-out and the k-shot subset (fixed across "
                          "training seeds so seeds are paired on the same data)", minimum=0,
                          roles=("budget", "delta_key"))
    num_workers: int = opt(0, "DataLoader worker processes", minimum=0,
                           roles=("budget", "delta_key", "pair_free", "delivery"))
    dataset_registry: str | None = opt(None, "YAML file of extra or overriding dataset entries (see "
                                       "rifle/data/datasets.yaml; default: $RIFLE_DATASET_REGISTRY)", roles=("budget",))
    label_rate: float = opt(100.0, "percent of each class of train kept (stratified, seeded by split_seed, "
                            "after the validation split is carved out), e.g. 15, 30, 50; 100 keeps all",
                            minimum=0.0, exclusive_minimum=True, roles=("budget", "delta_key"))
    bad_images: str = opt("error", "images that cannot be decoded (corrupt, truncated, empty, not an image, "
                          "decompression bomb), found by a scan before training: stop with their names, "
                          "or skip them and log which", choices=BAD_IMAGES, roles=("budget", "delta_key"))
    decode_cache: str = opt("raw", "decode every image once, stored resized to the training resize "
                            "(rifle.data.decode_cache) and cropped and flipped as uint8, normalized on the device: "
                            "raw (uint8, the same pixels as off), jpeg (re-encoded at quality 90: less disk, other "
                            "pixels) or off (decode and augment with PIL every epoch)", choices=("raw", "jpeg", "off"),
                            roles=("budget", "delivery"))
    num_proc: int = opt(0, "processes datasets uses to prepare a dataset (load_dataset num_proc) and threads "
                        "of the image scan (0: one process; scan threads = CPU count, at most 8)", minimum=0,
                        roles=("run_only", "delivery"))


@dataclass
class ModelConfig:
    model: str = opt("efficientnet_lite0", "backbone: 'efficientnet_lite0' (bundled ImageNet weights, "
                     "offline), 'torchvision:<name>' (e.g. torchvision:resnet50) or 'timm:<name>'",
                     roles=("delta_key",))
    pretrained: bool = opt(True, "load ImageNet weights (torchvision/timm download them once)", roles=("delta_key",))
    weights: str = opt("", "which pretrained weights: '' the library's default (torchvision's DEFAULT, timm's default "
                       "tag; efficientnet_lite0: its bundled file, the only choice), a torchvision weights enum member "
                       "for torchvision:<name> (IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT) or a timm pretrained tag for "
                       "timm:<name> (e.g. a1_in1k); logged resolved as the param weights_resolved")
    backbone_dropout: bool = opt(False, "keep the backbone's own dropout, drop-path and stochastic depth "
                                 "(e.g. torchvision efficientnet/mobilenet/convnext, timm drop_rate/"
                                 "drop_path_rate); off: every method starts from the same plain network")


@dataclass
class OptimConfig:
    epochs: int = opt(20, "training epochs (RIFLE and head_lr_restart truncate to a multiple of reinit_times+1, "
                      "as the official code does)", minimum=1, roles=("budget", "same_settings", "step_free"))
    batch_size: int = opt(32, "batch size per process", minimum=1, roles=("budget", "same_settings"))
    sync_bn: bool = opt(False, "synchronize BatchNorm across processes: normalize with the statistics of the "
                        "global batch (batch_size x processes) instead of each process's own (no effect with "
                        "one process)")
    lr: float = opt(0.01, "base learning rate of the backbone (SGD, cosine over epochs)", minimum=0.0,
                    exclusive_minimum=True)
    head_lr: float | None = opt(None, "base learning rate of the new classifier head (default: lr)",
                                minimum=0.0, exclusive_minimum=True)
    momentum: float = opt(0.9, "SGD momentum", minimum=0.0, roles=("same_settings",))
    weight_decay: float = opt(1e-4, "SGD weight decay on all parameters (the official L2 setting)",
                              minimum=0.0)
    grad_accum_steps: int = opt(1, "gradient accumulation steps", minimum=1, roles=("budget", "same_settings"))
    mixed_precision: str = opt("no", "autocast precision", choices=("no", "fp16", "bf16"),
                               roles=("same_settings", "delta_key"))


@dataclass
class TricksConfig:
    tricks: str = opt("rifle", "comma-separated methods, empty or 'none' for plain fine-tuning: "
                      + ", ".join(TRICK_NAMES), roles=("pair_free",))
    reinit_times: int = opt(1, "RIFLE: K re-initializations of the head, K+1 equal periods (head_lr_restart: the "
                            "same K+1 periods, no re-init)", minimum=1)
    head_lr_policy: str = opt("follow", "RIFLE: head learning rate follows the backbone's cosine, or "
                              "restarts a cosine every period ('cyclic')", choices=("follow", "cyclic"))
    reinit_guard_epochs: int = opt(0, "RIFLE: refuse a configuration whose last re-initialization leaves fewer "
                                   "than N epochs of training after it (a check only: the schedule never "
                                   "changes)", minimum=0)
    reset_head_momentum: bool = opt(False, "RIFLE: also zero the head's SGD momentum buffers at a "
                                    "re-initialization (the official code keeps them)")
    reinit_init: str = opt("default", "RIFLE: initializer of the new head: default (the layer's own, PyTorch's "
                           "nn.Linear init, as the official code's reset_parameters) or he_normal (the Paddle port's, "
                           "see rifle/tricks/rifle.py: weight ~ N(0, 2/fan_in), bias ~ N(0, 2/classes)), drawn from "
                           "the generator seeded by the seed and the index of the reset", choices=REINIT_INITS)
    dropout_p: float = opt(0.5, "dropout: probability of zeroing each feature entering the head, in [0, 1); 0.5 as "
                           "Srivastava et al. 2014 use for hidden units", minimum=0.0)
    dropconnect_p: float = opt(0.5, "dropconnect: probability of zeroing each weight and bias of the head, "
                               "a new mask per example, in [0, 1); 0.5 as in Wan et al. 2013", minimum=0.0)
    sd_survival_last: float = opt(0.5, "stochastic_depth: survival probability p_L of the deepest residual "
                                  "block; block l of L survives with 1 - l/L (1 - p_L); 0.5 as in Huang et al. 2016",
                                  minimum=0.0, exclusive_minimum=True)
    sd_mode: str = opt("batch", "stochastic_depth: drop a residual branch for the whole mini-batch (the "
                       "paper) or independently per sample", choices=("batch", "sample"))
    disturb_alpha: float = opt(0.1, "disturb_label: probability that a training label is replaced by a "
                               "uniform draw over all classes, in [0, 1]; 0.1 as in Xie et al. 2016", minimum=0.0)
    clr_base_lr: float | None = opt(None, "cyclic_lr: lower learning rate of the triangular policy "
                                    "(default: clr_max_lr / 4; Smith 2017, Sec. 3.3: 1/3 to 1/4 of the maximum)",
                                    minimum=0.0, exclusive_minimum=True)
    clr_max_lr: float | None = opt(None, "cyclic_lr: upper learning rate (default: lr); the recipe's rate stands in "
                                   "for Smith 2017's LR range test; the head keeps its head_lr/lr ratio",
                                   minimum=0.0, exclusive_minimum=True)
    clr_step_epochs: float = opt(2.0, "cyclic_lr: half-cycle asked, in epochs (Smith 2017, Sec. 3.3: 2-10 epochs' "
                                 "iterations); the run fits max(1, round(epochs / (2 clr_step_epochs))) whole cycles "
                                 "to its budget (param clr_cycles), so it ends at clr_base_lr",
                                 minimum=0.0, exclusive_minimum=True)
    l2_alpha: float = opt(1e-4, "l2: alpha/2 ||w||^2 on all parameters, replacing weight_decay (set to 0); "
                          "the default equals the official RIFLE code's weight decay (lixingjian/RIFLE)", minimum=0.0)
    l2sp_alpha: float = opt(0.01, "l2sp: alpha/2 ||w - w0||^2 on the backbone towards the pretrained "
                            "weights (Li et al. 2018; 0.01 as the official RIFLE code, lixingjian/RIFLE)", minimum=0.0)
    l2sp_beta: float = opt(1e-4, "l2sp: beta/2 ||w||^2 on the head (1e-4 as the official RIFLE code)", minimum=0.0)
    delta_alpha: float = opt(0.01, "delta: weight of the attention-weighted feature-map distance to the "
                             "pretrained network (Li et al. 2019; 0.01 as the DELTA authors' run.sh, "
                             "lixingjian/DELTA)", minimum=0.0)
    delta_beta: float = opt(0.01, "delta: beta/2 ||w||^2 on the head (0.01 as the DELTA authors' run.sh)",
                            minimum=0.0)
    delta_layers: str = opt("auto", "delta: comma-separated backbone modules whose output feature maps are "
                            "compared ('auto': as the authors, the last conv of each ResNet stage, e.g. "
                            "layer1.2.conv3..layer4.2.conv3 of ResNet-50; see rifle/tricks/delta.py for others)")
    delta_attention_epochs: int = opt(10, "delta: epochs of training the linear classifier on frozen "
                                      "pretrained features before the channel attention is measured", minimum=1,
                                      roles=("delta_key",))
    delta_attention_batches: int = opt(4, "delta: training batches used to measure each channel's loss "
                                       "increase when removed (the authors' channel_eval.py: 4)", minimum=1,
                                       roles=("delta_key",))
    delta_attention_batch_size: int = opt(32, "delta: batch size of the channel-attention measurement (the "
                                          "authors' run.sh: 32, while it trains with 64)", minimum=1,
                                          roles=("delta_key",))
    delta_attention_lr: float = opt(0.01, "delta: learning rate of that linear classifier (the authors' "
                                    "channel_eval.py: 0.01; apart from --lr so a sweep shares one measurement)",
                                    minimum=0.0, exclusive_minimum=True, roles=("delta_key",))


@dataclass
class RunConfig:
    seed: int = opt(0, "training seed (init of the head, data order, augmentation)", minimum=0,
                    roles=("pair_free", "step_free"))
    selection: str = opt("best_val", "which checkpoint test_acc reports: the best validation epoch "
                         "(best_val) or the last epoch (last, the authors' protocol); test_acc_last is "
                         "always logged too", choices=("best_val", "last"), roles=("same_settings", "step_free"))
    output_dir: str = opt("", "checkpoints and best weights; the same dir resumes the run (default: "
                          "outputs/<hash of the options>, so the same command resumes)",
                          roles=("run_only", "managed", "per_run"))
    keep_checkpoints: int = opt(2, "epoch checkpoints kept on disk while the run trains", minimum=1,
                                roles=("run_only",))
    keep_finished_checkpoints: bool = opt(False, "keep the epoch checkpoints once the run has finished (default: "
                                          "removed; the selected weights, finished.json and the MLflow model stay)",
                                          roles=("run_only",))
    tracking_uri: str | None = opt(None, "MLflow tracking URI (default: $MLFLOW_TRACKING_URI or "
                                   "sqlite:///mlflow.db)", roles=("run_only", "managed"))
    experiment: str | None = opt(None, "MLflow experiment name (default: $MLFLOW_EXPERIMENT_NAME, else rifle; "
                                 "under `mlflow run` the run's own, set with its --experiment-name)",
                                 roles=("run_only", "managed"))
    run_name: str | None = opt(None, "MLflow run name", roles=("run_only", "managed", "per_run"))
    log_weights: bool = opt(True, "log the selected weights (artifacts weights/, safetensors) and the MLflow "
                            "model (runs:/<run_id>/model: images in, class labels and names out)", roles=("run_only",))
    register_model: str | None = opt(None, "register the logged MLflow model in the Model Registry under this "
                                     "name (a new version per run; needs log_weights)", roles=("run_only",))
    system_metrics: bool = opt(True, "log CPU, memory, disk, network and, on NVIDIA GPUs, GPU use as MLflow "
                               "system/* metrics (every 10 s; $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL)",
                               roles=("run_only",))
    probe_reinit_steps: int = opt(5, "gradient probe: optimizer steps before and after each period boundary of "
                                  "(epochs, reinit_times), where RIFLE re-initializes the head (measured for every "
                                  "method), averaged into grad_norm_pre_reinit/<block> and grad_norm_post_reinit/"
                                  "<block> (0: none; grad_norm/<block> per epoch is always logged)", minimum=0,
                                  roles=("run_only",))
    network_timeout: int = opt(30, "seconds one contact with the MLflow server, the Optuna storage or the Hugging Face "
                               "Hub may take, retries included, before the command stops with one line naming it "
                               "(rifle.network; MLFLOW_HTTP_REQUEST_* variables you set win)", minimum=1,
                               roles=("run_only",))
    threads: int = opt(0, "torch intra-op threads (0: torch's default, one per core); results differ at float "
                       "level between thread counts, so paired tools fix it (tag env.threads)", minimum=0,
                       roles=("run_only",))
    deterministic: bool = opt(False, "torch's deterministic algorithms, cuDNN's deterministic convolutions and a "
                              "fixed cuBLAS workspace: repeatable GPU runs, slower (tag env.deterministic)",
                              roles=("run_only",))
    # Speed only (run-only: they change how, not what, is trained, so a run may resume with them).
    channels_last: bool = opt(False, "model and input batches in channels-last memory format (faster "
                              "convolutions on GPUs with tensor cores)", roles=("run_only",))
    compile: bool = opt(False, "torch.compile the prepared model with --compile_backend", roles=("run_only",))
    compile_backend: str = opt("inductor", "torch.compile backend: inductor generates fused kernels (on a "
                               "2-core CPU that takes minutes), aot_eager and eager only capture graphs (quick "
                               "checks), cudagraphs", choices=("inductor", "aot_eager", "eager", "cudagraphs"),
                               roles=("run_only",))
    pin_memory: bool = opt(False, "page-locked batches copied to the GPU asynchronously (ignored without a "
                           "GPU); training loader workers (--num_workers > 0) are restarted every epoch with that "
                           "epoch's seed, so a resumed run augments as the uninterrupted one; evaluation workers "
                           "are kept", roles=("run_only",))
    delta_cache_dir: str = opt("", "delta: folder of the cached channel attention, measured once per source "
                               "network, data and attention options and reused by every run (default: "
                               "$XDG_CACHE_HOME/rifle/delta, else ~/.cache/rifle/delta)", roles=("run_only",))


SECTIONS = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "tricks": TricksConfig,
            "run": RunConfig}


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    tricks: TricksConfig = field(default_factory=TricksConfig)
    run: RunConfig = field(default_factory=RunConfig)
    extra: dict = field(default_factory=dict)  # options of tricks registered from outside (catalog.register)

    @property
    def trick_list(self) -> list[str]:
        return parse_tricks(self.tricks.tricks)

    def flat(self) -> dict[str, Any]:
        """All options as one flat dict (the MLflow params, the checkpoint's record)."""
        return {f.name: getattr(getattr(self, s), f.name) for s in SECTIONS
                for f in dataclasses.fields(getattr(self, s))} | {
            name: self.extra.get(name, f.default) for name, (_, f) in catalog.OPTIONS.items()}


def trick_names() -> tuple[str, ...]:
    """Every method: the built-in ones, then those registered (rifle.catalog.register)."""
    return tuple(catalog.TRICKS)


def all_fields() -> dict[str, tuple[str, dataclasses.Field]]:
    """Flat option name -> (section, field); a registered trick's options are in section "extra"."""
    return {f.name: (s, f) for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)} | {
        name: ("extra", f) for name, (_, f) in catalog.OPTIONS.items()}


# Every option of a section has its section's roles besides its own; a registered trick's options ("extra") are a
# method's options too.
SECTION_ROLES = {"data": ("data", "same_settings"), "model": ("same_settings",), "tricks": ("trick",),
                 "extra": ("trick",)}
# The params a run logs beyond its options (rifle.keys; rifle.trainer.run_params and setup), with their roles.
DERIVED_ROLES = {K.REINIT_COUNT: ("trick",), K.CLR_CYCLES: ("trick",), K.EPOCHS_TRAINED: ("budget_param",),
                 K.OPTIMIZER_STEPS: ("budget_param",), K.WEIGHTS_RESOLVED: ()}


def roles_of(name: str) -> tuple[str, ...]:
    """The roles of an option (its section's, then its own) or of a derived param."""
    if name in DERIVED_ROLES:
        return DERIVED_ROLES[name]
    section, f = all_fields()[name]
    return (*SECTION_ROLES.get(section, ()), *f.metadata.get("roles", ()))


def with_role(*roles: str, without: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The options (in field order, a registered trick's last), then the derived params, holding any of `roles`
    and none of `without`: the one query behind every list of options by what they are to a tool."""
    unknown = (set(roles) | set(without)) - set(ROLES)
    if unknown:
        raise ValueError(f"unknown role(s) {sorted(unknown)}, known: {', '.join(ROLES)}")
    names = (*all_fields(), *DERIVED_ROLES)
    return tuple(n for n in names if set(roles_of(n)) & set(roles) and not set(roles_of(n)) & set(without))


def parse_tricks(text: str) -> list[str]:
    names = [t.strip() for t in (text or "").split(",") if t.strip()]
    return [] if names in ([], ["none"]) else names


def option_type(name: str, owner: type | None = None) -> tuple[type, bool]:
    """(base type, whether None is allowed) of an option (of `owner`, default the trainer's), from its
    annotation."""
    if owner is None:
        section, _ = all_fields()[name]
        owner = catalog.OPTIONS[name][0] if section == "extra" else SECTIONS[section]
    hint = typing.get_type_hints(owner)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return (args[0] if args else hint), type(None) in typing.get_args(hint)


def convert(name: str, value: Any) -> Any:
    """Convert a raw value (string from the CLI/YAML/MLflow) to the option's type, or raise ConfigError."""
    fields = all_fields()
    if name not in fields:
        close = [n for n in fields if n.startswith(name[:3])]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(name, f"unknown option{hint}")
    return _convert(name, *option_type(name), value)


def convert_field(owner: type, f: dataclasses.Field, value: Any) -> Any:
    """A raw value of another dataclass's `opt` field (a verb's own options, e.g. the sweep's) converted and
    bounded exactly as a trainer option is: one converter for every option of every verb."""
    if f.metadata.get("choices") and value in f.metadata["choices"]:
        return value  # a choice as named ("none" is the sweep's pruner, not an empty value)
    converted = _convert(f.name, *option_type(f.name, owner), value)
    check_bounds(f.name, f, converted)
    return converted


def _convert(name: str, typ: type, optional: bool, value: Any) -> Any:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        if optional:
            return None
        if typ is str:
            return ""
        raise ConfigError(name, f"a value is required ({typ.__name__})")
    if typ is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(name, f"expected true or false, got {value!r}")
    if typ in (int, float):
        try:
            number = float(value) if typ is float else _integer(value)
        except (TypeError, ValueError):
            raise ConfigError(name, f"expected a{'n integer' if typ is int else ' number'}, got {value!r}") from None
        if typ is float and not math.isfinite(number):
            raise ConfigError(name, f"expected a finite number, got {value!r}")
        return number
    return str(value)


def _integer(value: Any) -> int:
    """int from 6, '6' or '6.0' (MLflow passes numeric params as floats); refuses 6.5 and True."""
    if isinstance(value, bool):
        raise ValueError(value)
    number = float(value)
    if not number.is_integer():
        raise ValueError(value)
    return int(number)


def check_bounds(name: str, f: dataclasses.Field, value: Any) -> None:
    """ConfigError when `value` is outside the choices or below the minimum in the field's `opt` metadata."""
    if value is None:
        return
    meta = f.metadata
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(name, f"got {value!r}, allowed: {', '.join(meta['choices'])}")
    low = meta.get("minimum")
    if low is not None:
        if meta.get("exclusive_minimum") and not value > low:
            raise ConfigError(name, f"must be > {low}, got {value!r}")
        if value < low:
            raise ConfigError(name, f"must be >= {low}, got {value!r}")


def flatten_yaml(data: Any, source: str) -> dict[str, Any]:
    """Accept flat keys or keys grouped under the section names."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("config", f"{source}: expected a mapping of option: value")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in SECTIONS and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def load_yaml(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError("config", f"file not found: {path}")
    try:
        return flatten_yaml(yaml.safe_load(p.read_text()), path)
    except yaml.YAMLError as e:
        raise ConfigError("config", f"{path}: not valid YAML ({e})") from None


def build(values: dict[str, Any] | None = None, config_file: str | None = None) -> Config:
    """Defaults <- YAML file <- explicit values; converted, validated and resolved."""
    from_file = dict(load_yaml(config_file)) if config_file else {}
    merged = from_file | (values or {})
    cfg = Config()
    fields = all_fields()
    for name, raw in merged.items():
        try:
            value = convert(name, raw)
        except ConfigError as e:
            if name in from_file and name not in (values or {}):  # say which file holds the bad key
                raise ConfigError(name, f"{str(e).removeprefix(f'--{name}: ')} (in {config_file})") from None
            raise
        section, f = fields[name]
        check_bounds(name, f, value)
        if section == "extra":
            cfg.extra[name] = value
        else:
            setattr(getattr(cfg, section), name, value)
    return resolve(cfg)


def resolve(cfg: Config) -> Config:
    """Cross-option checks and derived values (cheap, no imports of torch)."""
    unknown = [t for t in cfg.trick_list if t not in trick_names()]
    if unknown:
        raise ConfigError("tricks", f"unknown method {unknown[0]!r}, allowed: {', '.join(trick_names())}")
    if len(set(cfg.trick_list)) != len(cfg.trick_list):
        raise ConfigError("tricks", f"a method is listed twice in {cfg.tricks.tricks!r}")
    _check_tricks(cfg)
    if cfg.run.seed >= 2**32:  # rifle.seeds hashes 32-bit words
        raise ConfigError("seed", f"must be below 2**32, got {cfg.run.seed}")
    if periodic(cfg):
        trained = schedules.truncated_epochs(cfg.optim.epochs, cfg.tricks.reinit_times)
        if trained < 1:
            periods = schedules.rifle_periods(cfg.tricks.reinit_times)
            what = (f"{cfg.tricks.reinit_times} re-initializations" if "rifle" in cfg.trick_list
                    else f"{periods} head learning-rate periods (reinit_times={cfg.tricks.reinit_times})")
            raise ConfigError("reinit_times", f"{what} need at least {periods} epochs (one per period), got "
                              f"epochs={cfg.optim.epochs}")
        cfg.optim.epochs = trained
    if "rifle" in cfg.trick_list:
        last = reinit_epochs(cfg)[-1]
        left = cfg.optim.epochs - 1 - last
        if left < cfg.tricks.reinit_guard_epochs:
            raise ConfigError("reinit_guard_epochs", f"the last of the {cfg.tricks.reinit_times} re-initializations "
                              f"(after epoch {last} of 0..{cfg.optim.epochs - 1}) leaves {left} epochs of training, "
                              "fewer "
                              f"than {cfg.tricks.reinit_guard_epochs}: lower reinit_guard_epochs or reinit_times, "
                              "or train longer")
    if cfg.model.weights and not cfg.model.pretrained:
        raise ConfigError("weights", f"{cfg.model.weights!r} asked with --pretrained false, which loads no weights: "
                          "drop --weights or set --pretrained true")
    if cfg.run.register_model and not cfg.run.log_weights:
        raise ConfigError("register_model", "registers the logged model, which --log_weights false turns off")
    if cfg.data.val_fraction == 0 and cfg.run.selection != "last":
        raise ConfigError("val_fraction", "0 trains on the whole train split with no validation, so there is "
                          "no best-validation checkpoint: add --selection last (the authors' protocol)")
    if cfg.data.val_fraction >= 1:
        raise ConfigError("val_fraction", f"a fraction of train in [0, 1), got {cfg.data.val_fraction:g}")
    ds = _check_dataset(cfg)
    if cfg.data.hflip is None:
        cfg.data.hflip = ds != "digits"  # a mirrored digit is another symbol
    if cfg.optim.head_lr is None:
        cfg.optim.head_lr = cfg.optim.lr
    if not cfg.run.output_dir:
        cfg.run.output_dir = os.path.join("outputs", config_digest(cfg))
    return cfg


def _check_tricks(cfg: Config) -> None:
    """Combinations and values no method accepts, refused before any data or model loads."""
    names, t = set(cfg.trick_list), cfg.tricks
    if {"rifle", "cyclic_lr"} <= names and t.head_lr_policy == "cyclic":
        raise ConfigError("head_lr_policy", "cyclic_lr and RIFLE's head_lr_policy=cyclic are two learning-rate "
                          "policies for the head; use head_lr_policy=follow with cyclic_lr, or drop cyclic_lr "
                          "from --tricks")
    if {"head_lr_restart", "rifle"} <= names:
        raise ConfigError("tricks", "head_lr_restart is RIFLE's cyclic head learning rate without re-inits (its "
                          "control): use rifle with head_lr_policy=cyclic instead of both")
    if {"head_lr_restart", "cyclic_lr"} <= names:
        raise ConfigError("tricks", "head_lr_restart and cyclic_lr are two learning-rate policies for the head: "
                          "choose one")
    regs = [n for n in EXCLUSIVE_REGULARIZERS if n in names]
    if len(regs) > 1:
        raise ConfigError("tricks", f"{' and '.join(regs)} are alternative regularizers (each replaces weight "
                          "decay with its own penalty): choose one")
    for option in ("dropout_p", "dropconnect_p"):
        if not getattr(t, option) < 1.0:
            raise ConfigError(option, f"must be < 1 (1 drops everything), got {getattr(t, option)}")
    for option in ("disturb_alpha", "sd_survival_last"):
        if not getattr(t, option) <= 1.0:
            raise ConfigError(option, f"is a probability: must be <= 1, got {getattr(t, option)}")
    if "cyclic_lr" in names:
        base, top = clr_bounds(cfg)
        if not base < top:
            raise ConfigError("clr_base_lr", f"must be below clr_max_lr (default: lr), got {base} >= {top}")


def clr_bounds(cfg: Config) -> tuple[float, float]:
    """cyclic_lr's (base_lr, max_lr): max_lr defaults to lr, base_lr to max_lr / 4 (Smith 2017)."""
    t = cfg.tricks
    top = t.clr_max_lr if t.clr_max_lr is not None else cfg.optim.lr
    return (t.clr_base_lr if t.clr_base_lr is not None else top / 4), top


def periodic(cfg: Config) -> bool:
    """Whether a method of the configuration splits the run into K+1 periods (PERIODIC), truncating its epochs."""
    return any(t in PERIODIC for t in cfg.trick_list)


def reinit_epochs(cfg: Config) -> list[int]:
    """Epochs after which the (resolved) configuration really re-initializes the head: none without RIFLE."""
    if "rifle" not in cfg.trick_list:
        return []
    return schedules.rifle_reinit_epochs(cfg.optim.epochs, cfg.tricks.reinit_times)


def reinit_count(cfg: Config) -> int:
    return len(reinit_epochs(cfg))


def clr_cycle_count(cfg: Config) -> int:
    """The whole triangular cycles cyclic_lr fits to the run (schedules.clr_cycles); 0 without cyclic_lr."""
    if "cyclic_lr" not in cfg.trick_list:
        return 0
    return schedules.clr_cycles(cfg.optim.epochs, cfg.tricks.clr_step_epochs)


def _check_dataset(cfg: Config) -> str:
    """Dataset name, registry file and subset options; returns the dataset name. Folders are checked here
    so a typo fails in a second; the content is checked when data.py loads it."""
    from .data import registry
    d = cfg.data
    try:
        path = registry.registry_path(d.dataset_registry)
        entries = registry.load(d.dataset_registry)
    except registry.RegistryError as e:
        raise ConfigError("dataset_registry", str(e)) from None
    if path:
        d.dataset_registry = str(Path(path).resolve())  # recorded in the params, also when it came from the env
    ds, spec, entry = d.dataset, d.dataset, None
    if registry.is_name(ds):
        if ds not in entries:
            raise ConfigError("dataset", f"unknown dataset {ds!r}: registered are {', '.join(sorted(entries))}; "
                              "or use imagefolder:<root>, disk:<path> or a Hub id (owner/name or hub:<id or folder>)")
        entry = entries[ds]
        spec = entry.source
    for prefix in ("imagefolder:", "disk:"):
        if spec.startswith(prefix) and not os.path.isdir(spec[len(prefix):]):
            where = "" if spec == ds else f" (registry entry {ds!r})"
            raise ConfigError("dataset", f"directory not found: {spec[len(prefix):]!r}{where}")
    if spec.startswith("hub:") and len(spec) == 4:
        raise ConfigError("dataset", "'hub:' needs a dataset id or folder, e.g. hub:tanganke/dtd")
    if d.label_rate > 100:
        raise ConfigError("label_rate", f"a percentage of train in (0, 100], got {d.label_rate:g}")
    if d.train_per_class is None:  # the entry's k-shot protocol (digits: 20 images per class), else all
        d.train_per_class = (entry.train_per_class or 0) if entry is not None and d.label_rate == 100 else 0
    elif d.train_per_class > 0 and d.label_rate < 100:
        raise ConfigError("label_rate", f"label_rate={d.label_rate:g} and train_per_class={d.train_per_class} "
                          "both subset train: set one of them (train_per_class 0 keeps all)")
    return ds


RUN_ONLY = with_role("run_only")


def config_digest(cfg: Config) -> str:
    """12 hex digits identifying what is trained (not where it is stored or tracked)."""
    import hashlib
    import json
    core = {k: v for k, v in cfg.flat().items() if k not in RUN_ONLY}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:12]


def to_yaml(cfg: Config) -> str:
    sections = {s: dataclasses.asdict(getattr(cfg, s)) for s in SECTIONS} | ({"extra": cfg.extra} if cfg.extra else {})
    return yaml.safe_dump(sections, sort_keys=False)
