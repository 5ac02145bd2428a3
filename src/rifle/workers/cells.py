"""Paired campaigns on sweep workers: every cell (group, method, seed) of a plan is one Optuna trial.

A paired comparison (rifle.study, rifle.regime, rifle.compare, rifle.campaign) is a list of cells: the parent
run it belongs to (`group`, e.g. offline-study-validated), the method's label, the seed and the trainer
options. The cells live in an Optuna study named after the campaign, on the sweeps' storages (a journal file,
PostgreSQL or Redis; `:memory:` for one local worker), and are trained by the sweep's `Worker`: any number of
workers started with the same command each take the next untrained cell, a killed worker's cell is retried
from its last checkpoint once its heartbeat is stale, and every cell is trained exactly once (`Budget`: one
slot per cell). Each cell logs into one MLflow child run of its group's parent run (tags compare.name,
compare.method, compare.seed, which rifle.report reads), found again by its tags.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import optuna
from optuna.trial import TrialState

from .. import config as C
from ..track.keys import TEST_ACC
from ..track.parents import claim_parent, find_runs
from ..track.signals import Terminated, raise_on_sigterm
from ..track.store import experiment_id
from .runs import on_retry, trial_done
from .storage import MEMORY, open_storage, resolve_url
from .worker import Worker, budget_slots, distributed_state, follow, origin


@dataclass
class Cell:
    group: str      # its parent run's name (tag compare.name)
    method: str     # the method label (rifle.methods)
    seed: int
    options: dict   # trainer options but the seed and the output directory
    tags: dict = field(default_factory=dict)  # more tags of its run (rifle.compare: the study and trial)

    @property
    def key(self) -> str:
        return f"{self.group}/{self.method}/seed-{self.seed}"

    def run_tags(self) -> dict[str, str]:
        """The tags that find the cell's run again (and that rifle.report reads)."""
        return {"compare.name": self.group, "compare.role": "seed", "compare.method": self.method,
                "compare.seed": str(self.seed)}

    def digest(self) -> str:
        """What the cell trains (run-only options aside): workers joining a campaign must agree on it."""
        core = {k: str(v) for k, v in self.options.items() if k not in C.RUN_ONLY} | {"seed": self.seed}
        return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]


def cells_of(plan: dict[str, dict[str, dict]], seeds: list[int], cell_tags: dict | None = None) -> list[Cell]:
    """A plan's cells in the order group, seed, method: a partial campaign holds complete pairs."""
    return [Cell(group, label, seed, options, (cell_tags or {}).get(label, {}))
            for group, methods in plan.items() for seed in seeds for label, options in methods.items()]


class CellSpace:
    """The plan as a sweep's search space: one integer parameter, the cell's index in the plan."""

    method = "campaign"
    fixed: dict = {}

    def __init__(self, name: str, cells: list[Cell]):
        self.path, self.cells, self.params = f"campaign:{name}", cells, {"cell": None}

    def signature(self) -> dict:
        return {"method": self.method, "cells": {c.key: c.digest() for c in self.cells}}

    def suggest(self, trial) -> Cell:
        return self.cells[trial.suggest_int("cell", 0, len(self.cells) - 1)]


class CellSampler(optuna.samplers.BaseSampler):
    """A new trial takes the cell whose index is its retry chain's rank among the study's chains (the budget
    slot it holds), so cells go in plan order, one chain each. No lock is needed: the storage numbers trials
    atomically, which fixes the ranks, and a retry keeps its chain's cell as a fixed parameter (Optuna's
    RetryHeartbeatStaleTrialCallback copies the params). A rank past the plan is refused by `Budget.check`
    before anything is sampled."""

    def infer_relative_search_space(self, study, trial) -> dict:
        return {}

    def sample_relative(self, study, trial, search_space) -> dict:
        return {}

    def sample_independent(self, study, trial, param_name, param_distribution):
        return len(budget_slots(study.get_trials(deepcopy=False), below=origin(trial)))


