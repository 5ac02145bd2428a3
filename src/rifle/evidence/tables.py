"""The paper-style table (datasets x methods, mean ± std over seeds) and the paired difference reference −
other over shared seeds (the method with RIFLE minus the same method without it), each naming its metric,
selection and environment; the notes on runs left out and settings or budgets that differ. A row is a
(dataset, protocol): the protocols (validated, authors') measure different things and never share a row or
a test; the protocol shows in the row label ("digits · authors") when the runs hold more than one. Pure: runs
come from rifle.track.reads.fetch_runs."""
from __future__ import annotations

import math

from .. import env
from ..config import with_role
from ..keys import (
    BEFORE_LAST_REINIT_TAG,
    BEFORE_REINIT_TAG,
    DEFAULT_SELECTION,
    EPOCHS_TRAINED,
    OPTIMIZER_STEPS,
    SELECTED_EPOCH,
    TEST_ACC,
    TEST_ACC_LAST,
)
from ..methods import method_label, method_sort_key
from .stats import (
    MDE_ALPHA,
    MDE_POWER,
    comparisons,
    holm,
    mean_std,
    metric_note,
    min_sign_flip_p,
    paired_difference,
)

# Params that may differ between paired runs (storage, speed, seed, method) and a trick's own options.
RUN_KEYS = with_role("run_only", "pair_free")
TRICK_OPTIONS = with_role("trick")
# What records a run's budget (RIFLE truncates epochs to a multiple of K+1): equal within a fair pair.
BUDGET_KEYS = with_role("budget_param")


GROUP = ["dataset", "protocol"]  # one table row, one family of paired tests


def _method_order(column):
    """A sort_values key: methods in the order of rifle.methods."""
    return column.map(method_sort_key) if column.name == "method" else column


def with_protocol(runs):
    """`runs` with a `protocol` column: a frame without one (built by hand, rifle.compare's) is one protocol."""
    return runs if "protocol" in runs else runs.assign(protocol="")


def several_protocols(frame) -> bool:
    return "protocol" in frame and frame["protocol"].nunique() > 1


def row_label(dataset: str, protocol: str, several: bool) -> str:
    """The row's name: the dataset, with its protocol when the table holds more than one."""
    return f"{dataset} · {protocol}" if several and protocol else dataset


def row_labels(frame, several: bool | None = None) -> list[str]:
    several = several_protocols(frame) if several is None else several
    protocols = frame["protocol"] if "protocol" in frame else [""] * len(frame)
    return [row_label(d, p, several) for d, p in zip(frame["dataset"], protocols)]


def _groups(runs):
    """(label, rows) per (dataset, protocol) of `runs`, in order."""
    runs = with_protocol(runs)
    several = several_protocols(runs)
    return [(row_label(d, p, several), g) for (d, p), g in runs.groupby(GROUP, sort=True)]


def common_seeds(runs, metric: str = TEST_ACC) -> tuple["pd.DataFrame", "pd.DataFrame"]:
    """(kept, left out) of the runs of `runs` that have `metric`: per dataset and protocol, kept are those on
    the seeds every method there has, so a difference of two means is the mean of their paired differences."""
    runs = with_protocol(runs)
    have = runs[runs[metric].notna()]
    keep = have["seed"].isin([])  # all False, filled per group
    for _, g in have.groupby(GROUP):
        seeds = set.intersection(*(set(gm["seed"]) for _, gm in g.groupby("method")))
        keep[g.index] = g["seed"].isin(seeds)
    return have[keep], have[~keep]


