"""Tables and figures from the finished runs in MLflow: the evidence for or against RIFLE.

The paper-style table (datasets x methods, mean ± std over seeds) and the paired difference reference − other
over shared seeds (the method with RIFLE minus the same method without it), each naming its metric and
selection, and the figures of rifle.figures, logged under artifacts `report/` of a `report` run (or the parent).
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
# The method label that rifle.compare / rifle.study chose: two settings of one trick list stay apart.
METHOD_TAGS = ("compare.method", "study_method")
HISTORY_KEYS = ("val_acc", "train_acc", "lr_head", "head_reinit")
PROBE_PREFIXES = (figures.WEIGHT, figures.GRAD, figures.PRE, figures.POST)
BEFORE_REINIT_TAG = "selected_before_reinit"  # 'true': a RIFLE run selected a checkpoint before its first re-init
# Params that may differ between paired runs (storage, speed, seed, method) and a trick's own options.
RUN_KEYS = (*RUN_ONLY, "seed", "tricks", "num_workers")
TRICK_OPTIONS = (*(name for name, (section, _) in all_fields().items() if section == "tricks"), "reinit_count")


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "dataset"


def dataset_label(spec: str) -> str:
    """Short row label: the folder name of imagefolder:/disk:/hub: paths, the spec otherwise."""
    for prefix in ("imagefolder:", "disk:", "hub:"):
        if spec.startswith(prefix) and os.sep in spec:
            return f"{prefix}{Path(spec[len(prefix):].rstrip(os.sep)).name}"
    return spec


def _method_order(column):
    """A sort_values key: methods in the order of rifle.methods."""
    return column.map(method_sort_key) if column.name == "method" else column


def summarize(runs, metric: str = "test_acc") -> "pd.DataFrame":
    """Per dataset and method of `runs` (fetch_runs) that have `metric`: n, mean, std, seeds, selection,
    before_reinit of reinit_tagged (runs tagged selected_before_reinit=true, of those tagged) and best."""
    import pandas as pd

    rows = []
    for (dataset, method), g in runs[runs[metric].notna()].groupby(["dataset", "method"], sort=False):
        mean, std, n = mean_std(g[metric])
        tagged = g[BEFORE_REINIT_TAG].dropna() if BEFORE_REINIT_TAG in g else []
        rows.append({"dataset": dataset, "method": method, "n": n, "mean": mean, "std": std,
                     "seeds": " ".join(str(s) for s in sorted(g["seed"])),
                     "selection": ",".join(sorted(set(g["selection"] if "selection" in g else [DEFAULT_SELECTION]))),
                     "before_reinit": int(sum(bool(t) for t in tagged)), "reinit_tagged": len(tagged)})
    cols = ["dataset", "method", "n", "mean", "std", "seeds", "selection", "before_reinit", "reinit_tagged"]
    table = pd.DataFrame(rows, columns=cols)
    table["best"] = table["mean"] == table.groupby("dataset")["mean"].transform("max")
    return table.sort_values(["dataset", "method"], key=_method_order, kind="stable").reset_index(drop=True)


def paired_differences(runs, reference: str = "rifle", confidence: float = 0.95,
                       metric: str = "test_acc") -> "pd.DataFrame":
    """Per dataset and comparison (`method` with the reference, `versus` without): the paired difference over
    the seeds both have, p_holm adjusting the p-values for the dataset's comparisons."""
    import pandas as pd

    rows = []
    for dataset, g in runs[runs[metric].notna()].groupby("dataset", sort=True):
        by_seed = g.pivot_table(index="seed", columns="method", values=metric, aggfunc="last")
        for with_ref, without in comparisons(by_seed.columns, reference):
            both = by_seed[[with_ref, without]].dropna()
            rows.append({"dataset": dataset, "method": with_ref, "versus": without,
                         **paired_difference(both[with_ref], both[without], confidence),
                         "seeds": " ".join(map(str, both.index))})
    cols = ["dataset", "method", "versus", "n", "mean_diff", "sd_diff", "ci_low", "ci_high", "p_value", "p_holm",
            "seeds"]
    table = pd.DataFrame(rows, columns=cols)
    table["p_holm"] = table.groupby("dataset")["p_value"].transform(holm)
    return table


def _pct(x: float, digits: int = 1, sign: str = "") -> str:
    """Percent (sign="+": percentage points with their sign); "–" for no value."""
    return "–" if x is None or not math.isfinite(x) else f"{100 * x:{sign}.{digits}f}"


