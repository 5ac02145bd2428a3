"""End to end: real MLflow stores, `mlflow run`, resume, two `accelerate launch` processes."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TINY, mlflow_runs, mlflow_server, postgres_database, run_cli, subprocess_env
from rifle import config as C


def tiny(tmp_path, out="out", **values):
    args = dict(zip(TINY[::2], TINY[1::2]))
    return C.build({k.lstrip("-"): v for k, v in args.items()} | {
        "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "output_dir": str(tmp_path / out),
        "log_weights": False} | values)


def readme_shell(tmp_path, mlflow_args, python_dir=None):
    """Run `mlflow run ...` in a shell as the README does: `. .venv/bin/activate && mlflow run ...`, from a
    PATH without this interpreter's bin (or with `python_dir` first instead of activating)."""
    bin_dir = Path(sys.executable).parent
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if Path(p) != bin_dir)
    env = subprocess_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db") | {"PATH": path}
    activate = bin_dir / "activate"
    if python_dir is not None:
        env["PATH"] = f"{python_dir}{os.pathsep}{path}"
        line = f"{bin_dir / 'mlflow'} run {ROOT} --env-manager local {mlflow_args}"
    elif activate.exists():
        line = f". {activate} && mlflow run {ROOT} --env-manager local {mlflow_args}"
    else:  # not a venv (e.g. conda): this interpreter's bin first on PATH is what activating does
        env["PATH"] = f"{bin_dir}{os.pathsep}{path}"
        line = f"mlflow run {ROOT} --env-manager local {mlflow_args}"
    proc = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    return env, proc


@pytest.mark.slow
def test_mlflow_run_logs_the_official_reinit_epochs(tmp_path):
    env, proc = readme_shell(tmp_path, f"-P epochs=6 -P reinit_times=2 -P image_size=48 -P train_per_class=3 "
                                       f"-P batch_size=16 -P output_dir={tmp_path / 'out'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, runs = mlflow_runs(env["MLFLOW_TRACKING_URI"])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    reinit = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "head_reinit")}
    assert reinit == {0: 0, 1: 1, 2: 0, 3: 1, 4: 0, 5: 0}  # (e+1) % (6 // 3) == 0, last epoch excluded
    metrics = run.data.metrics
    for name in ("train_loss", "train_acc", "val_acc", "lr_backbone", "lr_head", "test_acc", "test_acc_last",
                 "best_val_acc", "weight_dist/conv_stem", "weight_dist/blocks.6", "weight_dist/conv_head"):
        assert name in metrics, name
    assert len(client.get_metric_history(run.info.run_id, "val_acc")) == 6
    assert run.data.params["reinit_times"] == "2" and run.data.params["tricks"] == "rifle"
    assert run.data.tags["tricks"] == "rifle" and len(run.data.tags["dataset_fingerprint"]) == 16
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "training.png", "weights"} <= artifacts
    assert client.list_artifacts(run.info.run_id, "weights")[0].path.endswith(".safetensors")
    assert f"run {run.info.run_id}: test_acc=" in proc.stdout