def summarize(runs, metric: str = TEST_ACC) -> "pd.DataFrame":
    """Per dataset, protocol and method of `runs` (fetch_runs) that have `metric`: n, mean, std and seeds over
    the seeds every method of the dataset and protocol has (`common_seeds`; n 0 when there is none), selection,
    before_reinit of reinit_tagged (of those runs, tagged selected_before_reinit=true of those tagged), the same
    for the last re-init (before_last_reinit of last_reinit_tagged: selected_before_last_reinit) and best (the best
    mean of its dataset and protocol)."""
    import pandas as pd

    rows = []
    runs = with_protocol(runs)
    kept = common_seeds(runs, metric)[0].index
    for (dataset, protocol, method), every in runs[runs[metric].notna()].groupby([*GROUP, "method"], sort=False):
        g = every[every.index.isin(kept)]
        mean, std, n = mean_std(g[metric])
        tagged = g[BEFORE_REINIT_TAG].dropna() if BEFORE_REINIT_TAG in g else []
        last = g[BEFORE_LAST_REINIT_TAG].dropna() if BEFORE_LAST_REINIT_TAG in g else []  # older runs: none
        rows.append({"dataset": dataset, "protocol": protocol, "method": method, "n": n, "mean": mean, "std": std,
                     "seeds": " ".join(str(s) for s in sorted(g["seed"])),
                     "selection": ",".join(sorted(set(every["selection"] if "selection" in every
                                                      else [DEFAULT_SELECTION]))),
                     "before_reinit": int(sum(bool(t) for t in tagged)), "reinit_tagged": len(tagged),
                     "before_last_reinit": int(sum(bool(t) for t in last)), "last_reinit_tagged": len(last),
                     EPOCHS_TRAINED: _values(every, EPOCHS_TRAINED)})
    cols = ["dataset", "protocol", "method", "n", "mean", "std", "seeds", "selection", "before_reinit",
            "reinit_tagged", "before_last_reinit", "last_reinit_tagged", EPOCHS_TRAINED]
    table = pd.DataFrame(rows, columns=cols)
    table["best"] = table["mean"] == table.groupby(GROUP)["mean"].transform("max")
    return table.sort_values([*GROUP, "method"], key=_method_order, kind="stable").reset_index(drop=True)


def _values(g, column: str) -> str:
    """The distinct values of a column ("28,30"; "" when absent), for tables and budget checks."""
    if column not in g:
        return ""
    return ",".join(sorted({f"{v:g}" for v in g[column] if isinstance(v, float) and math.isfinite(v)}, key=float))


def paired_differences(runs, reference: str = "rifle", confidence: float = 0.95, metric: str = TEST_ACC,
                       pairs: list[tuple[str, str]] | None = None) -> "pd.DataFrame":
    """Per dataset, protocol and comparison (`method` with the reference, `versus` without; or the given `pairs`
    of (method, versus), e.g. rifle.compare's reference against each study): the paired difference over the
    seeds both have (paired t: interval and p; p_holm adjusting p for the comparisons of the dataset and
    protocol; p_signflip, the exact sign-flip test; mde, the smallest difference the seeds resolve). The one
    builder of paired tables: rifle report, rifle compare, the regime view and the campaign's summary use it."""
    import pandas as pd

    rows = []
    runs = with_protocol(runs)
    for (dataset, protocol), g in runs[runs[metric].notna()].groupby(GROUP, sort=True):
        by_seed = g.pivot_table(index="seed", columns="method", values=metric, aggfunc="last")
        present = [(a, b) for a, b in pairs if {a, b} <= set(by_seed.columns)] if pairs is not None else \
            comparisons(by_seed.columns, reference)
        for with_ref, without in present:
            both = by_seed[[with_ref, without]].dropna()
            rows.append({"dataset": dataset, "protocol": protocol, "method": with_ref, "versus": without,
                         **paired_difference(both[with_ref], both[without], confidence),
                         "seeds": " ".join(map(str, both.index))})
    cols = ["dataset", "protocol", "method", "versus", "n", "mean_diff", "sd_diff", "ci_low", "ci_high", "p_value",
            "p_holm", "p_signflip", "mde", "seeds"]
    table = pd.DataFrame(rows, columns=cols)
    table["p_holm"] = table.groupby(GROUP)["p_value"].transform(holm)
    return table


def _pct(x: float, digits: int = 1, sign: str = "") -> str:
    """Percent (sign="+": percentage points with their sign); "–" for no value."""
    return "–" if x is None or not math.isfinite(x) else f"{100 * x:{sign}.{digits}f}"


def _p(p: float) -> str:
    return "–" if not math.isfinite(p) else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


