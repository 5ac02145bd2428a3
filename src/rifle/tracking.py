"""MLflow tracking, on the main process only (other processes get a tracker that does nothing).

The run: under `mlflow run` the one MLflow made (MLFLOW_RUN_ID), on resume the one in the checkpoint, else
a new one in `--experiment` (else $MLFLOW_EXPERIMENT_NAME, else `rifle`), tagged as model training
(`mlflow.experimentKind`). Store: $MLFLOW_TRACKING_URI, else `sqlite:///mlflow.db` in the working directory.
While a run is open SIGTERM raises `Terminated` (a KeyboardInterrupt) in the main thread, so a run stopped by
a scheduler, `kill` or `mlflow run`'s Ctrl-C ends as KILLED, like Ctrl-C.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

DEFAULT_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "rifle"
# The tag MLflow 3's UI reads and writes for an experiment's kind ("Machine learning" vs "GenAI apps &
# agents"); custom_model_development is its value for model training.
KIND_TAG, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread while a run is open: handled as Ctrl-C is (run KILLED)."""


@contextlib.contextmanager
def raise_on_sigterm():
    """For a long-lived worker (sweep, campaign): SIGTERM raises `Terminated` in the main thread wherever it
    arrives, so the trial in hand is handed back at once and the process exits 143, as a standalone run does.
    The trainer's own handler then stays out of the way (it only replaces default handlers)."""
    def on_sigterm(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the shutdown that follows is not interrupted
        raise Terminated("SIGTERM")

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def redact(url: str | None) -> str | None:
    """The URL with any password replaced by ***, for logs and params."""
    parts = urlsplit(url or "")
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)))


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def mark_training(client, experiment_id: str) -> None:
    """Tag the experiment as model training unless it has a kind (someone chose it). Best effort."""
    try:
        if KIND_TAG not in client.get_experiment(experiment_id).tags:
            client.set_experiment_tag(experiment_id, KIND_TAG, TRAINING_KIND)
    except Exception as e:
        print(f"rifle: could not tag experiment {experiment_id} as model training: {e}", file=sys.stderr)


def param_text(value) -> str | None:
    """How an option is logged: None (unset, resolved elsewhere) is not logged, an empty string (no tricks,
    the default cache folder...) is `none`, which the options read back as the same value."""
    return None if value is None else str(value) or "none"


def _all_pages(search, **kwargs) -> list:
    """Every result of a paged MlflowClient search."""
    from mlflow.utils import get_results_from_paginated_fn
    return get_results_from_paginated_fn(lambda n, token: search(max_results=n, page_token=token, **kwargs), 1000)


def all_experiment_ids(client) -> list[str]:
    return [e.experiment_id for e in _all_pages(client.search_experiments)]


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


