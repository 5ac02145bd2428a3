"""Optuna studies over RIFLE and the baselines: `python -m rifle.sweep --space sweeps/<method>.yaml ...`.

One worker process runs trials one after another; start the same command several times (or on several
machines sharing a PostgreSQL or Redis storage) for parallel workers. Under `accelerate launch` the main
process owns the trial and every process trains it.

Design (the README's "Sweeps" section says the same for users):

- Search space: a YAML file (`load_space`), `extends` a base file, `fixed` options and `params` with
  float (log, step), int and categorical distributions, each optionally conditional (`when`). The method's
  label is derived from the fixed `tricks` (rifle.methods), never written separately.
- Objective: the trial's best validation accuracy (the trainer's selection criterion), never test.
- Pruning fair to RIFLE (`TrialReporter`): every epoch the trial reports its best validation accuracy so
  far, which never dips after a head re-initialization, and the pruner is consulted only where the trial
  is comparable with others: before its first re-initialization (until then RIFLE trains exactly as plain
  fine-tuning) and at the end of each period (the epoch whose validation pass precedes the reset). A
  RIFLE trial is never pruned while its new head is catching up.
- Budget: `n_trials` counts trials of the whole study across workers and restarts. A retried trial and
  the trial it retries count once. A worker asks for a new trial only while the budget is not used up; if
  two workers race for the last slot, the one whose trial has the higher number gives it back at once
  (state FAIL, system attr `rifle:over_budget`, never trained).
- Fault tolerance: a worker beats a heartbeat while it trains (RDB storage: Optuna's heartbeat; journal
  file and Redis: a timestamp in the trial's system attrs). A trial whose heartbeat is older than the
  grace period is marked FAIL and re-enqueued with the same parameters
  (`RetryHeartbeatStaleTrialCallback`); its retry trains in the original trial's output directory, so
  the trainer resumes from the last epoch checkpoint, and logs into the original trial's MLflow run. A
  worker that was only paused finds its trial taken over at its next heartbeat or report and moves on
  without touching the study, the directory or the run (`TrialLost`).
- MLflow: one parent run per study, found again by the study's uuid tag (under `mlflow run` the run it
  made is the parent, or a worker run pointing to the parent when the study already has one); one child
  run per trial, reused by its retries; states complete / pruned / failed with the reason as tags.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import config as C
from .methods import method_label
from .tracking import DEFAULT_URI, all_experiment_ids, experiment_id, redact

SAMPLERS = ("tpe", "grid")
PRUNERS = ("median", "hyperband", "none")
PARAM_TYPES = ("float", "int", "categorical")
PARAM_KEYS = {"type", "low", "high", "log", "step", "choices", "when"}
TOP_KEYS = {"extends", "fixed", "params"}
# Set by the sweep itself for each trial; a space may not set them.
MANAGED = ("output_dir", "run_name", "tracking_uri", "experiment")
STUDY_ATTR = "rifle_sweep"          # study user attr: uuid, method, space signature
HEARTBEAT_ATTR = "rifle:heartbeat"  # trial system attr on journal storage (unix time of the last beat)
OVER_BUDGET_ATTR = "rifle:over_budget"
RETRY_ORIGIN_ATTR = "failed_trial"  # set by RetryHeartbeatStaleTrialCallback: the first trial of the chain


class SpaceError(ValueError):
    """A bad search-space file: the message names the file and the key."""


class SweepError(RuntimeError):
    """A study cannot be run as asked (storage, study mismatch); the message is safe to print."""


# --------------------------------------------------------------------------------------------- spaces

@dataclass
class Param:
    name: str
    kind: str
    source: str                          # the file that defined it, for error messages
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: list | None = None
    when: dict[str, list] = field(default_factory=dict)

    def active(self, values: dict) -> bool:
        """A conditional parameter is suggested only when every condition holds for what is already set."""
        return all(name in values and C.convert(name, values[name]) in allowed
                   for name, allowed in self.when.items())

    def suggest(self, trial) -> Any:
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_categorical(self.name, self.choices)

    def grid_values(self) -> list:
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind == "int":
            return list(range(self.low, self.high + 1, self.step or 1))
        n = int(round((self.high - self.low) / self.step))
        return [round(self.low + i * self.step, 12) for i in range(n + 1)]

    def signature(self) -> dict:
        keys = ("kind", "low", "high", "log", "step", "choices", "when")
        return {k: getattr(self, k) for k in keys}


@dataclass
class Space:
    path: str
    fixed: dict[str, Any]                # option -> converted value (validated)
    params: dict[str, Param]             # in file order (conditions refer to earlier ones)
    sources: dict[str, str]              # option -> file (or "command line") that set it

    @property
    def method(self) -> str:
        """The method label (rifle.methods) of the fixed `tricks`: a space has no name of its own for it."""
        return method_label(self.fixed.get("tricks", C.TricksConfig.tricks))

    def suggest(self, trial) -> dict[str, Any]:
        values = dict(self.fixed)
        for p in self.params.values():
            if p.active(values):
                values[p.name] = p.suggest(trial)
        return values

    def grid(self) -> dict[str, list]:
        for p in self.params.values():
            if p.when:
                raise SpaceError(f"{p.source}: params.{p.name}: the grid sampler needs every parameter in every "
                                 "trial; a conditional parameter needs --sampler tpe")
            if p.kind == "float" and p.step is None:
                raise SpaceError(f"{p.source}: params.{p.name}: the grid sampler needs a step (or categorical "
                                 "choices) for a float parameter")
        return {p.name: p.grid_values() for p in self.params.values()}

    def signature(self) -> dict:
        """What defines the study's trials: two workers must agree on it (run-only options excluded)."""
        return {"method": self.method,
                "fixed": {k: v for k, v in sorted(self.fixed.items()) if k not in C.RUN_ONLY},
                "params": {n: p.signature() for n, p in self.params.items()}}


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise SpaceError(f"{path}: file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SpaceError(f"{path}: not valid YAML ({e})") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise SpaceError(f"{path}: expected a mapping with keys {', '.join(sorted(TOP_KEYS))}")
    if "method" in data:  # the label is derived from `tricks`, so it cannot disagree with what trains
        raise SpaceError(f"{path}: method: the method is named after fixed.tricks (tricks: rifle,l2sp is "
                         "rifle+l2sp); remove this key")
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise SpaceError(f"{path}: {unknown[0]}: unknown key (allowed: {', '.join(sorted(TOP_KEYS))})")
    for key in ("fixed", "params"):
        if not isinstance(data.get(key) or {}, dict):
            raise SpaceError(f"{path}: {key}: expected a mapping of option: value")
    return data


_NAME_ONLY = object()


def _option_error(source: str, where: str, name: str, value: Any = _NAME_ONLY) -> None:
    """SpaceError for an unknown option or a value the option refuses (the trainer's own message)."""
    if name in MANAGED:
        raise SpaceError(f"{source}: {where}: set by the sweep for each trial (use --output_root, "
                         "--tracking_uri or --experiment)")
    if value is _NAME_ONLY and name in C.all_fields():
        return
    try:
        C.convert(name, None if value is _NAME_ONLY else value)
    except C.ConfigError as e:
        raise SpaceError(f"{source}: {where}: {str(e).removeprefix(f'--{name}: ')}") from None


def _number(source: str, where: str, value: Any, integer: bool) -> float | int:
    """YAML reads 1e-3 (no dot) as a string: accept numeric strings, refuse booleans and words."""
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
        if not math.isfinite(number):
            raise ValueError
        if integer:
            if not number.is_integer():
                raise ValueError
            return int(number)
        return number
    except (TypeError, ValueError):
        kind = "an integer" if integer else "a number"
        raise SpaceError(f"{source}: {where}: expected {kind}, got {value!r}") from None


def _parse_param(source: str, name: str, spec: Any) -> Param:
    where = f"params.{name}"
    _option_error(source, where, name)
    if not isinstance(spec, dict):
        raise SpaceError(f"{source}: {where}: expected a mapping such as {{type: float, low: 0.001, high: 0.1, "
                         f"log: true}}; put a fixed value under 'fixed'")
    unknown = sorted(set(spec) - PARAM_KEYS)
    if unknown:
        raise SpaceError(f"{source}: {where}.{unknown[0]}: unknown key (allowed: {', '.join(sorted(PARAM_KEYS))})")
    kind = spec.get("type")
    if kind not in PARAM_TYPES:
        raise SpaceError(f"{source}: {where}.type: expected one of {', '.join(PARAM_TYPES)}, got {kind!r}")
    p = Param(name, kind, source)
    if kind == "categorical":
        extra = sorted({"low", "high", "log", "step"} & set(spec))
        if extra:
            raise SpaceError(f"{source}: {where}.{extra[0]}: not used by a categorical parameter (use choices)")
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SpaceError(f"{source}: {where}.choices: expected a non-empty list")
        if any(isinstance(c, (dict, list)) for c in choices):
            raise SpaceError(f"{source}: {where}.choices: each choice must be a single value")
        if len({json.dumps(c) for c in choices}) != len(choices):
            raise SpaceError(f"{source}: {where}.choices: a value is listed twice")
        p.choices = choices
    else:
        if "choices" in spec:
            raise SpaceError(f"{source}: {where}.choices: only for type categorical")
        for key in ("low", "high"):
            if key not in spec:
                raise SpaceError(f"{source}: {where}.{key}: required for type {kind}")
        integer = kind == "int"
        p.low = _number(source, f"{where}.low", spec["low"], integer)
        p.high = _number(source, f"{where}.high", spec["high"], integer)
        if not p.low < p.high:
            raise SpaceError(f"{source}: {where}: malformed range, low must be below high "
                             f"(got low={spec['low']}, high={spec['high']})")
        p.log = spec.get("log", False)
        if not isinstance(p.log, bool):
            raise SpaceError(f"{source}: {where}.log: expected true or false, got {p.log!r}")
        if p.log and p.low <= 0:
            raise SpaceError(f"{source}: {where}: a log range needs low > 0, got {spec['low']}")
        if "step" in spec:
            p.step = _number(source, f"{where}.step", spec["step"], integer)
            if p.step <= 0:
                raise SpaceError(f"{source}: {where}.step: must be > 0, got {spec['step']}")
            if p.log and (kind == "float" or p.step != 1):
                raise SpaceError(f"{source}: {where}: log and step cannot be combined (Optuna samples a "
                                 "log range continuously)")
    when = spec.get("when") or {}
    if not isinstance(when, dict):
        raise SpaceError(f"{source}: {where}.when: expected a mapping option: value or [values]")
    for other, allowed in when.items():
        allowed = allowed if isinstance(allowed, list) else [allowed]
        for value in allowed:
            _option_error(source, f"{where}.when.{other}", other, value)
        p.when[other] = [C.convert(other, v) for v in allowed]
    return p


def _merge(path: Path, stack: tuple = ()) -> tuple[dict, dict, dict]:
    """(fixed, params, sources) of a file after its `extends` chain."""
    if path.resolve() in stack:
        raise SpaceError(f"{path}: extends: circular ({' -> '.join(str(p) for p in (*stack, path.resolve()))})")
    data = _read_yaml(path)
    fixed, params, sources = {}, {}, {}
    if data.get("extends"):
        parent = path.parent / str(data["extends"])
        if not parent.is_file():
            raise SpaceError(f"{path}: extends: file not found: {parent}")
        fixed, params, sources = _merge(parent, (*stack, path.resolve()))
    own_fixed, own_params = data.get("fixed") or {}, data.get("params") or {}
    both = sorted(set(own_fixed) & set(own_params))
    if both:
        raise SpaceError(f"{path}: {both[0]}: both under fixed and under params")
    for name, value in own_fixed.items():  # a file fixes what its base searched, and the reverse
        _option_error(str(path), f"fixed.{name}", name, value)
        params.pop(name, None)
        fixed[name], sources[name] = value, str(path)
    for name, spec in own_params.items():
        fixed.pop(name, None)
        params[name], sources[name] = _parse_param(str(path), name, spec), str(path)
    return fixed, params, sources


def load_space(path: str, overrides: dict[str, Any] | None = None) -> Space:
    """Read and validate a search space; `overrides` (command-line trainer options) fix more options."""
    p = Path(path)
    fixed, params, sources = _merge(p)
    if "tricks" in params:
        raise SpaceError(f"{params['tricks'].source}: params.tricks: a study tunes one method; fix tricks under "
                         "fixed and make one space per method")
    for name, value in (overrides or {}).items():
        if name in params:
            raise SpaceError(f"--{name}: searched in {params[name].source} (params.{name}); remove it there to "
                             "fix it from the command line")
        _option_error("command line", f"--{name}", name, value)
        fixed[name], sources[name] = value, "command line"
    fixed = {k: C.convert(k, v) for k, v in fixed.items()}
    space = Space(str(p), fixed, dict(params), sources)
    _check_values(space)
    return space


def _check_values(space: Space) -> None:
    """Build a config at every end of every range (and every choice) so a value the trainer refuses, or an
    impossible combination with the fixed options, fails now, naming the file and key, not in trial 7."""
    def build(values: dict, name: str, where: str) -> C.Config:
        try:
            return C.build(values | {"output_dir": "unused"})
        except C.ConfigError as e:
            source = space.sources.get(e.option, space.sources.get(name, space.path))
            key = where if e.option == name else f"{'fixed' if e.option in space.fixed else 'params'}.{e.option}"
            raise SpaceError(f"{source}: {key}: {str(e).removeprefix(f'--{e.option}: ')}") from None

    if build(dict(space.fixed), "", "fixed").data.val_fraction == 0:
        raise SpaceError(f"{space.sources.get('val_fraction', space.path)}: val_fraction: a study selects on "
                         "validation accuracy, so it needs val_fraction > 0")
    seen: dict[str, list] = {}
    for p in space.params.values():
        for other in p.when:
            if other not in space.fixed and other not in seen:
                raise SpaceError(f"{p.source}: params.{p.name}.when.{other}: must be a fixed option or a parameter "
                                 "listed before it")
        ends = p.choices if p.kind == "categorical" else [p.low, p.high]
        context = {k: v[0] for k, v in p.when.items() if k in seen}  # values that make the parameter active
        for value in ends:
            build(space.fixed | context | {p.name: value}, p.name,
                  f"params.{p.name}.{'choices' if p.kind == 'categorical' else ('low' if value == p.low else 'high')}")
        seen[p.name] = ends


# -------------------------------------------------------------------------------------------- storage

def scrub(text: str, url: str | None) -> str:
    """`text` with the URL's password removed wherever it appears (exception messages may quote it)."""
    if not url or "://" not in url:
        return text
    from urllib.parse import unquote, urlsplit
    try:
        password = urlsplit(url).password
    except ValueError:
        return text
    if not password:
        return text
    for form in {password, unquote(password)}:
        text = text.replace(form, "***")
    return text


def resolve_storage_url(storage: str | None) -> str:
    """`env:NAME` reads the URL from an environment variable (keeps a password out of command lines and out
    of the params `mlflow run` records); a value without `://` is a journal file."""
    storage = storage or "optuna.journal"
    if storage.startswith("env:"):
        name = storage[4:]
        if not os.environ.get(name):
            raise SweepError(f"--storage {storage}: environment variable {name} is not set")
        storage = os.environ[name]
    return storage


class StaleTrialRetry:
    """Re-enqueue a trial whose worker stopped beating (Optuna's RetryHeartbeatStaleTrialCallback, keeping
    the reported epochs), and tell the sweep so it can mark the MLflow run."""

    def __init__(self, max_retry: int | None):
        import optuna
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry, inherit_intermediate_values=True)
        self.max_retry = max_retry
        self.listeners: list = []

    def __call__(self, study, trial) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.retry(study, trial)
        retried = self.max_retry is None or len(trial.system_attrs.get("retry_history", [])) < self.max_retry
        for listener in self.listeners:
            listener(trial, retried)