def table_markdown(summary, paired=None, confidence: float = 0.95, notes: list[str] | None = None,
                   metric: str = TEST_ACC, environments: list[str] | None = None) -> str:
    """The paper-style table (percent) and the paired differences (percentage points) as Markdown, each with
    the line saying what it measures and, given `environments`, where it was measured."""
    several = several_protocols(summary)
    summary = summary.assign(row=row_labels(summary, several))
    methods = sorted(summary["method"].unique(), key=method_sort_key)
    selections = {m: set(",".join(g["selection"]).split(",")) for m, g in summary.groupby("method")} \
        if "selection" in summary else {}
    what = metric_note(metric, selections)
    text = [f"{_pct(r.mean)} ± {_pct(r.std)} ({r.n})" for r in summary.itertuples()]
    cells = summary.assign(cell=[f"**{t}**" if best else t for t, best in zip(text, summary["best"])]).pivot(
        index="row", columns="method", values="cell").reindex(index=list(dict.fromkeys(summary["row"])),
                                                               columns=methods).fillna("")
    where = f" Environment: {'; '.join(environments)}." if environments else ""
    head = "dataset · protocol" if several else "dataset"
    lines = [f"### {metric} (%), mean ± std over seeds (n)", "", f"| {head} | " + " | ".join(methods) + " |",
             "|---" * (len(methods) + 1) + "|", *(f"| {d} | " + " | ".join(row) + " |" for d, row in cells.iterrows()),
             "", f"Bold: the best mean of the {'row' if several else 'dataset'}. {what}{where}"]
    if EPOCHS_TRAINED in summary and (summary[EPOCHS_TRAINED] != "").any():
        per = summary.groupby("row", sort=False)[EPOCHS_TRAINED].agg(
            lambda v: ",".join(sorted(set(",".join(v).split(",")) - {""}, key=float)))
        lines += ["", "Epochs trained: " + "; ".join(f"{d}: {e}" for d, e in per.items()) + "."]
    tagged = summary[summary["reinit_tagged"] > 0] if "reinit_tagged" in summary else summary.iloc[:0]
    if metric == TEST_ACC and len(tagged):  # test_acc_last always follows every re-init
        counts = "; ".join(f"{d}: " + ", ".join(f"{r.method} {r.before_reinit} of {r.reinit_tagged}"
                                                for r in g.itertuples()) for d, g in tagged.groupby("row", sort=False))
        lines += ["", f"Selected before the first head re-initialization (tag {BEFORE_REINIT_TAG}=true: the "
                  f"checkpoint lies on plain fine-tuning's trajectory, so its number is not RIFLE's), runs: {counts}."]
        last = tagged[tagged["last_reinit_tagged"] > 0] if "last_reinit_tagged" in tagged else tagged.iloc[:0]
        # with one re-init (or before the tag) the last is the first: said only where it adds something
        if len(last) and (last["before_last_reinit"] != last["before_reinit"]).any():
            counts = "; ".join(f"{d}: " + ", ".join(f"{r.method} {r.before_last_reinit} of {r.last_reinit_tagged}"
                                                    for r in g.itertuples())
                               for d, g in last.groupby("row", sort=False))
            lines += ["", (f"Selected before the last head re-initialization (tag {BEFORE_LAST_REINIT_TAG}=true: the "
                           f"last period's fresh head did not give the selected checkpoint), runs: {counts}.")]
    if paired is not None and len(paired):
        lines += ["", f"### Paired difference in {metric} (percentage points), reference − other, over the seeds "
                  "of the means", "", f"| {head} | comparison | n | mean diff | {100 * confidence:g}% CI (t) | "
                  "p (paired t-test) | p (Holm) | p (sign-flip) |", "|---" * 8 + "|"]
        labels = row_labels(paired, several)
        for label, r in zip(labels, paired.itertuples()):
            ci = f"[{_pct(r.ci_low, 2, '+')}, {_pct(r.ci_high, 2, '+')}]" if math.isfinite(r.ci_low) else "–"
            lines.append(f"| {label} | {r.method} − {r.versus} | {r.n} | {_pct(r.mean_diff, 2, '+')} | {ci} | "
                         f"{_p(r.p_value)} | {_p(r.p_holm)} | {_p(r.p_signflip)} |")
        family = "dataset and protocol" if several else "dataset"
        floors = ", ".join(f"{min_sign_flip_p(n):.4g} for n = {n}" for n in sorted(set(paired["n"])) if n >= 2)
        lines += ["", f"Reference − other: the method with the reference minus the same method without it "
                  f"(> 0: the reference is better). {what} p (Holm): adjusted for the number of comparisons in "
                  f"the {family} (Holm-Bonferroni). p (sign-flip): the exact paired permutation test (under no "
                  f"difference each seed's difference is as likely negated; no normality assumed), which cannot go "
                  f"below 2/2^n with n seeds{f' ({floors})' if floors else ''}.{where}"]
        mde = [f"{label}, {r.method} − {r.versus}: {_pct(r.mde, 2)} (n = {r.n})"
               for label, r in zip(labels, paired.itertuples()) if math.isfinite(r.mde)]
        if mde:
            lines += ["", f"Smallest difference these seeds resolve (points; a paired t-test at two-sided "
                      f"{MDE_ALPHA:g} finds a true difference this large with probability {MDE_POWER:g}, from the "
                      f"observed sd of the differences): {'; '.join(mde)}."]
    return "\n".join(lines + [f"\nNote: {note}" for note in notes or []]) + "\n"


