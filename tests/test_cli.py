"""Bad input fails before any training: one line naming the option, exit code 2."""
import pytest

from conftest import run_cli
from rifle import config as C


@pytest.mark.parametrize("args,needle", [
    (["--model", "timm:no_such_net"], "--model: timm has no model 'no_such_net'"),
    (["--model", "resnet50"], "--model: unknown model 'resnet50'"),
    (["--dataset", "mnist"], "--dataset: unknown dataset 'mnist'"),
    (["--dataset", "imagefolder:/nonexistent/flowers"], "--dataset: directory not found"),
    (["--epochs", "3", "--reinit_times", "3"], "--reinit_times: 3 re-initializations need at least 4 epochs"),
    (["--lr", "fast"], "--lr: expected a number, got 'fast'"),
    (["--lr", "-0.1"], "--lr: must be > 0.0"),
    (["--tricks", "rifle,mixup"], "--tricks: unknown method 'mixup'"),
    (["--mixed_precision", "fp8"], "--mixed_precision: got 'fp8', allowed: no, fp16, bf16"),
    (["--epochs", "2.5"], "--epochs: expected an integer"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, args, needle):
    proc = run_cli([*args, "--output_dir", tmp_path / "out"], cwd=tmp_path, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert not (tmp_path / "mlflow.db").exists()  # nothing was started


def test_help_documents_every_option(tmp_path):
    proc = run_cli(["--help"], cwd=tmp_path, timeout=60)
    assert proc.returncode == 0
    for name in C.all_fields():
        assert f"--{name}" in proc.stdout


def test_yaml_config_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.05\n  epochs: 9\ntricks:\n  reinit_times: 2\nseed: 3\n")
    cfg = C.build({"seed": "4"}, str(path))
    assert (cfg.optim.lr, cfg.optim.epochs, cfg.tricks.reinit_times, cfg.run.seed) == (0.05, 9, 2, 4)
    assert cfg.optim.head_lr == 0.05 and cfg.data.hflip is False  # derived: head follows lr; digits unflipped
    with pytest.raises(C.ConfigError, match="--lrate: unknown option"):
        C.build({"lrate": 1})


def test_default_output_dir_identifies_the_config():
    a, b = C.build({}), C.build({"lr": 0.02})
    assert a.run.output_dir == C.build({}).run.output_dir != b.run.output_dir
    assert C.build({"experiment": "other"}).run.output_dir == a.run.output_dir  # tracking is not training


def test_weights_that_cannot_be_fetched_exit_2_with_one_line(tmp_path, digits_folder):
    # An empty weights cache and a proxy that refuses every connection: offline, whatever the machine has.
    env = {"TORCH_HOME": str(tmp_path / "torch"), "https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    proc = run_cli(["--model", "torchvision:resnet18", "--dataset", f"imagefolder:{digits_folder}", "--epochs", "2",
                    "--image_size", "48", "--output_dir", tmp_path / "out", "--tracking_uri",
                    f"sqlite:///{tmp_path}/m.db"], tmp_path, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("rifle.train: error: --model: cannot fetch the ImageNet "
                                                     "weights of torchvision:resnet18"), proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_bad_key_in_a_yaml_config_names_the_file(tmp_path):
    path = tmp_path / "my.yaml"
    path.write_text("optim:\n  epoch: 3\n")
    with pytest.raises(C.ConfigError, match=r"--epoch: unknown option \(did you mean epochs\?\) \(in .*my.yaml\)"):
        C.build(config_file=str(path))
    path.write_text("lr: fast\n")
    with pytest.raises(C.ConfigError, match=r"--lr: expected a number, got 'fast' \(in .*my.yaml\)"):
        C.build(config_file=str(path))
    with pytest.raises(C.ConfigError, match=r"^--lr: expected a number, got 'slow'$"):  # the flag's value: no file
        C.build({"lr": "slow"}, config_file=str(path))
