"""Metric histories of many runs in a few requests (rifle.report and the notebooks).

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
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

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
    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    points = None
    try:
        if hasattr(store, "get_host_creds"):  # RestStore: an mlflow server
            points = _graphql(store.get_host_creds(), wanted)
            if points is None:
                points = _rest_bulk(store.get_host_creds(), wanted)
        elif hasattr(store, "get_metric_history_bulk"):
            points = [(m.run_id, key, m.step, m.value, m.timestamp)
                      for key, ids in wanted.items() for chunk in _chunks(ids, SQL_RUNS)
                      for m in store.get_metric_history_bulk(chunk, key, max_results=10**9)]
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
