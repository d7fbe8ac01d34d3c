"""Versioned, hive-partitioned Parquet datasets behind one interface (local paths or fsspec URIs).

Layout of a dataset root::

    <root>/<name>/items-<sha256>-<token>.parquet
    <root>/<name>/sequences/iteration=<j>/bucket=<b>/part-<sha256>-<token>.parquet
    <root>/<name>/manifests/v00000.json, v00001.json, ...           (lineage 0)
    <root>/<name>/manifests/lineage-00001/v00000.json, ...           (after one --force)

Writes are staged in a local folder outside every dataset root, copied into place under names
unique to the writer (the file's SHA-256 and the writer's token), made durable, and become
visible only when the manifest is committed. The commit is put-if-absent: an exclusive hard link
locally, a conditional PutObject (If-None-Match: *) on S3. A crash therefore leaves either the
previous version or the complete new one, and of two writers of one version exactly one commits.
"""

from __future__ import annotations

import errno
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

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from pydantic import ValidationError

from core.errors import RsirError
from core.hashing import json_digest
from core.workspace import Workspace
from storage.files import exclusive_create, filesystem, fsync_path, stream_sha256
from storage.manifest import (
    FileEntry,
    GenerationRecord,
    ItemTable,
    Manifest,
    PartitionEntry,
    VersionStats,
    chain_digest,
)

SEQUENCE_SCHEMA = pa.schema([
    pa.field("seq_id", pa.int64(), nullable=False),
    pa.field("user_id", pa.string()),
    pa.field("items", pa.list_(pa.int32()), nullable=False),
    pa.field("origin", pa.string(), nullable=False),  # "real" | "synthetic"
    pa.field("parent_seq_id", pa.int64()),  # source sequence of a synthetic one
])
ROWS_PER_BUCKET = 250_000
_MANIFEST_RE = re.compile(r"v(\d{5})\.json")
_LINEAGE_RE = re.compile(r"lineage-(\d{5})")
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
    except FileExistsError:  # a put-if-absent commit that another writer won: the caller decides
        raise
    except OSError as exc:
        raise RsirError(f"dataset {name!r}: {operation} failed: {_one_line(exc)}") from None


def table_digest(table: pa.Table) -> str:
    """Digest of the logical content (independent of Parquet encoding details)."""
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table.combine_chunks())
    return hashlib.sha256(sink.getvalue()).hexdigest()


