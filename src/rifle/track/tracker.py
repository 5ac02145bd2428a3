"""MLflow tracking, on the main process only (other processes get a tracker that does nothing).

The run: under `mlflow run` the one MLflow made (MLFLOW_RUN_ID), on resume the one in the checkpoint, else
a new one in `--experiment` (the store and experiment rule of rifle.track.store), its experiment tagged as
model training (`mlflow.experimentKind`). While a run is open, SIGTERM and Ctrl-C end it KILLED
(rifle.track.signals).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from .. import keys as K
from .. import network
from ..network import redact
from . import store
from .signals import SignalGuard, restore_status_after_mlflow_run


def entry_point() -> str:
    """The program this process runs, with its verb: `python -m rifle train` and the console script `rifle
    train` -> "rifle train"; another module or script -> its name ("pytest", "train.py")."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = spec.name.removesuffix(".__main__") if spec is not None and spec.name else \
        Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    return f"{name} {sys.argv[1]}" if name == "rifle" and len(sys.argv) > 1 else name


def param_text(value) -> str | None:
    """How an option is logged: None (unset, resolved elsewhere) is not logged, an empty string (no tricks,
    the default cache folder...) is `none`, which the options read back as the same value."""
    return None if value is None else str(value) or "none"


class TrackingLost(RuntimeError):
    """The MLflow server stopped answering during a run; the message is one line naming it. The run's
    checkpoint is on disk and the same command resumes it once the server is back."""