class RDBHeartbeat:
    """Optuna's own heartbeat on RDB storage (its table, the database's clock)."""

    def __init__(self, storage):
        self.storage = storage

    def beat(self, trial_id: int) -> None:
        self.storage.record_heartbeat(trial_id)

    def state(self, trial_id: int):
        return self.storage.get_trial(trial_id).state

    def fail_stale(self, study) -> None:
        import optuna
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)


class JournalHeartbeat:
    """The same contract on journal storage (file or Redis), which has no heartbeat in Optuna: the worker
    writes the time into the trial's system attrs every interval; any worker that finds a RUNNING trial
    whose last beat (or start) is older than the grace period marks it FAIL and, if its write won (the
    journal applies the first finish only), runs the retry callback. Clocks of the workers are compared,
    so keep them in sync (NTP) and the grace period well above the interval."""

    def __init__(self, storage, grace_period: float, on_stale):
        self.storage, self.grace_period, self.on_stale = storage, grace_period, on_stale

    def beat(self, trial_id: int) -> None:
        self.storage.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())

    def state(self, trial_id: int):
        return self.storage.get_trial(trial_id).state

    def fail_stale(self, study) -> None:
        import optuna
        from optuna.trial import TrialState
        now = time.time()
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            last = t.system_attrs.get(HEARTBEAT_ATTR) or (t.datetime_start.timestamp() if t.datetime_start else now)
            if now - last <= self.grace_period:
                continue
            try:
                won = self.storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another worker failed it first and retries it
            if won:
                self.on_stale(study, self.storage.get_trial(t._trial_id))


