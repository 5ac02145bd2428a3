"""One sweep worker: Optuna's `study.optimize` over an objective that trains one trial with `fit`.

Optuna's heartbeat, stale-trial retries (rifle.sweep.storage), samplers, pruners and plots are used as is.
What it lacks lives here: the pruning rule fair to RIFLE (`TrialReporter`); the exact study-wide `n_trials`
(`Budget`: one slot per retry chain, a lost race for the last slot gives its trial back untrained, a worker
waits while another's trial may still need a retry); a retry resumes in its chain's output directory and
MLflow run; a trial taken over by another worker stops at its next report without touching either
(`TrialLost`); multi-process trials, where the main process broadcasts each trial's options and every
pruning decision so all processes train the same trial and stop at the same epoch.
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
from pathlib import Path

import optuna
from optuna.trial import TrialState

from .. import config as C
from ..track import keys as K
from ..network import redact
from .runs import SweepRuns, origin
from .storage import MEMORY, STUDY_ATTR, open_study, scrub

OVER_BUDGET_ATTR = "rifle:over_budget"


class TrialLost(RuntimeError):
    """Another worker declared this trial stale and retries it in the same directory and MLflow run."""


class OverBudget(RuntimeError):
    """Another worker took the study's last trial a moment before this one."""


class TrialReporter:
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
            reported = set(trial.study._storage.get_trial(trial._trial_id).intermediate_values)
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
        return f"pruned at epoch {epoch} by the {self.pruner_name} pruner: best {self.key} so far {self.best:.4f}{context}"

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
            print(f"rifle.sweep: [process {self.process_index}] {reason}", flush=True)
            raise optuna.TrialPruned(reason) if kind == "pruned" else TrialLost(reason)


def budget_slots(trials, below: int | None = None) -> set[int]:
    """Budget slots used: one per retry chain, trials given back over budget excluded; with `below`, only
    chains that started before trial number `below`."""
    return {origin(t) for t in trials if not t.system_attrs.get(OVER_BUDGET_ATTR)
            and (below is None or origin(t) < below)}


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

    def __call__(self, study, trial) -> None:  # a study.optimize callback
        if not self.work_left(study):
            study.stop()

    def check(self, study, trial) -> None:
        if over_budget(study.get_trials(deepcopy=False), trial.number, self.n_trials):
            study._storage.set_trial_system_attr(trial._trial_id, OVER_BUDGET_ATTR, True)
            raise OverBudget(f"trial {trial.number} given back untrained: another worker took the last trial")


class TrialSeededTPE(optuna.samplers.TPESampler):
    """TPE seeded from (seed, trial number) at every trial: parallel workers never draw the same random
    start-up point, and a one-worker study is reproducible."""

    def __init__(self, seed: int):
        super().__init__(seed=seed)
        self.base_seed = seed

    def before_trial(self, study, trial) -> None:
        # Made afresh with the trial's seed: TPE keeps no state between trials but its random streams.
        super().__init__(seed=self.base_seed * 1_000_003 + trial.number)
        super().before_trial(study, trial)


def make_sampler(kind: str, space, seed: int):
    # The grid sampler gives each trial a grid point not yet taken, and stops the study when all are done.
    return optuna.samplers.GridSampler(space.grid(), seed=seed) if kind == "grid" else TrialSeededTPE(seed)


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


