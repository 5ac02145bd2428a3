"""Campaigns: the paired tools' cells on shared Optuna storages, taken by parallel workers, retried after a
killed or terminated worker and resumed from their checkpoints, each trained exactly once; the report of a
parallel campaign equals one worker's; rifle.campaign over two datasets; one budget per comparison."""
import contextlib
import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import mlflow_runs, postgres_database, subprocess_env, wait_for
from rifle.workers.cells import Cell, CellSampler, CellSpace, complete_cells
from rifle.workers.storage import MEMORY, StaleRetry, open_storage
from rifle.workers.worker import OVER_BUDGET_ATTR, Budget, OverBudget, budget_slots

# Short enough that a killed worker's cell is retried within seconds.
FAST = ["--heartbeat_interval", "1", "--grace_period", "4"]
TINY = ["image_size=48", "batch_size=16", "channels_last=false"]


def study_cmd(tmp_path, storage, uri, *options, protocol="both", seeds=2, methods="plain,rifle"):
    return [sys.executable, "-m", "rifle.study", "--methods", methods, "--seeds", str(seeds), "--protocol", protocol,
            *(["--storage", str(storage)] if storage else []), "--tracking_uri", uri, *FAST,
            "--output_root", str(tmp_path / "out"), "--report_dir", str(tmp_path / "report"), *TINY, *options]


def start(cmd, cwd, uri=None):
    env = subprocess_env(OMP_NUM_THREADS="1", **({"MLFLOW_TRACKING_URI": uri} if uri else {}))
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def init_mlflow(uri):
    """Create the MLflow tables once, before parallel workers open the store (their migrations would race)."""
    import mlflow
    mlflow.tracking.MlflowClient(uri).search_experiments()


def children(uri):
    _, runs = mlflow_runs(uri)
    return [r for r in runs if r.data.tags.get("compare.role") == "seed"], \
        [r for r in runs if r.data.tags.get("compare.role") == "parent"]


def cell_trials(storage, name):
    study = optuna.load_study(study_name=name, storage=open_storage(str(storage)))
    return study.get_trials()


# ----------------------------------------------------------------------------------- the cells' order

def test_cells_go_in_plan_order_once_each_through_retries_and_races():
    cells = [Cell("g", m, s, {"tricks": t}) for s in (0, 1) for m, t in (("plain", ""), ("rifle", "rifle"))]
    storage = open_storage(MEMORY, heartbeat_interval=1, grace_period=2, max_retry=3)
    from rifle.workers.storage import open_study
    space = CellSpace("c", cells)
    study = open_study(storage, "c", space, CellSampler(), optuna.pruners.NopPruner(), "memory")
    budget = Budget(len(cells), poll=0.1)

    def take():
        trial = study.ask()
        budget.check(study, trial)
        return trial, space.suggest(trial)

    t0, c0 = take()
    t1, c1 = take()
    assert (c0.key, c1.key) == ("g/plain/seed-0", "g/rifle/seed-0")  # plan order: group, seed, method
    study.tell(t0, 0.5)
    study.tell(t1, state=TrialState.FAIL)                      # its worker died ...
    StaleRetry(max_retry=3)(study, study.trials[1])            # ... so the cell is retried (WAITING)
    t2, c2 = take()                                            # the retry is popped first: the same cell
    assert c2.key == "g/rifle/seed-0" and t2.number == 2
    a, b = study.ask(), study.ask()                            # two workers ask at the same moment
    budget.check(study, a)
    budget.check(study, b)
    assert space.suggest(a).key == "g/plain/seed-1" and space.suggest(b).key == "g/rifle/seed-1"
    late = study.ask()                                         # a third worker, after the last cell was taken
    with pytest.raises(OverBudget):
        budget.check(study, late)
    assert study._storage.get_trial(late._trial_id).system_attrs[OVER_BUDGET_ATTR]
    for t in (t2, a, b):
        study.tell(t, 0.5)
    study.tell(late, state=TrialState.FAIL)
    assert complete_cells(study.get_trials()) == {0, 1, 2, 3} and len(budget_slots(study.get_trials())) == 4
    assert not budget.work_left(study)                         # nothing left: a worker stops
    # A worker joining with another plan is refused.
    other = CellSpace("c", cells[:3] + [Cell("g", "rifle", 1, {"tricks": "rifle", "epochs": 9})])
    from rifle.sweep import SweepError
    with pytest.raises(SweepError, match="created with another search space: cells.g/rifle/seed-1 was"):
        open_study(storage, "c", other, CellSampler(), optuna.pruners.NopPruner(), "memory")