class TrialLost(RuntimeError):
    """Another worker declared this trial stale (this worker paused longer than the grace period) and
    retries it in the same directory: stop without touching the study, the checkpoints or the MLflow run."""


class HeartbeatThread:
    """Beats now and then every `interval` seconds until the block ends (a daemon: dies with the worker).
    `lost` is set when the trial is no longer RUNNING, i.e. another worker has failed it as stale."""

    def __init__(self, heartbeat, trial_id: int, interval: float):
        self.heartbeat, self.trial_id, self.interval = heartbeat, trial_id, interval
        self.stop, self.lost = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"heartbeat-{trial_id}")

    def _run(self) -> None:
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState
        while not self.stop.wait(self.interval):
            try:
                self.heartbeat.beat(self.trial_id)
                running = self.heartbeat.state(self.trial_id) == TrialState.RUNNING
            except UpdateFinishedTrialError:  # journal storage refuses to write to a finished trial
                running = False
            except Exception as e:  # a storage hiccup must not kill training; a missed beat costs nothing yet
                print(f"rifle.sweep: heartbeat failed ({type(e).__name__}), retrying", file=sys.stderr, flush=True)
                continue
            if not running:
                self.lost.set()
                return

    def __enter__(self):
        from optuna.exceptions import UpdateFinishedTrialError
        try:
            self.heartbeat.beat(self.trial_id)
        except UpdateFinishedTrialError:
            self.lost.set()
            return self
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()


@dataclass
class StorageHandle:
    url: str
    shown: str            # redacted, for anything printed or logged
    kind: str             # journal-file, redis, rdb
    storage: Any          # what optuna.create_study takes
    heartbeat: Any
    retry: StaleTrialRetry


