"""Where run folders live: a local directory, or a prefix in an S3-compatible object store.

A run folder (``<runs_root>/<run_name>``) is a local path (``runs/demo``) or an ``s3://bucket/prefix``
URI. :func:`location` turns either into a *location*:

* a local path stays a ``pathlib.Path`` (local runs behave exactly as plain files);
* a URI becomes an :class:`ObjectPath`: the object key plus its ``pyarrow.fs.S3FileSystem``, with the
  part of the pathlib API the pipeline uses (``/``, ``name``, ``parent``, ``exists``, ``is_file``,
  ``is_dir``, ``glob``, ``read_bytes``, ``read_text``, ``write_bytes``).

So every read and write of a run folder is the same code for both; the few operations that differ
(atomic writes, folders, appends) are the helpers below.

S3 settings: config section ``storage`` (``config_sections.StorageConfig``). The endpoint of an
S3-compatible server (MinIO, Ceph, moto) is ``storage.endpoint_url``, else the standard
``AWS_ENDPOINT_URL_S3`` variable, else ``AWS_ENDPOINT_URL``, else AWS itself; the region is
``storage.region``, else ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, else ``us-east-1``. Credentials
never go in the config: they are the standard ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``
(/ ``AWS_SESSION_TOKEN``) of the process that opens the filesystem (the flow run), else the AWS
default chain (profile, instance role) of each process. An ObjectPath pickles with its filesystem,
endpoint and those credentials included, so the Ray workers it is sent to use the driver's settings.

Atomic writes: a local file is written under a temp name in the same folder and renamed; an object is
written once, from the finished bytes (S3 shows a new object whole or not at all, never half of it).
"""

from __future__ import annotations

import fnmatch
import functools
import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterable, Iterator, Optional, Union

import pyarrow.fs as pafs

from pocl_core.config_sections import StorageConfig

REMOTE_SCHEMES = ("s3",)


