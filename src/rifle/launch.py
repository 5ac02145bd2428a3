"""How this process was launched, for the trainer and the sweep worker alike: whether Accelerate must be told
to use the CPU for several processes, Accelerate's process state made that way, and the warning when
`accelerate launch` started one process although more were asked."""
from __future__ import annotations

import os
import sys

_warned_one_process = False


def cpu_processes() -> bool:
    """Several processes without a CUDA device: Accelerate selects gloo (MULTI_CPU) only when told `cpu=True`;
    otherwise each process started by `accelerate launch` trains alone as rank 0."""
    import torch
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def distributed_state():
    """Accelerate's process state, made as the trainer's Accelerator makes it (`cpu_processes`); a process-wide
    singleton, so a later Accelerator reuses it."""
    from accelerate import PartialState
    return PartialState(cpu=cpu_processes())


def warn_one_process_launch() -> None:
    """Say so (once per process) when `accelerate launch --num_processes N` (N > 1) started one process.

    Without --multi_gpu or a config file, and with fewer than two GPUs, accelerate uses its simple launcher:
    one process, given MASTER_ADDR/MASTER_PORT (it sets them only when N > 1 or several machines) but no
    WORLD_SIZE, which torchrun (--multi_gpu) and mpirun would give. That process would train alone."""
    global _warned_one_process
    env = os.environ
    launched_one = "ACCELERATE_DYNAMO_BACKEND" in env and "MASTER_ADDR" in env and not any(
        k in env for k in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"))
    if launched_one and not _warned_one_process:
        _warned_one_process = True
        print("warning: accelerate launch started 1 process although more were asked; it trains alone. "
              "Add --multi_gpu (also on a CPU) or use --config_file configs/accelerate/cpu_2proc.yaml",
              file=sys.stderr, flush=True)
