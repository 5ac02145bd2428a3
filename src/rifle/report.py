"""Tables and figures from training histories and MLflow runs.

    python -m rifle.report [--tracking_uri URI] [--experiment NAME] [--parent_run_id ID] [--output_dir DIR]
                           [--metric test_acc] [--reference rifle] [--baseline plain] [--group_by dataset]

From the finished runs of an experiment (default: of every experiment; or the child runs of a comparison
run) it builds
- the paper-style table: datasets x methods, the metric (test_acc: the checkpoint each run's `selection`
  chose; test_acc_last: the last epoch) mean ± std over seeds, best mean per dataset marked, and the paired
  difference reference − other over the seeds both share (mean, 95% t-interval, paired t-test), where the
  reference is the method with RIFLE and the other the same method without it; Markdown and CSV. Every
  table says which metric and selection it shows, and how many RIFLE runs selected a checkpoint before
  their first re-initialization;
- the mechanism figure: per-block distance to the pretrained weights at the end of training, reference
  versus baseline, input side first, and the same over epochs with the head re-initializations marked;
- the training-dynamics figure: validation accuracy and head learning rate over epochs per method;
and logs them as MLflow artifacts under `report/` of a new `report` run (or of the parent run).

A method is the label that rifle.compare / rifle.study tagged on the run, else the label of the `tricks`
param (rifle.methods: canonical order joined by '+', "plain" for none). The statistics are pure functions;
the notebooks in notebooks/ call the functions of this module.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
import warnings
from pathlib import Path

import numpy as np

from .methods import PLAIN, method_label, method_sort_key, method_tricks

REPORT_TAG = "rifle.report"
# Run tags holding a method label chosen by the tool that made the run (rifle.compare, rifle.study): two
# settings of one trick list (e.g. RIFLE K=1 and K=3) stay apart. Without one, the label comes from `tricks`.
METHOD_TAGS = ("compare.method", "study_method")
# Metrics fetched per epoch for the figures (weight_dist/<block> keys are found per run).
HISTORY_KEYS = ("val_acc", "train_acc", "lr_head", "head_reinit")
PROBE_PREFIXES = ("weight_dist/", "grad_norm/", "grad_norm_pre_reinit/", "grad_norm_post_reinit/")
# The numbers a table can show; every run logs both (test_acc_last may be missing in older runs).
METRICS = {"test_acc": "test accuracy at the checkpoint the run's `selection` chose",
           "test_acc_last": "test accuracy at the last epoch"}
SELECTIONS = {"best_val": "the epoch with the best validation accuracy", "last": "the last epoch"}
DEFAULT_SELECTION = "best_val"  # runs from before the `selection` param selected on validation
# Tag of a RIFLE run whose selected checkpoint precedes its first head re-init ('true'/'false').
BEFORE_REINIT_TAG = "selected_before_reinit"


# ----------------------------------------------------------------------------------------------------
# Pure functions: statistics and what a table says about itself

def metric_note(metric: str, selections: dict[str, set[str]]) -> str:
    """The line every table carries: the metric it shows and, for test_acc, the selection that chose the
    checkpoint (`selections`: method -> the `selection` values of its runs)."""
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
    """Statistics of the paired differences a[i] - b[i] (the same seed in both).

    mean, sd (ddof=1), the t-distribution confidence interval of the mean difference, and the two-sided
    paired t-test p-value (scipy.stats.ttest_rel). Below two pairs the interval and p are nan; when every
    difference is the same (no spread to test against) p is nan and the interval has zero width.
    """
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
    sd = float(d.std(ddof=1))
    out["sd_diff"] = sd
    if float(np.ptp(d)) <= 1e-12:  # equal up to float rounding (0.9-0.8 vs 0.8-0.7): no spread to test against
        out["sd_diff"] = 0.0
        out["ci_low"] = out["ci_high"] = out["mean_diff"]
        return out
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    out |= {"ci_low": out["mean_diff"] - half, "ci_high": out["mean_diff"] + half,
            "p_value": float(stats.ttest_rel(a, b).pvalue)}
    return out


def holm(p_values) -> list[float]:
    """Holm-Bonferroni adjusted p-values (Holm 1979), in the input order; nan entries stay nan and do not
    count as tests. A family of m comparisons: the k-th smallest p is multiplied by m-k+1, then made
    monotone (running maximum) and capped at 1."""
    p = [float(x) for x in p_values]
    order = sorted((i for i, x in enumerate(p) if math.isfinite(x)), key=lambda i: p[i])
    out, running = [math.nan] * len(p), 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - k) * p[i]))
        out[i] = running
    return out


def comparisons(methods, reference: str = "rifle") -> list[tuple[str, str]]:
    """(with-reference, without) pairs: the reference alone against every method without it, and each
    combination holding it against the same combination without it (RIFLE+L2-SP vs L2-SP, as in the paper)."""
    ref = set(method_tricks(method_label(reference)))
    have = sorted(set(methods), key=method_sort_key)
    parts = {m: _trick_set(m) for m in have}
    pairs = []
    for r in have:
        if not ref <= parts[r]:
            continue
        for m in have:
            if ref <= parts[m]:
                continue
            if parts[r] == ref or parts[r] - ref == parts[m]:
                pairs.append((r, m))
    return pairs


def _trick_set(label: str) -> set[str]:
    """The tricks of a method label; a label a tool chose (a study name) counts as one opaque trick."""
    try:
        return set(method_tricks(label))
    except ValueError:
        return {label}


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "dataset"


def dataset_label(spec: str) -> str:
    """Short row label: the folder name of imagefolder:/disk:/hub: paths, the spec otherwise."""
    for prefix in ("imagefolder:", "disk:", "hub:"):
        if spec.startswith(prefix) and os.sep in spec:
            return f"{prefix}{Path(spec[len(prefix):].rstrip(os.sep)).name}"
    return spec


# ----------------------------------------------------------------------------------------------------
# Tables from a runs DataFrame (one row per finished run: dataset, method, seed, test_acc, ...)

def summarize(runs, metric: str = "test_acc") -> "pd.DataFrame":
    """Per dataset and method over the runs that have `metric`: n, mean, std, seeds, best (highest mean of
    its dataset; ties all best), selection (the runs' `selection` values), before_reinit of reinit_tagged
    (runs tagged selected_before_reinit=true, of the runs carrying that tag)."""
    import pandas as pd

    runs = runs[runs[metric].notna()]
    rows = []
    for (dataset, method), g in runs.groupby(["dataset", "method"], sort=False):
        mean, std, n = mean_std(g[metric])
        selection = g["selection"] if "selection" in g else [DEFAULT_SELECTION]
        tagged = g[BEFORE_REINIT_TAG].dropna() if BEFORE_REINIT_TAG in g else []
        rows.append({"dataset": dataset, "method": method, "n": n, "mean": mean, "std": std,
                     "seeds": " ".join(str(s) for s in sorted(g["seed"])),
                     "selection": ",".join(sorted(set(selection))),
                     "before_reinit": int(sum(bool(t) for t in tagged)), "reinit_tagged": len(tagged)})
    cols = ["dataset", "method", "n", "mean", "std", "seeds", "selection", "before_reinit", "reinit_tagged"]
    table = pd.DataFrame(rows, columns=cols)
    table["best"] = table["mean"] == table.groupby("dataset")["mean"].transform("max")
    table["_k"] = table["method"].map(method_sort_key)
    return table.sort_values(["dataset", "_k"], kind="stable").drop(columns="_k").reset_index(drop=True)


def paired_differences(runs, reference: str = "rifle", confidence: float = 0.95,
                       metric: str = "test_acc") -> "pd.DataFrame":
    """Per dataset and comparison (see `comparisons`): metric(with reference) - metric(without) over the
    seeds both have it, in columns `method` (with) and `versus` (without).

    `p_holm` adjusts the p-values for the several comparisons of one dataset (Holm-Bonferroni)."""
    import pandas as pd

    runs = runs[runs[metric].notna()]
    rows = []
    for dataset, g in runs.groupby("dataset", sort=True):
        by_method = {m: dict(zip(gm["seed"], gm[metric])) for m, gm in g.groupby("method")}
        first = len(rows)
        for with_ref, without in comparisons(by_method, reference):
            seeds = sorted(set(by_method[with_ref]) & set(by_method[without]))
            stats = paired_difference([by_method[with_ref][s] for s in seeds],
                                      [by_method[without][s] for s in seeds], confidence)
            rows.append({"dataset": dataset, "method": with_ref, "versus": without, **stats,
                         "seeds": " ".join(map(str, seeds))})
        for row, adjusted in zip(rows[first:], holm(r["p_value"] for r in rows[first:])):
            row["p_holm"] = adjusted
    cols = ["dataset", "method", "versus", "n", "mean_diff", "sd_diff", "ci_low", "ci_high", "p_value", "p_holm",
            "seeds"]
    return pd.DataFrame(rows, columns=cols)


def _pct(x: float, digits: int = 1) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{100 * x:.{digits}f}"


def _signed(x: float, digits: int = 2) -> str:
    return "–" if not math.isfinite(x) else f"{100 * x:+.{digits}f}"


def _p(p: float) -> str:
    return "–" if not math.isfinite(p) else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


def table_markdown(summary, paired=None, confidence: float = 0.95, notes: list[str] | None = None,
                   metric: str = "test_acc") -> str:
    """The paper-style table (percent) and the paired differences (percentage points) as Markdown, each
    saying which metric (and selection) it shows."""
    methods = sorted(summary["method"].unique(), key=method_sort_key)
    selections = {m: set(",".join(g["selection"]).split(",")) for m, g in summary.groupby("method")} \
        if "selection" in summary else {}
    what = metric_note(metric, selections)
    lines = [f"### {metric} (%), mean ± std over seeds (n)", "",
             "| dataset | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for dataset, g in summary.groupby("dataset", sort=True):
        cells = []
        for m in methods:
            row = g[g["method"] == m]
            if row.empty:
                cells.append("")
                continue
            r = row.iloc[0]
            text = f"{_pct(r['mean'])} ± {_pct(r['std'])} ({r['n']})"
            cells.append(f"**{text}**" if r["best"] else text)
        lines.append(f"| {dataset} | " + " | ".join(cells) + " |")
    lines += ["", f"Bold: the best mean of the dataset. {what}"]
    tagged = summary[summary["reinit_tagged"] > 0] if "reinit_tagged" in summary else summary.iloc[:0]
    if metric == "test_acc" and len(tagged):  # test_acc_last always follows every re-init
        counts = "; ".join(f"{d}: " + ", ".join(f"{r.method} {r.before_reinit} of {r.reinit_tagged}"
                                                for r in g.itertuples()) for d, g in tagged.groupby("dataset"))
        lines += ["", f"Selected before the first head re-initialization (tag {BEFORE_REINIT_TAG}=true: the "
                  f"checkpoint lies on plain fine-tuning's trajectory, so its number is not RIFLE's), runs: {counts}."]
    if paired is not None and len(paired):
        level = f"{100 * confidence:g}%"
        lines += ["", f"### Paired difference in {metric} (percentage points), reference − other, over the seeds "
                  "both share", "",
                  f"| dataset | comparison | n | mean diff | {level} CI (t) | p (paired t-test) | p (Holm) |",
                  "|---|---|---|---|---|---|---|"]
        for _, r in paired.iterrows():
            ci = f"[{_signed(r['ci_low'])}, {_signed(r['ci_high'])}]" if math.isfinite(r["ci_low"]) else "–"
            lines.append(f"| {r['dataset']} | {r['method']} − {r['versus']} | {r['n']} | "
                         f"{_signed(r['mean_diff'])} | {ci} | {_p(r['p_value'])} | {_p(r['p_holm'])} |")
        lines += ["", f"Reference − other: the method with the reference minus the same method without it "
                  f"(> 0: the reference is better). {what} p (Holm): adjusted for the number of comparisons in "
                  "the dataset (Holm-Bonferroni)."]
    for note in notes or []:
        lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"


RUN_KEYS = ("seed", "tricks", "output_dir", "run_name", "tracking_uri", "experiment", "log_weights",
            "register_model", "system_metrics", "keep_checkpoints", "channels_last", "compile", "compile_backend",
            "pin_memory", "num_workers", "num_proc")
TRICK_OPTIONS = ("reinit_times", "reinit_count", "head_lr_policy", "reinit_guard_epochs", "reset_head_momentum",
                 "dropout_", "dropconnect_", "sd_", "disturb_", "clr_", "l2_", "l2sp_", "delta_")


def varying_settings(runs, ignore=RUN_KEYS) -> dict:
    """Training params (not the method, seed, storage or speed options) that differ, per dataset:
    {"within": {method: [keys]}, "between": [keys]}. Within a method they break the pairing of seeds; between
    methods they mean the comparison is not under the same settings (as intended after per-method tuning).
    A trick's own options (dropout_p, ...) are logged by every run and ignored between methods."""
    out = {}
    for dataset, g in runs.groupby("dataset"):
        keys = sorted(set().union(*(p.keys() for p in g["params"])) - set(ignore))
        keys = [k for k in keys if not k.endswith("_resolved")]
        differs = lambda rows, k: len({p.get(k) for p in rows}) > 1  # noqa: E731
        within = {m: [k for k in keys if differs(gm["params"], k)] for m, gm in g.groupby("method")}
        within = {m: ks for m, ks in within.items() if ks}
        between = [k for k in keys if differs(g["params"], k) and not k.startswith(TRICK_OPTIONS)
                   and not any(k in ks for ks in within.values())]
        if within or between:
            out[dataset] = {"within": within, "between": between}
    return out


# ----------------------------------------------------------------------------------------------------
# MLflow -> DataFrames

def nearest(name: str) -> Path | None:
    """`name` in the working directory or the nearest folder above it: a notebook opened in notebooks/
    finds the mlflow.db (or optuna.journal) that the quick start wrote in the repository root."""
    here = Path.cwd().resolve()
    return next((d / name for d in (here, *here.parents) if (d / name).is_file()), None)


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else the nearest mlflow.db (see `nearest`), else sqlite:///mlflow.db."""
    from .tracking import DEFAULT_URI
    found = nearest("mlflow.db")
    return os.environ.get("MLFLOW_TRACKING_URI") or (f"sqlite:///{found}" if found else DEFAULT_URI)


def _client(tracking_uri: str | None):
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri or default_tracking_uri())


