"""Statistics of rifle.report, rifle.compare and rifle.regime: mean ± std over seeds, paired differences
(scipy's paired t-test), Holm's adjustment, which methods pair up, the line saying what a table measures."""
from __future__ import annotations

import math

import numpy as np

from ..methods import method_label, method_sort_key, method_tricks

# The numbers a table can show; every run logs both (test_acc_last may be missing in older runs).
METRICS = {"test_acc": "test accuracy at the checkpoint the run's `selection` chose",
           "test_acc_last": "test accuracy at the last epoch"}
SELECTIONS = {"best_val": "the epoch with the best validation accuracy", "last": "the last epoch"}
DEFAULT_SELECTION = "best_val"  # runs from before the `selection` param selected on validation


def metric_note(metric: str, selections: dict[str, set[str]]) -> str:
    """The line every table carries, so unlike numbers are never read alike (`selections`: method -> the
    `selection` values of its runs)."""
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
    """(mean, sample std, n); std is nan below two values, mean nan for none."""
    x = np.asarray(list(values), dtype=float)
    return (float(x.mean()) if x.size else math.nan, float(x.std(ddof=1)) if x.size > 1 else math.nan, x.size)


def paired_difference(a, b, confidence: float = 0.95) -> dict:
    """n, mean_diff, sd_diff, ci_low, ci_high and p_value of scipy.stats.ttest_rel(a, b) (a[i], b[i]: one seed);
    nan below two pairs. Equal differences: p nan, zero-width interval (scipy would test rounding noise)."""
    from scipy import stats

    a, b = np.asarray(list(a), dtype=float), np.asarray(list(b), dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired samples need equal lengths, got {a.size} and {b.size}")
    d = a - b
    mean = float(d.mean()) if d.size else math.nan
    out = {"n": d.size, "mean_diff": mean, "sd_diff": math.nan, "ci_low": math.nan, "ci_high": math.nan,
           "p_value": math.nan}
    if d.size < 2:
        return out
    if float(np.ptp(d)) <= 1e-12:  # equal up to float rounding (0.9-0.8 vs 0.8-0.7)
        return out | {"sd_diff": 0.0, "ci_low": mean, "ci_high": mean}
    test = stats.ttest_rel(a, b)
    ci = test.confidence_interval(confidence_level=confidence)
    return out | {"sd_diff": float(d.std(ddof=1)), "ci_low": float(ci.low), "ci_high": float(ci.high),
                  "p_value": float(test.pvalue)}


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
