"""The gradient-flow probe: per-block gradient norms every epoch and around each head re-init."""
import pytest
import torch
from torch import nn

from conftest import mlflow_runs
from rifle import config as C
from rifle.models import block_names
from rifle.probes import BlockProbe


def test_grad_norms_are_each_blocks_gradient_norm():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    blocks = ["0", "2"]
    reference = {n: p.detach().clone() for n, p in net.named_parameters()}
    probe = BlockProbe(net, blocks, reference, window=1, boundaries=[1, 2])
    probe.on_epoch_start(2)  # after the re-init of epoch 1, and ending with another
    expected = []
    for step in range(3):
        net.zero_grad()
        net(torch.randn(8, 4)).pow(2).sum().backward()
        expected.append([torch.cat([p.grad.flatten() for p in net[i].parameters()]).norm() for i in (0, 2)])
        probe.after_backward(scale=2.0 if step == 2 else 1.0)
    expected[2] = [v / 2 for v in expected[2]]  # a loss scale is divided out
    out = {}
    probe.on_epoch_metrics(2, out)
    assert out["weight_dist/0"] == out["weight_dist/2"] == 0.0  # nothing moved
    means = torch.tensor(expected).mean(0)
    assert out["grad_norm/0"] == pytest.approx(float(means[0]), rel=1e-5)
    assert out["grad_norm/2"] == pytest.approx(float(means[1]), rel=1e-5)
    assert out["grad_norm_post_reinit/0"] == pytest.approx(float(expected[0][0]), rel=1e-5)  # first step
    assert out["grad_norm_pre_reinit/2"] == pytest.approx(float(expected[2][1]), rel=1e-5)   # last step
    probe.on_epoch_start(4)
    net.zero_grad()
    net[2].weight.grad = torch.ones_like(net[2].weight)  # a block without gradient this step counts as 0
    probe.after_backward()
    out = {}
    probe.on_epoch_metrics(4, out)
    assert out["grad_norm/0"] == 0 and out["grad_norm/2"] == pytest.approx(15 ** 0.5)
    assert not any("reinit" in k for k in out)


@pytest.mark.parametrize("tricks", ["rifle", pytest.param("none", marks=pytest.mark.slow)])
def test_every_run_logs_gradient_norms_per_block_and_around_period_boundaries(tmp_path, digits_folder, tricks):
    """RIFLE's re-init and plain fine-tuning's same epoch boundary are measured alike (post / pre side by side)."""
    from rifle.trainer import fit
    cfg = C.build({"dataset": f"imagefolder:{digits_folder}", "image_size": 48, "batch_size": 8,
                   "val_fraction": 0.25, "tricks": tricks, "epochs": 4, "log_weights": False,
                   "probe_reinit_steps": 2, "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
                   "output_dir": str(tmp_path / "out")})
    fit(cfg)
    client, runs = mlflow_runs(cfg.run.tracking_uri)
    run_id = runs[0].info.run_id
    from rifle.models import build_model
    blocks = block_names(build_model("efficientnet_lite0", 4, pretrained=False).backbone)
    metrics = runs[0].data.metrics
    for b in blocks:
        assert {m.step for m in client.get_metric_history(run_id, f"weight_dist/{b}")} == {0, 1, 2, 3}
        assert {m.step for m in client.get_metric_history(run_id, f"grad_norm/{b}")} == {0, 1, 2, 3}
        assert metrics[f"grad_norm/{b}"] > 0
        # K=1 in 4 epochs: the period boundary after epoch 1 (RIFLE re-initializes the head there)
        assert [m.step for m in client.get_metric_history(run_id, f"grad_norm_pre_reinit/{b}")] == [1]
        assert [m.step for m in client.get_metric_history(run_id, f"grad_norm_post_reinit/{b}")] == [2]
    assert ("head_reinit" in metrics) == (tricks == "rifle")
    # the backbone's block order, which the report's per-block panels follow without building the network
    assert runs[0].data.tags["block_order"] == ",".join(blocks)
    from rifle.track import reads
    assert reads.fetch_runs(cfg.run.tracking_uri)["block_order"].tolist() == [blocks]