def open_storage(storage: str | None, heartbeat_interval: int, grace_period: int,
                 max_retry: int | None) -> StorageHandle:
    import optuna
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend, JournalRedisBackend
    url = resolve_storage_url(storage)
    shown = redact(url)
    retry = StaleTrialRetry(max_retry)
    try:
        if "://" not in url:
            path = os.path.abspath(url)
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            journal = JournalStorage(JournalFileBackend(path))
            return StorageHandle(url, path, "journal-file", journal,
                                 JournalHeartbeat(journal, grace_period, retry), retry)
        if url.startswith(("redis://", "rediss://")):
            journal = JournalStorage(JournalRedisBackend(url))
            return StorageHandle(url, shown, "redis", journal, JournalHeartbeat(journal, grace_period, retry), retry)
        if url.startswith("sqlite"):
            print("rifle.sweep: warning: SQLite is not safe for parallel workers; use a journal file (the default) "
                  "or PostgreSQL", file=sys.stderr)
        rdb_url = url
        if url.startswith("postgresql://"):
            try:
                import psycopg2  # noqa: F401  SQLAlchemy's default PostgreSQL driver
            except ImportError:
                rdb_url = "postgresql+psycopg://" + url[len("postgresql://"):]
        import sqlalchemy.exc
        for attempt in range(10):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    rdb = RDBStorage(rdb_url, engine_kwargs={"pool_pre_ping": True},
                                     heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                                     heartbeat_stale_trial_callback=retry)
                break
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
                # Workers started together on a fresh database race to create Optuna's tables; the
                # loser finds them made once the winner commits.
                if attempt == 9:
                    raise
                time.sleep(0.5 + attempt * 0.5)
        return StorageHandle(url, shown, "rdb", rdb, RDBHeartbeat(rdb), retry)
    except SweepError:
        raise
    except Exception as e:
        raise SweepError(f"cannot open the storage {shown}: {scrub(f'{type(e).__name__}: {e}', url)}") from None


# ---------------------------------------------------------------------------------------------- study

def make_sampler(kind: str, space: Space, seed: int):
    import optuna
    if kind == "grid":
        class Grid(optuna.samplers.GridSampler):
            def after_trial(self, *args, **kwargs):
                pass  # it calls study.stop(), which only works inside optimize(); the budget ends the study

        return Grid(space.grid(), seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(kind: str, startup_trials: int, warmup_epochs: int, epochs: int):
    import optuna
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_epochs)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, warmup_epochs), max_resource=max(epochs, 2))
    return optuna.pruners.NopPruner()


def open_study(handle: StorageHandle, name: str, space: Space, sampler, pruner, wait_s: float = 30.0):
    """Create the study, or join it; the creator records a uuid and the space, and joiners must match."""
    import optuna
    try:
        study = optuna.create_study(storage=handle.storage, study_name=name, direction="maximize",
                                    sampler=sampler, pruner=pruner)
        study.set_user_attr(STUDY_ATTR, {"uuid": uuid.uuid4().hex, "method": space.method,
                                         "space_file": space.path, "space": space.signature()})
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(storage=handle.storage, study_name=name, sampler=sampler, pruner=pruner)
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise SweepError(f"study {name!r} in {handle.shown} minimizes; a sweep maximizes validation accuracy")
    deadline = time.time() + wait_s
    while STUDY_ATTR not in study.user_attrs:  # the creator writes it right after creating the study
        if time.time() > deadline:
            raise SweepError(f"study {name!r} in {handle.shown} was not made by rifle.sweep (no {STUDY_ATTR} "
                             "attribute); choose another --study_name")
        time.sleep(0.5)
    mine, theirs = space.signature(), study.user_attrs[STUDY_ATTR]["space"]
    if mine != theirs:
        raise SweepError(f"study {name!r} was created with another search space: {_first_difference(theirs, mine)}; "
                         "use another --study_name or the same space and options")
    return study


def _first_difference(theirs: dict, mine: dict, prefix: str = "") -> str:
    for key in sorted(set(theirs) | set(mine)):
        a, b = theirs.get(key, "<absent>"), mine.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            if a != b:
                return _first_difference(a, b, f"{prefix}{key}.")
        elif a != b:
            return f"{prefix}{key} was {a!r}, now {b!r}"
    return "?"


def origin(trial) -> int:
    """The first trial of a retry chain (its output dir and MLflow run belong to the whole chain)."""
    return int(trial.system_attrs.get(RETRY_ORIGIN_ATTR, trial.number))


def budget_slots(trials, below: int | None = None) -> set[int]:
    """Budget slots used: one per retry chain, abandoned over-budget trials excluded; with `below`, only
    chains that started before trial number `below`."""
    return {origin(t) for t in trials if not t.system_attrs.get(OVER_BUDGET_ATTR)
            and (below is None or origin(t) < below)}


def over_budget(trials, number: int, n_trials: int) -> bool:
    """Whether new trial `number` (not a retry) came after the budget was used up: when two workers race
    for the last slot, the trial numbers (assigned atomically by the storage) decide who keeps it."""
    t = next(t for t in trials if t.number == number)
    return origin(t) == number and len(budget_slots(trials, below=number)) >= n_trials


def frozen(study, number: int):
    return next(t for t in study.get_trials(deepcopy=False) if t.number == number)


# --------------------------------------------------------------------------------------------- MLflow

def find_runs(client, tags: dict[str, str]) -> list:
    """Active runs carrying all `tags`, oldest first (the oldest is the one every worker agrees on)."""
    where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs, token = [], None
    ids = all_experiment_ids(client)
    while True:
        page = client.search_runs(ids, filter_string=where, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))


def claim_parent(client, identity: dict[str, str], role_key: str, experiment: str, run_name: str,
                 tags: dict[str, str]) -> str:
    """The one parent run for `identity` tags. Under `mlflow run` (MLFLOW_RUN_ID) that run claims the role;
    otherwise a run is created. If another worker's run already holds it (the oldest wins a race), the
    created run is deleted, or the `mlflow run` run becomes a worker run pointing to the parent."""
    query = identity | {role_key: "parent"}
    own = os.environ.get("MLFLOW_RUN_ID")
    found = find_runs(client, query)
    if not found:
        mine_tags = query | tags | {"mlflow.runName": run_name}
        if own:
            for k, v in mine_tags.items():
                client.set_tag(own, k, v)
            mine = own
        else:
            mine = client.create_run(experiment_id(client, experiment), run_name=run_name,
                                     tags=query | tags).info.run_id
        found = find_runs(client, query)
        winner = found[0].info.run_id
        if winner != mine and not own:
            client.delete_run(mine)
    winner = found[0].info.run_id
    if own and own != winner:
        client.set_tag(own, role_key, "worker")
        client.set_tag(own, f"{role_key.rsplit('.', 1)[0]}.parent_run_id", winner)
    return winner


