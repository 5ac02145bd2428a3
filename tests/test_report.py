"""The report: statistics against scipy and hand-computed values, tables and figures from a real tiny MLflow
store (plain and RIFLE, two seeds each, as child runs of one parent), the metric and selection every table
names, the `report` entry point, one method label from sweep to comparison to report, and the results and
mechanism notebooks executed against real stores so they never rot (the sweeps notebook: test_sweep.py)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from conftest import ROOT, mlflow_runs, subprocess_env
from helpers import outputs, text_of
from rifle.commands import report
from rifle.evidence import build, figures, stats, tables
from rifle import keys
from rifle.track import reads
from rifle.methods import method_label, method_sort_key, method_tricks
from rifle.evidence.notebook import execute_notebook

EXPERIMENT = "cmp"


# ------------------------------------------------------------------------------------------ pure functions

def test_mean_std_and_paired_difference_by_hand():
    assert stats.mean_std([1, 2, 3, 4]) == pytest.approx((2.5, math.sqrt(5 / 3), 4))
    mean, std, n = stats.mean_std([0.7])
    assert (mean, n) == (0.7, 1) and math.isnan(std)
    # d = (0.02, -0.01, 0.05, 0.02, 0.04): mean 0.024, sd sqrt(0.00212/4) = 0.0230217, t(0.975, 4) = 2.776445
    r = stats.paired_difference([0.80, 0.85, 0.90, 0.82, 0.88], [0.78, 0.86, 0.85, 0.80, 0.84])
    assert r["n"] == 5 and r["mean_diff"] == pytest.approx(0.024)
    assert r["sd_diff"] == pytest.approx(0.0230217, rel=1e-5)
    half = 2.776445 * 0.0230217 / math.sqrt(5)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((0.024 - half, 0.024 + half), rel=1e-5)
    # t = 0.024 / (0.0230217 / sqrt 5) = 2.33105; two-sided p of t(4) at 2.33105 = 0.08014
    assert r["p_value"] == pytest.approx(0.08014, abs=2e-5)


def test_paired_difference_matches_scipy():
    from scipy.stats import ttest_rel
    rng = np.random.default_rng(3)
    for n in (2, 3, 7):
        a, b = rng.uniform(0.6, 0.9, n), rng.uniform(0.6, 0.9, n)
        r = stats.paired_difference(a, b, confidence=0.9)
        t = ttest_rel(a, b)
        ci = t.confidence_interval(confidence_level=0.9)
        assert r["p_value"] == pytest.approx(t.pvalue, rel=1e-9)
        assert (r["ci_low"], r["ci_high"]) == pytest.approx((ci.low, ci.high), rel=1e-9)


def test_paired_difference_without_spread():
    one = stats.paired_difference([0.9], [0.8])
    assert one["mean_diff"] == pytest.approx(0.1) and math.isnan(one["ci_low"]) and math.isnan(one["p_value"])
    same = stats.paired_difference([0.9, 0.8], [0.8, 0.7])  # every difference 0.1: nothing to test against
    assert same["ci_low"] == same["ci_high"] == pytest.approx(0.1) and math.isnan(same["p_value"])
    with pytest.raises(ValueError):
        stats.paired_difference([0.9, 0.8], [0.8])


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04 (m = 3): 3 x 0.01 = 0.03, 2 x 0.03 = 0.06, 1 x 0.04 = 0.04 -> running max 0.06
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    adjusted = stats.holm([0.5, math.nan, 0.2])  # nan is no test: m = 2
    assert adjusted[0] == pytest.approx(0.5) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.4)
    assert stats.holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])  # capped at 1


def test_sign_flip_p_is_the_enumeration_of_every_sign_pattern():
    """The exact two-sided sign-flip p: the share of the 2^n sign patterns whose |mean| reaches the observed one."""
    import itertools
    rng = np.random.default_rng(7)
    cases = [[0.02, -0.01, 0.05, 0.02, 0.04], [0.01, -0.01, 0.02, 0.0], [0.03, 0.03, -0.03], [0.0, 0.0],
             *(rng.normal(0.01, 0.02, n) for n in (2, 3, 5, 6, 8))]
    for d in cases:
        d = np.asarray(d, dtype=float)
        observed = abs(d.mean())
        means = [abs(np.mean(np.array(signs) * d)) for signs in itertools.product((1, -1), repeat=d.size)]
        brute = sum(m >= observed - 1e-12 for m in means) / 2 ** d.size
        assert stats.sign_flip_p(d) == pytest.approx(brute), d
    # as observed, with -0.01 flipped, and both negated: 4 of 32
    assert stats.sign_flip_p([0.02, -0.01, 0.05, 0.02, 0.04]) == pytest.approx(4 / 32)
    # all of one sign: the smallest p there is, 2/2^n (equal differences too, where t has no p)
    assert stats.sign_flip_p([0.01] * 5) == stats.min_sign_flip_p(5) == 0.0625
    assert stats.paired_difference([0.9, 0.8], [0.8, 0.7])["p_signflip"] == pytest.approx(0.5)
    assert math.isnan(stats.sign_flip_p([0.1])) and math.isnan(stats.paired_difference([0.9], [0.8])["p_signflip"])


def test_minimum_detectable_difference_by_hand():
    # t(0.975, 4) = 2.776445, t(0.8, 4) = 0.940965: (2.776445 + 0.940965) x 0.0230217 / sqrt 5 = 0.038273
    assert stats.mde(0.0230217, 5) == pytest.approx(0.038273, rel=1e-5)
    r = stats.paired_difference([0.80, 0.85, 0.90, 0.82, 0.88], [0.78, 0.86, 0.85, 0.80, 0.84])
    assert r["mde"] == pytest.approx((2.776445 + 0.940965) * r["sd_diff"] / math.sqrt(5), rel=1e-6)
    # What it means: a true difference of the MDE is found by the two-sided paired t-test at 0.05 about 80%
    # of the time (the noncentral t, which the formula approximates from below for small n).
    from scipy.stats import nct, t
    for n in (5, 10, 30):
        shift = stats.mde(1.0, n) * math.sqrt(n)
        crit = t.ppf(0.975, n - 1)
        assert nct.sf(crit, n - 1, shift) + nct.cdf(-crit, n - 1, shift) == pytest.approx(0.8, abs=0.01)
    assert math.isnan(stats.mde(0.02, 1)) and math.isnan(stats.mde(math.nan, 5))


def test_method_labels_both_ways_and_comparisons():
    assert [method_label(t) for t in ("", "none", None, [], "rifle", "l2sp,rifle", ["l2sp", "rifle"], "rifle+l2sp",
                                      " rifle , rifle ")] == \
        ["plain", "plain", "plain", "plain", "rifle", "rifle+l2sp", "rifle+l2sp", "rifle+l2sp", "rifle"]
    for label in ("plain", "rifle", "dropout", "rifle+l2sp", "rifle+delta", "dropout+cyclic_lr+l2"):
        assert method_label(method_tricks(label)) == label
    assert method_tricks("rifle+l2sp") == ["rifle", "l2sp"] and method_tricks("plain") == []
    with pytest.raises(ValueError, match="unknown trick 'mixup'"):
        method_label("rifle,mixup")
    with pytest.raises(ValueError, match=r"canonical form is 'rifle\+l2sp'"):
        method_tricks("l2sp+rifle")
    with pytest.raises(ValueError):
        method_tricks("rifle_l2sp")  # the old sweep name is no label
    from rifle import plan  # a plan's method names are labels whose tricks are what it trains
    study = plan.load(str(ROOT / "configs" / "campaign" / "offline_study.yaml")).methods
    assert "rifle+l2sp" in study and all(method_label(v["tricks"]) == k for k, v in study.items())
    methods = ["rifle+l2sp", "dropout", "plain", "rifle", "l2sp"]
    assert sorted(methods, key=method_sort_key) == ["plain", "rifle", "dropout", "l2sp", "rifle+l2sp"]
    assert stats.comparisons(methods) == [("rifle", "plain"), ("rifle", "dropout"), ("rifle", "l2sp"),
                                          ("rifle+l2sp", "l2sp")]
    assert stats.comparisons(methods, reference="dropout") == [("dropout", "plain"), ("dropout", "rifle"),
                                                               ("dropout", "l2sp"), ("dropout", "rifle+l2sp")]


def synthetic():
    rows = [("cub", "plain", 0, 0.70), ("cub", "plain", 1, 0.72), ("cub", "plain", 2, 0.71),
            ("cub", "rifle", 0, 0.73), ("cub", "rifle", 1, 0.72),  # seed 2 missing: paired over 0 and 1
            ("dtd", "plain", 0, 0.60), ("dtd", "rifle", 0, 0.58)]
    df = pd.DataFrame(rows, columns=["dataset", "method", "seed", "test_acc"])
    df["params"] = [{"lr": "0.01", "seed": str(s)} for s in df["seed"]]
    df["run_id"] = [f"run{i}" for i in range(len(df))]
    return df


def test_tables_by_hand():
    runs = synthetic()
    s = tables.summarize(runs).set_index(["dataset", "method"])
    # cub: plain's seed 2 has no rifle run, so the means are over seeds 0 and 1 as the paired difference is
    assert s.loc[("cub", "plain"), "mean"] == pytest.approx(0.71) and s.loc[("cub", "plain"), "n"] == 2
    assert s.loc[("cub", "plain"), "seeds"] == "0 1"
    assert s.loc[("cub", "rifle"), "std"] == pytest.approx(math.sqrt(0.00005))
    assert s["best"].to_dict() == {("cub", "plain"): False, ("cub", "rifle"): True,
                                   ("dtd", "plain"): True, ("dtd", "rifle"): False}
    p = tables.paired_differences(runs).set_index("dataset")
    assert p.loc["cub", "n"] == 2 and p.loc["cub", "seeds"] == "0 1"
    assert p.loc["cub", "mean_diff"] == pytest.approx(((0.73 - 0.70) + (0.72 - 0.72)) / 2)
    assert p.loc["dtd", "n"] == 1 and math.isnan(p.loc["dtd", "p_value"]) and math.isnan(p.loc["dtd", "p_holm"])
    assert p.loc["cub", "p_holm"] == pytest.approx(p.loc["cub", "p_value"])  # one comparison: nothing to adjust
    md = tables.table_markdown(tables.summarize(runs), tables.paired_differences(runs))
    assert "| cub | 71.0 ± 1.4 (2) | **72.5 ± 0.7 (2)** |" in md
    assert "| dtd | **60.0 ± – (1)** | 58.0 ± – (1) |" in md
    assert "| cub | rifle − plain | 2 | +1.50 |" in md
    # Runs without a `selection` param (older ones) selected on validation; both tables say so.
    assert md.startswith("### test_acc (%)") and md.count("Metric: test_acc, test accuracy at the checkpoint "
                                                           "selected by best_val") == 2
    assert "Selected before" not in md  # no run carries the tag


def test_metric_selection_and_before_reinit_by_hand():
    runs = synthetic()
    runs["test_acc_last"] = [0.69, 0.71, 0.70, 0.74, 0.70, 0.59, math.nan]  # dtd rifle: an older run without it
    runs["selection"] = ["best_val"] * 3 + ["last"] * 2 + ["best_val"] * 2
    runs["selected_before_reinit"] = [None, None, None, True, False, None, True]
    s = tables.summarize(runs, "test_acc_last").set_index(["dataset", "method"])
    assert s.loc[("cub", "rifle"), "mean"] == pytest.approx(0.72) and ("dtd", "rifle") not in s.index
    p = tables.paired_differences(runs, metric="test_acc_last").set_index("dataset")
    assert p.loc["cub", "mean_diff"] == pytest.approx(((0.74 - 0.69) + (0.70 - 0.71)) / 2) and "dtd" not in p.index
    last = tables.evidence(runs, metric="test_acc_last")["markdown"]
    assert last.startswith("### test_acc_last (%)") and "| cub | rifle − plain | 2 | +2.00 |" in last
    assert "Metric: test_acc_last, test accuracy at the last epoch" in last and "Selected before" not in last
    assert "1 run(s) have no test_acc_last" in last
    best = tables.evidence(runs)
    assert best["summary"].set_index(["dataset", "method"]).loc[("cub", "rifle"), "before_reinit"] == 1
    md = best["markdown"]
    assert "which differs between runs (best_val: plain, rifle; last: rifle)" in md
    assert "runs: cub: rifle 1 of 2; dtd: rifle 1 of 1." in md
    assert "Selected before the last" not in md  # no run carries that tag (runs from before it)
    runs["selected_before_last_reinit"] = [None, None, None, True, True, None, True]  # cub seed 1: K > 1
    best = tables.evidence(runs)
    s = best["summary"].set_index(["dataset", "method"])
    assert s.loc[("cub", "rifle"), ["before_last_reinit", "last_reinit_tagged"]].tolist() == [2, 2]
    assert "Selected before the last head re-initialization (tag selected_before_last_reinit=true: the last " \
           "period's fresh head did not give the selected checkpoint), runs: cub: rifle 2 of 2; dtd: rifle 1 of 1." \
           in best["markdown"]
    runs["selected_before_last_reinit"] = runs["selected_before_reinit"]  # K = 1: the same, said once
    assert "Selected before the last" not in tables.evidence(runs)["markdown"]
    with pytest.raises(ValueError, match="metric: expected one of test_acc, test_acc_last"):
        tables.evidence(runs, metric="val_acc")


def test_means_and_paired_differences_are_over_the_same_seeds():
    rows = [("cub", m, seed, acc) for m, accs in (("plain", (0.70, 0.72, 0.71, 0.60)), ("rifle", (0.73, 0.72, 0.75)),
                                                  ("dropout", (0.69, 0.74, 0.70, 0.65)))
            for seed, acc in enumerate(accs)]
    rows += [("dtd", "plain", 0, 0.60), ("dtd", "rifle", 1, 0.58)]  # no seed in common
    runs = pd.DataFrame(rows, columns=["dataset", "method", "seed", "test_acc"]).assign(
        run_id=[f"run{i}" for i in range(len(rows))], params=[{} for _ in rows])
    kept, left = tables.common_seeds(runs)
    assert sorted(left["run_id"], key=lambda r: int(r[3:])) == ["run3", "run10", "run11", "run12"]
    assert (kept["dataset"] == "cub").all() and set(kept["seed"]) == {0, 1, 2} and len(kept) == 9
    built = tables.evidence(runs)
    s = built["summary"].set_index(["dataset", "method"])
    assert s.loc[("cub", "plain"), "n"] == 3 and s.loc[("cub", "plain"), "mean"] == pytest.approx(0.71)
    p = built["paired"].set_index(["dataset", "method", "versus"])
    for a, b in (("rifle", "plain"), ("rifle", "dropout")):
        assert s.loc[("cub", a), "mean"] - s.loc[("cub", b), "mean"] == pytest.approx(p.loc[("cub", a, b), "mean_diff"])
        assert p.loc[("cub", a, b), "seeds"] == s.loc[("cub", a), "seeds"] == "0 1 2"
    assert (s.loc["dtd", "n"] == 0).all() and "dtd" not in p.index.get_level_values(0)
    md = built["markdown"]
    assert "| cub | 71.0 ± 1.0 (3) | **73.3 ± 1.5 (3)** | 71.0 ± 2.6 (3) |" in md
    assert "| dtd | – ± – (0) | – ± – (0) |  |" in md
    assert "Note: cub: means and paired differences are over the seeds every method has (0 1 2); left out: plain " \
           "seed 3 (run3), dropout seed 3 (run10)" in md
    assert "Note: dtd: means and paired differences are over the seeds every method has: none, so no means or " \
           "differences; left out: plain seed 0 (run11), rifle seed 1 (run12)" in md


def test_paired_table_shows_the_sign_flip_p_and_the_smallest_resolvable_difference():
    plain, rifle = [0.78, 0.86, 0.85, 0.80, 0.84], [0.80, 0.85, 0.90, 0.82, 0.88]  # d = 2, -1, 5, 2, 4 points
    runs = pd.DataFrame([("cub", m, seed, acc) for m, accs in (("plain", plain), ("rifle", rifle))
                         for seed, acc in enumerate(accs)], columns=["dataset", "method", "seed", "test_acc"])
    built = tables.evidence(runs.assign(run_id=[f"r{i}" for i in range(10)], params=[{}] * 10))
    (row,) = built["paired"].itertuples()
    d = np.subtract(rifle, plain)
    assert row.p_signflip == pytest.approx(stats.sign_flip_p(d)) == pytest.approx(0.125)
    assert row.mde == pytest.approx((2.776445 + 0.940965) * np.std(d, ddof=1) / math.sqrt(5), rel=1e-6)
    md = built["markdown"]
    assert "| p (paired t-test) | p (Holm) | p (sign-flip) |" in md
    assert "| cub | rifle − plain | 5 | +2.40 | [-0.46, +5.26] | 0.080 | 0.080 | 0.125 |" in md
    assert "which cannot go below 2/2^n with n seeds (0.0625 for n = 5)" in md
    assert "probability 0.8, from the observed sd of the differences): cub, rifle − plain: 3.83 (n = 5)." in md


def test_varying_settings_are_reported():
    runs = synthetic()
    assert tables.varying_settings(runs) == {}
    runs.at[1, "params"] = {"lr": "0.02", "seed": "1"}  # a plain seed trained with another lr
    runs.at[6, "params"] = {"lr": "0.01", "seed": "0", "dropout_p": "0.3"}
    assert tables.varying_settings(runs) == {"cub": {"within": {"plain": ["lr"]}, "between": []}}


# ------------------------------------------------------------------------- runs logged here with mlflow

def log_runs(tmp_path, experiment: str, runs: list[tuple[dict, dict, dict]]) -> str:
    """A real sqlite store in tmp_path with one finished run per (params, metrics, tags); returns its URI."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.tracking.MlflowClient(uri)
    exp_id = client.create_experiment(experiment, artifact_location=str(tmp_path / "artifacts"))
    for params, metrics, tags in runs:
        run = client.create_run(exp_id, tags=tags).info.run_id
        for k, v in params.items():
            client.log_param(run, k, v)
        for k, v in metrics.items():
            client.log_metric(run, k, v)
        client.set_terminated(run)
    return uri


