"""The search record (``search.json`` in a search folder): its one writer and reader, read by the
engine, the reports and serving."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tune.names import SEARCH_FILE

RUNNING, INTERRUPTED_STATE, FINISHED = "running", "interrupted", "finished"  # search.json's "state"


def latest_search(storage: Path, prefix: str) -> Path | None:
    found = sorted(p for p in storage.glob(f"{prefix}-*") if (p / SEARCH_FILE).is_file())
    return found[-1] if found else None


def save_record(folder: Path, record: dict) -> None:
    tmp = folder / f".{SEARCH_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=2, default=str))
    os.replace(tmp, folder / SEARCH_FILE)
