"""The search record (``search.json`` in a search folder): ``SearchRecord``, its one writer and
reader, read by the engine, the reports and serving. Folders are ``tune.storage.Location``s: local or
object storage.

The file is the edge: ``save_record`` writes the record's fields as the JSON keys they are named
after (the profile and the study as ``ProfileConfig.to_dict`` and ``StudyConfig.to_dict`` write
them, the space in the study file's order), a field never set not at all; ``load_record`` reads
any earlier version of it (a key added since is at its default, a key it does not know kept).
"""

from __future__ import annotations

import json
import os
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

from lpt_core.config import validate
from tune.config.study import ProfileConfig, StudyConfig
from tune.names import SEARCH_FILE
from tune.storage import Location, location

RUNNING, INTERRUPTED_STATE, FINISHED = "running", "interrupted", "finished"  # search.json's "state"


class RunPart(BaseModel):
    """One Tune run of a search: the first (``dir`` ".", the search folder itself) or an extension
    (``extend-N``); ``rows_before``: the trial ids of the runs before it."""

    dir: str
    trials: int
    rows_before: list[str] = []


class SearchRecord(BaseModel):
    """What a search folder says about its search: names, the profile and study it ran, its MLflow
    and Optuna places, its state, its Tune runs, and what the budget needs (``trial_estimate_s``,
    ``phase1_task_s``: seconds of the phase-1 tasks trained up front, ``budget_ended``,
    ``confirm_task_s``)."""

    model_config = ConfigDict(extra="allow")

    name: str = ""
    study: str = ""
    profile_name: str = ""
    profile: ProfileConfig
    study_config: StudyConfig
    manifest_hash: str = ""
    experiment_id: str = ""
    parent_run_id: str = ""
    tracking_uri: str = ""
    state: str = ""
    runs: list[RunPart] = []
    optuna_storage: str = ""
    optuna_study: str = ""
    trial_estimate_s: float | None = None
    phase1_task_s: float = 0.0
    budget_ended: bool = False
    confirm_task_s: float = 0.0  # the --confirm seeds' tasks, summed: counted in the budget's spent

    @field_validator("profile", "study_config", mode="before")
    @classmethod
    def _every_key(cls, value: Any) -> Any:
        # a model the plan checked: every key written, as a new search's record has them
        return value.to_dict() if isinstance(value, ProfileConfig | StudyConfig) else value

    def use_study(self, study: StudyConfig) -> None:
        """The study this command runs (``--resume`` may change its budget)."""
        self.study_config = StudyConfig.model_validate(self._every_key(study))

    def profile_dict(self) -> dict:
        """The profile as the file holds it (``ProfileConfig.to_dict``'s keys that were given)."""
        out = self.profile.model_dump(mode="json", exclude_unset=True, exclude={"backbone"})
        out["backbone"] = self.profile.backbone.model_dump(mode="json", exclude_unset=True)
        return out

    def study_dict(self) -> dict:
        """The study as the file holds it (``StudyConfig.to_dict``'s keys that were given; an
        earlier version's record without a key added since stays without it)."""
        study = self.study_config
        out = study.model_dump(mode="json", exclude_unset=True, exclude_none=True, exclude={"space"})
        out["space"] = study.to_dict()["space"]  # the study's own dump of it, in the file's order
        return out

    def to_dict(self) -> dict:
        """As ``search.json`` holds it: the JSON edge, in one place."""
        out = self.model_dump(mode="json", exclude_unset=True)
        out.update(profile=self.profile_dict(), study_config=self.study_dict())
        return out


def latest_search(storage: Location, prefix: str) -> Location | None:
    found = [c for c in storage.children() if c.name.startswith(f"{prefix}-") and (c / SEARCH_FILE).is_file()]
    return found[-1] if found else None


def save_record(folder: str | os.PathLike | Location, record: SearchRecord) -> None:
    (location(folder) / SEARCH_FILE).write_text(json.dumps(record.to_dict(), indent=2, default=str))


def load_record(folder: str | os.PathLike | Location) -> SearchRecord:
    """The record of a search folder; a record this version cannot read is a ValueError of one
    line naming the file and the field."""
    path = location(folder) / SEARCH_FILE
    return validate(SearchRecord, json.loads(path.read_text()), str(path))
