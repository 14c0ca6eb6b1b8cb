"""One driver per search, from any machine: held while a driver runs the search, from the folder's
creation (a new search) or from ``--resume``'s first look at it (before Ray starts). A second driver
of the same search is refused with one line instead of running its trials twice.

- With a PostgreSQL Optuna storage (``LPT_OPTUNA_STORAGE``, as the compose stack sets), a
  PostgreSQL advisory lock held on a connection of the driver's own: every machine that can run
  the search reaches that database, whatever storage the search folder is on.
- On a local (or NFS) search folder, the folder's ``search.lock``, held with ``flock`` (POSIX
  locks hold across containers that mount one volume, and over NFS).
- On object storage without a PostgreSQL Optuna storage, the ``flock`` of the driver's working
  copy (``LPT_WORK_DIR``) guards this machine only: two drivers on two machines are not detected
  (docs/cluster.md says so, and recommends the database).

The server or the kernel drops the lock when the driver's connection or process ends, however it
ends, so a killed driver leaves no stale lock to clear.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
import time
from pathlib import Path

from tune.config.checks import OPTUNA_STORAGE_ENV
from tune.errors import ConfigError
from tune.names import SEARCH_LOCK
from tune.storage import Location, location, work_dir


class SearchRunning(ConfigError):
    """Another driver holds the search's lock."""


def holder_line() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"


def _refused(name: str, holder: str) -> SearchRunning:
    return SearchRunning(
        f"--resume: {name} is running ({holder or 'another driver'}): a search runs in one driver "
        f"at a time; wait for it to end, or stop it and resume it then"
    )


def advisory_key(name: str) -> int:
    """The search's advisory-lock key: a signed 64-bit hash of its name."""
    return int.from_bytes(hashlib.sha256(f"lpt-search:{name}".encode()).digest()[:8], "big", signed=True)


class SearchLock:
    """Holds the lock of at most one search; released by ``release()`` or on exit."""

    def __init__(self):
        self._fd: int | None = None
        self._conn = None  # the advisory lock's connection
        self._engine = None

    def take(self, folder: str | os.PathLike | Location) -> None:
        folder = location(folder)
        self.release()
        url = os.environ.get(OPTUNA_STORAGE_ENV, "").strip()
        if url.startswith("postgresql"):
            self._take_advisory(url, folder.name)
        if folder.is_local:
            self._take_flock(folder.local_path / SEARCH_LOCK, folder.name)
        elif not url.startswith("postgresql"):
            work = work_dir(folder.name)
            work.mkdir(parents=True, exist_ok=True)
            self._take_flock(work / SEARCH_LOCK, folder.name)

    def _take_flock(self, path: Path, name: str) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            self.release()
            raise _refused(name, path.read_text().strip()) from None
        os.ftruncate(fd, 0)
        os.write(fd, holder_line().encode())
        self._fd = fd

    def _take_advisory(self, url: str, name: str) -> None:
        import sqlalchemy
        from sqlalchemy.pool import NullPool

        from tune.engine.database import CONNECT_ARGS, waiting
        from tune.errors import ServiceError, error_line

        holder = holder_line()
        try:  # a full or restarting server is waited for, as the Optuna storage waits for it
            engine = sqlalchemy.create_engine(
                url, poolclass=NullPool, connect_args={**CONNECT_ARGS, "application_name": holder[:63]}
            )
            conn = waiting(engine.connect, "take the search's lock")
        except Exception as exc:
            raise ServiceError(f"{OPTUNA_STORAGE_ENV}: cannot take the search's lock ({error_line(exc)})") from None
        key = advisory_key(name)
        got = conn.execute(sqlalchemy.text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar()
        conn.commit()  # the lock is the session's: it outlives the transaction
        if not got:
            try:  # who holds it: its connection's application_name
                who = conn.execute(
                    sqlalchemy.text(
                        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                        "WHERE l.locktype = 'advisory' AND l.granted "
                        "AND ((l.classid::bigint << 32) | l.objid::bigint) = :k"
                    ),
                    {"k": key},
                ).scalar()
            except Exception:
                who = None
            conn.close()
            engine.dispose()
            raise _refused(name, who or "")
        self._conn, self._engine = conn, engine

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the file drops its flock
            self._fd = None
        if self._conn is not None:
            try:
                self._conn.close()  # ending the session drops its advisory lock
            finally:
                self._engine.dispose()
                self._conn = self._engine = None

    def __enter__(self) -> SearchLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
