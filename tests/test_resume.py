"""Crash safety: SIGKILL at several moments, resume to the uninterrupted result; divergence stops cleanly."""
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import free_port, mlflow_runs, mlflow_server, run_cli, subprocess_env, wait_for
from rifle import checkpoint


def args(folder, out, uri):
    return ["--dataset", f"imagefolder:{folder}", "--image_size", "48", "--batch_size", "8", "--val_fraction",
            "0.25", "--train_per_class", "0", "--epochs", "6", "--reinit_times", "2", "--tricks", "rifle,dropout",
            "--output_dir", str(out), "--tracking_uri", uri, "--log_weights", "false"]


def epochs_saved(out) -> int:
    """Epochs the run in out has checkpointed (the newest epoch-NNNN directory + 1; 0 before the first)."""
    done = sorted(out.glob("checkpoints/epoch-*"))
    return int(done[-1].name.split("-")[1]) + 1 if done else 0


def summary(stdout):
    line = next(line for line in stdout.splitlines() if line.startswith("run "))
    return re.sub(r"^run \w+: ", "", line)


@pytest.mark.slow
@pytest.mark.parametrize("store", ["sqlite", "http"])
def test_sigkill_at_several_moments_then_resume_matches_uninterrupted(tmp_path, digits_folder, store):
    """Per-epoch metrics are logged asynchronously (flushed before the next checkpoint): on SQLite and over
    an `mlflow server`, a kill never leaves an epoch logged twice or lost."""
    if store == "http":
        with mlflow_server(f"sqlite:///{tmp_path}/server.db", tmp_path) as uri:
            return sigkill_then_resume(tmp_path, digits_folder, uri)
    sigkill_then_resume(tmp_path, digits_folder, f"sqlite:///{tmp_path}/cut.db")


