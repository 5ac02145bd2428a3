"""The selected network as the MLflow pyfunc model `model` of its run (docs/concepts/training.md, "The model"):
uint8 RGB images (N, H, W, 3) of any size in, a DataFrame of label, class_name and probability out.

A "model from code" (pyfunc_model.py: nothing is unpickled) holding the selected weights (safetensors), the
resolved options (config.yaml), the class names and a copy of the rifle package. It rebuilds the network as
the trainer built it, with the methods' changes that act at test time too (DropConnect's head), and applies
the evaluation preprocessing of training. `--register_model NAME` makes it a new version of NAME.
"""
import dataclasses
import json
import tempfile
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

NAME = "model"            # runs:/<run_id>/model
WEIGHTS_FOLDER = "weights"  # the run's artifacts weights/<best-NNNN or last>.safetensors
BATCH = 64


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
                          outputs=Schema([ColSpec("long", "label"), ColSpec("string", "class_name"),
                                          ColSpec("double", "probability")]))


def _requirements() -> list[str]:
    """The distributions of the modules `import rifle` needs, pinned to the versions installed here (without
    local tags such as +cu130, which package indexes do not serve); MLflow adds its own."""
    from importlib.metadata import packages_distributions, version

    from .. import _REQUIRED
    names = packages_distributions()
    dists = {names.get(module, [module])[0] for module in (*_REQUIRED, "PIL", "numpy") if module != "mlflow"}
    return sorted(f"{dist}=={version(dist).split('+')[0]}" for dist in dists)


def log_model(tracker, cfg, weights: Path):
    """Log `weights` under artifacts weights/ and the pyfunc model `model` (registered when
    cfg.run.register_model names a registered model). Main process only; returns MLflow's ModelInfo."""
    if not tracker.active:
        return None
    from ..config import to_yaml
    from ..network import redact

    tracker.log_file(weights, WEIGHTS_FOLDER)
    safe = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, tracking_uri=redact(cfg.run.tracking_uri)))
    with tempfile.TemporaryDirectory() as tmp:
        config, classes = Path(tmp) / "config.yaml", Path(tmp) / "classes.json"
        config.write_text(to_yaml(safe))
        classes.write_text(json.dumps(tracker.class_names or []))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(type hint|input example).*")
            info = mlflow.pyfunc.log_model(
                name=NAME, python_model=str(Path(__file__).with_name("pyfunc_model.py")),
                artifacts={"weights": str(weights), "config": str(config), "classes": str(classes)},
                # the package as installed here (MLflow leaves out __pycache__)
                code_paths=[str(Path(__file__).resolve().parents[1])], signature=signature(),
                input_example=np.full((1, 8, 8, 3), 128, np.uint8), pip_requirements=_requirements(),
                registered_model_name=cfg.run.register_model or None)
    if cfg.run.register_model:
        tracker.set_tags({"registered_model": f"{cfg.run.register_model}/{info.registered_model_version}"})
    return info


def config_from_yaml(text: str):
    """A Config from a logged config.yaml, as trained (no re-resolution: the dataset need not exist here)."""
    import yaml

    from ..config import SECTIONS, Config
    data = yaml.safe_load(text) or {}
    sections = {}
    for name, cls in SECTIONS.items():
        known = {f.name for f in dataclasses.fields(cls)}
        sections[name] = cls(**{k: v for k, v in (data.get(name) or {}).items() if k in known})
    return Config(**sections)


def build_network(cfg, num_classes: int):
    """The trained architecture without weights: backbone and head, with the methods' changes to the model."""
    from ..models import build_model
    from ..tricks import build_tricks
    net = build_model(cfg.model.model, num_classes, pretrained=False)
    for trick in build_tricks(cfg):
        trick.prepare_model(net)
    return net


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """RGB images -> label, class_name, probability (softmax of the predicted class)."""

    def load_context(self, context):
        import torch
        from safetensors.torch import load_file

        from ..data.transforms import build_transform
        cfg = config_from_yaml(Path(context.artifacts["config"]).read_text())
        self.classes = json.loads(Path(context.artifacts["classes"]).read_text())
        state = load_file(context.artifacts["weights"])
        self.net = build_network(cfg, state["head.weight"].shape[0])
        self.net.load_state_dict(state)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.net.to(self.device).eval()
        self.transform = build_transform(cfg.data.image_size, self.net.mean, self.net.std, train=False)

    def predict(self, context, model_input: np.ndarray, params=None) -> pd.DataFrame:
        import torch
        from PIL import Image
        images = np.asarray(model_input)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"expected a uint8 array (N, H, W, 3) of RGB images, got {images.dtype} "
                             f"{images.shape}")
        labels, probs = [], []
        with torch.inference_mode():
            for start in range(0, len(images), BATCH):
                chunk = [Image.fromarray(a) for a in images[start:start + BATCH]]
                x = torch.stack(self.transform({"image": chunk, "label": [0] * len(chunk)})["pixel_values"])
                p, label = self.net(x.to(self.device)).float().softmax(1).max(1)
                labels += label.tolist()
                probs += p.tolist()
        names = [self.classes[i] if i < len(self.classes) else str(i) for i in labels]
        return pd.DataFrame({"label": np.asarray(labels, dtype=np.int64), "class_name": names,
                             "probability": np.asarray(probs, dtype=np.float64)})
