"""Does re-initializing the head push larger gradients into the lower blocks? A mechanism probe.

RIFLE's argument (Li et al., ICML 2020, Sec. 3): a fresh fully-connected layer makes the loss large
again, so backpropagation carries meaningful updates deep into the network. This probe trains plain
fine-tuning with the offline study's settings up to the epoch where RIFLE (K=1) re-initializes its head,
then, on the same training batches and the same weights, measures each backbone block's gradient norm
with the trained head and with the re-initialized head RIFLE would draw there. Ratio > 1: the re-init
sends a larger gradient into that block.

    python benchmarks/reinit_gradients.py               # 5 seeds, about 2 minutes on 2 CPU cores
    python benchmarks/reinit_gradients.py --seeds 2 --epochs 20
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile

import torch.nn.functional as F

from rifle import config as C
from rifle.commands.options import trainer_options
from rifle.models import block_names
from rifle.plan import BASE
from rifle.probes import block_of
from rifle.schedules import rifle_reinit_epochs
from rifle.seeds import reinit_seed, seed_process, stream_seed
from rifle.trainer import setup, train_epoch
from rifle.tricks.rifle import reinit_linear_


class _NoBar:
    def update(self, n):
        pass


def block_grad_norms(s, blocks: list[str], epoch: int) -> tuple[dict[str, float], float]:
    """Per-block L2 norm of the gradient of the mean training loss (one pass, fixed order), and the loss.
    Weights and BN statistics are restored afterwards: the probe changes nothing."""
    saved = copy.deepcopy(s.raw.state_dict())
    s.raw.train()
    s.raw.zero_grad(set_to_none=True)
    seed_process(stream_seed(s.cfg.run.seed, epoch, s.acc.process_index))
    s.loaders[0].set_epoch(epoch)
    total, batches = 0.0, 0
    for images, labels in s.loaders[0]:
        loss = F.cross_entropy(s.model(images), labels)
        loss.backward()
        total, batches = total + float(loss.detach()), batches + 1
    sq = dict.fromkeys(blocks, 0.0)
    for name, p in s.raw.backbone.named_parameters():
        block = block_of(name, blocks)
        if block is not None and p.grad is not None:
            sq[block] += float((p.grad / batches).pow(2).sum())
    s.raw.zero_grad(set_to_none=True)
    s.raw.load_state_dict(saved)
    return {b: v ** 0.5 for b, v in sq.items()}, total / batches


def probe(seed: int, epochs: int, overrides: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = C.build(BASE | overrides | {"tricks": "", "seed": seed, "epochs": epochs, "output_dir": f"{tmp}/run",
                                          "tracking_uri": f"sqlite:///{tmp}/mlflow.db", "keep_checkpoints": 1})
        s = setup(cfg)
        reinit_at = rifle_reinit_epochs(epochs, 1)[0]
        for epoch in range(reinit_at + 1):  # plain fine-tuning up to the end of RIFLE's first period
            seed_process(stream_seed(cfg.run.seed, epoch, s.acc.process_index))  # as the trainer's fit
            s.loaders[0].set_epoch(epoch)
            train_epoch(s, epoch, _NoBar())
        blocks = block_names(s.raw.backbone)
        trained, loss_trained = block_grad_norms(s, blocks, reinit_at + 1)
        trained_norm = s.raw.head.weight.norm().item()
        reinit_linear_(s.raw.head, seed=reinit_seed(seed, 1))  # the head RIFLE draws at its first re-init
        fresh, loss_fresh = block_grad_norms(s, blocks, reinit_at + 1)
        fresh_norm = s.raw.head.weight.norm().item()
        s.tracker.end()
    return {"blocks": blocks, "ratio": {b: fresh[b] / trained[b] for b in blocks}, "trained": trained,
            "fresh": fresh, "loss": (loss_trained, loss_fresh), "head_norm": (trained_norm, fresh_norm),
            "epoch": reinit_at}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=BASE["epochs"], help="the run's length (RIFLE K=1 re-inits "
                   "at its middle)")
    trainer_options(p, skip=("seed", "epochs"), what="for every seed's run, e.g. --lr 0.02")
    args = p.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    overrides = {k: v for k, v in vars(args).items() if k not in ("seeds", "epochs")}
    results = []
    for seed in range(args.seeds):
        r = probe(seed, args.epochs, overrides)
        results.append(r)
        print(f"seed {seed}: after epoch {r['epoch']}: train loss {r['loss'][0]:.4f} with the trained head, "
              f"{r['loss'][1]:.4f} with a fresh one; head weight norm {r['head_norm'][0]:.2f} -> "
              f"{r['head_norm'][1]:.2f}; gradient ratio fresh/trained, median over blocks "
              f"{statistics.median(r['ratio'].values()):.2f}", flush=True)
    blocks = results[0]["blocks"]
    print(f"\nper-block gradient norm, fresh head / trained head (median over {len(results)} seeds, "
          f"min-max), input side first:")
    for b in blocks:
        ratios = [r["ratio"][b] for r in results]
        print(f"  {b:>10}: {statistics.median(ratios):8.2f}   ({min(ratios):.2f}-{max(ratios):.2f})   "
              f"trained-head gradient {statistics.median(r['trained'][b] for r in results):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
