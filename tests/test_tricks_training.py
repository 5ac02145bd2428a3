"""Every method, alone and with RIFLE, through the real trainer on real images, tracked in MLflow."""
import math
import sys
from pathlib import Path
import subprocess

import pytest

from conftest import mlflow_runs, subprocess_env
from rifle import config as C
from helpers import CANONICAL, EVIDENCE, WITH_RIFLE, tiny_config

COMBOS = [[m] for m in C.TRICK_NAMES] + [["rifle", m] for m in WITH_RIFLE]


def small(tmp_path, folder, tricks, **values):
    options = {k: v for name in tricks for k, v in CANONICAL[name].items()}
    return tiny_config(tmp_path, folder, tricks=",".join(tricks), **options, **values)


# 19 runs of a few seconds each; the fast subset keeps one: RIFLE with L2-SP.
@pytest.mark.parametrize("tricks", [t if t == ["rifle", "l2sp"] else pytest.param(t, marks=pytest.mark.slow)
                                    for t in COMBOS], ids=lambda t: "+".join(t))
def test_method_trains_acts_and_is_tracked(tmp_path, digits_folder, tricks):
    from rifle.trainer import fit

    result = fit(small(tmp_path, digits_folder, tricks))
    client, runs = mlflow_runs(f"sqlite:///{tmp_path}/mlflow.db")
    run = runs[0]
    history = run.data.metrics
    for name in ("train_loss", "val_acc", "lr_backbone", "test_acc", "weight_dist/conv_stem", "grad_norm/conv_stem"):
        assert name in history, name
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    for name in tricks:
        evidence = EVIDENCE[name]
        if name == "cyclic_lr":  # each epoch's learning rate (its last step's) on the fitted triangle
            from rifle.schedules import fitted_triangular_lr
            steps = int(run.data.params["optimizer_steps"]) // 2  # per epoch
            c, cycles = CANONICAL["cyclic_lr"], int(run.data.params["clr_cycles"])
            want = [fitted_triangular_lr((e + 1) * steps - 1, 2 * steps, cycles, c["clr_base_lr"], c["clr_max_lr"])
                    for e in range(2)]
            lrs = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "lr_backbone"))
            assert cycles == 2 and [v for _, v in lrs] == pytest.approx(want), (lrs, want)
            assert lrs[-1][1] == c["clr_base_lr"]  # the run ends at the bottom of a cycle
            continue
        if name == "head_lr_restart":  # the head's cosine restarted at the second period; never re-initialized
            lr_head = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "lr_head"))
            assert [v for _, v in lr_head] == [0.01, 0.01]  # 2 epochs, K=1: each epoch starts a period
            assert [m.value for m in client.get_metric_history(run.info.run_id, "head_reinit")] == [0.0, 0.0]
            continue
        values = [m.value for m in client.get_metric_history(run.info.run_id, evidence)]
        assert values and max(values) > 0, (evidence, values)
    assert run.data.params["tricks"] == ",".join(tricks)
    # what fit returns is what the run logged, and the selected checkpoint's number is its epoch's
    assert {k: result[k] for k in ("test_acc", "test_acc_last", "selected_epoch")} == {
        k: run.data.metrics[k] for k in ("test_acc", "test_acc_last", "selected_epoch")}
    if result["selected_epoch"] == 1:  # the last epoch selected: the same weights, the same number
        assert result["test_acc"] == result["test_acc_last"]


