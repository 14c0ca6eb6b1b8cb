"""The search record (``search.json`` in a search folder): its one writer and reader, read by the
engine, the reports and serving. Folders are ``tune.storage.Location``s: local or object storage."""

from __future__ import annotations

import json

from tune.names import SEARCH_FILE
from tune.storage import Location, location

RUNNING, INTERRUPTED_STATE, FINISHED = "running", "interrupted", "finished"  # search.json's "state"


def latest_search(storage: Location, prefix: str) -> Location | None:
    found = [c for c in storage.children() if c.name.startswith(f"{prefix}-") and (c / SEARCH_FILE).is_file()]
    return found[-1] if found else None


def save_record(folder: Location, record: dict) -> None:
    (location(folder) / SEARCH_FILE).write_text(json.dumps(record, indent=2, default=str))


def load_record(folder: Location) -> dict:
    return json.loads((location(folder) / SEARCH_FILE).read_text())
