"""Throwaway servers for benchmarks and tests: a fresh PostgreSQL database on the machine's server
(127.0.0.1:5432, user postgres, trust auth) and an `mlflow server` bound to 127.0.0.1."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path


@contextlib.contextmanager
def postgres_database(prefix: str, password: str = ""):
    """A fresh database, dropped afterwards. Yields its URL; a password, when given, is put in the URL (trust
    auth ignores it), to test that it never shows."""
    import psycopg
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = psycopg.connect(host="127.0.0.1", user="postgres", dbname="test", autocommit=True)
    admin.execute(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql://postgres{':' + password if password else ''}@127.0.0.1:5432/{name}"
    finally:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(backend_uri: str, folder: Path, workers: int = 1, port: int | None = None):
    """`mlflow server` on `backend_uri`, bound to 127.0.0.1 (on `port`, else a free one), artifacts proxied into
    folder/art; yields its URL once /health answers and stops it (its whole process group: it forks workers)
    afterwards."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_RUN")} | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    port = port or free_port()
    log = open(folder / "server.log", "a")
    server = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1",
                               "--port", str(port), "--workers", str(workers), "--backend-store-uri", backend_uri,
                               "--artifacts-destination", str(folder / "art")],
                              cwd=folder, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True, env=env)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("mlflow server did not start: " + (folder / "server.log").read_text()[-2000:])
            try:
                if urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.2)
        yield uri
    finally:
        with contextlib.suppress(ProcessLookupError):  # already gone if it died at start
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
        log.close()
