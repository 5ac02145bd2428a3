"""What a run's numbers depend on beyond its options, recorded with every run (tags env.*).

The same options give the same numbers only in the same environment: a different thread count sums in a
different order, another torch, CUDA or device picks other kernels, and only deterministic algorithms make
a GPU run repeatable. `rifle.report` refuses to pair runs whose environments differ (unless told to).
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

KEYS = ("env.torch", "env.cuda", "env.device", "env.threads", "env.deterministic")


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def environment(device=None) -> dict[str, str]:
    """The env.* tags of a run on `device` (a torch.device; default the CPU). On the CPU the device is the
    model name and the vector unit torch's kernels use (e.g. 'AMD EPYC (AVX2)'): two CPUs sold under one name
    may pick different kernels and move results at float level (two 'AMD EPYC' machines: 0.9 points)."""
    import torch
    on_gpu = device is not None and getattr(device, "type", "cpu") == "cuda"
    cpu = f"{cpu_name()} ({torch.backends.cpu.get_cpu_capability()})"
    return {"env.torch": torch.__version__, "env.cuda": torch.version.cuda or "none",
            "env.device": torch.cuda.get_device_name(device) if on_gpu else cpu,
            "env.threads": str(torch.get_num_threads()),
            "env.deterministic": str(torch.are_deterministic_algorithms_enabled()).lower()}


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
    """One line for under a table: 'torch 2.14.1, CUDA none, Intel Xeon, 1 thread, deterministic false'."""
    if not any(tags.get(k) for k in KEYS):
        return "environment not recorded (runs made before env.* tags)"
    threads = tags.get("env.threads", "?")
    return (f"torch {tags.get('env.torch', '?')}, CUDA {tags.get('env.cuda', '?')}, {tags.get('env.device', '?')}, "
            f"{threads} thread{'' if threads == '1' else 's'}, deterministic {tags.get('env.deterministic', '?')}")
