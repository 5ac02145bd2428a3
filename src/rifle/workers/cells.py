"""A campaign's cells on Optuna's own queue, trained by the workers of rifle.workers.worker.

A plan's cells (rifle.plan: group, method, seed) are the trials of an Optuna study `campaign:<name>`: its creator
enqueues every cell once (`study.enqueue_trial`, the cell's index as the fixed parameter `cell` and its key as a
user attribute); any number of workers started with the same command each take the next waiting trial; a killed
worker's cell comes back as a waiting trial (Optuna's stale-trial retry copies its parameters and attributes) and
resumes from its checkpoint; a trial that is none of the queue's (a worker asked as the queue ran dry) is given
back untrained. Each cell logs into one MLflow child run of its group's parent run, found again by its tags
(cell.group, cell.method, cell.seed). A cell that fails with an error of its data or options (a DataError or a
ConfigError: permanent) fails its whole group once (study attribute `rifle:failed:<group>`), whose waiting cells
are then skipped, and the workers go on with the other groups; any other error fails only its cell. The trial's
value is the cell's best validation accuracy, or without validation its last training accuracy: never test.
The campaign is done when no cell waits or runs; the worker that finished the last cell writes the reports.
"""
from __future__ import annotations

import hashlib
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import optuna
from optuna.trial import TrialState

from .. import config as C
from .. import keys as K
from ..network import redact
from ..plan import Cell, Plan
from ..track.parents import claim_parent, find_runs
from ..track.signals import Terminated, raise_on_sigterm
from ..track.store import experiment_id
from .outcomes import Outcome as TrialOutcome
from .outcomes import Status
from .runs import on_retry, origin, trial_done
from .storage import HEARTBEAT_ATTR, MEMORY, STUDY_ATTR, SweepError, open_storage, resolve_url
from .worker import GiveBack, Skip, Worker, WorkerOptions, distributed_state, follow, given_back

CELL = "cell"                    # the fixed parameter of a cell's trial: its index in the plan
KEY = "rifle:cell"               # a cell's trial's user attribute: its key
SKIPPED = "rifle:skipped"        # a cell's trial's user attribute: why it was not trained (its group failed)
FAILED_GROUP = "rifle:failed:"   # + group: a study user attribute, the one-line reason the group failed


def digest(cell: Cell) -> str:
    """What the cell trains (run-only options aside): workers joining a campaign must agree on it."""
    core = {k: str(v) for k, v in cell.options.items() if k not in C.RUN_ONLY} | {"seed": cell.seed}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]


def permanent(error: BaseException) -> bool:
    """An error of the data or the options: every cell of its group would fail the same way."""
    from ..data import DataError
    from ..data.registry import RegistryError
    return isinstance(error, (DataError, RegistryError, C.ConfigError))


def cell_trials(trials) -> list:
    """The trials that are cells (the queue's, not given back)."""
    return [t for t in trials if KEY in t.user_attrs and not given_back(t)]


