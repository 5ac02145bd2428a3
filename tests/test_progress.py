"""Progress a person can follow when output is piped, and a finished run that says so instead of retraining."""
import re

import pytest

from conftest import run_cli
from rifle.progress import epoch_line


def test_epoch_line():
    line = epoch_line(2, 20, {"train_loss": 0.5123, "val_acc": 0.87, "lr_backbone": 0.009, "lr_head": 0.009,
                              "head_reinit": 1.0}, 2.14, 34.2)
    assert line == ("epoch 2 of 0..19: train_loss 0.512, val_acc 0.870, lr 0.009/0.009 (backbone/head), head "
                    "re-initialized, 2.1 s/epoch, ~34 s left")
    assert "val_acc" not in epoch_line(0, 4, {"train_loss": 1, "lr_backbone": 1, "lr_head": 1}, 1, 5000)
    assert epoch_line(0, 4, {"train_loss": 1, "lr_backbone": 1, "lr_head": 1}, 1, 5000).endswith("~83 min left")


@pytest.mark.slow
def test_piped_run_prints_one_line_per_epoch_and_a_finished_run_is_not_retrained(tmp_path, digits_folder):
    out = tmp_path / "out"
    args = ["--dataset", f"imagefolder:{digits_folder}", "--image_size", "48", "--batch_size", "16",
            "--val_fraction", "0.25", "--epochs", "4", "--tracking_uri", f"sqlite:///{tmp_path}/mlflow.db",
            "--output_dir", out]
    first = run_cli(args, tmp_path)  # stdout and stderr are pipes here, as under mlflow run or a scheduler
    assert first.returncode == 0, first.stderr[-2000:]
    lines = [line for line in first.stdout.splitlines() if line.startswith("epoch ")]
    # 0-based as MLflow's steps: the re-init after epoch 1 is head_reinit at step 1
    assert [line.split(":")[0] for line in lines] == [f"epoch {e} of 0..3" for e in range(4)]
    assert "head re-initialized" in lines[1] and "re-initialized" not in lines[2]  # K=1: after epoch 1 of 0..3
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    reinit = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "head_reinit")}
    assert reinit == {0: 0, 1: 1, 2: 0, 3: 0}
    selected = int(run.data.metrics["selected_epoch"])
    assert f"checkpoint of epoch {selected}" in first.stdout  # the result line's epoch is the log's and MLflow's
    assert (out / f"best-{selected:04d}.safetensors").is_file()  # and the weights file's
    assert re.search(r"val_acc 0\.\d{3}, .* s/epoch, ~\d+ s left$", lines[0]), lines[0]
    assert (out / "finished.json").is_file() and not (out / "checkpoints").exists()  # removed once finished
    assert list(out.glob("best-*.safetensors"))  # the selected weights stay
    again = run_cli(args, tmp_path)
    assert again.returncode == 0 and "epoch 0 of" not in again.stdout
    assert "holds the finished run" in again.stdout and "not trained again" in again.stdout
    result = [line for line in first.stdout.splitlines() if line.startswith("run ")]
    assert result and result == [line for line in again.stdout.splitlines() if line.startswith("run ")]
    kept = run_cli(args[:-2] + ["--output_dir", tmp_path / "kept", "--keep_finished_checkpoints", "true"], tmp_path)
    assert kept.returncode == 0 and (tmp_path / "kept" / "checkpoints").is_dir()
