"""Shared pieces of the benchmarks: the benchmark configuration, the machine description, timing helpers."""
from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

# The README's default run (digits, bundled EfficientNet-Lite0, 64 px, batch 32) with more training images,
# so an epoch holds enough steps for per-epoch costs to be measured against: 40 per class = 400 images.
BASE = {"dataset": "digits", "model": "efficientnet_lite0", "image_size": 64, "batch_size": 32,
        "train_per_class": 40, "tricks": "", "lr": 0.01, "log_weights": False}


def machine() -> dict:
    import torch
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def device() -> str:
    import torch
    return f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"


def load() -> str:
    """Load average (1, 5 min): other processes on the machine make every figure slower and noisier."""
    try:
        one, five, _ = os.getloadavg()
        return f"{one:.2f}/{five:.2f}"
    except OSError:
        return "?"


def median(values) -> float:
    return statistics.median(values)


class Clock:
    """Wall time of a block: `with Clock() as c: ...; c.seconds`."""

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def workdir() -> Path:
    """A temporary folder (MLflow store, checkpoints) removed when the process exits."""
    import atexit
    import shutil
    path = Path(tempfile.mkdtemp(prefix="rifle-bench-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def build(values: dict, tmp: Path, name: str):
    from rifle import config as C
    return C.build(BASE | {"tracking_uri": f"sqlite:///{tmp}/mlflow.db", "experiment": "benchmarks",
                           "output_dir": str(tmp / name), "run_name": name} | values)


def trainer_epoch_times(cfg) -> tuple[list[float], dict]:
    """Seconds of every epoch after the first, as the trainer runs them (train, validation, probes,
    checkpoint, MLflow logging), measured between the trainer's epoch-end callbacks; and fit's result."""
    from rifle.trainer import fit
    stamps = []
    result = fit(cfg, on_epoch_end=lambda epoch, metrics: stamps.append(time.perf_counter()))
    return [b - a for a, b in zip(stamps, stamps[1:])], result
