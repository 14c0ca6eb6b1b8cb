"""Run the driver's search with its database password held in its own process only.

docker-compose.yml's driver runs its command through this:

    python scripts/hold_db_password.py python tune/search.py ARGS...

Any Ray token holder can place a task on the driver's Ray node, where it runs as the driver's user
and could read a file or another process's environment or memory there (docs/cluster.md, "Trust
domains"). So, before the script starts, this

- reads the password of the pgpass file PGPASSFILE names (the entrypoint's copy, on a tmpfs) and
  deletes that copy;
- marks this process not dumpable (``prctl(PR_SET_DUMPABLE, 0)``): its ``/proc`` files (environ,
  mem) become root's, out of reach of a task running as the same user;
- hands libpq the password in this process's environment (``PGPASSWORD``; set after the start, so
  not in ``/proc/PID/environ`` either), where the Optuna storage and the search lock connect;
- runs the Python script in this same process (``runpy``), as ``python SCRIPT ARGS`` would.

A child process the search starts inherits the variable: the search starts none that lives long.
Any other command (``python -c``, a shell) runs as it is, with the file.

It also watches the Ray head (``RAY_ADDRESS``, a thread): the driver cannot outlive its cluster (Ray
ends a driver whose head, the GCS, has not answered for 60 s, with a line of its own about the GCS),
so once the head has refused connections for ``HEAD_LOST_S`` it says so in one line, with what to
do: start the head again (the workers rejoin by themselves), then ``--resume``.
"""

from __future__ import annotations

import ctypes
import os
import runpy
import socket
import sys
import threading
import time
from pathlib import Path

PR_SET_DUMPABLE = 4
HEAD_LOST_S = 20.0  # the head refusing connections this long is gone (Ray's own limit is 60 s)


def pgpass_password(path: Path) -> str:
    """The password of the file's first line (host:port:database:role:password)."""
    line = path.read_text().strip().splitlines()[0]
    return line.rsplit(":", 1)[1]


def hold() -> None:
    passfile = os.environ.pop("PGPASSFILE", "")
    if not passfile or not Path(passfile).is_file():
        return
    password = pgpass_password(Path(passfile))
    Path(passfile).unlink()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")
    os.environ["PGPASSWORD"] = password


def head_answers(address: tuple[str, int]) -> bool:
    try:
        socket.create_connection(address, timeout=5).close()
        return True
    except OSError:
        return False


def watch_head(address: tuple[str, int], lost_s: float = HEAD_LOST_S, every_s: float = 5.0) -> None:
    """Once the Ray head at ``address`` has not answered for ``lost_s`` (it answered before), one
    line on stderr; again only after it answered in between."""
    answered_at: float | None = None
    said = False
    while True:
        if head_answers(address):
            answered_at, said = time.monotonic(), False
        elif answered_at is not None and not said and time.monotonic() - answered_at >= lost_s:
            host, port = address
            print(
                f"error: the Ray head {host}:{port} has not answered for {lost_s:.0f} s: the search cannot go on "
                "(Ray ends this driver once its head is gone 60 s); what it recorded stays (trials.parquet, MLflow, "
                "the Optuna study): start the head again (docker compose up -d ray-head; the workers rejoin), "
                "then run the same command with --resume",
                file=sys.stderr,
                flush=True,
            )
            said = True
        time.sleep(every_s)


def start_head_watch() -> None:
    """``watch_head`` of ``RAY_ADDRESS`` (host:port) in a daemon thread; nothing without one."""
    host, _, port = os.environ.get("RAY_ADDRESS", "").rpartition(":")
    if host and port.isdigit():
        threading.Thread(target=watch_head, args=((host, int(port)),), name="ray-head-watch", daemon=True).start()


def main(argv: list[str]) -> None:
    if len(argv) >= 2 and Path(argv[0]).name.startswith("python") and argv[1].endswith(".py"):
        hold()
        start_head_watch()
        sys.argv = argv[1:]
        sys.path[0] = str(Path(argv[1]).resolve().parent)  # as `python SCRIPT` sets it
        runpy.run_path(argv[1], run_name="__main__")
        return
    if not argv:
        sys.exit("usage: python scripts/hold_db_password.py COMMAND [ARGS...]")
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
