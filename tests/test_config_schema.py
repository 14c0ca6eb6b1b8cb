"""The published JSON Schema of studies and profiles: every shipped file validates against it, broken
files do not, and the CLI prints it on its own. The same models load the files (tune.config.study),
so the schema and the loader cannot disagree on keys, types or ranges."""

import json
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
from smoke_search import search_argv

from tune.config.loading import PROFILES_DIR, STUDIES_DIR
from tune.config.study import schema

STUDIES = sorted(STUDIES_DIR.glob("*.yaml"))
PROFILES = sorted(PROFILES_DIR.glob("*.yaml"))


def validator(kind: str) -> jsonschema.Draft202012Validator:
    spec = schema(kind)
    jsonschema.Draft202012Validator.check_schema(spec)
    return jsonschema.Draft202012Validator(spec)


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_the_repository_ships_studies_and_profiles():
    assert len(STUDIES) >= 4 and len(PROFILES) >= 5


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.stem)
def test_every_shipped_study_validates(path):
    validator("study").validate(load(path))


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_every_shipped_profile_validates(path):
    validator("profile").validate(load(path))


def broken(path: Path, dotted: str, value) -> dict:
    data = load(path)
    node = data
    keys = dotted.split(".")
    for k in keys[:-1]:
        node = node[k]
    node[keys[-1]] = value
    return data


@pytest.mark.parametrize(
    "kind, path, dotted, value, where",
    [
        ("study", STUDIES_DIR / "prompt_pool.yaml", "budget.trails", 3, "trails"),  # unknown key
        ("study", STUDIES_DIR / "prompt_pool.yaml", "budget.trials", 0, "trials"),  # out of range
        ("study", STUDIES_DIR / "prompt_pool.yaml", "space.pool_size.low", 0, "low"),  # below the model's range
        ("study", STUDIES_DIR / "prompt_pool.yaml", "space.epochs", {"type": "int", "low": 1, "high": 3}, "epochs"),
        ("study", STUDIES_DIR / "full.yaml", "space.margin.type", "int", "type"),  # a float parameter
        ("study", STUDIES_DIR / "full.yaml", "objective.metric", "test_acc", "metric"),
        ("profile", PROFILES_DIR / "smoke.yaml", "phase2.gama", 1, "gama"),
        ("profile", PROFILES_DIR / "smoke.yaml", "phase2.epochs", 0, "epochs"),
        ("profile", PROFILES_DIR / "smoke.yaml", "data.max_per_clas", 3, "max_per_clas"),
        (
            "profile",
            PROFILES_DIR / "places_lt.yaml",
            "data.imbalance_ratio",
            10,
            "imbalance_ratio",
        ),  # not a places_lt key
        ("profile", PROFILES_DIR / "smoke.yaml", "data.name", "nope", "name"),
        ("profile", PROFILES_DIR / "smoke.yaml", "resources.gpu", -1, "gpu"),
        ("profile", PROFILES_DIR / "smoke.yaml", "shot_split", "paper", "shot_split"),
        ("profile", PROFILES_DIR / "smoke.yaml", "model.head_dropout", 1.0, "head_dropout"),
        ("profile", PROFILES_DIR / "smoke.yaml", "input", {"interpolation": "nearest"}, "interpolation"),
    ],
)
def test_the_schema_and_the_loader_reject_broken_files(tmp_path, kind, path, dotted, value, where):
    data = broken(path, dotted, value)
    errors = list(validator(kind).iter_errors(data))
    assert errors, f"the schema accepts {dotted}={value!r}"
    # and the loader, with one line that names the key
    from tune.config.loading import load_profile, load_study
    from tune.errors import ConfigError

    target = tmp_path / path.name
    target.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        (load_study if kind == "study" else load_profile)(str(target))
    message = str(info.value)
    assert message.startswith(f"{target}: ") and where in message and "\n" not in message


def test_searchable_flags_are_in_the_schema():
    defs = schema("profile")["$defs"]
    recipe, model = defs["PhaseConfig"]["properties"], defs["LPTConfig"]["properties"]
    assert recipe["epochs"]["searchable"] is False and recipe["gamma_neg"]["searchable"] is True
    assert recipe["epochs"]["default"] == 90 and recipe["lr"]["exclusiveMinimum"] == 0
    assert all(model[k]["searchable"] for k in ("prompt_length", "pool_size", "top_k", "group_start"))
    space = schema("study")["$defs"]["Space"]["properties"]
    assert "epochs" not in space and {"pool_size", "gamma_neg", "lr", "head_dropout"} <= set(space)


@pytest.mark.parametrize("kind", ["study", "profile"])
def test_the_cli_prints_the_schema_with_no_other_option(kind, tmp_path):
    proc = subprocess.run(search_argv("--schema", kind), capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == schema(kind)
