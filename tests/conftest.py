import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Small enough for CI on 2 cores: 48 px (32 px hits a slow CPU conv path, 30x slower), 3 images per class, batch 16.
TINY = ["--image_size", "48", "--train_per_class", "3", "--batch_size", "16", "--val_fraction", "0.1"]


def subprocess_env(**extra):
    """This interpreter's bin first on PATH (`mlflow run` calls `python`), no inherited MLflow run."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env | {"PYTHONUNBUFFERED": "1"} | extra


def run_cli(args, cwd, env=None, module="rifle.train", timeout=600):
    """Run `python -m <module> ...` in a fresh process; returns CompletedProcess (text)."""
    full_env = subprocess_env(**(env or {}))
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def sqlite_uri(tmp_path):
    return f"sqlite:///{tmp_path}/mlflow.db"


def mlflow_runs(uri, experiment=None):
    import mlflow
    client = mlflow.tracking.MlflowClient(uri)
    exps = [e.experiment_id for e in client.search_experiments()
            if experiment is None or e.name == experiment]
    return client, client.search_runs(exps) if exps else []
