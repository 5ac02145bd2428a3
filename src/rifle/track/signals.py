"""Signals and run status: a run stopped by a scheduler, `kill` or Ctrl-C ends KILLED, and a worker hands its
trial back.

While a run is open (`SignalGuard`, the Tracker's) SIGTERM raises `Terminated` (a KeyboardInterrupt) and Ctrl-C
KeyboardInterrupt in the main thread, so the run ends KILLED and the command exits 143 or 130; a long-lived
worker (sweep, campaign) takes SIGTERM for its whole life (`raise_on_sigterm`). Under `mlflow run`, which
marks its run FAILED after a non-zero exit, `restore_status_after_mlflow_run` puts KILLED back.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path


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


class SignalGuard:
    """While a run is open, SIGTERM raises Terminated and Ctrl-C KeyboardInterrupt in the main thread, once: the
    first signal starts the shutdown, later ones (`mlflow run` sends SIGTERM after a Ctrl-C that also reached
    its child) wait until the run is ended (`hold`). Only signals left to their default handling are taken
    (a sweep or launcher with its own handler keeps it), and only in the main thread."""

    def __init__(self):
        self.previous: dict = {}

    def catch(self) -> None:
        if threading.current_thread() is not threading.main_thread() or self.previous:
            return
        owner = os.getpid()
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

        def on_signal(signum, frame):
            if os.getpid() != owner:  # a forked DataLoader worker: as without this handler
                signal.signal(signum, previous[signum])
                os.kill(os.getpid(), signum)
                return
            self.hold()
            raise Terminated("SIGTERM") if signum == signal.SIGTERM else KeyboardInterrupt()

        defaults = (signal.SIG_DFL, signal.default_int_handler)
        self.previous = {s: h for s, h in previous.items() if h in defaults}
        for s in self.previous:
            signal.signal(s, on_signal)

    def hold(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for s in self.previous:
                signal.signal(s, signal.SIG_IGN)

    def release(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for s, handler in self.previous.items():
                signal.signal(s, handler)
            self.previous = {}


def unmasked(error: BaseException) -> BaseException:
    """The Ctrl-C or SIGTERM that cleanup code replaced with its own error while handling it, else `error`.
    A signal raises wherever it lands: between the unlink and the return of Optuna's journal lock release, the
    lock's `except BaseException` unlinks again and its FileNotFoundError hides the interrupt, so the run would
    end FAILED, the worker exit 0 and its trial not be handed back."""
    seen, e = set(), error
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return e
        seen.add(id(e))
        e = e.__context__
    return error


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


def restore_status_after_mlflow_run(uri: str, run_id: str, status: str) -> None:
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
