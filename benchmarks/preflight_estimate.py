"""(h) The preflight's price against the measured time of the same plan on the same machine.

`rifle preflight --json` prices a small campaign (digits, plain and RIFLE, the validated protocol, 2 seeds, one
worker), then `rifle campaign` trains the same plan. The figure is estimate / measured, for the cells' own time
(the sum of the campaign's MLflow run durations, what the estimate prices) and for the campaign's wall time (its
process start and reports included). The issue's target: within 25% of the cells' time.

    python benchmarks/preflight_estimate.py [--epochs 8] [--train_per_class 20] [--image_size 48]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from common import load, wait_until_idle, workdir


def plan_args(tmp, epochs: int, train_per_class: int, image_size: int, seeds: int) -> list[str]:
    """The small plan, as `rifle preflight` and `rifle campaign` both take it."""
    return ["--methods", "plain,rifle", "--protocol", "validated", "--seeds", str(seeds), "--name", "bench",
            "--tracking_uri", f"sqlite:///{tmp}/mlflow.db", "--output_root", str(tmp / "runs"),
            "--report_dir", str(tmp / "report"), "--epochs", str(epochs), "--train_per_class", str(train_per_class),
            "--image_size", str(image_size)]


def run(epochs: int = 8, train_per_class: int = 20, image_size: int = 48, seeds: int = 2) -> dict:
    tmp = workdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_RUN")} | {"PYTHONUNBUFFERED": "1"}
    plan = plan_args(tmp, epochs, train_per_class, image_size, seeds)
    wait_until_idle()
    pre = subprocess.run([sys.executable, "-m", "rifle", "preflight", *plan, "--json"], cwd=tmp, env=env,
                         capture_output=True, text=True, timeout=1800)
    if pre.returncode != 0:
        raise RuntimeError(f"preflight failed: {pre.stdout[-2000:]}{pre.stderr[-2000:]}")
    estimate = json.loads(pre.stdout)["estimate"]
    wait_until_idle()
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "rifle", "campaign", *plan], cwd=tmp, env=env, capture_output=True,
                          text=True, timeout=7200)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"campaign failed: {done.stderr[-2000:]}")
    from mlflow.tracking import MlflowClient

    from rifle import keys as K
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
            if r.data.tags.get(K.CELL_ROLE) == K.Role.CELL]
    cells = sum((r.info.end_time - r.info.start_time) / 1000 for r in runs)
    seconds = estimate["hours"] * 3600
    result = {"cells": len(runs), "estimate_s": seconds, "measured_cells_s": cells, "measured_wall_s": wall,
              "estimate_over_cells": seconds / cells, "estimate_over_wall": seconds / wall,
              "config": {"epochs": epochs, "train_per_class": train_per_class, "image_size": image_size,
                         "seeds": seeds}}
    print(f"  {len(runs)} cells: estimate {seconds:.0f} s, measured {cells:.0f} s in the cells "
          f"(estimate / measured {result['estimate_over_cells']:.2f}), {wall:.0f} s of campaign wall time "
          f"({result['estimate_over_wall']:.2f}) (load {load()})", flush=True)
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--train_per_class", type=int, default=20)
    p.add_argument("--image_size", type=int, default=48)
    p.add_argument("--seeds", type=int, default=2)
    args = p.parse_args(argv)
    return run(args.epochs, args.train_per_class, args.image_size, args.seeds)


if __name__ == "__main__":
    main()
