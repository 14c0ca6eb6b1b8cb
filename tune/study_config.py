"""Load and check study and profile YAML files before anything starts.

A study says what to search (``space``), what to optimise (``objective``), how many trials
(``budget``) and how to stop bad ones early (``early_stopping``). A profile says what to train on
(``data``, ``backbone``), the fixed recipe (``model``, ``phase1``, ``phase2``) and the per-trial
``resources``. Every problem is a ``ConfigError`` whose one-line message names the file and key.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Any

import yaml

from lpt_core.metrics import SHOT_SPLITS
from lpt_core.trainer import PhaseConfig

ROOT = Path(__file__).resolve().parents[1]
STUDIES_DIR = ROOT / "studies"
PROFILES_DIR = STUDIES_DIR / "profiles"

MODEL_KEYS = ("prompt_length", "pool_size", "top_k", "group_start")
RECIPE_KEYS = tuple(f.name for f in dataclasses.fields(PhaseConfig))
SHOT_KEYS = ("acc", "many_acc", "medium_acc", "few_acc")  # lpt_core.evaluate's accuracies, overall and by shot
OBJECTIVE_METRICS = tuple(f"val_{k}" for k in SHOT_KEYS)


class ConfigError(ValueError):
    """Bad study, profile or override: the message is the one line the CLI prints."""


def error_line(exc: BaseException) -> str:
    """An unexpected exception in one line: its type and the first line of its message."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


# ----------------------------------------------------------------------------- value checks
class Num:
    """A number (``integer`` for ints only) within [lo, hi]; ``above`` makes lo exclusive."""

    def __init__(self, lo: float | None = None, hi: float | None = None, integer: bool = False,
                 above: bool = False):
        self.lo, self.hi, self.integer, self.above = lo, hi, integer, above

    def check(self, value: Any, where: str) -> Any:
        kind = "an integer" if self.integer else "a number"
        if isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float)):
            raise ConfigError(f"{where}: must be {kind}, got {value!r}")
        if not self.integer and not math.isfinite(value):
            raise ConfigError(f"{where}: must be a finite number, got {value!r}")
        if self.lo is not None and (value <= self.lo if self.above else value < self.lo):
            raise ConfigError(f"{where}: must be {'>' if self.above else '>='} {self.lo}, got {value!r}")
        if self.hi is not None and value > self.hi:
            raise ConfigError(f"{where}: must be <= {self.hi}, got {value!r}")
        return value


class Str:
    def __init__(self, choices: tuple[str, ...] | None = None):
        self.choices = choices

    def check(self, value: Any, where: str) -> Any:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: must be a non-empty string, got {value!r}")
        if self.choices and value not in self.choices:
            raise ConfigError(f"{where}: must be one of {', '.join(self.choices)}, got {value!r}")
        return value


class GpuShare(Num):
    """GPUs per trial as Ray places them: a fraction below 1 (trials share a GPU) or a whole number."""

    def __init__(self):
        super().__init__(0)

    def check(self, value: Any, where: str) -> Any:
        super().check(value, where)
        if value > 1 and value != int(value):
            raise ConfigError(f"{where}: must be a fraction below 1 (trials share a GPU) or a whole "
                              f"number of GPUs, got {value!r}")
        return value


class Bool:
    def check(self, value: Any, where: str) -> Any:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: must be true or false, got {value!r}")
        return value


class AnyMap:
    """A mapping whose keys the code that uses it checks (dataset and backbone specs)."""

    def __init__(self, required: tuple[str, ...] = ()):
        self.required = required

    def check(self, value: Any, where: str) -> Any:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: must be a mapping, got {value!r}")
        for key in self.required:
            if key not in value:
                raise ConfigError(f"{where}.{key}: missing")
        return value


class AnyList:
    """A non-empty list whose items the caller checks."""

    def check(self, value: Any, where: str) -> Any:
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{where}: must be a non-empty list, got {value!r}")
        return value


