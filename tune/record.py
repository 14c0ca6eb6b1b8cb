"""The search record (``search.json`` in a search folder): its one writer and reader, read by the
engine, the reports and serving."""

from __future__ import annotations

import json
from pathlib import Path

from lpt_core.atomic import atomic_write
from tune.names import SEARCH_FILE

RUNNING, INTERRUPTED_STATE, FINISHED = "running", "interrupted", "finished"  # search.json's "state"


def latest_search(storage: Path, prefix: str) -> Path | None:
    found = sorted(p for p in storage.glob(f"{prefix}-*") if (p / SEARCH_FILE).is_file())
    return found[-1] if found else None


def save_record(folder: Path, record: dict) -> None:
    atomic_write(Path(folder) / SEARCH_FILE, json.dumps(record, indent=2, default=str))


def load_record(folder: Path) -> dict:
    return json.loads((Path(folder) / SEARCH_FILE).read_text())