VALIDATED, AUTHORS = {"val_fraction": 0.2, "selection": "best_val"}, {"val_fraction": 0.0, "selection": "last"}


def test_fetch_runs_keeps_the_original_of_a_copy_and_never_a_run_without_its_environment(tmp_path):
    """Runs of one (dataset, protocol, method, seed), in order: the original (env.* tags), its copy (the same
    command again: finished_earlier_in_run), then a newer run without env.* tags; and of seed 1 a copy whose
    original is not in the store. Kept: the original (the copy is its result, the envless run a duplicate) and
    seed 1's copy."""
    from rifle import env
    where = {k: "1" for k in env.KEYS}
    base = {"dataset": "digits", "tricks": "rifle"} | VALIDATED
    uri = log_runs(tmp_path, "copies", [(base | {"seed": 0}, {"test_acc": 0.7}, where),
                                       (base | {"seed": 1}, {"test_acc": 0.6}, where | {keys.COPY_TAG: "gone"})])
    client = mlflow.tracking.MlflowClient(uri)
    exp_id = client.get_experiment_by_name("copies").experiment_id
    original = next(r.info.run_id for r in client.search_runs([exp_id]) if keys.COPY_TAG not in r.data.tags)
    later = []
    for tags in (where | {keys.COPY_TAG: original}, {}):  # the copy, then a newer run without its environment
        run = client.create_run(exp_id, tags=tags).info.run_id
        for k, v in (base | {"seed": 0}).items():
            client.log_param(run, k, v)
        client.log_metric(run, "test_acc", 0.9)
        client.set_terminated(run)
        later.append(run)
    runs = reads.fetch_runs(uri, "copies")
    assert runs.set_index("seed")["test_acc"].to_dict() == {0: 0.7, 1: 0.6}
    assert runs.loc[runs["seed"] == 0, "run_id"].item() == original
    assert runs.attrs == {"duplicates": [later[1]], "copies": [later[0]]}
    md = tables.evidence(runs)["markdown"]
    assert "1 other run(s) repeating" in md and "Environment: torch 1" in md and "not recorded" not in md