class SweepTracking:
    """The study's MLflow tree, written by the main process of each worker."""

    def __init__(self, uri: str, experiment: str, study, info: dict, handle: StorageHandle, args_params: dict):
        from mlflow.tracking import MlflowClient
        self.client = MlflowClient(uri)
        self.study_name, self.uuid = study.study_name, info["uuid"]
        ident = {"sweep.study_uuid": self.uuid}
        self.parent = claim_parent(self.client, ident, "sweep.role", experiment, study.study_name,
                                   {"sweep.study": study.study_name, "sweep.storage": handle.shown,
                                    "sweep.method": info["method"]})
        parent = self.client.get_run(self.parent)
        self.experiment_id = parent.info.experiment_id
        self.experiment_name = self.client.get_experiment(self.experiment_id).name
        have = parent.data.params
        new = {k: str(v) for k, v in args_params.items() if k not in have}
        if new:
            from mlflow.entities import Param as MlflowParam
            from mlflow.exceptions import MlflowException
            try:
                self.client.log_batch(self.parent, params=[MlflowParam(k, v) for k, v in new.items()])
            except MlflowException:
                pass  # a worker starting at the same moment logged them (params are write-once)
        self.client.set_tag(self.parent, "sweep.storage", handle.shown)
        handle.retry.listeners.append(self.on_stale)

    def child(self, origin_number: int, trial_number: int) -> str:
        """The trial's run: the one its first attempt made (a retry resumes it), else a new one."""
        if self.parent != os.environ.get("MLFLOW_RUN_ID") and \
                self.client.get_run(self.parent).info.status != "RUNNING":
            self.client.update_run(self.parent, status="RUNNING")  # a finished study was extended or resumed
        found = find_runs(self.client, {"sweep.study_uuid": self.uuid, "sweep.role": "trial",
                                        "sweep.trial": str(origin_number)})
        if found:
            run = found[0]
            numbers = run.data.tags.get("sweep.optuna_trials", "")
            self.client.set_tag(run.info.run_id, "sweep.optuna_trials", f"{numbers},{trial_number}".strip(","))
            self.client.set_tag(run.info.run_id, "sweep.state", "running")
            return run.info.run_id
        run = self.client.create_run(self.experiment_id, run_name=f"{self.study_name}-trial-{origin_number}", tags={
            "mlflow.parentRunId": self.parent, "sweep.role": "trial", "sweep.study_uuid": self.uuid,
            "sweep.study": self.study_name, "sweep.trial": str(origin_number),
            "sweep.optuna_trials": str(trial_number), "sweep.state": "running"})
        return run.info.run_id

    def trial_done(self, run_id: str, state: str, reason: str | None) -> None:
        status = {"complete": "FINISHED", "pruned": "KILLED", "failed": "FAILED", "interrupted": "KILLED"}[state]
        self.client.set_tag(run_id, "sweep.state", state)
        if reason:
            self.client.set_tag(run_id, "sweep.reason", reason[:4000])
        if self.client.get_run(run_id).info.status != status:
            self.client.set_terminated(run_id, status)

    def on_stale(self, trial, retried: bool) -> None:
        """A worker stopped beating: the run waits for its retry, or fails when retries are used up."""
        found = find_runs(self.client, {"sweep.study_uuid": self.uuid, "sweep.role": "trial",
                                        "sweep.trial": str(origin(trial))})
        for run in found:
            if retried:
                self.client.set_tag(run.info.run_id, "sweep.state", "retrying")
                self.client.set_tag(run.info.run_id, "sweep.reason", f"trial {trial.number}: its worker stopped "
                                    "sending heartbeats; retried from the last epoch checkpoint")
            else:
                self.trial_done(run.info.run_id, "failed", f"trial {trial.number}: its worker stopped sending "
                                "heartbeats and the retries are used up")

    def update_parent(self, study, n_trials: int) -> None:
        """Best trial (tags and a JSON artifact), best value over finished trials, Optuna's plots."""
        from optuna.trial import TrialState
        trials = study.get_trials(deepcopy=False)
        done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        complete = [t for t in done if t.state == TrialState.COMPLETE]
        c = self.client
        c.log_metric(self.parent, "trials_complete", len(complete), step=len(done))
        c.log_metric(self.parent, "trials_pruned", len(done) - len(complete), step=len(done))
        tags = {"sweep.n_trials": str(n_trials)}
        if complete:
            best = study.best_trial
            c.log_metric(self.parent, "best_value", best.value, step=len(done))
            tags |= {"sweep.best_trial": str(origin(best))} | {f"best.{k}": str(v) for k, v in best.params.items()}
            best_runs = find_runs(c, {"sweep.study_uuid": self.uuid, "sweep.role": "trial",
                                      "sweep.trial": str(origin(best))})
            if best_runs:
                tags["sweep.best_run_id"] = best_runs[0].info.run_id
        self._set_tags(tags)
        if complete:
            c.log_dict(self.parent, {"trial": origin(best), "value": best.value, "params": best.params},
                       "best_params.json")
            self._plots(study)

    def _set_tags(self, tags: dict) -> None:
        """The parent's summary tags, written by every worker: two workers inserting the same new tag at once
        make SQLite refuse one (UNIQUE constraint failed); retried, the row exists and is updated."""
        from mlflow.entities import RunTag
        from mlflow.exceptions import MlflowException
        batch = [RunTag(k, v) for k, v in tags.items()]
        try:
            self.client.log_batch(self.parent, tags=batch)
        except MlflowException:
            time.sleep(0.5)
            self.client.log_batch(self.parent, tags=batch)

    def _plots(self, study) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import optuna
        from optuna.visualization import matplotlib as ovm
        plots = {"optimization_history.png": ovm.plot_optimization_history,
                 "param_importances.png": ovm.plot_param_importances}
        for name, plot in plots.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    ax = plot(study)
                except (ValueError, RuntimeError, ZeroDivisionError) as e:
                    # importances need two complete trials with different values; say why it is missing
                    self.client.set_tag(self.parent, f"sweep.plot.{name}", f"not drawn: {e}"[:500])
                    continue
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            self.client.log_figure(self.parent, fig, name)
            plt.close(fig)
            self.client.set_tag(self.parent, f"sweep.plot.{name}", "drawn")
        del optuna

    def finish(self, complete: bool) -> None:
        self.client.set_tag(self.parent, "sweep.state", "complete" if complete else "running")
        if complete and self.parent != os.environ.get("MLFLOW_RUN_ID"):
            if self.client.get_run(self.parent).info.status != "FINISHED":
                self.client.set_terminated(self.parent, "FINISHED")


