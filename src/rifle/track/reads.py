"""Runs read back in bulk (rifle report, rifle compare, campaigns and their views, the notebooks): one paged
search for the runs (`fetch_runs`), then their metric histories in a few requests (`fetch_histories`).

MLflow's client reads one (run, metric) history per call: with 20-50 metrics per run that is thousands of
calls for a grid, one HTTP round trip each on a tracking server. Here, by store:

- an `mlflow server` (http(s)://): its GraphQL endpoint's `mlflowGetMetricHistoryBulkInterval` (the query
  the MLflow UI makes), each for one metric of up to 100 runs, `GRAPHQL_FIELDS` of them per request (the
  server's default limit on root fields and aliases); where GraphQL is refused, the REST bulk endpoint
  (`/ajax-api/2.0/mlflow/metrics/get-history-bulk`: one metric of up to 100 runs per request);
- a database store (sqlite, postgresql, mysql, mssql): the store's own `get_metric_history_bulk`, one query
  per metric for up to `SQL_RUNS` runs;
- any other store: `MlflowClient.get_metric_history` in a thread pool.

Both bulk paths reach MLflow's stores below its public client (`MlflowClient._tracking_client.store`, the
REST helpers); any failure there falls back to the client's own calls. Points come back in the order
`get_metric_history` gives them (timestamp, step, value), so tables and figures do not depend on the path.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .. import env
from .. import keys as K
from ..methods import method_label, method_sort_key
from . import store

RUNS_PER_REQUEST = 100  # the server's MAX_RUNS_GET_METRIC_HISTORY_BULK
GRAPHQL_FIELDS = 10     # MLFLOW_SERVER_GRAPHQL_MAX_ROOT_FIELDS and _MAX_ALIASES, default 10
SQL_RUNS = 500          # runs per IN (...) query
POINTS_PER_RUN = 2500   # the server's MAX_RESULTS_PER_RUN: more points of one metric would be sampled
REST_POINTS = 25000     # get-history-bulk's cut: more points in one answer would be lost

Point = tuple  # (run_id, key, step, value, timestamp)


def histories(client, wanted: dict[str, Iterable[str]]) -> list[Point]:
    """Every point of each metric key of `wanted` (key -> run ids) as (run_id, key, step, value, timestamp),
    per run and key in get_metric_history's order."""
    wanted = {key: sorted(set(ids)) for key, ids in wanted.items() if ids}
    backend = getattr(getattr(client, "_tracking_client", None), "store", None)
    points = None
    try:
        if hasattr(backend, "get_host_creds"):  # RestStore: an mlflow server
            points = _graphql(backend.get_host_creds(), wanted)
            if points is None:
                points = _rest_bulk(backend.get_host_creds(), wanted)
        elif hasattr(backend, "get_metric_history_bulk"):
            points = [(m.run_id, key, m.step, m.value, m.timestamp)
                      for key, ids in wanted.items() for chunk in _chunks(ids, SQL_RUNS)
                      for m in backend.get_metric_history_bulk(chunk, key, max_results=10**9)]
    except Exception:  # noqa: BLE001  (MLflow internals moved, or the server refused: the client's own calls)
        points = None
    if points is None:
        points = _threads(client, wanted)
    return sorted(points, key=lambda p: (p[0], p[1], p[4], p[2], p[3]))


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _graphql(creds, wanted: dict[str, list[str]]) -> list[Point] | None:
    """None when the server has no GraphQL endpoint (or refuses the query): the caller uses REST."""
    from mlflow.utils.rest_utils import http_request
    queries = [(key, chunk) for key, ids in wanted.items() for chunk in _chunks(ids, RUNS_PER_REQUEST)]
    points = []
    for batch in _chunks(queries, GRAPHQL_FIELDS):
        fields = " ".join(
            f"q{i}: mlflowGetMetricHistoryBulkInterval(input: {{runIds: {json.dumps(ids)}, metricKey: "
            f"{json.dumps(key)}, maxResults: {POINTS_PER_RUN}}}) {{ metrics {{ key value step timestamp runId }} "
            f"apiError {{ code message }} }}" for i, (key, ids) in enumerate(batch))
        response = http_request(creds, "/graphql", "POST", json={"query": f"query Histories {{ {fields} }}"})
        if response.status_code != 200:
            return None
        body = response.json()
        if body.get("errors") or not body.get("data"):
            return None
        for i, (key, ids) in enumerate(batch):
            result = body["data"][f"q{i}"]
            metrics = result["metrics"] or []
            counts = Counter(m["runId"] for m in metrics)
            if result.get("apiError") or max(counts.values(), default=0) >= POINTS_PER_RUN:  # else sampled
                return None
            points += [(m["runId"], m["key"], int(m["step"]), float(m["value"]), int(m["timestamp"]))
                       for m in metrics]
    return points


def _rest_bulk(creds, wanted: dict[str, list[str]]) -> list[Point]:
    return [p for key, ids in wanted.items() for chunk in _chunks(ids, RUNS_PER_REQUEST)
            for p in _rest_chunk(creds, key, chunk)]


