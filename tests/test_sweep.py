"""Optuna sweeps and the comparison: search spaces, storages and heartbeats, parallel and killed workers,
pruning fair to RIFLE, the MLflow tree (standalone and under `mlflow run`), two-process trials."""
import glob
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import ROOT, mlflow_runs, postgres_database, run_cli, subprocess_env
from helpers import outputs, text_of, tiny_space
from rifle.commands import sweep as S
from rifle.workers.runs import origin
from rifle.workers.storage import STUDY_ATTR, StaleRetry, open_storage, open_study, resolve_url
from rifle.workers.worker import OVER_BUDGET_ATTR, SweepPolicy, TrialLost, TrialReporter, budget_slots, over_budget

PASSWORD = "s3cret-pw"
# Short enough that a killed worker's trial is retried within seconds.
FAST = ["--heartbeat_interval", "1", "--grace_period", "4"]


def sweep_cmd(space, storage, study, out, *extra):
    return [sys.executable, "-m", "rifle", "sweep", "--space", str(space), "--storage", str(storage),
            "--study_name", study, "--output_root", str(out), *FAST, *map(str, extra)]


def worker_env(uri):
    # One thread each: two workers share 2 cores.
    return subprocess_env(MLFLOW_TRACKING_URI=uri, OMP_NUM_THREADS="1")


def init_mlflow(uri):
    """Create the MLflow tables once, before parallel workers open the store (their migrations would race)."""
    import mlflow
    mlflow.tracking.MlflowClient(uri).search_experiments()


@pytest.fixture
def pg_url():
    """A fresh PostgreSQL database; the URL carries a password (trust auth ignores it) to test redaction."""
    with postgres_database("rifle_sweep", PASSWORD) as url:
        yield url


def sweep_tree(uri, study_uuid):
    """(parents, children) of a study in the MLflow store."""
    client, runs = mlflow_runs(uri)
    mine = [r for r in runs if r.data.tags.get("sweep.study_uuid") == study_uuid]
    parents = [r for r in mine if r.data.tags.get("sweep.role") == "parent"]
    children = [r for r in mine if r.data.tags.get("sweep.role") == "trial"]
    return client, runs, parents, children


# ------------------------------------------------------------------------------------- search spaces

def test_every_shipped_space_is_valid():
    files = sorted(glob.glob(str(ROOT / "sweeps" / "*.yaml")))
    methods = {Path(f).stem: S.load_space(f).method for f in files if not f.endswith("base.yaml")}
    # The label comes from the fixed tricks (rifle.methods), whatever the file is called.
    assert methods["rifle_l2sp"] == "rifle+l2sp" and methods["rifle_delta"] == "rifle+delta"
    assert methods["plain"] == "plain" and {"rifle", "dropout", "dropconnect", "stochastic_depth", "disturb_label",
                                            "cyclic_lr", "l2", "l2sp", "delta"} <= set(methods.values())
    rifle = S.load_space(str(ROOT / "sweeps" / "rifle.yaml"))
    # from src/rifle/offline.yaml (via base.yaml), the study's own setting, and rifle.yaml
    from rifle.plan import BASE
    assert rifle.fixed["epochs"] == BASE["epochs"] == 30 and rifle.fixed["tricks"] == "rifle"
    assert S.load_space(str(ROOT / "sweeps" / "base.yaml")).fixed == BASE  # one base setting
    assert rifle.params["reset_head_momentum"].when == {"reinit_times": [2, 4]}
    # conditional: K=1 never suggests it, K=4 does
    study = optuna.create_study(direction="maximize")
    seen = {}
    for k in (1, 4):
        study.enqueue_trial({"reinit_times": k})
        trial = study.ask()
        seen[k] = rifle.suggest(trial)
    assert "reset_head_momentum" not in seen[1] and seen[4]["reset_head_momentum"] in (False, True)


