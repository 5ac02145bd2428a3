"""(f) Per-epoch MLflow logging over HTTP, synchronous against asynchronous, in a real trainer session.

The tracking store is an `mlflow server` on 127.0.0.1 (SQLite behind it), so every call is an HTTP round trip,
as on a cluster. Each repeat logs the epoch's real metrics (losses, accuracies, learning rates, weight_dist/
and grad_norm/ of every block) twice: synchronously (the trainer before: the epoch waits for the round trip),
and asynchronously (the trainer now: queued, then `Tracker.flush` before the next checkpoint, after the next
epoch's compute). The figure is the time training waits, per epoch and as a share of the epoch: the
synchronous call, against the enqueue plus whatever is still unsent at the flush.
"""
from __future__ import annotations

import argparse

from common import Clock, NoBar, build, load, median, wait_until_idle, workdir
from servers import mlflow_server


def run(repeats: int = 5) -> dict:
    tmp = workdir()
    with mlflow_server(f"sqlite:///{tmp}/server.db", tmp) as uri:
        cfg = build({"epochs": 4, "tracking_uri": uri}, tmp, "async")
        from rifle.trainer import setup
        s = setup(cfg)
        wait_until_idle()
        try:
            r = measure(s, cfg, repeats)
        finally:
            s.tracker.end()
    print(f"  epoch compute {r['compute_s']:.2f} s; {r['metrics_logged']} metrics over HTTP: synchronous "
          f"{1000 * r['sync_s']:.0f} ms, asynchronous {1000 * r['async_s']:.1f} ms (enqueue "
          f"{1000 * r['enqueue_s']:.1f} + flush {1000 * r['flush_s']:.1f}) (load {load()})", flush=True)
    return r


def measure(s, cfg, repeats: int) -> dict:
    from rifle import probes
    from rifle.models import block_names
    from rifle.trainer import evaluate, train_epoch

    blocks = block_names(s.raw.backbone)

    def epoch(k: int) -> tuple[dict, float]:
        with Clock() as c:
            metrics = train_epoch(s, k, NoBar(), [s.probe])
            metrics |= {"val_acc": evaluate(s.model, s.loaders[1], s.acc), "head_reinit": 0.0}
            s.probe.on_epoch_metrics(k, metrics)
            metrics |= probes.weight_distances(s.raw.backbone, s.pretrained, blocks)
        return metrics, c.seconds

    metrics, _ = epoch(0)  # warm-up (allocator, oneDNN primitives, the server's first requests)
    s.tracker.log_metrics(metrics, step=0)
    sync, enqueue, flush, compute = [], [], [], []
    for k in range(repeats):
        with Clock() as c:
            s.tracker.log_metrics(metrics, step=1 + 2 * k)
        sync.append(c.seconds)
        with Clock() as c:
            s.tracker.log_metrics(metrics, step=2 + 2 * k, synchronous=False)
        enqueue.append(c.seconds)
        metrics, seconds = epoch(1 + k)  # what training does while the queue is sent
        compute.append(seconds)
        with Clock() as c:
            s.tracker.flush()
        flush.append(c.seconds)
    r = {"compute_s": median(compute), "sync_s": median(sync), "enqueue_s": median(enqueue), "flush_s": median(flush),
         "metrics_logged": len(metrics)}
    r["async_s"] = r["enqueue_s"] + r["flush_s"]
    for key in ("sync", "async"):
        r[f"{key}_frac"] = r[f"{key}_s"] / (r["compute_s"] + r[f"{key}_s"])
    return r


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    r = run(p.parse_args(argv).repeats)
    print(f"(f) MLflow logging over HTTP per epoch: synchronous {100 * r['sync_frac']:.2f}% of the epoch, "
          f"asynchronous {100 * r['async_frac']:.2f}%")
    return r


if __name__ == "__main__":
    main()
