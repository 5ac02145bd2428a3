"""Independent random streams: one seed per (purpose, training seed, epoch, process rank).

Seeds made by arithmetic overlap: with `seed * c + epoch (+ rank)`, seed s+1 replays seed s one epoch
later and rank r at epoch e replays rank 0 at epoch e + r, so runs over seeds (and the processes of one
run) would share randomness that confidence intervals over seeds assume independent. Here the whole tuple
is hashed by numpy's SeedSequence (O'Neill's seed_seq design, numpy.random.SeedSequence), so distinct
tuples give unrelated 64-bit seeds.

Purposes:
- order    the training sampler's permutation of an epoch. No rank: every process splits the same order
           into its shard of each global batch.
- depth    stochastic depth's keep/drop decision per block and mini-batch. No rank: every process must
           drop the same blocks, as one global batch would.
- process  a process's global generators (Python, NumPy, torch on every device): augmentation without
           loader workers, dropout and DropConnect masks, per-sample stochastic depth, DisturbLabel noise.
- workers  the training loader's generator, which seeds its worker processes (augmentation with
           num_workers > 0) each epoch.

Imports only NumPy: the configuration layer may use it before torch loads.
"""
from __future__ import annotations

import numpy as np

# Fixed codes (not list positions) so that adding a purpose never moves another stream.
PURPOSES = {"order": 1, "depth": 2, "process": 3, "workers": 4}
SHARED = ("order", "depth")  # identical on every process: no rank


def stream_seed(seed: int, epoch: int, rank: int | None = None, purpose: str = "process") -> int:
    """The 64-bit seed of one stream. `rank` is None exactly for the streams every process shares."""
    if purpose not in PURPOSES:
        raise ValueError(f"unknown stream {purpose!r}: one of {', '.join(PURPOSES)}")
    if (rank is None) != (purpose in SHARED):
        raise ValueError(f"the {purpose!r} stream is {'the same on every' if purpose in SHARED else 'one per'} "
                         f"process: {'no rank' if purpose in SHARED else 'a rank'} expected, got rank={rank!r}")
    # Four words, each below 2**32: a fixed-length entropy, so no two tuples feed SeedSequence the same words.
    words = (PURPOSES[purpose], seed, epoch, 0 if rank is None else rank + 1)
    if not all(isinstance(w, (int, np.integer)) and 0 <= w < 2**32 for w in words):
        raise ValueError(f"seed, epoch and rank + 1 must be integers in [0, 2**32), got {words[1:]}")
    return int(np.random.SeedSequence([int(w) for w in words]).generate_state(1, np.uint64)[0])


def seed_process(stream: int) -> None:
    """Seed this process's global generators, Python's, NumPy's and torch's (all devices), from one seed."""
    import random

    import torch
    random.seed(stream)
    np.random.seed([stream & 0xFFFF_FFFF, stream >> 32])  # the legacy seed takes 32-bit words
    torch.manual_seed(stream)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The training order of `n` examples in `epoch`: a permutation from the (seed, epoch) order stream."""
    return np.random.default_rng(stream_seed(seed, epoch, purpose="order")).permutation(n)


class EpochOrder:
    """The training loader's sampler: `epoch_order` of the epoch last set with `set_epoch`.

    Accelerate splits it into per-process batches and calls `set_epoch` (DataLoaderShard.set_epoch) before
    each pass; iterating never moves the epoch, so an extra pass (DELTA's attention measurement) or a
    resumed run sees the order the uninterrupted run saw.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(epoch_order(self.n, self.seed, self.epoch).tolist())