@pytest.mark.slow
def test_mlflow_run_without_the_environment_says_so(tmp_path):
    bare = tmp_path / "bare"  # a Python without the project's packages first on PATH
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    env, proc = readme_shell(tmp_path, "-P epochs=1", python_dir=bare / "bin")
    assert proc.returncode != 0
    assert f"rifle: the Python running this ({bare / 'bin' / 'python'}) lacks torch" in proc.stderr
    assert ". .venv/bin/activate" in proc.stderr


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_result(tmp_path):
    from rifle.trainer import fit

    full = fit(tiny(tmp_path, out="full", epochs=4, reinit_times=1, run_name="full"))

    class Preempted(Exception):
        pass

    def preempt(epoch, metrics):
        if epoch == 1:  # after the checkpoint of epoch 1, which ended with the re-init
            raise Preempted

    with pytest.raises(Preempted):
        fit(tiny(tmp_path, out="cut", epochs=4, reinit_times=1, run_name="cut"), callbacks=[preempt])
    resumed = fit(tiny(tmp_path, out="cut", epochs=4, reinit_times=1, run_name="cut"))
    for key in ("test_acc", "test_acc_last", "best_val_acc", "best_epoch"):
        assert resumed[key] == full[key], key
    client, runs = mlflow_runs(f"sqlite:///{tmp_path}/mlflow.db")
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    cut = next(r for r in runs if r.info.run_id == resumed["run_id"])
    uncut = next(r for r in runs if r.info.run_id == full["run_id"])
    for name in ("val_acc", "train_loss", "head_reinit"):
        steps = [(m.step, m.value) for m in client.get_metric_history(cut.info.run_id, name)]
        ref = [(m.step, m.value) for m in client.get_metric_history(uncut.info.run_id, name)]
        assert sorted(steps) == sorted(ref), name  # each epoch once, same values
    # a finished output_dir re-run logs nothing twice
    again = fit(tiny(tmp_path, out="cut", epochs=4, reinit_times=1))
    assert again["test_acc"] == full["test_acc"] and again["run_id"] == resumed["run_id"]
    assert len(client.get_metric_history(cut.info.run_id, "test_acc")) == 1
    with pytest.raises(C.ConfigError, match="--lr: .* holds a run made with lr=0.01"):
        fit(tiny(tmp_path, out="cut", epochs=4, reinit_times=1, lr=0.02))


@pytest.mark.slow
def test_two_processes_make_one_run_with_identical_weights(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "rifle.train", *TINY,
           "--epochs", "4", "--reinit_times", "1", "--output_dir", str(tmp_path / "out"), "--tracking_uri", uri]
    env = subprocess_env()
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, runs = mlflow_runs(uri)
    assert len(runs) == 1, "only the main process may log"
    run = runs[0]
    assert run.data.tags["num_processes"] == "2"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "reinit_weight_spread")] == [0.0]
    assert sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "head_reinit")) == \
        [(0, 0), (1, 1), (2, 0), (3, 0)]
    assert proc.stdout.count("test_acc=") == 1


@pytest.mark.slow
def test_mlflow_server_on_postgres(tmp_path):
    with postgres_database("rifle_mlflow") as db, mlflow_server(db, tmp_path) as uri:
        proc = run_cli([*TINY, "--epochs", "2", "--tricks", "none", "--tracking_uri", uri,
                        "--output_dir", tmp_path / "out", "--experiment", "pg"], cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        client, runs = mlflow_runs(uri, "pg")
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        assert "test_acc" in runs[0].data.metrics and runs[0].data.params["tricks"] == "none"
        assert len(client.get_metric_history(runs[0].info.run_id, "val_acc")) == 2
        assert any(p.suffix == ".png" for p in (tmp_path / "art").rglob("*"))  # artifacts went via the server


@pytest.mark.slow
def test_bf16_grad_accumulation_and_loader_workers(tmp_path, digits_folder):
    """The trainer options that change the step: bf16 autocast, accumulation, worker processes."""
    from rifle.trainer import fit

    cfg = C.build({"dataset": f"imagefolder:{digits_folder}", "image_size": 48, "batch_size": 4,
                   "val_fraction": 0.25, "train_per_class": 0, "epochs": 2, "mixed_precision": "bf16",
                   "grad_accum_steps": 2, "num_workers": 2, "tracking_uri": f"sqlite:///{tmp_path}/m.db",
                   "output_dir": str(tmp_path / "out"), "log_weights": False})
    result = fit(cfg)
    client, (run,) = mlflow_runs(f"sqlite:///{tmp_path}/m.db")
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert len(losses) == 2 and all(0 < v < 10 for v in losses)
    assert run.data.params["mixed_precision"] == "bf16" and run.data.params["grad_accum_steps"] == "2"
    assert 0 <= result["test_acc"] <= 1