BAD_SPACES = [
    ("params:\n  lrr: {type: float, low: 0.001, high: 0.1}\n", "params.lrr: unknown option"),
    ("fixed:\n  epoch: 3\n", "fixed.epoch: unknown option"),
    ("params:\n  lr: {type: float, low: 0.1, high: 0.001}\n", "params.lr: malformed range, low must be below high"),
    ("params:\n  lr: {type: float, low: 0, high: 0.1, log: true}\n", "params.lr: a log range needs low > 0"),
    ("params:\n  lr: {type: flaot, low: 0.001, high: 0.1}\n",
     "params.lr.type: expected one of float, int, categorical"),
    ("params:\n  lr: {type: float, lo: 0.001, high: 0.1}\n", "params.lr.lo: unknown key"),
    ("params:\n  lr: {type: float, low: a, high: 0.1}\n", "params.lr.low: expected a number, got 'a'"),
    ("params:\n  reinit_times: {type: int, low: 1, high: 2.5}\n", "params.reinit_times.high: expected an integer"),
    ("params:\n  head_lr_policy: {type: categorical}\n", "params.head_lr_policy.choices: expected a non-empty list"),
    ("params:\n  lr: 0.01\n", "params.lr: expected a mapping"),
    ("fixed:\n  tricks: dropout\nparams:\n  dropout_p: {type: float, low: 0.1, high: 1.5}\n",
     "params.dropout_p.high: must be < 1"),
    ("fixed:\n  epochs: 2\nparams:\n  reinit_times: {type: int, low: 1, high: 3}\n",
     "params.reinit_times.2: 2 re-initializations need at least 3 epochs"),
    ("fixed:\n  epochs: 30\n  tricks: rifle\nparams:\n  reinit_times: {type: int, low: 1, high: 3}\n",
     "params.reinit_times: its values train different numbers of epochs (1: 30, 2: 30, 3: 28)"),
    ("fixed:\n  epochs: -1\n", "fixed.epochs: must be >= 1"),
    ("fixed:\n  output_dir: x\n", "fixed.output_dir: set by the sweep"),
    ("params:\n  reinit_guard_epochs: {type: int, low: 0, high: 4, when: {reinit_times: 2}}\n"
     "  reinit_times: {type: int, low: 1, high: 3}\n", "params.reinit_guard_epochs.when.reinit_times: must be a fixed"),
    ("extends: nowhere.yaml\n", "extends: file not found"),
    ("parms: {}\n", "parms: unknown key"),
    ("method: rifle_l2sp\n", "method: the method is named after fixed.tricks"),
    ("params:\n  tricks: {type: categorical, choices: [rifle, dropout]}\n", "params.tricks: a study tunes one method"),
]


@pytest.mark.parametrize("text,message", BAD_SPACES,
                         ids=[m.split(":")[0] + str(i) for i, (_, m) in enumerate(BAD_SPACES)])
def test_search_space_errors_name_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text("fixed:\n  epochs: 4\n" + text if not text.startswith(("fixed", "extends", "parms")) else text)
    with pytest.raises(S.SpaceError) as e:
        S.load_space(str(path))
    assert str(e.value).startswith(f"{path}: "), str(e.value)
    assert message in str(e.value), str(e.value)


