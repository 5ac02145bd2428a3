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

    from rifle.env import cpu_name
    info = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
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


# Share of the machine's CPU time that other processes used during each measurement (see `Others`).
OTHERS: list[float] = []
WAIT = {"max_busy": 0.15, "timeout": 90.0}  # run.py --no_wait sets timeout 0


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine since boot, in clock ticks, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


def _my_cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class Others:
    """Around a measurement: the share of all CPU time that other processes used meanwhile (machine busy
    time minus this process's and its children's), appended to OTHERS. 0 on an otherwise idle machine."""

    def __enter__(self):
        self.jiffies, self.mine, self.start = _cpu_jiffies(), _my_cpu(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        busy, total = (b - a for a, b in zip(self.jiffies, _cpu_jiffies()))
        hz = os.sysconf("SC_CLK_TCK")
        others = max(0.0, busy / hz - (_my_cpu() - self.mine)) / max(total / hz, 1e-9)
        self.share = min(others, 1.0)
        OTHERS.append(self.share)


def wait_until_idle() -> None:
    """Before a measurement: wait (up to WAIT["timeout"] s) until other processes use at most
    WAIT["max_busy"] of the CPU, so a shared machine's load spikes do not land in the figures."""
    start = time.perf_counter()
    while True:
        a = _cpu_jiffies()
        time.sleep(1.0)
        busy, total = (y - x for x, y in zip(a, _cpu_jiffies()))
        share = busy / max(total, 1)
        waited = time.perf_counter() - start
        if share <= WAIT["max_busy"] or waited >= WAIT["timeout"]:
            if waited > 2:
                print(f"  (waited {waited:.0f} s for other processes; busy {100 * share:.0f}%)", flush=True)
            return


def median(values) -> float:
    return statistics.median(values)


def median_ci(values, level: float = 0.95) -> tuple[float, float]:
    """Distribution-free confidence interval of the median: the order statistics the binomial(n, 1/2) law puts
    around it (coverage >= level; the whole range when n is too small for that)."""
    from scipy.stats import binom
    x, n = sorted(values), len(values)
    j = int(binom.ppf((1 - level) / 2, n, 0.5))  # P(Bin <= j - 1) < (1 - level) / 2
    return (x[j - 1], x[n - j]) if j >= 1 else (x[0], x[-1])


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
    wait_until_idle()
    with Others():
        result = fit(cfg, callbacks=[lambda epoch, metrics: stamps.append(time.perf_counter())])
    return [b - a for a, b in zip(stamps, stamps[1:])], result


class NoBar:
    """A progress bar that shows nothing, for the trainer's train_epoch outside fit."""

    def update(self, n):
        pass