def varying_settings(runs, ignore=RUN_KEYS) -> dict:
    """Training params that differ, per row (`row_label`): {"within": {method: [keys]}, "between": [keys]}. Within
    a method they break the pairing of seeds; between methods (but a trick's own options, which every run logs)
    the comparison is not under the same settings (as intended after per-method tuning)."""
    out = {}
    if "params" not in runs:  # a frame rebuilt from seeds.csv: no params to compare
        return out
    for label, g in _groups(runs):
        keys = [k for k in sorted(set().union(*g["params"]) - set(ignore)) if not k.endswith("_resolved")]
        differs = lambda rows, k: len({p.get(k) for p in rows}) > 1  # noqa: E731
        within = {m: [k for k in keys if differs(gm["params"], k)] for m, gm in g.groupby("method")}
        within = {m: ks for m, ks in within.items() if ks}
        between = [k for k in keys if differs(g["params"], k) and k not in TRICK_OPTIONS
                   and not any(k in ks for ks in within.values())]
        if within or between:
            out[label] = {"within": within, "between": between}
    return out


def environments(runs) -> dict[str, list[str]]:
    """row label -> the environments (rifle.env.describe) its runs were measured in, with their counts."""
    out = {}
    for label, g in _groups(runs):
        lines = g.reindex(columns=list(env.KEYS)).apply(lambda r: env.describe(r.dropna().to_dict()), axis=1)
        counts = lines.value_counts(sort=False)
        out[label] = [line if len(counts) == 1 else f"{line} ({n} runs)" for line, n in counts.items()]
    return out


def check_environments(runs, allow_mixed: bool = False) -> None:
    """ValueError naming the row and the first differing tag of env.COMPARED (those that change a run's numbers)
    when its runs were measured in different environments: the same options then give other numbers, so pairs
    are not like for like. The other env.* tags (env.mlflow, ...) are recorded, not compared."""
    if allow_mixed:
        return
    for label, g in _groups(runs):
        for key in env.COMPARED:
            values = sorted({"not recorded" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
                             for v in g.get(key, [None])})  # pandas may hold a missing tag as nan
            if len(values) > 1:
                raise ValueError(f"{label}: runs were measured in different environments ({key}: "
                                 f"{' vs '.join(values)}), which changes their numbers; rerun them in one, or pass "
                                 "--allow_mixed_env to pair them anyway")


def budget_notes(runs, paired) -> list[str]:
    """A note per compared pair whose runs trained different numbers of epochs or optimizer steps."""
    notes = []
    runs = with_protocol(runs)
    for label, r in zip(row_labels(paired, several_protocols(runs)), paired.itertuples()):
        g = runs[(runs["dataset"] == r.dataset) & (runs["protocol"] == r.protocol)
                 & runs["method"].isin([r.method, r.versus])]
        for key in BUDGET_KEYS:
            per = {m: _values(gm, key) for m, gm in g.groupby("method")}
            if len(set(",".join(per.values()).split(",")) - {""}) > 1:
                notes.append(f"{label}, {r.method} − {r.versus}: the runs trained different budgets ({key}: "
                             + ", ".join(f"{m} {v}" for m, v in per.items()) + "), so the difference mixes the "
                             "method with the budget")
                break
    return notes