def test_a_comparison_with_two_budgets_is_refused_in_one_line(tmp_path, capsys):
    from rifle import study
    t = time.time()
    code = study.main(["--methods", "plain,rifle", "--seeds", "1", "--protocol", "authors", "epochs=5", "reinit_times=2",
                       "train_per_class=5", "image_size=48", "--tracking_uri", f"sqlite:///{tmp_path}/m.db"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and time.time() - t < 10
    assert err.startswith("rifle.study: error: --epochs: offline-study-authors: plain trains with epochs=5 but rifle "
                          "with 3: a paired comparison needs one budget for every method") and "epochs=6" in err
    assert not (tmp_path / "m.db").exists()  # refused before anything opened the store


# -------------------------------------------------------------------------------------- parallel workers

@pytest.mark.slow
@pytest.mark.parametrize("kind", ["journal", "postgresql"])
def test_two_parallel_workers_train_every_cell_once(tmp_path, digits_folder, kind):
    """2 methods x 2 seeds x 2 protocols: 8 cells, two workers, each cell once in the storage and in MLflow;
    the journal campaign's reports equal those of the same grid trained by one worker."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    init_mlflow(uri)
    journal = contextlib.nullcontext(tmp_path / "optuna.journal")
    with postgres_database("rifle_campaign") if kind == "postgresql" else journal as storage:
        cmd = study_cmd(tmp_path, storage, uri, f"dataset=imagefolder:{digits_folder}", "train_per_class=0", "epochs=2")
        workers = [start(cmd, tmp_path) for _ in range(2)]
        outs = [w.communicate(timeout=900) for w in workers]
        for w, (out, err) in zip(workers, outs):
            assert w.returncode == 0, err[-3000:]
        assert sum(out.count(" complete: test_acc") for out, _ in outs) == 8
        assert sorted(out.count("table and figures:") for out, _ in outs) == [0, 2]  # one worker wrote both reports
        trials = cell_trials(storage, "study:offline-study")
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(t.params["cell"] for t in done) == list(range(8))
    assert all(t.system_attrs.get(OVER_BUDGET_ATTR) for t in trials if t not in done)  # given back untrained
    seeds, parents = children(uri)
    assert sorted(r.data.tags["compare.name"] for r in parents) == ["offline-study-authors", "offline-study-validated"]
    assert len(seeds) == 8 and len({(r.data.tags["compare.name"], r.data.tags["compare.method"],
                                     r.data.tags["compare.seed"]) for r in seeds}) == 8
    client, _ = mlflow_runs(uri)
    for r in seeds:
        assert r.info.status == "FINISHED" and r.data.tags["campaign.state"] == "complete"
        assert sorted(m.step for m in client.get_metric_history(r.info.run_id, "train_loss")) == [0, 1]
        assert r.data.tags["env.threads"] == "1" and r.data.params["epochs_trained"] == "2"
    assert all(p.info.status == "FINISHED" and p.data.metrics["cells_complete"] == 4 for p in parents)
    if kind != "journal":
        return
    one = tmp_path / "one"
    one.mkdir()
    alone = subprocess.run(study_cmd(one, "", f"sqlite:///{one}/mlflow.db", f"dataset=imagefolder:{digits_folder}",
                                     "train_per_class=0", "epochs=2"), cwd=one, env=subprocess_env(OMP_NUM_THREADS="1"),
                           capture_output=True, text=True, timeout=900)
    assert alone.returncode == 0, alone.stderr[-3000:]
    for protocol in ("validated", "authors"):
        for name in ("results.md", "results.csv", "paired.csv"):
            parallel = (tmp_path / "report" / protocol / name).read_text()
            assert parallel == (one / "report" / protocol / name).read_text(), (protocol, name)


@pytest.mark.slow
def test_the_study_command_started_twice_makes_each_run_once(tmp_path):
    """The issue's command line, verbatim but for the stores: the built-in digits, two workers at once."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    init_mlflow(uri)
    cmd = [sys.executable, "-m", "rifle.study", "--storage", "optuna.journal", "--methods", "plain,rifle", "--seeds",
           "2", "--protocol", "validated", "epochs=4", "train_per_class=5", "image_size=48"]
    workers = [start(cmd, tmp_path, uri) for _ in range(2)]
    for w in workers:
        out, err = w.communicate(timeout=900)
        assert w.returncode == 0, err[-3000:]
    seeds, parents = children(uri)
    assert len(parents) == 1 and len(seeds) == 4 and all(r.info.status == "FINISHED" for r in seeds)
    assert sorted((r.data.tags["compare.method"], r.data.tags["compare.seed"]) for r in seeds) == [
        ("plain", "0"), ("plain", "1"), ("rifle", "0"), ("rifle", "1")]


# ----------------------------------------------------------------------------- terminated, killed workers

def _wait_checkpoint(proc, out, epoch):
    pattern = str(out / "offline-study-validated" / "plain" / "seed-0" / "checkpoints" / f"epoch-{epoch:04d}")
    wait_for(lambda: proc.poll() is not None or glob.glob(pattern), timeout=400, interval=0.02)
    assert proc.poll() is None, "the worker ended before it could be stopped: " + proc.stderr.read()[-3000:]


@pytest.mark.slow
def test_a_terminated_then_killed_worker_hands_its_cell_back(tmp_path, digits_folder):
    """SIGTERM: exit 143, the cell requeued at once; SIGKILL: retried once its heartbeat is stale; each time it
    resumes from the last checkpoint, into the same MLflow run, every epoch logged once."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    storage, out = tmp_path / "optuna.journal", tmp_path / "out"
    cmd = study_cmd(tmp_path, storage, uri, f"dataset=imagefolder:{digits_folder}", "train_per_class=0", "epochs=6",
                    protocol="validated", seeds=1, methods="plain")
    first = start(cmd, tmp_path)
    _wait_checkpoint(first, out, 0)
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 143, err[-3000:]
    assert [t.state for t in cell_trials(storage, "study:offline-study")] == [TrialState.FAIL, TrialState.WAITING]

    second = start(cmd, tmp_path)
    _wait_checkpoint(second, out, 2)
    os.killpg(second.pid, signal.SIGKILL)
    second.wait()
    third = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True,
                           text=True, timeout=600)
    assert third.returncode == 0, third.stderr[-3000:]
    resumed = int(third.stdout.split("a retry of trial 0 resuming at epoch ")[1].split()[0])
    assert resumed >= 3  # the checkpoint of epoch 2 existed: not from scratch
    trials = cell_trials(storage, "study:offline-study")
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE]
    assert {t.params["cell"] for t in trials} == {0}
    (run,), (parent,) = children(uri)
    client, _ = mlflow_runs(uri)
    assert run.info.status == "FINISHED" and run.data.tags["campaign.optuna_trials"] == "0,1,2"
    assert run.data.tags["campaign.state"] == "complete" and "campaign.reason" not in run.data.tags
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_loss")) == list(range(6))
    assert parent.info.status == "FINISHED" and (tmp_path / "report" / "validated" / "results.md").is_file()


# --------------------------------------------------------------------------------------- rifle.campaign

@pytest.mark.slow
def test_campaign_over_two_datasets_writes_the_summary_across_them(tmp_path, digits_folder):
    from rifle import campaign
    config = tmp_path / "c.yaml"
    config.write_text(f"""
name: mini
methods: [plain, rifle]
seeds: 2
protocol: validated
fixed: {{model: efficientnet_lite0, image_size: 48, batch_size: 16, epochs: 2, log_weights: false}}
datasets:
  digits: {{train_per_class: 3}}
  imagefolder:{digits_folder}: {{}}
""")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    argv = ["--config", str(config), "--tracking_uri", uri, "--output_root", str(tmp_path / "out"),
            "--report_dir", str(tmp_path / "report")]
    assert campaign.main(argv) == 0
    seeds, parents = children(uri)
    assert len(parents) == 2 and len(seeds) == 8
    assert {r.data.params["dataset"] for r in seeds} == {"digits", f"imagefolder:{digits_folder}"}
    from rifle.track.reads import dataset_label, slug
    label = dataset_label(f"imagefolder:{digits_folder}")
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert f"| method | digits | {label} |" in summary and "| rifle − plain | " in summary
    assert "Environment: torch " in summary
    for dataset in ("digits", slug(label)):
        assert (tmp_path / "report" / dataset / "validated" / "results.md").is_file()
    import pandas as pd
    table = pd.read_csv(tmp_path / "report" / "summary.csv")
    assert len(table) == 4 and set(table["protocol"]) == {"validated"} and (table["n"] == 2).all()
    assert campaign.main(argv) == 0  # complete: read back, reports written again, nothing trained
    assert len(children(uri)[0]) == 8


def test_campaign_summary_gives_p_and_holm_per_dataset_and_across_datasets():
    """Two datasets x four methods x five seeds (validated) and one dataset (authors'): three comparisons per
    dataset; Holm per dataset, and over the protocol's six (dataset, comparison) tests, never across protocols."""
    import numpy as np
    import pandas as pd

    from rifle import campaign
    from rifle.evidence import stats
    rng = np.random.default_rng(5)
    effect = {"plain": 0.0, "rifle": 0.02, "l2sp": 0.01, "rifle+l2sp": 0.012}
    frames = {}
    for protocol, datasets in (("validated", ("cub", "dtd")), ("authors", ("cub",))):
        rows = [{"dataset": d, "method": m, "seed": s, "test_acc": 0.7 + e + rng.normal(0, 0.01),
                 "selection": "best_val" if protocol == "validated" else "last"}
                for d in datasets for m, e in effect.items() for s in range(5)]
        frames[protocol] = pd.DataFrame(rows).assign(run_id=[f"{protocol}{i}" for i in range(len(rows))],
                                                     params=[{} for _ in rows])
    text, summary, tests = campaign.summary_tables(frames, "rifle")
    assert len(summary) == 12 and (summary["n"] == 5).all()
    validated = tests[tests["protocol"] == "validated"]
    assert len(validated) == 6 and len(tests) == 9
    pairs = {("rifle", "plain"), ("rifle", "l2sp"), ("rifle+l2sp", "l2sp")}
    assert set(zip(validated["method"], validated["versus"])) == pairs
    for dataset, g in validated.groupby("dataset"):  # the dataset's family: its three comparisons
        assert g["p_holm"].tolist() == pytest.approx(stats.holm(g["p_value"]))
    assert validated["p_holm_protocol"].tolist() == pytest.approx(stats.holm(validated["p_value"]))
    authors = tests[tests["protocol"] == "authors"]
    assert authors["p_holm_protocol"].tolist() == pytest.approx(authors["p_holm"].tolist())  # one dataset
    for r in validated.itertuples():
        a = frames["validated"].query("dataset == @r.dataset and method == @r.method")["test_acc"]
        b = frames["validated"].query("dataset == @r.dataset and method == @r.versus")["test_acc"]
        assert r.p_value == pytest.approx(stats.paired_difference(a, b)["p_value"])
        assert r.p_signflip == pytest.approx(stats.sign_flip_p(a.to_numpy() - b.to_numpy()))
    assert "| dataset | comparison | n | p (paired t) | p (Holm, dataset) | p (Holm, all datasets) | p (sign-flip) | " \
           "MDE (points) |" in text
    from rifle.evidence.tables import _p
    for r in tests.itertuples():
        assert f"| {r.dataset} | {r.method} − {r.versus} | 5 | {_p(r.p_value)} | {_p(r.p_holm)} | " \
               f"{_p(r.p_holm_protocol)} | {_p(r.p_signflip)} | {100 * r.mde:.2f} |" in text
    assert "Holm-adjusted over the comparisons of its dataset (cub: 3, dtd: 3)" in text
    assert "Holm-adjusted over all 6 (dataset, comparison) tests of the validated protocol" in text
    assert "over all 3 (dataset, comparison) tests of the authors protocol" in text


def test_campaign_config_errors_name_the_file_and_key(tmp_path, capsys):
    from rifle import campaign
    bad = tmp_path / "bad.yaml"
    bad.write_text("fixed: {epochs: many}\n")
    assert campaign.main(["--config", str(bad)]) == 2
    assert f"{bad}: fixed.epochs: expected an integer" in capsys.readouterr().err
    bad.write_text("dataset: [cub200]\n")
    assert campaign.main(["--config", str(bad)]) == 2
    assert "dataset: unknown key" in capsys.readouterr().err
    assert campaign.main(["--methods", "plain,mixup"]) == 2
    assert "unknown trick 'mixup'" in capsys.readouterr().err


@pytest.mark.slow
def test_under_accelerate_launch_every_process_trains_each_cell(tmp_path, digits_folder):
    """Two gloo processes of one worker: the main one takes the cells and tracks, both train each (one MLflow
    run per cell, tagged with 2 processes), as a sweep's multi-process trial."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "-m", "rifle.study", "--methods", "plain", "--seeds", "2", "--protocol",
           "authors", "--storage", str(tmp_path / "optuna.journal"), "--tracking_uri", uri, "--output_root",
           str(tmp_path / "out"), "--report_dir", str(tmp_path / "report"), f"dataset=imagefolder:{digits_folder}",
           "train_per_class=0", "epochs=2", "batch_size=8", "image_size=48", "channels_last=false"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seeds, parents = children(uri)
    assert len(parents) == 1 and len(seeds) == 2 and {r.data.tags["num_processes"] for r in seeds} == {"2"}
    assert all(r.info.status == "FINISHED" for r in seeds) and proc.stdout.count("table and figures:") == 1
