"""Optuna storages for sweeps: a journal file, Redis or an RDB, all with heartbeats and stale-trial retries.

Optuna's heartbeat (a thread beating while `study.optimize` runs a trial, stale trials failed before each
new one, `RetryHeartbeatStaleTrialCallback` re-enqueueing them) exists upstream for RDB storage only.
`HeartbeatJournalStorage` gives journal storage (file and Redis) the same contract, so `study.optimize`
drives every backend alike: the beat is a timestamp in the trial's system attrs, and the journal applies
only the first FAIL of a stale trial, so exactly one worker retries it. Workers compare their clocks:
keep them in sync (NTP) and the grace period well above the interval.
"""
from __future__ import annotations

import os
import sys
import time
import uuid
import warnings
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import optuna
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import (
    BaseHeartbeat,  # the documented extension point (see RDBStorage)
)
from optuna.storages.journal import BaseJournalBackend
from optuna.trial import TrialState

from .. import network
from ..network import redact

STUDY_ATTR = "rifle_sweep"          # study user attr: uuid, method, space signature
HEARTBEAT_ATTR = "rifle:heartbeat"  # trial system attr on journal storage (unix time of the last beat)
MEMORY = ":memory:"                 # a journal in this process only: one worker, nothing kept


class SweepError(RuntimeError):
    """A study cannot be run as asked (storage, study mismatch); the message is safe to print."""


def scrub(text: str, url: str | None) -> str:
    """`text` with the URL's password removed wherever it appears (driver messages may quote it)."""
    try:
        password = urlsplit(url).password if url and "://" in url else None
    except ValueError:
        return text
    for form in {password, unquote(password)} if password else ():
        text = text.replace(form, "***")
    return text


def resolve_url(storage: str | None) -> str:
    """`env:NAME` reads the URL from an environment variable (keeps a password out of command lines and out
    of the params `mlflow run` records); a value without `://` is a journal file; "" is optuna.journal."""
    storage = storage or "optuna.journal"
    if storage.startswith("env:"):
        if not os.environ.get(storage[4:]):
            raise SweepError(f"--storage {storage}: environment variable {storage[4:]} is not set")
        storage = os.environ[storage[4:]]
    return storage


class StaleRetry(RetryHeartbeatStaleTrialCallback):
    """Optuna's retry of a stale trial (keeping its reported epochs), then `on_retry(trial, retried)` so the
    sweep can mark the trial's MLflow run (set once the run tree exists)."""

    def __init__(self, max_retry: int | None):
        super().__init__(max_retry, inherit_intermediate_values=True)
        self.on_retry = None

    def __call__(self, study, trial) -> None:
        super().__call__(study, trial)
        if self.on_retry is not None:
            retried = self._max_retry is None or len(trial.system_attrs.get("retry_history", [])) < self._max_retry
            self.on_retry(trial, retried)


class MemoryJournal(BaseJournalBackend):
    """A journal kept in this process (`--storage :memory:`): the paired tools' default, one local worker."""

    def __init__(self):
        self.logs: list[dict] = []

    def read_logs(self, log_number_from: int) -> list[dict]:
        return self.logs[log_number_from:]

    def append_logs(self, logs: list[dict]) -> None:
        self.logs.extend(logs)


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """JournalStorage with Optuna's heartbeat contract (see the module docstring)."""

    def __init__(self, backend, heartbeat_interval: int, grace_period: int, callback):
        super().__init__(backend)
        self._beat, self._grace, self._callback = heartbeat_interval, grace_period, callback

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another worker retried it; the trial's next report finds out (workers.worker.TrialLost)

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        # Optuna's heartbeat protocol (fail_stale_trials calls it), as RDBStorage implements it: storages address
        # trials by id, which a FrozenTrial keeps in `_trial_id` (no public accessor exists).
        now = time.time()
        return [t._trial_id for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
                # a retry inherits its original's last beat: its own start counts too
                if now - max(t.system_attrs.get(HEARTBEAT_ATTR, 0), t.datetime_start.timestamp()) > self._grace]

    def get_heartbeat_interval(self) -> int:
        return self._beat

    def get_heartbeat_stale_trial_callback(self):
        return self._callback