def check_map(value: Any, schema: dict, where: str, required: tuple[str, ...] = ()) -> dict:
    prefix = f"{where}." if where else ""
    if not isinstance(value, dict):
        raise ConfigError(f"{where or 'file'}: must be a mapping, got {value!r}")
    for key in value:
        if key not in schema:
            raise ConfigError(f"{prefix}{key}: unknown key (known: {', '.join(schema)})")
    for key in required:
        if key not in value:
            raise ConfigError(f"{prefix}{key}: missing")
    for key, sub in value.items():
        rule = schema[key]
        if isinstance(rule, dict):
            check_map(sub, rule, f"{prefix}{key}")
        else:
            rule.check(sub, f"{prefix}{key}")
    return value


def _recipe_rules() -> dict:
    rules = {}
    for f in dataclasses.fields(PhaseConfig):
        if f.type in ("int", int):
            rules[f.name] = Num(0 if f.name == "warmup_epochs" else 1, integer=True)
        else:
            rules[f.name] = Num(0, above=f.name in ("lr", "scale"))
    rules["label_smoothing"] = Num(0, 0.99)
    return rules


MODEL_RULES = {"prompt_length": Num(1, integer=True), "pool_size": Num(1, integer=True),
               "top_k": Num(1, integer=True), "group_start": Num(1, integer=True)}
RECIPE_RULES = _recipe_rules()
PARAM_RULES = {**MODEL_RULES, **RECIPE_RULES}

PROFILE_SCHEMA = {
    "description": Str(),
    "data": AnyMap(required=("name",)),
    "backbone": AnyMap(required=("name",)),
    "model": MODEL_RULES,
    "phase1": RECIPE_RULES,
    "phase2": RECIPE_RULES,
    "seed": Num(0, integer=True),
    "device": Str(("auto", "cpu", "cuda")),
    "compile": Bool(),
    "shot_split": Str(SHOT_SPLITS),
    "images_per_s": Num(0, above=True),
    "resources": {"cpu": Num(0, above=True), "gpu": GpuShare()},
    "loader": {"num_workers": Num(0, integer=True), "eval_batch_size": Num(1, integer=True)},
}
PROFILE_REQUIRED = ("data", "backbone")

PARAM_SCHEMA = {"type": Str(("int", "float", "choice")), "low": Num(), "high": Num(),
                "step": Num(0, above=True), "log": Bool(), "values": AnyList()}

STUDY_SCHEMA = {
    "description": Str(),
    "objective": {"metric": Str(OBJECTIVE_METRICS), "mode": Str(("max", "min")),
                  "metrics": AnyList(), "modes": AnyList()},
    "budget": {"trials": Num(1, integer=True), "concurrency": Num(1, integer=True),
               "max_failures": Num(0, integer=True)},
    "early_stopping": {"enabled": Bool(), "grace_period": Num(1, integer=True),
                       "reduction_factor": Num(1, above=True)},
    "seed": Num(0, integer=True),
    "space": AnyMap(),
}
STUDY_DEFAULTS = {
    "objective": {"metric": "val_acc", "mode": "max"},
    "budget": {"trials": 12, "concurrency": 2, "max_failures": 2},
    "early_stopping": {"enabled": True, "grace_period": 1, "reduction_factor": 2},
    "seed": 0,
}
PROFILE_DEFAULTS = {
    "model": {"prompt_length": 10, "pool_size": 20, "top_k": 2, "group_start": 6},
    "phase1": {}, "phase2": {}, "seed": 0, "device": "auto", "compile": False, "shot_split": "standard",
    "resources": {"cpu": 1, "gpu": 0},
    "loader": {"num_workers": 4, "eval_batch_size": 256},
}


# ----------------------------------------------------------------------------- loading
def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{line} not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must hold a mapping of keys, got {type(data).__name__}")
    return data


