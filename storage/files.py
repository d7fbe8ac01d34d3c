"""Atomic file writes: readers see the old file or the complete new one, never a part; and
creation that fails when another writer got there first."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)
