"""(d) GPU-readiness options: trainer epoch time with each option against the default, on this device.

Options: channels_last, bf16 autocast (mixed_precision), pinned memory with persistent worker processes,
torch.compile (inductor), and all of them together. Each is one trainer run in a fresh process (Accelerate
keeps the first mixed precision of a process); the first epoch (warm-up, and compilation under
torch.compile) is not timed. On a GPU the configuration is GPU-sized (224 px, batch 64);
on the CPU it is the benchmark configuration, where pinned memory does nothing and inductor's compilation
takes minutes (pass --compile to include it). Correctness of every option is tested on the CPU
(tests/test_perf_options.py); this only measures speed.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import Others, build, device, load, median, trainer_epoch_times, wait_until_idle, workdir

GPU = {"image_size": 224, "batch_size": 64, "train_per_class": 0}


def options(gpu: bool, compile_on_cpu: bool) -> dict[str, dict]:
    opts = {"default": {}, "channels_last": {"channels_last": True}, "bf16": {"mixed_precision": "bf16"},
            "workers=2 (persistent)" + (" + pin_memory" if gpu else ""): {"num_workers": 2, "pin_memory": gpu}}
    if gpu or compile_on_cpu:
        opts["compile (inductor)"] = {"compile": True}
        opts["all of them"] = {k: v for o in list(opts.values())[1:] for k, v in o.items()}
    return opts


def run(epochs: int = 2, compile_on_cpu: bool = False) -> dict:
    import torch
    gpu = torch.cuda.is_available()
    tmp = workdir()
    rows = {}
    for i, (name, values) in enumerate(options(gpu, compile_on_cpu).items()):
        values = (GPU if gpu else {}) | {"epochs": epochs} | values
        wait_until_idle()
        with Others():
            proc = subprocess.run([sys.executable, __file__, "--single", json.dumps(values), "--workdir",
                                   str(tmp / f"opt{i}")], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"option {name} failed:\n{proc.stderr[-3000:]}")
        rows[name] = json.loads(proc.stdout.strip().splitlines()[-1])["epoch_s"]
        print(f"  {name}: {rows[name]:.2f} s/epoch (load {load()})", flush=True)
    base = rows["default"]
    import rifle.data  # its `load`, not this module's load average
    images = len(rifle.data.load(build(GPU if gpu else {}, tmp, "count").data).data["train"])
    return {"device": device(), "epoch_s": rows, "speedup": {k: base / v for k, v in rows.items()},
            "config": (GPU if gpu else {}) | {"epochs": epochs, "train_images": images}}


def single(values: dict, folder: str) -> None:
    """One trainer run in this process; prints its median timed epoch as JSON on the last line."""
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    times, _ = trainer_epoch_times(build(values, path, "run"))
    print(json.dumps({"epoch_s": median(times)}))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=2, help="per run; the first is not timed")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile on the CPU (slow to compile)")
    p.add_argument("--single", help=argparse.SUPPRESS)  # internal: one option's run, JSON options
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.single:
        return single(json.loads(args.single), args.workdir)
    r = run(args.epochs, args.compile)
    print(f"(d) speed options on {r['device']}: " + ", ".join(f"{k} {v:.2f}x" for k, v in r["speedup"].items())
          + " (epoch-time speed-up over the default)")
    return r


if __name__ == "__main__":
    import os
    os.environ.setdefault("TQDM_DISABLE", "1")
    main()