def resolve_file(name: str, folder: Path, what: str) -> Path:
    """A name in ``folder`` (with or without .yaml) or a path to a YAML file."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    candidate = folder / f"{name}.yaml"
    if candidate.exists():
        return candidate
    known = sorted(p.stem for p in folder.glob("*.yaml"))
    raise ConfigError(f"--{what} {name}: no such {what} (known: {', '.join(known)}; or give a .yaml path)")


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``dotted.key=value`` with the value read as a YAML scalar."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text}: expected dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(profile: dict, overrides: list[str]) -> dict:
    out = copy.deepcopy(profile)
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text}: {k} is not a section")
        node[keys[-1]] = value
    return out


def load_profile(name: str, overrides: list[str] | None = None) -> tuple[Path, dict]:
    path = resolve_file(name, PROFILES_DIR, "profile")
    raw = apply_overrides(_read_yaml(path), overrides or [])
    try:
        check_map(raw, PROFILE_SCHEMA, "", PROFILE_REQUIRED)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    profile = _merge(PROFILE_DEFAULTS, raw)
    if profile["device"] == "cuda" and profile["resources"]["gpu"] == 0:
        raise ConfigError(f"{path}: resources.gpu: device cuda needs a GPU share per trial, got 0 "
                          "(Ray would not give the trial a GPU)")
    return path, profile


def check_param(name: str, spec: Any, where: str) -> dict:
    if name not in PARAM_RULES:
        raise ConfigError(f"{where}: not a searchable parameter (model: {', '.join(MODEL_KEYS)}; "
                          f"recipe: {', '.join(RECIPE_KEYS)})")
    check_map(spec, PARAM_SCHEMA, where, ("type",))
    rule = PARAM_RULES[name]
    if spec["type"] == "choice":
        values = spec.get("values")
        if values is None:
            raise ConfigError(f"{where}.values: missing")
        for i, v in enumerate(values):
            rule.check(v, f"{where}.values[{i}]")
        return spec
    for key in ("low", "high"):
        if key not in spec:
            raise ConfigError(f"{where}.{key}: missing")
        rule.check(spec[key], f"{where}.{key}")
    if spec["type"] == "int" and not rule.integer:
        raise ConfigError(f"{where}.type: {name} is a real number; use float or choice")
    if spec["type"] == "float" and rule.integer:
        raise ConfigError(f"{where}.type: {name} is an integer; use int or choice")
    if spec["low"] > spec["high"]:
        raise ConfigError(f"{where}.low: must be <= high ({spec['low']} > {spec['high']})")
    if spec.get("log") and spec["low"] <= 0:
        raise ConfigError(f"{where}.low: must be > 0 with log: true")
    return spec


def load_study(name: str) -> tuple[Path, dict]:
    path = resolve_file(name, STUDIES_DIR, "study")
    raw = _read_yaml(path)
    try:
        check_map(raw, STUDY_SCHEMA, "", ("space",))
        study = _merge(STUDY_DEFAULTS, raw)
        if not study["space"]:
            raise ConfigError("space: empty; name at least one parameter to search")
        for pname, spec in study["space"].items():
            check_param(pname, spec, f"space.{pname}")
        objective = study["objective"]
        if "metrics" in raw.get("objective", {}):
            metrics, modes = objective["metrics"], objective.get("modes")
            if not isinstance(metrics, list) or len(metrics) < 2:
                raise ConfigError("objective.metrics: must list two or more metrics")
            for i, m in enumerate(metrics):
                Str(OBJECTIVE_METRICS).check(m, f"objective.metrics[{i}]")
            if not isinstance(modes, list) or len(modes) != len(metrics):
                raise ConfigError("objective.modes: must give one mode per metric")
            for i, m in enumerate(modes):
                Str(("max", "min")).check(m, f"objective.modes[{i}]")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return path, study


def objective_of(objective: dict) -> tuple[list[str], list[str]]:
    """Metric names and modes of a study's ``objective``; the first pair drives early stopping."""
    if "metrics" in objective:
        return list(objective["metrics"]), list(objective["modes"])
    obj = {**STUDY_DEFAULTS["objective"], **objective}
    return [obj["metric"]], [obj["mode"]]


def phase2_epochs(profile: dict) -> int:
    """Phase-2 epochs of a trial: the profile's, else ``PhaseConfig``'s default."""
    return profile["phase2"].get("epochs", PhaseConfig.epochs)