def _p(p: float) -> str:
    return "–" if not math.isfinite(p) else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


def table_markdown(summary, paired=None, confidence: float = 0.95, notes: list[str] | None = None,
                   metric: str = "test_acc") -> str:
    """The paper-style table (percent) and the paired differences (percentage points) as Markdown."""
    methods = sorted(summary["method"].unique(), key=method_sort_key)
    selections = {m: set(",".join(g["selection"]).split(",")) for m, g in summary.groupby("method")} \
        if "selection" in summary else {}
    what = metric_note(metric, selections)
    text = [f"{_pct(r.mean)} ± {_pct(r.std)} ({r.n})" for r in summary.itertuples()]
    cells = summary.assign(cell=[f"**{t}**" if best else t for t, best in zip(text, summary["best"])]).pivot(
        index="dataset", columns="method", values="cell").reindex(columns=methods).fillna("")
    lines = [f"### {metric} (%), mean ± std over seeds (n)", "", "| dataset | " + " | ".join(methods) + " |",
             "|---" * (len(methods) + 1) + "|", *(f"| {d} | " + " | ".join(row) + " |" for d, row in cells.iterrows()),
             "", f"Bold: the best mean of the dataset. {what}"]
    tagged = summary[summary["reinit_tagged"] > 0] if "reinit_tagged" in summary else summary.iloc[:0]
    if metric == "test_acc" and len(tagged):  # test_acc_last always follows every re-init
        counts = "; ".join(f"{d}: " + ", ".join(f"{r.method} {r.before_reinit} of {r.reinit_tagged}"
                                                for r in g.itertuples()) for d, g in tagged.groupby("dataset"))
        lines += ["", f"Selected before the first head re-initialization (tag {BEFORE_REINIT_TAG}=true: the "
                  f"checkpoint lies on plain fine-tuning's trajectory, so its number is not RIFLE's), runs: {counts}."]
    if paired is not None and len(paired):
        lines += ["", f"### Paired difference in {metric} (percentage points), reference − other, over the seeds "
                  "both share", "", f"| dataset | comparison | n | mean diff | {100 * confidence:g}% CI (t) | "
                  "p (paired t-test) | p (Holm) |", "|---" * 7 + "|"]
        for r in paired.itertuples():
            ci = f"[{_pct(r.ci_low, 2, '+')}, {_pct(r.ci_high, 2, '+')}]" if math.isfinite(r.ci_low) else "–"
            lines.append(f"| {r.dataset} | {r.method} − {r.versus} | {r.n} | {_pct(r.mean_diff, 2, '+')} | {ci} | "
                         f"{_p(r.p_value)} | {_p(r.p_holm)} |")
        lines += ["", f"Reference − other: the method with the reference minus the same method without it "
                  f"(> 0: the reference is better). {what} p (Holm): adjusted for the number of comparisons in "
                  "the dataset (Holm-Bonferroni)."]
    return "\n".join(lines + [f"\nNote: {note}" for note in notes or []]) + "\n"


def varying_settings(runs, ignore=RUN_KEYS) -> dict:
    """Training params that differ, per dataset: {"within": {method: [keys]}, "between": [keys]}. Within a
    method they break the pairing of seeds; between methods (but a trick's own options, which every run logs)
    the comparison is not under the same settings (as intended after per-method tuning)."""
    out = {}
    for dataset, g in runs.groupby("dataset"):
        keys = [k for k in sorted(set().union(*g["params"]) - set(ignore)) if not k.endswith("_resolved")]
        differs = lambda rows, k: len({p.get(k) for p in rows}) > 1  # noqa: E731
        within = {m: [k for k in keys if differs(gm["params"], k)] for m, gm in g.groupby("method")}
        within = {m: ks for m, ks in within.items() if ks}
        between = [k for k in keys if differs(g["params"], k) and k not in TRICK_OPTIONS
                   and not any(k in ks for ks in within.values())]
        if within or between:
            out[dataset] = {"within": within, "between": between}
    return out


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else the nearest mlflow.db (see `nearest`), else sqlite:///mlflow.db."""
    from .tracking import DEFAULT_URI
    found = nearest("mlflow.db")
    return os.environ.get("MLFLOW_TRACKING_URI") or (f"sqlite:///{found}" if found else DEFAULT_URI)


def _client(tracking_uri: str | None):
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri or default_tracking_uri())  # never the process-wide tracking URI


