"""What several test modules share (no test imports another test module): the tiny run on the 4-class digits
folder (`tiny_config`), each method's settings for it and the metric that shows it acted, a tiny classifier,
a tiny search space, and readers of executed notebooks."""
from __future__ import annotations

import torch
from torch import nn

from rifle import config as C
from rifle.models import Classifier

NUM_CLASSES = 5


def data_config(dataset: str = "digits", **values) -> C.DataConfig:
    """The DataConfig config.build makes of these options (converted, checked, the registry's defaults filled in,
    e.g. digits' 20 images per class): what rifle.data.load takes. Selection last, so val_fraction 0 builds too."""
    return C.build({"selection": "last", "dataset": dataset} | values).data


def tiny_config(tmp_path, folder, name: str = "out", **values) -> C.Config:
    """A run of seconds: the digits folder at 48 px, 24 training images at batch 8 (3 steps an epoch), 8 for
    validation, RIFLE's one re-init after epoch 0 of 2, no weights artifact, MLflow in tmp_path."""
    return C.build({"dataset": f"imagefolder:{folder}", "image_size": 48, "batch_size": 8, "val_fraction": 0.25,
                    "train_per_class": 0, "epochs": 2, "reinit_times": 1, "tricks": "rifle", "log_weights": False,
                    "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "output_dir": str(tmp_path / name)} | values)


# Settings of each method for a short run (a few batches on the offline data), and the per-epoch metric that
# shows it acted (None: visible only in lr_backbone / lr_head). test_tricks_training uses them too.
CANONICAL = {
    "rifle": {"reinit_times": 1},
    "head_lr_restart": {"reinit_times": 1},
    "dropout": {"dropout_p": 0.5},
    "dropconnect": {"dropconnect_p": 0.5},
    "stochastic_depth": {"sd_survival_last": 0.5, "sd_mode": "batch"},
    "disturb_label": {"disturb_alpha": 0.5},
    "cyclic_lr": {"clr_base_lr": 0.001, "clr_max_lr": 0.01, "clr_step_epochs": 0.5},
    "l2": {"l2_alpha": 1e-4},
    "l2sp": {"l2sp_alpha": 0.01, "l2sp_beta": 1e-4},
    "delta": {"delta_alpha": 0.01, "delta_beta": 0.01, "delta_attention_epochs": 2, "delta_attention_batches": 1},
}
# The methods that compose with RIFLE: head_lr_restart is its control (RIFLE-cyclic without re-inits), refused with it.
WITH_RIFLE = [m for m in C.TRICK_NAMES if m not in ("rifle", "head_lr_restart")]
EVIDENCE = {
    "rifle": "head_reinit",
    "head_lr_restart": None,
    "dropout": "dropout/drop_rate",
    "dropconnect": "dropconnect/drop_rate",
    "stochastic_depth": "stochastic_depth/skip_rate",
    "disturb_label": "disturb_label/flip_rate",
    "cyclic_lr": None,
    "l2": "penalty/l2",
    "l2sp": "penalty/l2sp",
    "delta": "penalty/delta",
}


def resnet10t() -> nn.Module:
    import timm
    return timm.create_model("resnet10t", pretrained=False, num_classes=0)


def tiny_classifier(backbone_fn=resnet10t, seed=0) -> Classifier:
    torch.manual_seed(seed)
    backbone = backbone_fn()
    with torch.no_grad():
        width = backbone.eval()(torch.zeros(1, 3, 32, 32)).shape[1]
    return Classifier(backbone, width, NUM_CLASSES)


def images(n=4, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def tiny_space(tmp_path, folder, name="tiny", tricks="rifle", epochs=2,
               lr="{type: float, low: 0.001, high: 0.05, log: true}"):
    """A search space on the 4-class digits folder (8 validation images): seconds per trial. Its method is
    the label of `tricks` (rifle.methods)."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"""
fixed:
  dataset: imagefolder:{folder}
  image_size: 48
  batch_size: 16
  val_fraction: 0.25
  epochs: {epochs}
  tricks: {tricks}
params:
  lr: {lr}
""")
    return path


def outputs(nb, kind):
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if kind in o.get("data", {})]


def text_of(nb):
    return "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", "")) +
                     str(o.get("data", {}).get("text/markdown", "")) for c in nb.cells if c.cell_type == "code"
                     for o in c.outputs)
