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
    assert len(client.get_run(cut.info.run_id).inputs.dataset_inputs) == 3  # train, val, test: once, resumed or not
    with pytest.raises(C.ConfigError, match="--lr: .* holds a run made with lr=0.01"):
        fit(tiny(tmp_path, out="cut", epochs=4, reinit_times=1, lr=0.02))


@pytest.mark.slow
def test_two_processes_make_one_run_with_identical_weights(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "rifle", "train", *TINY,
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


def test_gradient_accumulation_steps_as_the_full_batch():
    """train_step frees the spent gradients just before the next backward (not right after the step, which costs a
    CPU step 9%): two windows of two accumulated half-batches update the weights as two full batches do, so no
    window starts from the last one's gradients and no micro-batch's gradients are dropped."""
    import torch

    from rifle.models import param_groups
    from rifle.trainer import Session, make_accelerator, train_step

    class Tiny(torch.nn.Module):  # no BatchNorm: a half-batch's gradient is half the full batch's
        def __init__(self):
            super().__init__()
            self.backbone, self.head = torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.backbone(x)))

    x, y = torch.randn(2, 8, 6, generator=torch.Generator().manual_seed(0)), torch.tensor([[0, 1, 2, 0] * 2] * 2)
    weights = []
    for accum in (1, 2):
        cfg = C.build({"grad_accum_steps": accum, "lr": 0.1, "head_lr": 0.1, "epochs": 1, "momentum": 0.9,
                     "tricks": ""})
        torch.manual_seed(0)
        raw, acc = Tiny(), make_accelerator(cfg)
        model, optimizer = acc.prepare(raw, torch.optim.SGD(param_groups(raw), lr=0.1, momentum=0.9))
        s = Session(cfg, acc, Path("."), raw, model, optimizer, (), [], {}, None, None, {})
        for images, labels in zip(x, y):
            for part in range(accum):
                chunk = slice(part * 8 // accum, (part + 1) * 8 // accum)
                train_step(s, images[chunk], labels[chunk], 0, 0.0)
        weights.append(torch.cat([p.detach().flatten() for p in raw.parameters()]))
    torch.manual_seed(0)
    plain = Tiny()  # the textbook loop
    optimizer = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    for images, labels in zip(x, y):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(plain(images), labels).backward()
        optimizer.step()
    want = torch.cat([p.detach().flatten() for p in plain.parameters()])
    for got in weights:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_dataset_sources_name_where_the_images_come_from(tmp_path):
    """Each kind of dataset gets a truthful MLflow source, without loading anything: a Hub id (or a registry name
    that resolves to one) at the commit the run loaded and the source's own split, a folder for imagefolder:,
    disk: and local Hub-style folders, and scikit-learn's loader for the built-in digits."""
    from rifle.track.inputs import source_of
    commit = "1ef09e021b0b65b40337f6f285909656f407f6e0"
    hub = source_of("cub200", None, commit, "train")
    assert hub._get_source_type() == "hugging_face"
    assert (hub.path, hub.split, hub.revision) == ("bentrevett/caltech-ucsd-birds-200-2011", "train", commit)
    assert source_of("hub:owner/name", None, "abc", "validation").to_dict()["path"] == "owner/name"
    for spec in (f"imagefolder:{tmp_path}", f"disk:{tmp_path}", f"hub:{tmp_path}"):
        local = source_of(spec, None, None, "train")
        assert local._get_source_type() == "local" and local.uri == str(tmp_path.resolve()), spec
    digits = source_of("digits", None, None, None)
    assert digits._get_source_type() == "code" and digits.to_dict()["tags"]["loader"] == "sklearn.datasets.load_digits"


@pytest.mark.slow
def test_a_run_logs_its_train_val_and_test_data_as_mlflow_datasets(tmp_path, digits_folder):
    """The digits folder (4 classes, 8 train and 4 test images each; a quarter of train held out for validation):
    three dataset inputs with their contexts, sizes and the folder as source; the digest changes with the data."""
    import json

    from helpers import tiny_config

    from rifle.trainer import fit
    cfg = tiny_config(tmp_path, digits_folder, tricks="", epochs=1)
    result = fit(cfg)
    client, _ = mlflow_runs(cfg.run.tracking_uri)
    inputs = client.get_run(result["run_id"]).inputs.dataset_inputs
    got = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset for i in inputs}
    assert set(got) == {"training", "validation", "test"}
    sizes = {context: json.loads(d.profile)["num_rows"] for context, d in got.items()}
    assert sizes == {"training": 24, "validation": 8, "test": 16}
    for context, split in (("training", "train"), ("validation", "val"), ("test", "test")):
        d = got[context]
        assert d.name == f"imagefolder:{digits_folder.name}:{split}" and d.source_type == "local"
        assert json.loads(d.source)["uri"] == str(digits_folder.resolve())
        assert json.loads(d.profile)["num_classes"] == 4 and "image" in d.schema and len(d.digest) == 10
    assert len({d.digest for d in got.values()}) == 3
    # other training images (train_per_class 2): another train digest
    fewer = fit(tiny_config(tmp_path, digits_folder, name="fewer", tricks="", epochs=1, train_per_class=2))
    other = {i.dataset.name: i.dataset.digest for i in client.get_run(fewer["run_id"]).inputs.dataset_inputs}
    assert other[got["training"].name] != got["training"].digest
    assert len(client.get_run(fewer["run_id"]).inputs.dataset_inputs) == 3