@pytest.mark.slow
def test_command_line_errors_are_one_line_and_fast(tmp_path):
    space = tmp_path / "s.yaml"
    space.write_text("fixed:\n  tricks: rifle\nparams:\n  lr: {type: float, low: 0.001, high: 0.1, log: true}\n")
    t = time.time()
    proc = run_cli(["--space", space, "--n_trials", "2", "--lr", "0.05"], cwd=tmp_path, verb="sweep")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "--lr: searched in" in proc.stderr and "params.lr" in proc.stderr
    proc = run_cli(["--space", space, "--n_trials", "2", "--sampler", "grid"], cwd=tmp_path, verb="sweep")
    assert proc.returncode == 2 and "the grid sampler needs a step" in proc.stderr, proc.stderr
    assert time.time() - t < 60
    # A storage that cannot be opened: one line, exit 2, before MLflow and torch are even imported.
    code = ("import sys; from rifle.commands.sweep import main; rc = main(['--space', sys.argv[1], '--n_trials', '2', "
            "'--storage', 'postgresql://postgres@127.0.0.1:1/x']); print(rc, 'torch' in sys.modules, "
            "'mlflow' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code, str(space)], cwd=tmp_path, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["2", "False", "False"], proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and "cannot open the storage postgresql://postgres@127.0.0.1:1/x" in proc.stderr


def test_passwords_never_appear_in_errors(tmp_path, capsys):
    space = tmp_path / "s.yaml"
    space.write_text("fixed:\n  tricks: none\nparams:\n  lr: {type: float, low: 0.001, high: 0.1, log: true}\n")
    for url in (f"postgresql://postgres:{PASSWORD}@127.0.0.1:1/nowhere", f"redis://:{PASSWORD}@127.0.0.1:1/0"):
        assert S.main(["--space", str(space), "--n_trials", "1", "--storage", url]) == 2
        out, err = capsys.readouterr()
        assert "cannot open the storage" in err and ":***@127.0.0.1:1" in err, err
        assert PASSWORD not in out + err
    assert S.scrub(f"failed: password={PASSWORD}", f"postgresql://u:{PASSWORD}@h/db") == "failed: password=***"
    os.environ["RIFLE_TEST_STORAGE"] = "postgresql://u:pw@h/db"
    try:
        assert resolve_url("env:RIFLE_TEST_STORAGE") == "postgresql://u:pw@h/db"
    finally:
        del os.environ["RIFLE_TEST_STORAGE"]


# ----------------------------------------------------------------------------- pruning fair to RIFLE

# Validation accuracy per epoch, 8 epochs. RIFLE (K=1) trains exactly as plain fine-tuning until its
# re-initialization after epoch 3, dips while the new head learns, and ends best.
PLAIN = [[.50, .60, .66, .70, .74, .77, .79, .80], [.48, .58, .65, .69, .73, .76, .78, .79],
         [.52, .61, .67, .71, .75, .78, .80, .81]]
RIFLE = [.50, .60, .66, .70, .35, .62, .80, .86]
BAD = [.20, .22, .25, .26, .27, .28, .29, .30]


def play(study, curve, reinit_epoch=None, reporter_cls=TrialReporter):
    """Drive the sweep's per-epoch callback through a real trial and pruner; returns (state, last epoch)."""
    trial = study.ask()
    reporter = reporter_cls(trial, len(curve), [], "median")
    for epoch, val in enumerate(curve):
        try:
            reporter.on_epoch_end(epoch, {"val_acc": val, "head_reinit": float(epoch == reinit_epoch)})
        except optuna.TrialPruned:
            study.tell(trial, state=TrialState.PRUNED)
            return TrialState.PRUNED, epoch
    study.tell(trial, reporter.best)
    return TrialState.COMPLETE, len(curve) - 1


class EveryEpoch(TrialReporter):
    """Control: best-so-far reporting, but the pruner asked at every epoch."""

    def eligible(self, epoch, reinit_now):
        return epoch < self.epochs - 1


class RawEveryEpoch(TrialReporter):
    """Control: the naive way, raw validation accuracy at every epoch."""

    def decide(self, epoch, metrics):
        self.trial.report(metrics["val_acc"], epoch)
        return "pruned" if epoch < self.epochs - 1 and self.trial.should_prune() else None


@pytest.mark.parametrize("reporter_cls,survives",
                         [(TrialReporter, True), (EveryEpoch, False), (RawEveryEpoch, False)])
def test_rifle_survives_the_median_pruner(reporter_cls, survives):
    study = optuna.create_study(direction="maximize",
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1))
    for curve in PLAIN:
        assert play(study, curve, reporter_cls=reporter_cls) == (TrialState.COMPLETE, 7)
    state, epoch = play(study, RIFLE, reinit_epoch=3, reporter_cls=reporter_cls)
    if survives:
        assert state == TrialState.COMPLETE and study.best_value == max(RIFLE)  # RIFLE is the best trial
    else:
        assert (state, epoch) == (TrialState.PRUNED, 4)  # killed in the dip: what the rule prevents
    # the rule still prunes a trial that is simply worse, before or at the end of a period
    assert play(study, BAD, reporter_cls=reporter_cls)[0] == TrialState.PRUNED
    assert play(study, BAD, reinit_epoch=3, reporter_cls=reporter_cls) == (TrialState.PRUNED, 1)


# -------------------------------------------------------------------------------- storages, heartbeat

@pytest.fixture(params=["journal", "postgresql", "redis"])
def storage_url(request, tmp_path):
    if request.param == "journal":
        yield str(tmp_path / "optuna.journal")
    elif request.param == "redis":
        yield f"redis://:{PASSWORD}@127.0.0.1:6379/11"  # no password configured: redis accepts any
    else:
        yield request.getfixturevalue("pg_url")


