"""Which MLflow store and experiment: the one rule every tool follows, and MLflow's searches read whole.

Store: the one given (`--tracking_uri`), else $MLFLOW_TRACKING_URI, else `sqlite:///mlflow.db` in the working
folder; a reader (report, notebooks) asked for `nearest` takes the mlflow.db of the working folder or the
nearest one above it, so a notebook opened in notebooks/ finds the quick start's store. Experiment: the one
given (`--experiment`), else $MLFLOW_EXPERIMENT_NAME, else the tool's own default.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from .. import keys as K

DEFAULT_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "rifle"


def nearest(name: str) -> Path | None:
    """`name` in the working directory or the nearest folder above it (a notebook opened in notebooks/ finds
    the mlflow.db or optuna.journal the quick start wrote in the repository root)."""
    here = Path.cwd().resolve()
    return next((d / name for d in (here, *here.parents) if (d / name).is_file()), None)


def tracking_uri(given: str | None = None, nearest_store: bool = False) -> str:
    """The store to use (module docstring)."""
    if given or os.environ.get("MLFLOW_TRACKING_URI"):
        return given or os.environ["MLFLOW_TRACKING_URI"]
    found = nearest("mlflow.db") if nearest_store else None
    return f"sqlite:///{found}" if found else DEFAULT_URI


def experiment_name(given: str | None = None, default: str = DEFAULT_EXPERIMENT) -> str:
    """The experiment to use (module docstring)."""
    return given or os.environ.get("MLFLOW_EXPERIMENT_NAME") or default


def all_pages(search, **kwargs) -> list:
    """Every result of a paged MlflowClient search (search_runs, search_experiments), 1,000 a page."""
    from mlflow.utils import get_results_from_paginated_fn
    return get_results_from_paginated_fn(lambda n, token: search(max_results=n, page_token=token, **kwargs), 1000)


def all_experiment_ids(client) -> list[str]:
    return [e.experiment_id for e in all_pages(client.search_experiments)]


def experiment_id(client, name: str) -> str:
    """The id of experiment `name`, created if missing (another process may create it at the same moment)."""
    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(name)
        except Exception:  # lost the race: it exists now (else the error stands)
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
    return found.experiment_id


def mark_training(client, experiment_id: str) -> None:
    """Tag the experiment as model training unless it has a kind (someone chose it). Best effort."""
    try:
        if K.EXPERIMENT_KIND not in client.get_experiment(experiment_id).tags:
            client.set_experiment_tag(experiment_id, K.EXPERIMENT_KIND, K.TRAINING_KIND)
    except Exception as e:
        print(f"rifle: could not tag experiment {experiment_id} as model training: {e}", file=sys.stderr)


def check_tracking(uri: str) -> str:
    """What rifle.preflight asks of a tracking store, creating nothing: a server answers within the network
    deadline (network.Unreachable otherwise); a local store's folder is writable (OSError otherwise)."""
    from .. import network
    if uri.startswith(("http://", "https://")):
        network.check_http(uri)
        return f"{network.redact(uri)} answers within {network.timeout()} s"
    path = Path(uri.removeprefix("sqlite:///").removeprefix("file://") if "://" in uri else uri)
    folder = path.parent if uri.startswith("sqlite") else path
    folder = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    if not os.access(folder, os.W_OK):
        raise OSError(f"the tracking store {uri} cannot be written: {folder} is not writable")
    return f"{uri}: {folder} is writable"
