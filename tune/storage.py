"""Where a search keeps its files: a local folder, or an object store named by a URI, through one
``pyarrow.fs`` filesystem (as Ray resolves its own ``storage_path``).

``Location("runs")`` or ``Location("s3://bucket/prefix?endpoint_override=host:9000&scheme=http")``
names a folder or a file; ``loc / "name"`` a child. Every reader and writer of a search's storage
(search.json, trials.parquet, prompt files, the phase-1 cache, the report, Tune's folder) goes
through it, so a search runs the same on one machine, on NFS and on nodes that share no
filesystem.

- A file is published whole by one write of its final name: locally a temporary name renamed into
  place (``lpt_core.atomic``); on an object store one upload, which the store shows only once it is
  complete (object stores have no rename). Readers never see half a file.
- Credentials never travel: a URI that holds keys is refused, a ``Location`` pickles as its URI,
  and each machine resolves the filesystem itself, with the credentials of its own environment
  (for S3 the standard shared-credentials file, ``AWS_SHARED_CREDENTIALS_FILE``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pyarrow.fs as pafs

from lpt_core.atomic import atomic_write
from tune.errors import ConfigError, error_line

SECRET_KEYS = ("access_key", "secret_key", "session_token", "aws_access_key_id", "aws_secret_access_key")
_filesystems: dict[str, pafs.FileSystem] = {}  # one filesystem per store (scheme, bucket, query), per process


class StorageError(ConfigError):
    """A storage URI that cannot be used: the message names it and why."""


class Location:
    """A file or folder in local or object storage. ``str()`` is its URI (a local path is its
    absolute path); ``fs`` and ``path`` are what pyarrow and Ray Tune take."""

    uri: str
    _base: str
    _query: str

    def __init__(self, where: str | os.PathLike | Location):
        if isinstance(where, Location):
            self.uri, self._base, self._query = where.uri, where._base, where._query
            return
        text = os.fspath(where)
        if text.startswith("file://"):
            text = text[len("file://") :]
        if "://" not in text:
            self._base, self._query = str(Path(os.path.expanduser(text)).resolve()), ""
        else:
            parts = urlsplit(text)
            if not parts.netloc:
                raise StorageError(f"--storage {text}: no bucket in the URI (s3://BUCKET/PREFIX)")
            held = [k for k, _ in parse_qsl(parts.query) if k.lower() in SECRET_KEYS]
            if held:
                raise StorageError(
                    f"--storage: the URI holds {', '.join(held)}; it is recorded in MLflow (tag lpt.storage), "
                    "so give the credentials in the shared-credentials file (AWS_SHARED_CREDENTIALS_FILE) instead"
                )
            self._base = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
            self._query = parts.query
        self.uri = self._base + (f"?{self._query}" if self._query else "")

    # ------------------------------------------------------------------ naming
    @property
    def is_local(self) -> bool:
        return "://" not in self._base

    @property
    def local_path(self) -> Path:
        if not self.is_local:
            raise ValueError(f"{self.uri}: not a local path")
        return Path(self._base)

    @property
    def name(self) -> str:
        return self._base.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> Location:
        return self._with_base(self._base.rstrip("/").rsplit("/", 1)[0])

    def __truediv__(self, name: str) -> Location:
        return self._with_base(f"{self._base.rstrip('/')}/{name.strip('/')}")

    def _with_base(self, base: str) -> Location:
        loc = Location.__new__(Location)
        loc._base, loc._query = base, self._query
        loc.uri = base + (f"?{self._query}" if self._query else "")
        return loc

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"Location({self.uri!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    def __reduce__(self):
        return (Location, (self.uri,))  # the filesystem (and any credentials in it) stays behind

    # ------------------------------------------------------------------ the filesystem
    @property
    def fs(self) -> pafs.FileSystem:
        if self.is_local:
            return pafs.LocalFileSystem()
        store = self._base.split("/", 3)[:3]  # scheme://bucket
        key = "/".join(store) + "?" + self._query
        if key not in _filesystems:
            try:
                _filesystems[key] = pafs.FileSystem.from_uri(self.uri)[0]
            except (ValueError, OSError) as exc:
                raise StorageError(f"--storage {self.uri}: {str(exc).strip().splitlines()[0]}") from None
        return _filesystems[key]

    @property
    def path(self) -> str:
        """The path inside ``fs`` (``bucket/prefix/...`` on an object store)."""
        return self._base if self.is_local else self._base.split("://", 1)[1]

    def info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self.info().type == pafs.FileType.Directory

    def children(self) -> list[Location]:
        """What the folder holds, one level down, by name (none when it does not exist)."""
        selector = pafs.FileSelector(self.path, allow_not_found=True, recursive=False)
        return sorted((self / i.base_name for i in self.fs.get_file_info(selector)), key=lambda c: c.name)

    def files(self) -> list[Location]:
        """Every file under the folder, at any depth."""
        selector = pafs.FileSelector(self.path, allow_not_found=True, recursive=True)
        root = self.path.rstrip("/") + "/"
        return [self / i.path[len(root) :] for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.File]

    # ------------------------------------------------------------------ reading and writing
    def read_bytes(self) -> bytes:
        try:
            with self.fs.open_input_stream(self.path) as f:
                return f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.uri}: no such file") from None

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes | str) -> None:
        """Publish the file whole (see the module's docstring)."""
        payload = data.encode() if isinstance(data, str) else data
        if self.is_local:
            atomic_write(self.local_path, payload)
            return
        with self.fs.open_output_stream(self.path) as f:
            f.write(payload)

    write_text = write_bytes

    def upload(self, local: str | os.PathLike) -> None:
        """Publish a local file here, whole."""
        self.write_bytes(Path(local).read_bytes())

    def download(self, local: str | os.PathLike) -> Path:
        """Copy the file to ``local`` (a path on this machine) and return it."""
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(self.read_bytes())
        return local

    @contextmanager
    def local_copy(self) -> Iterator[Path]:
        """The file as a path on this machine: itself when local, else a temporary download."""
        if self.is_local:
            if not self.local_path.is_file():
                raise FileNotFoundError(f"{self.uri}: no such file")
            yield self.local_path
            return
        with tempfile.TemporaryDirectory(prefix="lpt-") as tmp:
            yield self.download(Path(tmp) / self.name)

    def mkdir(self) -> None:
        """A folder (an object store has none to make: a no-op there)."""
        if self.is_local:
            self.local_path.mkdir(parents=True, exist_ok=True)

    def delete(self) -> None:
        """Remove the file if it is there."""
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            pass

    def check_reachable(self) -> None:
        """Fail at once, in one line, when the store cannot be reached or its bucket is missing."""
        if self.is_local:
            return
        bucket = self.path.split("/", 1)[0]
        try:
            found = self.fs.get_file_info(bucket).type != pafs.FileType.NotFound
        except OSError as exc:
            raise StorageError(f"--storage {self.uri}: cannot reach the store ({error_line(exc)})") from None
        if not found:
            raise StorageError(f"--storage {self.uri}: bucket '{bucket}' does not exist; create it first")

    def tune_storage(self) -> tuple[str, pafs.FileSystem | None]:
        """Ray Tune's ``storage_path`` and ``storage_filesystem`` for this folder."""
        return (str(self.local_path), None) if self.is_local else (self.path, self.fs)


def work_dir(name: str) -> Path:
    """This machine's working folder for a search kept on object storage (``LPT_WORK_DIR``,
    default ``/tmp/lpt-work``): its Optuna SQLite, its driver lock."""
    return Path(os.environ.get("LPT_WORK_DIR", "").strip() or "/tmp/lpt-work") / name


def location(where: str | os.PathLike | Location) -> Location:
    """``where`` as a Location (a Location is returned as it is)."""
    return where if isinstance(where, Location) else Location(where)