class CellPolicy:
    """The policy of rifle.workers.worker.Worker over a plan's cells (module docstring)."""
    value_name = "best_val_acc (or the last train_acc without validation)"
    pruner_name = "none"  # a cell is never pruned

    def __init__(self, plan: Plan, cell_tags: dict | None = None, group_tags: dict | None = None):
        self.plan, self.cells = plan, plan.cells()
        self.index = {c.key: i for i, c in enumerate(self.cells)}
        self.cell_tags, self.group_tags = cell_tags or {}, group_tags or {}
        self.mine: set[int] = set()  # trials this worker finished (the last one writes the reports)

    # ---- the study: made once, joined by the others
    def signature(self) -> dict:
        return {"method": "campaign", "cells": {c.key: digest(c) for c in self.cells}}

    def study_attrs(self) -> dict:
        core = {g: {m: {k: C.convert(k, v) for k, v in o.items() if k not in C.RUN_ONLY} for m, o in methods.items()}
                for g, methods in self.plan.runs().items()}
        return {"method": "campaign", "plan": core, "seeds": self.plan.seeds, "redraw_subset": self.plan.redraw_subset,
                "value": self.value_name}

    def created(self, study) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            for i, cell in enumerate(self.cells):
                study.enqueue_trial({CELL: i}, user_attrs={KEY: cell.key})

    def mismatch(self, info: dict) -> str | None:
        if info.get("space") == self.signature():
            return None
        return differences(info, self.study_attrs()) + ": start this worker with another --name for a new campaign"

    def sampler(self):
        return optuna.samplers.RandomSampler()  # asked only for a trial none of the queue's, which is given back

    def pruner(self):
        return optuna.pruners.NopPruner()

    def start(self, worker) -> None:
        o = worker.o
        self.out_root = Path(o.output_root).resolve()
        self.poll = max(1.0, min(float(o.heartbeat_interval), 10.0))
        self.runs = CellRuns(o.tracking_uri, o.experiment, self.plan.name, self.cells, self.group_tags, self.cell_tags)
        self.study = worker.study
        trials = cell_trials(self.study.get_trials(deepcopy=False))
        self.complete_at_start = bool(trials) and all(t.state in (TrialState.COMPLETE, TrialState.FAIL)
                                                       for t in trials)
        print(f"{o.tool}: campaign {self.plan.name!r} in {worker.shown}: {len(self.cells)} cells in "
              f"{len(self.runs.groups)} group(s), MLflow experiment {o.experiment!r}", flush=True)

    # ---- the queue
    def work_left(self, study) -> bool:
        """True while a cell waits; waits while only other workers' cells run (one may go stale and come back)."""
        while True:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
            trials = cell_trials(study.get_trials(deepcopy=False))
            if any(t.state == TrialState.WAITING for t in trials):
                return True
            if not any(t.state == TrialState.RUNNING for t in trials):
                return False
            time.sleep(self.poll)

    def claim(self, study, trial) -> None:
        if self.index.get(trial.user_attrs.get(KEY)) is None:
            raise GiveBack(f"trial {trial.number} given back untrained: none of the queue's cells")
        trial.suggest_int(CELL, 0, len(self.cells) - 1)  # the queue's fixed value: recorded as the trial's param
        group = self.cells[self.index[trial.user_attrs[KEY]]].group
        reason = study.user_attrs.get(FAILED_GROUP + group)
        if reason:
            trial.set_user_attr(SKIPPED, f"group {group} failed: {reason}")
            raise Skip(f"cell {trial.user_attrs[KEY]} skipped: its group failed ({reason})")

    def cell(self, trial) -> Cell:
        return self.cells[self.index[trial.user_attrs[KEY]]]

    def options(self, trial, chain: int) -> tuple[dict, Path]:
        cell = self.cell(trial)
        return cell.values(), self.out_root / cell.group / cell.method / f"seed-{cell.seed}"

    def describe(self, trial, chain: int) -> str:
        return f"cell {self.cell(trial).key} (trial {trial.number})"

    def value(self, trial, result: dict) -> float:
        self.mine.add(trial.number)
        if result.get("images"):
            trial.set_user_attr("images", result["images"])
        return result.get(K.BEST_VAL_ACC, result.get(K.TRAIN_ACC, float("nan")))

    def failed(self, trial, error: Exception, reason: str) -> None:
        self.mine.add(trial.number)
        if permanent(error):
            group = self.cell(trial).group
            self.study.set_user_attr(FAILED_GROUP + group, " ".join(reason.split())[:500])
            print(f"rifle campaign: group {group} failed: {reason}; the other groups go on", file=sys.stderr,
                  flush=True)

    # ---- the end
    def done(self, study, trials) -> bool:
        return not any(t.state in (TrialState.WAITING, TrialState.RUNNING) for t in cell_trials(trials))

    def complete_groups(self, trials) -> list[str]:
        done = {t.user_attrs[KEY] for t in cell_trials(trials) if t.state == TrialState.COMPLETE}
        return [g for g in self.runs.groups if all(c.key in done for c in self.cells if c.group == g)]

    def failed_groups(self, trials) -> dict[str, str]:
        """group -> why it is not complete: the reason its data or options failed, else its failed cells."""
        out = {}
        complete = set(self.complete_groups(trials))
        for group in self.runs.groups:
            if group in complete:
                continue
            reason = self.study.user_attrs.get(FAILED_GROUP + group)
            if reason is None:
                bad = [t.user_attrs[KEY] for t in cell_trials(trials) if t.state == TrialState.FAIL
                       and self.cell(t).group == group and not retried(t, trials)]
                reason = f"cell(s) failed: {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} (their MLflow runs " \
                         "say why)" if bad else "cells not finished"
            out[group] = reason
        return out

    def summary(self, worker, trials) -> Status:
        complete, failed = self.complete_groups(trials), self.failed_groups(trials)
        print(f"{worker.o.tool}: campaign {self.plan.name!r}: {len(complete)} of {len(self.runs.groups)} group(s) "
              "complete" + "".join(f"; {g} failed: {why}" for g, why in failed.items()), flush=True)
        if not self.done(self.study, trials):
            return Status.INCOMPLETE
        finished = [t for t in cell_trials(trials) if t.state in (TrialState.COMPLETE, TrialState.FAIL)]
        last = max(finished, key=lambda t: t.datetime_complete, default=None)
        writes = self.complete_at_start or (last is not None and last.number in self.mine)
        return Status.REPORT if writes else Status.COMPLETE


