"""Loading a study or a profile: YAML files by name, ``--set`` overrides, and the checks of the typed
models (one line naming the field on bad input)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, TypeVar

import yaml

from lpt_core.config import Section, validate
from tune.config.study import Objective, ProfileConfig, StudyConfig
from tune.errors import ConfigError

M = TypeVar("M", bound=Section)

ROOT = Path(__file__).resolve().parents[2]


STUDIES_DIR = ROOT / "studies"


PROFILES_DIR = STUDIES_DIR / "profiles"


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


STUDY_OVERRIDES = ("budget",)  # --set sections that are the study's (a profile has none of them)


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """``--set`` overrides as (the profile's, the study's): ``budget.*`` keys are the study's,
    except ``budget.trials``, which ``--trials`` sets (a resumed search reads it there)."""
    profile, study = [], []
    for text in overrides:
        keys, _ = parse_override(text)
        if keys[0] in STUDY_OVERRIDES:
            if keys[1:] == ["trials"]:
                raise ConfigError(f"--set {text}: use --trials N")
            study.append(text)
        else:
            profile.append(text)
    return profile, study


def load_profile(name: str, overrides: list[str] | None = None) -> tuple[Path, ProfileConfig]:
    path = resolve_file(name, PROFILES_DIR, "profile")
    raw = apply_overrides(_read_yaml(path), overrides or [])
    return path, _checked(ProfileConfig, raw, path)


def load_study(name: str, overrides: list[str] | None = None) -> tuple[Path, StudyConfig]:
    """``overrides``: ``budget.<key>=value`` (``--set``, ``--gpu-hours``, ``--cpu-hours``). The
    space keeps the file's order of its parameters (``Space.params()``)."""
    path = resolve_file(name, STUDIES_DIR, "study")
    raw = apply_overrides(_read_yaml(path), overrides or [])
    return path, _checked(StudyConfig, raw, path)


def _checked(model: type[M], raw: dict, path: Path) -> M:
    try:
        return validate(model, raw)
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def profile_data(profile: ProfileConfig):
    """The profile's dataset, its images prepared for the profile's backbone (``input_config``)."""
    from lpt_core.backbones import input_config
    from lpt_core.data import build_dataset

    return build_dataset(profile.data, input_config(profile.backbone.spec(), profile.input))


def objective_of(objective: Objective) -> tuple[list[str], list[str]]:
    """Metric names and modes of a study's ``objective``; the first pair drives early stopping."""
    if objective.metrics is not None:
        return list(objective.metrics), list(objective.modes or [])
    return [objective.metric], [objective.mode]
