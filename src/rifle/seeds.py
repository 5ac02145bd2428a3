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

Streams derived otherwise, each by a named function here that keeps its formula: changing one would change
numbers already published (tables, reference cells, tests/test_recorded.py), so they stay as they were.
- `reinit_seed(run_seed, index)`     RIFLE's new head at its index-th re-init (tricks/rifle.py).
- `sampler_seed(base, trial_number)` a sweep's TPE sampler, reseeded at every trial (workers/worker.py).
- `attention_seed(split_seed)`       DELTA's channel-attention measurement (tricks/delta.py): the data's seed,
                                     not the training seed, so a sweep's seeds share one cached measurement.
- `TEST_SPLIT_SEED`                  the test set held out of a source without one (data/sources.py).
Seeds used as they are: `split_seed` draws the validation carve-out and the k-shot and label-rate subsets
(data/sources.py), the run's seed initializes the model and its head (accelerate's set_seed in
trainer.make_model), and the sign-flip test's Monte Carlo draws use a fixed 0 (evidence/stats.py).

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


# The held-out test set of a source that ships only train (and the built-in digits' halves): fixed whatever
# split_seed is, so every split seed is tested on the same images.
TEST_SPLIT_SEED = 0
# DELTA's attention stream: (this, split_seed) hashed, apart from every training stream.
ATTENTION_SALT = 0xDE17A


def reinit_seed(run_seed: int, index: int) -> int:
    """The generator seed of the `index`-th re-init (1-based) of RIFLE's head, the same on every process.

    Arithmetic, not `stream_seed`: the formula predates the streams and every published RIFLE number draws its
    heads from it (seed 0's first head is seed 7919 of torch), so it stays."""
    return run_seed * 100_003 + 7919 * index


def sampler_seed(base: int, trial_number: int) -> int:
    """The seed of a sweep's TPE sampler for trial `trial_number` of a study seeded `base`: parallel workers never
    draw the same random start-up point, and a one-worker study is reproducible.

    Arithmetic, not `stream_seed`: kept, so a study seeded as before proposes the same trials."""
    return base * 1_000_003 + trial_number


def attention_seed(split_seed: int) -> int:
    """The seed of DELTA's channel-attention measurement (its classifier's init and its passes over the data):
    63 bits of SeedSequence([ATTENTION_SALT, split_seed]).

    A SeedSequence hash, as `stream_seed`, but of other words: kept, so cached and published attentions (and the
    runs that used them) stay valid."""
    return int(np.random.SeedSequence([ATTENTION_SALT, split_seed]).generate_state(1, np.uint64)[0] >> 1)


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