def retried(trial, trials) -> bool:
    """Whether a failed trial came back as a later attempt of its chain."""
    return any(origin(t) == origin(trial) and t.number > trial.number for t in trials)


def differences(theirs: dict, mine: dict) -> str:
    """One line naming each option that differs between a campaign's stored plan and this worker's, with both
    values (collapsed over the groups and methods where it differs the same way)."""
    found: dict[tuple, list[str]] = {}
    a, b = theirs.get("plan", {}), mine["plan"]
    for group in sorted(set(a) | set(b)):
        if group not in a or group not in b:
            found.setdefault(("group", group in b, group in a), []).append(group)
            continue
        for method in sorted(set(a[group]) | set(b[group])):
            x, y = a[group].get(method), b[group].get(method)
            if x is None or y is None:
                found.setdefault(("method", y is not None, x is not None), []).append(f"{group}/{method}")
                continue
            for option in sorted(set(x) | set(y)):
                if str(x.get(option)) != str(y.get(option)):
                    found.setdefault((option, y.get(option), x.get(option)), []).append(f"{group}/{method}")
    if theirs.get("seeds") is not None and theirs.get("seeds") != mine["seeds"]:
        found[("seeds", mine["seeds"], theirs["seeds"])] = []
    if not found:
        return "its cells differ from this worker's"
    parts = []
    for (option, here, there), where in found.items():
        if option in ("group", "method"):
            parts.append(f"{option} {where[0]}" + (" only here" if here else " only in the campaign"))
        else:
            scope = "" if not where or len(where) > 3 else f" ({', '.join(where)})"
            parts.append(f"{option} {here!r} here, {there!r} in the campaign{scope}")
    return "this worker's plan differs from the campaign's: " + "; ".join(parts)