def seed_notes(runs, metric: str = TEST_ACC, shown: int = 10) -> list[str]:
    """A note per dataset and protocol where runs with `metric` were left out of the means and paired
    differences because not every method has their seed (`common_seeds`)."""
    kept, left = common_seeds(runs, metric)
    several = several_protocols(with_protocol(runs))
    notes = []
    for (dataset, protocol), g in left.groupby(GROUP, sort=True):
        seeds = sorted(set(kept.loc[(kept["dataset"] == dataset) & (kept["protocol"] == protocol), "seed"]))
        g = g.sort_values(["method", "seed"], key=_method_order, kind="stable")
        out = [f"{r.method} seed {r.seed}" + (f" ({r.run_id})" if "run_id" in g else "") for r in g.itertuples()]
        more = f" and {len(out) - shown} more" if len(out) > shown else ""
        common = f"the seeds every method has ({' '.join(map(str, seeds))})" if seeds else \
            "the seeds every method has: none, so no means or differences"
        notes.append(f"{row_label(dataset, protocol, several)}: means and paired differences are over {common}; "
                     f"left out: {', '.join(out[:shown])}{more}")
    return notes


def evidence(runs, reference: str = "rifle", metric: str = TEST_ACC, confidence: float = 0.95,
             allow_mixed_env: bool = False, pairs: list[tuple[str, str]] | None = None) -> dict:
    """{"summary", "paired", "markdown"} of `runs` (from fetch_runs) for one metric, means and paired
    differences over the same seeds (`common_seeds`), the Markdown with notes on runs left out (no value of the
    metric, a seed not every method has, repeated (dataset, protocol, method, seed)), on settings and budgets
    that differ, and the environment the runs were measured in (several refused unless `allow_mixed_env`).
    `pairs`: the (method, versus) comparisons to make instead of the reference's (rifle compare's)."""
    metric_note(metric, {})  # an unknown metric or trick fails here, with its message
    if pairs is None:
        method_label(reference)
    check_environments(runs, allow_mixed_env)
    missing = runs[runs[metric].isna()]
    ids = f" (e.g. {', '.join(missing['run_id'].tolist()[:5])})" if "run_id" in missing else ""  # seeds.csv: none
    notes = [f"{len(missing)} run(s) have no {metric} (logged before it existed) and are left out{ids}"] \
        if len(missing) else []
    dups = runs.attrs.get("duplicates", [])
    if dups:
        notes.append(f"{len(dups)} other run(s) repeating a (dataset, protocol, method, seed) were left out (the "
                     f"newest with its environment recorded is kept; e.g. {', '.join(dups[:5])}); sweep trials share "
                     "an experiment with other runs: report a comparison with --parent_run_id")
    for dataset, v in varying_settings(runs).items():
        notes += [f"{dataset}, {m}: settings differ between its seeds, so pairs are not like for like: "
                  f"{', '.join(keys)}" for m, keys in v["within"].items()]
        if v["between"]:
            notes.append(f"{dataset}: settings differ between methods (fine after per-method tuning, not for a "
                         f"same-settings comparison): {', '.join(v['between'])}")
    notes += seed_notes(runs, metric)
    summary = summarize(runs, metric)
    # the summary's seeds: mean(A) − mean(B) is the paired mean difference A − B
    paired = paired_differences(common_seeds(runs, metric)[0], reference, confidence, metric, pairs)
    notes += budget_notes(runs, paired)
    where = sorted({line for lines in environments(runs).values() for line in lines})
    return {"summary": summary, "paired": paired,
            "markdown": table_markdown(summary, paired, confidence, notes, metric, where)}


# seeds.csv: one row per run of a report, enough to rebuild its tables without MLflow (`from_seeds_csv`). The
# named columns, the env.* tags, then what the tables' lines need beyond them: the runs selected before RIFLE's
# first and last re-init (counted under the table) and the budget (the epochs line, budget notes).
SEED_COLUMNS = ("method", "protocol", "seed", "dataset", TEST_ACC, TEST_ACC_LAST, SELECTED_EPOCH)
SEED_EXTRA = (BEFORE_REINIT_TAG, EPOCHS_TRAINED, OPTIMIZER_STEPS, BEFORE_LAST_REINIT_TAG)  # new ones last


