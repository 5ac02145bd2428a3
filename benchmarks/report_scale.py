"""How rifle report scales with the number of runs: the bulk reads against the per-run reads they replaced.

    python benchmarks/report_scale.py --runs 2000 --store server     # last line: JSON
    python benchmarks/report_scale.py --runs 500 --store sqlite --legacy_timeout 600

A synthetic store shaped like a campaign.s (rifle.plan): two datasets, ten methods (the paper's table),
N/20 seeds each, 30 epochs; every run with the params, tags and per-epoch metric keys a real run logs
(losses, accuracies, learning rates, weight_dist/ and grad_norm/ of EfficientNet-Lite0's 11 blocks; RIFLE's
runs also head_reinit, reinit_weight_spread and the pre/post re-init gradient windows), as child runs of a
parent per dataset. `sqlite`: a SQLite file; `server`: an `mlflow server` on 127.0.0.1 backed by a fresh
PostgreSQL database (dropped after), so every call is an HTTP round trip as on a cluster. The full report
(tables and figures, nothing logged) is timed with the bulk reads (rifle.track.reads) and, unless --legacy_timeout
0, with the per-run reads rifle report used before (transliterated below; stopped after the timeout, the
rest extrapolated from its rate). Requests: HTTP requests for the server; calls into the tracking store
(each one SQL round trip or more) for SQLite.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from servers import mlflow_server, postgres_database  # noqa: E402

METHODS = ("plain", "rifle", "dropout", "dropconnect", "stochastic_depth", "disturb_label", "cyclic_lr", "l2sp",
           "rifle+l2sp", "delta")
DATASETS = ("digits", "imagefolder:/data/CUB_200_2011")
EPOCHS = 30
EXPERIMENT = "scale"


def synthetic_store(uri: str, n_runs: int, threads: int = 1) -> int:
    """Write the store; returns the number of metric points."""
    from concurrent.futures import ThreadPoolExecutor

    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from rifle import config as C
    from rifle.env import environment
    from rifle.methods import method_tricks
    from rifle.models import block_names, build_backbone
    from rifle.plan import BASE
    from rifle.track.tracker import param_text
    from rifle.trainer import run_params
    blocks = block_names(build_backbone("efficientnet_lite0", pretrained=False)[0])
    client = MlflowClient(uri)
    exp = client.create_experiment(EXPERIMENT)
    seeds = max(1, n_runs // (len(DATASETS) * len(METHODS)))
    env = environment()
    cells = [(d, m, s) for d in DATASETS for s in range(seeds) for m in METHODS][:n_runs]
    parents = {d: client.create_run(exp, run_name=f"scale-{d}", tags={"cell.group": f"scale-{d}",
                                                                       "cell.role": "parent"}).info.run_id
               for d in DATASETS}

    def one(cell) -> int:
        dataset, method, seed = cell
        rng = np.random.default_rng(hash(cell) % 2**32)
        cfg = C.build(BASE | {"tricks": ",".join(method_tricks(method)), "seed": seed, "output_dir": "unused"})
        params = {k: text for k, v in run_params(cfg).items() if (text := param_text(v)) is not None}
        params |= {"dataset": dataset, "optimizer_steps": str(4 * EPOCHS), "experiment": EXPERIMENT}
        rifle = "rifle" in cfg.trick_list
        tags = {"mlflow.parentRunId": parents[dataset], "cell.group": f"scale-{dataset}", "cell.role": "seed",
                "cell.method": method, "cell.seed": str(seed), "tricks": params["tricks"], "git_commit": "0" * 40,
                "dataset_fingerprint": "f" * 16, "num_processes": "1", **env} | (
            {"selected_before_reinit": "false"} if rifle else {})
        now, metrics = int(time.time() * 1000), []
        for e in range(EPOCHS):
            values = {"train_loss": 2.3 * np.exp(-e / 8), "train_acc": 1 - np.exp(-e / 6), "val_acc": 0.9 - 0.3 * np.exp(-e / 5),
                      "lr_backbone": 0.005 * (1 + np.cos(np.pi * e / EPOCHS)), "lr_head": 0.005 * (1 + np.cos(np.pi * e / EPOCHS))}
            values |= {f"weight_dist/{b}": (e + 1) * (1 + i) * 0.01 for i, b in enumerate(blocks)}
            values |= {f"grad_norm/{b}": 0.1 / (1 + i) * (1 + rng.random()) for i, b in enumerate(blocks)}
            if rifle:
                values["head_reinit"] = float(e == EPOCHS // 2 - 1)
            metrics += [Metric(k, float(v) + 1e-3 * rng.random(), now + e, e) for k, v in values.items()]
        if rifle:
            e = EPOCHS // 2 - 1
            metrics += [Metric("reinit_weight_spread", 0.0, now + e, e)]
            metrics += [Metric(f"grad_norm_pre_reinit/{b}", 0.1 * rng.random(), now + e, e) for b in blocks]
            metrics += [Metric(f"grad_norm_post_reinit/{b}", 0.05 * rng.random(), now + e + 1, e + 1) for b in blocks]
        acc = 0.9 + 0.02 * rng.standard_normal()
        metrics += [Metric(k, v, now + EPOCHS, 0) for k, v in {"test_acc": acc, "test_acc_last": acc, "best_val_acc": acc,
                                                               "best_epoch": 20.0, "selected_epoch": 20.0}.items()]
        run = client.create_run(exp, run_name=f"{method}-seed-{seed}", tags=tags).info.run_id
        items = list(params.items())
        for i in range(0, len(items), 100):
            client.log_batch(run, params=[Param(k, v) for k, v in items[i:i + 100]])
        for i in range(0, len(metrics), 1000):
            client.log_batch(run, metrics=metrics[i:i + 1000])
        client.set_terminated(run)
        return len(metrics)

    with ThreadPoolExecutor(threads) as pool:
        points = sum(pool.map(one, cells))
    for parent in parents.values():
        client.set_terminated(parent)
    return points


def legacy_histories(deadline: float):
    """rifle report's history reads before the bulk reads: a get_run per run for its probe keys, then a
    get_metric_history per (run, key), every history key and probe of every run; stops at `deadline`."""
    from rifle import keys
    from rifle.track import reads

    class TimedOut(Exception):
        pass

    def fetch(runs, tracking_uri=None, *args, **kwargs):
        import pandas as pd
        client = reads.client(tracking_uri)
        rows = []
        for i, r in enumerate(runs.itertuples(index=False)):
            if time.perf_counter() > deadline:
                raise TimedOut(i)
            probes = sorted(k for k in client.get_run(r.run_id).data.metrics if k.startswith(keys.PROBES))
            rows += [(r.run_id, r.dataset, r.method, r.seed, key, point.step, point.value)
                     for key in (*keys.HISTORY, *probes) for point in client.get_metric_history(r.run_id, key)]
        return pd.DataFrame(rows, columns=["run_id", "dataset", "method", "seed", "key", "step", "value"])

    return fetch, TimedOut


class Requests:
    """Counts HTTP requests (every one through requests' adapter) or calls into the SQL tracking store."""

    def __init__(self, store: str):
        self.n, self.store, self.undo = 0, store, []

    def __enter__(self):
        if self.store == "server":
            import requests
            self._wrap(requests.adapters.HTTPAdapter, "send")
        else:
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
            for name in ("get_run", "get_metric_history", "get_metric_history_bulk", "search_runs", "_search_runs",
                         "get_experiment", "get_experiment_by_name", "search_experiments"):
                self._wrap(SqlAlchemyStore, name)
        return self

    def _wrap(self, cls, name):
        original = getattr(cls, name)

        def counted(*args, **kwargs):
            self.n += 1
            return original(*args, **kwargs)
        setattr(cls, name, counted)
        self.undo.append((cls, name, original))

    def __exit__(self, *exc):
        for cls, name, original in reversed(self.undo):
            setattr(cls, name, original)


def timed_report(uri: str, out: Path, store: str) -> dict:
    from rifle.evidence import build
    with Requests(store) as count:
        start = time.perf_counter()
        built = build.build_report(uri, EXPERIMENT, output_dir=out, log=False)
        seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 2), "mlflow_requests": count.n, "runs_read": len(built["runs"]),
            "figures": sum(str(f).endswith(".png") for f in built["files"].values())}