class CellRuns:
    """The campaign's MLflow tree: a parent run per group (claimed once, `track.parents.claim_parent`), a child run
    per cell, found again by the cell's tags so a retried or re-run cell logs into the same run. After each
    finished cell its group's parent gets `cells_complete` (step: that count, so it only grows) and ends
    FINISHED with its last cell."""
    tags = K.CELL_RUN  # the tags this tree writes on a cell's run

    def __init__(self, uri: str, experiment: str, name: str, cells: list[Cell], group_tags: dict, cell_tags: dict):
        from mlflow.tracking import MlflowClient
        self.client, self.name, self.cells = MlflowClient(uri), name, {c.key: c for c in cells}
        self.group_tags, self.cell_tags = group_tags, cell_tags
        self.experiment_name = experiment
        experiment_id(self.client, experiment)  # made once, before any parent
        self.groups = list(dict.fromkeys(c.group for c in cells))
        self.size = {g: sum(c.group == g for c in cells) for g in self.groups}
        self.methods = ",".join(dict.fromkeys(c.method for c in cells))  # the plan's order, for views
        self.parents: dict[str, str] = {}

    def parent(self, group: str) -> str:
        if group not in self.parents:
            # `mlflow run`'s own run becomes the parent only of a one-group campaign (rifle compare)
            tags = self.group_tags.get(group, {}) | {K.CAMPAIGN_NAME: self.name, K.CAMPAIGN_METHODS: self.methods}
            self.parents[group] = claim_parent(self.client, {K.CELL_GROUP: group}, K.CELL_ROLE, self.experiment_name,
                                               group, tags, adopt=len(self.groups) == 1)
        return self.parents[group]

    def _runs(self, cell: Cell) -> list:
        return find_runs(self.client, run_tags(cell))

    def child(self, trial, chain: int) -> str:
        cell = self.cells[trial.user_attrs[KEY]]
        found, numbers = self._runs(cell), str(trial.number)
        if found:
            run = found[0]
            numbers = f"{run.data.tags.get(self.tags.optuna_trials, '')},{trial.number}".strip(",")
            self.client.set_tag(run.info.run_id, self.tags.optuna_trials, numbers)
            return run.info.run_id
        parent = self.parent(cell.group)
        exp_id = self.client.get_run(parent).info.experiment_id
        return self.client.create_run(exp_id, run_name=f"{cell.method}-seed-{cell.seed}", tags={
            K.PARENT_RUN: parent, **run_tags(cell), **self.cell_tags.get(cell.method, {}),
            K.CAMPAIGN_NAME: self.name, K.CAMPAIGN_CELL: cell.key, self.tags.optuna_trials: numbers}).info.run_id

    def finished(self, run_id: str) -> float | None:
        """The value of a cell whose run finished earlier (e.g. a comparison made without a shared storage)."""
        run = self.client.get_run(run_id)
        m = run.data.metrics
        if run.info.status != "FINISHED" or K.TEST_ACC not in m:
            return None
        return m.get(K.BEST_VAL_ACC, m.get(K.TRAIN_ACC, float("nan")))

    def trial_done(self, run_id: str, state: TrialOutcome, reason: str | None = None) -> None:
        trial_done(self.client, self.tags, run_id, state, reason)

    def on_retry(self, trial, retried: bool) -> None:
        if trial.user_attrs.get(KEY) in self.cells:
            on_retry(self, self._runs(self.cells[trial.user_attrs[KEY]]), trial, retried)

    def after_trial(self, study, trial) -> None:
        if trial.state != TrialState.COMPLETE or trial.user_attrs.get(KEY) not in self.cells:
            return
        group = self.cells[trial.user_attrs[KEY]].group
        done = {t.user_attrs[KEY] for t in cell_trials(study.get_trials(deepcopy=False))
                if t.state == TrialState.COMPLETE}
        count = sum(self.cells[k].group == group for k in done if k in self.cells)
        self.client.log_metric(self.parent(group), K.CELLS_COMPLETE, count, step=count)
        if count == self.size[group]:
            self._close(group)

    def _close(self, group: str) -> None:
        parent = self.parent(group)
        if parent != os.environ.get("MLFLOW_RUN_ID") and self.client.get_run(parent).info.status != "FINISHED":
            self.client.set_terminated(parent)

    def finish(self, complete: bool) -> None:
        pass  # each group's parent ends with its last cell (after_trial)


def run_tags(cell: Cell) -> dict[str, str]:
    """The tags that find a cell's run again (and that rifle.report reads)."""
    return {K.CELL_GROUP: cell.group, K.CELL_ROLE: K.Role.CELL, K.CELL_METHOD: cell.method, K.CELL_SEED: str(cell.seed)}


def status(study, plan: Plan, grace_period: float) -> dict:
    """What a campaign's storage says now, read only (nothing is failed or retried): per group the cells complete,
    running, failed and pending; running cells whose heartbeat is older than `grace_period` (their worker is
    gone: the next worker retries them); images per second and the time left, from the finished cells and how
    far the running ones have got (their reported epochs)."""
    cells = plan.cells()
    index = {c.key: i for i, c in enumerate(cells)}
    latest = {}  # cell index -> its newest attempt
    for t in cell_trials(study.get_trials(deepcopy=False)):
        i = index.get(t.user_attrs[KEY])
        if i is not None and (i not in latest or t.number > latest[i].number):
            latest[i] = t
    names = dict.fromkeys(c.group for c in cells)
    groups = {g: dict.fromkeys(("complete", "running", "failed", "pending"), 0) for g in names}
    now, stale, durations, rates, left_running = time.time(), [], [], [], 0.0
    for i, cell in enumerate(cells):
        t = latest.get(i)
        state = "pending" if t is None or t.state == TrialState.WAITING else \
            "complete" if t.state == TrialState.COMPLETE else "running" if t.state == TrialState.RUNNING else "failed"
        groups[cell.group][state] += 1
        if state == "complete" and t.datetime_start and t.datetime_complete:
            seconds = (t.datetime_complete - t.datetime_start).total_seconds()
            durations.append(seconds)
            if t.user_attrs.get("images"):
                rates.append(t.user_attrs["images"] / max(seconds, 1e-9))
        if state == "running":
            beat = max(t.system_attrs.get(HEARTBEAT_ATTR, 0), t.datetime_start.timestamp())
            if now - beat > grace_period:
                stale.append({"cell": cell.key, "trial": t.number, "heartbeat_age_s": round(now - beat)})
            epochs = C.build(cell.values() | {"output_dir": "unused"}).optim.epochs
            left_running += 1 - len(t.intermediate_values) / max(epochs, 1)
    pending = sum(g["pending"] for g in groups.values())
    live = sum(g["running"] for g in groups.values()) - len(stale)
    mean = statistics.fmean(durations) if durations else None
    left = None if mean is None else (pending + left_running + len(stale)) * mean / max(live, 1)
    reasons = {g: r for g in groups if (r := study.user_attrs.get(FAILED_GROUP + g))}
    return {"campaign": plan.name, "groups": groups, "failed_groups": reasons, "stale": stale, "live_workers": live,
            "images_per_second": round(statistics.fmean(rates), 1) if rates else None,
            "seconds_per_cell": round(mean, 1) if mean is not None else None,
            "hours_left": round(left / 3600, 2) if left is not None else None,
            "value": study.user_attrs.get(STUDY_ATTR, {}).get("value")}