def seeds_frame(runs) -> "pd.DataFrame":
    """The per-seed table of `runs` (fetch_runs): SEED_COLUMNS (accuracies as fractions, as MLflow holds them),
    every env.* tag, SEED_EXTRA."""
    return with_protocol(runs).reindex(columns=[*SEED_COLUMNS, *env.KEYS, *SEED_EXTRA])


def from_seeds_csv(path, reference: str = "rifle", metric: str = TEST_ACC, confidence: float = 0.95,
                   allow_mixed_env: bool = False) -> dict:
    """`evidence` rebuilt from a seeds.csv (`seeds_frame`) without MLflow: the same summary, paired differences
    and Markdown, but for the notes that need what the file does not hold (a run's id beside a missing metric,
    its params where settings differ, repeated runs the report left out)."""
    import pandas as pd

    from ..track.reads import selection_of
    # Text as written ("false" stays a tag's text, "None" a name); only an empty field is missing.
    runs = pd.read_csv(path, dtype=str, keep_default_na=False)
    for c in runs:
        if c in (*env.KEYS, BEFORE_REINIT_TAG, BEFORE_LAST_REINIT_TAG):  # None where the run had no such tag
            runs[c] = [None if v == "" else v == "True" if c in (BEFORE_REINIT_TAG, BEFORE_LAST_REINIT_TAG) else v
                       for v in runs[c]]
        elif c in (*SEED_COLUMNS[4:], *SEED_EXTRA, "seed"):
            runs[c] = [float(v) if v else math.nan for v in runs[c]]
    runs["seed"] = runs["seed"].astype(int)
    runs["selection"] = runs["protocol"].map(selection_of)
    return evidence(runs, reference, metric, confidence, allow_mixed_env)


def by_group(runs_by_group: dict) -> "pd.DataFrame":
    """The runs of a protocol's groups (group key -> runs) as one frame for `campaign_summary`, one column per
    group: where groups share a dataset (a regime grid's data sizes), its column is "<dataset> · <group key>", so
    that no mean or pair pools two groups' runs."""
    import pandas as pd

    frames = [runs.assign(dataset=runs["dataset"].astype(str)) for runs in runs_by_group.values()]
    datasets = [d for f in frames for d in dict.fromkeys(f["dataset"])]
    shared = {d for d in datasets if datasets.count(d) > 1}
    frames = [f.assign(dataset=[f"{d} · {key}" if d in shared else d for d in f["dataset"]])
              for key, f in zip(runs_by_group, frames)]
    return pd.concat(frames, ignore_index=True)


