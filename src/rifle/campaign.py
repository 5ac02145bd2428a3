"""A campaign: the paper's table, every method on paired seeds, per dataset and protocol, on many workers.

    python -m rifle.campaign --datasets digits,imagefolder:/data/x --methods plain,rifle --seeds 5
    python -m rifle.campaign --config configs/campaign/table1.yaml --storage env:RIFLE_STORAGE  # N workers

Each (dataset, protocol) is one group: a parent run and a table (rifle.report), its (method, seed) cells
trained by the workers started with the same command (rifle.paired: a journal file, PostgreSQL or Redis as
`--storage`; Slurm: configs/slurm/campaign_array.sbatch). The settings are the config file's `fixed`
options (the offline setting of rifle.study without a file), a dataset's own options from the file's
`datasets`, the protocol's, then the command line's option=value. When every cell is complete, one worker
writes a report per group and the summary across datasets: methods as rows, datasets as columns (the
paper's layout), with the paired difference reference − other per dataset and its tests: the paired t-test's
p, Holm-adjusted over the dataset's comparisons and over every (dataset, comparison) of the protocol (the
family a claim across datasets needs), and the exact sign-flip test.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import NamedTuple

import yaml

from . import config as C
from . import paired
from .evidence.stats import MDE_ALPHA, MDE_POWER, holm, metric_note
from .methods import method_label, method_sort_key

CONFIG_KEYS = {"fixed", "datasets", "methods", "seeds", "protocol", "name"}


def load_config(path: str) -> dict:
    """The campaign file: `fixed` options, `datasets` (name or spec -> its own options), `methods`, `seeds`,
    `protocol`, `name`; every option name checked here (ConfigError naming the file)."""
    p = Path(path)
    if not p.is_file():
        raise C.ConfigError("config", f"file not found: {path}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise C.ConfigError("config", f"{path}: not valid YAML ({e})") from None
    unknown = sorted(set(data) - CONFIG_KEYS) if isinstance(data, dict) else ["(not a mapping)"]
    if unknown:
        raise C.ConfigError("config", f"{path}: {unknown[0]}: unknown key (allowed: {', '.join(sorted(CONFIG_KEYS))})")
    datasets = data.get("datasets") or {}
    if isinstance(datasets, list):
        datasets = {d: {} for d in datasets}
    for where, options in [("fixed", data.get("fixed") or {})] + [(f"datasets.{d}", o or {}) for d, o in datasets.items()]:
        for name, value in options.items():
            try:
                C.convert(name, value)
            except C.ConfigError as e:
                raise C.ConfigError("config", f"{path}: {where}.{name}: {str(e).removeprefix(f'--{name}: ')}") from None
    data["datasets"] = {d: dict(o or {}) for d, o in datasets.items()}
    return data


def slug(spec: str) -> str:
    from .track.reads import dataset_label, slug
    return slug(dataset_label(spec))


def summary_tables(runs_by_protocol: dict, reference: str) -> tuple[str, "pd.DataFrame", "pd.DataFrame"]:
    """Markdown and long-form CSVs (means; paired differences) of the campaign: per protocol, test_acc mean ±
    std (n) of each method (rows) on each dataset (columns), the best in bold, the paired difference reference −
    other per dataset, and per (dataset, comparison) its tests: p of the paired t-test, p_holm (the family: the
    dataset's comparisons), p_holm_protocol (the family: every (dataset, comparison) of the protocol, declared
    here so that a claim across datasets is corrected for all of them), p_signflip and mde."""
    import pandas as pd

    from .evidence import tables as T
    lines, frames, tests = [], [], []
    for protocol, runs in runs_by_protocol.items():
        built = T.evidence(runs, reference)
        s, p = built["summary"], built["paired"]
        datasets = list(dict.fromkeys(s["dataset"]))
        methods = sorted(s["method"].unique(), key=method_sort_key)
        cell = {(r.dataset, r.method): (f"**{T._pct(r.mean)} ± {T._pct(r.std)} ({r.n})**" if r.best
                                        else f"{T._pct(r.mean)} ± {T._pct(r.std)} ({r.n})")
                for r in s.itertuples()}
        lines += [f"### {protocol}: test_acc (%), mean ± std over seeds (n)", "",
                  "| method | " + " | ".join(datasets) + " |", "|---" * (len(datasets) + 1) + "|",
                  *(f"| {m} | " + " | ".join(cell.get((d, m), "") for d in datasets) + " |" for m in methods), ""]
        if len(p):
            pairs = list(dict.fromkeys(zip(p["method"], p["versus"])))
            diff = {(r.dataset, r.method, r.versus): f"{T._pct(r.mean_diff, 2, '+')} "
                    f"[{T._pct(r.ci_low, 2, '+')}, {T._pct(r.ci_high, 2, '+')}]" for r in p.itertuples()}
            lines += ["Paired difference, reference − other (points, 95% CI, over the seeds of the means):", "",
                      "| comparison | " + " | ".join(datasets) + " |", "|---" * (len(datasets) + 1) + "|",
                      *(f"| {a} − {b} | " + " | ".join(diff.get((d, a, b), "") for d in datasets) + " |"
                        for a, b in pairs), ""]
            p = p.assign(p_holm_protocol=holm(p["p_value"]))
            m, per = int(p["p_value"].notna().sum()), p.groupby("dataset")["p_value"].count()
            lines += [f"Tests of the paired differences ({protocol}):", "",
                      "| dataset | comparison | n | p (paired t) | p (Holm, dataset) | p (Holm, all datasets) | "
                      "p (sign-flip) | MDE (points) |", "|---" * 8 + "|",
                      *(f"| {r.dataset} | {r.method} − {r.versus} | {r.n} | {T._p(r.p_value)} | {T._p(r.p_holm)} | "
                        f"{T._p(r.p_holm_protocol)} | {T._p(r.p_signflip)} | {T._pct(r.mde, 2)} |"
                        for r in p.itertuples()), "",
                      f"p (Holm, dataset): Holm-adjusted over the comparisons of its dataset ("
                      + ", ".join(f"{d}: {k}" for d, k in per.items()) + f"). p (Holm, all datasets): Holm-adjusted "
                      f"over all {m} (dataset, comparison) tests of the {protocol} protocol, the family a claim "
                      "across datasets needs. p (sign-flip): the exact paired permutation test (no normality "
                      "assumed; at least 2/2^n with n seeds). MDE: the smallest difference the seeds resolve (a "
                      f"paired t-test at two-sided {MDE_ALPHA:g} finds it with probability {MDE_POWER:g}, from the "
                      "observed sd of the differences).", ""]
            tests.append(p.assign(protocol=protocol))
        selections = {m: set(g["selection"]) for m, g in runs.groupby("method")}
        where = sorted({line for found in T.environments(runs).values() for line in found})
        lines += [f"{metric_note('test_acc', selections)} Environment: {'; '.join(where)}.",
                  *(line for line in built["markdown"].splitlines() if line.startswith("Note: ")), ""]
        frames.append(s.assign(protocol=protocol))
    return "\n".join(lines), pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(), \
        pd.concat(tests, ignore_index=True) if tests else pd.DataFrame()


def parser(prog: str = "campaign", doc: str = __doc__):
    p = paired.paired_parser("campaign", doc, experiment="rifle-campaign", runs="campaign's", example="epochs=40",
                             prog=prog,
                             output_help="runs go to <root>/<name>-<dataset>-<protocol>/<method>/seed-<s>",
                             report_help="per group <dir>/<dataset>/<protocol>/, and summary.md, summary.csv, "
                             "summary_paired.csv")
    p.add_argument("--config", default="", help="campaign YAML: fixed options, datasets with their own options, "
                   "methods, seeds, protocol, name (see configs/campaign/table1.yaml); the command line wins")
    p.add_argument("--datasets", default="", help="comma-separated datasets (registered names, imagefolder:<root>, "
                   "disk:<path>, Hub ids); default: the config's, else digits")
    p.add_argument("--methods", default="", help="comma-separated method labels, e.g. plain,rifle,l2sp,rifle+l2sp "
                   "(default: the config's, else plain,rifle)")
    p.add_argument("--name", default="", help="campaign name (default: the config's, else campaign); groups are "
                   "<name>-<dataset>-<protocol>")
    p.add_argument("--reference", default="rifle", help="the method whose paired differences the tables show")
    p.set_defaults(seeds=None, protocol=None)
    return p


class Plan(NamedTuple):
    name: str
    plan: dict      # group -> method label -> trainer options (rifle.paired)
    groups: dict    # group -> (dataset, protocol)
    seeds: list


def build_plan(args, tool: str = "campaign") -> Plan | None:
    """The campaign of `args` (config file, then the command line), every configuration built and each group's
    budget checked (rifle.paired.paired_plan); None after printing the error of a bad value."""
    try:
        cfg = load_config(args.config) if args.config else {}
        datasets = ({d: {} for d in args.datasets.split(",") if d} if args.datasets else cfg.get("datasets")) \
            or {"digits": {}}
        datasets = {d: cfg.get("datasets", {}).get(d, {}) | own for d, own in datasets.items()}
        labels = [method_label(m) for m in (args.methods.split(",") if args.methods else cfg.get("methods")
                                            or ["plain", "rifle"])]
        methods = paired.method_options(labels)
    except (C.ConfigError, ValueError) as e:
        print(f"rifle.{tool}: error: {e}", file=sys.stderr)
        return None
    args.seeds = args.seeds if args.seeds is not None else int(cfg.get("seeds", 5))
    args.protocol = args.protocol or cfg.get("protocol", "both")
    name = args.name or cfg.get("name") or "campaign"
    base = cfg["fixed"] if "fixed" in cfg else paired.BASE
    if args.protocol not in (*paired.PROTOCOLS, "both"):
        print(f"rifle.{tool}: error: --protocol: got {args.protocol!r}, allowed: validated, authors, both",
              file=sys.stderr)
        return None
    groups = {}  # group -> (dataset, protocol)

    def plan_of(protocol: str, shared: dict) -> dict:
        out = {}
        for dataset, own in datasets.items():
            group = f"{name}-{slug(dataset)}-{protocol}"
            groups[group] = (dataset, protocol)
            out[group] = {label: (shared | {"dataset": dataset} | own | options) for label, options in methods.items()}
        return out

    plan = paired.paired_plan(args, tool, plan_of, base)
    return None if plan is None else Plan(name, plan, groups, list(range(args.seeds)))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    built = build_plan(args)
    if built is None:
        return 2
    status, parents = paired.run("campaign", built.name, built.plan, built.seeds, args)
    code = paired.exit_code("campaign", status)
    if code is not None:
        return code
    return write_reports(args, built.name, built.groups, parents)


def write_reports(args, name: str, groups: dict, parents: dict) -> int:
    import pandas as pd

    from .evidence.build import build_report
    from .track.parents import claim_parent
    from .track.reads import REPORT_TAG
    out = Path(args.report_dir)
    by_protocol: dict[str, list] = {}
    for group, parent in parents.items():
        dataset, protocol = groups[group]
        built = build_report(args.tracking_uri, args.experiment, parent_run_id=parent,
                                    output_dir=out / slug(dataset) / protocol, reference=args.reference)
        by_protocol.setdefault(protocol, []).append(built["runs"])
        print(f"{dataset}, {protocol}: {out / slug(dataset) / protocol} (also artifacts report/ of run {parent})")
    text, table, tests = summary_tables({p: pd.concat(r, ignore_index=True) for p, r in by_protocol.items()},
                                        args.reference)
    (out / "summary.md").write_text(text)
    table.to_csv(out / "summary.csv", index=False)
    tests.to_csv(out / "summary_paired.csv", index=False)
    from mlflow.tracking import MlflowClient
    client = MlflowClient(args.tracking_uri)
    run = claim_parent(client, {"campaign.summary": name}, "campaign.role", args.experiment, f"{name}-summary",
                       {REPORT_TAG: "true"}, adopt=False)
    for file in ("summary.md", "summary.csv", "summary_paired.csv"):
        client.log_artifact(run, str(out / file), "report")
    if client.get_run(run).info.status != "FINISHED":
        client.set_terminated(run)
    print(text)
    print(f"summary: {out / 'summary.md'}, summary.csv, summary_paired.csv (also artifacts report/ of run {run})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
