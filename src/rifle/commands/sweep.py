"""`rifle sweep --space sweeps/<method>.yaml --n_trials N`: an Optuna study over RIFLE or a baseline.

Start the same command several times, or on several machines sharing a journal file, PostgreSQL or Redis,
for parallel workers; under `accelerate launch` the main process owns each trial and every process trains
it. The objective is the trial's best validation accuracy, never test. `n_trials` counts the whole study's
trials; a trial whose worker died is retried from its last epoch checkpoint. Modules: `space` (search-space
files), `storage` (storages with heartbeats on every backend), `worker` (objective, pruning fair to RIFLE,
exact budget, multi-process trials), `runs` (the MLflow tree: a parent run, a child run per trial).
The sweep's own options are `Options`; every other `--name value` is a trainer option fixed for all trials.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path

from .. import config as C
from .. import network
from ..track import store
from ..track.signals import Terminated, raise_on_sigterm
from ..workers.space import SpaceError, load_space
from ..workers.storage import SweepError, load_study, open_storage, resolve_url, scrub
from .options import add_options, trainer_options

__all__ = ["SpaceError", "SweepError", "load_space", "load_study", "main"]


@dataclass
class Options:
    """The sweep's own options (every other `--name value` is a trainer option fixed for all trials)."""
    space: str = C.opt("", "search-space YAML, e.g. sweeps/rifle.yaml (required)")
    n_trials: int = C.opt(0, "trials of the study in total, across workers and restarts (required)", minimum=1)
    storage: str = C.opt("", "journal file path (default optuna.journal), postgresql://..., redis://..., or "
                         "env:VAR to read the URL from an environment variable")
    study_name: str = C.opt("", "default: the space file's name, e.g. rifle")
    sampler: str = C.opt("tpe", "tpe (seeded) or grid (small discrete spaces)", choices=("tpe", "grid"))
    pruner: str = C.opt("median", "pruning fair to RIFLE with Optuna's pruner", choices=("median", "hyperband", "none"))
    seed: int = C.opt(0, "sampler seed, reseeded from (seed, n) at trial n; the training seed is the space's "
                      "`seed` option", minimum=0)
    output_root: str = C.opt("outputs/sweeps", "trial checkpoints go to <root>/<study>-<id>/trial-<n>")
    heartbeat_interval: int = C.opt(30, "seconds between heartbeats", minimum=1)
    grace_period: int = C.opt(120, "seconds without a heartbeat before a trial is retried (> heartbeat_interval)",
                              minimum=1)
    max_retry: int = C.opt(3, "retries of a trial whose worker died", minimum=0)
    pruner_startup_trials: int = C.opt(5, "median pruner: finished trials before it prunes", minimum=0)
    pruner_warmup_epochs: int = C.opt(2, "no pruning before this epoch", minimum=0)
    tracking_uri: str = ""        # trainer options the sweep uses itself (see parse)
    experiment: str = ""
    overrides: dict | None = None


OWN = tuple(f.name for f in fields(Options) if f.metadata)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like every other error of the sweep
        self.exit(2, f"rifle sweep: error: {message}\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="rifle sweep", description="An Optuna study over one method's search space; run "
                "the same command again, or several times, for more workers.")
    add_options(p, [f for f in fields(Options) if f.metadata], empty_default=True)  # "": not given
    trainer_options(p, skip=("seed",), what="fixed for every trial; a searched option cannot be overridden")
    return p


def parse(argv: list[str] | None = None) -> Options:
    args = vars(parser().parse_args(argv))
    given = {k: v for k, v in args.items() if v != ""}
    o = Options(**{f.name: _value(f, given[f.name]) for f in fields(Options) if f.name in given and f.metadata})
    for name in ("space", "n_trials"):
        if name not in given:
            raise SweepError(f"--{name}: required")
    if o.grace_period <= o.heartbeat_interval:
        raise SweepError(f"--grace_period ({o.grace_period}) must exceed --heartbeat_interval ({o.heartbeat_interval})")
    o.overrides = {k: v for k, v in given.items() if k not in OWN}
    o.tracking_uri = store.tracking_uri(o.overrides.pop("tracking_uri", ""))
    o.experiment = store.experiment_name(o.overrides.pop("experiment", ""))
    o.study_name = o.study_name or Path(o.space).stem
    return o


def _value(f, raw: str):
    try:
        value = C.convert_field(Options, f, raw)  # the trainer's converter and bounds, for the sweep's options too
    except C.ConfigError as e:
        raise SweepError(str(e)) from None
    return value


def main(argv: list[str] | None = None) -> int:
    with raise_on_sigterm():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    url = None
    try:
        o = parse(argv)
        space = load_space(o.space, o.overrides)  # fails in a second, before torch loads
        network.apply(int(o.overrides.get("network_timeout", network.DEFAULT_TIMEOUT)))
        rank = int(os.environ.get("RANK", "0"))
        url = resolve_url(o.storage)
        # The main process opens the storage first: a wrong URL fails in a second, before MLflow and torch load.
        storage = open_storage(url, o.heartbeat_interval, o.grace_period, o.max_retry) if rank == 0 else None
        import optuna
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints its own line per trial
        from ..workers.worker import SweepPolicy, Worker, WorkerOptions, distributed_state, follow
        state = distributed_state()
        if rank != 0:
            follow(o.pruner, state)
            return 0
        worker_options = WorkerOptions("rifle sweep", o.study_name, o.storage, o.output_root, o.tracking_uri,
                                       o.experiment, o.heartbeat_interval, o.grace_period, o.max_retry)
        policy = SweepPolicy(space, o.sampler, o.pruner, o.seed, o.n_trials, o.pruner_startup_trials,
                             o.pruner_warmup_epochs, o.space)
        Worker(worker_options, policy, url, storage).run(state)
        return 0
    except (SpaceError, SweepError, C.ConfigError) as e:
        print(f"rifle sweep: error: {scrub(str(e), url)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C: 130; SIGTERM (a scheduler's preemption): 143
        print("rifle sweep: interrupted; the next worker resumes the trial from its last checkpoint",
              file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130


if __name__ == "__main__":
    sys.exit(main())
