"""Run storage by URI: a local or shared (NFS) folder, ``s3://`` or ``gs://``, through pyarrow filesystems as
Ray Train itself reads ``RunConfig(storage_path=...)``.

``Storage.parse(text)`` maps what ``ray.storage_path`` says to a (pyarrow filesystem, path) pair: a URI with a
scheme goes through ``pyarrow.fs.FileSystem.from_uri`` (endpoint and credentials from the standard environment:
``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``GOOGLE_APPLICATION_CREDENTIALS``, ...), a plain path is a local
folder, relative ones from the repository root as before. A URI is never re-rooted under the repository.
``Storage`` then offers the few operations run folders need: exists, read, write (whole files only: a reader
sees the old object or the new one), list, delete, and copying a folder in or out. ``credentials_env`` is the
part of this process's environment that workers need to reach the same storage (handed on through Ray's
runtime environment), and ``check_storage`` is the preflight: a probe object written, read back and deleted
before Ray starts, so unreachable or forbidden storage stops the run in seconds with one line.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vitpose.config import REPO_ROOT, ConfigError, one_line

# Environment variables that say where object storage and the tracking server are and who we are there
# (pyarrow's S3 and GCS filesystems and MLflow's client read them: MLFLOW_TRACKING_USERNAME / _PASSWORD /
# _TOKEN, TLS settings); workers get the driver's through the runtime environment.
CREDENTIAL_PREFIXES = ("AWS_", "GOOGLE_", "GCS_", "MLFLOW_TRACKING_")
OBJECT_STORE_HINT = {"s3": "check AWS_ENDPOINT_URL / credentials",
                     "gs": "check GOOGLE_APPLICATION_CREDENTIALS / the bucket"}


class StorageError(ConfigError):
    """Storage that cannot be reached, read or written; the message names the URI and the cause."""


def credentials_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The AWS_* / GOOGLE_* / GCS_* / MLFLOW_TRACKING_* variables of this process (endpoints, keys, users)."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items() if k.startswith(CREDENTIAL_PREFIXES)}


class Storage:
    """A folder (or file) on a pyarrow filesystem: ``fs`` and ``path`` as pyarrow takes them, ``uri`` as a user
    writes it (a local one is its absolute path, so messages and ``str()`` read as before)."""

    def __init__(self, fs: Any, path: str, scheme: str | None = None):
        self.fs, self.path, self.scheme = fs, path.rstrip("/") or path, scheme

    @classmethod
    def parse(cls, text: str | os.PathLike[str]) -> Storage:
        """``s3://bucket/runs`` / ``gs://...`` / ``file:///abs`` via ``FileSystem.from_uri``; anything else is a
        local path, relative to the repository root."""
        import pyarrow.fs as pafs

        text = os.fspath(text)
        scheme = text.split("://", 1)[0].lower() if "://" in text else None
        if scheme is None or scheme == "file":
            local = Path(text[len("file://"):] if scheme else text).expanduser()
            return cls.local(local if local.is_absolute() else REPO_ROOT / local)
        try:
            fs, path = pafs.FileSystem.from_uri(text)
        except (OSError, ValueError, ImportError) as err:
            raise StorageError(f"{text}: {one_line(err)}{hint(scheme)}") from None
        return cls(fs, path, scheme)

    @classmethod
    def local(cls, path: str | os.PathLike[str]) -> Storage:
        """A folder on this machine (relative: from the current folder, as ``Path`` reads it)."""
        import pyarrow.fs as pafs

        return cls(pafs.LocalFileSystem(), str(Path(path).absolute()))

    @classmethod
    def from_filesystem(cls, fs: Any, path: str) -> Storage:
        """What Ray hands back (a checkpoint's ``filesystem`` and ``path``) as a Storage."""
        import pyarrow.fs as pafs

        if isinstance(fs, pafs.LocalFileSystem):
            return cls.local(path)
        return cls(fs, path, {"gcs": "gs"}.get(fs.type_name, fs.type_name))

    @classmethod
    def of(cls, where: Storage | str | os.PathLike[str]) -> Storage:
        """``where`` itself if it is a Storage, a ``Path`` as a local folder, a string parsed (URI or path)."""
        if isinstance(where, Storage):
            return where
        return cls.local(where) if isinstance(where, Path) else cls.parse(where)

    # ---------------------------------------------------------------------------------- naming
    @property
    def is_local(self) -> bool:
        return self.scheme is None

    @property
    def uri(self) -> str:
        return self.path if self.is_local else f"{self.scheme}://{self.path}"

    @property
    def local_path(self) -> Path:
        """The folder as a ``Path`` (local storage only)."""
        if not self.is_local:
            raise ValueError(f"{self.uri} is not on this machine's file system")
        return Path(self.path)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def parent(self) -> Storage:
        return Storage(self.fs, posixpath.dirname(self.path), self.scheme)

    def __truediv__(self, name: str) -> Storage:
        return Storage(self.fs, posixpath.join(self.path, name), self.scheme)

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"Storage({self.uri!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Storage) and (self.scheme, self.path) == (other.scheme, other.path)

    def __hash__(self) -> int:
        return hash((self.scheme, self.path))

    # ---------------------------------------------------------------------------------- queries
    def _type(self) -> Any:
        return self.fs.get_file_info(self.path).type

    def exists(self) -> bool:
        import pyarrow.fs as pafs

        return self._type() != pafs.FileType.NotFound

    def is_file(self) -> bool:
        import pyarrow.fs as pafs

        return self._type() == pafs.FileType.File

    def is_dir(self) -> bool:
        import pyarrow.fs as pafs

        return self._type() == pafs.FileType.Directory

    def iterdir(self) -> list[Storage]:
        """Direct children (files and folders), sorted by name; [] for a folder that is not there."""
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return sorted((Storage(self.fs, i.path, self.scheme) for i in infos), key=lambda s: s.path)

    def file_sizes(self) -> dict[str, int]:
        """Every file below this folder (relative posix path -> bytes), in one listing."""
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True, allow_not_found=True))
        return {posixpath.relpath(i.path, self.path): i.size for i in infos if i.type == pafs.FileType.File}

    # ---------------------------------------------------------------------------------- contents
    def read_bytes(self) -> bytes:
        if not self.is_file():
            raise FileNotFoundError(f"{self.uri}: no such file")
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        """Readers see the old file or the whole new one: local files are written beside and renamed, an
        object store's PUT is visible only once complete."""
        if self.is_local:
            self.parent.mkdir()
            tmp = f"{posixpath.join(posixpath.dirname(self.path), '.' + self.name)}.{os.getpid()}.tmp"
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            self.fs.move(tmp, self.path)
            return
        with self.fs.open_output_stream(self.path) as f:
            f.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def mkdir(self) -> None:
        """Create the folder (and its parents); on an object store folders are key prefixes, nothing to do."""
        if self.is_local:
            self.fs.create_dir(self.path, recursive=True)

    def unlink(self, missing_ok: bool = True) -> None:
        if missing_ok and not self.is_file():
            return
        self.fs.delete_file(self.path)

    def rmtree(self) -> None:
        if self.is_dir():
            self.fs.delete_dir(self.path)

    # ---------------------------------------------------------------------------------- folders in and out
    def upload(self, local: str | os.PathLike[str]) -> None:
        """Copy a local folder's files to this folder (each file whole; a reader may see some files new)."""
        import pyarrow.fs as pafs

        self.mkdir()
        pafs.copy_files(str(local), self.path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)

    def download(self, local: str | os.PathLike[str]) -> Path:
        """Copy this folder's files into ``local`` (created); returns it."""
        import pyarrow.fs as pafs

        Path(local).mkdir(parents=True, exist_ok=True)
        pafs.copy_files(self.path, str(local), source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem())
        return Path(local)

    @contextmanager
    def as_local_dir(self, prefix: str = "vitpose-storage-", contents: bool = True) -> Iterator[Path]:
        """This folder as a local directory: itself when local (created), else a temporary copy (empty with
        ``contents=False``, e.g. to write files and ``upload`` them) deleted afterwards."""
        if self.is_local:
            self.mkdir()
            yield self.local_path
            return
        with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
            local = Path(tmp) / self.name
            if contents:
                self.download(local)
            else:
                local.mkdir()
            yield local


