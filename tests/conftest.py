import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):  # two test processes on two cores: one torch thread each (set before
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torch loads), inherited by the runs they start

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the throwaway servers the benchmarks use too
from servers import free_port, mlflow_server, postgres_database  # noqa: E402,F401
# Caches the tests fill (DELTA's channel attention) go to a throwaway folder, not the user's ~/.cache.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="rifle-test-cache-")
# Small enough for CI on 2 cores: 48 px (32 px hits a slow CPU conv path, 30x slower), 3 images per class, batch 16.
TINY = ["--image_size", "48", "--train_per_class", "3", "--batch_size", "16", "--val_fraction", "0.1"]


def subprocess_env(**extra):
    """This interpreter's bin first on PATH (`mlflow run` calls `python`), no inherited MLflow run."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env | {"PYTHONUNBUFFERED": "1"} | extra


def run_cli(args, cwd, env=None, verb="train", timeout=600):
    """Run `python -m rifle <verb> ...` in a fresh process; returns CompletedProcess (text)."""
    full_env = subprocess_env(**(env or {}))
    return subprocess.run([sys.executable, "-m", "rifle", verb, *map(str, args)], cwd=cwd, env=full_env,
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


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory):
    """A small real-image dataset in the official RIFLE layout (root/train/<class>, root/test/<class>):
    4 classes of scikit-learn's handwritten digits, 8 train and 4 test images each. Fast to evaluate."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits4")
    bunch = load_digits()
    for c in range(4):
        idx = np.flatnonzero(bunch.target == c)
        for split, chosen in (("train", idx[:8]), ("test", idx[8:12])):
            (root / split / str(c)).mkdir(parents=True, exist_ok=True)
            for i in chosen:
                pixels = (bunch.images[i] * (255 / 16)).astype(np.uint8)
                Image.fromarray(pixels, mode="L").convert("RGB").save(root / split / str(c) / f"{i}.png")
    return root


def wait_for(condition, timeout: float, interval: float = 0.05):
    """Poll condition() until it returns something true or timeout seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while not (value := condition()) and time.monotonic() < deadline:
        time.sleep(interval)
    return value
