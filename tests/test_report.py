"""The report: statistics against scipy and hand-computed values, tables and figures from a real tiny MLflow
store (plain and RIFLE, two seeds each, as child runs of one parent), the `report` entry point, and the three
notebooks executed against real stores so they never rot."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import ROOT, subprocess_env
from rifle import report

EXPERIMENT = "cmp"


# ------------------------------------------------------------------------------------------ pure functions

def test_mean_std_and_paired_difference_by_hand():
    assert report.mean_std([1, 2, 3, 4]) == pytest.approx((2.5, math.sqrt(5 / 3), 4))
    mean, std, n = report.mean_std([0.7])
    assert (mean, n) == (0.7, 1) and math.isnan(std)
    # d = (0.02, -0.01, 0.05, 0.02, 0.04): mean 0.024, sd sqrt(0.00212/4) = 0.0230217, t(0.975, 4) = 2.776445
    r = report.paired_difference([0.80, 0.85, 0.90, 0.82, 0.88], [0.78, 0.86, 0.85, 0.80, 0.84])
    assert r["n"] == 5 and r["mean_diff"] == pytest.approx(0.024)
    assert r["sd_diff"] == pytest.approx(0.0230217, rel=1e-5)
    half = 2.776445 * 0.0230217 / math.sqrt(5)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((0.024 - half, 0.024 + half), rel=1e-5)
    # t = 0.024 / (0.0230217 / sqrt 5) = 2.33105; two-sided p of t(4) at 2.33105 = 0.08014
    assert r["p_value"] == pytest.approx(0.08014, abs=2e-5)


def test_paired_difference_matches_scipy():
    from scipy import stats
    rng = np.random.default_rng(3)
    for n in (2, 3, 7):
        a, b = rng.uniform(0.6, 0.9, n), rng.uniform(0.6, 0.9, n)
        r = report.paired_difference(a, b, confidence=0.9)
        t = stats.ttest_rel(a, b)
        ci = t.confidence_interval(confidence_level=0.9)
        assert r["p_value"] == pytest.approx(t.pvalue, rel=1e-9)
        assert (r["ci_low"], r["ci_high"]) == pytest.approx((ci.low, ci.high), rel=1e-9)


def test_paired_difference_without_spread():
    one = report.paired_difference([0.9], [0.8])
    assert one["mean_diff"] == pytest.approx(0.1) and math.isnan(one["ci_low"]) and math.isnan(one["p_value"])
    same = report.paired_difference([0.9, 0.8], [0.8, 0.7])  # every difference 0.1: nothing to test against
    assert same["ci_low"] == same["ci_high"] == pytest.approx(0.1) and math.isnan(same["p_value"])
    with pytest.raises(ValueError):
        report.paired_difference([0.9, 0.8], [0.8])


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04 (m = 3): 3 x 0.01 = 0.03, 2 x 0.03 = 0.06, 1 x 0.04 = 0.04 -> running max 0.06
    assert report.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    adjusted = report.holm([0.5, math.nan, 0.2])  # nan is no test: m = 2
    assert adjusted[0] == pytest.approx(0.5) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.4)
    assert report.holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])  # capped at 1


def test_method_names_and_comparisons():
    assert [report.method_name(t) for t in ("", "none", "rifle", "l2sp,rifle", "rifle+l2sp")] == \
        ["plain", "plain", "rifle", "rifle+l2sp", "rifle+l2sp"]
    methods = ["rifle+l2sp", "dropout", "plain", "rifle", "l2sp"]
    assert sorted(methods, key=report.method_sort_key) == ["plain", "rifle", "dropout", "l2sp", "rifle+l2sp"]
    assert report.comparisons(methods) == [("rifle", "plain"), ("rifle", "dropout"), ("rifle", "l2sp"),
                                           ("rifle+l2sp", "l2sp")]
    assert report.comparisons(methods, reference="dropout") == [("dropout", "plain"), ("dropout", "rifle"),
                                                                ("dropout", "l2sp"), ("dropout", "rifle+l2sp")]


def synthetic():
    rows = [("cub", "plain", 0, 0.70), ("cub", "plain", 1, 0.72), ("cub", "plain", 2, 0.71),
            ("cub", "rifle", 0, 0.73), ("cub", "rifle", 1, 0.72),  # seed 2 missing: paired over 0 and 1
            ("dtd", "plain", 0, 0.60), ("dtd", "rifle", 0, 0.58)]
    df = pd.DataFrame(rows, columns=["dataset", "method", "seed", "test_acc"])
    df["params"] = [{"lr": "0.01", "seed": str(s)} for s in df["seed"]]
    return df


def test_tables_by_hand():
    runs = synthetic()
    s = report.summarize(runs).set_index(["dataset", "method"])
    assert s.loc[("cub", "plain"), "mean"] == pytest.approx(0.71) and s.loc[("cub", "plain"), "n"] == 3
    assert s.loc[("cub", "rifle"), "std"] == pytest.approx(math.sqrt(0.00005))
    assert s["best"].to_dict() == {("cub", "plain"): False, ("cub", "rifle"): True,
                                   ("dtd", "plain"): True, ("dtd", "rifle"): False}
    p = report.paired_differences(runs).set_index("dataset")
    assert p.loc["cub", "n"] == 2 and p.loc["cub", "seeds"] == "0 1"
    assert p.loc["cub", "mean_diff"] == pytest.approx(((0.73 - 0.70) + (0.72 - 0.72)) / 2)
    assert p.loc["dtd", "n"] == 1 and math.isnan(p.loc["dtd", "p_value"]) and math.isnan(p.loc["dtd", "p_holm"])
    assert p.loc["cub", "p_holm"] == pytest.approx(p.loc["cub", "p_value"])  # one comparison: nothing to adjust
    md = report.table_markdown(report.summarize(runs), report.paired_differences(runs))
    assert "| cub | 71.0 ± 1.0 (3) | **72.5 ± 0.7 (2)** |" in md
    assert "| dtd | **60.0 ± – (1)** | 58.0 ± – (1) |" in md
    assert "| cub | rifle − plain | 2 | +1.50 |" in md


def test_varying_settings_are_reported():
    runs = synthetic()
    assert report.varying_settings(runs) == {}
    runs.at[1, "params"] = {"lr": "0.02", "seed": "1"}  # a plain seed trained with another lr
    runs.at[6, "params"] = {"lr": "0.01", "seed": "0", "dropout_p": "0.3"}
    assert report.varying_settings(runs) == {"cub": {"within": {"plain": ["lr"]}, "between": []}}


# ------------------------------------------------------------------------------------ a real tiny store

@pytest.fixture(scope="module")
def store(tmp_path_factory, digits_folder):
    """plain and RIFLE (K=1: a re-init after epoch 1), seeds 0 and 1, as child runs of one parent run."""
    import mlflow

    from rifle import config as C
    from rifle.trainer import fit
    tmp = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = mlflow.tracking.MlflowClient(uri)
    exp_id = client.create_experiment(EXPERIMENT)
    parent = client.create_run(exp_id, run_name="comparison").info.run_id
    for seed in (0, 1):
        for tricks in ("", "rifle"):
            child = client.create_run(exp_id, tags={"mlflow.parentRunId": parent}).info.run_id
            fit(C.build({"dataset": f"imagefolder:{digits_folder}", "image_size": 48, "batch_size": 8,
                         "val_fraction": 0.25, "train_per_class": 0, "epochs": 4, "reinit_times": 1,
                         "tricks": tricks, "seed": seed, "tracking_uri": uri, "experiment": EXPERIMENT,
                         "output_dir": str(tmp / f"{tricks or 'plain'}-{seed}"), "log_weights": False}),
                mlflow_run_id=child)
    client.set_terminated(parent)
    return tmp, uri, parent


def test_report_from_runs(store):
    import mlflow
    from matplotlib.image import imread
    tmp, uri, parent = store
    client = mlflow.tracking.MlflowClient(uri)
    out = report.build_report(uri, parent_run_id=parent, output_dir=tmp / "rep")
    runs = out["runs"]
    assert sorted(zip(runs["method"], runs["seed"])) == [("plain", 0), ("plain", 1), ("rifle", 0), ("rifle", 1)]
    acc = {(r.method, r.seed): client.get_run(r.run_id).data.metrics["test_acc"] for r in runs.itertuples()}
    s = out["summary"].set_index("method")
    for m in ("plain", "rifle"):
        assert s.loc[m, "mean"] == pytest.approx((acc[(m, 0)] + acc[(m, 1)]) / 2)
        assert s.loc[m, "n"] == 2
    p = out["paired"].iloc[0]
    assert (p["method"], p["versus"], p["n"]) == ("rifle", "plain", 2)
    assert p["mean_diff"] == pytest.approx(np.mean([acc[("rifle", k)] - acc[("plain", k)] for k in (0, 1)]))
    md = (tmp / "rep" / "results.md").read_text()
    assert md == out["markdown"] and "rifle − plain" in md
    assert pd.read_csv(tmp / "rep" / "results.csv")["n"].tolist() == [2, 2]
    assert len(pd.read_csv(tmp / "rep" / "runs.csv")) == 4
    label = report.slug(runs["dataset"].iloc[0])  # imagefolder:<folder name>
    for name, (height, width) in ((f"mechanism_{label}.png", (800, 1400)), (f"dynamics_{label}.png", (450, 1300)),
                                  ("paired.png", (140, 700))):
        image = imread(tmp / "rep" / name)
        assert image.shape[0] >= height and image.shape[1] >= width and image.std() > 0.05, (name, image.shape)
    logged = {Path(a.path).name for a in client.list_artifacts(parent, "report")}
    assert {"results.md", "results.csv", "paired.csv", f"mechanism_{label}.png"} <= logged
    # The figures' data is what the runs logged: the last weight_dist of each block, the re-init epoch.
    h = report.fetch_histories(runs, uri)
    final = report.final_weight_dist(h)
    one = runs.iloc[0]
    logged_metrics = client.get_run(one.run_id).data.metrics
    got = final[final["run_id"] == one.run_id].set_index("block")["value"]
    assert got.to_dict() == pytest.approx({k[len("weight_dist/"):]: v for k, v in logged_metrics.items()
                                           if k.startswith("weight_dist/")})
    assert report.reinit_epochs(h, "rifle") == [1] and report.reinit_epochs(h, "plain") == []
    from rifle.models import block_names, build_backbone
    assert report.block_order(one.model, sorted(got.index)) == block_names(build_backbone(one.model, False)[0])


def test_experiment_report_run_and_cli(store, capsys):
    import mlflow
    tmp, uri, parent = store
    client = mlflow.tracking.MlflowClient(uri)
    assert report.main(["--tracking_uri", uri, "--experiment", EXPERIMENT, "--output_dir", str(tmp / "e1")]) == 0
    printed = capsys.readouterr().out
    assert "| imagefolder:digits4" in printed and "logged under artifacts report/ of run" in printed
    first = printed.rsplit(" ", 1)[-1].strip()
    run = client.get_run(first)
    assert run.info.run_name == "report" and run.info.status == "FINISHED" and run.data.tags[report.REPORT_TAG]
    # A second report reads the same four runs: the parent (no test_acc) and the report run are not results.
    again = report.build_report(uri, EXPERIMENT, output_dir=tmp / "e2")
    assert len(again["runs"]) == 4 and again["runs"].attrs["duplicates"] == []
    assert report.main(["--tracking_uri", uri, "--experiment", "nope", "--no_log"]) == 2
    assert "no experiment 'nope'" in capsys.readouterr().err


def test_mlflow_run_report_entry_point(store):
    import mlflow
    tmp, uri, parent = store
    proc = subprocess.run([str(Path(sys.executable).with_name("mlflow")), "run", str(ROOT), "-e", "report",
                           "--env-manager", "local", "--experiment-name", EXPERIMENT,
                           "-P", f"parent_run_id={parent}", "-P", f"output_dir={tmp / 'mr'}"],
                          cwd=tmp, env=subprocess_env(MLFLOW_TRACKING_URI=uri), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| imagefolder:digits4" in proc.stdout
    assert (tmp / "mr" / "results.md").is_file()
    client = mlflow.tracking.MlflowClient(uri)
    assert "report/paired.csv" in {a.path for a in client.list_artifacts(parent, "report")}


# --------------------------------------------------------------------------------------------- notebooks

NOTEBOOKS = ROOT / "notebooks"


@pytest.mark.parametrize("name", ["results", "mechanism", "sweeps"])
def test_notebooks_are_committed_without_outputs(name):
    nb = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(not c["outputs"] and c["execution_count"] is None for c in code)
    assert sum("parameters" in c["metadata"].get("tags", []) for c in code) == 1
    source = "".join("".join(c["source"]) for c in code)
    assert "report." in source and "def " not in source  # they call the report module, no logic of their own


def outputs(nb, kind):
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if kind in o.get("data", {})]


def text_of(nb):
    return "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", "")) +
                     str(o.get("data", {}).get("text/markdown", "")) for c in nb.cells if c.cell_type == "code"
                     for o in c.outputs)


def test_results_and_mechanism_notebooks_run(store, tmp_path):
    tmp, uri, parent = store
    params = {"tracking_uri": uri, "experiment": EXPERIMENT}
    nb = report.execute_notebook(NOTEBOOKS / "results.ipynb", params, tmp_path / "results.ipynb", cwd=tmp_path)
    text = text_of(nb)
    runs = report.fetch_runs(uri, EXPERIMENT)
    mean = report.summarize(runs).set_index("method").loc["rifle", "mean"]
    assert f"{100 * mean:.1f} ±" in text and "rifle − plain" in text
    assert len(outputs(nb, "image/png")) == 1  # the paired-difference plot
    nb = report.execute_notebook(NOTEBOOKS / "mechanism.ipynb", params | {"parent_run_id": parent}, cwd=tmp_path)
    assert "4 runs of efficientnet_lite0" in text_of(nb) and "conv_stem" in text_of(nb)
    assert len(outputs(nb, "image/png")) == 2


def test_sweeps_notebook_runs(tmp_path):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    journal = tmp_path / "optuna.journal"
    study = optuna.create_study(study_name="tiny", direction="maximize",
                                storage=JournalStorage(JournalFileBackend(str(journal))),
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
    states = report.trial_states(report.load_study(str(journal), "tiny"))
    assert states.get("COMPLETE", 0) >= 2 and states.get("PRUNED", 0) >= 1, states
    nb = report.execute_notebook(NOTEBOOKS / "sweeps.ipynb", {"storage": str(journal), "study_name": "tiny"},
                                 cwd=tmp_path)
    text = text_of(nb)
    assert str(states) in text and "PRUNED" in text and "reinit_times" in text
    assert len(outputs(nb, "image/png")) == 3  # history, importance, intermediate values