class CellRuns:
    """The campaign's MLflow tree: a parent run per group (claimed once, `tracking.claim_parent`), a child run
    per cell, found again by the cell's tags so a retried or re-run cell logs into the same run. After each
    finished cell its group's parent gets `cells_complete` (step: that count, so it only grows) and ends
    FINISHED with its last cell."""

    prefix = "campaign"

    def __init__(self, uri: str, experiment: str, name: str, cells: list[Cell], group_tags: dict):
        from mlflow.tracking import MlflowClient
        self.client, self.name, self.cells, self.group_tags = MlflowClient(uri), name, cells, group_tags
        self.experiment_name = experiment
        experiment_id(self.client, experiment)  # made once, before any parent
        self.groups = list(dict.fromkeys(c.group for c in cells))
        self.parents: dict[str, str] = {}

    def parent(self, group: str) -> str:
        if group not in self.parents:
            # `mlflow run`'s own run becomes the parent only of a one-group campaign (rifle.compare)
            self.parents[group] = claim_parent(self.client, {"compare.name": group}, "compare.role",
                                               self.experiment_name, group,
                                               self.group_tags.get(group, {}) | {"campaign.name": self.name},
                                               adopt=len(self.groups) == 1)
        return self.parents[group]

    def _runs(self, cell: Cell) -> list:
        return find_runs(self.client, cell.run_tags())

    def child(self, trial, chain: int) -> str:
        cell = self.cells[trial.params["cell"]]
        found, numbers = self._runs(cell), str(trial.number)
        if found:
            run = found[0]
            numbers = f"{run.data.tags.get('campaign.optuna_trials', '')},{trial.number}".strip(",")
            self.client.set_tag(run.info.run_id, "campaign.optuna_trials", numbers)
            return run.info.run_id
        parent = self.parent(cell.group)
        exp_id = self.client.get_run(parent).info.experiment_id
        return self.client.create_run(exp_id, run_name=f"{cell.method}-seed-{cell.seed}", tags={
            "mlflow.parentRunId": parent, **cell.run_tags(), **cell.tags, "campaign.name": self.name,
            "campaign.cell": cell.key, "campaign.optuna_trials": numbers}).info.run_id

    def finished(self, run_id: str) -> float | None:
        """The test_acc of a cell whose run finished earlier (e.g. a comparison made without a shared storage)."""
        run = self.client.get_run(run_id)
        return run.data.metrics[TEST_ACC] if run.info.status == "FINISHED" and TEST_ACC in run.data.metrics \
            else None

    def trial_done(self, run_id: str, state: str, reason: str | None = None) -> None:
        trial_done(self.client, self.prefix, run_id, state, reason)

    def on_retry(self, trial, retried: bool) -> None:
        if "cell" in trial.params:  # a worker killed before its trial took a cell left no run
            on_retry(self, self._runs(self.cells[trial.params["cell"]]), trial, retried)

    def after_trial(self, study, trial) -> None:
        if trial.state != TrialState.COMPLETE:
            return
        group = self.cells[trial.params["cell"]].group
        done = complete_cells(study.get_trials(deepcopy=False))
        count = sum(self.cells[i].group == group for i in done)
        self.client.log_metric(self.parent(group), "cells_complete", count, step=count)
        if count == sum(c.group == group for c in self.cells):
            self._close(group)

    def _close(self, group: str) -> None:
        parent = self.parent(group)
        if parent != os.environ.get("MLFLOW_RUN_ID") and self.client.get_run(parent).info.status != "FINISHED":
            self.client.set_terminated(parent)

    def finish(self, complete: bool) -> None:
        if complete:
            for group in self.groups:
                self._close(group)


def complete_cells(trials) -> set[int]:
    return {t.params["cell"] for t in trials if t.state == TrialState.COMPLETE and "cell" in t.params}


