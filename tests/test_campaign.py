"""Campaigns: a plan's cells on Optuna's own queue, taken by parallel workers, retried after a killed or terminated
worker and resumed from their checkpoints, each trained exactly once; broken datasets refused before anything
trains, a group failing mid-campaign while the others finish and are reported; the status of a running campaign;
a worker with another plan refused in one line; the offline study and the regime grid as plans."""
import contextlib
import glob
import json
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
from rifle import plan as P
from rifle.workers.cells import KEY, CellPolicy, cell_trials
from rifle.workers.storage import MEMORY, StaleRetry, SweepError, open_storage, open_study
from rifle.workers.worker import OVER_BUDGET_ATTR, GiveBack

ROOT = Path(__file__).resolve().parents[1]
# Short enough that a killed worker's cell is retried within seconds.
FAST = ["--heartbeat_interval", "1", "--grace_period", "4"]
TINY = ["--image_size", "48", "--batch_size", "16", "--channels_last", "false"]


def campaign_cmd(tmp_path, storage, uri, *options, protocol="both", seeds=2, methods="plain,rifle", name="mini"):
    return [sys.executable, "-m", "rifle", "campaign", "--name", name, "--methods", methods, "--seeds", str(seeds),
            "--protocol", protocol, *(["--storage", str(storage)] if storage else []), "--tracking_uri", uri, *FAST,
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
    return [r for r in runs if r.data.tags.get("cell.role") == "seed"], \
        [r for r in runs if r.data.tags.get("cell.role") == "parent"]


def trials_of(storage, name):
    study = optuna.load_study(study_name=f"campaign:{name}", storage=open_storage(str(storage)))
    return study.get_trials()


def tiny_plan(**values) -> P.Plan:
    return P.load(None, methods="plain,rifle", seeds=2, protocol="validated", name="c",
                  overrides={"epochs": 2, "image_size": 48} | values)


# ----------------------------------------------------------------------------------- the queue

def test_cells_wait_in_the_queue_in_plan_order_and_retries_come_back_to_it():
    plan = tiny_plan()
    policy = CellPolicy(plan)
    storage = open_storage(MEMORY, heartbeat_interval=1, grace_period=2, max_retry=3)
    study = open_study(storage, "campaign:c", policy, policy.sampler(), policy.pruner(), "memory")
    waiting = study.get_trials()
    assert [t.state for t in waiting] == [TrialState.WAITING] * 4  # every cell enqueued once, by the creator
    assert [t.user_attrs[KEY] for t in waiting] == ["c-digits-validated/plain/seed-0", "c-digits-validated/rifle/seed-0",
                                                     "c-digits-validated/plain/seed-1", "c-digits-validated/rifle/seed-1"]

    def take():
        trial = study.ask()
        policy.claim(study, trial)
        return trial, policy.cell(trial)

    policy.study = study
    t0, c0 = take()
    t1, c1 = take()
    assert (c0.key, c1.key) == (waiting[0].user_attrs[KEY], waiting[1].user_attrs[KEY])  # plan order
    study.tell(t0, 0.5)
    study.tell(t1, state=TrialState.FAIL)                      # its worker died ...
    StaleRetry(max_retry=3)(study, study.get_trials()[1])      # ... so the cell comes back as a waiting trial
    trials = study.get_trials()
    assert trials[-1].state == TrialState.WAITING and trials[-1].user_attrs[KEY] == c1.key
    a, b = take(), take()                                      # the two queued cells, in order
    assert (a[1].key, b[1].key) == (waiting[2].user_attrs[KEY], waiting[3].user_attrs[KEY])
    retry, cell = take()                                       # then the retry: the same cell
    assert cell.key == c1.key
    late = study.ask()                                         # the queue is dry: a fresh trial is given back
    with pytest.raises(GiveBack, match="none of the queue's cells"):
        policy.claim(study, late)
    late.set_user_attr(OVER_BUDGET_ATTR, "given back")
    for t in (a[0], b[0], retry):
        study.tell(t, 0.5)
    study.tell(late, state=TrialState.FAIL)
    done = cell_trials(study.get_trials())
    assert {t.user_attrs[KEY] for t in done if t.state == TrialState.COMPLETE} == {c.key for c in plan.cells()}
    assert late.number not in {t.number for t in done}          # a given-back trial counts for nothing
    policy.poll = 0.1
    assert not policy.work_left(study)                          # nothing waits or runs: a worker stops


def test_a_worker_with_another_plan_is_refused_in_one_line_naming_each_option():
    storage = open_storage(MEMORY)
    first = CellPolicy(tiny_plan())
    open_study(storage, "campaign:c", first, first.sampler(), first.pruner(), "memory")
    other = CellPolicy(tiny_plan(epochs=4, lr=0.02))
    with pytest.raises(SweepError) as e:
        open_study(storage, "campaign:c", other, other.sampler(), other.pruner(), "memory")
    line = str(e.value)
    assert "\n" not in line and "epochs 4 here, 2 in the campaign" in line and "lr 0.02 here, 0.01 in the campaign" \
        in line and line.endswith("start this worker with another --name for a new campaign")


def test_a_frozen_dataset_commit_is_adopted_by_a_joiner():
    """The first worker resolves a branch to the commit the Hub serves (once); a joiner whose own plan only says
    `main` takes that commit from the campaign, so every cell loads and logs the same data."""
    commit = "a" * 40
    stored = {"c-dtd-validated": {"plain": {"dataset_revision": commit}, "rifle": {"dataset_revision": commit}}}
    plan = P.load(None, datasets="dtd", methods="plain,rifle", seeds=1, protocol="validated", name="c",
                  overrides={"epochs": 2})
    plan.adopt_revisions(stored)
    assert {o["dataset_revision"] for o in plan.runs()["c-dtd-validated"].values()} == {commit}


def test_a_comparison_with_two_budgets_is_refused_in_one_line(tmp_path):
    t = time.time()
    proc = subprocess.run([sys.executable, "-m", "rifle", "campaign", "--methods", "plain,rifle", "--seeds", "1",
                           "--protocol", "authors", "--epochs", "5", "--reinit_times", "2", "--train_per_class", "5",
                           "--tracking_uri", f"sqlite:///{tmp_path}/m.db"], cwd=tmp_path, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and time.time() - t < 20, proc.stderr
    assert proc.stderr.startswith("rifle campaign: error: --epochs: campaign-digits-authors: plain trains with epochs=5 "
                                  "but rifle with 3: a paired comparison needs one budget for every method")
    assert "epochs=6" in proc.stderr and not (tmp_path / "m.db").exists()  # refused before anything opened the store


def test_plan_files_name_the_file_and_key(tmp_path, capsys):
    from rifle.commands import campaign
    bad = tmp_path / "bad.yaml"
    bad.write_text("fixed: {epochs: many}\n")
    assert campaign.main(["--config", str(bad)]) == 2
    assert f"{bad}: fixed.epochs: expected an integer" in capsys.readouterr().err
    bad.write_text("dataset: [cub200]\n")
    assert campaign.main(["--config", str(bad)]) == 2
    assert "dataset: unknown key" in capsys.readouterr().err
    assert campaign.main(["--methods", "plain,mixup"]) == 2
    assert "unknown trick 'mixup'" in capsys.readouterr().err
    bad.write_text("views: [forest]\n")
    assert campaign.main(["--config", str(bad)]) == 2
    assert "views: unknown view 'forest'" in capsys.readouterr().err


def test_the_study_and_the_regime_grid_are_plans():
    study = P.load(str(ROOT / "configs" / "campaign" / "offline_study.yaml"))
    assert list(study.runs()) == ["offline-study-digits-validated", "offline-study-digits-authors"]
    assert {"plain", "rifle", "head_lr_restart", "cyclic_lr"} <= set(study.methods) and len(study.seeds) == 5
    grid = P.load(str(ROOT / "configs" / "campaign" / "regime.yaml"))
    assert grid.views == ["regime"] and len(grid.runs()) == 4
    options = grid.runs()["regime-30pc-authors"]["rifle-K2-cyclic"]
    assert (options["train_per_class"], options["reinit_times"], options["head_lr_policy"]) == (30, 2, "cyclic")
    assert options["val_fraction"] == 0 and options["selection"] == "last"
    table1 = P.load(str(ROOT / "configs" / "campaign" / "table1.yaml"))
    assert table1.fixed["weights"] == "IMAGENET1K_V1" and len(table1.cells()) == 600 and len(table1.references) == 2
    redraw = P.load(None, seeds=3, overrides={"epochs": 2})
    redraw.redraw_subset = True
    assert sorted({c.options["split_seed"] for c in redraw.cells()}) == [0, 1, 2]  # each seed draws its subset


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
        cmd = campaign_cmd(tmp_path, storage, uri, "--datasets", f"imagefolder:{digits_folder}", "--train_per_class",
                           "0", "--epochs", "2")
        workers = [start(cmd, tmp_path) for _ in range(2)]
        outs = [w.communicate(timeout=900) for w in workers]
        for w, (out, err) in zip(workers, outs):
            assert w.returncode == 0, err[-3000:]
        assert sum(out.count(" complete: best_val_acc") for out, _ in outs) == 8
        assert sorted(out.count("summary: ") for out, _ in outs) == [0, 1]  # one worker wrote the reports
        trials = trials_of(storage, "mini")
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(done) == 8 and len({t.user_attrs[KEY] for t in done}) == 8
    assert all(t.user_attrs.get(OVER_BUDGET_ATTR) for t in trials if t not in done)  # given back untrained
    seeds, parents = children(uri)
    assert sorted(r.data.tags["cell.group"] for r in parents) == [f"mini-{digits_folder.name}-authors", f"mini-{digits_folder.name}-validated"]
    assert len(seeds) == 8 and len({(r.data.tags["cell.group"], r.data.tags["cell.method"], r.data.tags["cell.seed"])
                                     for r in seeds}) == 8
    client, _ = mlflow_runs(uri)
    for r in seeds:
        assert r.info.status == "FINISHED" and r.data.tags["campaign.state"] == "complete"
        assert sorted(m.step for m in client.get_metric_history(r.info.run_id, "train_loss")) == [0, 1]
        assert r.data.tags["env.threads"] == "1" and r.data.params["epochs_trained"] == "2"
    assert all(p.info.status == "FINISHED" and p.data.metrics["cells_complete"] == 4 for p in parents)
    by_id = {r.info.run_id: r.data.metrics for r in seeds}
    for t in done:  # a cell's value is its best validation accuracy, or its last training accuracy: never test
        metrics = by_id[t.user_attrs["mlflow_run_id"]]
        assert t.value == metrics.get("best_val_acc", metrics["train_acc"])
    if kind != "journal":
        return
    one = tmp_path / "one"
    one.mkdir()
    alone = subprocess.run(campaign_cmd(one, "", f"sqlite:///{one}/mlflow.db", "--datasets",
                                        f"imagefolder:{digits_folder}", "--train_per_class", "0", "--epochs", "2"),
                           cwd=one, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=900)
    assert alone.returncode == 0, alone.stderr[-3000:]
    for protocol in ("validated", "authors"):
        for name in ("results.md", "results.csv", "paired.csv"):
            parallel = (tmp_path / "report" / digits_folder.name / protocol / name).read_text()
            assert parallel == (one / "report" / digits_folder.name / protocol / name).read_text(), (protocol, name)


# ----------------------------------------------------------------------------- terminated, killed workers

def _wait_checkpoint(proc, out, epoch, folder):
    pattern = str(out / f"mini-{folder.name}-validated" / "plain" / "seed-0" / "checkpoints" / f"epoch-{epoch:04d}")
    wait_for(lambda: proc.poll() is not None or glob.glob(pattern), timeout=400, interval=0.02)
    assert proc.poll() is None, "the worker ended before it could be stopped: " + proc.stderr.read()[-3000:]


@pytest.mark.slow
def test_a_terminated_then_killed_worker_hands_its_cell_back_and_status_follows(tmp_path, digits_folder):
    """SIGTERM: exit 143, the cell back in the queue at once; SIGKILL: retried once its heartbeat is stale; each time
    it resumes from the last checkpoint, into the same MLflow run, every epoch logged once. Meanwhile --status
    reads the storage: the cell running, then its dead worker's heartbeat stale, then all complete."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    storage, out = tmp_path / "optuna.journal", tmp_path / "out"
    cmd = campaign_cmd(tmp_path, storage, uri, "--datasets", f"imagefolder:{digits_folder}", "--train_per_class", "0",
                       "--epochs", "40", protocol="validated", seeds=1, methods="plain")
    status = [*cmd, "--status", "--json"]

    def read_status():
        proc = subprocess.run(status, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout)

    first = start(cmd, tmp_path)
    _wait_checkpoint(first, out, 0, digits_folder)
    running = read_status()  # while a worker trains
    group = f"mini-{digits_folder.name}-validated"
    assert running["groups"][group] == {"complete": 0, "running": 1, "failed": 0, "pending": 0}
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 143, err[-3000:]
    assert [t.state for t in trials_of(storage, "mini")] == [TrialState.FAIL, TrialState.WAITING]

    saved = max(int(p.rsplit("-", 1)[1]) for p in glob.glob(str(out / "*" / "plain" / "seed-0" / "checkpoints" /
                                                              "epoch-*")))
    second = start(cmd, tmp_path)
    _wait_checkpoint(second, out, saved + 2, digits_folder)
    os.killpg(second.pid, signal.SIGKILL)
    second.wait()
    assert wait_for(lambda: read_status()["stale"], timeout=60, interval=1)  # its heartbeat goes stale
    third = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True,
                           text=True, timeout=600)
    assert third.returncode == 0, third.stderr[-3000:]
    resumed = int(third.stdout.split(" resuming at epoch ")[1].split()[0])
    assert resumed >= saved + 3  # the second worker's checkpoint existed: not from scratch
    trials = trials_of(storage, "mini")
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE]
    (run,), (parent,) = children(uri)
    client, _ = mlflow_runs(uri)
    assert run.info.status == "FINISHED" and run.data.tags["campaign.optuna_trials"] == "0,1,2"
    assert run.data.tags["campaign.state"] == "complete" and "campaign.reason" not in run.data.tags
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_loss")) == list(range(40))
    assert parent.info.status == "FINISHED" and \
        (tmp_path / "report" / digits_folder.name / "validated" / "results.md").is_file()
    done = read_status()  # after it ends
    assert done["groups"][group]["complete"] == 1 and not done["stale"]
    assert done["images_per_second"] > 0 and done["hours_left"] == 0


# --------------------------------------------------------------------------------------- broken datasets

@pytest.mark.slow
def test_a_broken_dataset_stops_the_campaign_before_anything_trains(tmp_path, digits_folder):
    uri, storage = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "optuna.journal"
    (tmp_path / "one_class" / "train" / "a").mkdir(parents=True)
    cmd = campaign_cmd(tmp_path, storage, uri, "--datasets", f"imagefolder:{digits_folder},imagefolder:{tmp_path}/"
                       "one_class", "--epochs", "2", protocol="validated", seeds=1)
    proc = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("rifle campaign: error: dataset imagefolder:") and "one_class" in lines[0] and \
        "at least 2 classes" in lines[0] and len(lines) == 2
    assert not storage.exists() and not (tmp_path / "out").exists()  # no study, nothing trained


@pytest.mark.slow
def test_a_group_failing_mid_campaign_does_not_stop_the_others(tmp_path, digits_folder):
    """A dataset whose images only the run's scan finds broken fails its group once, mid-campaign; the other
    group finishes and is reported, and the summary names the failed one with its reason."""
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(digits_folder, broken)
    for png in list((broken / "train" / "0").glob("*.png"))[:2]:
        png.write_bytes(b"not a png")
    uri, storage = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "optuna.journal"
    cmd = campaign_cmd(tmp_path, storage, uri, "--datasets", f"imagefolder:{broken},imagefolder:{digits_folder}",
                       "--train_per_class", "0", "--epochs", "2", protocol="validated", seeds=2)
    proc = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 1, proc.stderr[-3000:]  # reports written, and a group failed
    assert proc.stderr.count("group mini-broken-validated failed: DataError") == 1  # once, not per cell
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert f"| method | imagefolder:{digits_folder.name} |" in summary
    assert "broken" not in summary.split("### Groups that did not")[0]
    assert "- mini-broken-validated: DataError: dataset imagefolder:" in summary and "cannot be used" in summary
    assert (tmp_path / "report" / digits_folder.name / "validated" / "results.md").is_file()
    seeds, _ = children(uri)
    assert len(seeds) == 5  # 4 cells of digits4, one of broken (the others skipped untrained)
    states = {t.user_attrs[KEY]: t.state for t in trials_of(storage, "mini") if KEY in t.user_attrs}
    assert sum(s == TrialState.FAIL for k, s in states.items() if "broken" in k) == 4


# --------------------------------------------------------------------------------------- rifle campaign

@pytest.mark.slow
def test_campaign_over_two_datasets_and_two_names_keeps_two_summaries(tmp_path, digits_folder):
    from rifle.commands import campaign
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
references:
  - source: a made-up port
    settings: 2 epochs
    values: {{digits: {{plain: 0.5}}}}
    protocol: validated
""")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    argv = ["--config", str(config), "--tracking_uri", uri, "--output_root", str(tmp_path / "out")]
    assert campaign.main(argv) == 0
    seeds, parents = children(uri)
    assert len(parents) == 2 and len(seeds) == 8
    assert {r.data.params["dataset"] for r in seeds} == {"digits", f"imagefolder:{digits_folder}"}
    report = tmp_path / "out" / "reports" / "mini"  # per campaign name by default
    summary = (report / "summary.md").read_text()
    assert f"| method | digits | imagefolder:{digits_folder.name} |" in summary and "| rifle − plain | " in summary
    assert "Environment: torch " in summary and "| plain | 50.0 |  | a made-up port (2 epochs) |" in summary
    for key in ("digits", digits_folder.name):
        assert (report / key / "validated" / "results.md").is_file()
    import pandas as pd
    table = pd.read_csv(report / "summary.csv")
    assert len(table) == 4 and set(table["protocol"]) == {"validated"} and (table["n"] == 2).all()
    assert campaign.main(argv) == 0  # complete: read back, reports written again, nothing trained
    assert len(children(uri)[0]) == 8
    assert campaign.main([*argv, "--name", "other", "--seeds", "1", "--datasets", "digits", "--train_per_class",
                          "3"]) == 0
    assert (tmp_path / "out" / "reports" / "other" / "summary.md").is_file() and (report / "summary.md").is_file()


def test_campaign_summary_gives_p_and_holm_per_dataset_and_across_datasets():
    """Two datasets x four methods x five seeds (validated) and one dataset (authors'): three comparisons per
    dataset; Holm per dataset, and over the protocol's six (dataset, comparison) tests, never across protocols."""
    import numpy as np
    import pandas as pd

    from rifle.evidence import stats
    from rifle.evidence.tables import _p, campaign_summary
    rng = np.random.default_rng(5)
    effect = {"plain": 0.0, "rifle": 0.02, "l2sp": 0.01, "rifle+l2sp": 0.012}
    frames = {}
    for protocol, datasets in (("validated", ("cub", "dtd")), ("authors", ("cub",))):
        rows = [{"dataset": d, "method": m, "seed": s, "test_acc": 0.7 + e + rng.normal(0, 0.01),
                 "selection": "best_val" if protocol == "validated" else "last"}
                for d in datasets for m, e in effect.items() for s in range(5)]
        frames[protocol] = pd.DataFrame(rows).assign(run_id=[f"{protocol}{i}" for i in range(len(rows))],
                                                     params=[{} for _ in rows])
    text, summary, tests = campaign_summary(frames, "rifle", failed={"x-dtd-authors": "DataError: no images"})
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
    for r in tests.itertuples():
        assert f"| {r.dataset} | {r.method} − {r.versus} | 5 | {_p(r.p_value)} | {_p(r.p_holm)} | " \
               f"{_p(r.p_holm_protocol)} | {_p(r.p_signflip)} | {100 * r.mde:.2f} |" in text
    assert "Holm-adjusted over the comparisons of its dataset (cub: 3, dtd: 3)" in text
    assert "Holm-adjusted over all 6 (dataset, comparison) tests of the validated protocol" in text
    assert "- x-dtd-authors: DataError: no images" in text


def test_groups_on_one_dataset_keep_their_own_columns_in_the_summary():
    """The regime grid's groups (10 and 30 images per class) are both digits: each is its own column, no mean pools
    the two groups' runs, and a group whose dataset is its own keeps the plain dataset name."""
    import pandas as pd

    from rifle.evidence.tables import by_group, campaign_summary

    def runs(dataset, acc):
        rows = [{"dataset": dataset, "method": m, "seed": s, "test_acc": acc + 0.01 * (m == "rifle") + 0.001 * s,
                 "selection": "best_val"} for m in ("plain", "rifle") for s in range(3)]
        return pd.DataFrame(rows).assign(run_id=[f"{dataset}{acc}{i}" for i in range(6)], params=[{}] * 6)

    merged = by_group({"10pc": runs("digits", 0.90), "30pc": runs("digits", 0.97), "x": runs("cub", 0.5)})
    assert list(dict.fromkeys(merged["dataset"])) == ["digits · 10pc", "digits · 30pc", "cub"]
    text, summary, _ = campaign_summary({"validated": merged}, "rifle")
    assert "| method | cub | digits · 10pc | digits · 30pc |" in text
    assert (summary["n"] == 3).all() and "settings differ" not in text
    plain = summary.set_index(["dataset", "method"])["mean"]
    assert plain["digits · 10pc", "plain"] == pytest.approx(0.901) and plain["digits · 30pc", "plain"] == pytest.approx(0.971)


@pytest.mark.slow
def test_under_accelerate_launch_every_process_trains_each_cell(tmp_path, digits_folder):
    """Two gloo processes of one worker: the main one takes the cells and tracks, both train each (one MLflow
    run per cell, tagged with 2 processes), as a sweep's multi-process trial."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "-m", "rifle", "campaign", "--name", "mini", "--methods", "plain",
           "--seeds", "2", "--protocol", "authors", "--storage", str(tmp_path / "optuna.journal"), "--tracking_uri",
           uri, "--output_root", str(tmp_path / "out"), "--report_dir", str(tmp_path / "report"), "--datasets",
           f"imagefolder:{digits_folder}", "--train_per_class", "0", "--epochs", "2", "--batch_size", "8",
           "--image_size", "48", "--channels_last", "false"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seeds, parents = children(uri)
    assert len(parents) == 1 and len(seeds) == 2 and {r.data.tags["num_processes"] for r in seeds} == {"2"}
    assert all(r.info.status == "FINISHED" for r in seeds) and proc.stdout.count("summary: ") == 1