def wait_for(condition, timeout: float, step: float = 0.2):
    """Poll `condition` until it is true (returns the seconds waited) or fail after `timeout` seconds."""
    start = time.time()
    while not condition():
        assert time.time() - start < timeout, f"not true within {timeout} s"
        time.sleep(step)
    return time.time() - start


@pytest.mark.slow
def test_a_trial_without_heartbeat_is_retried_once_with_its_params(tmp_path, digits_folder, storage_url):
    storage = open_storage(resolve_url(storage_url), heartbeat_interval=1, grace_period=2, max_retry=3)
    space = S.load_space(str(tiny_space(tmp_path, digits_folder)))
    name = f"stale-{uuid.uuid4().hex[:8]}"
    study = open_study(storage, name, SweepPolicy(space), optuna.samplers.TPESampler(seed=0),
                       optuna.pruners.NopPruner(), "x")
    assert optuna.storages.RetryHeartbeatStaleTrialCallback in type(
        study._storage.get_heartbeat_stale_trial_callback()).__mro__  # Optuna's retry, on every backend
    trial = study.ask()
    params = space.suggest(trial)
    for _ in range(4):  # 3 s, longer than the grace period, but beating
        study._storage.record_heartbeat(trial._trial_id)
        optuna.storages.fail_stale_trials(study)
        assert study.trials[0].state == TrialState.RUNNING
        time.sleep(1)
    # silent: a killed worker. Optuna's own check fails it after the grace period, on journal storage too.
    assert wait_for(lambda: optuna.storages.fail_stale_trials(study) or study.trials[0].state == TrialState.FAIL,
                    20) >= 0
    optuna.storages.fail_stale_trials(study)  # a second look (another worker) must not retry it twice
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert trials[1].params["lr"] == params["lr"] and origin(trials[1]) == 0
    retry = study.ask()
    assert retry.number == 1 and retry.suggest_float("lr", 0.001, 0.05, log=True) == params["lr"]
    assert len(budget_slots(study.get_trials())) == 1  # the retry and its original are one trial
    # The first worker was only paused, not dead: its heartbeat does not fail, its next report stops it.
    study._storage.record_heartbeat(trial._trial_id)
    with pytest.raises(TrialLost):
        TrialReporter(trial, 2, [], "median").on_epoch_end(0, {"val_acc": 0.5, "head_reinit": 0.0})
    # another worker joining with a different space is refused
    other = S.load_space(str(tiny_space(tmp_path, digits_folder, epochs=4)))
    with pytest.raises(S.SweepError, match="created with another search space: fixed.epochs was 2, now 4"):
        open_study(storage, name, SweepPolicy(other), None, None, "x")


def test_budget_counts_retry_chains_once_and_breaks_races_by_trial_number():
    study = optuna.create_study(direction="maximize")
    retry = StaleRetry(max_retry=3)
    study.tell(study.ask(), 0.5)                                   # 0: complete
    t1 = study.ask()
    t1.suggest_float("lr", 0.001, 0.1)
    study.tell(t1, state=TrialState.FAIL)                          # 1: its worker died ...
    retry(study, study.trials[1])                               # 2: ... so it is retried (WAITING)
    assert origin(study.trials[2]) == 1 and len(budget_slots(study.get_trials())) == 2
    # Two workers both saw 2 of 3 slots used and asked at once: the lower number keeps the last slot.
    a, b = study.ask(), study.ask()                                # the retry is popped first
    c = study.ask()
    assert (a.number, b.number, c.number) == (2, 3, 4)
    trials = study.get_trials()
    assert not over_budget(trials, 2, 3)                         # a retry is never over budget
    assert not over_budget(trials, 3, 3) and over_budget(trials, 4, 3)
    c.set_user_attr(OVER_BUDGET_ATTR, "given back")             # what the worker marks (public API)
    study.tell(c, state=TrialState.FAIL)
    assert budget_slots(study.get_trials()) == {0, 1, 3}        # the given-back trial uses no slot


# --------------------------------------------------------------------------------- parallel workers