class CellWorker(Worker):
    """The sweep's worker over a plan's cells: cells in plan order, never pruned, each in its own output
    directory <output_root>/<group>/<method>/seed-<s>; the trial's value is the cell's test_acc (nothing is
    selected on it: the sampler follows the plan)."""

    value_name = TEST_ACC

    def __init__(self, o, space: CellSpace, url: str, storage, group_tags: dict):
        self.group_tags, self.tool = group_tags, o.tool
        super().__init__(o, space, url, storage)
        self.completed_by_me: set[int] = set()
        self.complete_at_start = self.missing() == []

    def make_sampler(self):
        return CellSampler()

    def make_pruner(self):
        return optuna.pruners.NopPruner()

    def trial_budget(self) -> int:
        return len(self.space.cells)

    def make_runs(self):
        runs = CellRuns(self.uri, self.o.experiment, self.o.study_name, self.space.cells, self.group_tags)
        print(f"{self.o.tool}: campaign {self.o.study_name!r} in {self.shown}: {len(self.space.cells)} cells in "
              f"{len(runs.groups)} group(s), MLflow experiment {self.o.experiment!r}", flush=True)
        return runs

    def trial_options(self, trial, chain: int) -> tuple[dict, Path]:
        cell = self.space.suggest(trial)
        return cell.options | {"seed": cell.seed}, Path(self.o.output_root) / cell.group / cell.method / f"seed-{cell.seed}"

    def describe(self, trial, chain: int) -> str:
        return f"cell {self.space.cells[trial.params['cell']].key} (trial {trial.number})"

    def value(self, result: dict) -> float:
        return result[TEST_ACC]

    def objective(self, trial) -> float:
        value = super().objective(trial)
        self.completed_by_me.add(trial.number)
        return value

    def missing(self) -> list[Cell]:
        done = complete_cells(self.study.get_trials(deepcopy=False))
        return [c for i, c in enumerate(self.space.cells) if i not in done]

    def summary(self, trials) -> None:
        missing = self.missing()
        line = f"{self.o.tool}: campaign {self.o.study_name!r}: {len(self.space.cells) - len(missing)} of " \
               f"{len(self.space.cells)} cells complete"
        print(line + (f"; not complete: {', '.join(c.key for c in missing[:5])}" if missing else ""), flush=True)

    def reports(self) -> bool:
        """Whether this worker writes the campaign's reports: it found the campaign complete, or it completed
        its last cell (so that N workers of an array write them once)."""
        trials = [t for t in self.study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
        last = max(trials, key=lambda t: t.datetime_complete, default=None)
        return self.complete_at_start or (last is not None and last.number in self.completed_by_me)


def run_cells(tool: str, name: str, cells: list[Cell], *, tracking_uri: str, experiment: str, output_root: str,
              storage: str = "", group_tags: dict | None = None, heartbeat_interval: int = 30,
              grace_period: int = 120, max_retry: int = 3) -> tuple[str, dict[str, str]]:
    """Train this worker's share of `cells` (all of them without a shared `storage`) until none is left.
    Returns (status, {group: parent run id}); status is "report" (every cell is complete and this worker
    writes the reports), "complete" (another worker writes them), "incomplete" (some cell failed),
    "follower" (a non-main process of `accelerate launch`, which only trains), or "interrupted" /
    "terminated" (Ctrl-C / SIGTERM: the cell in hand was handed back to the next worker)."""
    url = resolve_url(storage) if storage else MEMORY
    o = SimpleNamespace(tool=tool, study_name=f"{tool.removeprefix('rifle.')}:{name}", storage=storage or MEMORY,
                        heartbeat_interval=heartbeat_interval, output_root=str(Path(output_root).resolve()),
                        tracking_uri=tracking_uri, experiment=experiment, pruner="none", seed=0, sampler="cells")
    with raise_on_sigterm():
        try:
            state = distributed_state()
            if not state.is_main_process:
                follow(o, state)
                return "follower", {}
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            worker = CellWorker(o, CellSpace(name, cells), url,
                                open_storage(url, heartbeat_interval, grace_period, max_retry), group_tags or {})
            complete = worker.run(state) and not worker.missing()
        except KeyboardInterrupt as e:
            print(f"{tool}: interrupted; the next worker resumes the cell from its last checkpoint", file=sys.stderr)
            return ("terminated" if isinstance(e, Terminated) else "interrupted"), {}
    parents = {g: worker.runs.parent(g) for g in worker.runs.groups}
    return ("report" if worker.reports() else "complete") if complete else "incomplete", parents


def finished_runs(tracking_uri: str, parent: str) -> list:
    """The finished child runs of a group's parent, in one search."""
    from mlflow.tracking import MlflowClient

    from ..track.store import all_pages
    client = MlflowClient(tracking_uri)
    exp = client.get_run(parent).info.experiment_id
    return all_pages(client.search_runs, experiment_ids=[exp], filter_string=(
        f"tags.`mlflow.parentRunId` = '{parent}' and attributes.status = 'FINISHED'"))
