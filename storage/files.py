"""Atomic file writes: readers see the old file or the complete new one, never a part; and
creation that fails when another writer got there first."""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from core.workspace import is_url


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` (same file system) to write to: renamed onto `path` when the
    block succeeds, removed when it fails. Unique per call, so concurrent writers never share it."""
    with atomic_temp(path) as tmp:
        yield tmp
        os.replace(tmp, path)


def atomic_copy(source: Path, target: Path) -> None:
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)


def fsync_path(path: Path) -> None:
    """Make a file, and its name in its directory, durable."""
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())
    _fsync_directory(path.parent)


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def exclusive_create(path: Path, data: bytes) -> None:
    """Create `path` holding `data`, complete and durable, only if no file is there: a temporary
    file is written and fsynced, then hard-linked to `path` (atomic, and failing with
    FileExistsError when another writer got there first, which os.replace would overwrite)."""
    with atomic_temp(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.link(tmp, path)
    _fsync_directory(path.parent)


@contextmanager
def atomic_temp(path: Path) -> Iterator[Path]:
    """A unique temporary path beside `path`, removed when the block ends."""
    with naming(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            yield tmp
        finally:
            tmp.unlink(missing_ok=True)


@contextmanager
def naming(path: Path | str) -> Iterator[None]:
    """An OSError without a file name (a write to an open file on a full disk says only "No
    space left on device") gets `path`: the one-line error then names the file at fault."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None or exc.errno is None:
            raise
        raise type(exc)(exc.errno, exc.strerror or str(exc), str(path)) from exc


# ---------------------------------------------------------------- locations: a Path or a URL
Location = Path | str


def location(value: str | os.PathLike) -> Location:
    """A URL (s3://…, memory://…) stays a string; anything else is a local Path."""
    return value if is_url(value) else Path(value)


def join(base: Location, *parts: str) -> Location:
    return "/".join([str(base).rstrip("/"), *parts]) if isinstance(base, str) else base.joinpath(*parts)


def filesystem(url: str):
    """(fsspec filesystem, path) of a URL or local path, without a listings cache: other
    processes write meanwhile, and a cached listing of an object store would hide their files
    (a just-committed manifest would read as "not found")."""
    import fsspec

    return fsspec.core.url_to_fs(url, use_listings_cache=False)


def stream_sha256(fh) -> str:
    """SHA-256 of an open binary file, read in 1 MiB blocks: never the whole file in memory."""
    digest = hashlib.sha256()
    for block in iter(lambda: fh.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def file_sha256(loc: Location) -> str:
    with open_read(loc) as fh:
        return stream_sha256(fh)


def exists(loc: Location) -> bool:
    if isinstance(loc, Path):
        return loc.is_file()
    fs, path = filesystem(loc)
    return fs.isfile(path)


def read_bytes(loc: Location) -> bytes:
    """The file's bytes; FileNotFoundError when there is none."""
    if isinstance(loc, Path):
        return loc.read_bytes()
    fs, path = filesystem(loc)
    return fs.cat_file(path)


def open_read(loc: Location):
    """A binary, seekable file object that reads on demand (ranged GETs on object stores)."""
    if isinstance(loc, Path):
        return open(loc, "rb")
    fs, path = filesystem(loc)
    return fs.open(path, "rb")


def write_bytes(loc: Location, data: bytes) -> None:
    """Readers see the old file or the complete new one: a rename locally, one PUT on S3."""
    if isinstance(loc, Path):
        with atomic_path(loc) as tmp:
            tmp.write_bytes(data)
        return
    fs, path = filesystem(loc)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, data)


def create_bytes(loc: Location, data: bytes) -> bool:
    """Put-if-absent: write `data` (complete and durable) only if nothing is at `loc`. False when
    another writer got there first: a hard link locally, a conditional PUT (If-None-Match: *) on S3."""
    try:
        if isinstance(loc, Path):
            loc.parent.mkdir(parents=True, exist_ok=True)
            exclusive_create(loc, data)
        else:
            fs, path = filesystem(loc)
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            with fs.open(path, "xb") as fh:
                fh.write(data)
    except FileExistsError:
        return False
    return True


def remove_file(loc: Location) -> None:
    """Remove the file at `loc` if there is one (no error when there is none)."""
    if isinstance(loc, Path):
        loc.unlink(missing_ok=True)
        return
    fs, path = filesystem(loc)
    if fs.isfile(path):
        fs.rm_file(path)


def copy_file(source: Location, target: Location) -> None:
    if isinstance(source, Path) and isinstance(target, Path):
        atomic_copy(source, target)
    else:
        write_bytes(target, read_bytes(source))


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (fcntl) on `path` (created if absent), held while the block
    runs and released when it ends or the process dies: what makes the first use of a shared
    local database (MLflow's, Prefect's) happen once when several runs start together. Where
    fcntl does not exist (Windows) the block runs unlocked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover (not POSIX)
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