class Tracker:
    def __init__(self, active: bool, tracking_uri: str | None, experiment: str | None, system_metrics: bool = True):
        self.active, self.system_metrics, self._requested = active, system_metrics, experiment
        self.run_id = self.experiment_name = self.class_names = None
        self.under_mlflow_run = False
        # What this tracker logged on its run that a copy of the run's result needs (`copy_finished`): params and
        # tags as given (the run's own experiment and tracking URI aside), dataset inputs as dicts. fit keeps it in
        # finished.json; tags set only on the process's first session are set again on resume, so it is whole.
        self.record: dict = {"params": {}, "tags": {}, "inputs": []}
        self._pending: list = []  # RunOperations of metrics logged asynchronously, not yet waited for
        self._signals = SignalGuard()
        if not active:
            return
        import logging

        import mlflow
        self.mlflow = mlflow
        # Its start/stop INFO lines (three per run) and, off a terminal, its artifact progress bars (a line
        # per update) would bury the one line per epoch in logs.
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        if not sys.stderr.isatty():
            os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        self.uri = store.tracking_uri(tracking_uri)
        if self.remote:  # one request with the deadline: an unreachable server is one line at once
            network.check_http(self.uri)
        mlflow.set_tracking_uri(self.uri)
        # The experiment is passed to start_run, never made the process-wide active one (set_experiment):
        # a later run in this process (sweeps, tests, `mlflow run`'s MLFLOW_RUN_ID) must not inherit it.
        self.experiment_id = None
        if "MLFLOW_RUN_ID" not in os.environ:
            self.experiment_id = store.experiment_id(mlflow.tracking.MlflowClient(self.uri),
                                                     store.experiment_name(experiment))

    @property
    def remote(self) -> bool:
        return self.uri.startswith(("http://", "https://"))

    def lost(self, error: BaseException) -> str | None:
        """The one line saying the server went away, when `error` came from a server that no longer answers;
        None for anything else (a local store, a bad value, a server that answers)."""
        if not (self.active and self.remote) or isinstance(error, (KeyboardInterrupt, TrackingLost)):
            return None
        try:
            network.check_http(self.uri)
        except network.Unreachable as e:
            return str(e)
        return None

    def abandon(self) -> None:
        """Leave the run as it is on the server (it cannot be reached): forget it here and stop its system
        metrics thread, without a request. The next start with the same run id resumes it."""
        from mlflow.tracking import fluent
        self._pending.clear()
        while self.mlflow.active_run() is not None:
            fluent._active_run_stack.get().pop()
        # No public handle; finish() would flush to the server, so only its (daemon) thread is told to stop.
        monitor = fluent.run_id_to_system_metrics_monitor.pop(self.run_id, None)
        if monitor is not None:
            monitor._shutdown_event.set()
        self._signals.release()

    def start(self, run_id: str | None = None, run_name: str | None = None,
              forced_run_id: str | None = None) -> str | None:
        """Log into `forced_run_id` (a sweep's child run), else the `mlflow run` run, else re-open `run_id`
        (resume), else make a new run."""
        if not self.active:
            return None
        metrics = {"log_system_metrics": self.system_metrics}
        # MLflow takes MLFLOW_RUN_ID out of the environment when it starts that run: remember it.
        self.under_mlflow_run = not forced_run_id and bool(os.environ.get("MLFLOW_RUN_ID"))
        if forced_run_id:
            run = self.mlflow.start_run(run_id=forced_run_id, **metrics)
        elif self.under_mlflow_run:
            run = self.mlflow.start_run(**metrics)
            if run_id and run_id != run.info.run_id:
                self.mlflow.set_tag(K.RESUMED_FROM_RUN, run_id)
        else:
            run = self.mlflow.start_run(run_id=run_id, experiment_id=None if run_id else self.experiment_id,
                                        run_name=None if run_id else run_name, **metrics)
        self.run_id = run.info.run_id
        client = self.mlflow.tracking.MlflowClient()
        self.experiment_name = client.get_experiment(run.info.experiment_id).name
        store.mark_training(client, run.info.experiment_id)
        if self._requested and self._requested != self.experiment_name:
            why = "`mlflow run` made it there (use its --experiment-name)" if self.under_mlflow_run \
                else "a resumed run stays where it began"
            print(f"rifle: --experiment {self._requested!r} ignored: the run is in experiment "
                  f"{self.experiment_name!r}; {why}", file=sys.stderr, flush=True)
        self._signals.catch()
        return self.run_id

    def log_params(self, params: dict) -> None:
        """Resolved values (`param_text`), `experiment` and `tracking_uri` (redacted) as really used. A param set
        already to another value (`mlflow run -P epochs=7`, truncated to 6) is kept; ours goes to `<name>_resolved`."""
        if not self.active:
            return
        self.record["params"] |= {k: text for k, v in params.items() if (text := param_text(v)) is not None}
        params = dict(params) | {"experiment": self.experiment_name, "tracking_uri": redact(self.uri)}
        existing = self.mlflow.get_run(self.run_id).data.params
        texts = {key: text for key, value in params.items() if (text := param_text(value)) is not None}
        out = {key: text for key, text in texts.items() if key not in existing}
        out |= {K.resolved_param(key): text for key, text in texts.items()
                if key in existing and existing[key] != text and K.resolved_param(key) not in existing}
        if out:
            self.mlflow.log_params(out)

    def log_classes(self, names: list[str]) -> None:
        """The class names, label index order (`data/classes.json`); the logged model returns them."""
        self.class_names = [str(n) for n in names]
        if self.active:
            self.mlflow.log_dict(self.class_names, "data/classes.json")

    def log_data(self, spec: str, registry_file: str | None, data, revision: str | None, fingerprint: str) -> None:
        """Train, val and test as the run's dataset inputs (rifle.track.inputs); a resumed run's are not repeated."""
        if self.active:
            from .inputs import dataset_inputs
            pairs = dataset_inputs(spec, registry_file, data, revision, fingerprint)
            self.record["inputs"] = [{"dataset": d.to_dict(), "context": c} for d, c in pairs]
            self.mlflow.log_inputs([d for d, _ in pairs], contexts=[c for _, c in pairs],
                                   tags_list=[None] * len(pairs))

    def set_tags(self, tags: dict) -> None:
        tags = {k: v for k, v in tags.items() if v is not None}
        if self.active and tags:
            self.mlflow.set_tags(tags)
            self.record["tags"] |= {k: str(v) for k, v in tags.items()}

    def set_source(self, commit: str | None) -> None:
        """mlflow.source.* on every run, so the UI's Source column shows them (MLflow sets them only on runs
        start_run makes: not on a sweep's or campaign's child runs, nor to this package's commit): LOCAL, the
        entry point and `commit`. What `mlflow run` set (PROJECT: the project and its commit) is kept."""
        if not self.active or self.mlflow.get_run(self.run_id).data.tags.get(K.SOURCE_TYPE) == "PROJECT":
            return
        self.set_tags({K.SOURCE_TYPE: "LOCAL", K.SOURCE_NAME: entry_point(), K.SOURCE_COMMIT: commit})

    def log_metrics(self, metrics: dict, step: int | None = None, synchronous: bool = True) -> None:
        """`synchronous=False` (the per-epoch metrics): queued and sent by MLflow's logging thread, so training
        does not wait for the store (a round trip per epoch on a server); `flush` waits for them."""
        if self.active:
            ops = self.mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step,
                                          synchronous=synchronous)
            if not synchronous:
                self._pending.append(ops)

    def flush(self) -> None:
        """Wait until every queued metric is stored (each batch's own RunOperations: mlflow.flush_async_logging
        restarts the logging thread, which costs up to a second). The trainer flushes before each checkpoint,
        so only the newest checkpointed epoch can be unlogged when the process dies, and `sync_history` logs
        it once."""
        while self._pending:
            self._pending.pop(0).wait()

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
        # train_loss: every epoch logs it (val_acc is absent without validation, val_fraction=0)
        logged = {m.step for m in self.mlflow.tracking.MlflowClient().get_metric_history(self.run_id, K.TRAIN_LOSS)}
        for row in history:
            if row["epoch"] not in logged:
                self.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])

    def copy_finished(self, original: str, finished: dict, params: dict) -> None:
        """Make this run a complete copy of the finished run `original` from its finished.json (`finished`): the
        params, tags (env.*, git, dataset, tricks, selected_before_*, mlflow.source.* unless `mlflow run` set its
        own) and dataset inputs the trainer logged on it, every epoch's metrics and the final ones, and the tag
        COPY_TAG naming it. A finished.json from before the record: `params` (the options') and no other tags (the
        report still counts the copy as the original). No system metrics: nothing trained here. Nothing is logged
        twice."""
        if not self.active:
            return
        from mlflow.entities import Dataset, DatasetInput, InputTag
        record = finished.get("logged") or {"params": params, "tags": {}, "inputs": []}
        self.log_params(record["params"])
        tags = record["tags"]
        if self.mlflow.get_run(self.run_id).data.tags.get(K.SOURCE_TYPE) == "PROJECT":  # `mlflow run`'s own stays
            tags = {k: v for k, v in tags.items() if not k.startswith(K.SOURCE_PREFIX)}
        self.set_tags(tags | {K.COPY_TAG: original})
        if record["inputs"]:
            self.mlflow.tracking.MlflowClient().log_inputs(self.run_id, [
                DatasetInput(Dataset(**{k: i["dataset"].get(k) for k in ("name", "digest", "source_type", "source",
                                                                         "schema", "profile")}),
                             [InputTag(K.INPUT_CONTEXT, i["context"])]) for i in record["inputs"]])
        self.sync_history(finished["history"])
        self.log_final({k: v for k, v in finished["result"].items() if k not in ("run_id", "epochs")})

    def log_artifact_text(self, text: str, name: str) -> None:
        if self.active:
            self.mlflow.log_text(text, name)

    def log_file(self, path: str | Path, folder: str | None = None) -> None:
        if self.active:
            self.mlflow.log_artifact(str(path), artifact_path=folder)

    def log_figure(self, fig, name: str) -> None:
        if self.active:
            self.mlflow.log_figure(fig, name, save_kwargs={"dpi": 110, "bbox_inches": "tight"})

    def end(self, status: str = "FINISHED") -> None:
        try:
            self._signals.hold()  # closing the run is not interrupted (e.g. by the SIGTERM `mlflow run` sends)
            if self.active and self.mlflow.active_run() is not None:
                self.flush()
                self.mlflow.end_run(status=status)
                if status == "KILLED" and self.under_mlflow_run:
                    restore_status_after_mlflow_run(self.uri, self.run_id, status)
        finally:
            self._signals.release()