def open_storage(url: str, heartbeat_interval: int = 30, grace_period: int = 120, max_retry: int | None = 3):
    """The Optuna storage of a resolved URL (see `resolve_url`), heartbeat and retries on; SweepError (one line,
    password removed) when it cannot be opened."""
    from optuna.storages.journal import JournalFileBackend, JournalRedisBackend
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # Redis backend, heartbeat
            retry = StaleRetry(max_retry)
            if url == MEMORY:
                return HeartbeatJournalStorage(MemoryJournal(), heartbeat_interval, grace_period, retry)
            if "://" not in url:
                Path(url).parent.mkdir(parents=True, exist_ok=True)
                return HeartbeatJournalStorage(JournalFileBackend(os.path.abspath(url)), heartbeat_interval,
                                               grace_period, retry)
            if url.startswith(("redis://", "rediss://")):
                return HeartbeatJournalStorage(JournalRedisBackend(_redis_deadline(url)), heartbeat_interval,
                                               grace_period, retry)
            if url.startswith("sqlite"):
                print("rifle.sweep: warning: SQLite is not safe for parallel workers; use a journal file (the "
                      "default) or PostgreSQL", file=sys.stderr)
            return _rdb(url, heartbeat_interval, grace_period, retry)
    except Exception as e:
        error = getattr(e, "orig", None) or e  # SQLAlchemy wraps the driver's error in several lines
        text = " ".join(f"{type(error).__name__}: {error}".split())
        raise SweepError(f"cannot open the storage {redact(url)}: {scrub(text, url)}") from None


def _redis_deadline(url: str) -> str:
    """The URL with redis-py's connect and socket timeouts (network.timeout()) unless it sets its own: without
    them an unreachable Redis blocks for the operating system's TCP timeout."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    for key in ("socket_connect_timeout", "socket_timeout"):
        query.setdefault(key, str(network.timeout()))
    return urlunsplit(parts._replace(query=urlencode(query)))


class HeartbeatRDBStorage(RDBStorage):
    """RDBStorage whose heartbeat is also a trial system attribute, as on the journal storages: a status view then
    reads every backend's heartbeat ages alike, through the public trial API."""

    def record_heartbeat(self, trial_id: int) -> None:
        super().record_heartbeat(trial_id)
        try:
            self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())
        except optuna.exceptions.UpdateFinishedTrialError:
            pass


def _rdb(url: str, heartbeat_interval: int, grace_period: int, retry) -> RDBStorage:
    import sqlalchemy.exc
    if url.startswith("postgresql://"):  # psycopg 3, installed with the project (SQLAlchemy's default is 2)
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    engine = {"pool_pre_ping": True}
    if url.startswith(("postgresql", "mysql")):  # libpq's and MySQL's connect deadline, seconds
        engine["connect_args"] = {"connect_timeout": network.timeout()}
    for attempt in range(10):
        try:
            return HeartbeatRDBStorage(url, engine_kwargs=engine, heartbeat_interval=heartbeat_interval,
                              grace_period=grace_period, heartbeat_stale_trial_callback=retry)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            # Workers started together on a fresh database race to create Optuna's tables; the loser finds
            # them made once the winner commits.
            if attempt == 9:
                raise
            time.sleep(0.5 + attempt * 0.5)


def load_study(storage: str = "", study_name: str = ""):
    """A study as `rifle sweep` wrote it, for notebooks: `storage` as its --storage (a journal file,
    redis://..., an RDB URL or env:NAME); "" is the nearest optuna.journal above the working directory."""
    from ..track.store import nearest
    if not storage:
        found = nearest("optuna.journal")
        if found is None:
            raise SweepError("no optuna.journal here or in a folder above: pass the sweep's --storage")
        storage = str(found)
    url = resolve_url(storage)
    if "://" not in url and not Path(url).is_file():
        raise SweepError(f"no journal file {url!r}")
    return optuna.load_study(study_name=study_name, storage=open_storage(url))


