"""Phase-1 prompts, trained once per distinct phase-1 config and shared through the search storage.

The key hashes everything phase 1's result depends on (``tune.trial.phase1.phase1_inputs``): backbone
spec, data manifest, input pipeline and augmentation path, prompt length, head dropout, phase-1
recipe, precision, compilation and seed. Whoever trains a key (the driver's up-front tasks, or a trial that finds
its key missing) holds the entry's lock file, trains with per-epoch resume state in the entry's
folder, and publishes ``prompts.safetensors`` atomically. Others wait.

The lock works on the shared filesystems a cluster mounts (NFS included), where clocks differ and
attributes are cached:

- A lock is taken by linking a fully written file of one's own to ``lock`` (fails if it exists).
  Its content names the owner: a random token, host, pid and a heartbeat counter.
- The owner rewrites the counter every ``heartbeat_s`` through its own open file: if the lock was
  taken over meanwhile, the writes land on the replaced file, never on the new owner's.
- A waiter judges a lock stale when its content has not changed for ``stale_after_s`` on the
  waiter's own monotonic clock (no remote mtime against the local clock), or at once when the
  owner is a process of this host that is gone.
- Taking over is for exactly one waiter: it first creates (``O_EXCL``) a marker named after the
  stale content, which every waiter that saw the same stale lock contends for; the winner then
  replaces the lock with its own.
- The owner removes the lock at the end only if it still holds its token.

Every file of an entry is written to a unique temporary name and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from lpt_core.atomic import atomic_write, unique_tmp
from tune.names import PHASE1_INFO, PHASE1_LOCK, PHASE1_PROMPTS

HEARTBEAT_S = 5.0
STALE_AFTER_S = 60.0
TAKEOVER = PHASE1_LOCK + ".takeover-"  # + the hash of the stale lock's content
# Bumped when what phase 1 computes changes for the same inputs (2: the released initial scales;
# 3: every input in the key, initial values from per-component generators, the released
# class-cycling sampler and per-epoch warm-up), so prompts cached by older code are not reused.
PHASE1_VERSION = 3


def phase1_key(inputs: dict) -> str:
    """The cache key of a phase 1: a hash of every input its result depends on
    (``tune.trial.phase1.phase1_inputs``) and ``PHASE1_VERSION``."""
    blob = json.dumps({**inputs, "version": PHASE1_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _owner_gone(content: bytes) -> bool:
    """The lock's owner is a process of this host that no longer exists."""
    try:
        owner = json.loads(content)
        if owner["host"] != socket.gethostname():
            return False
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return True
    except (ValueError, KeyError, TypeError, PermissionError):
        pass  # half written, or alive under another user
    return False


class Lock:
    """One holder of an entry's lock file: ``acquire`` once, ``release`` at the end."""

    def __init__(self, path: Path, heartbeat_s: float):
        self.path, self.heartbeat_s = path, heartbeat_s
        self.token = uuid.uuid4().hex
        self.beat = 0
        self.fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _content(self) -> bytes:
        return json.dumps(
            {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(), "beat": self.beat}
        ).encode()

    def _install(self, replace: bool) -> bool:
        """Make a file of ours the lock: linked (only if there is none) or renamed over it."""
        tmp = unique_tmp(self.path)
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        installed = False
        try:
            os.write(fd, self._content())
            os.fsync(fd)
            if replace:
                os.replace(tmp, self.path)
            else:
                os.link(tmp, self.path)
            installed = True
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
            if not installed:
                os.close(fd)
        if installed:
            self.fd = fd  # kept open: the heartbeat writes through it
        return installed

    def acquire(self) -> bool:
        """True when the lock was free and is now ours."""
        return self._install(replace=False)

    def take_over(self, stale: bytes) -> bool:
        """True for exactly one of the waiters that judged the content ``stale`` dead."""
        marker = self.path.with_name(TAKEOVER + hashlib.sha256(stale).hexdigest()[:16])
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        if _read(self.path) != stale:  # changed since we judged it (the owner came back)
            return False
        return self._install(replace=True)

    def start_heartbeat(self) -> None:
        def beat():
            while not self._stop.wait(self.heartbeat_s):
                self.beat += 1
                data = self._content()
                os.pwrite(self.fd, data, 0)
                os.ftruncate(self.fd, len(data))
                os.fsync(self.fd)

        self._thread = threading.Thread(target=beat, daemon=True)
        self._thread.start()

    def owned(self) -> bool:
        try:
            return json.loads(_read(self.path) or b"{}").get("token") == self.token
        except ValueError:
            return False

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours (and the takeover markers
        of this entry, which are no use once it is released)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.owned():
            self.path.unlink(missing_ok=True)
            for marker in self.path.parent.glob(TAKEOVER + "*"):
                marker.unlink(missing_ok=True)
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class Phase1Cache:
    def __init__(
        self,
        root: str | os.PathLike,
        poll_s: float = 1.0,
        stale_after_s: float | None = None,
        heartbeat_s: float | None = None,
    ):
        self.root = Path(root)
        self.poll_s = poll_s
        self.stale_after_s = STALE_AFTER_S if stale_after_s is None else stale_after_s
        self.heartbeat_s = HEARTBEAT_S if heartbeat_s is None else heartbeat_s

    def folder(self, key: str) -> Path:
        return self.root / key

    def ready(self, key: str) -> bool:
        return (self.folder(key) / PHASE1_PROMPTS).is_file()

    def info(self, key: str) -> dict:
        path = self.folder(key) / PHASE1_INFO
        return json.loads(path.read_text()) if path.is_file() else {}

    def get_or_train(
        self, key: str, train: Callable[[Path], dict], log: Callable[[str], None] = print
    ) -> tuple[Path, bool]:
        """Path of the key's prompt file, training it with ``train(folder)`` if nobody has.

        ``train`` must write ``folder/prompts.safetensors`` (atomically) and return info to keep.
        Returns (path, trained_here).
        """
        folder = self.folder(key)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / PHASE1_LOCK
        seen, since, waited = None, 0.0, False
        while not self.ready(key):
            lock = Lock(path, self.heartbeat_s)
            content = _read(path)
            if content is None:
                got = lock.acquire()
            else:
                if content != seen:  # alive (or new to us): judge it from now on our own clock
                    seen, since = content, time.monotonic()
                dead = time.monotonic() - since > self.stale_after_s or _owner_gone(content)
                got = dead and lock.take_over(content)
                if got:
                    log(f"phase 1 {key}: took over the lock of a training that stopped")
            if got:
                lock.start_heartbeat()
                try:
                    if not self.ready(key):  # published between our check and the lock
                        info = train(folder)
                        atomic_write(folder / PHASE1_INFO, json.dumps(info, default=str).encode())
                        return folder / PHASE1_PROMPTS, True
                finally:
                    lock.release()
                continue
            if not waited:
                log(f"phase 1 {key}: another process is training it; waiting")
                waited = True
            time.sleep(self.poll_s)
        return folder / PHASE1_PROMPTS, False
