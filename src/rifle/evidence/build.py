"""The report: tables and figures of a set of runs written to a folder and logged into MLflow (rifle.report, the
paired tools, the campaign)."""
from __future__ import annotations

import os
from pathlib import Path

from .. import keys as K
from ..methods import PLAIN, method_label
from ..track import reads, store
from . import figures, mechanism, tables


def figure_histories(runs, tracking_uri: str | None = None, reference: str = "rifle", baseline: str = PLAIN):
    """The per-epoch metrics the report's figures draw (figures.history_keys), read in bulk."""
    return reads.fetch_histories(runs, figures.history_keys(runs, reference, baseline), tracking_uri)


def build_report(tracking_uri: str | None = None, experiment: str | None = None, parent_run_id: str | None = None,
                 output_dir: str | Path = "outputs/reports", reference: str = "rifle", baseline: str = PLAIN,
                 group_by: tuple[str, ...] = ("dataset",), log: bool = True, confidence: float = 0.95,
                 metric: str = K.TEST_ACC, allow_mixed_env: bool = False,
                 pairs: list[tuple[str, str]] | None = None) -> dict:
    """Write the tables (results.md / .csv, paired.csv, runs.csv, seeds.csv: tables.seeds_frame, from which
    tables.from_seeds_csv rebuilds them) and figures (paired.png and per row, a dataset and protocol, dynamics_,
    mechanism_, gradients_, reinit_gradients_<row>.png: <dataset>, or <dataset>_<protocol> when the runs hold
    several protocols) into `output_dir`; with `log`, log them. `pairs`: the comparisons to make instead of the
    reference's (rifle compare: the first study against each other); the figures of the reference's mechanism
    are drawn only when `reference` and `baseline` are two method labels."""
    runs = reads.fetch_runs(tracking_uri, experiment, parent_run_id, group_by)
    where = f"parent run {parent_run_id}" if parent_run_id else \
        f"experiment {experiment!r}" if experiment else "any experiment"
    if runs.empty:
        raise ValueError(f"no finished training runs with a test_acc in {where}")
    built = tables.evidence(runs, reference, metric, confidence, allow_mixed_env, pairs)
    if built["summary"].empty:
        raise ValueError(f"no finished training run in {where} has {metric}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {name: out / name for name in ("results.md", "results.csv", "paired.csv", "runs.csv", "seeds.csv")}
    files["results.md"].write_text(built["markdown"])
    built["summary"].to_csv(files["results.csv"], index=False)
    built["paired"].to_csv(files["paired.csv"], index=False)
    runs.drop(columns=["params", "metric_keys", K.BLOCK_ORDER]).to_csv(files["runs.csv"], index=False)
    seeds = tables.seeds_frame(runs)
    seeds.to_csv(files["seeds.csv"], index=False)
    # The figures name a row as the tables do: a (dataset, protocol), "digits · authors" when there are several.
    several, paired = tables.several_protocols(runs), built["paired"]
    figs = {"paired": figures.plot_paired(paired.assign(dataset=tables.row_labels(paired, several)), confidence,
                                          metric)} if len(paired) else {}
    try:
        ref_name, base_name = method_label(reference), method_label(baseline)
    except ValueError:  # a comparison's studies named by study (two of one method): no mechanism to draw
        ref_name = base_name = None
    histories = figure_histories(runs, tracking_uri, reference, baseline) if ref_name else None
    for (dataset, protocol), g in runs.groupby(tables.GROUP) if ref_name else ():
        label = tables.row_label(dataset, protocol, several)
        h = histories[histories["run_id"].isin(g["run_id"])].assign(dataset=label)
        model, name, order = g["model"].iloc[0], reads.slug(label), figures.logged_order(g)
        figs[f"dynamics_{name}"] = figures.plot_dynamics(h, label, reference)
        if ref_name == base_name or not {ref_name, base_name} <= set(g["method"]):
            continue
        if h["key"].str.startswith(figures.WEIGHT).any():
            figs[f"mechanism_{name}"] = figures.plot_mechanism(h, label, reference, baseline, model, order)
        if h["key"].str.startswith(figures.GRAD).any():
            gradients = figures.gradient_figures(h, label, ref_name, base_name, model, order)
            figs.update({f"{kind}_{name}": fig for kind, fig in gradients.items()})
    for stem, fig in figs.items():
        files[f"{stem}.png"] = out / f"{stem}.png"
        fig.savefig(files[f"{stem}.png"], dpi=110)
    ratios = None if histories is None else mechanism.gradient_ratio_table(
        histories, figures.block_order(runs["model"].iloc[0], histories["key"].str.extract(r"/(.*)$")[0].dropna()))
    if ratios is not None and len(ratios):  # the fresh head's effect beside what the schedule alone does
        files |= {name: out / name for name in ("gradient_ratios.csv", "gradient_ratios.md")}
        ratios.to_csv(files["gradient_ratios.csv"], index=False)
        files["gradient_ratios.md"].write_text(mechanism.ratio_markdown(ratios))
    run_id = log_report(out, tracking_uri, experiment, parent_run_id, reference) if log else None
    return {"runs": runs, **built, "seeds": seeds, "files": files, "run_id": run_id}


def log_report(folder: Path, tracking_uri: str | None, experiment: str | None, parent_run_id: str | None,
               reference: str) -> str:
    """Log `folder` under artifacts `report/` of the parent run, else of the run `mlflow run` started, else of
    a new run named `report` (tagged so it is never read as a result)."""
    client = reads.client(tracking_uri)
    run_id = parent_run_id or os.environ.get("MLFLOW_RUN_ID")
    created = not run_id
    if created:  # in MLflow's Default experiment unless told otherwise, as `mlflow run` would
        exp_id = store.experiment_id(client, store.experiment_name(experiment, default="Default"))
        run_id = client.create_run(exp_id, run_name="report").info.run_id
    client.set_tag(run_id, K.REPORT_TAG, "true" if not parent_run_id else "parent")
    client.set_tag(run_id, K.REPORT_REFERENCE, method_label(reference))
    client.log_artifacts(run_id, str(folder), artifact_path="report")
    if created:
        client.set_terminated(run_id)
    return run_id