def test_protocols_in_one_store_are_reported_apart(tmp_path):
    """The same (dataset, method, seed) under both protocols, and a run of neither: three rows, every run kept."""
    accs = {("validated", "none"): (0.70, 0.72), ("validated", "rifle"): (0.73, 0.74),
            ("authors", "none"): (0.80, 0.81), ("authors", "rifle"): (0.79, 0.83)}
    protocols = {"validated": VALIDATED, "authors": AUTHORS}
    logged = [({"dataset": "digits", "tricks": tricks, "seed": seed} | protocols[protocol], {"test_acc": acc}, {})
              for (protocol, tricks), pair in accs.items() for seed, acc in enumerate(pair)]
    logged.append(({"dataset": "digits", "tricks": "none", "seed": 0, "val_fraction": 0.2, "selection": "last"},
                   {"test_acc": 0.75}, {}))
    uri = log_runs(tmp_path, "both", logged)
    out = build.build_report(uri, "both", output_dir=tmp_path / "rep", log=False)
    runs = out["runs"]
    assert len(runs) == 9 and runs.attrs["duplicates"] == []
    assert sorted(set(runs["protocol"])) == ["authors", "val_fraction 0.2, selection last", "validated"]
    s = out["summary"].set_index(["protocol", "method"])
    assert s.loc[("validated", "plain"), "mean"] == pytest.approx(0.71)
    assert s.loc[("authors", "plain"), "mean"] == pytest.approx(0.805) and s.loc[("authors", "plain"), "n"] == 2
    p = out["paired"].set_index("protocol")
    assert p["mean_diff"].to_dict() == pytest.approx({"authors": 0.005, "validated": 0.025})
    assert list(p.index) == ["authors", "validated"] and (p["n"] == 2).all()
    md = out["markdown"]
    assert "| dataset · protocol | plain | rifle |" in md
    assert "| digits · authors | 80.5 ± 0.7 (2) | **81.0 ± 2.8 (2)** |" in md
    assert "| digits · val_fraction 0.2, selection last | **75.0 ± – (1)** |  |" in md
    assert "| digits · validated | 71.0 ± 1.4 (2) | **73.5 ± 0.7 (2)** |" in md
    assert "| digits · authors | rifle − plain | 2 | +0.50 |" in md
    assert "| digits · validated | rifle − plain | 2 | +2.50 |" in md
    assert "adjusted for the number of comparisons in the dataset and protocol" in md
    assert list(pd.read_csv(tmp_path / "rep" / "results.csv")["protocol"]) == ["authors"] * 2 + [
        "val_fraction 0.2, selection last"] + ["validated"] * 2
    assert {"dynamics_digits_authors.png", "dynamics_digits_validated.png"} <= {f.name for f in out["files"].values()}
    csv = pd.read_csv(tmp_path / "rep" / "paired.csv").set_index("protocol")
    assert csv["p_signflip"].to_dict() == {"authors": 1.0, "validated": 0.5}  # n = 2: one sign, or not
    assert csv["mde"].to_dict() == pytest.approx({p: stats.mde(csv.loc[p, "sd_diff"], 2) for p in csv.index})
    # One protocol alone reads as before: no protocol in the labels.
    alone = tables.evidence(runs[runs["protocol"] == "authors"])["markdown"]
    assert "| dataset | plain | rifle |" in alone and "| digits | rifle − plain | 2 | +0.50 |" in alone