def _process_umask() -> int:
    """The process umask: from /proc on Linux (no side effect), else by setting and restoring it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# tempfile makes its files 0600 and folders 0700; what is renamed into place gets the modes an
# ordinary open() or mkdir() would have given (0666 / 0777 less the umask, read at import).
UMASK = _process_umask()


def with_default_mode(path: str | os.PathLike, like: str | os.PathLike | None = None) -> None:
    """Give a temporary file or folder the mode a plain open()/mkdir() would have given it, or the mode
    of ``like`` when that exists (a file being replaced keeps its permissions, as an in-place write would)."""
    try:
        mode = stat.S_IMODE(os.stat(like).st_mode) if like is not None else None
    except OSError:
        mode = None
    os.chmod(path, mode if mode is not None else (0o777 if os.path.isdir(path) else 0o666) & ~UMASK)


def is_remote(path: object) -> bool:
    """True for an ObjectPath or a ``scheme://`` string (other than ``file://``)."""
    if isinstance(path, ObjectPath):
        return True
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b/`` -> ``("s3", "bucket/a/b")``; ValueError for another scheme or no bucket."""
    scheme, sep, key = uri.partition("://")
    if not sep or scheme not in REMOTE_SCHEMES:
        raise ValueError(f"{uri}: unsupported storage URI; use a local path or s3://bucket/prefix")
    key = key.strip("/")
    if not key:
        raise ValueError(f"{uri}: the URI names no bucket (expected s3://bucket/prefix)")
    return scheme, key


def join(root: str, *parts: str) -> str:
    """``root`` joined with ``parts``: ``/``-joined for a URI, ``os.path`` rules for a local path."""
    if is_remote(root):
        return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(root, *parts))


@functools.lru_cache(maxsize=16)
def _s3(endpoint_url: Optional[str], region: str, access_key: Optional[str], secret_key: Optional[str],
        session_token: Optional[str]) -> pafs.S3FileSystem:
    kwargs: dict = {"region": region}
    if endpoint_url:
        kwargs["endpoint_override"] = endpoint_url
        if endpoint_url.startswith("http://"):
            kwargs["scheme"] = "http"
    if access_key and secret_key:
        kwargs.update(access_key=access_key, secret_key=secret_key, session_token=session_token or None)
    return pafs.S3FileSystem(**kwargs)


def s3_filesystem(storage: StorageConfig | None = None) -> pafs.S3FileSystem:
    """The S3 filesystem for ``storage`` (see the module docstring for the environment fallbacks)."""
    storage = storage or StorageConfig()
    env = os.environ
    endpoint = storage.endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
    region = storage.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
    return _s3(endpoint, region, env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY"),
               env.get("AWS_SESSION_TOKEN"))


@dataclass(frozen=True, eq=False)
class ObjectPath:
    """A key (``bucket/prefix/...``, no leading or trailing ``/``) in an object store, with its filesystem.

    Folders are key prefixes: a folder exists when some object lies under it, and "creating" one
    is a no-op. ``str()`` gives the URI (``s3://bucket/prefix/...``).
    """

    fs: pafs.FileSystem
    key: str
    scheme: str = "s3"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.key}"

    def __repr__(self) -> str:
        return f"ObjectPath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectPath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __lt__(self, other: "ObjectPath") -> bool:
        return str(self) < str(other)

    def __truediv__(self, part: str | os.PathLike) -> "ObjectPath":
        part = os.fspath(part).strip("/")
        return ObjectPath(self.fs, f"{self.key}/{part}" if part else self.key, self.scheme)

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        return Path(self.name).suffix

    @property
    def parent(self) -> "ObjectPath":
        head = self.key.rsplit("/", 1)[0] if "/" in self.key else self.key
        return ObjectPath(self.fs, head, self.scheme)

    def with_name(self, name: str) -> "ObjectPath":
        return self.parent / name

    def resolve(self) -> "ObjectPath":
        return self

    def _type(self) -> pafs.FileType:
        return self.fs.get_file_info(self.key).type

    def exists(self) -> bool:
        return self._type() != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._type() == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._type() == pafs.FileType.Directory

    def iterdir(self) -> list["ObjectPath"]:
        """The direct children (objects and sub-prefixes); empty when nothing lies under this key."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.key, recursive=False, allow_not_found=True))
        return [ObjectPath(self.fs, info.path.strip("/"), self.scheme) for info in infos]

    def glob(self, pattern: str) -> list["ObjectPath"]:
        """Direct children whose name matches ``pattern`` (fnmatch; one level, no ``/``), sorted."""
        if "/" in pattern or "**" in pattern:
            raise ValueError(f"{self}: glob supports one-level name patterns only, got '{pattern}'")
        return sorted((c for c in self.iterdir() if fnmatch.fnmatchcase(c.name, pattern)), key=str)

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.key) as fh:
            return fh.read()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> int:
        """Write the object from finished bytes: it appears whole when the upload completes."""
        with self.fs.open_output_stream(self.key) as out:
            out.write(data)
        return len(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> int:
        return self.write_bytes(text.encode(encoding))

    def mkdir(self, parents: bool = True, exist_ok: bool = True) -> None:
        """Folders are key prefixes in an object store: nothing to create."""

    def unlink(self, missing_ok: bool = False) -> None:
        if missing_ok and not self.exists():
            return
        self.fs.delete_file(self.key)


Location = Union[Path, ObjectPath]


def location(path: str | os.PathLike | ObjectPath, storage: StorageConfig | None = None) -> Location:
    """A local path as ``pathlib.Path``, an ``s3://`` URI as an ObjectPath (settings from ``storage``).

    Locations are returned unchanged, so any function can take a string or a location.
    """
    if isinstance(path, (Path, ObjectPath)):
        return path
    text = os.fspath(path)
    if text.startswith("file://"):
        return Path(text[len("file://"):])
    if is_remote(text):
        scheme, key = split_uri(text)
        return ObjectPath(s3_filesystem(storage), key, scheme)
    return Path(text)


@contextmanager
def open_input(path: Location) -> Iterator[IO[bytes]]:
    """A binary stream reading the file (local or object), for checksums of large files."""
    if isinstance(path, ObjectPath):
        with path.fs.open_input_stream(path.key) as fh:
            yield fh
    else:
        with Path(path).open("rb") as fh:
            yield fh


def write_bytes_atomic(path: Location, data: bytes) -> Location:
    """Write a file so that a reader never sees half of it (temp + rename locally; one upload remotely)."""
    if isinstance(path, ObjectPath):
        path.write_bytes(data)
        return path
    with replacing(path) as tmp:
        Path(tmp).write_bytes(data)
    return path


@contextmanager
def replacing(path: Path) -> Iterator[str]:
    """A temporary file beside the local ``path`` for the block to write; it replaces ``path`` when the
    block ends without error, and is deleted otherwise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with_default_mode(tmp, like=path)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def append_text(path: Location, text: str) -> None:
    """Append to a text file. Objects cannot be appended to: the object is rewritten with the new end
    (meant for small logs such as ``train/metrics.jsonl``)."""
    if isinstance(path, ObjectPath):
        old = path.read_bytes() if path.is_file() else b""
        path.write_bytes(old + text.encode("utf-8"))
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(text)


def remove_tree(path: Location) -> None:
    """Delete a folder and everything under it; nothing happens when it does not exist."""
    if isinstance(path, ObjectPath):
        if path.exists():
            path.fs.delete_dir(path.key)
        return
    shutil.rmtree(path, ignore_errors=True)


def write_dir_atomic(out: Location, build: Callable[[Path], None], last: str) -> Location:
    """Replace the folder ``out`` with the one ``build(folder)`` writes into a local ``folder``.

    Locally the new folder is built beside ``out`` and renamed into place. In an object store it is
    built in a temporary folder, the old objects under ``out`` are deleted and the new files uploaded
    with the one named ``last`` (e.g. a provenance file) last, so its presence marks a complete folder.
    """
    if isinstance(out, ObjectPath):
        with tempfile.TemporaryDirectory(prefix=f"pocl-{out.name}-") as tmp:
            build(Path(tmp))
            remove_tree(out)
            upload_dir(Path(tmp), out, last=last)
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def download_dir(src: ObjectPath, dest: Path) -> Path:
    """Copy every object under ``src`` into the local folder ``dest`` (created), keeping relative paths."""
    dest.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(src.key, str(dest), source_filesystem=src.fs, destination_filesystem=pafs.LocalFileSystem())
    return dest


def download_files(src: ObjectPath, dest: Path, names: Iterable[str]) -> Path:
    """Copy the objects ``src/<name>`` of ``names`` into the local folder ``dest`` (created); a name
    with no object under ``src`` is skipped. Returns ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        obj = src / name
        if obj.is_file():
            pafs.copy_files(obj.key, str(dest / name), source_filesystem=src.fs,
                            destination_filesystem=pafs.LocalFileSystem())
    return dest


def upload_dir(src: Path, dest: ObjectPath, last: str | None = None) -> ObjectPath:
    """Upload every file under the local folder ``src`` to ``dest``; the file named ``last`` goes last,
    so its presence marks a complete upload."""
    files = sorted(p for p in src.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name == last)
    for f in files:
        target = dest / f.relative_to(src).as_posix()
        with f.open("rb") as fh, dest.fs.open_output_stream(target.key) as out:
            shutil.copyfileobj(fh, out, 1 << 22)
    return dest


def fetch_dir(src: ObjectPath, cache_root: str | Path, marker: str) -> Path:
    """A local copy of the remote folder ``src`` under ``<cache_root>/<scheme>/<key>``.

    The copy is reused when its ``marker`` file (written last at the source, e.g. a provenance file)
    has the same bytes as the source's; otherwise the folder is downloaded to a temp sibling and
    renamed into place. Raises FileNotFoundError naming ``src`` when the marker is missing there.
    """
    remote_marker = src / marker
    if not remote_marker.is_file():
        raise FileNotFoundError(f"{src}: no {marker}; the folder is missing or incomplete")
    expected = remote_marker.read_bytes()
    dest = Path(cache_root, src.scheme, *src.key.split("/"))
    if (dest / marker).is_file() and (dest / marker).read_bytes() == expected:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    with_default_mode(tmp)
    try:
        download_dir(src, tmp)
        if (tmp / marker).read_bytes() != expected:
            raise RuntimeError(f"{src} changed while it was downloaded to {dest}; try again")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def for_workers(path: Location) -> str | ObjectPath:
    """A location as handed to Ray workers or tasks: an absolute local path, or the ObjectPath (it
    carries its filesystem, so the workers use the driver's endpoint and credentials)."""
    return path if isinstance(path, ObjectPath) else str(Path(path).resolve())


def ray_storage(path: Location) -> tuple[str, pafs.FileSystem | None]:
    """``(storage_path, storage_filesystem)`` for Ray Train's ``RunConfig`` from a location."""
    if isinstance(path, ObjectPath):
        return path.key, path.fs
    return str(Path(path).resolve()), None
