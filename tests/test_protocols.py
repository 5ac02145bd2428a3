"""The two evaluation protocols (validated: best-validation checkpoint; authors': all of train, last epoch)
and 'RIFLE is always RIFLE': a configuration that makes fewer re-inits than it names is refused."""
import time

import pytest

from conftest import ROOT, TINY, mlflow_runs, run_cli
from helpers import data_config
from rifle import config as C
from rifle import plan as P
from rifle.commands import sweep as S
from rifle.data import load


def test_the_guard_only_validates():
    """Over E <= 40 epochs, 2-5 periods and guards 0-8: a configuration is refused exactly when its last
    re-initialization leaves fewer than N epochs of training, and an accepted one keeps the official schedule
    on the truncated epochs (the guard never drops or moves a re-init)."""
    for periods in range(2, 6):
        for epochs in range(periods, 41):
            trained = periods * (epochs // periods)  # the official truncation
            official = [e for e in range(trained) if (e + 1) % (trained // periods) == 0][:-1]
            for guard in range(9):
                values = {"tricks": "rifle", "epochs": epochs, "reinit_times": periods - 1, "reinit_guard_epochs": guard}
                if trained - 1 - official[-1] < guard:
                    with pytest.raises(C.ConfigError, match="reinit_guard_epochs"):
                        C.build(values)
                else:
                    cfg = C.build(values)
                    assert C.reinit_epochs(cfg) == official and cfg.optim.epochs == trained


@pytest.mark.parametrize("values,count", [({"tricks": "rifle", "epochs": 30, "reinit_times": 2}, 2),
                                          ({"tricks": "rifle", "epochs": 24, "reinit_times": 3,
                                            "reinit_guard_epochs": 6}, 3),
                                          ({"tricks": "dropout"}, 0)])
def test_reinit_count_is_known_at_config_time(values, count):
    assert C.reinit_count(C.build(values)) == count


@pytest.mark.slow
def test_a_rifle_run_without_all_its_reinits_is_refused(tmp_path):
    start = time.monotonic()
    proc = run_cli(["--epochs", "4", "--reinit_times", "3", "--reinit_guard_epochs", "8"], tmp_path)
    assert proc.returncode == 2 and time.monotonic() - start < 10
    assert proc.stderr.count("\n") == 1 and "--reinit_guard_epochs" in proc.stderr, proc.stderr
    # the shipped sweep setting that used to lose re-inits silently: 24 epochs, K=3, guard 8
    with pytest.raises(C.ConfigError, match=r"the last of the 3 re-initializations \(after epoch 17 of 0\.\.23\) leaves 6"):
        C.build({"epochs": 24, "reinit_times": 3, "reinit_guard_epochs": 8})


@pytest.mark.slow
def test_validation_free_runs_need_the_last_epoch_selection(tmp_path):
    start = time.monotonic()
    proc = run_cli(["--val_fraction", "0", "--selection", "best_val"], tmp_path)
    assert proc.returncode == 2 and time.monotonic() - start < 10
    assert proc.stderr.count("\n") == 1 and "--val_fraction" in proc.stderr and "--selection last" in proc.stderr
    with pytest.raises(C.ConfigError, match="val_fraction"):
        C.build({"val_fraction": 1})


def test_val_fraction_zero_keeps_all_of_train(digits_folder):
    validated = load(data_config(f"imagefolder:{digits_folder}", val_fraction=0.25), scan=False).data
    authors = load(data_config(f"imagefolder:{digits_folder}", val_fraction=0), scan=False).data
    assert list(authors) == ["train", "test"] and len(authors["train"]) == 32
    assert len(validated["train"]) + len(validated["val"]) == 32
    assert authors["test"]["label"] == validated["test"]["label"]


@pytest.mark.slow
def test_the_authors_protocol_end_to_end(tmp_path, digits_folder):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    proc = run_cli(["--dataset", f"imagefolder:{digits_folder}", *TINY[:6], "--val_fraction", "0", "--selection",
                    "last", "--tricks", "rifle", "--epochs", "4", "--tracking_uri", uri, "--output_dir",
                    tmp_path / "out"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "selection last" in proc.stdout
    client, runs = mlflow_runs(uri)
    run = runs[0]
    m, params = run.data.metrics, run.data.params
    assert m["test_acc"] == m["test_acc_last"] and m["selected_epoch"] == 3
    assert "val_acc" not in m and "best_val_acc" not in m
    assert params["selection"] == "last" and params["val_fraction"] == "0.0" and params["reinit_count"] == "1"
    assert run.data.tags["selected_before_reinit"] == "false"
    assert [a.path for a in client.list_artifacts(run.info.run_id, "weights")] == ["weights/last.safetensors"]


def test_best_val_runs_say_when_the_selected_checkpoint_precedes_the_first_reinit(tmp_path, digits_folder, capsys):
    from rifle.commands import train
    from rifle.trainer import fit
    argv = ["--dataset", f"imagefolder:{digits_folder}", "--image_size", "48", "--batch_size", "16", "--val_fraction",
            "0.25", "--tricks", "rifle", "--epochs", "2", "--lr", "1e-6", "--log_weights", "false",
            "--tracking_uri", f"sqlite:///{tmp_path}/mlflow.db", "--output_dir", str(tmp_path / "out")]
    cfg = train.parse(argv)
    result = fit(cfg)  # lr ~ 0: validation accuracy cannot improve after epoch 0, the re-init epoch
    assert result["selected_epoch"] == result["best_epoch"] == 0
    _, runs = mlflow_runs(cfg.run.tracking_uri)
    assert runs[0].data.tags["selected_before_reinit"] == "true"
    assert runs[0].data.tags["selected_before_last_reinit"] == "true"  # K = 1: the first is the last
    assert runs[0].data.params["selection"] == "best_val"
    assert train.main(argv) == 0  # finished: the command prints its result line, which says so
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"run {result['run_id']}: test_acc=") and "checkpoint of epoch 0, before its head " \
        "re-init (the first after epoch 0): plain fine-tuning's trajectory" in line


def test_result_line_and_tags_say_where_the_selected_checkpoint_lies():
    """K = 3 on 8 epochs re-initializes after epochs 1, 3, 5 (0-based): a checkpoint of epoch 1 precedes all of
    them, one of epoch 4 only the last, one of epoch 6 none; plain fine-tuning has no such tags nor words."""
    from rifle.trainer import reinit_tags, result_line
    rifle = C.build({"tricks": "rifle", "epochs": 8, "reinit_times": 3})
    assert C.reinit_epochs(rifle) == [1, 3, 5]
    result = {"run_id": "abc", "test_acc": 0.5, "test_acc_last": 0.25, "best_val_acc": 0.75, "epochs": 8}
    lines = {e: result_line(rifle, result | {"selected_epoch": e}) for e in (0, 1, 2, 4, 5, 6, 7)}
    assert lines[1] == ("run abc: test_acc=0.5000 (selection best_val: checkpoint of epoch 1, before all 3 head "
                        "re-inits (the first after epoch 1): plain fine-tuning's trajectory, best_val_acc=0.7500), "
                        "test_acc_last=0.2500, epochs=8")
    assert "before all 3 head re-inits" in lines[0]
    for e in (2, 4, 5):
        assert f"checkpoint of epoch {e}, before the last head re-init (after epoch 5), best_val_acc" in lines[e]
    for e in (6, 7):
        assert f"checkpoint of epoch {e}, best_val_acc" in lines[e] and "re-init" not in lines[e]
    assert {e: reinit_tags(rifle, e) for e in (1, 2, 5, 6)} == {
        1: {"selected_before_reinit": "true", "selected_before_last_reinit": "true"},
        2: {"selected_before_reinit": "false", "selected_before_last_reinit": "true"},
        5: {"selected_before_reinit": "false", "selected_before_last_reinit": "true"},
        6: {"selected_before_reinit": "false", "selected_before_last_reinit": "false"}}
    plain = C.build({"tricks": "", "epochs": 8, "val_fraction": 0, "selection": "last"})
    assert reinit_tags(plain, 2) == {}
    line = result_line(plain, {k: v for k, v in result.items() if k != "best_val_acc"} | {"selected_epoch": 7})
    assert line == "run abc: test_acc=0.5000 (selection last: checkpoint of epoch 7), test_acc_last=0.2500, epochs=8"


def test_a_sweep_trial_that_would_lose_a_reinit_fails_before_training(tmp_path, digits_folder):
    space = tmp_path / "guard.yaml"
    space.write_text(f"""
fixed:
  dataset: imagefolder:{digits_folder}
  image_size: 48
  val_fraction: 0.25
  epochs: 4
  tricks: rifle
params:
  reinit_times: {{type: categorical, choices: [3]}}
  reinit_guard_epochs: {{type: categorical, choices: [2]}}
""")
    storage = str(tmp_path / "optuna.journal")  # K=3 and guard 2 each pass alone, not together
    code = S.main(["--space", str(space), "--n_trials", "1", "--storage", storage, "--study_name", "guard",
                   "--sampler", "grid", "--output_root", str(tmp_path / "out"), "--tracking_uri",
                   f"sqlite:///{tmp_path}/mlflow.db"])
    assert code == 0
    import optuna
    from optuna.storages.journal import JournalFileBackend
    study = optuna.load_study(study_name="guard", storage=optuna.storages.JournalStorage(JournalFileBackend(storage)))
    assert [t.state.name for t in study.trials] == ["FAIL"]
    assert not list((tmp_path / "out").rglob("checkpoints"))  # nothing was trained
    _, runs = mlflow_runs(f"sqlite:///{tmp_path}/mlflow.db")
    reasons = [r.data.tags.get("sweep.reason", "") for r in runs]
    assert any("reinit_guard_epochs" in reason for reason in reasons), reasons


def test_a_sweep_needs_validation(tmp_path, digits_folder):
    space = tmp_path / "noval.yaml"
    space.write_text(f"fixed:\n  dataset: imagefolder:{digits_folder}\n  val_fraction: 0\n  selection: last\n")
    with pytest.raises(S.SpaceError, match="val_fraction: a study selects on validation"):
        S.load_space(str(space))


@pytest.mark.slow
def test_the_offline_study_plan_runs_both_protocols_and_resumes(tmp_path, digits_folder, capsys):
    from rifle.commands import campaign
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    argv = ["--config", str(ROOT / "configs" / "campaign" / "offline_study.yaml"), "--methods", "plain,rifle",
            "--seeds", "2", "--tracking_uri", uri, "--output_root", str(tmp_path / "out"), "--report_dir",
            str(tmp_path / "report"), "--datasets", f"imagefolder:{digits_folder}", "--train_per_class", "0",
            "--epochs", "2", "--batch_size", "16", "--channels_last", "false"]
    assert campaign.main(argv) == 0
    client, runs = mlflow_runs(uri)
    parents = {r.data.tags["cell.group"]: r for r in runs if r.data.tags.get("cell.role") == "parent"}
    key = digits_folder.name
    assert set(parents) == {f"offline-study-{key}-validated", f"offline-study-{key}-authors"}
    for protocol, selection in (("validated", "best_val"), ("authors", "last")):
        parent = parents[f"offline-study-{key}-{protocol}"]
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert len(children) == 4 and {r.data.params["selection"] for r in children} == {selection}
        assert all(r.info.status == "FINISHED" for r in children)
        assert (tmp_path / "report" / key / protocol / "results.md").exists()
    authors = [r for r in runs if r.data.params.get("val_fraction") == "0.0"]
    assert len(authors) == 4 and all(r.data.metrics["test_acc"] == r.data.metrics["test_acc_last"] for r in authors)
    capsys.readouterr()
    assert campaign.main(argv) == 0  # complete: nothing trained again, the reports written again
    assert " complete: " not in capsys.readouterr().out
    assert len(mlflow_runs(uri)[1]) == len(runs)


@pytest.mark.slow
def test_the_regime_plan_pairs_every_variant_with_plain(tmp_path, digits_folder, capsys):
    from rifle.commands import campaign
    plan = tmp_path / "regime.yaml"
    plan.write_text((ROOT / "configs" / "campaign" / "regime.yaml").read_text().replace(
        "  10pc: {train_per_class: 10}\n  30pc: {train_per_class: 30}\n", "  3pc: {train_per_class: 3}\n"))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    argv = ["--config", str(plan), "--protocol", "authors", "--seeds", "2", "--tracking_uri", uri, "--output_root",
            str(tmp_path / "out"), "--report_dir", str(tmp_path / "report"), "--dataset",
            f"imagefolder:{digits_folder}", "--epochs", "3", "--batch_size", "16", "--channels_last", "false"]
    # One budget per comparison: RIFLE K=1 would train 2 of the 3 epochs, so the grid is refused before it runs.
    assert campaign.main(argv) == 2
    assert "choose epochs that every K+1 divides, e.g. epochs=6" in capsys.readouterr().err
    argv[argv.index("3", argv.index("--epochs"))] = "6"
    assert campaign.main(argv) == 0
    table = __import__("pandas").read_csv(tmp_path / "report" / "regime.csv")
    assert len(table) == 6 and set(zip(table["K"], table["head_lr"])) == {
        (1, "follow"), (1, "cyclic"), (2, "follow"), (2, "cyclic"), (1, "restart, no re-init"),
        (2, "restart, no re-init")}
    assert (table["n"] == 2).all() and set(table["verdict"]) <= {"helps", "hurts", "cannot be told apart"}
    assert (table["steps_per_epoch"] == 1).all()  # 4 classes x 3 images at batch 16
    assert list(table["steps_per_period"]) == [3, 3, 2, 2, 3, 2]  # 6 epochs: periods of 3 (K=1) and 2 (K=2)
    assert (tmp_path / "report" / "regime.png").stat().st_size > 10_000
    assert "RIFLE − plain" in (tmp_path / "report" / "regime.md").read_text()
    _, runs = mlflow_runs(uri)
    assert len([r for r in runs if r.data.tags.get("cell.role") == "seed"]) == 7 * 2  # 7 methods x 2 seeds
    capsys.readouterr()
    assert campaign.main(argv) == 0  # complete: nothing is trained again
    assert " complete: " not in capsys.readouterr().out
    assert len(mlflow_runs(uri)[1]) == len(runs)
    # the same view from the store, by the report verb
    from rifle.commands import report
    assert report.main(["--view", "regime", "--campaign", "regime", "--tracking_uri", uri, "--output_dir",
                        str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "regime.md").read_text() == (tmp_path / "report" / "regime.md").read_text()


def test_regime_verdicts_rest_on_the_holm_adjusted_p():
    from rifle.evidence.regime import verdict
    assert verdict(0.004, 0.01) == "helps" and verdict(-0.004, 0.049) == "hurts"
    # the README's cell: +0.42 points [+0.02, +0.83], p 0.045 before and 0.72 after Holm over 16 cells
    assert verdict(0.0042, 0.72) == "cannot be told apart"
    assert verdict(0.01, 0.05) == verdict(0.01, float("nan")) == verdict(0.0, 0.001) == "cannot be told apart"


def test_regime_grid_verdicts_from_a_store(tmp_path):
    """Four RIFLE cells against plain over five seeds, logged as a campaign logs them: a cell whose 95%
    interval misses 0 (p 0.041) but whose Holm-adjusted p does not pass 0.05 cannot be told apart."""
    import mlflow
    from scipy import stats

    from rifle.evidence import regime
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.tracking.MlflowClient(uri)
    exp_id = client.create_experiment("regime", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(exp_id).info.run_id
    plain = [0.90, 0.91, 0.92, 0.93, 0.94]
    effects = {"plain": [0] * 5, "rifle-K1-follow": [0.010, 0.012, 0.011, 0.013, 0.009],
               "rifle-K1-cyclic": [0.02, 0.0, 0.05, 0.02, 0.04], "rifle-K2-follow": [-0.010, -0.012, -0.011, -0.013,
                                                                                      -0.009],
               "rifle-K2-cyclic": [0.01, -0.02, 0.0, 0.01, -0.01]}
    shared = {"dataset": "digits", "train_per_class": 30, "epochs": 30, "epochs_trained": 30, "batch_size": 32,
              "optimizer_steps": 30 * 10, "val_fraction": 0, "selection": "last"}
    grid = P.load(str(ROOT / "configs" / "campaign" / "regime.yaml")).methods
    for label, effect in effects.items():
        for seed, (a, e) in enumerate(zip(plain, effect)):
            run = client.create_run(exp_id, tags={"mlflow.parentRunId": parent, "cell.method": label}).info.run_id
            options = {"reinit_times": 1, "head_lr_policy": "follow"} | grid[label]
            for k, v in (shared | options | {"seed": seed}).items():
                client.log_param(run, k, v)
            client.log_metric(run, "test_acc", a + e)
            client.set_terminated(run)
    table = regime.collect(uri, [parent], list(effects)).set_index("K head_lr".split())
    nominal = stats.ttest_rel([a + e for a, e in zip(plain, effects["rifle-K1-cyclic"])], plain)
    assert nominal.pvalue < 0.05 and nominal.confidence_interval().low > 0
    assert table.loc[(1, "cyclic"), "p_value"] == pytest.approx(nominal.pvalue)
    assert table.loc[(1, "cyclic"), "p_holm"] == pytest.approx(2 * nominal.pvalue)  # second largest of 4 tests
    assert table["verdict"].to_dict() == {(1, "follow"): "helps", (1, "cyclic"): "cannot be told apart",
                                          (2, "follow"): "hurts", (2, "cyclic"): "cannot be told apart"}
    md = regime.markdown(table.reset_index())
    assert "| verdict (Holm p < 0.05) |" in md and "Holm-adjusted over the 4 cells with a test" in md
    # sign-flip: of the 2^5 sign patterns of (2, 0, 5, 2, 4) points, only the 4 with every non-zero sign alike reach 2.6
    mde = 100 * table.loc[(1, "cyclic"), "mde"]
    assert f"| +2.60 [+0.18, +5.02] | 0.041 | 0.081 | 0.125 | {mde:.2f} | cannot be told apart |" in md


@pytest.mark.slow
def test_a_resumed_run_without_validation_logs_every_epoch_once(tmp_path, digits_folder):
    from rifle.trainer import fit

    class Preempted(Exception):
        pass

    def preempt(epoch, metrics):
        if epoch == 1:
            raise Preempted

    cfg = C.build({"dataset": f"imagefolder:{digits_folder}", "image_size": 48, "batch_size": 16, "tricks": "none",
                   "val_fraction": 0, "selection": "last", "epochs": 3, "log_weights": False,
                   "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "output_dir": str(tmp_path / "out")})
    with pytest.raises(Preempted):
        fit(cfg, callbacks=[preempt])
    fit(cfg)
    client, (run,) = mlflow_runs(cfg.run.tracking_uri)
    for key in ("train_loss", "lr_backbone", "grad_norm/conv_stem"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == [0, 1, 2], key