def campaign_summary(runs_by_protocol: dict, reference: str, references: list | None = None,
                     failed: dict[str, str] | None = None) -> tuple[str, "pd.DataFrame", "pd.DataFrame"]:
    """Markdown and long-form CSVs (means; paired differences) of the campaign: per protocol, test_acc mean ±
    std (n) of each method (rows) on each dataset (columns), the best in bold, the paired difference reference −
    other per dataset, and per (dataset, comparison) its tests: p of the paired t-test, p_holm (the family: the
    dataset's comparisons), p_holm_protocol (the family: every (dataset, comparison) of the protocol, declared
    here so that a claim across datasets is corrected for all of them), p_signflip and mde. `references`
    (rifle.plan.Reference): published figures printed under the measured means of their protocol; `failed`:
    groups that did not complete, named with their reason."""
    import pandas as pd

    lines, frames, tests = [], [], []
    for protocol, runs in runs_by_protocol.items():
        built = evidence(runs, reference)
        s, p = built["summary"], built["paired"]
        datasets = list(dict.fromkeys(s["dataset"]))
        methods = sorted(s["method"].unique(), key=method_sort_key)
        cell = {(r.dataset, r.method): (f"**{_pct(r.mean)} ± {_pct(r.std)} ({r.n})**" if r.best
                                        else f"{_pct(r.mean)} ± {_pct(r.std)} ({r.n})")
                for r in s.itertuples()}
        lines += [f"### {protocol}: test_acc (%), mean ± std over seeds (n)", "",
                  "| method | " + " | ".join(datasets) + " |", "|---" * (len(datasets) + 1) + "|",
                  *(f"| {m} | " + " | ".join(cell.get((d, m), "") for d in datasets) + " |" for m in methods), ""]
        lines += published(references or [], protocol, datasets)
        if len(p):
            pairs = list(dict.fromkeys(zip(p["method"], p["versus"])))
            diff = {(r.dataset, r.method, r.versus): f"{_pct(r.mean_diff, 2, '+')} "
                    f"[{_pct(r.ci_low, 2, '+')}, {_pct(r.ci_high, 2, '+')}]" for r in p.itertuples()}
            lines += ["Paired difference, reference − other (points, 95% CI, over the seeds of the means):", "",
                      "| comparison | " + " | ".join(datasets) + " |", "|---" * (len(datasets) + 1) + "|",
                      *(f"| {a} − {b} | " + " | ".join(diff.get((d, a, b), "") for d in datasets) + " |"
                        for a, b in pairs), ""]
            p = p.assign(p_holm_protocol=holm(p["p_value"]))
            m, per = int(p["p_value"].notna().sum()), p.groupby("dataset")["p_value"].count()
            lines += [f"Tests of the paired differences ({protocol}):", "",
                      "| dataset | comparison | n | p (paired t) | p (Holm, dataset) | p (Holm, all datasets) | "
                      "p (sign-flip) | MDE (points) |", "|---" * 8 + "|",
                      *(f"| {r.dataset} | {r.method} − {r.versus} | {r.n} | {_p(r.p_value)} | {_p(r.p_holm)} | "
                        f"{_p(r.p_holm_protocol)} | {_p(r.p_signflip)} | {_pct(r.mde, 2)} |"
                        for r in p.itertuples()), "",
                      "p (Holm, dataset): Holm-adjusted over the comparisons of its dataset ("
                      + ", ".join(f"{d}: {k}" for d, k in per.items()) + f"). p (Holm, all datasets): Holm-adjusted "
                      f"over all {m} (dataset, comparison) tests of the {protocol} protocol, the family a claim "
                      "across datasets needs. p (sign-flip): the exact paired permutation test (no normality "
                      "assumed; at least 2/2^n with n seeds). MDE: the smallest difference the seeds resolve (a "
                      f"paired t-test at two-sided {MDE_ALPHA:g} finds it with probability {MDE_POWER:g}, from the "
                      "observed sd of the differences).", ""]
            tests.append(p.assign(protocol=protocol))
        selections = {m: set(g["selection"]) for m, g in runs.groupby("method")}
        where = sorted({line for found in environments(runs).values() for line in found})
        lines += [f"{metric_note(TEST_ACC, selections)} Environment: {'; '.join(where)}.",
                  *(line for line in built["markdown"].splitlines() if line.startswith("Note: ")), ""]
        frames.append(s.assign(protocol=protocol))
    if failed:
        lines += ["### Groups that did not complete (no table above counts them)", "",
                  *(f"- {group}: {why}" for group, why in failed.items()), ""]
    return "\n".join(lines), pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(), \
        pd.concat(tests, ignore_index=True) if tests else pd.DataFrame()


def published(references: list, protocol: str, datasets: list[str]) -> list[str]:
    """Markdown lines: the published figures of `protocol` on these datasets, with their sources and settings."""
    rows = [(r, m, vals) for r in references if r.protocol == protocol for m, vals in _by_method(r.values).items()
            if any(d in vals for d in datasets)]
    if not rows:
        return []
    return ["Published figures (not measured here; test accuracy %, as their sources report it):", "",
            "| method | " + " | ".join(datasets) + " | source |", "|---" * (len(datasets) + 2) + "|",
            *(f"| {m} | " + " | ".join(_pct(vals[d]) if d in vals else "" for d in datasets) +
              f" | {r.source} ({r.settings}) |" for r, m, vals in rows), ""]


def _by_method(values: dict) -> dict[str, dict]:
    """{dataset: {method: acc}} -> {method: {dataset: acc}}, methods in first-seen order."""
    out: dict[str, dict] = {}
    for dataset, per in values.items():
        for method, acc in per.items():
            out.setdefault(method, {})[dataset] = float(acc)
    return out
