"""What a run records of its environment (env.* tags, git_commit and git_dirty, MLflow's mlflow.source.* tags),
and which of those tags decide whether two runs may be paired (env.COMPARED) and which are only recorded."""
import subprocess
from importlib import metadata
from pathlib import Path

import pandas as pd
import pytest

from helpers import tiny_config
from rifle import env
from rifle.evidence import tables
from rifle.track.tracker import entry_point

NOW = {k: "1.0" for k in env.KEYS} | {"env.torch": "2.14.1", "env.torchvision": "0.29.1", "env.timm": "1.0.31",
                                      "env.pillow": "13.0.0", "env.cuda": "none", "env.device": "Intel Xeon (AVX512)",
                                      "env.threads": "1", "env.deterministic": "false", "env.mlflow": "3.17.2"}
BEFORE = {"env.torch": "2.14.1", "env.cuda": "none", "env.device": "Intel Xeon (AVX512)", "env.threads": "1",
          "env.deterministic": "false"}  # a run from before the package tags


def runs_in(*environments) -> pd.DataFrame:
    """plain and rifle on seeds 0 and 1, seed s measured in environments[s]."""
    rows = [{"dataset": "digits", "protocol": "validated", "method": m, "seed": s, "run_id": f"{m}{s}", "params": {},
             "test_acc": 0.8 + 0.01 * s + 0.02 * i, **{k: where.get(k) for k in env.KEYS}}
            for s, where in enumerate(environments) for i, m in enumerate(("plain", "rifle"))]
    return pd.DataFrame(rows)


def test_only_tags_that_change_numbers_refuse_a_pairing():
    assert set(env.COMPARED) == {"env.torch", "env.torchvision", "env.timm", "env.pillow", "env.cuda", "env.device",
                                 "env.threads", "env.deterministic"}
    assert set(env.KEYS) == set(env.COMPARED) | {"env.datasets", "env.numpy", "env.accelerate", "env.mlflow",
                                                 "env.optuna"}
    # another mlflow: recorded, not compared; the runs pair and the table names one environment
    built = tables.evidence(runs_in(NOW, NOW | {"env.mlflow": "3.18.0", "env.optuna": "5.2.0"}))
    assert built["paired"]["n"].tolist() == [2]
    assert "Environment: torch 2.14.1, torchvision 0.29.1, timm 1.0.31, Pillow 13.0.0, CUDA none, Intel Xeon " \
           "(AVX512), 1 thread, deterministic false." in built["markdown"]
    # another torchvision: other pixels, so refused, naming the tag
    with pytest.raises(ValueError, match=r"digits: runs were measured in different environments \(env.torchvision: "
                                         r"0.29.1 vs 0.30.0\)"):
        tables.evidence(runs_in(NOW, NOW | {"env.torchvision": "0.30.0"}))
    for key in ("env.timm", "env.pillow"):
        with pytest.raises(ValueError, match=key):
            tables.check_environments(runs_in(NOW, NOW | {key: "0"}))
    # a run from before the package tags cannot be shown to match one after them
    with pytest.raises(ValueError, match=r"env.torchvision: 0.29.1 vs not recorded"):
        tables.check_environments(runs_in(NOW, BEFORE))
    assert len(tables.evidence(runs_in(NOW, BEFORE), allow_mixed_env=True)["paired"]) == 1


def test_describe_keeps_the_line_of_runs_before_the_package_tags():
    assert env.describe(BEFORE) == "torch 2.14.1, CUDA none, Intel Xeon (AVX512), 1 thread, deterministic false"
    assert env.describe({}) == "environment not recorded (runs made before env.* tags)"
    assert env.describe({"env.mlflow": "3.17.2"}) == "environment not recorded (runs made before env.* tags)"
    assert tables.evidence(runs_in(BEFORE, BEFORE))["markdown"].count(
        "Environment: torch 2.14.1, CUDA none, Intel Xeon (AVX512), 1 thread, deterministic false.") == 2


def git(folder, *args) -> str:
    return subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, check=True).stdout


@pytest.mark.slow
def test_git_state_of_a_checkout(tmp_path):
    package = tmp_path / "repo" / "pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    assert env.git_state(package) == {}  # not a checkout
    git(tmp_path / "repo", "init", "-q")
    assert env.git_state(package) == {}  # a checkout that does not track the package (an installed one in a repo)
    git(tmp_path / "repo", "add", ".")
    git(tmp_path / "repo", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    head = git(tmp_path / "repo", "rev-parse", "HEAD").strip()
    assert env.git_state(package) == {"git_commit": head, "git_dirty": "false"}
    (package / "__init__.py").write_text("x = 1\n")
    assert env.git_state(package) == {"git_commit": head, "git_dirty": "true"}


@pytest.mark.slow
def test_a_training_run_records_its_environment_and_source(tmp_path, digits_folder):
    """A child run made with the client, as sweeps and campaigns make them (MLflow gives it no source tags)."""
    import mlflow

    import rifle
    from rifle.trainer import fit
    cfg = tiny_config(tmp_path, digits_folder, tricks="", epochs=1)
    client = mlflow.tracking.MlflowClient(cfg.run.tracking_uri)
    exp_id = client.create_experiment("env", artifact_location=str(tmp_path / "artifacts"))
    child = client.create_run(exp_id).info.run_id
    fit(cfg, mlflow_run_id=child)
    tags = client.get_run(child).data.tags
    assert set(env.KEYS) <= set(tags) and "not installed" not in {tags[k] for k in env.KEYS}
    for key, names in env.PACKAGES.items():
        assert tags[key] == metadata.version(names[0]), key
    import torch
    assert tags["env.torch"] == torch.__version__ and tags["env.threads"] == str(torch.get_num_threads())
    assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.source.name"] == entry_point() != ""
    package = Path(rifle.__file__).parent
    if subprocess.run(["git", "ls-files", "--error-unmatch", "__init__.py"], cwd=package,
                      capture_output=True).returncode == 0:  # run from a checkout (the tests' usual case)
        head = git(package, "rev-parse", "HEAD").strip()
        dirty = "true" if git(package, "status", "--porcelain").strip() else "false"
        assert (tags["git_commit"], tags["git_dirty"], tags["mlflow.source.git.commit"]) == (head, dirty, head)
    else:
        assert not {"git_commit", "git_dirty", "mlflow.source.git.commit"} & set(tags)