def test_seeds_csv_rebuilds_the_report_without_mlflow(tmp_path):
    """Runs as the trainer logs them (both protocols, env.* tags, selected_before_reinit, budget params): the
    report's seeds.csv holds the per-seed numbers as MLflow does, and its tables rebuilt from it alone equal
    the report's, Markdown included."""
    from rifle import env
    where = {k: "1.0" for k in env.KEYS} | {"env.torch": "2.14.1", "env.torchvision": "0.29.1", "env.pillow": "13.0.0",
                                            "env.cuda": "none", "env.threads": "1", "env.device": "Intel Xeon (AVX512)",
                                            "env.deterministic": "false"}
    rng = np.random.default_rng(11)
    logged = []
    for protocol, options in (("validated", VALIDATED), ("authors", AUTHORS)):
        for seed in range(3):
            for tricks in ("none", "rifle"):
                acc, last = rng.uniform(0.6, 0.9, 2)
                tags = where | ({"selected_before_reinit": str(seed == 0).lower(),
                                 "selected_before_last_reinit": str(seed <= 1).lower()} if tricks == "rifle" else {})
                logged.append(({"dataset": "digits", "tricks": tricks, "seed": seed, "epochs_trained": 30,
                                "optimizer_steps": 120} | options,
                               {"test_acc": acc if protocol == "validated" else last, "test_acc_last": last,
                                "selected_epoch": 17 if protocol == "validated" else 29}, tags))
    uri = log_runs(tmp_path, "seeds", logged)
    for metric in ("test_acc", "test_acc_last"):
        out = build.build_report(uri, "seeds", output_dir=tmp_path / metric, log=False, metric=metric)
        csv = tmp_path / metric / "seeds.csv"
        header = csv.read_text().splitlines()[0].split(",")
        assert header[:7] == ["method", "protocol", "seed", "dataset", "test_acc", "test_acc_last", "selected_epoch"]
        assert header[7:] == [*env.KEYS, "selected_before_reinit", "epochs_trained", "optimizer_steps",
                              "selected_before_last_reinit"]
        seeds = pd.read_csv(csv)
        assert len(seeds) == 12 and sorted(seeds["test_acc"]) == sorted(m["test_acc"] for _, m, _ in logged)
        rebuilt = tables.from_seeds_csv(csv, metric=metric)
        assert rebuilt["markdown"] == out["markdown"]
        pd.testing.assert_frame_equal(rebuilt["summary"], out["summary"])
        pd.testing.assert_frame_equal(rebuilt["paired"], out["paired"])
    md = out["markdown"]  # what the rebuild had to carry: protocols, environment, re-init and budget lines
    assert "| digits · authors |" in md
    assert "Environment: torch 2.14.1, torchvision 0.29.1, timm 1.0, Pillow 13.0.0, CUDA none, Intel Xeon (AVX512), " \
           "1 thread, deterministic false." in md
    assert "Epochs trained: digits · authors: 30; digits · validated: 30." in md
    assert "Selected before" not in md  # test_acc_last
    md = tables.from_seeds_csv(tmp_path / "test_acc" / "seeds.csv")["markdown"]
    assert "runs: digits · authors: rifle 1 of 3; digits · validated: rifle 1 of 3." in md
    assert "last period's fresh head did not give the selected checkpoint), runs: digits · authors: rifle 2 of 3; " \
           "digits · validated: rifle 2 of 3." in md