def timed_legacy(uri: str, out: Path, store: str, timeout: float, runs: int) -> dict:
    from rifle.evidence import build
    fetch, TimedOut = legacy_histories(time.perf_counter() + timeout)
    saved, build.figure_histories = build.figure_histories, fetch
    try:
        with Requests(store) as count:
            start = time.perf_counter()
            try:
                build.build_report(uri, EXPERIMENT, output_dir=out, log=False)
                return {"seconds": round(time.perf_counter() - start, 2), "mlflow_requests": count.n, "complete": True}
            except TimedOut as e:
                done, seconds = e.args[0], time.perf_counter() - start
                return {"complete": False, "runs_read_in_time": done, "seconds_spent": round(seconds, 1),
                        "requests_made": count.n, "seconds_extrapolated": round(seconds * runs / max(done, 1)),
                        "requests_extrapolated": round(count.n * runs / max(done, 1))}
    finally:
        build.figure_histories = saved


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--store", choices=("sqlite", "server"), default="sqlite")
    p.add_argument("--legacy_timeout", type=float, default=300, help="seconds the per-run reads may take (0: skip)")
    p.add_argument("--write_threads", type=int, default=4, help="threads writing the synthetic store")
    args = p.parse_args(argv)
    import warnings
    warnings.simplefilter("ignore")
    tmp = Path(tempfile.mkdtemp(prefix="rifle-report-scale-"))
    with ExitStack() as stack:
        if args.store == "sqlite":
            uri = write_uri = f"sqlite:///{tmp}/mlflow.db"
            threads = 1  # one SQLite writer
        else:
            db = stack.enter_context(postgres_database("rifle_scale"))
            write_uri, threads = db.replace("postgresql://", "postgresql+psycopg://"), args.write_threads
        start = time.perf_counter()
        points = synthetic_store(write_uri, args.runs, threads)
        print(f"store: {args.runs} runs, {points} metric points written in {time.perf_counter() - start:.0f} s "
              f"({args.store})", flush=True)
        if args.store == "server":
            uri = stack.enter_context(mlflow_server(write_uri, tmp, workers=4))
        result = {"runs": args.runs, "store": args.store, **timed_report(uri, tmp / "bulk", args.store)}
        print(f"bulk reads: report in {result['seconds']} s, {result['mlflow_requests']} requests", flush=True)
        if args.legacy_timeout > 0:
            result["legacy"] = timed_legacy(uri, tmp / "legacy", args.store, args.legacy_timeout, args.runs)
            print(f"per-run reads: {result['legacy']}", flush=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
