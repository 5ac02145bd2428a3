"""A plan: groups x methods x seeds x protocols, the one format of every paired comparison (a campaign's YAML
file: the paper's table, the offline study, the regime grid; a comparison of tuned studies builds one too).

    name: table1                 # the campaign: its Optuna study, MLflow parent runs and report folder
    seeds: 5                     # paired seeds 0..N-1, or a list
    protocol: both               # validated | authors | both
    reference: rifle             # whose paired differences the tables show
    redraw_subset: false         # true: every seed draws its own k-shot / label-rate subset (split_seed = seed)
    fixed: {epochs: 40}          # trainer options of every cell
    datasets: {cub200: {}}       # groups named by their dataset, each with its own options, or
    groups: {10pc: {train_per_class: 10}}   # named groups of options
    methods: [plain, rifle]      # method labels, or label -> options (e.g. a RIFLE variant per K)
    views: [regime]              # report views beside the tables (regime: rifle.evidence.regime)
    references: [...]            # published figures printed beside the measured ones (see `Reference`)

A cell's options, later ones winning: `fixed` (the offline setting without a file), the protocol's, the group's,
the command line's, the method's (a method is what it says it is). Every configuration is built before anything
runs, and `check_budget` refuses a group whose methods would train different numbers of epochs or steps. Cells
go in the order group, seed, method, so a partial campaign holds complete pairs. Light: no torch.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from . import config as C
from .methods import method_label, method_tricks
from .schedules import shared_epochs

# The two evaluation protocols: the validated one (the trainer's defaults) and the official RIFLE code's.
PROTOCOLS = {"validated": {"val_fraction": 0.2, "selection": "best_val"},
             "authors": {"val_fraction": 0, "selection": "last"}}
# The offline setting: every cell's options when a plan has no `fixed` (sweeps/base.yaml extends it too).
BASE = yaml.safe_load(resources.files("rifle").joinpath("offline.yaml").read_text())["fixed"]
# Options that set a run's budget: equal for every method of a group, so a paired difference is the method's.
# Epochs first: their mismatch (RIFLE's truncation to a multiple of K+1) is the usual one, and its error has a hint.
BUDGET = tuple(sorted(C.with_role("budget"), key=lambda name: "data" in C.roles_of(name)))
KEYS = {"name", "seeds", "protocol", "reference", "redraw_subset", "fixed", "datasets", "groups", "methods", "views",
        "references"}
VIEWS = ("regime",)


@dataclass
class Reference:
    """Published figures to print beside ours: `source` (a citation), `settings` (what they trained), `values`
    {dataset: {method: test accuracy as a fraction}} and `protocol` (the protocol they match, default authors)."""
    source: str
    settings: str
    values: dict
    protocol: str = "authors"


@dataclass
class Cell:
    """One (group, method, seed) of a plan: one trainer run, one Optuna trial, one MLflow child run."""
    group: str      # its parent run's name: <plan>-<group key>-<protocol>
    method: str     # the method label (rifle.methods)
    seed: int
    options: dict   # trainer options but the seed and the output directory

    @property
    def key(self) -> str:
        return f"{self.group}/{self.method}/seed-{self.seed}"

    def values(self) -> dict:
        return self.options | {"seed": self.seed}


@dataclass
class Plan:
    name: str
    groups: dict[str, dict]          # group key (a dataset's slug, or a name) -> its options
    methods: dict[str, dict]         # label -> its options
    fixed: dict = field(default_factory=lambda: dict(BASE))
    seeds: list[int] = field(default_factory=lambda: list(range(5)))
    protocols: list[str] = field(default_factory=lambda: list(PROTOCOLS))
    reference: str = "rifle"
    redraw_subset: bool = False
    views: list[str] = field(default_factory=list)
    references: list[Reference] = field(default_factory=list)
    overrides: dict = field(default_factory=dict)  # the command line's options

    def group_name(self, key: str, protocol: str) -> str:
        """<plan>-<group key>-<protocol>; an empty key or protocol (a comparison's one group) is left out."""
        return "-".join(part for part in (self.name, key, protocol) if part)

    def runs(self) -> dict[str, dict[str, dict]]:
        """{group name: {method label: options}}, in plan order (protocol, then group)."""
        return {self.group_name(key, protocol): {
            label: self.fixed | PROTOCOLS.get(protocol, {}) | own | self.overrides | options
            for label, options in self.methods.items()}
            for protocol in self.protocols for key, own in self.groups.items()}

    def group_of(self, name: str) -> tuple[str, str]:
        """(group key, protocol) of a group name."""
        for protocol in self.protocols:
            for key in self.groups:
                if self.group_name(key, protocol) == name:
                    return key, protocol
        raise KeyError(name)

    def cells(self) -> list[Cell]:
        return [Cell(group, label, seed, options | ({"split_seed": seed} if self.redraw_subset else {}))
                for group, methods in self.runs().items() for seed in self.seeds for label, options in methods.items()]

    def datasets(self) -> dict[str, dict]:
        """One configuration per distinct way the plan loads data (dataset and protocol), in plan order."""
        out = {}
        for methods in self.runs().values():
            cfg = C.build(next(iter(methods.values())) | {"output_dir": "unused"})
            out.setdefault(repr(sorted(vars(cfg.data).items())), cfg)
        return out

    def resolve_revisions(self) -> None:
        """Freeze each group's Hub dataset at the commit its revision names now (a branch such as `main` resolved
        once, here), so that every cell of the campaign loads and logs that commit."""
        from .data import registry
        from .data.sources import resolve_revision
        for key, own in self.groups.items():
            options = self.fixed | own | self.overrides
            spec, revision = options.get("dataset", "digits"), options.get("dataset_revision")
            entry = registry.lookup(spec, options.get("dataset_registry")) if registry.is_name(spec) else None
            source = entry.source if entry else spec
            if source == "digits" or source.startswith(("imagefolder:", "disk:")) or \
                    Path(source.removeprefix("hub:")).expanduser().is_dir():
                continue
            revision = revision or (entry.revision if entry else None)
            if not (revision and registry.COMMIT.match(revision)):
                own["dataset_revision"] = resolve_revision(source.removeprefix("hub:"), revision, spec)

    def adopt_revisions(self, stored: dict) -> None:
        """Take the commits a campaign froze (its stored plan: group -> method -> options) for the groups whose own
        revision is not a commit, so a joiner loads what the campaign's first worker resolved."""
        from .data.registry import COMMIT
        for key, own in self.groups.items():
            if COMMIT.match(str(own.get("dataset_revision") or self.overrides.get("dataset_revision") or "")):
                continue
            for protocol in self.protocols:
                group = stored.get(self.group_name(key, protocol), {})
                found = {str(options.get("dataset_revision")) for options in group.values()}
                commits = [r for r in found if COMMIT.match(r)]
                if commits:
                    own["dataset_revision"] = commits[0]

    def check_datasets(self) -> list[str]:
        """Every dataset the plan trains on loaded and checked against its registry entry (classes, sizes,
        columns), the image scan left to the runs: one line per problem, none when all load."""
        from .data import DataError, load
        problems = []
        for cfg in self.datasets().values():
            try:
                load(cfg.data, scan=False)
            except DataError as e:
                problems.append(str(e))
        return problems

    def check(self) -> None:
        """Every configuration built (ConfigError names the option) and every group's budget checked."""
        method_label(self.reference)
        for group, methods in self.runs().items():
            check_budget(group, {label: C.build(options | {"output_dir": "unused"})
                                 for label, options in methods.items()})


def check_budget(group: str, methods: dict[str, C.Config]) -> None:
    """ConfigError unless every method of the group trains the same epochs on the same data at the same batch
    (hence the same optimizer steps); RIFLE's truncation to a multiple of K+1 is the usual culprit."""
    (first, a), *rest = methods.items()
    for label, b in rest:
        differs = [k for k in BUDGET if a.flat()[k] != b.flat()[k]]
        if not differs:
            continue
        k = differs[0]
        hint = ""
        if k == "epochs":
            epochs = shared_epochs(max(c.optim.epochs for c in methods.values()),
                                   [c.tricks.reinit_times for c in methods.values() if C.periodic(c)])
            hint = (f"; RIFLE trains a multiple of K+1 epochs (the official truncation): choose epochs that every "
                    f"K+1 divides, e.g. epochs={epochs}")
        raise C.ConfigError(k, f"{group}: {first} trains with {k}={a.flat()[k]!r} but {label} with "
                            f"{b.flat()[k]!r}: a paired comparison needs one budget for every method{hint}")


def slug(text: str) -> str:
    """A group key from a dataset spec: the folder name of imagefolder:/disk:/hub: paths, safe characters."""
    for prefix in ("imagefolder:", "disk:", "hub:"):
        if text.startswith(prefix) and "/" in text:
            text = Path(text[len(prefix):].rstrip("/")).name
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "dataset"


def method_options(methods) -> dict[str, dict]:
    """label -> options from a list of labels (the tricks of the label) or a mapping label -> options (the
    tricks default to the label's when it is a method label)."""
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    if isinstance(methods, (list, tuple)):
        methods = {method_label(m): {} for m in methods}
    out = {}
    for label, options in methods.items():
        options = dict(options or {})
        if "tricks" not in options:
            options["tricks"] = ",".join(method_tricks(method_label(label)))
        out[str(label)] = options
    return out


def load(path: str | None, *, datasets: str = "", methods: str = "", seeds: int | None = None, protocol: str = "",
         name: str = "", reference: str = "", overrides: dict | None = None) -> Plan:
    """The plan of a YAML file (None: the offline setting, digits), then the command line's choices; every option
    name and value checked here (ConfigError naming the file and the key) and every configuration built."""
    data = _read(path) if path else {}
    where = path or "the command line"
    fixed = dict(data["fixed"]) if "fixed" in data else dict(BASE)
    if "datasets" in data and "groups" in data:
        raise C.ConfigError("config", f"{where}: give datasets or groups, not both")
    if datasets:
        groups = {slug(d): {"dataset": d} | _dataset_options(data).get(d, {}) for d in datasets.split(",") if d}
    elif "groups" in data:
        groups = {str(k): dict(v or {}) for k, v in (data["groups"] or {}).items()}
    else:
        groups = {slug(d): {"dataset": d} | own for d, own in _dataset_options(data).items()} or \
            {slug(fixed.get("dataset", "digits")): {}}
    chosen = methods or data.get("methods") or ["plain", "rifle"]
    try:
        labels = method_options(chosen)
    except ValueError as e:
        raise C.ConfigError("methods", f"{where}: {e}") from None
    given = data.get("seeds", 5) if seeds is None else seeds
    seed_list = list(range(int(given))) if isinstance(given, int) else [int(s) for s in given]
    proto = protocol or data.get("protocol", "both")
    if proto not in (*PROTOCOLS, "both"):
        raise C.ConfigError("protocol", f"got {proto!r}, allowed: validated, authors, both")
    views = list(data.get("views") or [])
    for view in views:
        if view not in VIEWS:
            raise C.ConfigError("config", f"{where}: views: unknown view {view!r} (views: {', '.join(VIEWS)})")
    references = [Reference(**r) for r in data.get("references") or []]
    for section, options in [("fixed", fixed), *((f"groups.{k}", v) for k, v in groups.items()),
                             *((f"methods.{k}", v) for k, v in labels.items()), ("command line", overrides or {})]:
        for option, value in options.items():
            try:
                C.convert(option, value)
            except C.ConfigError as e:
                raise C.ConfigError("config" if section != "command line" else option,
                                    f"{where}: {section}.{option}: {str(e).removeprefix(f'--{option}: ')}") from None
    plan = Plan(name=name or data.get("name") or "campaign", groups=groups, methods=labels, fixed=fixed,
                seeds=seed_list, protocols=list(PROTOCOLS) if proto == "both" else [proto],
                reference=reference or data.get("reference", "rifle"), redraw_subset=bool(data.get("redraw_subset")),
                views=views, references=references, overrides=dict(overrides or {}))
    plan.check()
    return plan


def _read(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise C.ConfigError("config", f"file not found: {path}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise C.ConfigError("config", f"{path}: not valid YAML ({e})".replace("\n", " ")) from None
    unknown = sorted(set(data) - KEYS) if isinstance(data, dict) else ["(not a mapping)"]
    if unknown:
        raise C.ConfigError("config", f"{path}: {unknown[0]}: unknown key (allowed: {', '.join(sorted(KEYS))})")
    return data


def _dataset_options(data: dict) -> dict[str, dict]:
    datasets = data.get("datasets") or {}
    if isinstance(datasets, list):
        datasets = {d: {} for d in datasets}
    return {str(d): dict(o or {}) for d, o in datasets.items()}
