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

from . import env, figures
from .config import RUN_ONLY, all_fields
from .methods import PLAIN, method_label, method_sort_key, method_tricks
from .notebook import nearest
from .stats import DEFAULT_SELECTION, METRICS, comparisons, holm, mean_std, metric_note, paired_difference, trick_set

REPORT_TAG = "rifle.report"
# The method label that rifle.compare / rifle.study chose: two settings of one trick list stay apart.
METHOD_TAGS = ("compare.method", "study_method")
HISTORY_KEYS = ("val_acc", "train_acc", "lr_head", "head_reinit")
PROBE_PREFIXES = (figures.WEIGHT, figures.GRAD, figures.PRE, figures.POST)
BEFORE_REINIT_TAG = "selected_before_reinit"  # 'true': a RIFLE run selected a checkpoint before its first re-init
# Params that may differ between paired runs (storage, speed, seed, method) and a trick's own options.
RUN_KEYS = (*RUN_ONLY, "seed", "tricks", "num_workers")
TRICK_OPTIONS = (*(name for name, (section, _) in all_fields().items() if section == "tricks"), "reinit_count")
# What sets a run's budget (RIFLE truncates epochs to a multiple of K+1): equal within a fair pair.
BUDGET_KEYS = ("epochs_trained", "optimizer_steps")


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
                     "before_reinit": int(sum(bool(t) for t in tagged)), "reinit_tagged": len(tagged),
                     "epochs_trained": _values(g, "epochs_trained")})
    cols = ["dataset", "method", "n", "mean", "std", "seeds", "selection", "before_reinit", "reinit_tagged",
            "epochs_trained"]
    table = pd.DataFrame(rows, columns=cols)
    table["best"] = table["mean"] == table.groupby("dataset")["mean"].transform("max")
    return table.sort_values(["dataset", "method"], key=_method_order, kind="stable").reset_index(drop=True)


def _values(g, column: str) -> str:
    """The distinct values of a column ("28,30"; "" when absent), for tables and budget checks."""
    if column not in g:
        return ""
    return ",".join(sorted({f"{v:g}" for v in g[column] if isinstance(v, float) and math.isfinite(v)}, key=float))


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
                   metric: str = "test_acc", environments: list[str] | None = None) -> str:
    """The paper-style table (percent) and the paired differences (percentage points) as Markdown, each with
    the line saying what it measures and, given `environments`, where it was measured."""
    methods = sorted(summary["method"].unique(), key=method_sort_key)
    selections = {m: set(",".join(g["selection"]).split(",")) for m, g in summary.groupby("method")} \
        if "selection" in summary else {}
    what = metric_note(metric, selections)
    text = [f"{_pct(r.mean)} ± {_pct(r.std)} ({r.n})" for r in summary.itertuples()]
    cells = summary.assign(cell=[f"**{t}**" if best else t for t, best in zip(text, summary["best"])]).pivot(
        index="dataset", columns="method", values="cell").reindex(columns=methods).fillna("")
    where = f" Environment: {'; '.join(environments)}." if environments else ""
    lines = [f"### {metric} (%), mean ± std over seeds (n)", "", "| dataset | " + " | ".join(methods) + " |",
             "|---" * (len(methods) + 1) + "|", *(f"| {d} | " + " | ".join(row) + " |" for d, row in cells.iterrows()),
             "", f"Bold: the best mean of the dataset. {what}{where}"]
    if "epochs_trained" in summary and (summary["epochs_trained"] != "").any():
        per = summary.groupby("dataset")["epochs_trained"].agg(lambda v: ",".join(sorted(set(",".join(v).split(",")) - {""}, key=float)))
        lines += ["", "Epochs trained: " + "; ".join(f"{d}: {e}" for d, e in per.items()) + "."]
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
                  f"the dataset (Holm-Bonferroni).{where}"]
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


def _method_of(tags: dict, params: dict) -> str:
    """The label a tool tagged, else the label of `tricks`; canonical when it names a trick list, else as
    written (a study name, a trick of another version)."""
    text = next((tags[t] for t in METHOD_TAGS if tags.get(t)), params.get("tricks"))
    try:
        return method_label(text)
    except ValueError:
        return text