@pytest.mark.slow
def test_methods_under_two_processes_are_reproducible(tmp_path, digits_folder):
    """Masks and label noise differ per process but come from the seed: two identical launches agree."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    tricks = "rifle,delta,stochastic_depth,dropout,disturb_label"
    for attempt in ("a", "b"):
        cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "rifle", "train",
               "--dataset", f"imagefolder:{digits_folder}", "--image_size", "48", "--batch_size", "4",
               "--val_fraction", "0.25", "--train_per_class", "0", "--epochs", "2", "--tricks", tricks,
               "--disturb_alpha", "0.5", "--delta_attention_epochs", "2", "--delta_attention_batches", "1",
               "--output_dir", str(tmp_path / attempt), "--tracking_uri", uri, "--run_name", attempt]
        proc = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    client, runs = mlflow_runs(uri)
    assert len(runs) == 2
    histories = [{key: [m.value for m in client.get_metric_history(r.info.run_id, key)]
                  for key in ("train_loss", "penalty/delta", "disturb_label/flip_rate", "stochastic_depth/skip_rate")}
                 for r in runs]
    assert histories[0] == histories[1]
    assert all(v > 0 for v in histories[0]["penalty/delta"] + histories[0]["disturb_label/flip_rate"])
    assert [m.value for m in client.get_metric_history(runs[0].info.run_id, "reinit_weight_spread")] == [0.0]


def test_a_trick_registered_from_outside_trains_with_its_own_options(tmp_path, digits_folder, monkeypatch, capsys):
    """One file (tests/toy_trick.py: the class and its options) and one line (register) make a method: the
    config validates its option, the command line offers it, it trains, logs its metric and is labelled."""
    from toy_trick import Toy, ToyOptions

    from rifle import catalog
    from rifle.commands import train
    from rifle.methods import method_label
    from rifle.trainer import fit
    monkeypatch.setattr(catalog, "TRICKS", dict(catalog.TRICKS))
    monkeypatch.setattr(catalog, "OPTIONS", dict(catalog.OPTIONS))
    catalog.register("toy", Toy, ToyOptions)
    with pytest.raises(C.ConfigError, match="--toy_shift: must be >= 0"):
        C.build({"tricks": "toy", "toy_shift": -1})
    assert "--toy_shift" in train.parser().format_help() and method_label("toy,rifle") == "rifle+toy"
    cfg = tiny_config(tmp_path, digits_folder, tricks="toy", toy_shift=1)
    assert cfg.flat()["toy_shift"] == 1 and "toy_shift: 1" in C.to_yaml(cfg)
    fit(cfg)
    client, (run,) = mlflow_runs(cfg.run.tracking_uri)
    assert run.data.params["toy_shift"] == "1" and run.data.params["tricks"] == "toy"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "toy/shifted")] == [1.0, 1.0]
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert losses[-1] < losses[0], losses  # it trains, towards the shifted labels



@pytest.mark.slow
def test_cyclic_lr_ends_training_at_its_base_rate(tmp_path, digits_folder):
    """3 epochs with a half-cycle of 2 epochs asked: one whole cycle fitted (not 0.75), so the last step trains at
    clr_base_lr (Smith 2017, Sec. 3.3), and the cycle count is a param of the run."""
    from rifle.trainer import fit
    cfg = tiny_config(tmp_path, digits_folder, tricks="cyclic_lr", epochs=3, clr_base_lr=0.002, clr_max_lr=0.02,
                      clr_step_epochs=2)
    fit(cfg)
    client, (run,) = mlflow_runs(cfg.run.tracking_uri)
    lrs = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "lr_backbone"), key=lambda m: m.step)]
    assert run.data.params["clr_cycles"] == "1" and len(lrs) == 3
    assert lrs[-1] == 0.002 and lrs[0] > 0.002  # epoch 0 ends on the way up, the run at the base


@pytest.mark.slow
def test_head_lr_restart_follows_rifle_cyclic_head_lr_and_never_resets_the_head(tmp_path, digits_folder, monkeypatch):
    """The control and RIFLE (head_lr_policy=cyclic) on one budget: the same lr_head epoch by epoch; RIFLE resets
    the head at its epoch-end once, the control never (head_reinit 0 every epoch, the weights untouched)."""
    import torch

    from rifle import trainer
    resets = []
    end_epoch = trainer.end_epoch

    def watched(s, epoch, metrics, callbacks=()):  # the head just before and after the epoch end (tricks' hooks)
        before = s.raw.head.weight.detach().clone()
        end_epoch(s, epoch, metrics, callbacks)
        resets.append((s.cfg.trick_list[0], epoch, not torch.equal(before, s.raw.head.weight)))

    monkeypatch.setattr(trainer, "end_epoch", watched)
    runs = {}
    for tricks, extra in (("rifle", {"head_lr_policy": "cyclic"}), ("head_lr_restart", {})):
        cfg = tiny_config(tmp_path, digits_folder, name=tricks, tricks=tricks, epochs=5, reinit_times=1,
                          head_lr=0.05, run_name=tricks, **extra)
        assert cfg.optim.epochs == 4  # truncated to a multiple of K+1, for both
        trainer.fit(cfg)
    client, found = mlflow_runs(f"sqlite:///{tmp_path}/mlflow.db")
    for run in found:
        runs[run.info.run_name] = {key: [m.value for m in sorted(client.get_metric_history(run.info.run_id, key),
                                                                 key=lambda m: m.step)]
                                   for key in ("lr_head", "lr_backbone", "head_reinit")}
    assert runs["head_lr_restart"]["lr_head"] == runs["rifle"]["lr_head"]
    assert runs["rifle"]["lr_head"][2] == 0.05 and runs["rifle"]["lr_head"][1] < 0.05  # restarted at period 2
    assert runs["head_lr_restart"]["lr_backbone"] == runs["rifle"]["lr_backbone"]
    assert runs["head_lr_restart"]["head_reinit"] == [0.0] * 4 and runs["rifle"]["head_reinit"] == [0, 1, 0, 0]
    assert [r for r in resets if r[2]] == [("rifle", 1, True)]  # the control's head is never reset
    assert len(resets) == 8
