import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Caches the tests fill (DELTA's channel attention) go to a throwaway folder, not the user's ~/.cache.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="rifle-test-cache-")
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


@contextlib.contextmanager
def postgres_database(prefix: str, password: str = ""):
    """A fresh database on the machine's PostgreSQL (127.0.0.1:5432, trust auth), dropped afterwards.

    Yields its URL; a password, when given, is put in the URL (trust auth ignores it) to test redaction."""
    import psycopg
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = psycopg.connect(host="127.0.0.1", user="postgres", dbname="test", autocommit=True)
    admin.execute(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql://postgres{':' + password if password else ''}@127.0.0.1:5432/{name}"
    finally:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(backend_uri: str, folder: Path):
    """`mlflow server` on `backend_uri`, bound to 127.0.0.1, artifacts proxied into folder/art; yields its URL
    once /health answers and stops it (its whole process group: it forks workers) afterwards."""
    import urllib.request
    port = free_port()
    log = open(folder / "server.log", "w")
    server = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1", "--backend-store-uri", backend_uri,
                               "--artifacts-destination", str(folder / "art")],
                              cwd=folder, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True,
                              env=subprocess_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"))
    uri = f"http://127.0.0.1:{port}"

    def answered():  # "exited" ends the wait at once: a server that died will not answer
        if server.poll() is not None:
            return "exited"
        try:
            return urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200
        except OSError:
            return False

    try:
        if wait_for(answered, timeout=180, interval=0.2) is not True:
            pytest.fail("mlflow server did not start: " + (folder / "server.log").read_text()[-2000:])
        yield uri
    finally:
        with contextlib.suppress(ProcessLookupError):  # already gone if it died at start
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
        log.close()
