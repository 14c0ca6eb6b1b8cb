"""Who trains a phase-1 key now: leases handed out by one table that every node of the cluster
reaches, a named detached Ray actor (``lpt-phase1-leases`` in namespace ``lpt``).

The storage a search uses may be an object store, which has no locks, no atomic create and no
rename, so the lock of the phase-1 cache lives in Ray instead. A trainer takes the lease of a key,
renews it every ``heartbeat_s`` while it trains, and gives it back at the end. A lease that has not
been renewed for ``stale_after_s`` is free again; that is judged on the table's own monotonic
clock, the one clock every renewal reaches, never on a node's. A trainer that dies (its node
lost) stops renewing, and the next asker takes over; an actor that is lost is restarted empty.
Either way the worst case is one duplicate training of a key, never a wrong result: cache entries
are content-addressed and published whole.

Without Ray (a notebook, a unit test) the table is one of this process's own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

ACTOR_NAME, ACTOR_NAMESPACE = "lpt-phase1-leases", "lpt"
HEARTBEAT_S = 5.0
STALE_AFTER_S = 60.0


class LeaseTable:
    """Leases by key: ``{key: (owner, last renewal on this table's clock)}``."""

    def __init__(self, stale_after_s: float = STALE_AFTER_S, clock: Callable[[], float] = time.monotonic):
        self.stale_after_s, self.clock = stale_after_s, clock
        self.leases: dict[str, tuple[str, float]] = {}
        self.takeovers = 0

    def acquire(self, key: str, owner: str) -> bool:
        """True when ``owner`` holds the key's lease now: it was free, stale, or already ``owner``'s."""
        held = self.leases.get(key)
        now = self.clock()
        if held is not None and held[0] != owner and now - held[1] <= self.stale_after_s:
            return False
        if held is not None and held[0] != owner:
            self.takeovers += 1
        self.leases[key] = (owner, now)
        return True

    def renew(self, key: str, owner: str) -> bool:
        """The owner's heartbeat; False when the lease is no longer its own (taken over)."""
        held = self.leases.get(key)
        if held is None or held[0] != owner:
            return False
        self.leases[key] = (owner, self.clock())
        return True

    def release(self, key: str, owner: str) -> None:
        """Give the lease back; only its owner can."""
        if self.leases.get(key, ("",))[0] == owner:
            del self.leases[key]

    def holder(self, key: str) -> str | None:
        held = self.leases.get(key)
        return held[0] if held else None

    def stats(self) -> dict:
        return {"held": len(self.leases), "takeovers": self.takeovers}


_local: LeaseTable | None = None


class Leases:
    """The caller's side of the table: the cluster's actor when Ray is running, else this
    process's own table. Every method is one call."""

    def __init__(self, table=None):
        self._table = table

    def _call(self, method: str, *args):
        if self._table is None:
            self._table = lease_table()  # the actor's handle, found once per caller
        table = self._table
        if isinstance(table, LeaseTable):
            return getattr(table, method)(*args)
        import ray

        return ray.get(getattr(table, method).remote(*args))

    def acquire(self, key: str, owner: str) -> bool:
        return self._call("acquire", key, owner)

    def renew(self, key: str, owner: str) -> bool:
        return self._call("renew", key, owner)

    def release(self, key: str, owner: str) -> None:
        self._call("release", key, owner)

    def holder(self, key: str) -> str | None:
        return self._call("holder", key)

    def stats(self) -> dict:
        return self._call("stats")


def lease_table(stale_after_s: float = STALE_AFTER_S):
    """The cluster's lease actor (made by the first asker, found by every later one), or this
    process's table when Ray is not running."""
    import ray

    global _local
    if not ray.is_initialized():
        if _local is None:
            _local = LeaseTable(stale_after_s)
        return _local
    actor = ray.remote(LeaseTable).options(
        name=ACTOR_NAME,
        namespace=ACTOR_NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        num_cpus=0,
        max_restarts=-1,  # lost with its node: restarted empty, at most one duplicate training
        max_task_retries=-1,
    )
    return actor.remote(stale_after_s)


class Heartbeat:
    """Renews a held lease every ``heartbeat_s`` from a thread, until ``stop()``."""

    def __init__(self, leases: Leases, key: str, owner: str, heartbeat_s: float = HEARTBEAT_S):
        self._stop = threading.Event()
        self.lost = False

        def beat():
            while not self._stop.wait(heartbeat_s):
                try:
                    self.lost = not leases.renew(key, owner) or self.lost
                except Exception:  # the actor restarting: the next beat tries again
                    pass

        self._thread = threading.Thread(target=beat, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
