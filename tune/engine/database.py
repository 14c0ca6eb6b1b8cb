"""How the driver connects to PostgreSQL (the Optuna storage, the search lock): connections that
cannot hang on a server that went away, and the wait for a server that is restarting or full.

- ``CONNECT_ARGS``: libpq's ``connect_timeout`` (a connection attempt gives up after that many
  seconds instead of the kernel's minutes) and TCP keepalives (a connection whose peer vanished,
  a host or network gone, is found dead within idle + interval x count seconds instead of never).
  A server that is frozen (SIGSTOP) but whose kernel still answers is not detected: a call waits
  for it to resume.
- ``waiting(call, what)``: a call that fails because the database cannot be reached (refused,
  timed out, dropped, shutting down or starting up) or has no connection slot free ("too many
  clients", SQLSTATE 53300, the server's or the role's CONNECTION LIMIT) is tried again, with
  back-off (0.5 s doubling to 10 s), for up to ``WAIT_FOR_DATABASE_S``; past that window it raises
  ``DatabaseUnavailable`` with one line.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import TypeVar

from tune.errors import ServiceError, error_line

WAIT_FOR_DATABASE_S = 300  # how long a call waits for an unreachable or full database
CONNECT_TIMEOUT_S = 10
CONNECT_ARGS = {
    "connect_timeout": CONNECT_TIMEOUT_S,
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}
logger = logging.getLogger(__name__)
T = TypeVar("T")

# SQLSTATE classes that say the server cannot take the call now: 08 connection exception, 57P
# shutting down or starting up, 53300 too many connections
_WAIT_CODES = ("08", "57P", "53300")
# a refused connection carries no SQLSTATE; these FATAL lines are the server asking to come back
_ANSWERED = re.compile(
    r"FATAL:\s*(?=\S)(?!the database system is|sorry, too many clients|too many connections for role"
    r"|remaining connection slots are reserved)"
)


class DatabaseUnavailable(ServiceError):
    """The database stayed unreachable or full for the whole wait."""


def unreachable(exc: BaseException | None) -> bool:
    """The database could not be reached, dropped the connection (a restart) or has no slot free,
    as opposed to an error it answered with (a wrong password, a missing table): an error of a
    live connection carries a SQLSTATE; a refused connection carries none, and its message holds
    the server's FATAL line unless the server was not there to answer."""
    import sqlalchemy.exc

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, sqlalchemy.exc.DBAPIError):
            if exc.connection_invalidated:
                return True
            if isinstance(exc, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
                code = getattr(exc.orig, "pgcode", None) or getattr(exc.orig, "sqlstate", None)
                if code:
                    return code.startswith(_WAIT_CODES)
                return not _ANSWERED.search(str(exc.orig))
        exc = exc.__cause__ or exc.__context__
    return False


def waiting(call: Callable[[], T], what: str) -> T:
    """``call()``, tried again while the database is unreachable or full (see the module's doc)."""
    started = time.monotonic()
    deadline, pause = started + WAIT_FOR_DATABASE_S, 0.5
    while True:
        try:
            return call()
        except Exception as exc:
            if not unreachable(exc):
                raise
            if time.monotonic() + pause > deadline:
                raise DatabaseUnavailable(
                    f"{what}: the database stayed unreachable or full for {time.monotonic() - started:.0f} s "
                    f"({_first_line(exc)})"
                ) from exc
            logger.warning(
                "Optuna storage: the database is unreachable or full (%s); %s again in %.1f s",
                _first_line(exc),
                what,
                pause,
            )
            time.sleep(pause)
            pause = min(pause * 2, 10.0)


def _first_line(exc: BaseException) -> str:
    """The driver's error in one line (Optuna wraps it: the wrapper's text says nothing)."""
    import sqlalchemy.exc

    found: BaseException | None = exc
    for _ in range(10):  # a bounded walk: a chain may loop
        if found is None or isinstance(found, sqlalchemy.exc.DBAPIError):
            break
        found = found.__cause__ or found.__context__
    if not isinstance(found, sqlalchemy.exc.DBAPIError):
        found = None
    line = error_line(found.orig if found is not None and found.orig is not None else exc)
    return re.sub(r"\s+", " ", line).strip()