def items_digest(items: pa.Table | pl.DataFrame) -> str:
    """The identity of an item table (`item_id` 1..N, `raw_id`): SHA-256 (64 hex digits) of the
    raw ids in `item_id` order, each as its text (so int 7 and str "7" are one id, as an import
    with either id type would write it), over canonical JSON. Titles and other metadata do not
    count: a model knows items only by id. Raises RsirError for a table without both columns."""
    frame = items if isinstance(items, pl.DataFrame) else pl.from_arrow(items)
    missing = [c for c in ("item_id", "raw_id") if c not in frame.columns]
    if missing:
        raise RsirError(f"item table lacks column(s) {', '.join(map(repr, missing))} (it needs item_id and raw_id)")
    return json_digest(frame.sort("item_id")["raw_id"].cast(pl.String).to_list())


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class DatasetStore:
    """All datasets under one root URI, e.g. ``/home/me/workspace/datasets`` or ``memory://ws``."""

    def __init__(self, root: str | Path, staging: str | Path):
        self.root = str(root).rstrip("/")
        self.fs, self._root_path = filesystem(self.root)
        self.staging = Path(staging)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self._real_root = os.path.realpath(self._root_path) if self.is_local else self._root_path

    # ---------------------------------------------------------------- paths
    def _path(self, name: str, *parts: str) -> str:
        # Every access to a dataset goes through here: a name like '../x' never leaves the root,
        # and a local dataset directory never resolves into another dataset's (_own_directory).
        path = "/".join([self._root_path, check_name(name), *parts])
        if self.is_local:
            self._own_directory(name)
        return path

    def _own_directory(self, name: str) -> str:
        """The real path of a local dataset's directory. A directory that is a link into another
        dataset of this root is refused: a run writing through it would add versions to that
        dataset (the base dataset is never modified). A link elsewhere (another disk) is fine."""
        own = os.path.join(self._real_root, name)
        real = os.path.realpath(own)
        if real != own and (real + os.sep).startswith(self._real_root + os.sep):
            raise RsirError(f"dataset {name!r}: its directory {own} resolves to {real}, inside another dataset "
                            f"of {self.root}; refusing to read or write through it (remove the link)")
        return real

    def _check_write(self, name: str, path: str) -> None:
        """A local write's real path must lie inside its dataset's real directory (a link inside
        the dataset, e.g. `sequences`, must not lead a write into another one)."""
        if not self.is_local:
            return
        own = self._own_directory(name)
        real = os.path.realpath(path)
        if not real.startswith(own + os.sep):
            raise RsirError(f"dataset {name!r}: writing {path} would write {real}, outside the dataset's "
                            f"directory {own}; refusing (a symbolic link inside the dataset?)")

    def _frame(self, name: str, rel: str) -> pl.LazyFrame:
        """One Parquet file of a dataset: scanned lazily locally; through fsspec elsewhere, read
        with ranged requests (polars cannot open fsspec-only protocols such as memory://)."""
        path = self._path(name, rel)
        if self.is_local:
            return pl.scan_parquet(path)
        with self.fs.open(path, "rb") as fh:
            return pl.from_arrow(pq.read_table(fh)).lazy()

    def _file_sha256(self, path: str) -> str:
        with self.fs.open(path, "rb") as fh:
            return stream_sha256(fh)

    # ---------------------------------------------------------------- reading
    def names(self) -> list[str]:
        """Every dataset of the root: a directory with committed versions, and one that cannot be
        read (its `manifests` is not a readable directory, its directory links into another
        dataset), so that `rsir data list` reports it on its own line instead of omitting it.
        A directory without any committed version (a dataset set aside) is not listed."""
        if not self.fs.exists(self._root_path):
            return []
        found = []
        for entry in self.fs.ls(self._root_path, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if not valid_name(name):
                continue
            try:
                if self.versions(name):
                    found.append(name)
            except RsirError:  # unreadable: listed, and `manifest` says why
                found.append(name)
        return sorted(found)

    def lineage(self, name: str) -> int | None:
        """The dataset's current lineage: 0 for its first import, one more per replacement
        (`--force`); the highest one whose version 0 is committed. None: no such dataset.
        RsirError when the manifests cannot be listed (not a directory, no permission)."""
        mdir = self._path(name, "manifests")
        try:
            if not self.fs.exists(mdir):
                return None
            if not self.fs.isdir(mdir):
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", mdir)
            found = []
            for entry in self.fs.ls(mdir, detail=False):
                base = entry.rstrip("/").rsplit("/", 1)[-1]
                m = _LINEAGE_RE.fullmatch(base)
                if base == "v00000.json":
                    found.append(0)
                elif m and self.fs.exists(f"{entry.rstrip('/')}/v00000.json"):
                    found.append(int(m.group(1)))
        except OSError as exc:
            raise RsirError(f"dataset {name!r}: cannot list its manifests {mdir}: {exc.strerror or _one_line(exc)}") from None
        return max(found) if found else None

    def versions(self, name: str) -> list[int]:
        return self._current(name)[1]

    def _current(self, name: str) -> tuple[int, list[int]]:
        """The current lineage and its committed versions (0 and [] for no dataset)."""
        lineage = self.lineage(name)
        if lineage is None:
            return 0, []
        return lineage, self._listed_versions(self._path(name, _manifest_dir(lineage)))

    def _listed_versions(self, folder: str) -> list[int]:
        out = []
        try:
            entries = self.fs.ls(folder, detail=False)
        except FileNotFoundError:  # a dropped lineage: no folder left (object stores have none)
            return []
        for entry in entries:
            m = _MANIFEST_RE.fullmatch(entry.rsplit("/", 1)[-1])
            if m:
                out.append(int(m.group(1)))
        return sorted(out)

    def manifest(self, name: str, version: int | None = None) -> Manifest:
        lineage, versions = self._current(name)
        if not versions:
            known = ", ".join(self.names()) or "none"
            raise RsirError(f"unknown dataset {name!r} in {self.root} (known: {known}); "
                            f"fetch or import it first, e.g. `rsir data fetch ml-100k`")
        if version is None:
            version = versions[-1]
        if version not in versions:
            raise RsirError(f"dataset {name!r} has no version {version} (versions: {versions})")
        return self.manifest_at(name, lineage, version)

    def manifest_at(self, name: str, lineage: int, version: int) -> Manifest:
        """The manifest of one version of one lineage, checked to name files inside the dataset."""
        path = self._path(name, _manifest_dir(lineage), f"v{version:05d}.json")
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
                actual = self._file_sha256(path)
            except FileNotFoundError:
                raise RsirError(f"dataset {name!r} v{manifest.version}: file missing: {path}") from None
            if actual != entry.sha256:
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
            self._frame(name, p.path)
            .with_columns(pl.lit(p.iteration, dtype=pl.Int32).alias("iteration"))
            for p in parts
        ]
        return pl.concat(frames, how="vertical")

    def load(self, name: str, version: int | None = None, verify: bool = True) -> pl.DataFrame:
        return self.scan(name, version, verify=verify).collect()

    def items(self, name: str, version: int | None = None) -> pl.DataFrame:
        manifest = self.manifest(name, version)
        return self._frame(name, manifest.items.path).collect()

    def item_table(self, manifest: Manifest) -> ItemTable:
        """The identity of a version's item table, what a checkpoint trained on it records. The
        manifest carries the digest (computed once, when version 0 was written); a manifest
        written before digests were recorded has none, and the item file is read for it."""
        digest = manifest.items_digest
        if digest is None:
            digest = items_digest(self._frame(manifest.dataset, manifest.items.path).collect())
        return ItemTable(manifest.dataset, manifest.version, manifest.num_items, digest)

    # ---------------------------------------------------------------- writing
    def create(self, name: str, sequences: pa.Table, items: pa.Table, source: dict[str, Any],
               stats: VersionStats | None = None, replace: bool = False) -> Manifest:
        """Publish version 0 of a new dataset, or with `replace` of a new lineage of an existing
        one: readers see the old lineage until the new version 0 is committed, then only the new
        one. If it cannot be written, the workspace is left as it was."""
        check_name(name)
        table_id = items_digest(items)  # a malformed item table fails here, before anything is staged
        current = self.lineage(name)
        if current is not None and not replace:
            raise RsirError(f"dataset {name!r} already exists in {self.root}; pass --force to replace it")
        lineage = 0 if current is None else current + 1
        with self._staged(name, 0) as stage:
            with _io(name, self._staging(0)):
                items_entry = stage.file("items", items)
                parts, part_digests = stage.partition(0, sequences)
            manifest = Manifest(
                dataset=name, version=0, parent_version=None, lineage=lineage, num_items=items.num_rows,
                items=items_entry, items_digest=table_id, partitions=parts,
                digest=chain_digest(table_digest(items), part_digests),
                created_at=datetime.now(timezone.utc).isoformat(), source=source, stats=stats or VersionStats(),
            )
            committed = self._write(stage, name, manifest)
        if current is not None:
            self._drop_lineages(name, below=committed.lineage)
        return committed

    def append(self, name: str, parent: Manifest, sequences: pa.Table, generation: GenerationRecord,
               stats: VersionStats | None = None) -> Manifest:
        """Publish version parent+1 = parent ∪ one new partition (iteration parent+1). A version
        that exists already is returned when its generation has the same `key` (the same inputs,
        committed by a concurrent writer after the caller looked), else refused."""
        version = parent.version + 1
        generation = GenerationRecord.model_validate(generation)
        self._check_current(name, parent.lineage, version)
        if version in self.versions(name):
            existing = self.manifest(name, version)
            if generation.key is not None and existing.generation is not None and existing.generation.key == generation.key:
                return existing
            raise RsirError(f"dataset {name!r} already has version {version}")
        with self._staged(name, version) as stage:
            with _io(name, self._staging(version)):
                parts, part_digests = stage.partition(version, sequences)
            manifest = Manifest(
                dataset=name, version=version, parent_version=parent.version, lineage=parent.lineage,
                num_items=parent.num_items, items=parent.items, items_digest=self.item_table(parent).digest,
                partitions=[*parent.partitions, *parts],
                digest=chain_digest(parent.digest, part_digests),
                created_at=datetime.now(timezone.utc).isoformat(), source=parent.source,
                generation=generation, stats=stats or VersionStats(),
            )
            committed = self._write(stage, name, manifest)
        self._check_current(name, parent.lineage, version)
        return committed

    def append_digest(self, parent: Manifest, sequences: pa.Table) -> str:
        """The digest `append(name, parent, sequences, ...)` would commit, computed without
        writing anything: what checks sequences brought from elsewhere (an archive) before they
        become a version."""
        return chain_digest(parent.digest, [table_digest(part) for part in _buckets(sequences)])

    def fork(self, source: str, name: str, version: int = 0) -> Manifest:
        """Start dataset `name` whose version 0 holds exactly the content of `source` v`version`
        (same bytes, same digest; the partitions keep their iteration labels). A run works on its
        own fork, so runs with different parameters never write into each other's lineage; a fork
        of a later version is a scratch copy of D_k (an adaptive-fidelity candidate: what it
        appends has the digest the same append to `source` would have). Idempotent: an existing
        fork of the same content is returned."""
        check_name(name)
        src = self.manifest(source, version)
        if self.versions(name):
            existing = self.manifest(name, 0)
            if existing.digest != src.digest:
                raise RsirError(f"dataset {name!r} exists with other content (digest {existing.digest[:12]}) "
                                f"than {source!r} v{src.version} ({src.digest[:12]})")
            return existing
        self.verify(source, src)
        with self._staged(name, 0) as stage:
            with _io(name, self._staging(0)):
                items = stage.copy("items", self.fs.cat_file(self._path(source, src.items.path)), src.items)
                parts = [PartitionEntry(**stage.copy(_partition_dir(p.iteration, p.bucket) + "/part",
                                                     self.fs.cat_file(self._path(source, p.path)), p).model_dump(),
                                        iteration=p.iteration, bucket=p.bucket) for p in src.partitions]
            manifest = src.model_copy(update={
                "dataset": name, "version": 0, "parent_version": None, "lineage": 0, "items": items,
                "items_digest": self.item_table(src).digest,  # recorded now if `source` predates digests
                "partitions": parts, "created_at": datetime.now(timezone.utc).isoformat(),
                "source": {**src.source, "forked_from": {"dataset": source, "version": src.version}},
            })
            return self._write(stage, name, manifest)

    def _staging(self, version: int) -> str:
        return f"staging version {version} in {self.staging}"

    @contextmanager
    def _staged(self, name: str, version: int) -> Iterator["_Stage"]:
        """A fresh staging folder, removed afterwards whatever happens."""
        with _io(name, self._staging(version)):
            token = uuid.uuid4().hex[:12]
            folder = self.staging / f"stage-{token}"
            folder.mkdir(parents=True)
        try:
            yield _Stage(folder, token)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _write(self, stage: "_Stage", name: str, manifest: Manifest) -> Manifest:
        """Publish the staged files and commit the manifest, put-if-absent. Of concurrent writers
        of one version exactly one commits; another whose content is identical (same digest) gets
        that commit back, one with other content a one-line error. A writer that does not commit
        removes the files it published (their names carry its token: no one else's)."""
        published: list[str] = []
        try:
            self._publish(stage.folder, name, published)
            self._commit(name, manifest)
            return manifest
        except FileExistsError:
            self._discard(published)
            try:
                winner = self.manifest_at(name, manifest.lineage, manifest.version)
            except RsirError:  # the winner's lineage was dropped by a later --force before we could read it
                raise RsirError(f"dataset {name!r} version {manifest.version} was committed concurrently by "
                                f"another writer, and that commit was itself replaced (--force) before this "
                                f"write could compare contents; this write was discarded") from None
            if winner.digest == manifest.digest:
                return winner
            raise RsirError(f"dataset {name!r} version {manifest.version} was committed concurrently by another "
                            f"writer with other content (digest {winner.digest[:12]}, this write "
                            f"{manifest.digest[:12]}); this write was discarded") from None
        except (RsirError, OSError):  # a reported disk failure or a crash: invisible, and nothing left
            self._discard(published)
            raise

    def _check_current(self, name: str, lineage: int, version: int) -> None:
        if self.lineage(name) != lineage:
            raise RsirError(f"dataset {name!r} was replaced (--force) while version {version} of its previous "
                            f"content was being written; that version is not part of the new dataset")

    def _drop_lineages(self, name: str, below: int) -> None:
        """Best-effort removal of replaced lineages: their manifests first (so they are no longer
        versions), then the files they name (unique to them: every file name carries a writer's
        token). Leftovers are invisible and never read."""
        for lineage in range(below):
            folder = self._path(name, _manifest_dir(lineage))
            for version in self._listed_versions(folder):
                try:
                    old = self.manifest_at(name, lineage, version)
                except RsirError:
                    old = None
                self._discard([f"{folder}/v{version:05d}.json"])
                if old is not None:
                    self._discard([self._path(name, f.path) for f in old.files])

    def _discard(self, paths: list[str]) -> None:
        """Best-effort removal of files no committed manifest names (invisible either way)."""
        for path in paths:
            try:
                self.fs.rm_file(path)
            except OSError:
                pass

    def _publish(self, stage: Path, name: str, published: list[str]) -> None:
        """Move staged files under the dataset root (not yet visible: no manifest names them)."""
        with _io(name, f"copying staged files into {self._path(name)}"):
            for src in sorted(p for p in stage.rglob("*") if p.is_file()):
                dst = self._path(name, src.relative_to(stage).as_posix())
                self._check_write(name, dst)
                self.fs.makedirs(dst.rsplit("/", 1)[0], exist_ok=True)
                published.append(dst)
                if self.is_local:
                    shutil.move(src, dst)  # a rename on one filesystem, a copy across devices
                else:
                    self.fs.put_file(str(src), dst)

    def _commit(self, name: str, manifest: Manifest) -> None:
        """The atomic commit point of a version: the manifest is created only if absent
        (FileExistsError otherwise). Data files are durable before it."""
        final = self._path(name, _manifest_dir(manifest.lineage), f"v{manifest.version:05d}.json")
        body = manifest.model_dump_json(indent=2).encode()
        self._check_write(name, final)
        with _io(name, f"committing the manifest of version {manifest.version}"):
            self.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
            if not self.is_local:  # S3: a conditional PutObject (If-None-Match: *); memory: exclusive
                with self.fs.open(final, "xb") as fh:
                    fh.write(body)
                return
            for entry in _new_files(manifest):
                fsync_path(Path(self._path(name, entry.path)))
            exclusive_create(Path(final), body)