def hint(scheme: str | None) -> str:
    return f" ({OBJECT_STORE_HINT[scheme]})" if scheme in OBJECT_STORE_HINT else ""


def open_storage(text: str, key: str = "ray.storage_path") -> Storage:
    """``text`` (a config value named ``key``) as a Storage; object storage is probed with ``check_storage``.
    Local folders are not probed: they are created where a run needs them, as before."""
    try:
        storage = Storage.parse(text)
    except StorageError as err:
        raise StorageError(f"{key}={err}") from None
    if not storage.is_local:
        check_storage(storage, key)
    return storage


def check_storage(storage: Storage, key: str = "ray.storage_path") -> None:
    """Write, read back and delete a probe object under ``storage``: unreachable, missing or forbidden storage
    fails here, before Ray starts, with one line naming ``key``, the URI and the cause."""
    probe = storage / f".vitpose-probe-{uuid.uuid4().hex[:12]}"
    payload = b"vitpose storage probe\n"
    try:
        probe.write_bytes(payload)
        if probe.read_bytes() != payload:
            raise OSError("a probe object read back different bytes")
        probe.unlink()
    except (OSError, ValueError) as err:
        cause = one_line(err)
        raise StorageError(f"{key}={storage.uri}: {cause}{hint(storage.scheme)}") from None
