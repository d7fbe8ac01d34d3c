"""Versioned, hive-partitioned Parquet datasets behind one interface (local paths or fsspec URIs).

Layout of a dataset root::

    <root>/<name>/items.parquet
    <root>/<name>/sequences/iteration=<j>/bucket=<b>/part-<digest>.parquet
    <root>/<name>/manifests/v00000.json, v00001.json, ...

Writes are staged in a local folder outside every dataset root, copied into place, and become
visible only when the manifest is committed (atomic rename locally, a single put on object
stores). A crash therefore leaves either the previous version or the complete new one.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError

from core.errors import RsirError
from core.workspace import Workspace
from storage.files import atomic_path
from storage.manifest import FileEntry, Manifest, PartitionEntry, chain_digest

SEQUENCE_SCHEMA = pa.schema([
    pa.field("seq_id", pa.int64(), nullable=False),
    pa.field("user_id", pa.string()),
    pa.field("items", pa.list_(pa.int32()), nullable=False),
    pa.field("origin", pa.string(), nullable=False),  # "real" | "synthetic"
    pa.field("parent_seq_id", pa.int64()),  # source sequence of a synthetic one
])
ROWS_PER_BUCKET = 250_000
_MANIFEST_RE = re.compile(r"^v(\d{5})\.json$")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def valid_name(name: str) -> bool:
    # fullmatch: with re.match, "$" would also accept a trailing newline ("t\n").
    return isinstance(name, str) and _NAME_RE.fullmatch(name) is not None


def check_name(name: str) -> str:
    """A dataset name is one path component inside the datasets root: never '..', '/' or '.x'."""
    if not valid_name(name):
        raise RsirError(f"invalid dataset name {name!r}: use letters, digits, '.', '_' and '-', "
                        f"starting with a letter or digit")
    return name


def _inside(rel: str) -> bool:
    """A manifest entry names a file below its dataset directory: relative, no '..', no drive
    or URL (':'), no backslash (a Windows separator that would hide a '..')."""
    if not rel or rel.startswith("/") or any(c in rel for c in ":\\"):
        return False
    return ".." not in rel.split("/")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _first_error(exc: ValidationError) -> str:
    """The first problem of a manifest that does not parse, on one line."""
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    return f"{where}: {err['msg']}" if where else err["msg"]


@contextmanager
def _io(name: str, operation: str) -> Iterator[None]:
    """Report a filesystem failure (disk full, permission denied) as one line naming the
    dataset and the operation; callers undo what the operation left."""
    try:
        yield
    except OSError as exc:
        raise RsirError(f"dataset {name!r}: {operation} failed: {_one_line(exc)}") from None


def table_digest(table: pa.Table) -> str:
    """Digest of the logical content (independent of Parquet encoding details)."""
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table.combine_chunks())
    return hashlib.sha256(sink.getvalue()).hexdigest()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class DatasetStore:
    """All datasets under one root URI, e.g. ``/home/me/workspace/datasets`` or ``memory://ws``."""

    def __init__(self, root: str | Path, staging: str | Path):
        self.root = str(root).rstrip("/")
        self.fs, self._root_path = fsspec.core.url_to_fs(self.root)
        self.staging = Path(staging)
        self.is_local = isinstance(self.fs, LocalFileSystem)

    # ---------------------------------------------------------------- paths
    def _path(self, name: str, *parts: str) -> str:
        # Every access to a dataset goes through here: a name like '../x' never leaves the root.
        return "/".join([self._root_path, check_name(name), *parts])

    def _url(self, name: str, *parts: str) -> str | io.BytesIO:
        """A source polars accepts: the plain path locally, else the bytes read through fsspec
        (polars cannot open fsspec-only protocols such as memory:// by URL)."""
        path = self._path(name, *parts)
        return path if self.is_local else io.BytesIO(self.fs.cat_file(path))

    # ---------------------------------------------------------------- reading
    def names(self) -> list[str]:
        if not self.fs.exists(self._root_path):
            return []
        found = []
        for entry in self.fs.ls(self._root_path, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if valid_name(name) and self.versions(name):  # skips e.g. a replaced dataset set aside
                found.append(name)
        return sorted(found)

    def versions(self, name: str) -> list[int]:
        mdir = self._path(name, "manifests")
        if not self.fs.exists(mdir):
            return []
        out = []
        for entry in self.fs.ls(mdir, detail=False):
            m = _MANIFEST_RE.match(entry.rsplit("/", 1)[-1])
            if m:
                out.append(int(m.group(1)))
        return sorted(out)

    def manifest(self, name: str, version: int | None = None) -> Manifest:
        versions = self.versions(name)
        if not versions:
            known = ", ".join(self.names()) or "none"
            raise RsirError(f"unknown dataset {name!r} in {self.root} (known: {known}); "
                            f"fetch or import it first, e.g. `rsir data fetch ml-100k`")
        if version is None:
            version = versions[-1]
        if version not in versions:
            raise RsirError(f"dataset {name!r} has no version {version} (versions: {versions})")
        path = self._path(name, "manifests", f"v{version:05d}.json")
        try:
            manifest = Manifest.model_validate_json(self.fs.cat_file(path))
        except ValidationError as exc:
            raise RsirError(f"dataset {name!r} v{version}: corrupt manifest {path}: {_first_error(exc)}") from None
        except OSError as exc:
            raise RsirError(f"dataset {name!r} v{version}: cannot read {path}: {_one_line(exc)}") from None
        for entry in manifest.files:
            if not _inside(entry.path):
                raise RsirError(f"dataset {name!r} v{version}: manifest entry {entry.path!r} points outside "
                                f"the dataset directory {self._path(name)}")
        return manifest

    def verify(self, name: str, manifest: Manifest) -> None:
        """Check every file's checksum against the manifest; name the first corrupt one."""
        for entry in manifest.files:
            path = self._path(name, entry.path)
            try:
                data = self.fs.cat_file(path)
            except FileNotFoundError:
                raise RsirError(f"dataset {name!r} v{manifest.version}: file missing: {path}") from None
            if _sha256(data) != entry.sha256:
                raise RsirError(f"dataset {name!r} v{manifest.version}: checksum mismatch in {path} "
                                f"(file is corrupt or was modified)")

    def scan(self, name: str, version: int | None = None, iterations: list[int] | None = None,
             verify: bool = True) -> pl.LazyFrame:
        """Lazily read the sequences of a version, with an `iteration` column.

        Only files named by the manifest are read (never a directory glob), so orphaned or
        half-copied partitions are invisible. `iterations` prunes partitions before any I/O.
        """
        manifest = self.manifest(name, version)
        if verify:
            self.verify(name, manifest)
        parts = [p for p in manifest.partitions if iterations is None or p.iteration in iterations]
        if not parts:
            empty = pl.from_arrow(SEQUENCE_SCHEMA.empty_table())
            return empty.lazy().with_columns(pl.lit(0, dtype=pl.Int32).alias("iteration"))
        frames = [
            pl.scan_parquet(self._url(name, p.path))
            .with_columns(pl.lit(p.iteration, dtype=pl.Int32).alias("iteration"))
            for p in parts
        ]
        return pl.concat(frames, how="vertical")

    def load(self, name: str, version: int | None = None, verify: bool = True) -> pl.DataFrame:
        return self.scan(name, version, verify=verify).collect()

    def items(self, name: str, version: int | None = None) -> pl.DataFrame:
        manifest = self.manifest(name, version)
        return pl.read_parquet(self._url(name, manifest.items.path))

    # ---------------------------------------------------------------- writing
    def create(self, name: str, sequences: pa.Table, items: pa.Table, source: dict[str, Any],
               stats: dict[str, Any] | None = None, replace: bool = False) -> Manifest:
        """Publish version 0 of a new dataset (or replace an existing one with `replace`).
        If it cannot be written, the workspace is left as it was (a replaced dataset included)."""
        check_name(name)
        if self.versions(name) and not replace:
            raise RsirError(f"dataset {name!r} already exists in {self.root}; pass --force to replace it")
        with self._staged(name, 0) as stage:
            with _io(name, self._staging(0)):
                items_entry = self._stage_file(stage, "items.parquet", items)
                parts, part_digests = self._stage_partition(stage, 0, sequences)
            manifest = Manifest(
                dataset=name, version=0, parent_version=None, num_items=items.num_rows,
                items=items_entry, partitions=parts,
                digest=chain_digest(table_digest(items), part_digests),
                created_at=datetime.now(timezone.utc).isoformat(), source=source, stats=stats or {},
            )
            self._install(stage, name, manifest)
            return manifest

    def append(self, name: str, parent: Manifest, sequences: pa.Table, generation: dict[str, Any],
               stats: dict[str, Any] | None = None) -> Manifest:
        """Publish version parent+1 = parent ∪ one new partition (iteration parent+1)."""
        version = parent.version + 1
        if version in self.versions(name):
            raise RsirError(f"dataset {name!r} already has version {version}")
        with self._staged(name, version) as stage:
            with _io(name, self._staging(version)):
                parts, part_digests = self._stage_partition(stage, version, sequences)
            manifest = Manifest(
                dataset=name, version=version, parent_version=parent.version,
                num_items=parent.num_items, items=parent.items,
                partitions=[*parent.partitions, *parts],
                digest=chain_digest(parent.digest, part_digests),
                created_at=datetime.now(timezone.utc).isoformat(), source=parent.source,
                generation=generation, stats=stats or {},
            )
            # A crashed earlier attempt may have left an uncommitted partition: replace it.
            partition = self._path(name, "sequences", f"iteration={version}")
            with _io(name, f"removing the uncommitted partition {partition}"):
                if self.fs.exists(partition):
                    self.fs.rm(partition, recursive=True)
            try:
                self._publish(stage, name)
                self._commit(name, manifest)
            except RsirError:  # a reported disk failure: invisible without a manifest, but leave nothing
                self._discard(partition)
                raise
            return manifest

    def fork(self, source: str, name: str) -> Manifest:
        """Start dataset `name` whose version 0 holds exactly the content of `source` v0
        (same files, same digest). A run works on its own fork, so runs with different
        parameters never write into each other's lineage. Idempotent: an existing fork of the
        same content is returned."""
        check_name(name)
        src = self.manifest(source, 0)
        if self.versions(name):
            existing = self.manifest(name, 0)
            if existing.digest != src.digest:
                raise RsirError(f"dataset {name!r} exists with other content (digest {existing.digest[:12]}) "
                                f"than {source!r} v0 ({src.digest[:12]})")
            return existing
        self.verify(source, src)
        with self._staged(name, 0) as stage:
            with _io(name, self._staging(0)):
                for entry in src.files:
                    target = stage / entry.path
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(self.fs.cat_file(self._path(source, entry.path)))
            manifest = src.model_copy(update={
                "dataset": name, "version": 0, "parent_version": None,
                "created_at": datetime.now(timezone.utc).isoformat(),
                "source": {**src.source, "forked_from": {"dataset": source, "version": 0}},
            })
            self._install(stage, name, manifest)
            return manifest

    def _staging(self, version: int) -> str:
        return f"staging version {version} in {self.staging}"

    @contextmanager
    def _staged(self, name: str, version: int) -> Iterator[Path]:
        """A fresh staging folder, removed afterwards whatever happens."""
        with _io(name, self._staging(version)):
            stage = self.staging / f"stage-{uuid.uuid4().hex}"
            stage.mkdir(parents=True)
        try:
            yield stage
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def _install(self, stage: Path, name: str, manifest: Manifest) -> None:
        """Publish and commit version 0 of `name`. Whatever is there (a dataset being replaced,
        or the leftovers of a crashed attempt) is set aside first, restored if the new version
        cannot be written, and removed once it is committed."""
        target = self._path(name)
        aside = None
        if self.fs.exists(target):
            # Not a valid dataset name, so names() never lists it.
            aside = f"{self._root_path}/.replaced-{name}-{uuid.uuid4().hex}"
            with _io(name, f"moving the previous files aside to {aside}"):
                self.fs.mv(target, aside, recursive=True)
        try:
            self._publish(stage, name)
            self._commit(name, manifest)
        except RsirError:  # a reported disk failure: back to the state before
            self._discard(target)
            if aside is not None:
                with _io(name, f"restoring the previous files from {aside}"):
                    self.fs.mv(aside, target, recursive=True)
            raise
        if aside is not None:
            self._discard(aside)

    def _discard(self, path: str) -> None:
        """Best-effort removal of files no manifest names (invisible either way)."""
        try:
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)
        except OSError:
            pass

    def _stage_file(self, stage: Path, rel: str, table: pa.Table) -> FileEntry:
        target = stage / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, target, compression="zstd")
        data = target.read_bytes()
        return FileEntry(path=rel, rows=table.num_rows, bytes=len(data), sha256=_sha256(data))

    def _stage_partition(self, stage: Path, iteration: int, sequences: pa.Table
                         ) -> tuple[list[PartitionEntry], list[str]]:
        sequences = sequences.select(SEQUENCE_SCHEMA.names).cast(SEQUENCE_SCHEMA)
        n_buckets = max(1, -(-sequences.num_rows // ROWS_PER_BUCKET))
        seq_ids = sequences.column("seq_id").to_numpy()
        entries, digests = [], []
        for b in range(n_buckets):
            part = sequences.filter(pa.array(seq_ids % n_buckets == b)) if n_buckets > 1 else sequences
            digest = table_digest(part)
            rel = f"sequences/iteration={iteration}/bucket={b}/part-{digest[:16]}.parquet"
            entry = self._stage_file(stage, rel, part)
            entries.append(PartitionEntry(**entry.model_dump(), iteration=iteration, bucket=b))
            digests.append(digest)
        return entries, digests

    def _publish(self, stage: Path, name: str) -> None:
        """Move staged files under the dataset root (not yet visible: no manifest names them)."""
        with _io(name, f"copying staged files into {self._path(name)}"):
            for src in sorted(p for p in stage.rglob("*") if p.is_file()):
                rel = src.relative_to(stage).as_posix()
                dst = self._path(name, rel)
                self.fs.makedirs(dst.rsplit("/", 1)[0], exist_ok=True)
                if self.is_local:
                    shutil.move(src, dst)  # a rename on one filesystem, a copy across devices
                else:
                    self.fs.put_file(str(src), dst)

    def _commit(self, name: str, manifest: Manifest) -> None:
        """The atomic commit point of a version."""
        mdir = self._path(name, "manifests")
        final = f"{mdir}/v{manifest.version:05d}.json"
        body = manifest.model_dump_json(indent=2).encode()
        with _io(name, f"committing the manifest of version {manifest.version}"):
            self.fs.makedirs(mdir, exist_ok=True)
            if not self.is_local:
                self.fs.pipe_file(final, body)
                return
            with atomic_path(Path(final)) as tmp, open(tmp, "wb") as fh:
                fh.write(body)
                fh.flush()
                os.fsync(fh.fileno())  # durable before the rename makes the version visible


def dataset_store(ws: Workspace) -> DatasetStore:
    """The store of a workspace's datasets."""
    return DatasetStore(ws.datasets, ws.staging)
