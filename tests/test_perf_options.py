"""GPU-readiness options (channels_last, torch.compile, pinned memory) are correct on the CPU.

One training step with an option on must match the same step with it off (same seed, batch and weights):
kernels may only change the summation order. Whole runs cannot be compared that tightly: on batches of 8,
a difference of 1e-6 after one step grows to about 1% of the loss within three SGD steps, whatever the
option, so the run with every option on is checked for finite losses within 10% of the default's and the same
re-inits (not its test accuracy: on 16 test images after 2 epochs near chance, one machine's summation order
moved it by 5 images).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import mlflow_runs
from helpers import tiny_config

OPTIONS = {"channels_last": {"channels_last": True},
           "compile": {"compile": True, "compile_backend": "aot_eager"},  # inductor: ~2 min of C++ builds here
           "pin_memory": {"pin_memory": True}}


def tiny(tmp_path, folder, name, **values):
    return tiny_config(tmp_path, folder, name, run_name=name, **values)


def first_step(session):
    """Loss and gradients of the first training batch, as the trainer computes them."""
    from accelerate.utils import set_seed
    set_seed(0)
    session.model.train()
    images, labels = next(iter(session.loaders[0]))
    loss = F.cross_entropy(session.model(images), labels)
    session.acc.backward(loss)
    grads = {n: p.grad.detach().clone() for n, p in session.raw.named_parameters() if p.grad is not None}
    session.tracker.end()
    return images, loss.item(), grads


@pytest.fixture(scope="module")
def default_step(tmp_path_factory, digits_folder):
    from rifle.trainer import setup
    tmp = tmp_path_factory.mktemp("perf")
    return first_step(setup(tiny(tmp, digits_folder, "default")))


@pytest.mark.parametrize("name", OPTIONS)
def test_first_step_matches_default(tmp_path, digits_folder, default_step, name):
    from rifle.trainer import setup
    s = setup(tiny(tmp_path, digits_folder, name, **OPTIONS[name]))
    if name == "channels_last":
        stem = s.raw.backbone.conv_stem.weight
        assert stem.is_contiguous(memory_format=torch.channels_last) and not stem.is_contiguous()
    if name == "compile":
        assert getattr(s.model, "_orig_mod", None) is s.raw  # the compiled wrapper shares the module
    if name == "pin_memory":
        assert s.loaders[0].pin_memory == torch.cuda.is_available() and s.loaders[0]._non_blocking
    images, loss, grads = first_step(s)
    want_images, want_loss, want_grads = default_step
    assert torch.equal(images, want_images)
    if name == "channels_last":
        # the loader yields uint8 images; the model normalizes them on the device into channels_last
        assert s.raw.prepare(images).is_contiguous(memory_format=torch.channels_last)
        assert not s.raw.prepare(images).is_contiguous()
    assert loss == pytest.approx(want_loss, rel=1e-5)
    assert grads.keys() == want_grads.keys()
    # On this batch (digits: flat backgrounds, so BatchNorm divides by tiny variances) fp32 backbone gradients
    # are ill-conditioned: measured against fp64, the default layout is 0.2-0.4% off and channels_last 1-1.4%.
    # A wrong layout or graph is off by O(1), so 5% separates the two; the head's gradient is exact to 1e-4.
    for key, tol in (("backbone.conv_stem.weight", 0.05), ("backbone.blocks.3.0.conv_pw.weight", 0.05),
                     ("backbone.conv_head.weight", 0.05), ("head.weight", 1e-3)):
        err = (grads[key] - want_grads[key]).norm() / want_grads[key].norm()
        assert err < tol, (key, float(err))
    flat, want = (torch.cat([g[k].flatten() for k in sorted(g)]) for g in (grads, want_grads))
    assert F.cosine_similarity(flat, want, dim=0) > 0.999


@pytest.mark.slow
def test_run_with_every_option_on(tmp_path, digits_folder):
    """channels_last + compile + pin_memory through a RIFLE run (the in-place head re-init under compile),
    against the default run."""
    from rifle.trainer import fit
    on = {k: v for option in OPTIONS.values() for k, v in option.items()}
    fit(tiny(tmp_path, digits_folder, "default"))
    fit(tiny(tmp_path, digits_folder, "fast", **on))
    client, runs = mlflow_runs(f"sqlite:///{tmp_path}/mlflow.db")
    hist = {r.info.run_name: [m.value for m in client.get_metric_history(r.info.run_id, "train_loss")] for r in runs}
    reinit = {r.info.run_name: [m.value for m in client.get_metric_history(r.info.run_id, "head_reinit")] for r in runs}
    assert len(hist["fast"]) == 2 and all(math.isfinite(v) for v in hist["fast"])
    assert hist["fast"] == pytest.approx(hist["default"], rel=0.1)
    assert reinit["fast"] == reinit["default"] == [1.0, 0.0]


@pytest.mark.slow
def test_speed_options_are_run_only(tmp_path, digits_folder):
    """They change how, not what, is trained: same default output_dir, and a run resumes with them on."""
    from rifle.trainer import fit
    plain = {"output_dir": ""}
    assert tiny(tmp_path, digits_folder, "x", **plain).run.output_dir == \
        tiny(tmp_path, digits_folder, "x", channels_last=True, pin_memory=True, compile=True, **plain).run.output_dir
    first = fit(tiny(tmp_path, digits_folder, "r", epochs=2, tricks=""))
    again = fit(tiny(tmp_path, digits_folder, "r", epochs=2, tricks="", channels_last=True))
    assert again["test_acc"] == first["test_acc"] and again["run_id"] == first["run_id"]
