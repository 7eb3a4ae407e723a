"""Run storage by URI: a local or shared (NFS) folder, ``s3://`` or ``gs://``, through pyarrow filesystems as
Ray Train itself reads ``RunConfig(storage_path=...)``.

``Storage.parse(text)`` maps what ``ray.storage_path`` says to a (pyarrow filesystem, path) pair: a URI with a
scheme goes through ``pyarrow.fs.FileSystem.from_uri`` (endpoint and credentials from the standard environment:
``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``GOOGLE_APPLICATION_CREDENTIALS``, ...), a plain path is a local
folder, relative ones from the repository root as before. A URI is never re-rooted under the repository.
``Storage`` then offers the few operations run folders need: exists, read, write (whole files only: a reader
sees the old object or the new one), list, delete, and copying a folder in or out. A URI keeps its query options
(``s3://bucket/runs?endpoint_override=minio:9000&scheme=http``) in every folder and file below it, so the probe,
Ray and the workers, which each open the URI again, reach the same endpoint.

Credentials never travel with a run: a URI that carries any (``s3://KEY:SECRET@bucket``, ``?secret_key=``) is
refused in one line that does not repeat them, and ``credentials_env`` hands Ray's workers only where the
storage is (endpoint, region), never who we are there: Ray keeps a runtime environment in its job metadata and
logs it. Each node's own processes find their identity the standard way (the environment its ``ray start`` runs
in, ``~/.aws/credentials``, an instance role, ``GOOGLE_APPLICATION_CREDENTIALS``); a local Ray's workers are
this process's children and inherit its environment. ``check_storage`` is the preflight: a probe object
written, read back and deleted before Ray starts, so unreachable or forbidden storage stops the run in seconds
with one line.
"""

from __future__ import annotations

import os
import posixpath
import re
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from vitpose.config import REPO_ROOT, ConfigError, one_line

# Environment variables that say where object storage and the tracking server are (pyarrow's S3 and GCS
# filesystems and MLflow's client read them: endpoints, region, TLS settings) and who we are there.
CREDENTIAL_PREFIXES = ("AWS_", "GOOGLE_", "GCS_", "MLFLOW_TRACKING_")
# Names of the "who" part (keys, secrets, tokens, users, passwords, profiles, roles, credential files): never
# handed to Ray, which shows a runtime environment in its job metadata and its runtime-env log.
IDENTITY = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|USERNAME|CREDENTIAL|PROFILE|ROLE|AUTH")
OBJECT_STORE_HINT = {"s3": "check AWS_ENDPOINT_URL / credentials",
                     "gs": "check GOOGLE_APPLICATION_CREDENTIALS / the bucket"}
KEEP_CREDENTIALS_OUT = ("a storage URI is printed, logged with the run and handed to Ray, so keep credentials out "
                        "of it: every node reads its own (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the "
                        "environment its `ray start` or the run starts in, ~/.aws/credentials, an instance role; "
                        "GOOGLE_APPLICATION_CREDENTIALS)")


class StorageError(ConfigError):
    """Storage that cannot be reached, read or written; the message names the URI and the cause."""


def credentials_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The AWS_* / GOOGLE_* / GCS_* / MLFLOW_TRACKING_* variables of this process that say where storage and
    tracking are (endpoints, region, TLS), for Ray's workers; none that says who we are (see ``IDENTITY``)."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items() if k.startswith(CREDENTIAL_PREFIXES) and not IDENTITY.search(k)}


def uri_secrets(text: str) -> tuple[str, list[str]]:
    """``text`` with credentials masked, and what carried them (a user and password, ``secret_key=``, ...)."""
    scheme, sep, rest = text.partition("://")
    found: list[str] = []
    head, qmark, query = rest.partition("?")
    netloc, slash, path = head.partition("/")
    if "@" in netloc:
        found.append("a user and password" if ":" in netloc.rsplit("@", 1)[0] else "a user (access key)")
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    options = []
    for name, value in parse_qsl(query, keep_blank_values=True):
        if IDENTITY.search(name.upper()) or "SIGNATURE" in name.upper():
            found.append(f"{name}=")
            value = "***"
        options.append(f"{name}={value}")
    return f"{scheme}{sep}{netloc}{slash}{path}{qmark}{'&'.join(options)}", found


class Storage:
    """A folder (or file) on a pyarrow filesystem: ``fs`` and ``path`` as pyarrow takes them, ``uri`` as a user
    writes it (a local one is its absolute path, so messages and ``str()`` read as before)."""

    def __init__(self, fs: Any, path: str, scheme: str | None = None, query: str = ""):
        self.fs, self.path, self.scheme = fs, path.rstrip("/") or path, scheme
        self.query = query  # the URI's options (endpoint_override=...), as written; '' for local folders

    @classmethod
    def parse(cls, text: str | os.PathLike[str]) -> Storage:
        """``s3://bucket/runs`` / ``gs://...`` / ``file:///abs`` via ``FileSystem.from_uri``, options included;
        anything else is a local path, relative to the repository root."""
        import pyarrow.fs as pafs

        text = os.fspath(text)
        scheme = text.split("://", 1)[0].lower() if "://" in text else None
        if scheme is None or scheme == "file":
            local = Path(text[len("file://"):] if scheme else text).expanduser()
            return cls.local(local if local.is_absolute() else REPO_ROOT / local)
        masked, secrets = uri_secrets(text)
        if secrets:
            raise StorageError(f"{masked}: carries credentials ({', '.join(secrets)}); {KEEP_CREDENTIALS_OUT}")
        try:
            fs, path = pafs.FileSystem.from_uri(text)
        except (OSError, ValueError, ImportError) as err:
            raise StorageError(f"{text}: {one_line(err)}{hint(scheme)}") from None
        return cls(fs, path, scheme, urlsplit(text).query)

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
        # Ray's filesystem already holds the URI's options (endpoint...); only the name lacks them.
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
        """What ``parse`` reads back to the same place: the path, or scheme, path and options."""
        if self.is_local:
            return self.path
        return f"{self.scheme}://{self.path}" + (f"?{self.query}" if self.query else "")

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
        return self._at(posixpath.dirname(self.path))

    def __truediv__(self, name: str) -> Storage:
        return self._at(posixpath.join(self.path, name))

    def _at(self, path: str) -> Storage:
        """Another path on the same filesystem, with the same options."""
        return Storage(self.fs, path, self.scheme, self.query)

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"Storage({self.uri!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Storage) and (self.scheme, self.path, self.query) == (other.scheme, other.path,
                                                                                         other.query)

    def __hash__(self) -> int:
        return hash((self.scheme, self.path, self.query))

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
        return sorted((self._at(i.path) for i in infos), key=lambda s: s.path)

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
