"""The statistics of reports and comparisons: mean ± std over seeds, the paired difference of two methods over
shared seeds (scipy's paired t-test and its t-interval), Holm's adjustment, which methods pair up, and the
line saying what a table measures. Pure functions, no pandas: rifle.compare and rifle.regime use them too.
"""
from __future__ import annotations

import math

import numpy as np

from .methods import method_label, method_sort_key, method_tricks

# The numbers a table can show; every run logs both (test_acc_last may be missing in older runs).
METRICS = {"test_acc": "test accuracy at the checkpoint the run's `selection` chose",
           "test_acc_last": "test accuracy at the last epoch"}
SELECTIONS = {"best_val": "the epoch with the best validation accuracy", "last": "the last epoch"}
DEFAULT_SELECTION = "best_val"  # runs from before the `selection` param selected on validation


def metric_note(metric: str, selections: dict[str, set[str]]) -> str:
    """The line every table carries: the metric and, for test_acc, the selection that chose the checkpoint
    (`selections`: method -> the `selection` values of its runs), so unlike numbers are never read alike."""
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {', '.join(METRICS)}, got {metric!r}")
    if metric != "test_acc":
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
    """(mean, sample std with ddof=1, n); std is nan below two values, mean nan for none."""
    x = np.asarray(list(values), dtype=float)
    n = int(x.size)
    return (float(x.mean()) if n else math.nan, float(x.std(ddof=1)) if n > 1 else math.nan, n)


def paired_difference(a, b, confidence: float = 0.95) -> dict:
    """n, mean_diff, sd_diff (ddof=1), ci_low, ci_high (t-interval of the mean difference) and p_value
    (two-sided) of scipy.stats.ttest_rel(a, b), a[i] and b[i] being the same seed. Below two pairs all but the
    mean are nan; when every difference is equal there is no spread to test against: p is nan and the
    interval has zero width (scipy would report rounding noise as a tiny p)."""
    from scipy import stats

    a, b = np.asarray(list(a), dtype=float), np.asarray(list(b), dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired samples need equal lengths, got {a.size} and {b.size}")
    d = a - b
    n = int(d.size)
    out = {"n": n, "mean_diff": float(d.mean()) if n else math.nan, "sd_diff": math.nan,
           "ci_low": math.nan, "ci_high": math.nan, "p_value": math.nan}
    if n < 2:
        return out
    if float(np.ptp(d)) <= 1e-12:  # equal up to float rounding (0.9-0.8 vs 0.8-0.7)
        return out | {"sd_diff": 0.0, "ci_low": out["mean_diff"], "ci_high": out["mean_diff"]}
    test = stats.ttest_rel(a, b)
    ci = test.confidence_interval(confidence_level=confidence)
    return out | {"sd_diff": float(d.std(ddof=1)), "ci_low": float(ci.low), "ci_high": float(ci.high),
                  "p_value": float(test.pvalue)}


def holm(p_values) -> list[float]:
    """Holm-Bonferroni adjusted p-values (Holm 1979; scipy has only FDR control), in the input order; nan
    entries stay nan and are no tests. The k-th smallest of m p is multiplied by m-k+1, then made monotone
    (running maximum) and capped at 1."""
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
    """(with-reference, without) pairs: the reference alone against every method without it, and each
    combination holding it against the same combination without it (RIFLE+L2-SP vs L2-SP, as in the paper)."""
    ref = set(method_tricks(method_label(reference)))
    have = sorted(set(methods), key=method_sort_key)
    parts = {m: trick_set(m) for m in have}
    return [(r, m) for r in have if ref <= parts[r] for m in have
            if not ref <= parts[m] and (parts[r] == ref or parts[r] - ref == parts[m])]
