"""Search-space files: `extends` a base file, `fixed` trainer options, `params` with Optuna distributions.

Every value is checked with the trainer's own rules (rifle.config) when the file is read, at both ends of
every range, so a bad space fails in a second, naming the file and the key, never in trial 7. The method's
label is derived from the fixed `tricks` (rifle.methods), never written separately.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .. import config as C
from ..methods import method_label

PARAM_TYPES = ("float", "int", "categorical")
PARAM_KEYS = {"type", "low", "high", "log", "step", "choices", "when"}
TOP_KEYS = {"extends", "fixed", "params"}
# Set by the sweep for each trial; a space may not set them.
MANAGED = C.with_role("managed")


class SpaceError(ValueError):
    """A bad search-space file: the message names the file and the key."""


@dataclass
class Param:
    name: str
    kind: str
    source: str                          # the file that defined it, for error messages
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: list | None = None
    when: dict[str, list] = field(default_factory=dict)

    def active(self, values: dict) -> bool:
        """A conditional parameter is suggested only when every condition holds for what is already set."""
        return all(name in values and C.convert(name, values[name]) in allowed
                   for name, allowed in self.when.items())

    def suggest(self, trial) -> Any:
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_categorical(self.name, self.choices)

    def grid_values(self) -> list:
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind == "int":
            return list(range(self.low, self.high + 1, self.step or 1))
        n = int(round((self.high - self.low) / self.step))
        return [round(self.low + i * self.step, 12) for i in range(n + 1)]

    def signature(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("name", "source")}


@dataclass
class Space:
    path: str
    fixed: dict[str, Any]                # option -> converted value (validated)
    params: dict[str, Param]             # in file order (conditions refer to earlier ones)
    sources: dict[str, str]              # option -> file (or "command line") that set it

    @property
    def method(self) -> str:
        return method_label(self.fixed.get("tricks", C.TricksConfig.tricks))

    def suggest(self, trial) -> dict[str, Any]:
        values = dict(self.fixed)
        for p in self.params.values():
            if p.active(values):
                values[p.name] = p.suggest(trial)
        return values

    def grid(self) -> dict[str, list]:
        for p in self.params.values():
            if p.when:
                raise SpaceError(f"{p.source}: params.{p.name}: the grid sampler needs every parameter in every "
                                 "trial; a conditional parameter needs --sampler tpe")
            if p.kind == "float" and p.step is None:
                raise SpaceError(f"{p.source}: params.{p.name}: the grid sampler needs a step (or categorical "
                                 "choices) for a float parameter")
        return {p.name: p.grid_values() for p in self.params.values()}

    def signature(self) -> dict:
        """What defines the study's trials: two workers must agree on it (run-only options excluded)."""
        return {"method": self.method,
                "fixed": {k: v for k, v in sorted(self.fixed.items()) if k not in C.RUN_ONLY},
                "params": {n: p.signature() for n, p in self.params.items()}}


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise SpaceError(f"{path}: file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SpaceError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise SpaceError(f"{path}: expected a mapping with keys {', '.join(sorted(TOP_KEYS))}")
    if "method" in data:  # the label is derived from `tricks`, so it cannot disagree with what trains
        raise SpaceError(f"{path}: method: the method is named after fixed.tricks (tricks: rifle,l2sp is "
                         "rifle+l2sp); remove this key")
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise SpaceError(f"{path}: {unknown[0]}: unknown key (allowed: {', '.join(sorted(TOP_KEYS))})")
    for key in ("fixed", "params"):
        if not isinstance(data.get(key) or {}, dict):
            raise SpaceError(f"{path}: {key}: expected a mapping of option: value")
    return data


def _option_error(source: str, where: str, name: str, *value: Any) -> None:
    """SpaceError for an unknown option or a value (if given) the option refuses (the trainer's own message)."""
    if name in MANAGED:
        raise SpaceError(f"{source}: {where}: set by the sweep for each trial (use --output_root, "
                         "--tracking_uri or --experiment)")
    try:
        if value:
            C.convert(name, value[0])
        elif name not in C.all_fields():
            C.convert(name, None)  # "unknown option", with the trainer's did-you-mean hint
    except C.ConfigError as e:
        raise SpaceError(f"{source}: {where}: {str(e).removeprefix(f'--{name}: ')}") from None


def _number(source: str, where: str, value: Any, integer: bool) -> float | int:
    """YAML reads 1e-3 (no dot) as a string: accept numeric strings, refuse booleans and words."""
    try:
        number = float("nan" if isinstance(value, bool) else value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or (integer and not number.is_integer()):
        raise SpaceError(f"{source}: {where}: expected {'an integer' if integer else 'a number'}, got {value!r}")
    return int(number) if integer else number


def _parse_param(source: str, name: str, spec: Any) -> Param:
    where = f"params.{name}"
    _option_error(source, where, name)

    def fail(key: str, message: str):
        raise SpaceError(f"{source}: {where}{key}: {message}")

    if not isinstance(spec, dict):
        fail("", "expected a mapping such as {type: float, low: 0.001, high: 0.1, log: true}; put a fixed "
                 "value under 'fixed'")
    unknown = sorted(set(spec) - PARAM_KEYS)
    if unknown:
        fail(f".{unknown[0]}", f"unknown key (allowed: {', '.join(sorted(PARAM_KEYS))})")
    kind = spec.get("type")
    if kind not in PARAM_TYPES:
        fail(".type", f"expected one of {', '.join(PARAM_TYPES)}, got {kind!r}")
    p = Param(name, kind, source)
    if kind == "categorical":
        extra = sorted({"low", "high", "log", "step"} & set(spec))
        if extra:
            fail(f".{extra[0]}", "not used by a categorical parameter (use choices)")
        p.choices = spec.get("choices")
        if not isinstance(p.choices, list) or not p.choices:
            fail(".choices", "expected a non-empty list")
        if any(isinstance(c, (dict, list)) for c in p.choices):
            fail(".choices", "each choice must be a single value")
        if len({json.dumps(c) for c in p.choices}) != len(p.choices):
            fail(".choices", "a value is listed twice")
    else:
        if "choices" in spec:
            fail(".choices", "only for type categorical")
        for key in ("low", "high"):
            if key not in spec:
                fail(f".{key}", f"required for type {kind}")
        p.low, p.high = (_number(source, f"{where}.{k}", spec[k], kind == "int") for k in ("low", "high"))
        if not p.low < p.high:
            fail("", f"malformed range, low must be below high (got low={spec['low']}, high={spec['high']})")
        p.log = spec.get("log", False)
        if not isinstance(p.log, bool):
            fail(".log", f"expected true or false, got {p.log!r}")
        if p.log and p.low <= 0:
            fail("", f"a log range needs low > 0, got {spec['low']}")
        if "step" in spec:
            p.step = _number(source, f"{where}.step", spec["step"], kind == "int")
            if p.step <= 0:
                fail(".step", f"must be > 0, got {spec['step']}")
            if p.log and (kind == "float" or p.step != 1):
                fail("", "log and step cannot be combined (Optuna samples a log range continuously)")
    when = spec.get("when") or {}
    if not isinstance(when, dict):
        fail(".when", "expected a mapping option: value or [values]")
    for other, allowed in when.items():
        allowed = allowed if isinstance(allowed, list) else [allowed]
        for value in allowed:
            _option_error(source, f"{where}.when.{other}", other, value)
        p.when[other] = [C.convert(other, v) for v in allowed]
    return p


def _merge(path: Path, stack: tuple = ()) -> tuple[dict, dict, dict]:
    """(fixed, params, sources) of a file after its `extends` chain."""
    if path.resolve() in stack:
        raise SpaceError(f"{path}: extends: circular ({' -> '.join(str(p) for p in (*stack, path.resolve()))})")
    data = _read_yaml(path)
    fixed, params, sources = {}, {}, {}
    if data.get("extends"):
        parent = path.parent / str(data["extends"])
        if not parent.is_file():
            raise SpaceError(f"{path}: extends: file not found: {parent}")
        fixed, params, sources = _merge(parent, (*stack, path.resolve()))
    own_fixed, own_params = data.get("fixed") or {}, data.get("params") or {}
    both = sorted(set(own_fixed) & set(own_params))
    if both:
        raise SpaceError(f"{path}: {both[0]}: both under fixed and under params")
    for name, value in own_fixed.items():  # a file fixes what its base searched, and the reverse
        _option_error(str(path), f"fixed.{name}", name, value)
        params.pop(name, None)
        fixed[name], sources[name] = value, str(path)
    for name, spec in own_params.items():
        fixed.pop(name, None)
        params[name], sources[name] = _parse_param(str(path), name, spec), str(path)
    return fixed, params, sources


def load_space(path: str, overrides: dict[str, Any] | None = None) -> Space:
    """Read and validate a search space; `overrides` (command-line trainer options) fix more options."""
    fixed, params, sources = _merge(Path(path))
    if "tricks" in params:
        raise SpaceError(f"{params['tricks'].source}: params.tricks: a study tunes one method; fix tricks under "
                         "fixed and make one space per method")
    for name, value in (overrides or {}).items():
        if name in params:
            raise SpaceError(f"--{name}: searched in {params[name].source} (params.{name}); remove it there to "
                             "fix it from the command line")
        _option_error("command line", f"--{name}", name, value)
        fixed[name], sources[name] = value, "command line"
    space = Space(str(path), {k: C.convert(k, v) for k, v in fixed.items()}, dict(params), sources)
    _check_values(space)
    return space


def _check_values(space: Space) -> None:
    """Build a config at every end of every range (and every choice): a value the trainer refuses, or an
    impossible combination with the fixed options, fails now, naming the file and key."""
    def build(values: dict, name: str, where: str) -> C.Config:
        try:
            return C.build(values | {"output_dir": "unused"})
        except C.ConfigError as e:
            source = space.sources.get(e.option, space.sources.get(name, space.path))
            key = where if e.option == name else f"{'fixed' if e.option in space.fixed else 'params'}.{e.option}"
            raise SpaceError(f"{source}: {key}: {str(e).removeprefix(f'--{e.option}: ')}") from None

    if build(dict(space.fixed), "", "fixed").data.val_fraction == 0:
        raise SpaceError(f"{space.sources.get('val_fraction', space.path)}: val_fraction: a study selects on "
                         "validation accuracy, so it needs val_fraction > 0")
    seen: dict[str, list] = {}
    for p in space.params.values():
        for other in p.when:
            if other not in space.fixed and other not in seen:
                raise SpaceError(f"{p.source}: params.{p.name}.when.{other}: must be a fixed option or a parameter "
                                 "listed before it")
        ends = p.choices if p.kind == "categorical" else [p.low, p.high]
        context = {k: v[0] for k, v in p.when.items() if k in seen}  # values that make the parameter active
        epochs = {}  # epochs each value trains (RIFLE truncates to a multiple of K+1)
        small = p.kind == "int" and not p.log and (p.high - p.low) // (p.step or 1) < 50  # every value, not the ends
        for value in p.grid_values() if small else ends:
            key = "choices" if p.kind == "categorical" else "low" if value == p.low else "high" if value == p.high \
                else f"{value}"
            cfg = build(space.fixed | context | {p.name: value}, p.name, f"params.{p.name}.{key}")
            epochs[value] = cfg.optim.epochs
        if len(set(epochs.values())) > 1:  # trials would compare different budgets
            raise SpaceError(f"{p.source}: params.{p.name}: its values train different numbers of epochs ("
                             + ", ".join(f"{v}: {e}" for v, e in epochs.items()) + "): choose values whose K+1 divides "
                             f"epochs={space.fixed.get('epochs', C.OptimConfig.epochs)}, so every trial has one budget")
        seen[p.name] = ends