def test_protocol_of_a_run():
    assert reads.protocol_of({"val_fraction": "0.2", "selection": "best_val"}) == "validated"
    assert reads.protocol_of({"val_fraction": "0.0", "selection": "last"}) == "authors"
    assert reads.protocol_of({}) == "validated"  # before both params: selected on validation, so it had some
    assert reads.protocol_of({"val_fraction": "0.1", "selection": "last"}) == "val_fraction 0.1, selection last"
    assert reads.protocol_of({"selection": "last"}) == "val_fraction not recorded, selection last"
    for protocol in ("validated", "authors", "val_fraction 0.1, selection last"):
        assert reads.selection_of(protocol) == {"validated": "best_val"}.get(protocol, "last")


def test_report_names_metric_selection_and_runs_selected_before_reinit(tmp_path, capsys):
    """Runs as the trainer logs them (test_acc, test_acc_last, params selection and reinit_count, tag
    selected_before_reinit) and one older plain run without test_acc_last or selection."""
    import mlflow
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.tracking.MlflowClient(uri)
    exp_id = client.create_experiment("logged", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(exp_id, run_name="comparison").info.run_id
    best, k1 = {"selection": "best_val"}, {"reinit_count": "1"}
    for tricks, seed, acc, last, extra, tags in (
            ("none", 0, 0.70, 0.69, best | {"reinit_count": "0"}, {}),
            ("none", 1, 0.72, None, {}, {}),  # older: no test_acc_last, no selection
            ("rifle", 0, 0.75, 0.71, best | k1, {"selected_before_reinit": "true"}),
            ("rifle", 1, 0.74, 0.73, best | k1, {"selected_before_reinit": "false"})):
        run = client.create_run(exp_id, tags={"mlflow.parentRunId": parent, **tags}).info.run_id
        params = {"dataset": "digits", "model": "efficientnet_lite0", "tricks": tricks, "seed": seed, **extra}
        for k, v in params.items():
            client.log_param(run, k, v)
        client.log_metric(run, "test_acc", acc)
        if last is not None:
            client.log_metric(run, "test_acc_last", last)
        client.set_terminated(run)
    client.set_terminated(parent)
    argv = ["--tracking_uri", uri, "--parent_run_id", parent, "--no_log"]
    assert report.main(argv + ["--output_dir", str(tmp_path / "a")]) == 0
    md = capsys.readouterr().out
    assert "| digits | 71.0 ± 1.4 (2) | **74.5 ± 0.7 (2)** |" in md and "| digits | rifle − plain | 2 | +3.50 |" in md
    assert "Metric: test_acc, test accuracy at the checkpoint selected by best_val" in md
    assert "selected_before_reinit=true" in md and "runs: digits: rifle 1 of 2." in md
    summary = pd.read_csv(tmp_path / "a" / "results.csv").set_index("method")
    assert summary.loc["rifle", "before_reinit"] == 1 and summary.loc["plain", "reinit_tagged"] == 0
    assert report.main(argv + ["--output_dir", str(tmp_path / "b"), "--metric", "test_acc_last"]) == 0
    md = capsys.readouterr().out
    # plain's seed 1 has no test_acc_last: both means are over seed 0, as the paired difference
    assert md.startswith("### test_acc_last (%)") and "| digits | 69.0 ± – (1) | **71.0 ± – (1)** |" in md
    assert "| digits | rifle − plain | 1 | +2.00 |" in md and "1 run(s) have no test_acc_last" in md
    assert "digits: means and paired differences are over the seeds every method has (0); left out: rifle seed 1 (" \
        in md
    assert "Metric: test_acc_last, test accuracy at the last epoch" in md and "Selected before" not in md
    with pytest.raises(SystemExit):
        report.main(argv + ["--metric", "val_acc"])
    assert "invalid choice: 'val_acc'" in capsys.readouterr().err


# ------------------------------------------------------------------- sweep -> compare -> report, one name

@pytest.mark.slow
def test_sweep_compare_and_report_show_rifle_l2sp_minus_l2sp(tmp_path, digits_folder, capsys):
    """Two tiny studies made with rifle.sweep (files named like the shipped rifle_l2sp.yaml and l2sp.yaml),
    rifle.compare over them, and rifle.report on the comparison: the RIFLE+L2-SP row survives, is paired with
    L2-SP, and both tools show the same difference with the same sign (reference − other) for the metric
    asked. test_acc_last: the last epoch follows the re-init, so the two methods' numbers differ."""
    import mlflow

    from rifle.commands import compare, sweep
    from helpers import tiny_space
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.tracking.MlflowClient(uri)  # artifacts under tmp_path, not the working directory
    client.create_experiment("rifle", artifact_location=str(tmp_path / "artifacts"))
    storage = str(tmp_path / "optuna.journal")
    for study, tricks in (("l2sp", "l2sp"), ("rifle_l2sp", "rifle,l2sp")):  # one trial each
        space = tiny_space(tmp_path, digits_folder, name=study, tricks=tricks, epochs=2)
        assert sweep.main(["--space", str(space), "--n_trials", "1", "--storage", storage, "--pruner", "none",
                           "--output_root", str(tmp_path / "sweeps"), "--tracking_uri", uri,
                           "--log_weights", "false"]) == 0
    assert compare.main(["--studies", "rifle_l2sp,l2sp", "--storage", storage, "--seeds", "1,2", "--name", "e2e",
                         "--output_root", str(tmp_path / "cmp"), "--tracking_uri", uri, "--log_weights", "false",
                         "--metric", "test_acc_last"]) == 0
    _, runs = mlflow_runs(uri)
    sweeps = sorted(r.data.tags["sweep.method"] for r in runs if r.data.tags.get("sweep.role") == "parent")
    assert sweeps == ["l2sp", "rifle+l2sp"]
    (parent,) = [r for r in runs if r.data.tags.get("cell.role") == "parent"]
    seeds = [r for r in runs if r.data.tags.get("cell.role") == "seed"]
    assert sorted(r.data.tags["cell.method"] for r in seeds) == ["l2sp", "l2sp", "rifle+l2sp", "rifle+l2sp"]
    last = {(r.data.tags["cell.method"], r.data.params["seed"]): r.data.metrics["test_acc_last"] for r in seeds}
    diff = np.mean([last[("rifle+l2sp", s)] - last[("l2sp", s)] for s in ("1", "2")])
    assert parent.data.metrics["test_acc_last_paired_diff_mean/l2sp"] == pytest.approx(diff)
    assert "test_acc_last_mean/rifle.l2sp" in parent.data.metrics  # MLflow keys may not hold '+'
    assert parent.data.tags["best_trial.rifle.l2sp"].startswith("rifle_l2sp#0 ")
    table = Path(client.download_artifacts(parent.info.run_id, "comparison.md", str(tmp_path))).read_text()
    assert "### test_acc_last (%), mean ± std over seeds (n)" in table and "Metric: test_acc_last, " in table
    assert f"| rifle+l2sp − l2sp | 2 | {100 * diff:+.2f} |" in table  # the report's own table
    assert "Chosen on validation (each study's best trial): rifle+l2sp (trial 0): lr=" in table
    argv = ["--tracking_uri", uri, "--parent_run_id", parent.info.run_id, "--no_log"]
    capsys.readouterr()
    assert report.main(argv + ["--output_dir", str(tmp_path / "last"), "--metric", "test_acc_last"]) == 0
    assert f"| rifle+l2sp − l2sp | 2 | {100 * diff:+.2f} |" in capsys.readouterr().out
    (row,) = pd.read_csv(tmp_path / "last" / "paired.csv").itertuples()
    assert (row.method, row.versus, row.n) == ("rifle+l2sp", "l2sp", 2) and row.mean_diff == pytest.approx(diff)
    # test_acc (the default): the count of RIFLE runs whose selected checkpoint precedes the re-init
    assert report.main(argv + ["--output_dir", str(tmp_path / "best")]) == 0
    before = sum(r.data.tags["selected_before_reinit"] == "true" for r in seeds  # as the trainer tagged them
                 if r.data.tags["cell.method"] == "rifle+l2sp")
    assert f"rifle+l2sp {before} of 2." in capsys.readouterr().out


def test_compare_metrics_are_reference_minus_method_by_hand():
    """rifle compare's parent metrics come from the report's own tables (evidence/tables) with its pairs:
    the first study's method minus each other, over the seeds every method has."""
    import pandas as pd

    from rifle.commands import compare
    from rifle.evidence.tables import evidence
    accs = {("rifle", 1): 0.80, ("rifle", 2): 0.84, ("plain", 1): 0.77, ("plain", 2): 0.83, ("dropout", 1): 0.81,
            ("dropout", 2): 0.85}
    runs = pd.DataFrame([{"dataset": "", "method": m, "seed": s, "test_acc": a, "test_acc_last": a,
                          "selection": "best_val", "run_id": f"{m}{s}", "params": {}} for (m, s), a in accs.items()])
    built = evidence(runs, "rifle", pairs=[("rifle", "plain"), ("rifle", "dropout")])
    metrics = compare.parent_metrics(built["summary"], built["paired"], "test_acc")
    assert metrics["test_acc_paired_diff_mean/plain"] == pytest.approx(0.02)  # (0.03 + 0.01) / 2: rifle − plain
    assert metrics["test_acc_paired_diff_mean/dropout"] == pytest.approx(-0.01)
    assert metrics["test_acc_mean/plain"] == pytest.approx(0.80) and metrics["n_seeds/dropout"] == 2
    assert "| rifle − plain | 2 | +2.00 |" in built["markdown"]
    assert compare.mlflow_key("rifle+l2sp") == "rifle.l2sp"


# ------------------------------------------------------------------------------------ a real tiny store

@pytest.fixture(scope="module")
def store(tmp_path_factory, digits_folder):
    """plain and RIFLE (K=1: a re-init after epoch 1), seeds 0 and 1, as child runs of one parent run."""
    import mlflow

    from rifle import config as C
    from rifle.trainer import fit
    tmp = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = mlflow.tracking.MlflowClient(uri)
    exp_id = client.create_experiment(EXPERIMENT, artifact_location=str(tmp / "artifacts"))  # not ./mlruns
    parent = client.create_run(exp_id, run_name="comparison").info.run_id
    for seed in (0, 1):
        for tricks in ("", "rifle"):
            child = client.create_run(exp_id, tags={"mlflow.parentRunId": parent}).info.run_id
            fit(C.build({"dataset": f"imagefolder:{digits_folder}", "image_size": 48, "batch_size": 8,
                         "val_fraction": 0.25, "train_per_class": 0, "epochs": 4, "reinit_times": 1,
                         "tricks": tricks, "seed": seed, "tracking_uri": uri, "experiment": EXPERIMENT,
                         "output_dir": str(tmp / f"{tricks or 'plain'}-{seed}"), "log_weights": False}),
                mlflow_run_id=child)
    client.set_terminated(parent)
    return tmp, uri, parent


@pytest.mark.slow
def test_report_from_runs(store):
    import mlflow
    from matplotlib.image import imread
    tmp, uri, parent = store
    client = mlflow.tracking.MlflowClient(uri)
    out = build.build_report(uri, parent_run_id=parent, output_dir=tmp / "rep")
    runs = out["runs"]
    assert sorted(zip(runs["method"], runs["seed"])) == [("plain", 0), ("plain", 1), ("rifle", 0), ("rifle", 1)]
    acc = {(r.method, r.seed): client.get_run(r.run_id).data.metrics["test_acc"] for r in runs.itertuples()}
    s = out["summary"].set_index("method")
    for m in ("plain", "rifle"):
        assert s.loc[m, "mean"] == pytest.approx((acc[(m, 0)] + acc[(m, 1)]) / 2)
        assert s.loc[m, "n"] == 2
    p = out["paired"].iloc[0]
    assert (p["method"], p["versus"], p["n"]) == ("rifle", "plain", 2)
    assert p["mean_diff"] == pytest.approx(np.mean([acc[("rifle", k)] - acc[("plain", k)] for k in (0, 1)]))
    md = (tmp / "rep" / "results.md").read_text()
    assert md == out["markdown"] and "rifle − plain" in md
    # The trainer logs the `selection` param; the tables name it.
    assert set(runs["selection"]) == {"best_val"} and "selected by best_val" in md
    assert pd.read_csv(tmp / "rep" / "results.csv")["n"].tolist() == [2, 2]
    assert len(pd.read_csv(tmp / "rep" / "runs.csv")) == 4
    assert tables.from_seeds_csv(tmp / "rep" / "seeds.csv")["markdown"] == md  # trained runs: rebuilt alike
    label = reads.slug(runs["dataset"].iloc[0])  # imagefolder:<folder name>
    for name, (height, width) in ((f"mechanism_{label}.png", (800, 1400)), (f"dynamics_{label}.png", (450, 1300)),
                                  ("paired.png", (140, 700))):
        image = imread(tmp / "rep" / name)
        assert image.shape[0] >= height and image.shape[1] >= width and image.std() > 0.05, (name, image.shape)
    logged = {Path(a.path).name for a in client.list_artifacts(parent, "report")}
    assert {"results.md", "results.csv", "paired.csv", f"mechanism_{label}.png"} <= logged
    # The figures' data is what the runs logged: the last weight_dist of each block, the re-init epoch.
    h = build.figure_histories(runs, uri)
    final = figures.final_weight_dist(h)
    one = runs.iloc[0]
    logged_metrics = client.get_run(one.run_id).data.metrics
    got = final[final["run_id"] == one.run_id].set_index("block")["value"]
    assert got.to_dict() == pytest.approx({k[len("weight_dist/"):]: v for k, v in logged_metrics.items()
                                           if k.startswith("weight_dist/")})
    assert figures.reinit_epochs(h, "rifle") == [1] and figures.reinit_epochs(h, "plain") == []
    from rifle.models import block_names, build_backbone
    assert figures.block_order(one.model, sorted(got.index)) == block_names(build_backbone(one.model, False)[0])
    # Gradient figures: per-block norms over epochs (rifle vs plain) and the post / pre ratio at the re-init.
    for name in (f"gradients_{label}.png", f"reinit_gradients_{label}.png"):
        image = imread(tmp / "rep" / name)
        assert image.shape[0] >= 400 and image.std() > 0.05, name
        assert name in logged
    ratios = figures.reinit_ratios(h, "rifle")
    rifle_runs = runs[runs["method"] == "rifle"]
    assert sorted(set(ratios["run_id"])) == sorted(rifle_runs["run_id"]) and set(ratios["epoch"]) == {1}
    one = rifle_runs.iloc[0]
    m = client.get_run(one.run_id).data.metrics
    row = ratios[(ratios["run_id"] == one.run_id) & (ratios["block"] == "conv_stem")].iloc[0]
    assert row["ratio"] == pytest.approx(m["grad_norm_post_reinit/conv_stem"] / m["grad_norm_pre_reinit/conv_stem"])


def legacy_histories(runs, tracking_uri=None, *args, **kwargs):
    """The per-run reads rifle.report made before the bulk reads (transliterated): get_run for each run's probe
    keys, then one get_metric_history per (run, key), every history key and probe of every run."""
    client = mlflow.tracking.MlflowClient(tracking_uri)
    rows = []
    for r in runs.itertuples(index=False):
        probes = sorted(k for k in client.get_run(r.run_id).data.metrics if k.startswith(keys.PROBES))
        rows += [(r.run_id, r.dataset, r.method, r.seed, key, point.step, point.value)
                 for key in (*keys.HISTORY, *probes) for point in client.get_metric_history(r.run_id, key)]
    return pd.DataFrame(rows, columns=["run_id", "dataset", "method", "seed", "key", "step", "value"])


@pytest.mark.slow
def test_bulk_reads_write_the_report_the_per_run_reads_wrote(store, tmp_path, monkeypatch):
    tmp, uri, parent = store
    new = build.build_report(uri, parent_run_id=parent, output_dir=tmp_path / "bulk", log=False)
    monkeypatch.setattr(build, "figure_histories", legacy_histories)
    old = build.build_report(uri, parent_run_id=parent, output_dir=tmp_path / "legacy", log=False)
    assert sorted(new["files"]) == sorted(old["files"]) and len(new["files"]) >= 9
    for name in new["files"]:  # tables and figures, byte for byte
        assert (tmp_path / "bulk" / name).read_bytes() == (tmp_path / "legacy" / name).read_bytes(), name


@pytest.mark.slow
def test_bulk_reads_over_a_tracking_server_take_a_few_requests(store, tmp_path, monkeypatch):
    import shutil

    import requests

    from conftest import mlflow_server
    tmp, uri, parent = store
    shutil.copy(tmp / "mlflow.db", tmp_path / "copy.db")
    runs = reads.fetch_runs(uri, parent_run_id=parent)
    local = build.figure_histories(runs, uri)
    assert set(local["key"]) >= {"val_acc", "lr_head", "head_reinit", "grad_norm/conv_stem",
                                 "grad_norm_pre_reinit/conv_stem"} and "train_acc" not in set(local["key"])
    sent = []
    send = requests.adapters.HTTPAdapter.send
    monkeypatch.setattr(requests.adapters.HTTPAdapter, "send", lambda self, req, **kw: sent.append(req.url) or
                        send(self, req, **kw))
    with mlflow_server(f"sqlite:///{tmp_path}/copy.db", tmp_path) as server:
        sent.clear()
        remote = build.figure_histories(reads.fetch_runs(server, parent_run_id=parent), server)
        wanted = len(figures.history_keys(runs))
        # 4 runs: one search (and the parent's experiment), then every (key, 100 runs) ten per GraphQL request
        assert len(sent) <= 2 + -(-wanted // reads.GRAPHQL_FIELDS), sent
        assert sum("/graphql" in u for u in sent) == -(-wanted // reads.GRAPHQL_FIELDS)
        pd.testing.assert_frame_equal(remote, local)
        monkeypatch.setattr(reads, "_graphql", lambda creds, wanted: None)  # a server without GraphQL: REST
        sent.clear()
        pd.testing.assert_frame_equal(build.figure_histories(runs, server), local)
        assert sum("get-history-bulk" in u for u in sent) == wanted


@pytest.mark.slow
def test_experiment_report_run_and_cli(store, capsys):
    import mlflow
    tmp, uri, parent = store
    client = mlflow.tracking.MlflowClient(uri)
    assert report.main(["--tracking_uri", uri, "--experiment", EXPERIMENT, "--output_dir", str(tmp / "e1")]) == 0
    printed = capsys.readouterr().out
    assert "| imagefolder:digits4" in printed and "logged under artifacts report/ of run" in printed
    assert "### test_acc (%)" in printed and "Metric: test_acc, " in printed
    first = printed.rsplit(" ", 1)[-1].strip()
    run = client.get_run(first)
    assert run.info.run_name == "report" and run.info.status == "FINISHED" and run.data.tags[keys.REPORT_TAG]
    # A second report reads the same four runs: the parent (no test_acc) and the report run are not results.
    again = build.build_report(uri, EXPERIMENT, output_dir=tmp / "e2")
    assert len(again["runs"]) == 4 and again["runs"].attrs["duplicates"] == []
    assert report.main(["--tracking_uri", uri, "--experiment", "nope", "--no_log"]) == 2
    assert "no experiment 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_mlflow_run_report_entry_point(store):
    import mlflow
    tmp, uri, parent = store
    proc = subprocess.run([str(Path(sys.executable).with_name("mlflow")), "run", str(ROOT), "-e", "report",
                           "--env-manager", "local", "--experiment-name", EXPERIMENT,
                           "-P", f"parent_run_id={parent}", "-P", f"output_dir={tmp / 'mr'}",
                           "-P", "metric=test_acc_last"],
                          cwd=tmp, env=subprocess_env(MLFLOW_TRACKING_URI=uri), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| imagefolder:digits4" in proc.stdout and "Metric: test_acc_last, " in proc.stdout
    assert (tmp / "mr" / "results.md").read_text().startswith("### test_acc_last (%)")
    client = mlflow.tracking.MlflowClient(uri)
    assert "report/paired.csv" in {a.path for a in client.list_artifacts(parent, "report")}


# --------------------------------------------------------------------------------------------- notebooks

NOTEBOOKS = ROOT / "notebooks"


@pytest.mark.parametrize("name", ["results", "mechanism", "sweeps"])
def test_notebooks_are_committed_without_outputs(name):
    nb = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(not c["outputs"] and c["execution_count"] is None for c in code)
    assert sum("parameters" in c["metadata"].get("tags", []) for c in code) == 1
    source = "".join("".join(c["source"]) for c in code)
    assert "from rifle." in source and "def " not in source  # they call the package, no logic of their own


@pytest.mark.slow
def test_figures_import_without_pandas():
    """The trainer draws its training curve with rifle.evidence.figures, also where pandas is not installed."""
    code = "import sys, rifle.evidence.figures; assert 'pandas' not in sys.modules, 'pandas imported'"
    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.slow
def test_results_and_mechanism_notebooks_run(store, tmp_path):
    tmp, uri, parent = store
    params = {"tracking_uri": uri, "experiment": EXPERIMENT}
    nb = execute_notebook(NOTEBOOKS / "results.ipynb", params | {"metric": "test_acc_last"},
                          tmp_path / "results.ipynb", cwd=tmp_path)
    text = text_of(nb)
    runs = reads.fetch_runs(uri, EXPERIMENT)
    mean = tables.summarize(runs, "test_acc_last").set_index("method").loc["rifle", "mean"]
    assert f"{100 * mean:.1f} ±" in text and "rifle − plain" in text and "Metric: test_acc_last, " in text
    assert len(outputs(nb, "image/png")) == 1  # the paired-difference plot
    nb = execute_notebook(NOTEBOOKS / "mechanism.ipynb", params | {"parent_run_id": parent}, cwd=tmp_path)
    assert "4 runs of efficientnet_lite0" in text_of(nb) and "conv_stem" in text_of(nb)
    assert len(outputs(nb, "image/png")) == 2


@pytest.mark.slow
def test_docs_notebook_snippet_runs_verbatim_and_defaults_find_the_store(store, tmp_path):
    """From the repository root with the exact code of the docs' notebooks page, and from notebooks/ (where
    Jupyter starts a notebook) with the default parameters: both find the mlflow.db the runs went to."""
    import re
    import shutil
    tmp, uri, parent = store
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy(tmp / "mlflow.db", root / "mlflow.db")
    shutil.copytree(NOTEBOOKS, root / "notebooks")
    page = (ROOT / "docs" / "how-to" / "notebooks.md").read_text()
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", page, re.S) if "execute_notebook" in b)
    proc = subprocess.run([sys.executable, "-c", snippet], cwd=root, env=subprocess_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (root / "results-executed.ipynb").read_text()
    assert "rifle − plain" in text and "Metric: test_acc, " in text
    assert not (root / "notebooks" / "mlflow.db").exists()
    nb = execute_notebook(root / "notebooks" / "mechanism.ipynb", cwd=root / "notebooks")
    assert "4 runs of efficientnet_lite0" in text_of(nb)
    assert not (root / "notebooks" / "mlflow.db").exists()