# ------------------------------------------------------------------------------------ trial reporting

class TrialReporter:
    """The trainer's per-epoch callback: report to the trial and decide pruning, fairly to RIFLE.

    Reported value: the best validation accuracy so far (monotone, so the dip after a re-initialization
    never shows). The pruner is consulted only at comparable epochs: before the trial's first head
    re-initialization, and at epochs that end with one (their validation pass precedes the reset), never
    during the recovery inside a later period, and never at the last epoch. Only the main process talks to
    the study; the decision is broadcast so that every process stops at the same epoch."""

    def __init__(self, trial, epochs: int, history: list[dict], pruner_name: str, num_processes: int = 1,
                 process_index: int = 0, lost=None):
        self.trial, self.epochs, self.pruner_name, self.lost = trial, epochs, pruner_name, lost
        self.num_processes, self.process_index = num_processes, process_index
        self.best, self.reinits = -math.inf, 0
        if trial is not None:
            reported = set(frozen(trial.study, trial.number).intermediate_values)
            for row in history:  # epochs the checkpoint holds (a kill can fall before their report)
                self.best = max(self.best, row["val_acc"])
                self.reinits += int(row.get("head_reinit", 0) == 1)
                if row["epoch"] not in reported:
                    trial.report(self.best, row["epoch"])

    def eligible(self, epoch: int, reinit_now: bool) -> bool:
        return epoch < self.epochs - 1 and (self.reinits == 0 or reinit_now)

    def decide(self, epoch: int, metrics: dict) -> str | None:
        self.best = max(self.best, float(metrics["val_acc"]))
        self.trial.report(self.best, epoch)
        reinit_now = metrics.get("head_reinit", 0) == 1
        check = self.eligible(epoch, reinit_now)
        self.reinits += int(reinit_now)
        if not (check and self.trial.should_prune()):
            return None
        others = [t.intermediate_values[epoch] for t in self.trial.study.get_trials(deepcopy=False)
                  if t.number != self.trial.number and epoch in t.intermediate_values]
        context = f"; other trials at that epoch: median {_median(others):.4f} of {len(others)}" if others else ""
        return (f"pruned at epoch {epoch} by the {self.pruner_name} pruner: best val_acc so far "
                f"{self.best:.4f}{context}")

    def __call__(self, epoch: int, metrics: dict) -> None:
        import optuna
        decision = None
        if self.trial is not None:
            lost = f"trial {self.trial.number} was retried by another worker (no heartbeat within the grace period)"
            if self.lost is not None and self.lost():
                decision = ("lost", lost)
            else:
                try:
                    reason = self.decide(epoch, metrics)
                    decision = ("pruned", reason) if reason else None
                except optuna.exceptions.UpdateFinishedTrialError:
                    decision = ("lost", lost)
        if self.num_processes > 1:
            from accelerate.utils import broadcast_object_list
            decision = broadcast_object_list([decision], from_process=0)[0]
        if decision:
            kind, reason = decision
            print(f"rifle.sweep: [process {self.process_index}] {reason}", flush=True)
            raise optuna.TrialPruned(reason) if kind == "pruned" else TrialLost(reason)


def _median(values: list[float]) -> float:
    s = sorted(values)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def resume_point(output_dir: Path) -> tuple[int, list[dict]]:
    """(next epoch, history) of the newest checkpoint in output_dir, or (0, [])."""
    from .checkpoint import latest
    last = latest(output_dir)
    if last is None:
        return 0, []
    state = json.loads((last / "state.json").read_text())
    return int(state["epoch"]), list(state["history"])


# --------------------------------------------------------------------------------------------- worker

def distributed_state():
    """Accelerate's process state, made the way the trainer's Accelerator will be (CPU processes need
    cpu=True for gloo); the state is a process-wide singleton, so the trainer then reuses it."""
    import torch
    from accelerate import PartialState
    cpu_ddp = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return PartialState(cpu=cpu_ddp)


def broadcast(obj, state):
    if state.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list
    return broadcast_object_list([obj], from_process=0)[0]


@dataclass
class Options:
    space: str
    n_trials: int
    storage: str
    study_name: str
    sampler: str
    pruner: str
    seed: int
    output_root: str
    heartbeat_interval: int
    grace_period: int
    max_retry: int | None
    pruner_startup_trials: int
    pruner_warmup_epochs: int
    overrides: dict                      # trainer options fixed from the command line
    tracking_uri: str | None = None
    experiment: str | None = None


