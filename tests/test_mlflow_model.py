"""MLflow as its users expect: the logged model (pyfunc, signature, registry), system metrics, resolved params,
the experiment kind, SIGTERM / Ctrl-C ending a run as KILLED, and `mlflow run .` -> report with defaults.
Against a SQLite store and an `mlflow server` on PostgreSQL."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, mlflow_runs, mlflow_server, postgres_database, run_cli, subprocess_env, wait_for
from rifle import config as C


def small(folder, out, uri, *extra):
    """4 classes of digits, 24 train / 8 val / 16 test images, 48 px, batch 8: a few seconds an epoch."""
    return ["--dataset", f"imagefolder:{folder}", "--image_size", "48", "--batch_size", "8", "--val_fraction",
            "0.25", "--train_per_class", "0", "--output_dir", str(out), "--tracking_uri", uri, *map(str, extra)]


@pytest.fixture(scope="module")
def server_uri(tmp_path_factory):
    """`mlflow server` on a fresh PostgreSQL database, bound to 127.0.0.1, artifacts proxied; stopped after."""
    with postgres_database("rifle_model") as db, mlflow_server(db, tmp_path_factory.mktemp("server")) as uri:
        yield uri


@pytest.fixture(params=["sqlite", "postgres_server"])
def store(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/mlflow.db"
    return request.getfixturevalue("server_uri")


def assert_resolved_params(params: dict):
    empty = sorted(k for k, v in params.items() if v == "")
    assert not empty, f"params holding an empty string: {empty}"


# ------------------------------------------------------------------------------------------------ the model

PREDICT = """
import json, sys
import numpy as np
from pathlib import Path
from PIL import Image
import mlflow
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model(f"runs:/{sys.argv[2]}/model")
files = sorted(Path(sys.argv[3]).glob("*/*.png"))
images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
out = model.predict(images)
print(json.dumps({"truth": [f.parent.name for f in files], "label": out["label"].tolist(),
                  "class_name": out["class_name"].tolist(), "probability": out["probability"].tolist(),
                  "dtypes": [str(t) for t in out.dtypes], "input": str(model.metadata.signature.inputs)}))
