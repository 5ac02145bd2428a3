"""The benchmarks' own code: the mechanism probe measures without changing the model, on the real trainer; the
preflight benchmark's plan is one that rifle preflight and rifle campaign both take."""
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import preflight_estimate  # noqa: E402
import reinit_gradients as RG  # noqa: E402
from common import median_ci  # noqa: E402

from rifle import config as C  # noqa: E402
from rifle.models import block_names  # noqa: E402
from rifle.trainer import setup  # noqa: E402


def test_gradient_probe_changes_nothing(tmp_path):
    cfg = C.build(RG.BASE | {"tricks": "", "epochs": 2, "train_per_class": 3, "output_dir": str(tmp_path / "run"),
                             "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"})
    s = setup(cfg)
    before = {k: v.clone() for k, v in s.raw.state_dict().items()}
    blocks = block_names(s.raw.backbone)
    norms, loss = RG.block_grad_norms(s, blocks, epoch=0)
    again, loss_again = RG.block_grad_norms(s, blocks, epoch=0)
    s.tracker.end()
    assert set(norms) == set(blocks) and all(v > 0 for v in norms.values())
    assert norms == pytest.approx(again) and loss == pytest.approx(loss_again)  # same batches, same weights
    after = s.raw.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN statistics restored
    assert all(p.grad is None for p in s.raw.parameters())


def test_gradient_probe_reports_every_block(tmp_path, capsys):
    assert RG.main(["--seeds", "1", "--epochs", "4", "--train_per_class", "3"]) == 0
    out = capsys.readouterr().out
    assert "seed 0: after epoch 1:" in out  # K=1 on 4 epochs: the re-init follows epoch 1
    for block in ("conv_stem", "blocks.0", "blocks.6", "conv_head", "bn2"):
        assert f"{block:>10}:" in out


def test_the_preflight_benchmarks_plan_parses_for_both_verbs(tmp_path):
    from rifle.commands import campaign, preflight
    argv = preflight_estimate.plan_args(tmp_path, epochs=2, train_per_class=3, image_size=40, seeds=1)
    for verb in (campaign, preflight):
        args = verb.parser().parse_args(argv)
        assert (args.epochs, args.train_per_class, args.seeds, args.methods) == ("2", "3", 1, "plain,rifle")
    assert campaign.build(campaign.parser().parse_args(argv)).overrides["image_size"] == "40"


def test_the_median_ci_is_the_binomial_order_statistics():
    """(a)'s interval: for 15 pairs the 4th and 12th smallest (coverage 96.5%), for 30 the 10th and 21st; too few
    values for 95% give the whole range."""
    assert median_ci(list(range(15, 0, -1))) == (4, 12)
    assert median_ci([float(v) for v in range(1, 31)]) == (10.0, 21.0)
    assert median_ci([3, 1, 2]) == (1, 3)