class Tracker:
    def __init__(self, active: bool, tracking_uri: str | None, experiment: str | None, system_metrics: bool = True):
        self.active, self.system_metrics, self._requested = active, system_metrics, experiment
        self.run_id = self.experiment_name = self.class_names = None
        self.under_mlflow_run = False
        self._pending: list = []  # RunOperations of metrics logged asynchronously, not yet waited for
        self._previous_signals: dict = {}
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
        self.uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
        mlflow.set_tracking_uri(self.uri)
        # The experiment is passed to start_run, never made the process-wide active one (set_experiment):
        # a later run in this process (sweeps, tests, `mlflow run`'s MLFLOW_RUN_ID) must not inherit it.
        self.experiment_id = None
        if "MLFLOW_RUN_ID" not in os.environ:
            name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
            self.experiment_id = experiment_id(mlflow.tracking.MlflowClient(self.uri), name)

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
                self.mlflow.set_tag("resumed_from_run", run_id)
        else:
            run = self.mlflow.start_run(run_id=run_id, experiment_id=None if run_id else self.experiment_id,
                                        run_name=None if run_id else run_name, **metrics)
        self.run_id = run.info.run_id
        client = self.mlflow.tracking.MlflowClient()
        self.experiment_name = client.get_experiment(run.info.experiment_id).name
        mark_training(client, run.info.experiment_id)
        if self._requested and self._requested != self.experiment_name:
            why = "`mlflow run` made it there (use its --experiment-name)" if self.under_mlflow_run \
                else "a resumed run stays where it began"
            print(f"rifle: --experiment {self._requested!r} ignored: the run is in experiment "
                  f"{self.experiment_name!r}; {why}", file=sys.stderr, flush=True)
        self._catch_signals()
        return self.run_id

    def log_params(self, params: dict) -> None:
        """Resolved values (`param_text`), `experiment` and `tracking_uri` (redacted) as really used. A param set
        already to another value (`mlflow run -P epochs=7`, truncated to 6) is kept; ours goes to `<name>_resolved`."""
        if not self.active:
            return
        params = dict(params) | {"experiment": self.experiment_name, "tracking_uri": redact(self.uri)}
        existing = self.mlflow.get_run(self.run_id).data.params
        texts = {key: text for key, value in params.items() if (text := param_text(value)) is not None}
        out = {key: text for key, text in texts.items() if key not in existing}
        out |= {f"{key}_resolved": text for key, text in texts.items()
                if key in existing and existing[key] != text and f"{key}_resolved" not in existing}
        if out:
            self.mlflow.log_params(out)

    def log_classes(self, names: list[str]) -> None:
        """The class names, label index order (`data/classes.json`); the logged model returns them."""
        self.class_names = [str(n) for n in names]
        if self.active:
            self.mlflow.log_dict(self.class_names, "data/classes.json")

    def set_tags(self, tags: dict) -> None:
        if self.active:
            self.mlflow.set_tags({k: v for k, v in tags.items() if v is not None})

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
        logged = {m.step for m in self.mlflow.tracking.MlflowClient().get_metric_history(self.run_id, "train_loss")}
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
            self.mlflow.log_figure(fig, name, save_kwargs={"dpi": 110, "bbox_inches": "tight"})

    def end(self, status: str = "FINISHED") -> None:
        try:
            self._hold_signals()  # closing the run is not interrupted (e.g. by the SIGTERM `mlflow run` sends)
            if self.active and self.mlflow.active_run() is not None:
                self.flush()
                self.mlflow.end_run(status=status)
                if status == "KILLED" and self.under_mlflow_run:
                    _restore_status_after_mlflow_run(self.uri, self.run_id, status)
        finally:
            self._release_signals()

    # While a run is open, SIGTERM raises Terminated and Ctrl-C KeyboardInterrupt in the main thread, once:
    # the first signal starts the shutdown, later ones (`mlflow run` sends SIGTERM after a Ctrl-C that also
    # reached its child) wait until the run is ended. Only signals left to their default handling are
    # taken (a sweep or launcher with its own handler keeps it), and only in the main thread.
    def _catch_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread() or self._previous_signals:
            return
        owner = os.getpid()
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

        def on_signal(signum, frame):
            if os.getpid() != owner:  # a forked DataLoader worker: as without this handler
                signal.signal(signum, previous[signum])
                os.kill(os.getpid(), signum)
                return
            self._hold_signals()
            raise Terminated("SIGTERM") if signum == signal.SIGTERM else KeyboardInterrupt()

        defaults = (signal.SIG_DFL, signal.default_int_handler)
        self._previous_signals = {s: h for s, h in previous.items() if h in defaults}
        for s in self._previous_signals:
            signal.signal(s, on_signal)

    def _hold_signals(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for s in self._previous_signals:
                signal.signal(s, signal.SIG_IGN)

    def _release_signals(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for s, handler in self._previous_signals.items():
                signal.signal(s, handler)
            self._previous_signals = {}


_WATCH = """
import sys, psutil
try:
    psutil.Process(int(sys.argv[1])).wait(timeout=600)
except Exception:
    pass
from mlflow.tracking import MlflowClient
client = MlflowClient()
if client.get_run(sys.argv[2]).info.status == "FAILED":
    client.set_terminated(sys.argv[2], sys.argv[3])
"""


def _restore_status_after_mlflow_run(uri: str, run_id: str, status: str) -> None:
    """`mlflow run` marks its run FAILED after its entry point exits non-zero even when the entry point ended
    the run itself (MLflow 3.17's check compares the status name with status numbers): a detached process
    waits for `mlflow run` to exit, then puts `status` (KILLED) back."""
    try:
        import psutil
        launcher = next((p for p in psutil.Process().parents()
                         if "run" in p.cmdline() and any(Path(a).name == "mlflow" for a in p.cmdline()[:2])), None)
        if launcher is None:
            return
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_RUN")} | {"MLFLOW_TRACKING_URI": uri}
        subprocess.Popen([sys.executable, "-c", _WATCH, str(launcher.pid), run_id, status], env=env,
                         start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    except Exception:  # best effort: the run is KILLED until `mlflow run` overwrites it
        return


def find_runs(client, tags: dict[str, str]) -> list:
    """Active runs of any experiment carrying all `tags`, oldest first (the one every worker agrees on)."""
    where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = _all_pages(client.search_runs, experiment_ids=all_experiment_ids(client), filter_string=where)
    return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))


def claim_parent(client, identity: dict[str, str], role_key: str, experiment: str, run_name: str,
                 tags: dict[str, str], adopt: bool = True) -> str:
    """The one parent run for `identity` tags (a sweep's study, a comparison). Under `mlflow run` (with
    `adopt`) that run claims the role, else a run is created; when another worker's run got there first (the
    oldest wins), the created run is closed and deleted, or the `mlflow run` run becomes a worker run
    pointing to the parent."""
    query = identity | {role_key: "parent"}
    own = os.environ.get("MLFLOW_RUN_ID") if adopt else None
    found = find_runs(client, query)
    if not found:
        if own:
            for k, v in (query | tags | {"mlflow.runName": run_name}).items():
                client.set_tag(own, k, v)
            mine = own
        else:
            mine = client.create_run(experiment_id(client, experiment), run_name=run_name,
                                     tags=query | tags).info.run_id
        found = find_runs(client, query)
        if found[0].info.run_id != mine and not own:
            client.set_terminated(mine, "KILLED")  # no RUNNING run left behind, even deleted
            client.delete_run(mine)
    winner = found[0].info.run_id
    if own and own != winner:
        client.set_tag(own, role_key, "worker")
        client.set_tag(own, f"{role_key.rsplit('.', 1)[0]}.parent_run_id", winner)
    return winner
