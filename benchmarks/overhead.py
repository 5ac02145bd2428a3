"""(c) Per-epoch cost of MLflow logging, the weight-distance probes and the gradient-flow probe.

In a real trainer session (the benchmark configuration, MLflow on SQLite): the epoch's compute (training pass
and validation pass, as the trainer runs them) is timed, then, several times each, the calls the trainer makes
once per epoch: `probes.weight_distances` over every backbone block, `Tracker.log_metrics` with the epoch's
real metrics (losses, accuracies, learning rates, one weight_dist per block), and, for reference, the epoch
checkpoint. Fractions are of the whole epoch (compute + all three). Targets: logging <= 1%, probes <= 2%.
The gradient-flow probe acts at every optimizer step, so it is measured side by side instead: training
epochs alternately without and with it, the median of each; target <= 2% of the epoch.
"""
from __future__ import annotations

import argparse

from common import Clock, NoBar, Others, build, load, median, wait_until_idle, workdir


def run(repeats: int = 5) -> dict:
    tmp = workdir()
    cfg = build({"epochs": 4}, tmp, "overhead")
    from rifle.trainer import setup
    s = setup(cfg)
    wait_until_idle()
    try:
        with Others():
            r = measure(s, cfg, repeats)
    finally:
        s.tracker.end()
    print(f"  epoch {r['epoch_s']:.2f} s (compute {r['compute_s']:.2f} s); probes {1000 * r['probe_s']:.1f} ms over "
          f"{r['blocks']} blocks; MLflow log_metrics {1000 * r['log_s']:.1f} ms for {r['metrics_logged']} metrics; "
          f"checkpoint {1000 * r['checkpoint_s']:.0f} ms; training epoch {r['train_off_s']:.2f} s without the "
          f"gradient probe, {r['train_on_s']:.2f} s with it (load {load()})", flush=True)
    return r


def measure(s, cfg, repeats: int) -> dict:
    from rifle import checkpoint, probes
    from rifle.models import block_names
    from rifle.trainer import evaluate, train_epoch

    blocks = block_names(s.raw.backbone)
    compute = []
    for epoch in range(2):  # the first warms up (allocator, oneDNN primitives)
        with Clock() as c:
            metrics = train_epoch(s, epoch, NoBar())
            metrics |= {"val_acc": evaluate(s.model, s.loaders[1], s.acc), "head_reinit": 0.0}
        compute.append(c.seconds)
    probe_s, log_s, ckpt_s = [], [], []
    for k in range(repeats):
        with Clock() as c:
            distances = probes.weight_distances(s.raw.backbone, s.pretrained, blocks)
        probe_s.append(c.seconds)
        with Clock() as c:
            s.tracker.log_metrics(metrics | distances, step=k)
        log_s.append(c.seconds)
    for k in range(min(repeats, 3)):
        with Clock() as c:  # momentum buffers exist after the epochs above, as in a real checkpoint
            checkpoint.save(s.out, k, s.raw, s.optimizer, s.state, cfg.run.keep_checkpoints)
        ckpt_s.append(c.seconds)
    off, on = [], []
    for k in range(repeats):  # alternating, so drifts in machine speed hit both alike
        for probes_on, times in (([], off), ([s.probe], on)):
            for probe in probes_on:
                probe.on_epoch_start(2 + k)
            with Clock() as c:
                train_epoch(s, 2 + k, NoBar(), probes_on)
                for probe in probes_on:
                    probe.grad_norms(2 + k)
            times.append(c.seconds)
    epoch = compute[-1] + median(probe_s) + median(log_s) + median(ckpt_s)
    r = {"epoch_s": epoch, "compute_s": compute[-1], "probe_s": median(probe_s), "log_s": median(log_s),
         "checkpoint_s": median(ckpt_s), "metrics_logged": len(metrics | distances), "blocks": len(blocks),
         "train_off_s": median(off), "train_on_s": median(on), "grad_probe_frac": median(on) / median(off) - 1}
    for key in ("probe", "log", "checkpoint"):
        r[f"{key}_frac"] = r[f"{key}_s"] / epoch
    return r


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    r = run(p.parse_args(argv).repeats)
    print(f"(c) per-epoch overhead: MLflow logging {100 * r['log_frac']:.2f}% (target <= 1%), probes "
          f"{100 * r['probe_frac']:.2f}% (target <= 2%), checkpoint {100 * r['checkpoint_frac']:.1f}% of a "
          f"{r['epoch_s']:.1f} s epoch; gradient-flow probe {100 * r['grad_probe_frac']:+.2f}% of a training "
          "epoch (target <= 2%)")
    return r


if __name__ == "__main__":
    main()
