"""What a run's numbers depend on beyond its options, recorded with every run (tags env.*, git_commit and
git_dirty).

The same options give the same numbers only in the same environment: a different thread count sums in a
different order, another torch, CUDA or device picks other kernels, and only deterministic algorithms make
a GPU run repeatable. `rifle.report` refuses to pair runs whose environments differ in a tag of COMPARED
(unless told to).
"""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

from . import keys as K

# Versions of the packages a run uses, read from their metadata (nothing imported): tag -> distributions.
PACKAGES = {K.ENV_TORCHVISION: ("torchvision",), K.ENV_TIMM: ("timm",), K.ENV_DATASETS: ("datasets",),
            K.ENV_NUMPY: ("numpy",), K.ENV_PILLOW: ("Pillow",), K.ENV_ACCELERATE: ("accelerate",),
            K.ENV_MLFLOW: ("mlflow", "mlflow-skinny"), K.ENV_OPTUNA: ("optuna",)}
# The tags that change a run's numbers, compared before runs are paired: torch, CUDA and the device choose
# the kernels, threads the order of sums, deterministic the algorithms; torchvision's transforms and Pillow's
# decoding and resizing make the pixels the network sees; timm builds the backbone and its pretrained weights.
# The others are recorded, not compared: numpy and datasets draw the splits, whose content the
# dataset_fingerprint tag records; accelerate wraps the loop in what the run's options set (precision,
# accumulation); mlflow and optuna record and schedule runs. Comparing those would refuse pairs over a
# logging library's patch release.
COMPARED = (K.ENV_TORCH, K.ENV_TORCHVISION, K.ENV_TIMM, K.ENV_PILLOW, K.ENV_CUDA, K.ENV_DEVICE, K.ENV_THREADS,
            K.ENV_DETERMINISTIC)
KEYS = (*COMPARED, *(k for k in PACKAGES if k not in COMPARED))


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def version(*distributions: str) -> str:
    """The installed version of the first of `distributions` found, else "not installed"."""
    from importlib import metadata
    for name in distributions:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return "not installed"


def environment(device=None) -> dict[str, str]:
    """The env.* tags (KEYS) of a run on `device` (a torch.device; default the CPU). On the CPU the device is the
    model name and the vector unit torch's kernels use (e.g. 'AMD EPYC (AVX2)'): two CPUs sold under one name
    may pick different kernels and move results at float level (two 'AMD EPYC' machines: 0.9 points)."""
    import torch
    on_gpu = device is not None and getattr(device, "type", "cpu") == "cuda"
    cpu = f"{cpu_name()} ({torch.backends.cpu.get_cpu_capability()})"
    return {K.ENV_TORCH: torch.__version__, K.ENV_CUDA: torch.version.cuda or "none",
            K.ENV_DEVICE: torch.cuda.get_device_name(device) if on_gpu else cpu,
            K.ENV_THREADS: str(torch.get_num_threads()),
            K.ENV_DETERMINISTIC: str(torch.are_deterministic_algorithms_enabled()).lower()} | {
        tag: version(*names) for tag, names in PACKAGES.items()}


def git_state(folder: Path = Path(__file__).parent) -> dict[str, str]:
    """{"git_commit", "git_dirty"} of the git checkout the package was imported from (git_dirty "true" when
    `git status --porcelain` lists anything: the commit alone does not say what ran); {} outside one, also
    for an installed package that merely lies under some checkout (a virtual environment in a repository)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=30)
    try:
        if git("ls-files", "--error-unmatch", "__init__.py").returncode != 0:  # this package is not tracked here
            return {}
        commit, status = git("rev-parse", "HEAD"), git("status", "--porcelain")
    except (OSError, subprocess.SubprocessError):
        return {}
    if commit.returncode != 0 or status.returncode != 0:
        return {}
    return {K.GIT_COMMIT: commit.stdout.strip(), K.GIT_DIRTY: "true" if status.stdout.strip() else "false"}


def apply(threads: int, deterministic: bool) -> None:
    """Set torch's intra-op threads (0: leave torch's default) and deterministic algorithms for this process;
    deterministic also fixes cuDNN's algorithm choice and cuBLAS's workspace (read when CUDA starts)."""
    import torch
    if threads > 0:
        torch.set_num_threads(threads)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic


def describe(tags: dict) -> str:
    """One line for under a table, of the COMPARED tags: 'torch 2.14.1, torchvision 0.29.1, timm 1.0.22, Pillow
    12.0.0, CUDA none, Intel Xeon, 1 thread, deterministic false' (runs from before the package tags: 'torch
    2.14.1, CUDA none, ...')."""
    if not any(tags.get(k) for k in COMPARED):
        return "environment not recorded (runs made before env.* tags)"
    threads = tags.get(K.ENV_THREADS, "?")
    packages = "".join(f", {name} {tags[k]}" for k, name in ((K.ENV_TORCHVISION, "torchvision"), (K.ENV_TIMM, "timm"),
                                                             (K.ENV_PILLOW, "Pillow")) if tags.get(k))
    return (f"torch {tags.get(K.ENV_TORCH, '?')}{packages}, CUDA {tags.get(K.ENV_CUDA, '?')}, "
            f"{tags.get(K.ENV_DEVICE, '?')}, {threads} thread{'' if threads == '1' else 's'}, "
            f"deterministic {tags.get(K.ENV_DETERMINISTIC, '?')}")
