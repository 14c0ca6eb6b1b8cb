"""Phase-1 prompts, trained once per distinct phase-1 config and shared through the search storage.

The key hashes everything phase 1's result depends on (``tune.trial.phase1.phase1_inputs``): backbone
spec, data manifest, input pipeline and augmentation path, prompt length, head dropout, phase-1
recipe, precision, compilation and seed. An entry is a folder of the storage (``tune.storage``: a
local folder, NFS or an object store), ``phase1-cache/<key>/``, and it is ready once its
``prompts.safetensors`` exists: every file of an entry is published whole, the prompt file last.

Whoever trains a key (the driver's up-front tasks, or a trial that finds its key missing) holds the
key's lease in the cluster's lease table (``tune.phase1.leases``: one clock, heartbeats), trains
with per-epoch resume state published into the entry (``state.safetensors``), and publishes the
prompt file. Others wait for it. A trainer that is lost costs at most one duplicate training.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable

from tune.names import PHASE1_INFO, PHASE1_PROMPTS
from tune.phase1.leases import HEARTBEAT_S, Heartbeat, Leases
from tune.storage import Location, location

# Bumped when what phase 1 computes changes for the same inputs (2: the released initial scales;
# 3: every input in the key, initial values from per-component generators, the released
# class-cycling sampler and per-epoch warm-up), so prompts cached by older code are not reused.
PHASE1_VERSION = 3


def phase1_key(inputs: dict) -> str:
    """The cache key of a phase 1: a hash of every input its result depends on
    (``tune.trial.phase1.phase1_inputs``) and ``PHASE1_VERSION``."""
    blob = json.dumps({**inputs, "version": PHASE1_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Phase1Cache:
    def __init__(
        self,
        root: str | Location,
        poll_s: float = 1.0,
        heartbeat_s: float | None = None,
        leases: Leases | None = None,
    ):
        self.root = location(root)
        self.poll_s = poll_s
        self.heartbeat_s = HEARTBEAT_S if heartbeat_s is None else heartbeat_s
        self.leases = leases or Leases()

    def folder(self, key: str) -> Location:
        return self.root / key

    def ready(self, key: str) -> bool:
        return (self.folder(key) / PHASE1_PROMPTS).is_file()

    def info(self, key: str) -> dict:
        path = self.folder(key) / PHASE1_INFO
        return json.loads(path.read_text()) if path.is_file() else {}

    def get_or_train(
        self, key: str, train: Callable[[Location], dict], log: Callable[[str], None] = print
    ) -> tuple[Location, bool]:
        """The key's prompt file, training it with ``train(folder)`` if nobody has.

        ``train`` must publish ``folder/prompts.safetensors`` and return info to keep.
        Returns (prompt file, trained_here).
        """
        folder = self.folder(key)
        owner = uuid.uuid4().hex
        waited = False
        while not self.ready(key):
            if self.leases.acquire(key, owner):
                beat = Heartbeat(self.leases, key, owner, self.heartbeat_s)
                try:
                    if not self.ready(key):  # published between our check and the lease
                        info = train(folder)
                        (folder / PHASE1_INFO).write_text(json.dumps(info, default=str))
                        return folder / PHASE1_PROMPTS, True
                finally:
                    beat.stop()
                    self.leases.release(key, owner)
                continue
            if not waited:
                log(f"phase 1 {key}: another process is training it; waiting")
                waited = True
            time.sleep(self.poll_s)
        return folder / PHASE1_PROMPTS, False