class Controller:
    """Main process: the study, the budget, the MLflow tree; hands out trials."""

    def __init__(self, o: Options, space: Space):
        self.o, self.space = o, space
        self.handle = open_storage(o.storage, o.heartbeat_interval, o.grace_period, o.max_retry)
        has_password = redact(self.handle.url) != self.handle.url
        if os.environ.get("MLFLOW_RUN_ID") and not o.storage.startswith("env:") and has_password:
            print("rifle.sweep: warning: `mlflow run` records its -P parameters, so the run's 'storage' param holds "
                  "the password; pass -P storage=env:VAR (the URL in an environment variable) instead",
                  file=sys.stderr, flush=True)
        epochs = C.build(space.fixed | {"output_dir": "unused"}).optim.epochs
        self.pruner = make_pruner(o.pruner, o.pruner_startup_trials, o.pruner_warmup_epochs, epochs)
        self.study = open_study(self.handle, o.study_name, space, make_sampler(o.sampler, space, o.seed), self.pruner)
        self.n_trials = o.n_trials
        if o.sampler == "grid":
            size = math.prod(len(v) for v in space.grid().values())
            if size < o.n_trials:
                print(f"rifle.sweep: the grid has {size} points: n_trials {o.n_trials} -> {size}", flush=True)
                self.n_trials = size
        self.info = self.study.user_attrs[STUDY_ATTR]
        self.out_root = Path(o.output_root).resolve() / f"{o.study_name}-{self.info['uuid'][:8]}"
        self.uri = o.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
        experiment = o.experiment or "rifle"
        params = {"space": o.space, "method": space.method, "study_name": o.study_name, "storage": self.handle.shown,
                  "sampler": o.sampler, "pruner": o.pruner, "seed": o.seed,
                  "searched": ",".join(space.params) or "none",
                  **{f"fixed.{k}": v for k, v in space.fixed.items() if k not in C.RUN_ONLY}}
        self.tracking = SweepTracking(self.uri, experiment, self.study, self.info, self.handle, params)
        self.poll = max(1.0, min(float(o.heartbeat_interval), 10.0))
        print(f"rifle.sweep: study {o.study_name!r} in {self.handle.shown}, {self.n_trials} trials in total, "
              f"MLflow parent run {self.tracking.parent} ({self.uri if '://' not in self.uri else redact(self.uri)})",
              flush=True)

    def next(self) -> dict:
        """{'kind': 'trial', ...} | {'kind': 'wait'} (after sleeping) | {'kind': 'stop'}."""
        from optuna.trial import TrialState
        self.handle.heartbeat.fail_stale(self.study)
        trials = self.study.get_trials(deepcopy=False)
        waiting = any(t.state == TrialState.WAITING for t in trials)
        running = any(t.state == TrialState.RUNNING for t in trials)
        if len(budget_slots(trials)) >= self.n_trials and not waiting:
            if not running:
                return {"kind": "stop"}
            time.sleep(self.poll)  # another worker's trial may still go stale and need a retry
            return {"kind": "wait"}
        trial = self.study.ask()
        self.handle.heartbeat.beat(trial._trial_id)  # RDB never calls a trial without any beat stale
        if self.o.sampler == "tpe":
            # Reseeded from (seed, trial number): parallel workers never draw the same random start-up point,
            # and a one-worker study is reproducible. (The grid sampler gives trial n < grid size point n.)
            self.study.sampler = make_sampler("tpe", self.space, self.o.seed * 1_000_003 + trial.number)
        ft = frozen(self.study, trial.number)
        if over_budget(self.study.get_trials(deepcopy=False), trial.number, self.n_trials):
            # Another worker took the last slot a moment before us: give this trial back untrained.
            self.handle.storage.set_trial_system_attr(trial._trial_id, OVER_BUDGET_ATTR, True)
            self.study.tell(trial, state=TrialState.FAIL)
            return {"kind": "wait"}
        self.trial = trial
        values = self.space.suggest(trial)
        return {"kind": "trial", "number": trial.number, "origin": origin(ft), "values": values,
                "params": dict(trial.params)}

    def finish(self) -> None:
        from optuna.trial import TrialState
        trials = self.study.get_trials(deepcopy=False)
        complete = len(budget_slots(trials)) >= self.n_trials and not any(
            t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials)
        self.tracking.update_parent(self.study, self.n_trials)
        self.tracking.finish(complete)
        done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        line = f"rifle.sweep: study {self.o.study_name!r}: {len(done)} trials finished"
        if any(t.state == TrialState.COMPLETE for t in trials):
            best = self.study.best_trial
            params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.params.items())
            line += f"; best trial {best.number}: val_acc {best.value:.4f} ({params})"
        print(line + f"; MLflow parent run {self.tracking.parent}", flush=True)


def trial_values(msg: dict, shared: dict) -> dict:
    """The trial's options: the space's values, and a run directory that belongs to its retry chain."""
    values = dict(msg["values"])
    values.setdefault("log_weights", False)  # a weights file per trial is rarely wanted; compare logs them
    return values | {"output_dir": str(Path(shared["out"]) / f"trial-{msg['origin']}"), "tracking_uri": shared["uri"],
                     "experiment": shared["experiment"], "run_name": None}


