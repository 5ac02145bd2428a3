"""MLflow tracking, on the main process only (other processes get a tracker that does nothing).

Under `mlflow run` the run MLflow created (MLFLOW_RUN_ID) is used; standalone a run is made in
`--experiment`, or the run recorded in the checkpoint is re-opened when a run resumes. Default store:
$MLFLOW_TRACKING_URI, else `sqlite:///mlflow.db` in the working directory.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

DEFAULT_URI = "sqlite:///mlflow.db"


def redact(url: str | None) -> str | None:
    """The URL with any password replaced by ***, for logs and params."""
    if not url or "://" not in url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


class Tracker:
    def __init__(self, active: bool, tracking_uri: str | None, experiment: str):
        self.active = active
        self.run_id: str | None = None
        if not active:
            return
        import mlflow
        self.mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI)
        # Not MLFLOW_EXPERIMENT_ID: set_experiment itself exports it, so a second run in this process
        # (sweeps, tests) would otherwise reuse an experiment id from another store.
        if "MLFLOW_RUN_ID" not in os.environ:
            mlflow.set_experiment(experiment)

    def start(self, run_id: str | None = None, run_name: str | None = None, forced_run_id: str | None = None) -> str | None:
        """Log into `forced_run_id` (a sweep's child run), else the `mlflow run` run, else re-open `run_id`
        (resume), else make a new run."""
        if not self.active:
            return None
        if forced_run_id:
            run = self.mlflow.start_run(run_id=forced_run_id)
        elif os.environ.get("MLFLOW_RUN_ID"):
            run = self.mlflow.start_run()
            if run_id and run_id != run.info.run_id:
                self.mlflow.set_tag("resumed_from_run", run_id)
        else:
            run = self.mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name)
        self.run_id = run.info.run_id
        return self.run_id

    def log_params(self, params: dict) -> None:
        """Log params; one already set to another value (e.g. by `mlflow run -P epochs=7` before RIFLE
        truncated it to 6) is kept and the resolved value goes to `<name>_resolved`."""
        if not self.active:
            return
        existing = self.mlflow.get_run(self.run_id).data.params
        out = {}
        for key, value in params.items():
            text = "" if value is None else str(value)
            if key not in existing:
                out[key] = text
            elif existing[key] != text and f"{key}_resolved" not in existing:
                out[f"{key}_resolved"] = text
        if out:
            self.mlflow.log_params(out)

    def set_tags(self, tags: dict) -> None:
        if self.active:
            self.mlflow.set_tags({k: v for k, v in tags.items() if v is not None})

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        if self.active:
            self.mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_final(self, metrics: dict) -> None:
        """Final metrics, once: a re-run of a finished output_dir does not log them twice."""
        if self.active:
            have = self.mlflow.get_run(self.run_id).data.metrics
            self.log_metrics({k: v for k, v in metrics.items() if k not in have})

    def sync_history(self, history: list[dict]) -> None:
        """After a resume: log every checkpointed epoch the run does not have yet (a kill can fall between
        the checkpoint and the metric logging), never one twice."""
        if not self.active or not history:
            return
        client = self.mlflow.tracking.MlflowClient()
        logged = {m.step for m in client.get_metric_history(self.run_id, "val_acc")}
        for row in history:
            if row["epoch"] not in logged:
                self.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])

    def log_artifact_text(self, text: str, name: str) -> None:
        if self.active:
            self.mlflow.log_text(text, name)

    def log_file(self, path: str | Path, folder: str | None = None) -> None:
        if self.active:
            self.mlflow.log_artifact(str(path), artifact_path=folder)

    def log_figure(self, fig, name: str) -> None:
        if self.active:
            with tempfile.TemporaryDirectory() as tmp:
                fig.savefig(Path(tmp) / name, dpi=110, bbox_inches="tight")
                self.mlflow.log_artifact(str(Path(tmp) / name))

    def end(self, status: str = "FINISHED") -> None:
        if self.active and self.mlflow.active_run() is not None:
            self.mlflow.end_run(status=status)