def open_study(storage, name: str, policy, sampler, pruner, shown: str, wait_s: float = 30.0):
    """Create the study, or join it. The creator records a uuid and the policy's signature (what defines the
    study's trials) and runs `policy.created(study)` (a campaign enqueues its cells); a joiner waits until the
    creator is done, then must match the signature (`policy.mismatch` says how it differs, in one line)."""
    try:
        study = optuna.create_study(storage=storage, study_name=name, direction="maximize", sampler=sampler,
                                    pruner=pruner)
        info = {"uuid": uuid.uuid4().hex, "space": policy.signature()} | policy.study_attrs()
        policy.created(study)
        study.set_user_attr(STUDY_ATTR, info)  # last: joiners wait for it
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(storage=storage, study_name=name, sampler=sampler, pruner=pruner)
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise SweepError(f"study {name!r} in {shown} minimizes; a sweep maximizes validation accuracy")
    deadline = time.time() + wait_s
    while STUDY_ATTR not in study.user_attrs:  # the creator writes it once the study is ready
        if time.time() > deadline:
            raise SweepError(f"study {name!r} in {shown} was not made by rifle (no {STUDY_ATTR} attribute); "
                             "choose another name")
        time.sleep(0.5)
    difference = policy.mismatch(study.user_attrs[STUDY_ATTR])
    if difference:
        raise SweepError(f"study {name!r} in {shown}: {difference}")
    return study


def first_difference(theirs: dict, mine: dict, prefix: str = "") -> str:
    key = min(k for k in set(theirs) | set(mine) if theirs.get(k, "<absent>") != mine.get(k, "<absent>"))
    a, b = theirs.get(key, "<absent>"), mine.get(key, "<absent>")
    if isinstance(a, dict) and isinstance(b, dict):
        return first_difference(a, b, f"{prefix}{key}.")
    return f"{prefix}{key} was {a!r}, now {b!r}"


def check_storage(url: str, study_name: str, policy=None) -> str:
    """What rifle preflight asks of a campaign's storage, leaving nothing behind: it opens within the network
    deadline, takes a study (a throwaway one, deleted again; a journal file made for it is removed), and holds
    no study `study_name` made for other trials than `policy`'s (rifle.workers.cells.CellPolicy: its mismatch
    names each option that differs). A line of what was found; SweepError (one line) otherwise."""
    fresh_file = "://" not in url and url != MEMORY and not Path(url).exists()
    storage = open_storage(url)
    probe = f"rifle-preflight-{uuid.uuid4().hex[:8]}"
    try:
        optuna.create_study(storage=storage, study_name=probe)
        optuna.delete_study(study_name=probe, storage=storage)
    except Exception as e:
        raise SweepError(f"the storage {redact(url)} cannot take a study ({scrub(f'{type(e).__name__}: {e}', url)})") \
            from None
    finally:
        if fresh_file:
            for leftover in (Path(url), Path(f"{url}.lock")):
                leftover.unlink(missing_ok=True)
    try:
        if fresh_file:
            raise KeyError(study_name)
        found = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return f"{redact(url)}: writable; no study {study_name!r} yet"
    info = found.user_attrs.get(STUDY_ATTR)
    difference = policy.mismatch(info) if policy is not None and info else None
    if difference:
        raise SweepError(f"the storage {redact(url)} holds a study {study_name!r}: {difference}")
    done = sum(t.state == TrialState.COMPLETE for t in found.get_trials(deepcopy=False))
    return f"{redact(url)}: writable; study {study_name!r} exists with the same cells ({done} trial(s) complete)"
