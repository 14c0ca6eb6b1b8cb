"""Phase-1 prompts, trained once per distinct phase-1 config and shared through the search storage.

The key hashes everything phase 1 depends on: backbone spec, data manifest hash, prompt length,
phase-1 recipe and seed. The first trial that needs a key takes a lock file (``O_EXCL``, which
works on the shared filesystems a cluster mounts), trains with per-epoch resume state in the cache
folder, and publishes ``prompts.safetensors`` atomically. Others wait. The owner keeps the lock's
mtime fresh; a lock left by a dead owner goes stale and the next trial takes over and resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .names import PHASE1_INFO as INFO, PHASE1_LOCK as LOCK, PHASE1_PROMPTS as PROMPTS  # noqa: F401
from .names import PHASE1_STATE as STATE  # noqa: F401 (the trainable resumes phase 1 from it)

HEARTBEAT_S = 5.0
STALE_AFTER_S = 60.0
# Bumped when what phase 1 computes changes for the same config (2: the released initial scales),
# so prompts cached by older code are not reused.
PHASE1_VERSION = 2


def phase1_key(backbone: dict, manifest_hash: str, prompt_length: int, recipe: dict, seed: int,
               input_cfg: dict | None = None) -> str:
    """``input_cfg``: the input pipeline where it is not the released one (keys of profiles that
    use the released pipeline stay what they were before it could differ)."""
    fields = {"backbone": backbone, "data": manifest_hash, "prompt_length": prompt_length,
              "recipe": recipe, "seed": seed, "version": PHASE1_VERSION}
    if input_cfg is not None:
        fields["input"] = input_cfg
    blob = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Phase1Cache:
    def __init__(self, root: str | os.PathLike, poll_s: float = 1.0):
        self.root = Path(root)
        self.poll_s = poll_s

    def folder(self, key: str) -> Path:
        return self.root / key

    def ready(self, key: str) -> bool:
        return (self.folder(key) / PROMPTS).is_file()

    def info(self, key: str) -> dict:
        path = self.folder(key) / INFO
        return json.loads(path.read_text()) if path.is_file() else {}

    def _try_lock(self, lock: Path) -> bool:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                if time.time() - lock.stat().st_mtime > STALE_AFTER_S:
                    lock.unlink()  # its owner died; the next attempt takes it
            except FileNotFoundError:
                pass
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}))
        return True

    @contextmanager
    def _heartbeat(self, lock: Path) -> Iterator[None]:
        stop = threading.Event()

        def beat():
            while not stop.wait(HEARTBEAT_S):
                try:
                    os.utime(lock)
                except FileNotFoundError:
                    return
        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            lock.unlink(missing_ok=True)

    def get_or_train(self, key: str, train: Callable[[Path], dict],
                     log: Callable[[str], None] = print) -> tuple[Path, bool]:
        """Path of the key's prompt file, training it with ``train(folder)`` if nobody has.

        ``train`` must write ``folder/prompts.safetensors`` (atomically) and return info to keep.
        Returns (path, trained_here).
        """
        folder = self.folder(key)
        folder.mkdir(parents=True, exist_ok=True)
        lock, waited = folder / LOCK, False
        while not self.ready(key):
            if self._try_lock(lock):
                with self._heartbeat(lock):
                    if not self.ready(key):  # published between our check and the lock
                        info = train(folder)
                        tmp = folder / (INFO + ".tmp")
                        tmp.write_text(json.dumps(info, default=str))
                        os.replace(tmp, folder / INFO)
                        return folder / PROMPTS, True
            if not waited:
                log(f"phase 1 {key}: another trial is training it; waiting")
                waited = True
            time.sleep(self.poll_s)
        return folder / PROMPTS, False
