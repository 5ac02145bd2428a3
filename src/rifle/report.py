"""Tables and figures from the finished runs in MLflow: the evidence for or against RIFLE.

    python -m rifle.report [--tracking_uri URI] [--experiment NAME] [--parent_run_id ID] [--output_dir DIR]
                           [--metric test_acc] [--reference rifle] [--baseline plain] [--group_by dataset]

From the finished runs of an experiment (default: of every experiment; or the child runs of a comparison
run) it builds
- the paper-style table: datasets x methods, the metric (test_acc: the checkpoint each run's `selection`
  chose; test_acc_last: the last epoch) mean ± std over seeds, best mean per dataset marked, and the paired
  difference reference − other over the seeds both share (mean, 95% t-interval, paired t-test; rifle.stats),
  where the reference is the method with RIFLE and the other the same method without it; Markdown and CSV.
  Every table says which metric and selection it shows, and how many RIFLE runs selected a checkpoint before
  their first re-initialization;
- the figures of rifle.figures: mechanism (per-block distance to the pretrained weights), gradient flow,
  training dynamics, paired differences;
and logs them as MLflow artifacts under `report/` of a new `report` run (or of the parent run).

A method is the label that rifle.compare / rifle.study tagged on the run, else the label of the `tricks`
param (rifle.methods: canonical order joined by '+', "plain" for none).
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path

from . import figures
from .config import RUN_ONLY, all_fields
from .methods import PLAIN, method_label, method_sort_key
from .notebook import nearest
from .stats import DEFAULT_SELECTION, METRICS, comparisons, holm, mean_std, metric_note, paired_difference

REPORT_TAG = "rifle.report"
# Run tags holding a method label chosen by the tool that made the run (rifle.compare, rifle.study): two
# settings of one trick list (e.g. RIFLE K=1 and K=3) stay apart. Without one, the label comes from `tricks`.
METHOD_TAGS = ("compare.method", "study_method")
# Metrics fetched per epoch for the figures (the probes' per-block keys are found per run).
HISTORY_KEYS = ("val_acc", "train_acc", "lr_head", "head_reinit")
PROBE_PREFIXES = (figures.WEIGHT, figures.GRAD, figures.PRE, figures.POST)
# Tag of a RIFLE run whose selected checkpoint precedes its first head re-init ('true'/'false').
BEFORE_REINIT_TAG = "selected_before_reinit"


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


def _pct(x: float, digits: int = 1, sign: str = "") -> str:
    """Percent (sign="+": percentage points with their sign); "–" for no value."""
    return "–" if x is None or not math.isfinite(x) else f"{100 * x:{sign}.{digits}f}"


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
            ci = f"[{_pct(r['ci_low'], 2, '+')}, {_pct(r['ci_high'], 2, '+')}]" if math.isfinite(r["ci_low"]) else "–"
            lines.append(f"| {r['dataset']} | {r['method']} − {r['versus']} | {r['n']} | "
                         f"{_pct(r['mean_diff'], 2, '+')} | {ci} | {_p(r['p_value'])} | {_p(r['p_holm'])} |")
        lines += ["", f"Reference − other: the method with the reference minus the same method without it "
                  f"(> 0: the reference is better). {what} p (Holm): adjusted for the number of comparisons in "
                  "the dataset (Holm-Bonferroni)."]
    for note in notes or []:
        lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"


# Params that may differ between paired runs: where and how a run is stored and computed (config.RUN_ONLY),
# its seed and its loader workers; and a method's own options (the tricks section), which differ by design.
RUN_KEYS = (*RUN_ONLY, "seed", "tricks", "num_workers")
TRICK_OPTIONS = (*(name for name, (section, _) in all_fields().items() if section == "tricks"), "reinit_count")


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
        between = [k for k in keys if differs(g["params"], k) and k not in TRICK_OPTIONS
                   and not any(k in ks for ks in within.values())]
        if within or between:
            out[dataset] = {"within": within, "between": between}
    return out


# ----------------------------------------------------------------------------------------------------
# MLflow -> DataFrames

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
    """Fetch the runs, write results.md / results.csv / paired.csv / runs.csv (the tables show `metric`),
    paired.png and per dataset the figures (dynamics_, mechanism_, gradients_, reinit_gradients_<dataset>.png)
    into `output_dir`, and (with `log`) log them as MLflow artifacts.
    Returns {"runs", "summary", "paired", "markdown", "files", "run_id"}."""
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
    figs = {"paired": figures.plot_paired(paired, confidence, metric)} if len(paired) else {}
    histories = fetch_histories(runs, tracking_uri)
    ref_name, base_name = method_label(reference), method_label(baseline)
    for dataset, g in runs.groupby("dataset"):
        h, model, name = histories[histories["dataset"] == dataset], g["model"].iloc[0], slug(dataset)
        figs[f"dynamics_{name}"] = figures.plot_dynamics(h, dataset, reference)
        if not {ref_name, base_name} <= set(g["method"]):
            continue
        if h["key"].str.startswith(figures.WEIGHT).any():
            figs[f"mechanism_{name}"] = figures.plot_mechanism(h, dataset, reference, baseline, model)
        if h["key"].str.startswith(figures.GRAD).any():
            for kind, fig in figures.gradient_figures(h, dataset, ref_name, base_name, model).items():
                figs[f"{kind}_{name}"] = fig
    for stem, fig in figs.items():
        files[f"{stem}.png"] = out / f"{stem}.png"
        fig.savefig(files[f"{stem}.png"], dpi=110)
    run_id = log_report(out, tracking_uri, experiment, parent_run_id, reference) if log else None
    return {"runs": runs, "summary": summary, "paired": paired, "markdown": markdown, "files": files,
            "run_id": run_id}


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