def _search_all(client, experiment_ids: list[str], filter_string: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def fetch_runs(tracking_uri: str | None = None, experiment: str | None = None, parent_run_id: str | None = None,
               group_by: tuple[str, ...] = ("dataset",)) -> "pd.DataFrame":
    """Finished training runs (those with a test_acc) as one row each: run_id, dataset (the row label: the
    `group_by` params), method, seed, test_acc, test_acc_last (nan in older runs), best_val_acc, best_epoch,
    selection (param; best_val when absent), selected_before_reinit (tag: True, False, None when absent),
    reinit_count (param; nan when absent), start_time, params (dict). With `parent_run_id`, only that run's
    children. When several runs share (dataset, method, seed) the newest is kept and the others are listed
    in `df.attrs["duplicates"]`. Without `experiment` (and parent), the runs of every experiment."""
    import pandas as pd

    client = _client(tracking_uri)
    if parent_run_id:
        exp_ids = [client.get_run(parent_run_id).info.experiment_id]
        filt = f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.status = 'FINISHED'"
    else:
        if experiment:
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                names = ", ".join(e.name for e in client.search_experiments())
                raise ValueError(f"no experiment {experiment!r} in the store (experiments: {names or 'none'})")
            exp_ids = [exp.experiment_id]
        else:  # every experiment: `mlflow run .` logs into MLflow's Default, `python -m rifle.train` into rifle
            from .tracking import all_experiment_ids
            exp_ids = all_experiment_ids(client)
        filt = "attributes.status = 'FINISHED'"
    rows = []
    for run in _search_all(client, exp_ids, filt):
        m, p = run.data.metrics, run.data.params
        if "test_acc" not in m or run.data.tags.get(REPORT_TAG) or "seed" not in p:
            continue
        label = dataset_label(p.get("dataset", "?"))
        extra = [f"{k}={p.get(k)}" for k in group_by if k != "dataset"]
        before = run.data.tags.get(BEFORE_REINIT_TAG)
        rows.append({"run_id": run.info.run_id, "run_name": run.info.run_name,
                     "dataset": label + (f" ({', '.join(extra)})" if extra else ""),
                     "method": _method_of(run.data.tags, p), "seed": int(float(p["seed"])),
                     "test_acc": m["test_acc"], "test_acc_last": m.get("test_acc_last", math.nan),
                     "best_val_acc": m.get("best_val_acc", math.nan), "best_epoch": m.get("best_epoch", math.nan),
                     "selection": p.get("selection") or DEFAULT_SELECTION,
                     BEFORE_REINIT_TAG: None if before is None else before.strip().lower() == "true",
                     "reinit_count": float(p["reinit_count"]) if p.get("reinit_count") else math.nan,
                     "model": p.get("model", ""), "start_time": run.info.start_time, "params": dict(p)})
    cols = ["run_id", "run_name", "dataset", "method", "seed", "test_acc", "test_acc_last", "best_val_acc",
            "best_epoch", "selection", BEFORE_REINIT_TAG, "reinit_count", "model", "start_time", "params"]
    df = pd.DataFrame(rows, columns=cols).sort_values("start_time", ascending=False, kind="stable")
    dup = df.duplicated(["dataset", "method", "seed"], keep="first")
    duplicates = df.loc[dup, "run_id"].tolist()
    df = df.loc[~dup].copy()
    df["_k"] = df["method"].map(method_sort_key)
    df = df.sort_values(["dataset", "_k", "seed"], kind="stable").drop(columns="_k").reset_index(drop=True)
    df.attrs["duplicates"] = duplicates
    return df


def fetch_histories(runs, tracking_uri: str | None = None, keys=HISTORY_KEYS, weight_dist: bool = True) -> "pd.DataFrame":
    """Per-epoch metrics of `runs` in long form: run_id, dataset, method, seed, key, step, value.
    With `weight_dist`, every probe metric the run has (`weight_dist/<block>`, `grad_norm/<block>` and the
    re-init windows `grad_norm_pre_reinit/<block>`, `grad_norm_post_reinit/<block>`) is included."""
    import pandas as pd

    client = _client(tracking_uri)
    rows = []
    for r in runs.itertuples(index=False):
        names = list(keys)
        if weight_dist:
            names += sorted(k for k in client.get_run(r.run_id).data.metrics if k.startswith(PROBE_PREFIXES))
        for key in names:
            for point in client.get_metric_history(r.run_id, key):
                rows.append((r.run_id, r.dataset, r.method, r.seed, key, point.step, point.value))
    return pd.DataFrame(rows, columns=["run_id", "dataset", "method", "seed", "key", "step", "value"])


def _method_of(tags: dict, params: dict) -> str:
    """The label a tool tagged (canonical when it is a trick list), else the label of the `tricks` param;
    a name no trick list has (a study name, a trick of another version) is kept as written."""
    text = next((tags[t] for t in METHOD_TAGS if tags.get(t)), None)
    text = params.get("tricks") if text is None else text
    try:
        return method_label(text)
    except ValueError:
        return text


def block_order(model_spec: str, blocks) -> list[str]:
    """`blocks` (names from weight_dist/<block>) from the input side to the head: the order of
    rifle.models.block_names on the model (built without weights), else a natural sort."""
    blocks = list(blocks)
    try:
        from .models import block_names, build_backbone
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            order = block_names(build_backbone(model_spec, pretrained=False)[0])
        known = [b for b in order if b in blocks]
        return known + sorted(set(blocks) - set(known), key=_natural)
    except Exception:  # unknown or unavailable model: the names alone
        return sorted(blocks, key=_natural)


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def final_weight_dist(histories) -> "pd.DataFrame":
    """Per run and block, weight_dist at the last logged epoch: run_id, dataset, method, seed, block, value."""
    wd = histories[histories["key"].str.startswith("weight_dist/")]
    last = wd.loc[wd.groupby(["run_id", "key"])["step"].idxmax()].copy()
    last["block"] = last["key"].str.slice(len("weight_dist/"))
    return last[["run_id", "dataset", "method", "seed", "block", "value"]].reset_index(drop=True)


def reinit_epochs(histories, method: str) -> list[int]:
    """Epochs that ended with a head re-initialization in any run of `method`."""
    h = histories[(histories["method"] == method) & (histories["key"] == "head_reinit") & (histories["value"] > 0)]
    return sorted(set(int(s) for s in h["step"]))


# ----------------------------------------------------------------------------------------------------
# Figures (matplotlib's object API: no pyplot state, no backend switch inside notebooks)

def _figure(width: float, height: float):
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), layout="constrained")