class Worker:
    """The main process's side: the study, the budget, the MLflow tree, and the objective. A campaign
    (`rifle.sweep.cells`) is this worker with the cells of a plan as its trials: it overrides the hooks
    `make_sampler`, `make_pruner`, `trial_budget`, `make_runs`, `trial_options`, `describe` and `value`."""

    value_name = K.VAL_ACC  # what the objective returns (`value`)
    tool = "rifle.sweep"    # the prefix of its lines

    def __init__(self, o, space, url: str, storage):
        self.o, self.space, self.url, self.storage = o, space, url, storage
        self.shown = redact(url) if "://" in url else url if url == MEMORY else str(Path(url).resolve())
        if os.environ.get("MLFLOW_RUN_ID") and not o.storage.startswith("env:") and redact(url) != url:
            print("rifle.sweep: warning: `mlflow run` records its -P parameters, so the run's 'storage' param holds "
                  "the password; pass -P storage=env:VAR (the URL in an environment variable) instead",
                  file=sys.stderr, flush=True)
        self.study = open_study(self.storage, o.study_name, space, self.make_sampler(), self.make_pruner(),
                                self.shown)
        self.budget = Budget(self.trial_budget(), poll=max(1.0, min(float(o.heartbeat_interval), 10.0)))
        study_uuid = self.study.user_attrs[STUDY_ATTR]["uuid"]
        self.out_root = Path(o.output_root).resolve() / f"{o.study_name}-{study_uuid[:8]}"
        self.uri = o.tracking_uri
        self.runs = self.make_runs()
        self.storage.get_heartbeat_stale_trial_callback().on_retry = self.runs.on_retry
        self.lost = False

    # ---- hooks (a sweep's; rifle.sweep.cells.CellWorker overrides them)
    def make_sampler(self):
        return make_sampler(self.o.sampler, self.space, self.o.seed)

    def make_pruner(self):
        epochs = C.build(self.space.fixed | {"output_dir": "unused"}).optim.epochs
        return make_pruner(self.o.pruner, self.o.pruner_startup_trials, self.o.pruner_warmup_epochs, epochs)

    def trial_budget(self) -> int:
        n_trials = self.o.n_trials
        if self.o.sampler == "grid" and (points := math.prod(len(v) for v in self.space.grid().values())) < n_trials:
            print(f"rifle.sweep: the grid has {points} points: n_trials {n_trials} -> {points}", flush=True)
            n_trials = points
        return n_trials

    def make_runs(self):
        o, space = self.o, self.space
        params = {"space": o.space, "method": space.method, "study_name": o.study_name, "storage": self.shown,
                  "sampler": o.sampler, "pruner": o.pruner, "seed": o.seed,
                  "searched": ",".join(space.params) or "none",
                  **{f"fixed.{k}": v for k, v in space.fixed.items() if k not in C.RUN_ONLY}}
        runs = SweepRuns(self.uri, o.experiment, self.study, self.shown, params, self.budget.n_trials)
        print(f"rifle.sweep: study {o.study_name!r} in {self.shown}, {self.budget.n_trials} trials in total, MLflow "
              f"parent run {runs.parent} ({redact(self.uri)})", flush=True)
        return runs

    def trial_options(self, trial, chain: int) -> tuple[dict, Path]:
        """(trainer options, output directory) of a trial; a retry trains (resumes) in its chain's directory."""
        return {"log_weights": False} | self.space.suggest(trial), self.out_root / f"trial-{chain}"

    def describe(self, trial, chain: int) -> str:
        return f"trial {trial.number} ({_fmt(trial.params)})"

    def value(self, result: dict) -> float:
        return result[K.BEST_VAL_ACC]  # the objective: validation, never test

    # ---- the objective and the loop
    def objective(self, trial) -> float:
        from ..trainer import fit
        chain = origin(self.study._storage.get_trial(trial._trial_id))
        retry = self.storage.get_heartbeat_stale_trial_callback()
        try:
            self.budget.check(self.study, trial)
            values, out = self.trial_options(trial, chain)
        except OverBudget:
            raise
        except Exception:  # the storage failed before the trial knew its options: retried as the same trial
            retry(self.study, self.study._storage.get_trial(trial._trial_id))
            raise
        values |= {"output_dir": str(out), "tracking_uri": self.uri, "experiment": self.runs.experiment_name,
                   "run_name": None}
        run_id = self.runs.child(trial, chain)
        start, history = resume_point(out)
        trial.set_user_attr("output_dir", str(out))
        trial.set_user_attr("mlflow_run_id", run_id)
        if start:
            trial.set_user_attr("resumed_from_epoch", start)
            self.runs.client.set_tag(run_id, f"{self.runs.prefix}.resumed_from_epoch", str(start))
        print(f"{self.tool}: {self.describe(trial, chain)}"
              + (f", a retry of trial {chain} resuming at epoch {start}" if start else ""), flush=True)
        finished = self.runs.finished(run_id)
        if finished is not None:  # trained earlier (e.g. without a shared storage): read back
            print(f"{self.tool}: {self.describe(trial, chain)}: finished earlier in run {run_id}", flush=True)
            self.runs.trial_done(run_id, "complete")
            return finished
        broadcast(values, self.state)
        outcome, reason = "failed", None
        try:
            cfg = C.build(values)
            reporter = TrialReporter(trial, cfg.optim.epochs, history, self.o.pruner, self.state.num_processes,
                                     key=K.VAL_ACC if cfg.data.val_fraction > 0 else K.TRAIN_ACC)
            value = self.value(fit(cfg, callbacks=[reporter], mlflow_run_id=run_id))
            outcome = "complete"
            print(f"{self.tool}: trial {trial.number} complete: {self.value_name} {value:.4f}", flush=True)
            return value
        except optuna.TrialPruned as e:
            outcome, reason = "pruned", str(e)
            print(f"{self.tool}: trial {trial.number} pruned: {reason}", flush=True)
            raise
        except TrialLost as e:
            outcome, self.lost = "lost", True
            print(f"{self.tool}: {e}; moving on", flush=True)
            raise
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM (tracking.Terminated)
            # Retried at once by the next worker, from the last checkpoint (this trial is told FAIL).
            outcome, reason = "interrupted", "the worker was interrupted; the next worker resumes the trial"
            retry(self.study, self.study._storage.get_trial(trial._trial_id))
            raise
        except Exception as e:
            reason = scrub(f"{type(e).__name__}: {e}", self.url)
            print(f"{self.tool}: trial {trial.number} failed: {reason}", file=sys.stderr, flush=True)
            raise
        finally:
            if outcome not in ("lost", "interrupted"):  # otherwise the retry owns the directory and the run
                shutil.rmtree(out / "checkpoints", ignore_errors=True)
            if outcome != "lost":
                self.runs.trial_done(run_id, outcome, reason)

    def run(self, state) -> bool:
        """Train trials until the study's budget is used and no trial may need a retry; True when complete."""
        self.state = state
        while self.budget.work_left(self.study):
            self.lost = False
            try:
                self.study.optimize(self.objective, callbacks=[self.runs.after_trial, self.budget], catch=(Exception,))
            except ValueError:  # Optuna cannot tell a trial another worker has already failed and retried
                if not self.lost:
                    raise
        broadcast(None, self.state)  # the other processes stop
        trials = self.study.get_trials(deepcopy=False)
        complete = len(budget_slots(trials)) >= self.budget.n_trials and not any(
            t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials)
        self.runs.finish(complete)
        self.summary(trials)
        return complete

    def summary(self, trials) -> None:
        done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        line = f"rifle.sweep: study {self.o.study_name!r}: {len(done)} trials finished"
        if any(t.state == TrialState.COMPLETE for t in trials):
            best = self.study.best_trial
            line += f"; best trial {best.number}: val_acc {best.value:.4f} ({_fmt(best.params)})"
        print(line + f"; MLflow parent run {self.runs.parent}", flush=True)


def distributed_state():
    """Accelerate's process state, made as the trainer's Accelerator will be (CPU processes need cpu=True for
    gloo); a process-wide singleton, so the trainer then reuses it."""
    import torch
    from accelerate import PartialState
    return PartialState(cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1)


def broadcast(obj, state):
    if state.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list
    return broadcast_object_list([obj], from_process=0)[0]


def follow(o, state) -> None:
    """A non-main process: train each trial the main process broadcasts, until it sends None."""
    from ..trainer import fit
    while (values := broadcast(None, state)) is not None:
        cfg = C.build(values)
        try:
            fit(cfg, callbacks=[TrialReporter(None, cfg.optim.epochs, [], o.pruner, state.num_processes,
                                              state.process_index)])
        except (optuna.TrialPruned, TrialLost):
            pass
        except Exception as e:
            print(f"rifle.sweep: [process {state.process_index}] trial failed: {type(e).__name__}: {e}",
                  file=sys.stderr, flush=True)