def _number(text) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def fetch_runs(tracking_uri: str | None = None, experiment: str | None = None, parent_run_id: str | None = None,
               group_by: tuple[str, ...] = ("dataset",)) -> "pd.DataFrame":
    """One row per finished run with a test_acc (of `experiment`, of every experiment, or the children of
    `parent_run_id`), read in one paged search (params, tags and final metrics come with it), the row label
    `dataset` made of the `group_by` params. Of runs sharing (dataset, method, seed) the newest is kept, the
    others listed in `df.attrs["duplicates"]`."""
    import pandas as pd

    from .tracking import _all_pages, all_experiment_ids
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
        exp_ids = all_experiment_ids(client)
    rows = []
    for run in _all_pages(client.search_runs, experiment_ids=exp_ids, filter_string=filt):
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
                     "reinit_count": _number(p.get("reinit_count")),
                     # runs from before the param: `epochs` is the resolved (truncated) value
                     "epochs_trained": _number(p.get("epochs_trained") or p.get("epochs_resolved") or p.get("epochs")),
                     "optimizer_steps": _number(p.get("optimizer_steps")),
                     **{k: tags.get(k) for k in env.KEYS},
                     "model": p.get("model", ""), "start_time": run.info.start_time, "params": dict(p),
                     "metric_keys": frozenset(m)})
    cols = ["run_id", "run_name", "dataset", "method", "seed", "test_acc", "test_acc_last", "best_val_acc",
            "best_epoch", "selection", BEFORE_REINIT_TAG, "reinit_count", "epochs_trained", "optimizer_steps",
            *env.KEYS, "model", "start_time", "params", "metric_keys"]
    df = pd.DataFrame(rows, columns=cols).sort_values("start_time", ascending=False, kind="stable")
    dup = df.duplicated(["dataset", "method", "seed"], keep="first")
    kept = df.loc[~dup].sort_values(["dataset", "method", "seed"], key=_method_order, kind="stable")
    kept = kept.reset_index(drop=True)
    kept.attrs["duplicates"] = df.loc[dup, "run_id"].tolist()
    return kept


def history_keys(runs, reference: str = "rifle", baseline: str = PLAIN) -> dict[str, list[str]]:
    """key -> run ids: the per-epoch metrics the report's figures draw, and for which runs. Per dataset:
    validation accuracy (training accuracy where no run has it) and lr_head of every run, head_reinit of the
    runs with the reference's tricks, and the probes (figures.WEIGHT, GRAD: the reference's and the
    baseline's runs; PRE and POST: the reference's)."""
    ref, ref_name, base_name = set(method_tricks(method_label(reference))), method_label(reference), method_label(baseline)
    wanted: dict[str, list[str]] = {}

    def want(rows, keys=None, prefixes=()):
        for r in rows.itertuples(index=False):
            for key in r.metric_keys:
                if key in (keys or ()) or key.startswith(prefixes):
                    wanted.setdefault(key, []).append(r.run_id)

    for _, g in runs.groupby("dataset"):
        accuracy = "val_acc" if any("val_acc" in k for k in g["metric_keys"]) else "train_acc"
        want(g, {accuracy, "lr_head"})
        want(g[[m != PLAIN and ref <= trick_set(m) for m in g["method"]]], {"head_reinit"})
        want(g[g["method"].isin([ref_name, base_name])], prefixes=(figures.WEIGHT, figures.GRAD))
        want(g[g["method"] == ref_name], prefixes=(figures.PRE, figures.POST))
    return wanted


def fetch_histories(runs, tracking_uri: str | None = None, reference: str = "rifle", baseline: str = PLAIN,
                    keys: dict[str, list[str]] | None = None) -> "pd.DataFrame":
    """Per-epoch metrics of `runs` in long form (run_id, dataset, method, seed, key, step, value): `keys`
    (key -> run ids; default `history_keys`, what the figures draw), read in bulk (rifle.bulk). Rows are
    ordered by run (as in `runs`), key, then as MLflow returns a history."""
    import pandas as pd

    from .bulk import histories
    keys = history_keys(runs, reference, baseline) if keys is None else keys
    h = pd.DataFrame(histories(_client(tracking_uri), keys), columns=["run_id", "key", "step", "value", "timestamp"])
    position = {run_id: i for i, run_id in enumerate(runs["run_id"])}
    order = {k: i for i, k in enumerate((*HISTORY_KEYS, *sorted(set(keys) - set(HISTORY_KEYS))))}
    # stable: within a (run, key) the history's own order stays
    h = h.assign(pos=h["run_id"].map(position), rank=h["key"].map(order)).sort_values(["pos", "rank"], kind="stable")
    h = h.merge(runs[["run_id", "dataset", "method", "seed"]], on="run_id", how="left")
    return h[["run_id", "dataset", "method", "seed", "key", "step", "value"]].reset_index(drop=True)


def environments(runs) -> dict[str, list[str]]:
    """dataset -> the environments (rifle.env.describe) its runs were measured in, with their counts."""
    out = {}
    for dataset, g in runs.groupby("dataset"):
        lines = g.reindex(columns=list(env.KEYS)).apply(lambda r: env.describe(r.dropna().to_dict()), axis=1)
        counts = lines.value_counts(sort=False)
        out[dataset] = [line if len(counts) == 1 else f"{line} ({n} runs)" for line, n in counts.items()]
    return out