def run_worker(o: Options) -> int:
    import optuna
    from optuna.trial import TrialState

    from .trainer import fit
    state = distributed_state()
    main = state.is_main_process
    space = load_space(o.space, o.overrides)
    if not main:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    ctl = Controller(o, space) if main else None
    shared = broadcast({"experiment": ctl.tracking.experiment_name, "uri": ctl.uri, "out": str(ctl.out_root)}
                       if main else None, state)
    while True:
        msg = broadcast(ctl.next() if main else None, state)
        if msg["kind"] == "stop":
            break
        if msg["kind"] == "wait":
            continue
        values = trial_values(msg, shared)
        out = Path(values["output_dir"])
        run_id = ctl.tracking.child(msg["origin"], msg["number"]) if main else None
        outcome, reason, result = "failed", None, None
        try:
            heartbeat = (HeartbeatThread(ctl.handle.heartbeat, ctl.trial._trial_id, o.heartbeat_interval)
                         if main else _Null())
            with heartbeat:
                cfg = C.build(values)
                start, history = resume_point(out)
                reporter = TrialReporter(ctl.trial if main else None, cfg.optim.epochs, history, o.pruner,
                                         state.num_processes, state.process_index,
                                         heartbeat.lost.is_set if main else None)
                if main:
                    ctl.trial.set_user_attr("output_dir", str(out))
                    ctl.trial.set_user_attr("mlflow_run_id", run_id)
                    if start:
                        ctl.trial.set_user_attr("resumed_from_epoch", start)
                        ctl.tracking.client.set_tag(run_id, "sweep.resumed_from_epoch", str(start))
                    print(f"rifle.sweep: trial {msg['number']} ({_fmt(msg['params'])})"
                          + (f", a retry of trial {msg['origin']} resuming at epoch {start}" if start else ""),
                          flush=True)
                result = fit(cfg, callbacks=[reporter], mlflow_run_id=run_id)
                outcome = "complete"
        except optuna.TrialPruned as e:
            outcome, reason = "pruned", str(e)
        except TrialLost as e:
            outcome, reason = "lost", str(e)
        except KeyboardInterrupt:
            if main:  # left RUNNING on purpose: its heartbeat stops, so a later worker retries it and resumes
                ctl.tracking.trial_done(run_id, "interrupted", "the worker was interrupted; the trial is retried "
                                        "by the next worker after the grace period")
            raise
        except Exception as e:
            reason = scrub(f"{type(e).__name__}: {e}", ctl.handle.url if main else None)
            print(f"rifle.sweep: [process {state.process_index}] trial {msg['number']} failed: {reason}",
                  file=sys.stderr, flush=True)
        if not main:
            continue
        try:
            if outcome == "complete":
                ctl.study.tell(ctl.trial, result["best_val_acc"])
            elif outcome != "lost":
                ctl.study.tell(ctl.trial, state=TrialState.PRUNED if outcome == "pruned" else TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            outcome, reason = "lost", f"trial {msg['number']} was retried by another worker before it ended"
        if outcome == "lost":  # its retry owns the directory and the MLflow run now
            print(f"rifle.sweep: {reason}; moving on", flush=True)
            continue
        ctl.tracking.trial_done(run_id, outcome, reason)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # only a running trial needs them
        ctl.tracking.update_parent(ctl.study, ctl.n_trials)
        summary = f"val_acc {result['best_val_acc']:.4f}" if result else reason
        print(f"rifle.sweep: trial {msg['number']} {outcome}: {summary}", flush=True)
    if main:
        ctl.finish()
    return 0


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _fmt(params: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


# ------------------------------------------------------------------------------------------------ CLI

# Options of the sweep itself; `seed` is the sampler's seed here (the training seed is fixed in the space).
OWN = ("space", "n_trials", "storage", "study_name", "sampler", "pruner", "seed", "output_root",
       "heartbeat_interval", "grace_period", "max_retry", "pruner_startup_trials", "pruner_warmup_epochs")


def trainer_options(p: argparse.ArgumentParser, skip: tuple = (),
                    what: str = "fixed for every trial; a searched option cannot be overridden") -> None:
    """Every trainer option as --name VALUE, fixed for every run (applied over the space's values)."""
    group = p.add_argument_group("trainer options", "any option of `python -m rifle.train --help` (except "
                                 f"output_dir and run_name, which {p.prog} sets), {what}")
    for name, (_, f) in C.all_fields().items():
        if name in MANAGED[:2] or name in skip:
            continue
        group.add_argument(f"--{name}", default=argparse.SUPPRESS, metavar="VALUE",
                           help=f.metadata["help"] if name in ("tracking_uri", "experiment") else argparse.SUPPRESS)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rifle.sweep", description="An Optuna study over one method's "
                                "search space; run the same command again, or several times, for more workers.")
    p.add_argument("--space", required=True, help="search-space YAML, e.g. sweeps/rifle.yaml")
    p.add_argument("--n_trials", required=True, help="trials of the study in total, across workers and restarts")
    p.add_argument("--storage", default="", help="journal file path (default optuna.journal), postgresql://..., "
                   "redis://..., or env:VAR to read the URL from an environment variable")
    p.add_argument("--study_name", default="", help="default: the space file's name, e.g. rifle")
    p.add_argument("--sampler", default="", help="tpe (default, seeded) or grid (small discrete spaces)")
    p.add_argument("--pruner", default="", help="median (default), hyperband or none")
    p.add_argument("--seed", default="", help="sampler seed (default 0), reseeded from (seed, n) at trial n. The "
                   "training seed is the space's `seed` option")
    p.add_argument("--output_root", default="", help="trial checkpoints go to <root>/<study>-<id>/trial-<n> "
                   "(default outputs/sweeps)")
    p.add_argument("--heartbeat_interval", default="", help="seconds between heartbeats (default 30)")
    p.add_argument("--grace_period", default="", help="seconds without a heartbeat before a trial is retried "
                   "(default 120)")
    p.add_argument("--max_retry", default="", help="retries of a trial whose worker died (default 3)")
    p.add_argument("--pruner_startup_trials", default="", help="median pruner: finished trials before it prunes "
                   "(default 5)")
    p.add_argument("--pruner_warmup_epochs", default="", help="no pruning before this epoch (default 2)")
    trainer_options(p, skip=("seed",))
    return p


def _int(args: dict, name: str, default: int, minimum: int) -> int:
    raw = args.get(name, "")
    if raw in ("", None):
        return default
    try:
        value = int(str(raw))
    except ValueError:
        raise SweepError(f"--{name}: expected an integer, got {raw!r}") from None
    if value < minimum:
        raise SweepError(f"--{name}: must be >= {minimum}, got {value}")
    return value


def _choice(args: dict, name: str, choices: tuple) -> str:
    value = args.get(name) or choices[0]
    if value not in choices:
        raise SweepError(f"--{name}: got {value!r}, allowed: {', '.join(choices)}")
    return value


def parse(argv: list[str] | None = None) -> Options:
    args = vars(parser().parse_args(argv))
    # Empty means "not given": MLproject passes every parameter, with empty defaults.
    overrides = {k: v for k, v in args.items() if k not in OWN and v != ""}
    tracking = {k: overrides.pop(k, None) for k in ("tracking_uri", "experiment")}
    heartbeat = _int(args, "heartbeat_interval", 30, 1)
    grace = _int(args, "grace_period", max(120, 2 * heartbeat), 1)
    if grace <= heartbeat:
        raise SweepError(f"--grace_period ({grace}) must exceed --heartbeat_interval ({heartbeat})")
    if args["n_trials"] in ("", None):
        raise SweepError("--n_trials: required (the study's total number of trials)")
    return Options(space=args["space"], n_trials=_int(args, "n_trials", 0, 1), storage=args["storage"] or "",
                   study_name=args["study_name"] or Path(args["space"]).stem,
                   sampler=_choice(args, "sampler", SAMPLERS), pruner=_choice(args, "pruner", PRUNERS),
                   seed=_int(args, "seed", 0, 0), output_root=args["output_root"] or "outputs/sweeps",
                   heartbeat_interval=heartbeat, grace_period=grace, max_retry=_int(args, "max_retry", 3, 0),
                   pruner_startup_trials=_int(args, "pruner_startup_trials", 5, 0),
                   pruner_warmup_epochs=_int(args, "pruner_warmup_epochs", 2, 0), overrides=overrides, **tracking)


def main(argv: list[str] | None = None) -> int:
    storage = None
    try:
        o = parse(argv)
        storage = o.storage
        load_space(o.space, o.overrides)  # fail in a second, before torch loads
        return run_worker(o)
    except (SpaceError, SweepError, C.ConfigError) as e:
        url = resolve_storage_url(storage) if storage and not storage.startswith("env:") else None
        print(f"rifle.sweep: error: {scrub(str(e), url)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rifle.sweep: interrupted; a running trial is retried from its checkpoint by the next worker "
              "once its grace period has passed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
