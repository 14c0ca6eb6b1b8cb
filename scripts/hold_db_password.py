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
"""

from __future__ import annotations

import ctypes
import os
import runpy
import sys
from pathlib import Path

PR_SET_DUMPABLE = 4


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


def main(argv: list[str]) -> None:
    if len(argv) >= 2 and Path(argv[0]).name.startswith("python") and argv[1].endswith(".py"):
        hold()
        sys.argv = argv[1:]
        sys.path[0] = str(Path(argv[1]).resolve().parent)  # as `python SCRIPT` sets it
        runpy.run_path(argv[1], run_name="__main__")
        return
    if not argv:
        sys.exit("usage: python scripts/hold_db_password.py COMMAND [ARGS...]")
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