def check_environments(runs, allow_mixed: bool = False) -> None:
    """ValueError naming the dataset and the first differing env.* tag when its runs were measured in
    different environments: the same options then give other numbers, so pairs are not like for like."""
    if allow_mixed:
        return
    for dataset, g in runs.groupby("dataset"):
        for key in env.KEYS:
            values = sorted({"not recorded" if v is None else str(v) for v in g.get(key, [None])})
            if len(values) > 1:
                raise ValueError(f"{dataset}: runs were measured in different environments ({key}: "
                                 f"{' vs '.join(values)}), which changes their numbers; rerun them in one, or pass "
                                 "--allow_mixed_env to pair them anyway")


def budget_notes(runs, paired) -> list[str]:
    """A note per compared pair whose runs trained different numbers of epochs or optimizer steps."""
    notes = []
    for r in paired.itertuples():
        g = runs[(runs["dataset"] == r.dataset) & runs["method"].isin([r.method, r.versus])]
        for key in BUDGET_KEYS:
            per = {m: _values(gm, key) for m, gm in g.groupby("method")}
            if len(set(",".join(per.values()).split(",")) - {""}) > 1:
                notes.append(f"{r.dataset}, {r.method} − {r.versus}: the runs trained different budgets ({key}: "
                             + ", ".join(f"{m} {v}" for m, v in per.items()) + "), so the difference mixes the "
                             "method with the budget")
                break
    return notes


def evidence(runs, reference: str = "rifle", metric: str = "test_acc", confidence: float = 0.95,
             allow_mixed_env: bool = False) -> dict:
    """{"summary", "paired", "markdown"} of `runs` (from fetch_runs) for one metric, the Markdown with notes on
    runs left out (no value of the metric, repeated (dataset, method, seed)), on settings and budgets that
    differ, and the environment the runs were measured in (several refused unless `allow_mixed_env`)."""
    metric_note(metric, {})  # an unknown metric or trick fails here, with its message
    method_label(reference)
    check_environments(runs, allow_mixed_env)
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
    notes += budget_notes(runs, paired)
    where = sorted({line for lines in environments(runs).values() for line in lines})
    return {"summary": summary, "paired": paired,
            "markdown": table_markdown(summary, paired, confidence, notes, metric, where)}


def build_report(tracking_uri: str | None = None, experiment: str | None = None, parent_run_id: str | None = None,
                 output_dir: str | Path = "outputs/reports", reference: str = "rifle", baseline: str = PLAIN,
                 group_by: tuple[str, ...] = ("dataset",), log: bool = True, confidence: float = 0.95,
                 metric: str = "test_acc", allow_mixed_env: bool = False) -> dict:
    """Write the tables (results.md / .csv, paired.csv, runs.csv) and figures (paired.png and per dataset
    dynamics_, mechanism_, gradients_, reinit_gradients_<dataset>.png) into `output_dir`; with `log`, log them."""
    runs = fetch_runs(tracking_uri, experiment, parent_run_id, group_by)
    where = f"parent run {parent_run_id}" if parent_run_id else \
        f"experiment {experiment!r}" if experiment else "any experiment"
    if runs.empty:
        raise ValueError(f"no finished training runs with a test_acc in {where}")
    tables = evidence(runs, reference, metric, confidence, allow_mixed_env)
    if tables["summary"].empty:
        raise ValueError(f"no finished training run in {where} has {metric}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {name: out / name for name in ("results.md", "results.csv", "paired.csv", "runs.csv")}
    files["results.md"].write_text(tables["markdown"])
    tables["summary"].to_csv(files["results.csv"], index=False)
    tables["paired"].to_csv(files["paired.csv"], index=False)
    runs.drop(columns=["params", "metric_keys"]).to_csv(files["runs.csv"], index=False)
    figs = {"paired": figures.plot_paired(tables["paired"], confidence, metric)} if len(tables["paired"]) else {}
    histories = fetch_histories(runs, tracking_uri, reference, baseline)
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
    p.add_argument("--allow_mixed_env", action="store_true", help="pair runs measured in different environments "
                   "(env.* tags: torch, CUDA, device, threads, deterministic); refused by default")
    args = p.parse_args(argv)
    output_dir = args.output_dir or Path("outputs") / "reports" / slug(args.parent_run_id or args.experiment or "all")
    group_by = tuple(k.strip() for k in args.group_by.split(",") if k.strip())
    try:
        result = build_report(args.tracking_uri or None, args.experiment or None, args.parent_run_id or None,
                              output_dir, args.reference, args.baseline, group_by, not args.no_log, metric=args.metric,
                              allow_mixed_env=args.allow_mixed_env)
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