@pytest.mark.slow
def test_a_repeated_quick_start_is_one_result_with_its_environment(tmp_path, monkeypatch, capsys):
    """The README's quick start twice with the same parameters: the second `mlflow run` makes a new MLflow run
    while the output_dir is finished, so that run becomes a complete copy of the first (params, tags, dataset
    inputs, every metric; tagged finished_earlier_in_run) and the report shows one result, with its environment.
    Then a copy from a finished.json of before the tracker's record (params only, no env.* tags) under
    MLFLOW_RUN_ID, as `mlflow run` starts it: still one result, the original's."""
    import json

    from rifle.commands import report, train
    from rifle.track import reads
    from rifle.trainer import already_finished
    values = {"epochs": 2, "reinit_times": 1, "image_size": 48, "train_per_class": 3, "batch_size": 16,
              "log_weights": "false", "output_dir": tmp_path / "out"}
    args = " ".join(f"-P {k}={v}" for k, v in values.items())
    env, first = readme_shell(tmp_path, args)
    assert first.returncode == 0, first.stderr[-3000:]
    _, second = readme_shell(tmp_path, args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "epoch 0 of" not in second.stdout  # not trained again
    client, runs = mlflow_runs(env["MLFLOW_TRACKING_URI"])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    copy, original = sorted(runs, key=lambda r: "finished_earlier_in_run" in r.data.tags, reverse=True)
    orig_id, copy_id = original.info.run_id, copy.info.run_id
    assert copy.data.tags["finished_earlier_in_run"] == orig_id and "resumed_from_run" not in copy.data.tags
    assert f"holds the finished run {orig_id}" in second.stdout and f"copied into run {copy_id}" in second.stdout
    assert f"run {orig_id}: test_acc=" in second.stdout  # the result line: the same result, of the original
    assert copy.data.params == original.data.params
    own = ("mlflow.runName", "finished_earlier_in_run")  # the run's own name; the copy's mark
    assert {k: v for k, v in copy.data.tags.items() if k not in own} == \
        {k: v for k, v in original.data.tags.items() if k not in own}
    for key in ("env.torch", "env.device", "env.threads", "dataset_fingerprint", "tricks", "selected_before_reinit",
                "selected_before_last_reinit", "mlflow.source.type", "mlflow.source.git.commit"):
        assert copy.data.tags.get(key) == original.data.tags[key], key
    keys = [k for k in original.data.metrics if not k.startswith("system/")]  # the copy trained nothing
    assert copy.data.metrics.keys() >= set(keys)
    for key in keys:
        history = [(m.step, m.value) for m in client.get_metric_history(orig_id, key)]
        assert sorted((m.step, m.value) for m in client.get_metric_history(copy_id, key)) == sorted(history), key

    def inputs(run_id):
        return sorted((i.dataset.name, i.dataset.digest, i.dataset.profile, i.tags[0].value)
                      for i in client.get_run(run_id).inputs.dataset_inputs)
    assert inputs(copy_id) == inputs(orig_id) and len(inputs(orig_id)) == 3

    def reported():
        found = reads.fetch_runs(env["MLFLOW_TRACKING_URI"])
        assert report.main(["--tracking_uri", env["MLFLOW_TRACKING_URI"], "--no_log", "--output_dir",
                            str(tmp_path / "report")]) == 0
        return found, capsys.readouterr().out

    found, md = reported()
    assert found["run_id"].tolist() == [orig_id] and found.attrs == {"duplicates": [], "copies": [copy_id]}
    assert f"Environment: torch {original.data.tags['env.torch']}" in md
    assert "not recorded" not in md and "run(s) repeating" not in md

    # A copy from a finished.json written before the record, into a run `mlflow run` made (MLFLOW_RUN_ID).
    done = json.loads((tmp_path / "out" / "finished.json").read_text())
    del done["logged"]
    made = client.create_run(client.get_experiment_by_name("Default").experiment_id).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", made)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    cfg = train.parse([a for k, v in values.items() for a in (f"--{k}", str(v))])
    assert already_finished(cfg, done, None)["run_id"] == orig_id
    legacy = client.get_run(made)
    assert legacy.data.tags["finished_earlier_in_run"] == orig_id and "env.torch" not in legacy.data.tags
    assert legacy.data.params["reinit_count"] == "1" and legacy.data.metrics["test_acc"] == original.data.metrics[
        "test_acc"]
    found, md = reported()
    assert found["run_id"].tolist() == [orig_id] and sorted(found.attrs["copies"]) == sorted([copy_id, made])
    assert f"Environment: torch {original.data.tags['env.torch']}" in md and "run(s) repeating" not in md