def _search_all(client, experiment_ids: list[str], filter_string: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=1000, page_token=token)
        runs, token = runs + list(page), page.token
        if not token:
            return runs


def _method_of(tags: dict, params: dict) -> str:
    """The label a tool tagged, else the label of `tricks`; canonical when it names a trick list, else as
    written (a study name, a trick of another version)."""
    text = next((tags[t] for t in METHOD_TAGS if tags.get(t)), params.get("tricks"))
    try:
        return method_label(text)
    except ValueError:
        return text


def fetch_runs(tracking_uri: str | None = None, experiment: str | None = None, parent_run_id: str | None = None,
               group_by: tuple[str, ...] = ("dataset",)) -> "pd.DataFrame":
    """One row per finished run with a test_acc (of `experiment`, of every experiment, or the children of
    `parent_run_id`), the row label `dataset` made of the `group_by` params. Of runs sharing (dataset, method,
    seed) the newest is kept, the others listed in `df.attrs["duplicates"]`."""
    import pandas as pd

    client = _client(tracking_uri)
    filt = "attributes.status = 'FINISHED'"
    if parent_run_id:
        exp_ids = [client.get_run(parent_run_id).info.experiment_id]
        filt = f"tags.`mlflow.parentRunId` = '{parent_run_id}' and {filt}"
    elif experiment:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            names = ", ".join(e.name for e in client.search_experiments())
            raise ValueError(f"no experiment {experiment!r} in the store (experiments: {names or 'none'})")
        exp_ids = [exp.experiment_id]
    else:  # every experiment: `mlflow run .` logs into MLflow's Default, `python -m rifle.train` into rifle
        from .tracking import all_experiment_ids
        exp_ids = all_experiment_ids(client)
    rows = []
    for run in _search_all(client, exp_ids, filt):
        m, p, tags = run.data.metrics, run.data.params, run.data.tags
        if "test_acc" not in m or tags.get(REPORT_TAG) or "seed" not in p:
            continue
        extra = [f"{k}={p.get(k)}" for k in group_by if k != "dataset"]
        before = tags.get(BEFORE_REINIT_TAG)
        rows.append({"run_id": run.info.run_id, "run_name": run.info.run_name,
                     "dataset": dataset_label(p.get("dataset", "?")) + (f" ({', '.join(extra)})" if extra else ""),
                     "method": _method_of(tags, p), "seed": int(float(p["seed"])), "test_acc": m["test_acc"],
                     **{k: m.get(k, math.nan) for k in ("test_acc_last", "best_val_acc", "best_epoch")},
                     "selection": p.get("selection") or DEFAULT_SELECTION,
                     BEFORE_REINIT_TAG: None if before is None else before.strip().lower() == "true",
                     "reinit_count": float(p["reinit_count"]) if p.get("reinit_count") else math.nan,
                     "model": p.get("model", ""), "start_time": run.info.start_time, "params": dict(p)})
    cols = ["run_id", "run_name", "dataset", "method", "seed", "test_acc", "test_acc_last", "best_val_acc",
            "best_epoch", "selection", BEFORE_REINIT_TAG, "reinit_count", "model", "start_time", "params"]
    df = pd.DataFrame(rows, columns=cols).sort_values("start_time", ascending=False, kind="stable")
    dup = df.duplicated(["dataset", "method", "seed"], keep="first")
    kept = df.loc[~dup].sort_values(["dataset", "method", "seed"], key=_method_order, kind="stable")
    kept = kept.reset_index(drop=True)
    kept.attrs["duplicates"] = df.loc[dup, "run_id"].tolist()
    return kept


def fetch_histories(runs, tracking_uri: str | None = None) -> "pd.DataFrame":
    """Per-epoch metrics of `runs` (HISTORY_KEYS and every probe metric a run has) in long form: run_id,
    dataset, method, seed, key, step, value."""
    import pandas as pd

    client = _client(tracking_uri)
    rows = []
    for r in runs.itertuples(index=False):
        probes = sorted(k for k in client.get_run(r.run_id).data.metrics if k.startswith(PROBE_PREFIXES))
        rows += [(r.run_id, r.dataset, r.method, r.seed, key, point.step, point.value)
                 for key in (*HISTORY_KEYS, *probes) for point in client.get_metric_history(r.run_id, key)]
    return pd.DataFrame(rows, columns=["run_id", "dataset", "method", "seed", "key", "step", "value"])


