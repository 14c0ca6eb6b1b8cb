"""One driver per search: the search folder's ``search.lock``, held with ``flock`` while a driver
runs the search, from the folder's creation (a new search) or from ``--resume``'s first look at it
(before Ray starts). A second driver of the same search is refused with one line instead of
running its trials twice.

The kernel drops the lock when the driver's process ends, however it ends, so a killed driver
leaves no stale lock to clear; the file stays and names the driver that held it last. ``flock``
holds across containers that mount one volume, and on Linux over NFS (as a POSIX lock).
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from tune.errors import ConfigError
from tune.names import SEARCH_LOCK


class SearchRunning(ConfigError):
    """Another driver holds the search's lock."""


class SearchLock:
    """Holds the lock of at most one search folder; released by ``release()`` or on exit."""

    def __init__(self):
        self._fd: int | None = None

    def take(self, folder: Path) -> None:
        path = Path(folder) / SEARCH_LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = path.read_text().strip() or "another driver"
            raise SearchRunning(
                f"--resume: {Path(folder).name} is running ({holder}): a search runs in one driver "
                f"at a time; wait for it to end, or stop it and resume it then"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        self.release()
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the file drops its flock
            self._fd = None

    def __enter__(self) -> SearchLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
