"""Every benchmark, one after the other, then a summary: `python benchmarks/run.py` (about 15 minutes on 2 idle
CPU cores, 9 of them (a)). Each figure is measured here; nothing is a timed test. Other processes on the machine
slow every figure down and add noise: before each measurement the benchmark waits (up to 90 s) for the CPU to be
idle, and it reports how much CPU other processes took during the measurements.

    python benchmarks/run.py                  # all, default sizes
    python benchmarks/run.py --quick          # a smoke run (2 epoch pairs, fewer repeats): checks, not figures
    python benchmarks/run.py --only a,c --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import BASE, device, load, machine  # noqa: E402

# timm's published ResNet-50 training rate at 224 px (AMP, channels_last, batch 512, PyTorch 1.12) on an RTX 3090:
# results/benchmark-train-amp-nhwc-pt112-cu113-rtx3090.csv of huggingface/pytorch-image-models
TIMM_RESNET50_3090 = 1218.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="a,b,c,d,e,f,g", help="which benchmarks: a throughput, b pipeline, c overhead, "
                   "d options, e DELTA's attention cache, f logging over HTTP, g input paths per core at 224 px")
    p.add_argument("--quick", action="store_true", help="smallest settings: checks that everything runs")
    p.add_argument("--compile", action="store_true", help="(d) also measure torch.compile on the CPU")
    p.add_argument("--json", help="also write every figure to this JSON file")
    p.add_argument("--no_wait", action="store_true", help="do not wait (up to 90 s) before each measurement for "
                   "other processes to leave the CPU idle")
    args = p.parse_args(argv)
    if args.no_wait:
        common.WAIT["timeout"] = 0.0
    os.environ.setdefault("TQDM_DISABLE", "1")
    chosen = set(args.only.split(","))
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} with {info['torch_threads']} "
          f"threads, device {device()}, load {load()}", flush=True)
    print(f"configuration: {BASE}", flush=True)
    results, start = {"machine": info}, time.perf_counter()
    if "a" in chosen:
        import throughput
        print("(a) trainer vs bare loop", flush=True)
        results["a"] = throughput.run(runs=1 if args.quick else 5, epochs=3 if args.quick else 7)
    if "b" in chosen:
        import pipeline
        print("(b) input pipeline", flush=True)
        results["b"] = pipeline.run()
    if "c" in chosen:
        import overhead
        print("(c) logging and probe overhead", flush=True)
        results["c"] = overhead.run(repeats=2 if args.quick else 5)
    if "d" in chosen:
        import gpu_options
        print("(d) speed options", flush=True)
        results["d"] = gpu_options.run(epochs=2, compile_on_cpu=args.compile)
    if "e" in chosen:
        import delta_cache
        print("(e) DELTA's channel-attention cache", flush=True)
        results["e"] = delta_cache.run(repeats=1 if args.quick else 3)
    if "f" in chosen:
        import async_logging
        print("(f) MLflow logging over HTTP, synchronous vs asynchronous", flush=True)
        results["f"] = async_logging.run(repeats=2 if args.quick else 5)
    if "g" in chosen:
        import pipeline
        print("(g) input paths per core at 224 px", flush=True)
        results["g"] = pipeline.per_core(224)
        # the rate a GPU trains at: measured by (d) on a GPU (all options), else timm's published anchor
        d = results.get("d", {})
        if d.get("device", "cpu").startswith("cuda"):
            images = d["config"].get("train_images") or 0
            results["g"]["gpu_img_s"] = images / d["epoch_s"]["all of them"] if images else None
    results["seconds"] = time.perf_counter() - start
    results["others_cpu"] = {"median": common.median(common.OTHERS), "max": max(common.OTHERS)} if common.OTHERS else {}
    print(f"\nsummary ({results['seconds']:.0f} s, load {load()}):")
    for line in summary(results):
        print(line)
    if common.OTHERS:
        o = results["others_cpu"]
        print(f"other processes used {100 * o['median']:.0f}% (median) and at most {100 * o['max']:.0f}% of the CPU "
              f"during the {len(common.OTHERS)} measurements" + ("" if o["max"] <= 0.1 else
              ": the machine was shared, so the figures are slower and noisier than on an idle one"))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


def summary(r: dict) -> list[str]:
    def ok(good: bool) -> str:
        return "meets target" if good else "MISSES target"

    lines = ["| benchmark | measured | target |", "|---|---|---|"]
    if "a" in r:
        a = r["a"]
        extra = f", {len(a['discarded'])} pair(s) of busy runs discarded" if a["discarded"] else ""
        lines.append(f"| (a) trainer / bare PyTorch loop throughput (median of {len(a['ratios'])} interleaved epoch "
                     f"pairs{extra}; {a['trainer_img_s']:.1f} vs {a['bare_img_s']:.1f} train img/s) | {a['ratio']:.3f} "
                     f"(95% CI of the median {a['ci'][0]:.3f}-{a['ci'][1]:.3f}) "
                     f"| >= 0.97, {ok(a['ratio'] >= 0.97)} |")
    if "b" in r:
        b = r["b"]
        lines.append(f"| (b) input pipeline / model training rate, workers={b['workers']} (model "
                     f"{b['model_img_s']:.0f} img/s) | digits {b['digits_ratio']:.1f}x "
                     f"({b['digits_img_s']:.0f} img/s), 500x375 JPEG photos {b['photos_ratio']:.1f}x "
                     f"({b['photos_img_s']:.0f} img/s) | >= 3x, "
                     f"{ok(min(b['digits_ratio'], b['photos_ratio']) >= 3)} |")
    if "c" in r:
        c = r["c"]
        lines.append(f"| (c) MLflow logging per epoch ({c['metrics_logged']} metrics, SQLite; "
                     f"{1000 * c['log_s']:.0f} ms of a {c['epoch_s']:.1f} s epoch) | {100 * c['log_frac']:.2f}% "
                     f"| <= 1%, {ok(c['log_frac'] <= 0.01)} |")
        lines.append(f"| (c) weight-distance probes per epoch ({c['blocks']} blocks; {1000 * c['probe_s']:.0f} ms) "
                     f"| {100 * c['probe_frac']:.2f}% | <= 2%, {ok(c['probe_frac'] <= 0.02)} |")
        lines.append(f"| (c) epoch checkpoint, for reference ({1000 * c['checkpoint_s']:.0f} ms) "
                     f"| {100 * c['checkpoint_frac']:.1f}% | none |")
    if "d" in r:
        d = r["d"]
        cells = ", ".join(f"{k} {v:.2f}x" for k, v in d["speedup"].items() if k != "default")
        lines.append(f"| (d) speed options on {d['device']}: epoch-time speed-up over the default "
                     f"({d['epoch_s']['default']:.1f} s/epoch) | {cells} | measured |")
    if "f" in r:
        f = r["f"]
        lines.append(f"| (f) MLflow logging per epoch over HTTP ({f['metrics_logged']} metrics; an mlflow server on "
                     f"127.0.0.1) | synchronous {100 * f['sync_frac']:.2f}% ({1000 * f['sync_s']:.0f} ms), asynchronous "
                     f"{100 * f['async_frac']:.2f}% ({1000 * f['async_s']:.1f} ms) | measured |")
    if "g" in r:
        g = r["g"]
        gpu = g.get("gpu_img_s") or TIMM_RESNET50_3090
        for name, rates in g["img_per_s_per_core"].items():
            a = rates["a_decode_each_epoch"]
            cells = "; ".join(f"{k} {v:.0f} ({v / a:.1f}x, {gpu / v:.1f} cores per GPU)" for k, v in rates.items())
            lines.append(f"| (g) {name}, 224 px, img/s per core | {cells} | (c) >= 5x (a), "
                         f"{ok(rates['c_cache_raw_batch_augment'] >= 5 * a)} |")
    if "e" in r:
        e = r["e"]
        warm, cold = e["delta, warm cache"], e["delta, cold cache"]
        lines.append(f"| (e) DELTA run / plain run, warm attention cache (cold: {cold['run_ratio']:.2f}x, attention "
                     f"pass {cold['attention_s']:.1f} s; later epochs {warm['later_epoch_ratio']:.2f}x) "
                     f"| {warm['run_ratio']:.2f}x | <= 2x, {ok(warm['run_ratio'] <= 2)} |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