class CampaignError(RuntimeError):
    """The plan cannot be trained (a dataset that does not load): one line per problem, nothing trained."""


def stored(url: str, name: str) -> dict | None:
    """The campaign's record in its storage (its plan, seeds, signature), or None when there is none yet (a
    journal file that does not exist stays so)."""
    if url == MEMORY or ("://" not in url and not Path(url).exists()):
        return None
    try:
        return optuna.load_study(study_name=name, storage=open_storage(url)).user_attrs.get(STUDY_ATTR)
    except KeyError:
        return None


class Result(NamedTuple):
    status: Status
    parents: dict     # complete group -> its parent run id
    failed: dict      # group that did not complete -> why


def run_campaign(plan: Plan, o: WorkerOptions, *, cell_tags: dict | None = None, group_tags: dict | None = None,
                 prepare: bool = False) -> Result:
    """Train this worker's share of the plan's cells until none is left (all of them without a shared storage).
    Before any cell: the datasets' commits are frozen (a joiner takes those of the campaign it joins, the first
    worker resolves branches) and every dataset is loaded and checked (CampaignError naming each that fails).
    With `prepare`, stop once the campaign exists and its datasets are cached."""
    url = resolve_url(o.storage) if o.storage else MEMORY
    with raise_on_sigterm():
        state = distributed_state()
        if not state.is_main_process:
            follow("none", state)
            return Result(Status.FOLLOWER, {}, {})
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        known = stored(url, o.study_name)
        if known:  # a joiner: the campaign's commits, and its plan or a refusal, before anything loads
            plan.adopt_revisions(known.get("plan", {}))
            difference = CellPolicy(plan).mismatch(known)
            if difference:
                raise SweepError(f"campaign {plan.name!r} in {redact(url)}: {difference}")
        else:
            plan.resolve_revisions()
        problems = plan.check_datasets()
        if problems:
            raise CampaignError("\n".join(problems))
        storage = open_storage(url, o.heartbeat_interval, o.grace_period, o.max_retry)  # after: nothing made
        policy, worker = CellPolicy(plan, cell_tags, group_tags), None
        try:
            worker = Worker(o, policy, url, storage)
            if prepare:
                return Result(Status.COMPLETE, {}, {})
            status = worker.run(state)
        except KeyboardInterrupt as e:
            if worker is not None and worker.tracking_lost:
                print(f"{o.tool}: error: {worker.tracking_lost}", file=sys.stderr, flush=True)
                return Result(Status.TRACKING_LOST, {}, {})
            print(f"{o.tool}: interrupted; the next worker resumes the cell from its last checkpoint", file=sys.stderr)
            return Result(Status.TERMINATED if isinstance(e, Terminated) else Status.INTERRUPTED, {}, {})
    trials = worker.study.get_trials(deepcopy=False)
    return Result(status, {g: worker.runs.parent(g) for g in policy.complete_groups(trials)},
                   policy.failed_groups(trials))


def finished_runs(tracking_uri: str, parent: str) -> list:
    """The finished child runs of a group's parent, in one search."""
    from mlflow.tracking import MlflowClient

    from ..track.store import all_pages
    client = MlflowClient(tracking_uri)
    exp = client.get_run(parent).info.experiment_id
    return all_pages(client.search_runs, experiment_ids=[exp], filter_string=(
        f"{K.parent_filter(parent)} and attributes.status = 'FINISHED'"))