@pytest.mark.slow
@pytest.mark.parametrize("kind", ["postgresql", "journal"])
def test_two_parallel_workers_finish_exactly_n_trials(tmp_path, digits_folder, kind, request):
    storage = request.getfixturevalue("pg_url") if kind == "postgresql" else tmp_path / "optuna.journal"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    init_mlflow(uri)
    n = 3
    # RIFLE K=1 (re-init after epoch 1 of 4, or epoch 0 of 2 on PostgreSQL, to save time) with an eager pruner.
    space = tiny_space(tmp_path, digits_folder, epochs=4 if kind == "journal" else 2)
    pruner = "median" if kind == "journal" else "hyperband"
    cmd = sweep_cmd(space, storage, "par", tmp_path / "out", "--n_trials", n, "--pruner", pruner,
                    "--pruner_startup_trials", 1, "--pruner_warmup_epochs", 0)
    workers = [subprocess.Popen(cmd, cwd=tmp_path, env=worker_env(uri), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [w.communicate(timeout=600) for w in workers]
    for w, (out, err) in zip(workers, outs):
        assert w.returncode == 0, err[-3000:]
        assert PASSWORD not in out + err
    assert sum(out.count(" complete: ") + out.count(" pruned: ") for out, _ in outs) == n

    study = optuna.load_study(study_name="par", storage=open_storage(str(storage)))
    trials = study.get_trials()
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == n
    # Anything else can only be a trial given back untrained after losing the race for the last slot.
    assert all(t.user_attrs.get(OVER_BUDGET_ATTR) for t in trials if t not in finished)
    for t in finished:
        if t.state == TrialState.PRUNED:  # only before the first re-init or at a period's end (epochs 0, 1)
            assert max(t.intermediate_values) in (0, 1), t.intermediate_values
        steps = sorted(t.intermediate_values)
        values = [t.intermediate_values[s] for s in steps]
        assert values == sorted(values)  # best-so-far: never dips

    client, runs, parents, children = sweep_tree(uri, study.user_attrs[STUDY_ATTR]["uuid"])
    assert len(parents) == 1 and len(runs) == 1 + n  # nothing else in the store
    parent = parents[0]
    assert sorted(int(c.data.tags["sweep.trial"]) for c in children) == sorted(t.number for t in finished)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    for c in children:
        t = next(t for t in finished if t.number == int(c.data.tags["sweep.trial"]))
        want = {TrialState.COMPLETE: ("FINISHED", "complete"), TrialState.PRUNED: ("KILLED", "pruned")}[t.state]
        assert (c.info.status, c.data.tags["sweep.state"]) == want
        assert float(c.data.params["lr"]) == pytest.approx(t.params["lr"])
        if t.state == TrialState.PRUNED:
            assert c.data.tags["sweep.reason"].startswith(f"pruned at epoch {max(t.intermediate_values)}")
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep.state"] == "complete"
    if any(t.state == TrialState.COMPLETE for t in finished):
        assert float(parent.data.tags["best.lr"]) == pytest.approx(study.best_params["lr"])
        assert parent.data.metrics["best_value"] == pytest.approx(study.best_value)
        assert "optimization_history.png" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    counts = {"trials_complete": sum(t.state == TrialState.COMPLETE for t in finished),
              "trials_pruned": sum(t.state == TrialState.PRUNED for t in finished)}
    for key, count in counts.items():  # one point per finished trial, at a step that only grows
        steps = [m.step for m in client.get_metric_history(parent.info.run_id, key)]
        assert len(steps) == n and max(steps) == n, (key, steps)
        assert parent.data.metrics[key] == count  # the value MLflow shows is the storage's final count
    from mlflow.entities import ViewType  # no run left RUNNING, deleted ones (a lost parent race) included
    every = client.search_runs([parent.info.experiment_id], run_view_type=ViewType.ALL)
    assert all(r.info.status != "RUNNING" for r in every)
    texts = [str(v) for r in runs for v in (*r.data.params.values(), *r.data.tags.values())]
    assert not any(PASSWORD in v for v in texts)
    if kind == "postgresql":
        assert parent.data.params["storage"] == str(storage).replace(PASSWORD, "***")


# ------------------------------------------------------------------------------------ killed worker

@pytest.mark.slow
def test_killed_worker_trial_resumes_from_its_checkpoint(tmp_path, digits_folder):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    storage = tmp_path / "optuna.journal"
    out = tmp_path / "out"
    space = tiny_space(tmp_path, digits_folder, tricks="none", epochs=3)
    cmd = sweep_cmd(space, storage, "kill", out, "--n_trials", 1, "--pruner", "none")
    first = subprocess.Popen(cmd, cwd=tmp_path, env=worker_env(uri), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 400
    while time.time() < deadline and first.poll() is None:
        if glob.glob(str(out / "kill-*" / "trial-0" / "checkpoints" / "epoch-0001" / "state.json")):
            break
        time.sleep(0.05)
    assert first.poll() is None, "the worker ended before it could be killed: " + first.stderr.read()[-3000:]
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    killed_at = time.time() * 1000

    second = subprocess.run(cmd, cwd=tmp_path, env=worker_env(uri), capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "a retry of trial 0 resuming at epoch" in second.stdout

    study = optuna.load_study(study_name="kill", storage=open_storage(str(storage)))
    original, retry = study.get_trials()
    assert original.state == TrialState.FAIL and retry.state == TrialState.COMPLETE
    assert retry.system_attrs["failed_trial"] == 0 and retry.params == original.params
    resumed = retry.user_attrs["resumed_from_epoch"]
    assert resumed >= 2  # the checkpoint of epoch 1 existed: not from scratch

    client, runs, parents, children = sweep_tree(uri, study.user_attrs[STUDY_ATTR]["uuid"])
    assert len(parents) == 1 and len(children) == 1 and len(runs) == 2  # the retry reused the trial's run
    child = children[0]
    assert child.info.status == "FINISHED" and child.data.tags["sweep.optuna_trials"] == "0,1"
    # state and reason agree: the retry completed, so the stale attempt's reason is gone
    assert child.data.tags["sweep.state"] == "complete" and "sweep.reason" not in child.data.tags
    assert child.data.tags["sweep.resumed_from_epoch"] == str(resumed)
    history = client.get_metric_history(child.info.run_id, "val_acc")
    assert sorted(m.step for m in history) == [0, 1, 2]  # every epoch once
    # epoch 0 was logged by the killed worker (a checkpointed epoch it had not logged yet is logged once, later)
    assert 0 in {m.step for m in history if m.timestamp <= killed_at}
    assert "test_acc" in child.data.metrics
    assert not (Path(retry.user_attrs["output_dir"]) / "checkpoints").exists()  # cleaned after the trial


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_worker_enqueues_its_trial_at_once(tmp_path, digits_folder, signum, code):
    """Ctrl-C exits 130 and SIGTERM (a scheduler's preemption) 143, as a standalone run does; both hand the
    trial back at once."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    storage, out = tmp_path / "optuna.journal", tmp_path / "out"
    cmd = sweep_cmd(tiny_space(tmp_path, digits_folder, tricks="none", epochs=3), storage, "int", out,
                    "--n_trials", 1, "--pruner", "none")
    worker = subprocess.Popen(cmd, cwd=tmp_path, env=worker_env(uri), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    wait_for(lambda: worker.poll() is not None or glob.glob(str(out / "int-*" / "trial-0" / "checkpoints" / "epoch-0000")),
             400, step=0.05)
    worker.send_signal(signum)
    _, err = worker.communicate(timeout=120)
    assert worker.returncode == code, err[-3000:]
    study = optuna.load_study(study_name="int", storage=open_storage(str(storage)))
    first, retry = study.get_trials()  # retried at once, without waiting for the grace period
    assert first.state == TrialState.FAIL and retry.state == TrialState.WAITING and origin(retry) == 0
    (child,) = sweep_tree(uri, study.user_attrs[STUDY_ATTR]["uuid"])[3]
    assert child.info.status == "KILLED" and child.data.tags["sweep.state"] == "interrupted"
    assert glob.glob(str(out / "int-*" / "trial-0" / "checkpoints" / "epoch-*"))  # kept for the retry


# ------------------------------------------------------------------------------------------ mlflow run

@pytest.mark.slow
def test_mlflow_run_sweep_makes_its_run_the_parent(tmp_path, digits_folder):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    space = tiny_space(tmp_path, digits_folder, tricks="none", epochs=1,
                       lr="{type: categorical, choices: [0.01, 0.02]}")
    # a grid of 2 points: n_trials 3 is capped to 2
    cmd = [str(Path(sys.executable).with_name("mlflow")), "run", str(ROOT), "-e", "sweep", "--env-manager", "local",
           "-P", f"space={space}", "-P", "n_trials=3", "-P", "sampler=grid",
           "-P", f"storage={tmp_path / 'optuna.journal'}",
           "-P", "study_name=mr", "-P", "pruner=none", "-P", f"output_root={tmp_path / 'out'}"]
    env = subprocess_env(MLFLOW_TRACKING_URI=uri)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, runs = mlflow_runs(uri)
    (parent,) = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    assert "space" in parent.data.params and parent.data.params["n_trials"] == "3"  # `mlflow run` made this run
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 3 and len(children) == 2 and parent.info.status == "FINISHED"
    assert sorted(c.data.tags["sweep.trial"] for c in children) == ["0", "1"]
    assert sorted(c.data.params["lr"] for c in children) == ["0.01", "0.02"]  # each grid point once

    # The same command again: the study is complete, so its run only records that it joined as a worker.
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    client, runs = mlflow_runs(uri)
    assert len([r for r in runs if r.data.tags.get("sweep.role") == "parent"]) == 1
    (worker,) = [r for r in runs if r.data.tags.get("sweep.role") == "worker"]
    assert worker.data.tags["sweep.parent_run_id"] == parent.info.run_id
    assert len([r for r in runs if r.data.tags.get("sweep.role") == "trial"]) == 2


# ---------------------------------------------------------------------------------------- two processes

@pytest.mark.slow
def test_two_process_trials_are_pruned_on_both_processes(tmp_path, digits_folder):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    storage = str(tmp_path / "optuna.journal")
    # lr so small that nothing is learned: the epoch-0 accuracy is far below the reference trial's.
    space_path = tiny_space(tmp_path, digits_folder, epochs=4,
                            lr="{type: float, low: 1.0e-7, high: 1.0e-6, log: true}")
    space = S.load_space(str(space_path))
    study = open_study(open_storage(storage), "ddp", SweepPolicy(space), None, None, storage)
    study.add_trial(optuna.trial.create_trial(  # a finished trial at 100% from the first epoch
        params={"lr": 1e-6}, distributions={"lr": optuna.distributions.FloatDistribution(1e-7, 1e-6, log=True)},
        value=1.0, intermediate_values={e: 1.0 for e in range(4)}))
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "-m", "rifle", "sweep", "--space", str(space_path), "--storage", storage,
           "--study_name", "ddp", "--output_root", str(tmp_path / "out"), "--n_trials", "3", "--pruner", "median",
           "--pruner_startup_trials", "1", "--pruner_warmup_epochs", "0", "--tracking_uri", uri]
    proc = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):  # each process stopped at the same epoch, twice (two trials in one launch)
        assert proc.stdout.count(f"[process {rank}] pruned at epoch 0 by the median pruner") == 2, proc.stdout
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.PRUNED]
    client, runs, parents, children = sweep_tree(uri, study.user_attrs[STUDY_ATTR]["uuid"])
    assert len(parents) == 1 and len(children) == 2 and len(runs) == 3  # the second process logged nothing
    for c in children:
        assert c.info.status == "KILLED" and c.data.tags["sweep.state"] == "pruned"
        assert c.data.tags["num_processes"] == "2"
        assert [m.step for m in client.get_metric_history(c.info.run_id, "val_acc")] == [0]


# -------------------------------------------------------------------------------------------- compare

@pytest.mark.slow
def test_compare_retrains_best_params_with_paired_seeds(tmp_path, digits_folder):
    import mlflow

    from rifle.commands import compare
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # in this process, a new experiment would put its artifacts under the working directory
    mlflow.tracking.MlflowClient(uri).create_experiment("rifle", artifact_location=str(tmp_path / "artifacts"))
    storage = str(tmp_path / "optuna.journal")
    handle = open_storage(storage)
    for method, tricks in (("plain", "none"), ("dropout", "dropout")):  # two tuned studies (tuning is tested above)
        space = S.load_space(str(tiny_space(tmp_path, digits_folder, name=f"s-{method}", tricks=tricks)))
        study = open_study(handle, f"s-{method}", SweepPolicy(space), None, None, storage)
        dist = {"lr": optuna.distributions.FloatDistribution(0.001, 0.05, log=True)}
        for lr, value in ((0.002, 0.5), (0.01, 0.75)):
            study.add_trial(optuna.trial.create_trial(params={"lr": lr}, distributions=dist, value=value))
    argv = ["--studies", "s-plain,s-dropout", "--storage", storage, "--seeds", "3,4", "--name", "cmp",
            "--output_root", str(tmp_path / "cmp"), "--tracking_uri", uri, "--epochs", "1", "--log_weights", "false"]
    assert compare.main(argv) == 0
    client, runs = mlflow_runs(uri)
    (parent,) = [r for r in runs if r.data.tags.get("cell.role") == "parent"]
    seeds = [r for r in runs if r.data.tags.get("cell.role") == "seed"]
    assert len(seeds) == 4 and {r.data.tags["mlflow.parentRunId"] for r in seeds} == {parent.info.run_id}
    pairs = sorted((r.data.tags["cell.method"], r.data.params["seed"], r.data.params["lr"]) for r in seeds)
    assert pairs == [("dropout", "3", "0.01"), ("dropout", "4", "0.01"), ("plain", "3", "0.01"), ("plain", "4", "0.01")]
    assert {r.data.params["epochs"] for r in seeds} == {"1"}  # the override applies to every method
    assert all("test_acc" in r.data.metrics and r.info.status == "FINISHED" for r in seeds)
    accs = {m: {r.data.params["seed"]: r.data.metrics["test_acc"] for r in seeds if r.data.tags["cell.method"] == m}
            for m in ("plain", "dropout")}
    assert parent.data.metrics["test_acc_mean/dropout"] == pytest.approx(sum(accs["dropout"].values()) / 2)
    paired = [accs["plain"][s] - accs["dropout"][s] for s in ("3", "4")]  # reference (first study) − method
    assert parent.data.metrics["test_acc_paired_diff_mean/dropout"] == pytest.approx(sum(paired) / 2)
    assert "test_acc_std/plain" in parent.data.metrics
    table = client.download_artifacts(parent.info.run_id, "comparison.csv", str(tmp_path))
    assert len(Path(table).read_text().strip().splitlines()) == 5
    # The same command again trains nothing and makes no run.
    t = time.time()
    assert compare.main(argv) == 0
    assert len(mlflow_runs(uri)[1]) == len(runs) and time.time() - t < 60


# ---------------------------------------------------------------------------------------- the notebook

@pytest.mark.slow
def test_sweeps_notebook_runs(tmp_path):
    import math

    from rifle.evidence.notebook import execute_notebook

    journal = tmp_path / "optuna.journal"
    study = optuna.create_study(study_name="tiny", direction="maximize", storage=open_storage(str(journal)),
                                sampler=optuna.samplers.TPESampler(seed=0),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1))

    def objective(trial):  # a stand-in for training: a curve per trial, pruned when below the median
        lr, k = trial.suggest_float("lr", 1e-3, 1e-1, log=True), trial.suggest_int("reinit_times", 1, 3)
        for step in range(4):
            value = (1 - abs(math.log10(lr) + 2) / 2) * (step + 1) / 4 - 0.02 * k
            trial.report(value, step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return value

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(objective, n_trials=10)
    states = S.load_study(str(journal), "tiny").trials_dataframe()["state"].value_counts().to_dict()
    assert states.get("COMPLETE", 0) >= 2 and states.get("PRUNED", 0) >= 1, states
    (tmp_path / "notebooks").mkdir()  # opened in Jupyter from a folder below the journal: "" finds it
    nb = execute_notebook(ROOT / "notebooks" / "sweeps.ipynb", {"study_name": "tiny"}, cwd=tmp_path / "notebooks")
    text = text_of(nb)
    assert str(states) in text and "PRUNED" in text and "reinit_times" in text
    assert len(outputs(nb, "image/png")) == 3  # history, importance, intermediate values


def test_optuna_plots_leave_the_process_style_alone(tmp_path):
    """Optuna's matplotlib plots set a global style (ggplot); the sweep's parent-run plots keep it inside, so
    reports drawn later by the same process (a campaign worker) look the same as anyone's."""
    import matplotlib

    from rifle.workers.runs import SweepRuns
    study = optuna.create_study(direction="maximize")
    for x in (0.1, 0.2, 0.3):
        study.enqueue_trial({"lr": x})
        study.optimize(lambda t: t.suggest_float("lr", 0.0, 1.0), n_trials=1)
    before = dict(matplotlib.rcParams)

    class Tags:  # the parent run's tags and figures, without a store
        def set_tag(self, *args):
            pass

        def log_figure(self, *args):
            pass

    runs = SweepRuns.__new__(SweepRuns)
    runs.client, runs.parent = Tags(), "p"
    runs._plots(study)
    assert dict(matplotlib.rcParams) == before