def sigkill_then_resume(tmp_path, digits_folder, cut_uri):
    ref_uri = f"sqlite:///{tmp_path}/ref.db"
    ref = run_cli(args(digits_folder, tmp_path / "ref", ref_uri), cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr[-2000:]

    out = tmp_path / "cut"
    cmd = [sys.executable, "-m", "rifle", "train", *args(digits_folder, out, cut_uri)]
    # Kill as soon as a checkpoint exists, a little later (mid-epoch or mid-write), and later still.
    for wait_epochs, delay in ((1, 0.0), (2, 0.15), (4, 0.4)):
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        wait_for(lambda: proc.poll() is not None or epochs_saved(out) >= wait_epochs, timeout=300, interval=0.01)
        # The delay is the test's subject, not a wait for something: it moves the kill from "just after a
        # checkpoint" into the next epoch's training or checkpoint write, points no file or log marks.
        time.sleep(delay)
        assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    final = run_cli(args(digits_folder, out, cut_uri), cwd=tmp_path)
    assert final.returncode == 0, final.stderr[-2000:]
    assert summary(final.stdout) == summary(ref.stdout)

    client, (cut_run,) = mlflow_runs(cut_uri)
    ref_client, (ref_run,) = mlflow_runs(ref_uri)
    assert cut_run.info.status == "FINISHED"
    for key in ("val_acc", "train_loss", "head_reinit", "dropout/drop_rate", "weight_dist/blocks.3"):
        got = sorted((m.step, m.value) for m in client.get_metric_history(cut_run.info.run_id, key))
        want = sorted((m.step, m.value) for m in ref_client.get_metric_history(ref_run.info.run_id, key))
        assert got == want, key  # every epoch exactly once, with the uninterrupted values
    for key in ("test_acc", "test_acc_last", "best_val_acc"):
        assert cut_run.data.metrics[key] == ref_run.data.metrics[key]
    assert not (out / "checkpoints").exists() and (out / "finished.json").is_file()  # removed once finished


def test_a_checkpoint_half_written_by_a_killed_run_is_ignored_then_removed(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    checkpoint.save(tmp_path, 0, model, optimizer, {"epoch": 1}, keep=2)
    half = tmp_path / "checkpoints" / ".tmp-epoch-0001-999999"  # killed (another pid) before its rename
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"partial")
    assert checkpoint.latest(tmp_path).name == "epoch-0000"
    with torch.no_grad():
        model.weight.add_(1.0)
    checkpoint.save(tmp_path, 1, model, optimizer, {"epoch": 2}, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch-0000", "epoch-0001"]
    fresh = torch.nn.Linear(3, 2)
    state = checkpoint.load(checkpoint.latest(tmp_path), fresh, torch.optim.SGD(fresh.parameters(), lr=0.1))
    assert state == {"epoch": 2} and torch.equal(fresh.weight, model.weight)


@pytest.mark.slow
def test_absurd_learning_rate_stops_with_a_clear_message(tmp_path, digits_folder):
    out = tmp_path / "out"
    proc = run_cli(["--dataset", f"imagefolder:{digits_folder}", "--image_size", "48", "--batch_size", "8",
                    "--val_fraction", "0.25", "--train_per_class", "0", "--epochs", "2", "--tricks", "none",
                    "--lr", "1e30", "--output_dir", out, "--tracking_uri", f"sqlite:///{tmp_path}/m.db"], cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and re.search(r"loss became non-finite at epoch 0, step \d+", lines[0]), proc.stderr
    assert checkpoint.latest(out) is None
    _, (run,) = mlflow_runs(f"sqlite:///{tmp_path}/m.db")
    assert run.info.status == "FAILED"


def test_divergence_never_overwrites_the_last_good_checkpoint(tmp_path, digits_folder, monkeypatch):
    from rifle import config as C
    from rifle import trainer
    from rifle.trainer import NonFiniteLoss, fit

    cfg = C.build({"dataset": f"imagefolder:{digits_folder}", "image_size": 48, "batch_size": 8,
                   "val_fraction": 0.25, "train_per_class": 0, "epochs": 3, "tricks": "none",
                   "output_dir": str(tmp_path / "out"), "tracking_uri": f"sqlite:///{tmp_path}/m.db"})
    built = []  # the model fit trains: the one the trainer builds (tricks none: no second, source model)
    build_model = trainer.build_model
    monkeypatch.setattr(trainer, "build_model", lambda *a, **k: built.append(build_model(*a, **k)) or built[-1])

    def poison(epoch, metrics):  # a fault after epoch 0's checkpoint: the weights become NaN
        if epoch == 0:
            (model,) = built
            with torch.no_grad():
                model.head.weight.fill_(float("nan"))

    with pytest.raises(NonFiniteLoss, match="epoch 1, step 0"):
        fit(cfg, callbacks=[poison])
    last = checkpoint.latest(tmp_path / "out")
    assert last.name == "epoch-0000"
    from safetensors.torch import load_file
    saved = load_file(str(last / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in saved.values() if t.is_floating_point())
    head = next(t for name, t in saved.items() if name.split(".")[-2:] == ["head", "weight"])
    assert torch.isnan(built[0].head.weight).all() and head.shape == built[0].head.weight.shape  # poisoned live


@pytest.mark.slow
def test_tracking_server_lost_mid_run_stops_in_one_line_and_resumes_once_it_is_back(tmp_path, digits_folder):
    """A real `mlflow server` killed while the run trains: the run checkpoints, stops within the network deadline
    with one line (exit 75), and the same command resumes it into the same MLflow run once the server is back
    on the same store: every epoch logged exactly once."""
    port, backend, out = free_port(), f"sqlite:///{tmp_path}/server.db", tmp_path / "out"
    cmd = [sys.executable, "-m", "rifle", "train", *args(digits_folder, out, f"http://127.0.0.1:{port}"),
           "--epochs", "24", "--network_timeout", "6"]
    with mlflow_server(backend, tmp_path, port=port):
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        assert wait_for(lambda: proc.poll() is not None or epochs_saved(out) >= 3, timeout=300, interval=0.01)
        assert proc.poll() is None, proc.stderr.read()[-2000:]
    started = time.monotonic()  # the server is gone
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr[-2000:]
    assert time.monotonic() - started < 40
    line = stderr.strip().splitlines()[-1]
    assert line.startswith(f"rifle train: error: the MLflow server http://127.0.0.1:{port} does not answer") and \
        "checkpointed in" in line and "run the same command again once the server answers" in line
    stopped_at = epochs_saved(out)
    assert 3 <= stopped_at < 24
    # 0-based, as the checkpoint's name and MLflow's steps: the newest checkpoint is epoch-<stopped_at - 1>
    assert f"with epoch {stopped_at - 1} (of 0..23) checkpointed in {out}" in line

    with mlflow_server(backend, tmp_path, port=port) as uri:
        again = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stderr[-2000:]
        client, runs = mlflow_runs(uri)
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train_loss")]
        assert sorted(steps) == list(range(24))  # each epoch once: none lost with the server, none twice