def _rest_chunk(creds, key: str, ids: list[str]) -> list[Point]:
    from mlflow.utils.rest_utils import http_request
    response = http_request(creds, "/ajax-api/2.0/mlflow/metrics/get-history-bulk", "GET",
                            params={"run_id": ids, "metric_key": key, "max_results": REST_POINTS})
    response.raise_for_status()
    metrics = response.json().get("metrics", [])
    if len(metrics) >= REST_POINTS and len(ids) > 1:  # cut at REST_POINTS: ask for half the runs at a time
        half = len(ids) // 2
        return _rest_chunk(creds, key, ids[:half]) + _rest_chunk(creds, key, ids[half:])
    return [(m["run_id"], m["key"], int(m["step"]), float(m["value"]), int(m["timestamp"])) for m in metrics]


def _threads(client, wanted: dict[str, list[str]]) -> list[Point]:
    pairs = [(run_id, key) for key, ids in wanted.items() for run_id in ids]
    with ThreadPoolExecutor(max_workers=8) as pool:
        found = pool.map(lambda pair: client.get_metric_history(*pair), pairs)
        return [(run_id, key, m.step, m.value, m.timestamp) for (run_id, key), ms in zip(pairs, found) for m in ms]


def client(tracking_uri: str | None = None):
    """An MlflowClient on the store a reader uses (rifle.track.store: the nearest mlflow.db), never the
    process-wide tracking URI."""
    from mlflow.tracking import MlflowClient
    return MlflowClient(store.tracking_uri(tracking_uri, nearest_store=True))


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "dataset"


def dataset_label(spec: str) -> str:
    """Short row label: the folder name of imagefolder:/disk:/hub: paths, the spec otherwise."""
    for prefix in ("imagefolder:", "disk:", "hub:"):
        if spec.startswith(prefix) and os.sep in spec:
            return f"{prefix}{Path(spec[len(prefix):].rstrip(os.sep)).name}"
    return spec


def _method_of(tags: dict, params: dict) -> str:
    """The label a tool tagged, else the label of `tricks`; canonical when it names a trick list, else as
    written (a study name, a trick of another version)."""
    text = next((tags[t] for t in K.METHOD_TAGS if tags.get(t)), None) or params.get("tricks")
    try:
        return method_label(text)
    except ValueError:
        return text


def _number(text) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


# The protocols by name (rifle.plan.PROTOCOLS sets them) and the checkpoint each selects on.
SELECTION_OF = {"validated": "best_val", "authors": "last"}


def protocol_of(params: dict) -> str:
    """A run's evaluation protocol from its params val_fraction and selection: "validated" (validation carved
    from train, the best-validation checkpoint), "authors" (all of train, the last epoch), else both values as
    logged ("val_fraction 0.2, selection last"). Runs from before the `selection` param selected on validation."""
    selection = params.get("selection") or K.DEFAULT_SELECTION
    fraction = _number(params.get("val_fraction"))
    # best_val needs validation (the config refuses it with val_fraction 0), so a run without the param had some
    if selection == "best_val" and (fraction > 0 or math.isnan(fraction)):
        return "validated"
    if selection == "last" and fraction == 0:
        return "authors"
    return f"val_fraction {params.get('val_fraction') or 'not recorded'}, selection {selection}"


def selection_of(protocol: str) -> str:
    """The `selection` of a protocol as `protocol_of` names it."""
    return SELECTION_OF.get(protocol) or protocol.rsplit("selection ", 1)[-1]