def evidence(runs, reference: str = "rifle", metric: str = "test_acc", confidence: float = 0.95) -> dict:
    """{"summary", "paired", "markdown"} of `runs` (from fetch_runs) for one metric, the Markdown with notes on
    runs left out (no value of the metric, repeated (dataset, method, seed)) and on settings that differ."""
    metric_note(metric, {})  # an unknown metric or trick fails here, with its message
    method_label(reference)
    missing = runs.loc[runs[metric].isna(), "run_id"].tolist()
    notes = [f"{len(missing)} run(s) have no {metric} (logged before it existed) and are left out (e.g. "
             f"{', '.join(missing[:5])})"] if missing else []
    dups = runs.attrs.get("duplicates", [])
    if dups:
        notes.append(f"{len(dups)} older run(s) repeating a (dataset, method, seed) were left out (e.g. "
                     f"{', '.join(dups[:5])}); sweep trials share an experiment with other runs: report a "
                     "comparison with --parent_run_id")
    for dataset, v in varying_settings(runs).items():
        notes += [f"{dataset}, {m}: settings differ between its seeds, so pairs are not like for like: "
                  f"{', '.join(keys)}" for m, keys in v["within"].items()]
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
    """Write the tables (results.md / .csv, paired.csv, runs.csv) and figures (paired.png and per dataset
    dynamics_, mechanism_, gradients_, reinit_gradients_<dataset>.png) into `output_dir`; with `log`, log them."""
    runs = fetch_runs(tracking_uri, experiment, parent_run_id, group_by)
    where = f"parent run {parent_run_id}" if parent_run_id else \
        f"experiment {experiment!r}" if experiment else "any experiment"
    if runs.empty:
        raise ValueError(f"no finished training runs with a test_acc in {where}")
    tables = evidence(runs, reference, metric, confidence)
    if tables["summary"].empty:
        raise ValueError(f"no finished training run in {where} has {metric}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {name: out / name for name in ("results.md", "results.csv", "paired.csv", "runs.csv")}
    files["results.md"].write_text(tables["markdown"])
    tables["summary"].to_csv(files["results.csv"], index=False)
    tables["paired"].to_csv(files["paired.csv"], index=False)
    runs.drop(columns=["params"]).to_csv(files["runs.csv"], index=False)
    figs = {"paired": figures.plot_paired(tables["paired"], confidence, metric)} if len(tables["paired"]) else {}
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
            gradients = figures.gradient_figures(h, dataset, ref_name, base_name, model)
            figs.update({f"{kind}_{name}": fig for kind, fig in gradients.items()})
    for stem, fig in figs.items():
        files[f"{stem}.png"] = out / f"{stem}.png"
        fig.savefig(files[f"{stem}.png"], dpi=110)
    run_id = log_report(out, tracking_uri, experiment, parent_run_id, reference) if log else None
    return {"runs": runs, **tables, "files": files, "run_id": run_id}


def log_report(folder: Path, tracking_uri: str | None, experiment: str | None, parent_run_id: str | None,
               reference: str) -> str:
    """Log `folder` under artifacts `report/` of the parent run, else of the run `mlflow run` started, else of
    a new run named `report` (tagged so it is never read as a result)."""
    client = _client(tracking_uri)
    run_id = parent_run_id or os.environ.get("MLFLOW_RUN_ID")
    created = not run_id
    if created:
        name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "Default"  # as `mlflow run` would
        exp = client.get_experiment_by_name(name)
        run_id = client.create_run(exp.experiment_id if exp else client.create_experiment(name),
                                   run_name="report").info.run_id
    client.set_tag(run_id, REPORT_TAG, "true" if not parent_run_id else "parent")
    client.set_tag(run_id, "rifle.report_reference", method_label(reference))
    client.log_artifacts(run_id, str(folder), artifact_path="report")
    if created:
        client.set_terminated(run_id)
    return run_id


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
    output_dir = args.output_dir or Path("outputs") / "reports" / slug(args.parent_run_id or args.experiment or "all")
    group_by = tuple(k.strip() for k in args.group_by.split(",") if k.strip())
    try:
        result = build_report(args.tracking_uri or None, args.experiment or None, args.parent_run_id or None,
                              output_dir, args.reference, args.baseline, group_by, not args.no_log, metric=args.metric)
    except ValueError as e:
        print(f"rifle.report: error: {e}", file=sys.stderr)
        return 2
    print(result["markdown"])
    for path in result["files"].values():
        print(f"wrote {path}")
    if result["run_id"]:
        print(f"logged under artifacts report/ of run {result['run_id']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
