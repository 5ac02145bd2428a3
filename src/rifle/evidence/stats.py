"""Statistics of rifle report, rifle compare and the campaigns' views: mean ± std over seeds, paired differences
(scipy's paired t-test, the exact sign-flip test beside it, the smallest difference the seeds can resolve),
Holm's adjustment, which methods pair up, the line saying what a table measures."""
from __future__ import annotations

import math

import numpy as np

from ..keys import DEFAULT_SELECTION, TEST_ACC, TEST_ACC_LAST
from ..methods import method_label, method_sort_key, method_tricks

# The numbers a table can show; every run logs both (test_acc_last may be missing in older runs).
METRICS = {TEST_ACC: "test accuracy at the checkpoint the run's `selection` chose",
           TEST_ACC_LAST: "test accuracy at the last epoch"}
SELECTIONS = {"best_val": "the epoch with the best validation accuracy", "last": "the last epoch"}


def metric_note(metric: str, selections: dict[str, set[str]]) -> str:
    """The line every table carries, so unlike numbers are never read alike (`selections`: method -> the
    `selection` values of its runs)."""
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {', '.join(METRICS)}, got {metric!r}")
    if metric != TEST_ACC:
        return f"Metric: {metric}, {METRICS[metric]} (no checkpoint selection)."
    used = sorted(set().union(*selections.values())) if selections else [DEFAULT_SELECTION]
    if len(used) == 1:
        return f"Metric: test_acc, test accuracy at the checkpoint selected by {used[0]} " \
               f"({SELECTIONS.get(used[0], used[0])})."
    per = "; ".join(f"{s}: {', '.join(sorted((m for m, v in selections.items() if s in v), key=method_sort_key))}"
                    for s in used)
    return f"Metric: test_acc, test accuracy at the checkpoint each run's selection chose, which differs " \
           f"between runs ({per}): these numbers are not measured alike."


def mean_std(values) -> tuple[float, float, int]:
    """(mean, sample std, n); std is nan below two values, mean nan for none."""
    x = np.asarray(list(values), dtype=float)
    return (float(x.mean()) if x.size else math.nan, float(x.std(ddof=1)) if x.size > 1 else math.nan, x.size)


def paired_difference(a, b, confidence: float = 0.95) -> dict:
    """n, mean_diff, sd_diff, ci_low, ci_high and p_value of scipy.stats.ttest_rel(a, b) (a[i], b[i]: one seed),
    p_signflip (`sign_flip_p`) and mde (`mde` at MDE_ALPHA and MDE_POWER); nan below two pairs. Equal
    differences: t's p nan, zero-width interval (scipy would test rounding noise); the sign-flip test holds."""
    from scipy import stats

    a, b = np.asarray(list(a), dtype=float), np.asarray(list(b), dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired samples need equal lengths, got {a.size} and {b.size}")
    d = a - b
    mean = float(d.mean()) if d.size else math.nan
    out = {"n": d.size, "mean_diff": mean, "sd_diff": math.nan, "ci_low": math.nan, "ci_high": math.nan,
           "p_value": math.nan, "p_signflip": math.nan, "mde": math.nan}
    if d.size < 2:
        return out
    out["p_signflip"] = sign_flip_p(d)
    if float(np.ptp(d)) <= 1e-12:  # equal up to float rounding (0.9-0.8 vs 0.8-0.7)
        return out | {"sd_diff": 0.0, "ci_low": mean, "ci_high": mean, "mde": 0.0}
    test = stats.ttest_rel(a, b)
    ci = test.confidence_interval(confidence_level=confidence)
    sd = float(d.std(ddof=1))
    return out | {"sd_diff": sd, "ci_low": float(ci.low), "ci_high": float(ci.high), "p_value": float(test.pvalue),
                  "mde": mde(sd, d.size)}


EXACT_PAIRS = 16  # up to 2^16 sign patterns are enumerated; beyond, a seeded sample of as many


def sign_flip_p(d) -> float:
    """Two-sided p of the sign-flip (paired permutation) test of mean(d) = 0: under the null each difference's
    sign is a coin flip, so no normality is assumed (the t-test's assumption, untestable with 5 seeds).
    scipy.stats.permutation_test with permutation_type="samples" on one sample flips signs; exact (all 2^n
    patterns) for n <= EXACT_PAIRS. nan below two pairs (scipy needs two)."""
    from scipy import stats

    d = np.asarray(list(d), dtype=float)
    if d.size < 2:
        return math.nan
    exact = d.size <= EXACT_PAIRS
    return float(stats.permutation_test((d,), np.mean, permutation_type="samples", vectorized=True, axis=-1,
                                        n_resamples=np.inf if exact else 2 ** EXACT_PAIRS,
                                        rng=None if exact else np.random.default_rng(0)).pvalue)


def min_sign_flip_p(n: int) -> float:
    """The smallest two-sided p the sign-flip test can give with n pairs: every difference of one sign is 2 of
    the 2^n patterns (0.0625 for n = 5: with 5 seeds this test never reaches 0.05)."""
    return 2.0 / 2 ** n if n >= 1 else math.nan


MDE_ALPHA, MDE_POWER = 0.05, 0.8


def mde(sd_diff: float, n: int, alpha: float = MDE_ALPHA, power: float = MDE_POWER) -> float:
    """The minimum detectable paired difference: the true mean difference a two-sided paired t-test at `alpha`
    finds with probability `power` given n pairs whose differences have standard deviation sd_diff,
    (t_{1-alpha/2, n-1} + t_{power, n-1}) * sd_diff / sqrt(n) (the usual approximation to the noncentral t).
    nan below two pairs or without an sd."""
    from scipy import stats

    if n < 2 or not math.isfinite(sd_diff):
        return math.nan
    return float((stats.t.ppf(1 - alpha / 2, n - 1) + stats.t.ppf(power, n - 1)) * sd_diff / math.sqrt(n))


def holm(p_values) -> list[float]:
    """Holm-Bonferroni adjusted p-values (Holm 1979; scipy has only FDR control) in input order; nan is no test.
    The k-th smallest of m is multiplied by m-k+1, then made monotone and capped at 1."""
    p = [float(x) for x in p_values]
    order = sorted((i for i, x in enumerate(p) if math.isfinite(x)), key=lambda i: p[i])
    out, running = [math.nan] * len(p), 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - k) * p[i]))
        out[i] = running
    return out


def trick_set(label: str) -> set[str]:
    """The tricks of a method label; a label a tool chose (a study name) counts as one opaque trick."""
    try:
        return set(method_tricks(label))
    except ValueError:
        return {label}


def comparisons(methods, reference: str = "rifle") -> list[tuple[str, str]]:
    """(with-reference, without) pairs: the reference alone against every method without it, and X+reference
    against X (RIFLE+L2-SP vs L2-SP, as in the paper)."""
    ref = set(method_tricks(method_label(reference)))
    have = sorted(set(methods), key=method_sort_key)
    parts = {m: trick_set(m) for m in have}
    return [(r, m) for r in have if ref <= parts[r] for m in have
            if not ref <= parts[m] and (parts[r] == ref or parts[r] - ref == parts[m])]