def fetch_runs(tracking_uri: str | None = None, experiment: str | None = None, parent_run_id: str | None = None,
               group_by: tuple[str, ...] = ("dataset",)) -> "pd.DataFrame":
    """One row per finished run with a test_acc (of `experiment`, of every experiment, or the children of
    `parent_run_id`), read in one paged search (params, tags and final metrics come with it), the row label
    `dataset` made of the `group_by` params, its `protocol` (`protocol_of`), its backbone's `block_order` as the
    trainer logged it (None for runs from before the tag). A copy of a finished run's result
    (tag finished_earlier_in_run, the same command again) is that run's result: left out beside its original
    (`df.attrs["copies"]`), kept where the original is not read. Of other runs sharing (dataset, protocol, method,
    seed) one with its environment recorded (env.* tags) is kept before any without, the newest first; the
    others are listed in `df.attrs["duplicates"]`."""
    import pandas as pd

    mlflow_client = client(tracking_uri)
    filt = "attributes.status = 'FINISHED'"
    if parent_run_id:
        exp_ids = [mlflow_client.get_run(parent_run_id).info.experiment_id]
        filt = f"{K.parent_filter(parent_run_id)} and {filt}"
    elif experiment:
        exp = mlflow_client.get_experiment_by_name(experiment)
        if exp is None:
            names = ", ".join(e.name for e in mlflow_client.search_experiments())
            raise ValueError(f"no experiment {experiment!r} in the store (experiments: {names or 'none'})")
        exp_ids = [exp.experiment_id]
    else:  # every experiment: `mlflow run .` logs into MLflow's Default, `rifle train` into rifle
        exp_ids = store.all_experiment_ids(mlflow_client)
    rows = []
    for run in store.all_pages(mlflow_client.search_runs, experiment_ids=exp_ids, filter_string=filt):
        m, p, tags = run.data.metrics, run.data.params, run.data.tags
        if K.TEST_ACC not in m or tags.get(K.REPORT_TAG) or "seed" not in p:
            continue
        extra = [f"{k}={p.get(k)}" for k in group_by if k != "dataset"]
        rows.append({"run_id": run.info.run_id, "run_name": run.info.run_name,
                     "dataset": dataset_label(p.get("dataset", "?")) + (f" ({', '.join(extra)})" if extra else ""),
                     "protocol": protocol_of(p), "method": _method_of(tags, p), "seed": int(float(p["seed"])),
                     K.TEST_ACC: m[K.TEST_ACC],
                     **{k: m.get(k, math.nan) for k in (K.TEST_ACC_LAST, K.SELECTED_EPOCH, K.BEST_VAL_ACC,
                                                        K.BEST_EPOCH)},
                     "selection": p.get("selection") or K.DEFAULT_SELECTION,
                     **{k: None if tags.get(k) is None else tags[k].strip().lower() == "true"
                        for k in (K.BEFORE_REINIT_TAG, K.BEFORE_LAST_REINIT_TAG)},
                     K.REINIT_COUNT: _number(p.get(K.REINIT_COUNT)),
                     # runs from before the param: `epochs` is the resolved (truncated) value
                     K.EPOCHS_TRAINED: _number(p.get(K.EPOCHS_TRAINED) or p.get(K.LEGACY_EPOCHS) or p.get("epochs")),
                     K.OPTIMIZER_STEPS: _number(p.get(K.OPTIMIZER_STEPS)),
                     **{k: tags.get(k) for k in env.KEYS},
                     "model": p.get("model", ""), "start_time": run.info.start_time, "params": dict(p),
                     "metric_keys": frozenset(m), "copy_of": tags.get(K.COPY_TAG),
                     "has_env": any(tags.get(k) for k in env.COMPARED),
                     K.BLOCK_ORDER: tags[K.BLOCK_ORDER].split(",") if tags.get(K.BLOCK_ORDER) else None})
    cols = ["run_id", "run_name", "dataset", "protocol", "method", "seed", K.TEST_ACC, K.TEST_ACC_LAST,
            K.SELECTED_EPOCH, K.BEST_VAL_ACC, K.BEST_EPOCH, "selection", K.BEFORE_REINIT_TAG, K.BEFORE_LAST_REINIT_TAG,
            K.REINIT_COUNT, K.EPOCHS_TRAINED, K.OPTIMIZER_STEPS, *env.KEYS, "model", "start_time", "params",
            "metric_keys", K.BLOCK_ORDER]
    df = pd.DataFrame(rows, columns=[*cols, "copy_of", "has_env"])
    copies = df["copy_of"].isin(set(df["run_id"]))
    df, copies = df.loc[~copies], df.loc[copies, "run_id"].tolist()
    # never a run without its environment before one with it (env.describe would say "not recorded"), then newest
    df = df.sort_values(["has_env", "start_time"], ascending=False, kind="stable")[cols]
    dup = df.duplicated(["dataset", "protocol", "method", "seed"], keep="first")
    kept = df.loc[~dup].sort_values(["dataset", "protocol", "method", "seed"], key=lambda c: c.map(method_sort_key)
                                    if c.name == "method" else c, kind="stable")
    kept = kept.reset_index(drop=True)
    kept.attrs["duplicates"] = df.loc[dup, "run_id"].tolist()
    kept.attrs["copies"] = copies
    return kept


def fetch_histories(runs, keys: dict[str, list[str]], tracking_uri: str | None = None) -> "pd.DataFrame":
    """Per-epoch metrics of `runs` in long form (run_id, dataset, method, seed, key, step, value): `keys`
    (key -> run ids; rifle.evidence.figures.history_keys: what the figures draw), read in bulk (`histories`).
    Rows are ordered by run (as in `runs`), key (the report's curves first, then the probes by name), then as
    MLflow returns a history."""
    import pandas as pd

    h = pd.DataFrame(histories(client(tracking_uri), keys), columns=["run_id", "key", "step", "value", "timestamp"])
    position = {run_id: i for i, run_id in enumerate(runs["run_id"])}
    order = {k: i for i, k in enumerate((*K.HISTORY, *sorted(set(keys) - set(K.HISTORY))))}
    # stable: within a (run, key) the history's own order stays
    h = h.assign(pos=h["run_id"].map(position), rank=h["key"].map(order)).sort_values(["pos", "rank"], kind="stable")
    h = h.merge(runs[["run_id", "dataset", "method", "seed"]], on="run_id", how="left")
    return h[["run_id", "dataset", "method", "seed", "key", "step", "value"]].reset_index(drop=True)
