"""Free space before a search starts: the search's storage (when it is a local folder), Ray's temp
folder (its logs and spilled objects) and, for a search on object storage, the work dir
(``tune.storage.work_dir``: the Optuna SQLite, the driver's lock) each need a stated minimum.

The minimums are ``LPT_MIN_FREE_STORAGE_GB``, ``LPT_MIN_FREE_RAY_GB`` and ``LPT_MIN_FREE_WORK_GB``
(GiB; 0 turns a check off). Folders on one disk share it: that disk needs the sum of their minimums.
A folder that does not exist yet is measured at its nearest existing parent. Short of space, the
search is refused in one line naming the folder, what is free and what is needed (``ConfigError``,
exit 2), before Ray starts or anything is recorded; ``--dry-run`` prints the same figures.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from tune.errors import ConfigError
from tune.storage import Location, work_dir

GIB = 1024**3
# (what, environment variable, default GiB): the storage holds checkpoints, prompts and the table;
# Ray's temp folder its session logs and the objects it spills; the work dir one SQLite file
MINIMUMS = (
    ("the search storage", "LPT_MIN_FREE_STORAGE_GB", 2.0),
    ("Ray's temp folder", "LPT_MIN_FREE_RAY_GB", 2.0),
    ("the work dir", "LPT_MIN_FREE_WORK_GB", 0.5),
)


@dataclass(frozen=True)
class Need:
    what: str
    path: Path
    env: str
    gib: float


@dataclass(frozen=True)
class Disk:
    needs: tuple[Need, ...]
    free_gib: float

    @property
    def need_gib(self) -> float:
        return sum(n.gib for n in self.needs)

    def names(self) -> str:
        return " and ".join(f"{n.path} ({n.what})" for n in self.needs)


def ray_temp_dir() -> Path:
    """Ray's temp folder on this machine, as Ray finds it (``ray._common.utils.get_default_ray_temp_dir``:
    ``RAY_TMPDIR``, else ``TMPDIR``, else /tmp; then ``ray``), without importing Ray."""
    base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return Path(base) / "ray"


def minimum_gib(env: str, default: float) -> float:
    raw = os.environ.get(env, "").strip()
    try:
        value = float(raw) if raw else default
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise ConfigError(f"{env}={raw}: expected the free space to require, in GiB (e.g. {default:g}; 0: no check)")
    return value


def needs(storage: Location) -> list[Need]:
    paths: dict[str, Path | None] = {
        "the search storage": storage.local_path if storage.is_local else None,
        "Ray's temp folder": ray_temp_dir(),
        "the work dir": None if storage.is_local else work_dir("-").parent,  # used for object storage only
    }
    found = []
    for what, env, default in MINIMUMS:
        gib = minimum_gib(env, default)
        path = paths[what]
        if path is not None and gib > 0:
            found.append(Need(what, path.resolve(), env, gib))
    return found


def existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disks(storage: Location) -> list[Disk]:
    """The folders' disks (grouped by device), with what each has free and needs."""
    by_device: dict[int, list[Need]] = {}
    for need in needs(storage):
        by_device.setdefault(os.stat(existing(need.path)).st_dev, []).append(need)
    return [Disk(tuple(group), shutil.disk_usage(existing(group[0].path)).free / GIB) for group in by_device.values()]


def free_space_lines(storage: Location) -> list[str]:
    """``--dry-run``'s lines: each disk's free space and what the search needs there."""
    return [
        f"free space: {d.names()}: {d.free_gib:.1f} GiB free, {d.need_gib:g} GiB needed "
        f"({' + '.join(n.env for n in d.needs)})"
        for d in disks(storage)
    ]


def check_free_space(storage: Location) -> None:
    """Refuse, in one line, a search whose folders' disk has less free than their minimums."""
    for d in disks(storage):
        if d.free_gib < d.need_gib:
            envs = " + ".join(n.env for n in d.needs)
            raise ConfigError(
                f"free space: {d.names()} {'has' if len(d.needs) == 1 else 'share a disk with'} "
                f"{d.free_gib:.2f} GiB free, {d.need_gib:g} GiB needed; free some space, or lower {envs}"
            )
