"""(e) DELTA's channel-attention cache: plain fine-tuning, DELTA with a warm cache and DELTA with a cold one.

Real trainer runs (MLflow on SQLite), side by side: per repeat a plain run, a DELTA run on an empty cache
folder (it measures the channel attention: the classifier on frozen features, then every channel's loss
increase; rifle/tricks/delta.py) and a DELTA run on the folder the cold run filled (it only reads), so drifts
in machine speed hit all three alike; medians over the repeats. Timed: the first epoch (from the end of
setup: DELTA measures or reads the attention there), the later epochs (DELTA's extra no-grad pass of the
frozen source each step) and the whole run (setup to the final test, as a user waits for it). Target: a DELTA
run with a warm cache costs at most 2x a plain run. Tiny settings (the bundled EfficientNet-Lite0 on digits
at 48 px, 20 images per class, batch 16, 3 epochs, the default layers; the attention classifier's 10 epochs
and 2 batches for the channel evaluation) so that it takes about 2 minutes on 2 idle CPU cores.

    python benchmarks/delta_cache.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import contextlib
import time

import common
from common import Others, build, load, median, wait_until_idle, workdir

TINY = {"image_size": 48, "train_per_class": 20, "batch_size": 16, "epochs": 3, "delta_attention_batches": 2}
VARIANTS = ("plain", "delta, cold cache", "delta, warm cache")


def timed_fit(cfg) -> dict:
    """Wall times of one trainer run: setup, the first epoch (from the end of setup), the median later epoch,
    the whole run."""
    import rifle.trainer as T
    setup, marks, ends = T.setup, {}, []

    def timed_setup(*args, **kwargs):
        session = setup(*args, **kwargs)
        marks["setup"] = time.perf_counter()
        return session
    T.setup = timed_setup  # fit looks `setup` up in its module at call time
    try:
        wait_until_idle()
        with Others():
            start = time.perf_counter()
            T.fit(cfg, callbacks=[lambda epoch, metrics: ends.append(time.perf_counter())])
            stop = time.perf_counter()
    finally:
        T.setup = setup
    epochs = [b - a for a, b in zip([marks["setup"]] + ends, ends)]
    return {"run_s": stop - start, "setup_s": marks["setup"] - start, "first_epoch_s": epochs[0],
            "later_epoch_s": median(epochs[1:]) if len(epochs) > 1 else float("nan")}


def measure_all(repeats: int, tmp, passes: list[float]) -> dict[str, list[dict]]:
    """Per repeat: plain, DELTA on an empty cache folder, DELTA on the folder that run filled."""
    timed_fit(build(TINY | {"epochs": 1}, tmp, "warmup"))  # imports, first data load, oneDNN kernels
    rows: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for r in range(repeats):
        cache = str(tmp / f"cache{r}")
        for name, values in zip(VARIANTS, ({"tricks": ""}, {"tricks": "delta", "delta_cache_dir": cache},
                                           {"tricks": "delta", "delta_cache_dir": cache})):
            before = len(passes)
            row = timed_fit(build(TINY | values, tmp, f"{name.replace(', ', '-').replace(' ', '_')}-{r}"))
            row |= {"attention_passes": len(passes) - before, "attention_s": sum(passes[before:])}
            expected = 1 if name == "delta, cold cache" else 0
            if row["attention_passes"] != expected:
                raise RuntimeError(f"{name}: {row['attention_passes']} attention passes, expected {expected}")
            rows[name].append(row)
            print(f"  repeat {r + 1}/{repeats} {name}: run {row['run_s']:.1f} s, first epoch "
                  f"{row['first_epoch_s']:.2f} s, later {row['later_epoch_s']:.2f} s (load {load()})", flush=True)
    return rows


def run(repeats: int = 3) -> dict:
    from rifle.tricks import delta as D
    tmp = workdir()
    passes: list[float] = []
    measure = D.Delta.measure

    def timed_measure(self):
        t = time.perf_counter()
        out = measure(self)
        passes.append(time.perf_counter() - t)
        return out
    D.Delta.measure = timed_measure
    try:
        with contextlib.chdir(tmp):  # MLflow puts a SQLite store's artifacts under ./mlruns
            rows = measure_all(repeats, tmp, passes)
    finally:
        D.Delta.measure = measure
    out = {name: {k: median([row[k] for row in rs]) for k in rs[0]} for name, rs in rows.items()}
    plain = out["plain"]
    for name in VARIANTS[1:]:
        for k in ("run_s", "first_epoch_s", "later_epoch_s"):
            out[name][k.replace("_s", "_ratio")] = out[name][k] / plain[k]
    out["config"] = TINY
    out["repeats"] = repeats
    return out


def table(r: dict) -> list[str]:
    lines = ["| variant | first epoch (s) | later epochs (s) | whole run (s) | run / plain |", "|---|---|---|---|---|"]
    for name in VARIANTS:
        row = r[name]
        extra = f" (attention pass {row['attention_s']:.1f} s)" if row["attention_passes"] else ""
        lines.append(f"| {name}{extra} | {row['first_epoch_s']:.2f} | {row['later_epoch_s']:.2f} | "
                     f"{row['run_s']:.1f} | {row.get('run_ratio', 1.0):.2f}x |")
    return lines


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    r = run(p.parse_args(argv).repeats)
    print(f"(e) DELTA channel-attention cache, medians of {r['repeats']} repeats, {r['config']}:")
    for line in table(r):
        print(line)
    warm = r["delta, warm cache"]["run_ratio"]
    print(f"DELTA with a warm cache: {warm:.2f}x a plain run (target <= 2x, "
          f"{'meets target' if warm <= 2 else 'MISSES target'}); a later epoch "
          f"{r['delta, warm cache']['later_epoch_ratio']:.2f}x a plain one")
    if common.OTHERS:
        print(f"other processes used {100 * median(common.OTHERS):.0f}% (median) and at most "
              f"{100 * max(common.OTHERS):.0f}% of the CPU during the {len(common.OTHERS)} runs")
    return r


if __name__ == "__main__":
    main()