"""


@pytest.mark.slow
def test_the_selected_model_serves_labels_and_names_and_is_registered(tmp_path, store, digits_folder):
    """DropConnect scales the head at test time: the served model must rebuild it to reproduce test_acc."""
    import mlflow
    name = f"rifle-digits-{tmp_path.name[-12:]}".replace("_", "-")
    proc = run_cli(small(digits_folder, tmp_path / "out", store, "--epochs", "2", "--tricks", "dropconnect",
                         "--register_model", name), cwd=tmp_path, env={"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, (run,) = mlflow_runs(store, "rifle")
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert_resolved_params(params)
    assert params["experiment"] == "rifle" and params["tracking_uri"] == store and params["tricks"] == "dropconnect"
    assert "head_lr" in params and "clr_base_lr" not in params  # resolved, or not logged at all
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    system = {k for k in run.data.metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system, system

    weights = [a.path for a in client.list_artifacts(run_id, "weights")]
    assert len(weights) == 1 and weights[0].startswith("weights/best-") and weights[0].endswith(".safetensors")
    (output,) = run.outputs.model_outputs  # MLflow 3: a LoggedModel of the run, runs:/<run_id>/model
    assert client.get_logged_model(output.model_id).name == "model"

    # A fresh process that only loads the model, with pickle refused: the model's own code and safetensors.
    test_dir = digits_folder / "test"
    pred = subprocess.run([sys.executable, "-c", PREDICT, store, run_id, str(test_dir)], cwd=tmp_path,
                          env=subprocess_env(MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false"), capture_output=True,
                          text=True, timeout=600)
    assert pred.returncode == 0, pred.stderr[-3000:]
    out = json.loads(pred.stdout.strip().splitlines()[-1])
    assert out["dtypes"][::2] == ["int64", "float64"] and "uint8" in out["input"]  # class_name: str (object)
    classes = sorted(p.name for p in test_dir.iterdir())
    assert [classes[i] for i in out["label"]] == out["class_name"]
    assert all(0 < p <= 1 for p in out["probability"])
    accuracy = sum(t == c for t, c in zip(out["truth"], out["class_name"])) / len(out["truth"])
    assert abs(accuracy - run.data.metrics["test_acc"]) <= 1 / len(out["truth"]) + 1e-9  # the same network

    (version,) = client.search_model_versions(f"name='{name}'")
    assert version.run_id == run_id and run.data.tags["registered_model"] == f"{name}/{version.version}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(store)
    try:
        info = mlflow.models.get_model_info(f"models:/{name}/{version.version}")
        requirements = Path(mlflow.pyfunc.get_model_dependencies(f"models:/{name}/{version.version}")).read_text()
    finally:
        mlflow.set_tracking_uri(previous)
    assert info.signature.outputs.input_names() == ["label", "class_name", "probability"]
    assert "torch==" in requirements and "safetensors==" in requirements and "mlflow==" in requirements


# ------------------------------------------------------------------------------------------ SIGTERM, Ctrl-C

def _stop_after_first_checkpoint(cmd, out, cwd, env, stop):
    # its own process group with Ctrl-C at its default, as a terminal's foreground job (a shell's background
    # job, e.g. pytest started with `&`, would pass SIGINT on ignored)
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for(lambda: proc.poll() is not None or list(out.glob("checkpoints/epoch-*")), timeout=400)
    assert proc.poll() is None, "the run ended before it could be stopped: " + proc.stderr.read()[-2000:]
    stop(proc)
    stdout, stderr = proc.communicate(timeout=120)
    return proc.returncode, stderr


@pytest.mark.slow
@pytest.mark.parametrize("store, how", [("sqlite", "sigterm"), ("sqlite", "ctrl_c_on_mlflow_run"),
                                        ("postgres_server", "sigterm")], indirect=["store"])
def test_sigterm_and_ctrl_c_end_the_run_killed_with_the_checkpoint_intact(tmp_path, store, digits_folder, how):
    """SIGTERM to `python -m rifle train`; Ctrl-C in the terminal of `mlflow run .` (SIGINT to its process group,
    after which `mlflow run` also sends its child SIGTERM)."""
    from safetensors.torch import load_file

    from rifle import checkpoint
    out, experiment = tmp_path / "out", f"kill-{tmp_path.name[-10:]}"
    args = small(digits_folder, out, store, "--epochs", "6", "--experiment", experiment, "--log_weights", "false")
    if how == "sigterm":
        cmd, env = [sys.executable, "-m", "rifle", "train", *args], subprocess_env()
        rc, stderr = _stop_after_first_checkpoint(cmd, out, tmp_path, env, lambda p: p.send_signal(signal.SIGTERM))
        assert rc == 143 and "rifle train: stopped by SIGTERM" in stderr, stderr[-3000:]
    else:
        given = dict(zip(args[::2], args[1::2])) | {"--experiment": None}
        cmd = [str(Path(sys.executable).with_name("mlflow")), "run", str(ROOT), "--env-manager", "local",
               "--experiment-name", experiment, *[x for k, v in given.items() if v for x in ("-P", f"{k[2:]}={v}")]]
        env = subprocess_env(MLFLOW_TRACKING_URI=store)
        rc, stderr = _stop_after_first_checkpoint(cmd, out, tmp_path, env, lambda p: os.killpg(p.pid, signal.SIGINT))
        assert rc != 0 and "rifle train: stopped by Ctrl-C" in stderr, stderr[-3000:]
    assert "Traceback" not in stderr.split("rifle train: stopped by")[0][-3000:]
    # under `mlflow run`, RIFLE puts KILLED back once `mlflow run` has marked it FAILED
    wait_for(lambda: mlflow_runs(store, experiment)[1][0].info.status == "KILLED", timeout=30, interval=0.2)
    client, (run,) = mlflow_runs(store, experiment)
    assert run.info.status == "KILLED"
    last = checkpoint.latest(out)
    state = json.loads((last / "state.json").read_text())
    assert state["run_id"] == run.info.run_id and state["epoch"] >= 1
    assert load_file(str(last / "model.safetensors"))  # complete and readable
    if how == "sigterm":  # the same command resumes into the same run and finishes it
        proc = run_cli(args, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        client, (again,) = mlflow_runs(store, experiment)
        assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_acc")) == list(range(6))


@pytest.mark.slow
def test_an_interrupt_hidden_by_a_cleanup_error_still_ends_the_run_killed(tmp_path, digits_folder):
    """A signal can land in a library's cleanup: after the unlink of Optuna's journal lock release, whose
    `except BaseException` unlinks again, so a FileNotFoundError replaces the Ctrl-C (a sweep worker then
    exited 0 without handing its trial back). fit ends the run KILLED and raises the interrupt itself."""
    from mlflow.tracking import MlflowClient

    from helpers import tiny_config
    from rifle.trainer import fit

    def release(epoch, metrics):  # the journal lock's release, interrupted just after its unlink
        try:
            raise KeyboardInterrupt
        except BaseException:
            raise FileNotFoundError("optuna.journal.lock.rename") from None  # `from None` hides, not removes

    def statuses(cfg):
        client = MlflowClient(cfg.run.tracking_uri)
        return [r.info.status for r in client.search_runs([e.experiment_id for e in client.search_experiments()])]

    cfg = tiny_config(tmp_path, digits_folder, epochs=2)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, callbacks=[release])
    assert statuses(cfg) == ["KILLED"]

    def failure(epoch, metrics):  # an error of its own, after handling a different one: still FAILED
        try:
            raise ValueError("handled")
        except ValueError:
            raise FileNotFoundError("missing") from None

    (tmp_path / "other").mkdir()
    other = tiny_config(tmp_path / "other", digits_folder, epochs=2)
    with pytest.raises(FileNotFoundError, match="missing"):
        fit(other, callbacks=[failure])
    assert statuses(other) == ["FAILED"]


# --------------------------------------------------------------------------- one path from first run to report

@pytest.mark.slow
def test_mlflow_run_and_train_then_report_with_defaults(tmp_path, digits_folder):
    """The README's path with nothing configured: the default store in the working directory, `mlflow run .`
    (MLflow's Default experiment) and `python -m rifle train` (experiment rifle), then the report commands
    with their defaults find both."""
    import pandas as pd
    env = {k: v for k, v in subprocess_env().items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME")}
    mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
    options = {"dataset": f"imagefolder:{digits_folder}", "image_size": 48, "batch_size": 8, "val_fraction": 0.25,
               "train_per_class": 0, "log_weights": "false", "system_metrics": "false"}
    plain = options | {"tricks": "none", "epochs": 1, "output_dir": tmp_path / "plain"}  # any option is a -P
    proc = subprocess.run([mlflow_bin, "run", str(ROOT), "--env-manager", "local",
                           *[x for k, v in plain.items() for x in ("-P", f"{k}={v}")]],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rifle = options | {"epochs": 2, "output_dir": tmp_path / "rifle"}
    flags = [x for k, v in rifle.items() for x in (f"--{k}", str(v))]
    train = subprocess.run([sys.executable, "-m", "rifle", "train", *flags], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]

    uri = f"sqlite:///{tmp_path}/mlflow.db"  # MLflow's and RIFLE's default store, in the working directory
    client, runs = mlflow_runs(uri)
    by_exp = {client.get_experiment(r.info.experiment_id).name: r for r in runs}
    assert set(by_exp) == {"Default", "rifle"}
    for exp_name, run in by_exp.items():
        assert_resolved_params(run.data.params)
        assert run.data.params["experiment"] == exp_name  # the param says where the run really is
        assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
        assert not any(k.startswith("system/") for k in run.data.metrics)  # --system_metrics false
    assert by_exp["Default"].data.params["tricks"] == "none" and by_exp["Default"].data.params["epochs"] == "1"
    # the UI's Source column: what `mlflow run` set stays (the project), a command names its module
    assert by_exp["Default"].data.tags["mlflow.source.type"] == "PROJECT"
    source = by_exp["rifle"].data.tags
    assert (source["mlflow.source.type"], source["mlflow.source.name"]) == ("LOCAL", "rifle train")
    assert source["mlflow.source.git.commit"] == source["git_commit"] and source["git_dirty"] in ("true", "false")

    report = subprocess.run([sys.executable, "-m", "rifle", "report"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600)
    assert report.returncode == 0, report.stderr[-3000:]
    table = pd.read_csv(tmp_path / "outputs" / "reports" / "all" / "runs.csv")
    assert set(table["run_id"]) == {r.info.run_id for r in runs} and set(table["method"]) == {"plain", "rifle"}
    entry = subprocess.run([mlflow_bin, "run", str(ROOT), "-e", "report", "--env-manager", "local",
                            "-P", f"output_dir={tmp_path / 'entry'}"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=600)
    assert entry.returncode == 0, entry.stderr[-3000:]
    assert set(pd.read_csv(tmp_path / "entry" / "runs.csv")["run_id"]) == {r.info.run_id for r in runs}
    client, runs = mlflow_runs(uri)
    for run in runs:
        assert_resolved_params(run.data.params)  # the report runs too


# ------------------------------------------------------------------------------------------------ quick ones

def test_params_are_resolved_and_what_mlflow_run_recorded_is_kept(tmp_path, monkeypatch, capsys):
    """As under `mlflow run -P epochs=7 -P tricks= -P experiment=x`: its params stay, the resolved values go to
    <name>_resolved; None is not logged, an empty string is `none`."""
    import mlflow
    from rifle.track.tracker import Tracker
    uri = f"sqlite:///{tmp_path}/m.db"
    client = mlflow.tracking.MlflowClient(uri)
    run = client.create_run("0")
    for k, v in {"epochs": "7", "tricks": "", "experiment": "x"}.items():
        client.log_param(run.info.run_id, k, v)
    monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
    tracker = Tracker(True, uri, "x", system_metrics=False)
    assert tracker.start() == run.info.run_id
    tracker.log_params({"epochs": 6, "tricks": "", "lr": 0.01, "clr_base_lr": None, "experiment": "x"})
    tracker.end()
    params = client.get_run(run.info.run_id).data.params
    assert params["epochs"] == "7" and params["epochs_resolved"] == "6"
    assert params["tricks"] == "" and params["tricks_resolved"] == "none"
    assert params["experiment"] == "x" and params["experiment_resolved"] == "Default"
    assert params["lr"] == "0.01" and "clr_base_lr" not in params and params["tracking_uri"] == uri
    assert "--experiment 'x' ignored: the run is in experiment 'Default'" in capsys.readouterr().err
    assert client.get_experiment("0").tags["mlflow.experimentKind"] == "custom_model_development"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # released with the run


def test_mlproject_passes_only_given_values():
    spec = yaml.safe_load((ROOT / "MLproject").read_text())
    for name, entry in spec["entry_points"].items():
        for param, decl in (entry.get("parameters") or {}).items():
            assert decl.get("default") not in ("", None), f"{name}.{param}: an empty default is logged as a param"
    assert "parameters" not in spec["entry_points"]["main"] and "parameters" not in spec["entry_points"]["report"]


def test_register_model_needs_the_weights():
    with pytest.raises(C.ConfigError, match="--register_model: .*--log_weights false"):
        C.build({"register_model": "m", "log_weights": False})
    assert {"register_model", "system_metrics"} <= set(C.RUN_ONLY)
