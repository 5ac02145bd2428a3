"""One worker on a shared Optuna study: `study.optimize` over an objective that trains one trial with `fit`.

The worker is the same for a sweep and a campaign; what differs is handed to it as a policy: the sampler and
pruner, which trial may be trained (`claim`), when work is left, a trial's options and output directory, and
the trial's value (`SweepPolicy` here: a search space, an exact study-wide `n_trials`; `cells.CellPolicy`: the
cells Optuna's queue holds). Optuna's heartbeat, stale-trial retries (rifle.workers.storage), samplers,
pruners and plots are used as is. What it lacks lives here: the pruning rule fair to RIFLE (`TrialReporter`);
the exact `n_trials` (`Budget`: one slot per retry chain, a lost race for the last slot gives its trial back
untrained, a worker waits while another's trial may still need a retry); a retry resumes in its chain's
output directory and MLflow run; a trial taken over by another worker stops at its next report without
touching either (`TrialLost`); multi-process trials, where the main process broadcasts each trial's options
and every pruning decision so all processes train the same trial and stop at the same epoch.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

from .. import config as C
from .. import keys as K
from ..callbacks import Callback
from ..launch import distributed_state  # noqa: F401  (one rule with the trainer; sweep.py and cells.py import it here)
from ..network import redact
from ..seeds import sampler_seed
from .outcomes import Outcome, Status
from .runs import SweepRuns, origin
from .storage import MEMORY, STUDY_ATTR, first_difference, open_study, scrub

OVER_BUDGET_ATTR = "rifle:over_budget"  # a trial given back untrained (a user attr; older studies: a system attr)


@dataclass
class WorkerOptions:
    """What a sweep's and a campaign's workers share (their commands fill it)."""
    tool: str                 # the prefix of its lines, e.g. "rifle sweep"
    study_name: str
    storage: str              # as given (env:VAR stays: the URL is `url`)
    output_root: str
    tracking_uri: str
    experiment: str
    heartbeat_interval: int = 30
    grace_period: int = 120
    max_retry: int = 3


class TrialLost(RuntimeError):
    """Another worker declared this trial stale and retries it in the same directory and MLflow run."""


class GiveBack(RuntimeError):
    """The trial must not be trained here (another worker took the study's last slot, it is none of the queue's
    cells): it ends FAIL, marked, and counts for nothing."""


class Skip(RuntimeError):
    """The trial is not trained and ends FAIL with this reason, counted (a campaign cell whose group failed)."""


class TrialReporter(Callback):
    """The trainer callback that reports a trial to Optuna and prunes it, fairly to RIFLE.

    Reported value: the best validation accuracy so far (monotone, so the dip after a head re-initialization
    never shows). The pruner is consulted only where trials are comparable: before the trial's first
    re-initialization (until then RIFLE trains exactly as plain fine-tuning) and at epochs that end with one
    (their validation pass precedes the reset), never while a new head catches up, never at the last epoch.
    Only the main process (`trial` not None) talks to the study; the decision is broadcast to the others.
    `key`: the metric reported (a campaign cell without validation reports train_acc; it is never pruned).
    A report the storage refuses means another worker retried the trial: `TrialLost`."""

    def __init__(self, trial, epochs: int, history: list[dict], pruner_name: str, num_processes: int = 1,
                 process_index: int = 0, key: str = K.VAL_ACC):
        self.trial, self.epochs, self.pruner_name, self.key = trial, epochs, pruner_name, key
        self.num_processes, self.process_index = num_processes, process_index
        self.best, self.reinits = -math.inf, 0
        if trial is not None:
            reported = set(frozen(trial.study, trial).intermediate_values)
            for row in history:  # epochs the checkpoint holds (a kill can fall before their report)
                self.best = max(self.best, row[key])
                self.reinits += int(row.get(K.HEAD_REINIT, 0) == 1)
                if row["epoch"] not in reported:
                    trial.report(self.best, row["epoch"])

    def eligible(self, epoch: int, reinit_now: bool) -> bool:
        return epoch < self.epochs - 1 and (self.reinits == 0 or reinit_now)

    def decide(self, epoch: int, metrics: dict) -> str | None:
        self.best = max(self.best, float(metrics[self.key]))
        self.trial.report(self.best, epoch)
        reinit_now = metrics.get(K.HEAD_REINIT, 0) == 1
        check = self.eligible(epoch, reinit_now)
        self.reinits += int(reinit_now)
        if not (check and self.trial.should_prune()):
            return None
        others = [t.intermediate_values[epoch] for t in self.trial.study.get_trials(deepcopy=False)
                  if t.number != self.trial.number and epoch in t.intermediate_values]
        context = f"; other trials at that epoch: median {statistics.median(others):.4f} of {len(others)}" \
            if others else ""
        return (f"pruned at epoch {epoch} by the {self.pruner_name} pruner: best {self.key} so far {self.best:.4f}"
                f"{context}")

    def on_epoch_end(self, epoch: int, metrics: dict) -> None:
        decision = None
        if self.trial is not None:
            try:
                reason = self.decide(epoch, metrics)
                decision = ("pruned", reason) if reason else None
            except optuna.exceptions.UpdateFinishedTrialError:  # the storage refuses a finished trial's report
                decision = ("lost", f"trial {self.trial.number} was retried by another worker (no heartbeat "
                                    "within the grace period)")
        if self.num_processes > 1:
            from accelerate.utils import broadcast_object_list
            decision = broadcast_object_list([decision], from_process=0)[0]
        if decision:
            kind, reason = decision
            print(f"rifle: [process {self.process_index}] {reason}", flush=True)
            raise optuna.TrialPruned(reason) if kind == "pruned" else TrialLost(reason)


def frozen(study, trial):
    """The FrozenTrial of a running `trial` (its reported values, attributes and retry chain)."""
    return next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)


def given_back(trial) -> bool:
    return bool(trial.user_attrs.get(OVER_BUDGET_ATTR) or trial.system_attrs.get(OVER_BUDGET_ATTR))


def budget_slots(trials, below: int | None = None) -> set[int]:
    """Budget slots used: one per retry chain, trials given back over budget excluded; with `below`, only
    chains that started before trial number `below`."""
    return {origin(t) for t in trials if not given_back(t) and (below is None or origin(t) < below)}


def over_budget(trials, number: int, n_trials: int) -> bool:
    """Whether trial `number`'s retry chain came after the budget was used up: when two workers race for the
    last slot, the trial numbers (assigned atomically by the storage) decide who keeps it. A retry of a chain
    that holds a slot is never over budget."""
    chain = origin(next(t for t in trials if t.number == number))
    return len(budget_slots(trials, below=chain)) >= n_trials


class Budget:
    """Exactly `n_trials` per study, across workers and restarts (Optuna's n_trials counts per call)."""

    def __init__(self, n_trials: int, poll: float):
        self.n_trials, self.poll = n_trials, poll

    def work_left(self, study) -> bool:
        """True when a slot or a retry is free; waits while only other workers' trials run (one may go stale
        and need a retry); False when the study is done."""
        while True:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
            trials = study.get_trials(deepcopy=False)
            if any(t.state == TrialState.WAITING for t in trials) or len(budget_slots(trials)) < self.n_trials:
                return True
            if not any(t.state == TrialState.RUNNING for t in trials):
                return False
            time.sleep(self.poll)

    def check(self, study, trial) -> None:
        if over_budget(study.get_trials(deepcopy=False), trial.number, self.n_trials):
            raise GiveBack(f"trial {trial.number} given back untrained: another worker took the last trial")


class TrialSeededTPE(optuna.samplers.TPESampler):
    """TPE seeded from (seed, trial number) at every trial: parallel workers never draw the same random
    start-up point, and a one-worker study is reproducible."""

    def __init__(self, seed: int):
        super().__init__(seed=seed)
        self.base_seed = seed

    def before_trial(self, study, trial) -> None:
        # Made afresh with the trial's seed: TPE keeps no state between trials but its random streams.
        super().__init__(seed=sampler_seed(self.base_seed, trial.number))
        super().before_trial(study, trial)


def make_pruner(kind: str, startup_trials: int, warmup_epochs: int, epochs: int):
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_epochs)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, warmup_epochs), max_resource=max(epochs, 2))
    return optuna.pruners.NopPruner()