class _Stage:
    """A writer's staging folder. Every file it stages is named by the SHA-256 of its bytes and
    the writer's token, so two writers never publish to the same path."""

    def __init__(self, folder: Path, token: str):
        self.folder, self.token = folder, token

    def file(self, stem: str, table: pa.Table) -> FileEntry:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        return self.copy(stem, sink.getvalue().to_pybytes(), rows=table.num_rows)

    def copy(self, stem: str, data: bytes, like: FileEntry | None = None, rows: int | None = None) -> FileEntry:
        digest = _sha256(data)
        if like is not None and like.sha256 != digest:
            raise RsirError(f"{like.path}: checksum mismatch while copying (file is corrupt or was modified)")
        rel = f"{stem}-{digest[:16]}-{self.token}.parquet"
        target = self.folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return FileEntry(path=rel, rows=like.rows if like is not None else rows, bytes=len(data), sha256=digest)

    def partition(self, iteration: int, sequences: pa.Table) -> tuple[list[PartitionEntry], list[str]]:
        entries, digests = [], []
        for b, part in enumerate(_buckets(sequences)):
            entry = self.file(_partition_dir(iteration, b) + "/part", part)
            entries.append(PartitionEntry(**entry.model_dump(), iteration=iteration, bucket=b))
            digests.append(table_digest(part))
        return entries, digests