def plot_training(history: list[dict], title: str = ""):
    """Validation accuracy (training accuracy in a run without validation) and head learning rate over
    epochs; dashed lines mark head re-inits."""
    fig = _figure(6.4, 3.6)
    ax = fig.add_subplot()
    epochs = [row["epoch"] for row in history]
    key = "val_acc" if all("val_acc" in row for row in history) else "train_acc"
    ax.plot(epochs, [row[key] for row in history], marker="o", color="tab:blue", label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel(key.replace("_acc", "") + " accuracy", color="tab:blue")
    lr_ax = ax.twinx()
    lr_ax.plot(epochs, [row["lr_head"] for row in history], color="tab:orange", label="lr_head")
    lr_ax.set_ylabel("head learning rate", color="tab:orange")
    for row in history:
        if row.get("head_reinit"):
            ax.axvline(row["epoch"] + 0.5, color="tab:red", linestyle="--", linewidth=1)
    ax.set_title(title or "validation accuracy and head LR (dashed: head re-initialized)")
    return fig


def _mark_reinits(ax, epochs, color="tab:red", label=True):
    for i, e in enumerate(epochs):  # a re-init happens after epoch e's evaluation, before epoch e+1
        ax.axvline(e + 0.5, color=color, linestyle="--", linewidth=1, alpha=0.8,
                   label="head re-initialized" if label and i == 0 else None)


def plot_mechanism(histories, dataset: str, reference: str = "rifle", baseline: str = PLAIN,
                   model_spec: str = "", blocks_over_epochs=None):
    """Top left: distance of each backbone block to its pretrained weights at the end of training, mean ±
    std over seeds, reference vs baseline, input side first. Top right: the ratio reference / baseline per
    block, per shared seed (dots) and mean (line). Bottom: the distance over epochs for a few blocks (input
    side, middle, last), mean over seeds, with the reference's head re-initializations dashed."""
    reference, baseline = method_label(reference), method_label(baseline)
    h = histories[(histories["dataset"] == dataset) & histories["method"].isin([reference, baseline])]
    final = final_weight_dist(h)
    if final.empty or set(final["method"]) != {reference, baseline}:
        raise ValueError(f"{dataset}: the mechanism figure needs weight_dist/* of both {reference} and {baseline}")
    blocks = block_order(model_spec, final["block"].unique())
    colors = {reference: "tab:red", baseline: "tab:blue"}
    fig = _figure(14, 8.5)
    axd = fig.subplot_mosaic([["bars", "bars", "ratio"], ["e0", "e1", "e2"]])
    x = np.arange(len(blocks))
    for i, m in enumerate((baseline, reference)):
        g = final[final["method"] == m].groupby("block")["value"]
        mean, std, n = g.mean().reindex(blocks), g.std(ddof=1).reindex(blocks), g.size().max()
        axd["bars"].bar(x + (i - 0.5) * 0.4, mean, 0.4, yerr=std.fillna(0), capsize=2, color=colors[m],
                        label=f"{m} (n={n})")
    axd["bars"].set_xticks(x, blocks, rotation=45, ha="right")
    axd["bars"].set_ylabel("L2 distance to pretrained weights")
    axd["bars"].set_title(f"{dataset}: per-block distance at the end of training (input side → head)")
    axd["bars"].legend()
    wide = final.pivot_table(index=["seed", "block"], columns="method", values="value").dropna()
    wide["ratio"] = wide[reference] / wide[baseline]
    ratio = wide["ratio"].unstack("block").reindex(columns=blocks)
    for _, row in ratio.iterrows():
        axd["ratio"].plot(x, row.values, "o", color="gray", alpha=0.5, markersize=3)
    axd["ratio"].plot(x, ratio.mean().values, "-o", color="tab:red", label=f"mean over seeds (n={len(ratio)})")
    axd["ratio"].axhline(1.0, color="black", linewidth=0.8)
    axd["ratio"].set_xticks(x, blocks, rotation=45, ha="right")
    axd["ratio"].set_ylabel(f"distance ratio {reference} / {baseline}")
    axd["ratio"].set_title("> 1: the block moved further under " + reference)
    axd["ratio"].legend()
    chosen = list(blocks_over_epochs or [blocks[0], blocks[len(blocks) // 2], blocks[-1]])
    reinits = reinit_epochs(h, reference)
    for k, block in enumerate(chosen[:3]):
        ax = axd[f"e{k}"]
        series = h[h["key"] == f"weight_dist/{block}"]
        for m in (baseline, reference):
            g = series[series["method"] == m].groupby("step")["value"]
            mean, std = g.mean(), g.std(ddof=1).fillna(0)
            ax.plot(mean.index, mean.values, color=colors[m], label=m)
            ax.fill_between(mean.index, mean - std, mean + std, color=colors[m], alpha=0.15, linewidth=0)
        _mark_reinits(ax, reinits, label=k == 0)
        ax.set_title(f"weight_dist/{block}")
        ax.set_xlabel("epoch")
        if k == 0:
            ax.set_ylabel("L2 distance (mean ± std over seeds)")
            ax.legend(fontsize=8)
    return fig


def plot_paired(paired, confidence: float = 0.95, metric: str = "test_acc"):
    """The paired differences reference − other with their confidence intervals (percentage points), one row
    per comparison."""
    rows = paired[paired["n"] > 0].reset_index(drop=True)
    fig = _figure(7.5, 0.9 + 0.45 * max(len(rows), 1))
    ax = fig.add_subplot()
    y = np.arange(len(rows))[::-1]
    for yi, (_, r) in zip(y, rows.iterrows()):
        lo, hi = 100 * (r["mean_diff"] - r["ci_low"]), 100 * (r["ci_high"] - r["mean_diff"])
        err = [[lo], [hi]] if math.isfinite(r["ci_low"]) else None
        ax.errorbar(100 * r["mean_diff"], yi, xerr=err, fmt="o", color="tab:red", capsize=3)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(y, [f"{r['dataset']}: {r['method']} − {r['versus']} (n={r['n']})" for _, r in rows.iterrows()])
    ax.set_xlabel(f"{metric} difference (percentage points), {100 * confidence:g}% CI")
    ax.set_title("reference − other, paired over shared seeds (> 0: the reference is better)")
    return fig


def plot_dynamics(histories, dataset: str, reference: str = "rifle", methods=None):
    """Validation accuracy (training accuracy for runs without validation; mean ± std over seeds) and head
    learning rate (mean) over epochs per method; dashed lines mark the re-initializations of methods that
    contain the reference."""
    h = histories[histories["dataset"] == dataset]
    key = "val_acc" if (h["key"] == "val_acc").any() else "train_acc"
    methods = sorted(methods or h["method"].unique(), key=method_sort_key)
    ref = set(method_tricks(method_label(reference)))
    fig = _figure(13, 4.5)
    acc_ax, lr_ax = fig.subplots(1, 2)
    from matplotlib import colormaps
    cmap = colormaps["tab10"]
    for i, m in enumerate(methods):
        color = cmap(i % 10)
        g = h[h["method"] == m]
        acc = g[g["key"] == key].groupby("step")["value"]
        mean, std = acc.mean(), acc.std(ddof=1).fillna(0)
        n = g["run_id"].nunique()
        acc_ax.plot(mean.index, mean.values, color=color, label=f"{m} (n={n})")
        acc_ax.fill_between(mean.index, mean - std, mean + std, color=color, alpha=0.12, linewidth=0)
        lr = g[g["key"] == "lr_head"].groupby("step")["value"].mean()
        lr_ax.plot(lr.index, lr.values, color=color, label=m)
        if m != PLAIN and ref <= _trick_set(m):
            for ax in (acc_ax, lr_ax):
                _mark_reinits(ax, reinit_epochs(h, m), color=color, label=False)
    what = "validation" if key == "val_acc" else "training"
    acc_ax.set_title(f"{dataset}: {what} accuracy (mean ± std over seeds)")
    acc_ax.set_xlabel("epoch")
    acc_ax.set_ylabel(f"{what} accuracy")
    acc_ax.legend(fontsize=8)
    lr_ax.set_title("head learning rate (dashed: head re-initialized)")
    lr_ax.set_xlabel("epoch")
    lr_ax.set_ylabel("lr_head")
    return fig


# ----------------------------------------------------------------------------------------------------
# The whole report

def evidence(runs, reference: str = "rifle", metric: str = "test_acc", confidence: float = 0.95) -> dict:
    """The tables of `runs` (from fetch_runs) for one metric and their Markdown, with notes on runs left out
    (no value of the metric, repeated (dataset, method, seed)) and on settings that differ.
    Returns {"summary", "paired", "markdown"}."""
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {', '.join(METRICS)}, got {metric!r}")
    method_label(reference)  # an unknown trick fails here, with the message of rifle.methods
    notes = []
    missing = runs.loc[runs[metric].isna(), "run_id"].tolist()
    if missing:
        notes.append(f"{len(missing)} run(s) have no {metric} (logged before it existed) and are left out (e.g. "
                     f"{', '.join(missing[:5])})")
    dups = runs.attrs.get("duplicates", [])
    if dups:
        notes.append(f"{len(dups)} older run(s) repeating a (dataset, method, seed) were left out (e.g. "
                     f"{', '.join(dups[:5])}); sweep trials share an experiment with other runs: report a "
                     "comparison with --parent_run_id")
    for dataset, v in varying_settings(runs).items():
        for m, keys in v["within"].items():
            notes.append(f"{dataset}, {m}: settings differ between its seeds, so pairs are not like for like: "
                         f"{', '.join(keys)}")
        if v["between"]:
            notes.append(f"{dataset}: settings differ between methods (fine after per-method tuning, not for a "
                         f"same-settings comparison): {', '.join(v['between'])}")
    summary = summarize(runs, metric)
    paired = paired_differences(runs, reference, confidence, metric)
    return {"summary": summary, "paired": paired,
            "markdown": table_markdown(summary, paired, confidence, notes, metric)}


def build_report(tracking_uri: str | None = None, experiment: str | None = None, parent_run_id: str | None = None,
                 output_dir: str | Path = "outputs/reports", reference: str = "rifle", baseline: str = PLAIN,
                 group_by: tuple[str, ...] = ("dataset",), log: bool = True, confidence: float = 0.95,
                 metric: str = "test_acc") -> dict:
    """Fetch the runs, write results.md / results.csv / paired.csv / runs.csv (the tables show `metric`)
    and per dataset mechanism_<dataset>.png and dynamics_<dataset>.png into `output_dir`, and (with `log`)
    log them as MLflow artifacts. Returns {"runs", "summary", "paired", "markdown", "files", "run_id"}."""
    runs = fetch_runs(tracking_uri, experiment, parent_run_id, group_by)
    where = f"parent run {parent_run_id}" if parent_run_id else \
        f"experiment {experiment!r}" if experiment else "any experiment"
    if runs.empty:
        raise ValueError(f"no finished training runs with a test_acc in {where}")
    tables = evidence(runs, reference, metric, confidence)
    summary, paired, markdown = tables["summary"], tables["paired"], tables["markdown"]
    if summary.empty:
        raise ValueError(f"no finished training run in {where} has {metric}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"results.md": out / "results.md", "results.csv": out / "results.csv",
             "paired.csv": out / "paired.csv", "runs.csv": out / "runs.csv"}
    files["results.md"].write_text(markdown)
    summary.to_csv(files["results.csv"], index=False)
    paired.to_csv(files["paired.csv"], index=False)
    runs.drop(columns=["params"]).to_csv(files["runs.csv"], index=False)
    if len(paired):
        _save(plot_paired(paired, confidence, metric), out / "paired.png")
        files["paired.png"] = out / "paired.png"
    histories = fetch_histories(runs, tracking_uri)
    ref_name, base_name = method_label(reference), method_label(baseline)
    for dataset, g in runs.groupby("dataset"):
        h = histories[histories["dataset"] == dataset]
        name = f"dynamics_{slug(dataset)}.png"
        _save(plot_dynamics(h, dataset, reference), out / name)
        files[name] = out / name
        if {ref_name, base_name} <= set(g["method"]) and h["key"].str.startswith("weight_dist/").any():
            name = f"mechanism_{slug(dataset)}.png"
            _save(plot_mechanism(h, dataset, reference, baseline, g["model"].iloc[0]), out / name)
            files[name] = out / name
        if {ref_name, base_name} <= set(g["method"]) and h["key"].str.startswith("grad_norm/").any():
            for name, fig in gradient_figures(h, dataset, ref_name, base_name, g["model"].iloc[0]).items():
                _save(fig, out / name)
                files[name] = out / name
    run_id = log_report(out, tracking_uri, experiment, parent_run_id, reference) if log else None
    return {"runs": runs, "summary": summary, "paired": paired, "markdown": markdown, "files": files,
            "run_id": run_id}


def gradient_figures(histories, dataset: str, reference: str, baseline: str, model_spec: str) -> dict:
    """gradients_<dataset>.png (per-block gradient norm over epochs, reference vs baseline) and, when the
    reference re-initialized, reinit_gradients_<dataset>.png (post / pre ratio per block and seed)."""
    from . import figures
    blocks = block_order(model_spec, figures.grad_blocks(histories))
    out = {f"gradients_{slug(dataset)}.png": figures.plot_gradient_flow(histories, dataset, reference, baseline,
                                                                          blocks)}
    ratios = figures.reinit_ratios(histories[histories["dataset"] == dataset], reference)
    if len(ratios):
        out[f"reinit_gradients_{slug(dataset)}.png"] = figures.plot_reinit_ratios(ratios, dataset, reference, blocks)
    return out


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=110)


def log_report(folder: Path, tracking_uri: str | None, experiment: str | None, parent_run_id: str | None,
               reference: str) -> str:
    """Log `folder` under artifacts `report/`: into the parent run when given, else into the run
    `mlflow run` started, else into a new run named `report` (tagged so it is never read as a result)."""
    client = _client(tracking_uri)
    run_id = parent_run_id or os.environ.get("MLFLOW_RUN_ID")
    created = False
    if not run_id:
        name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "Default"  # as `mlflow run` would
        exp = client.get_experiment_by_name(name)
        run_id = client.create_run(exp.experiment_id if exp else client.create_experiment(name),
                                   run_name="report").info.run_id
        created = True
    client.set_tag(run_id, REPORT_TAG, "true" if not parent_run_id else "parent")
    client.set_tag(run_id, "rifle.report_reference", method_label(reference))
    client.log_artifacts(run_id, str(folder), artifact_path="report")
    if created:
        client.set_terminated(run_id)
    return run_id


# ----------------------------------------------------------------------------------------------------
# Optuna studies (the sweeps notebook)

def load_study(storage: str, study_name: str):
    """An Optuna study from the storage `python -m rifle.sweep` writes to: a journal file path (any value
    without '://'), redis://..., an RDB URL (sqlite:///..., postgresql://...) or env:NAME (the URL in $NAME);
    "" is the nearest optuna.journal (the sweep's default, see `nearest`)."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalRedisBackend

    if not storage:
        found = nearest("optuna.journal")
        if found is None:
            raise ValueError("no optuna.journal here or in a folder above: pass the sweep's --storage")
        storage = str(found)
    if storage.startswith("env:"):
        storage = os.environ[storage[4:]]
    if "://" not in storage:
        if not Path(storage).is_file():
            raise ValueError(f"no journal file {storage!r}")
        storage = JournalStorage(JournalFileBackend(storage))
    elif storage.startswith(("redis://", "rediss://")):
        storage = JournalStorage(JournalRedisBackend(storage))
    return optuna.load_study(study_name=study_name, storage=storage)


def trial_states(study) -> dict[str, int]:
    """How many trials ended in each state (COMPLETE, PRUNED, FAIL, RUNNING, WAITING)."""
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def trials_table(study) -> "pd.DataFrame":
    """One row per trial: number, state, value, duration (s), last reported step, params."""
    import pandas as pd

    rows = []
    for t in study.get_trials(deepcopy=False):
        duration = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else math.nan
        rows.append({"number": t.number, "state": t.state.name, "value": t.value, "duration_s": duration,
                     "last_step": max(t.intermediate_values) if t.intermediate_values else None,
                     **{f"param:{k}": v for k, v in t.params.items()}})
    return pd.DataFrame(rows)


def sweep_figures(study) -> dict:
    """Optuna's matplotlib figures: optimization history, parameter importance (needs two completed trials
    and a varied parameter), intermediate values (shows where pruned trials stopped). A figure that cannot be
    drawn for this study is replaced by the reason, as a string."""
    from optuna.visualization import matplotlib as ovm

    figures = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna marks its matplotlib plots experimental
        for name, plot in (("history", ovm.plot_optimization_history), ("importance", ovm.plot_param_importances),
                           ("intermediate", ovm.plot_intermediate_values)):
            try:
                fig = plot(study).figure
                import matplotlib.pyplot as plt
                plt.close(fig)  # drawn through pyplot: close it there so only an explicit display shows it
                figures[name] = fig
            except (ValueError, RuntimeError) as e:
                figures[name] = f"{name}: not available for this study ({e})"
    return figures


# ----------------------------------------------------------------------------------------------------
# Notebooks

def execute_notebook(path: str | Path, parameters: dict | None = None, output_path: str | Path | None = None,
                     timeout: int = 600, cwd: str | Path | None = None):
    """Run a notebook top to bottom with `parameters` injected after its cell tagged "parameters" (papermill's
    convention); writes the executed notebook to `output_path` when given and returns it. Needs nbclient."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(str(path), as_version=4)
    where = next((i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])), None)
    if parameters:
        if where is None:
            raise ValueError(f"{path}: no cell tagged 'parameters' to inject {sorted(parameters)} after")
        source = "# Injected parameters\n" + "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
        nb.cells.insert(where + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    NotebookClient(nb, timeout=timeout, kernel_name="python3",  # relative paths mean what they mean here
                   resources={"metadata": {"path": str(cwd or Path.cwd())}}).execute()
    if output_path:
        nbformat.write(nb, str(output_path))
    return nb


# ----------------------------------------------------------------------------------------------------
# Command line

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rifle.report", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tracking_uri", default="", help="MLflow store (default: $MLFLOW_TRACKING_URI, else "
                   "sqlite:///mlflow.db)")
    p.add_argument("--experiment", default="", help="experiment whose finished runs are compared (default: "
                   "every experiment, e.g. Default for `mlflow run .` and rifle for `python -m rifle.train`)")
    p.add_argument("--parent_run_id", default="", help="compare this run's child runs (a sweep comparison or "
                   "study) and log the report into it")
    p.add_argument("--output_dir", default="", help="where the files go (default: outputs/reports/<experiment or "
                   "parent run id>)")
    p.add_argument("--metric", default="test_acc", choices=tuple(METRICS), help="the number the tables show: "
                   + "; ".join(f"{k}: {v}" for k, v in METRICS.items()))
    p.add_argument("--reference", default="rifle", help="the trick (or method) whose paired differences are "
                   "reported: rows are the method with it minus the same method without it")
    p.add_argument("--baseline", default=PLAIN, help="the method the mechanism figure compares with")
    p.add_argument("--group_by", default="dataset", help="comma-separated params forming the table's rows")
    p.add_argument("--no_log", action="store_true", help="write the files only, log nothing to MLflow")
    args = p.parse_args(argv)
    output_dir = args.output_dir or str(Path("outputs") / "reports" / slug(args.parent_run_id or args.experiment or "all"))
    try:
        result = build_report(args.tracking_uri or None, args.experiment or None, args.parent_run_id or None,
                              output_dir, args.reference, args.baseline,
                              tuple(k.strip() for k in args.group_by.split(",") if k.strip()), not args.no_log,
                              metric=args.metric)
    except ValueError as e:
        print(f"rifle.report: error: {e}", file=sys.stderr)
        return 2
    print(result["markdown"])
    for name, path in result["files"].items():
        print(f"wrote {path}")
    if result["run_id"]:
        print(f"logged under artifacts report/ of run {result['run_id']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