def resume_point(output_dir: Path) -> tuple[int, list[dict]]:
    """(next epoch, history) of the newest checkpoint in output_dir, or (0, [])."""
    from ..checkpoint import latest
    last = latest(output_dir)
    if last is None:
        return 0, []
    state = json.loads((last / "state.json").read_text())
    return int(state["epoch"]), list(state["history"])


def _fmt(params: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


class SweepPolicy:
    """A sweep: trials sampled from a search space (TPE or grid), pruned fairly to RIFLE, exactly `n_trials` in
    the study across workers and restarts (`Budget`), each in <root>/<study>-<id>/trial-<n>; the value is the
    trial's best validation accuracy, never test."""
    value_name = K.BEST_VAL_ACC

    def __init__(self, space, sampler: str = "tpe", pruner: str = "median", seed: int = 0, n_trials: int = 20,
                 pruner_startup_trials: int = 5, pruner_warmup_epochs: int = 2, space_file: str = ""):
        self.space, self.sampler_kind, self.pruner_name, self.seed = space, sampler, pruner, seed
        self.startup, self.warmup, self.space_file = pruner_startup_trials, pruner_warmup_epochs, space_file
        self.n_trials = n_trials
        if sampler == "grid" and (points := math.prod(len(v) for v in space.grid().values())) < n_trials:
            print(f"rifle sweep: the grid has {points} points: n_trials {n_trials} -> {points}", flush=True)
            self.n_trials = points

    def signature(self) -> dict:
        return self.space.signature()

    def study_attrs(self) -> dict:
        return {"method": self.space.method, "space_file": self.space.path}

    def created(self, study) -> None:
        pass

    def mismatch(self, info: dict) -> str | None:
        mine, theirs = self.signature(), info["space"]
        return None if mine == theirs else (f"created with another search space: {first_difference(theirs, mine)}; "
                                            "use another --study_name or the same space and options")

    def sampler(self):
        # The grid sampler gives each trial a grid point not yet taken, and stops the study when all are done.
        return optuna.samplers.GridSampler(self.space.grid(), seed=self.seed) if self.sampler_kind == "grid" \
            else TrialSeededTPE(self.seed)

    def pruner(self):
        epochs = C.build(self.space.fixed | {"output_dir": "unused"}).optim.epochs
        return make_pruner(self.pruner_name, self.startup, self.warmup, epochs)

    def start(self, worker) -> None:
        o, space = worker.o, self.space
        self.budget = Budget(self.n_trials, poll=max(1.0, min(float(o.heartbeat_interval), 10.0)))
        uuid = worker.study.user_attrs[STUDY_ATTR]["uuid"]
        self.out_root = Path(o.output_root).resolve() / f"{o.study_name}-{uuid[:8]}"
        params = {"space": self.space_file, "method": space.method, "study_name": o.study_name,
                  "storage": worker.shown, "sampler": self.sampler_kind, "pruner": self.pruner_name, "seed": self.seed,
                  "searched": ",".join(space.params) or "none",
                  **{K.fixed_param(k): v for k, v in space.fixed.items() if k not in C.RUN_ONLY}}
        self.runs = SweepRuns(o.tracking_uri, o.experiment, worker.study, worker.shown, params, self.n_trials)
        print(f"{o.tool}: study {o.study_name!r} in {worker.shown}, {self.n_trials} trials in total, MLflow parent "
              f"run {self.runs.parent} ({redact(o.tracking_uri)})", flush=True)

    def work_left(self, study) -> bool:
        return self.budget.work_left(study)

    def claim(self, study, trial) -> None:
        self.budget.check(study, trial)

    def options(self, trial, chain: int) -> tuple[dict, Path]:
        """(trainer options, output directory) of a trial; a retry trains (resumes) in its chain's directory."""
        return {"log_weights": False} | self.space.suggest(trial), self.out_root / f"trial-{chain}"

    def describe(self, trial, chain: int) -> str:
        return f"trial {trial.number} ({_fmt(trial.params)})"

    def value(self, trial, result: dict) -> float:
        return result[K.BEST_VAL_ACC]

    def failed(self, trial, error: Exception, reason: str) -> None:
        pass  # a sweep's failed trial is its own; the study goes on

    def done(self, study, trials) -> bool:
        return len(budget_slots(trials)) >= self.n_trials and not any(
            t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials)

    def summary(self, worker, trials) -> Status:
        finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        line = f"{worker.o.tool}: study {worker.o.study_name!r}: {len(finished)} trials finished"
        if any(t.state == TrialState.COMPLETE for t in trials):
            best = worker.study.best_trial
            line += f"; best trial {best.number}: val_acc {best.value:.4f} ({_fmt(best.params)})"
        print(line + f"; MLflow parent run {self.runs.parent}", flush=True)
        return Status.COMPLETE


class Worker:
    """The main process's side of a study: opens it, then trains trials as its policy says until none is left.
    `run(state)` returns the policy's Status."""

    def __init__(self, o: WorkerOptions, policy, url: str, storage):
        self.o, self.policy, self.url, self.storage = o, policy, url, storage
        self.shown = redact(url) if "://" in url else url if url == MEMORY else str(Path(url).resolve())
        if os.environ.get("MLFLOW_RUN_ID") and not o.storage.startswith("env:") and redact(url) != url:
            print(f"{o.tool}: warning: `mlflow run` records its -P parameters, so the run's 'storage' param holds the "
                  "password; pass -P storage=env:VAR (the URL in an environment variable) instead",
                  file=sys.stderr, flush=True)
        self.study = open_study(storage, o.study_name, policy, policy.sampler(), policy.pruner(), self.shown)
        policy.start(self)
        self.runs = policy.runs
        self.storage.get_heartbeat_stale_trial_callback().on_retry = self.runs.on_retry
        self.lost, self.tracking_lost = False, ""

    def objective(self, trial) -> float:
        from ..track.tracker import TrackingLost
        from ..trainer import fit
        chain = origin(frozen(self.study, trial))
        retry = self.storage.get_heartbeat_stale_trial_callback()
        try:
            self.policy.claim(self.study, trial)
            values, out = self.policy.options(trial, chain)
        except GiveBack as e:
            trial.set_user_attr(OVER_BUDGET_ATTR, str(e))
            raise
        except Skip as e:
            print(f"{self.o.tool}: {e}", flush=True)
            raise
        except Exception:  # the storage failed before the trial knew its options: retried as the same trial
            retry(self.study, frozen(self.study, trial))
            raise
        values |= {"output_dir": str(out), "tracking_uri": self.o.tracking_uri,
                   "experiment": self.runs.experiment_name, "run_name": None}
        run_id = self.runs.child(trial, chain)
        start, history = resume_point(out)
        trial.set_user_attr("output_dir", str(out))
        trial.set_user_attr("mlflow_run_id", run_id)
        what = self.policy.describe(trial, chain)
        if start:
            trial.set_user_attr("resumed_from_epoch", start)
            self.runs.client.set_tag(run_id, self.runs.tags.resumed_from_epoch, str(start))
        print(f"{self.o.tool}: {what}" + (f", a retry of trial {chain} resuming at epoch {start}" if start else ""),
              flush=True)
        finished = self.runs.finished(run_id)
        if finished is not None:  # trained earlier (e.g. without a shared storage): read back
            print(f"{self.o.tool}: {what}: finished earlier in run {run_id}", flush=True)
            self.runs.trial_done(run_id, Outcome.COMPLETE)
            return finished
        broadcast(values, self.state)
        outcome, reason = Outcome.FAILED, None
        try:
            cfg = C.build(values)
            key = K.VAL_ACC if cfg.data.val_fraction > 0 else K.TRAIN_ACC  # without validation: train_acc
            reporter = TrialReporter(trial, cfg.optim.epochs, history, self.policy.pruner_name,
                                     self.state.num_processes, key=key)
            value = self.policy.value(trial, fit(cfg, callbacks=[reporter], mlflow_run_id=run_id))
            outcome = Outcome.COMPLETE
            print(f"{self.o.tool}: trial {trial.number} complete: {self.policy.value_name} {value:.4f}", flush=True)
            return value
        except optuna.TrialPruned as e:
            outcome, reason = Outcome.PRUNED, str(e)
            print(f"{self.o.tool}: trial {trial.number} pruned: {reason}", flush=True)
            raise
        except TrialLost as e:
            outcome, self.lost = Outcome.LOST, True
            print(f"{self.o.tool}: {e}; moving on", flush=True)
            raise
        except (KeyboardInterrupt, TrackingLost) as e:  # Ctrl-C, SIGTERM (signals.Terminated), a lost server
            # Retried at once by the next worker, from the last checkpoint (this trial is told FAIL).
            outcome, reason = Outcome.INTERRUPTED, "the worker stopped; the next worker resumes the trial"
            retry(self.study, frozen(self.study, trial))
            if isinstance(e, TrackingLost):  # every trial would need the server: the worker stops (exit 75)
                outcome, self.tracking_lost = Outcome.LOST, str(e)  # nothing to tell MLflow
                raise KeyboardInterrupt(str(e)) from None
            raise
        except Exception as e:
            reason = scrub(f"{type(e).__name__}: {e}", self.url)
            self.policy.failed(trial, e, reason)
            print(f"{self.o.tool}: trial {trial.number} failed: {reason}", file=sys.stderr, flush=True)
            raise
        finally:
            if outcome not in (Outcome.LOST, Outcome.INTERRUPTED):  # otherwise the retry owns directory and run
                shutil.rmtree(out / "checkpoints", ignore_errors=True)
            if outcome != Outcome.LOST:
                self.runs.trial_done(run_id, outcome, reason)

    def run(self, state) -> Status:
        """Train trials until the policy has no work left and no trial may need a retry."""
        self.state = state
        while self.policy.work_left(self.study):
            self.lost = False
            try:
                self.study.optimize(self.objective, n_trials=1, callbacks=[self.runs.after_trial],
                                    catch=(Exception,))
            except ValueError:  # Optuna cannot tell a trial another worker has already failed and retried
                if not self.lost:
                    raise
        broadcast(None, self.state)  # the other processes stop
        trials = self.study.get_trials(deepcopy=False)
        complete = self.policy.done(self.study, trials)
        self.runs.finish(complete)
        return self.policy.summary(self, trials)


def broadcast(obj, state):
    if state.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list
    return broadcast_object_list([obj], from_process=0)[0]


def follow(pruner: str, state) -> None:
    """A non-main process: train each trial the main process broadcasts, until it sends None."""
    from ..trainer import fit
    while (values := broadcast(None, state)) is not None:
        cfg = C.build(values)
        try:
            fit(cfg, callbacks=[TrialReporter(None, cfg.optim.epochs, [], pruner, state.num_processes,
                                              state.process_index)])
        except (optuna.TrialPruned, TrialLost):
            pass
        except Exception as e:
            print(f"rifle: [process {state.process_index}] trial failed: {type(e).__name__}: {e}",
                  file=sys.stderr, flush=True)