def _buckets(sequences: pa.Table) -> list[pa.Table]:
    """A partition's sequences in the schema, split into buckets of at most ROWS_PER_BUCKET rows
    by seq_id (the files one iteration's partition is written as)."""
    sequences = sequences.select(SEQUENCE_SCHEMA.names).cast(SEQUENCE_SCHEMA)
    n_buckets = max(1, -(-sequences.num_rows // ROWS_PER_BUCKET))
    if n_buckets == 1:
        return [sequences]
    seq_ids = sequences.column("seq_id").to_numpy()
    return [sequences.filter(pa.array(seq_ids % n_buckets == b)) for b in range(n_buckets)]


def _partition_dir(iteration: int, bucket: int) -> str:
    return f"sequences/iteration={iteration}/bucket={bucket}"


def _manifest_dir(lineage: int) -> str:
    """Lineage 0 (the first import) keeps the original layout; a replacement gets its own folder."""
    return "manifests" if lineage == 0 else f"manifests/lineage-{lineage:05d}"


def _new_files(manifest: Manifest) -> list[FileEntry]:
    """The files a version adds to its parent's."""
    return manifest.files if manifest.parent_version is None else \
        [p for p in manifest.partitions if p.iteration == manifest.version]


def dataset_store(ws: Workspace) -> DatasetStore:
    """The store of a workspace's datasets."""
    return DatasetStore(ws.datasets, ws.staging)
