"""storage.dataset.DatasetStore: versions, digests, integrity, crash safety, fsspec roots."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import fsspec
import polars as pl
import pyarrow as pa
import pytest

from core.errors import RsirError
from storage.dataset import SEQUENCE_SCHEMA, DatasetStore, table_digest
from storage.manifest import ItemTable, Manifest

NAME = "toy"


def seq_table(rows: list[tuple[int, str | None, list[int], str, int | None]]) -> pa.Table:
    seq_id, user, items, origin, parent = zip(*rows) if rows else ([], [], [], [], [])
    return pa.table({"seq_id": list(seq_id), "user_id": list(user), "items": list(items),
                     "origin": list(origin), "parent_seq_id": list(parent)}, schema=SEQUENCE_SCHEMA)


BASE = seq_table([
    (1, "u1", [1, 2, 3, 4], "real", None),
    (2, "u2", [2, 3, 5], "real", None),
    (3, "u3", [5, 4, 3, 2, 1], "real", None),
])
NEW = seq_table([
    (10, None, [1, 2, 5], "synthetic", 1),
    (11, None, [3, 3, 4, 1], "synthetic", 3),
])
ITEMS = pa.table({"item_id": pa.array([1, 2, 3, 4, 5], pa.int32()),
                  "raw_id": ["a", "b", "c", "d", "e"]})


def store_at(tmp_path: Path, sub: str = "") -> DatasetStore:
    base = tmp_path / sub if sub else tmp_path
    return DatasetStore(root=base / "datasets", staging=base / "staging")


def rows_of(df: pl.DataFrame) -> list[tuple]:
    return sorted((r["seq_id"], r["user_id"], tuple(r["items"]), r["origin"], r["parent_seq_id"], r["iteration"])
                  for r in df.iter_rows(named=True))


def expected(table: pa.Table, iteration: int) -> list[tuple]:
    return sorted((r["seq_id"], r["user_id"], tuple(r["items"]), r["origin"], r["parent_seq_id"], iteration)
                  for r in table.to_pylist())


def all_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- create / load
def test_create_and_load(tmp_path):
    store = store_at(tmp_path)
    assert store.names() == [] and store.versions(NAME) == []
    m = store.create(NAME, BASE, ITEMS, source={"kind": "test"}, stats={"users": 3})
    assert (m.dataset, m.version, m.parent_version, m.num_items) == (NAME, 0, None, 5)
    assert m.num_sequences == 3 and m.source == {"kind": "test"} and m.stats.model_dump() == {"users": 3}
    assert store.names() == [NAME] and store.versions(NAME) == [0]
    df = store.load(NAME)
    assert rows_of(df) == expected(BASE, 0)
    assert df.schema["items"] == pl.List(pl.Int32) and df.schema["iteration"] == pl.Int32
    assert store.load(NAME, 0).equals(df)
    assert store.manifest(NAME) == m
    items = store.items(NAME)
    assert items["item_id"].to_list() == [1, 2, 3, 4, 5] and items["raw_id"].to_list() == list("abcde")
    # staging is outside the dataset root and left empty
    root, staging = tmp_path / "datasets", tmp_path / "staging"
    assert not staging.resolve().is_relative_to(root.resolve())
    assert not staging.exists() or list(staging.iterdir()) == []
    files = all_files(root)
    assert any(f.startswith(f"{NAME}/items-") for f in files) and f"{NAME}/manifests/v00000.json" in files
    assert all(f.startswith(f"{NAME}/") for f in files)
    assert not any("stage" in f or f.endswith(".tmp") for f in files)
    assert sum(f.startswith(f"{NAME}/sequences/iteration=0/") for f in files) == 1


def test_create_existing_requires_replace(tmp_path):
    store = store_at(tmp_path)
    m0 = store.create(NAME, BASE, ITEMS, source={})
    store.append(NAME, m0, NEW, generation={})
    with pytest.raises(RsirError, match=NAME):
        store.create(NAME, NEW, ITEMS, source={})
    assert store.versions(NAME) == [0, 1] and rows_of(store.load(NAME, 0)) == expected(BASE, 0)
    m = store.create(NAME, NEW, ITEMS, source={}, replace=True)
    assert store.versions(NAME) == [0]  # the old history is gone
    assert m.version == 0 and rows_of(store.load(NAME)) == expected(NEW, 0)


@pytest.mark.parametrize("bad", ["", "../x", "a/b", ".hidden", "sp ace"])
def test_invalid_names(tmp_path, bad):
    with pytest.raises(RsirError):
        store_at(tmp_path).create(bad, BASE, ITEMS, source={})


# --------------------------------------------------------------------------- append / scan
def test_append_is_union_and_keeps_old_version(tmp_path):
    store = store_at(tmp_path)
    m0 = store.create(NAME, BASE, ITEMS, source={"kind": "test"})
    m1 = store.append(NAME, m0, NEW, generation={"tau": 3}, stats={"kept": 2})
    assert (m1.version, m1.parent_version, m1.num_items) == (1, 0, 5)
    assert m1.generation.model_dump() == {"tau": 3} and m1.source == {"kind": "test"} and m1.items == m0.items
    assert m1.partitions[:len(m0.partitions)] == m0.partitions
    assert m1.num_sequences == 5
    assert store.versions(NAME) == [0, 1]
    assert rows_of(store.load(NAME)) == sorted(expected(BASE, 0) + expected(NEW, 1))
    assert rows_of(store.load(NAME, 1)) == sorted(expected(BASE, 0) + expected(NEW, 1))
    assert rows_of(store.load(NAME, 0)) == expected(BASE, 0)  # version 0 unchanged
    assert rows_of(store.scan(NAME, 1, iterations=[1]).collect()) == expected(NEW, 1)
    assert rows_of(store.scan(NAME, 1, iterations=[0]).collect()) == expected(BASE, 0)
    assert rows_of(store.scan(NAME, 0, iterations=[1]).collect()) == []
    assert store.scan(NAME, 0, iterations=[1]).collect().columns == store.load(NAME).columns
    # appending the same version twice is refused, unless it is the same inputs (generation key)
    with pytest.raises(RsirError, match="version 1"):
        store.append(NAME, m0, NEW, generation={})
    with pytest.raises(RsirError, match="version 1"):
        store.append(NAME, m0, NEW, generation={"key": "other inputs"})
    keyed = store.create("keyed", BASE, ITEMS, source={})
    first = store.append("keyed", keyed, NEW, generation={"key": "k"})
    assert store.append("keyed", keyed, NEW, generation={"key": "k"}) == first  # a writer that looked too early
    assert store.versions("keyed") == [0, 1]
    m2 = store.append(NAME, m1, seq_table([(20, None, [4, 5], "synthetic", 2)]), generation={})
    assert store.versions(NAME) == [0, 1, 2]
    assert rows_of(store.scan(NAME, 2, iterations=[2]).collect()) == [(20, None, (4, 5), "synthetic", 2, 2)]
    assert len(store.load(NAME, 2)) == 6 and m2.digest not in (m0.digest, m1.digest)


def test_append_empty_partition(tmp_path):
    store = store_at(tmp_path)
    m0 = store.create(NAME, BASE, ITEMS, source={})
    m1 = store.append(NAME, m0, seq_table([]), generation={})
    assert rows_of(store.load(NAME, 1)) == expected(BASE, 0)
    assert m1.digest != m0.digest


def test_digests_are_deterministic_and_content_addressed(tmp_path):
    a, b = store_at(tmp_path, "a"), store_at(tmp_path, "b")
    ma0 = a.create(NAME, BASE, ITEMS, source={"x": 1})
    mb0 = b.create(NAME, BASE, ITEMS, source={"y": 2})
    assert ma0.digest == mb0.digest and len(ma0.digest) == 64
    assert [p.sha256 for p in ma0.partitions] == [p.sha256 for p in mb0.partitions]
    ma1 = a.append(NAME, ma0, NEW, generation={})
    mb1 = b.append(NAME, mb0, NEW, generation={"other": "metadata"})
    assert ma1.digest == mb1.digest != ma0.digest
    # different content -> different digest, in the sequences ...
    changed = BASE.set_column(2, "items", pa.array([[1, 2, 3, 4], [2, 3, 5], [5, 4, 3, 2, 2]],
                                                   pa.list_(pa.int32())))
    c = store_at(tmp_path, "c")
    assert c.create(NAME, changed, ITEMS, source={}).digest != ma0.digest
    # ... in the items table ...
    items2 = ITEMS.set_column(1, "raw_id", pa.array(["a", "b", "c", "d", "E"]))
    assert store_at(tmp_path, "d").create(NAME, BASE, items2, source={}).digest != ma0.digest
    # ... and in an appended partition, or in its parent
    mc0 = c.manifest(NAME)
    assert c.append(NAME, mc0, NEW, generation={}).digest != ma1.digest
    other_new = NEW.set_column(0, "seq_id", pa.array([10, 12], pa.int64()))
    assert store_at(tmp_path, "e").append(
        NAME, store_at(tmp_path, "e").create(NAME, BASE, ITEMS, source={}), other_new, generation={}
    ).digest != ma1.digest
    assert table_digest(BASE) == table_digest(BASE.select(BASE.column_names))


def test_item_table_digest_is_shared_by_versions_forks_and_legacy_manifests(tmp_path):
    import hashlib
    import json

    # The identity of the item table: SHA-256 of the raw ids (as text) in internal order, as JSON.
    abcde = hashlib.sha256(json.dumps(["a", "b", "c", "d", "e"]).encode()).hexdigest()
    store = store_at(tmp_path)
    m0 = store.create(NAME, BASE, ITEMS, source={})
    m1 = store.append(NAME, m0, NEW, generation={})
    fork = store.fork(NAME, "toy-fork")
    assert m0.items_digest == m1.items_digest == fork.items_digest == abcde
    assert store.item_table(m1) == ItemTable(NAME, 1, 5, abcde)
    # Only ids and their order count: metadata does not, a renamed or reordered raw id does.
    titled = ITEMS.append_column("title", pa.array(["A", "B", "C", "D", "E"]))
    assert store_at(tmp_path, "t").create(NAME, BASE, titled, source={}).items_digest == abcde
    shuffled = pa.table({"item_id": pa.array([2, 1, 3, 4, 5], pa.int32()), "raw_id": ["a", "b", "c", "d", "e"]})
    assert store_at(tmp_path, "s").create(NAME, BASE, shuffled, source={}).items_digest == hashlib.sha256(
        json.dumps(["b", "a", "c", "d", "e"]).encode()).hexdigest()
    # A manifest written before the digest was recorded: computed from the item file, then
    # recorded in what is derived from it.
    legacy = store_at(tmp_path, "legacy")
    legacy.create(NAME, BASE, ITEMS, source={})
    (path,) = (tmp_path / "legacy" / "datasets" / NAME / "manifests").glob("v00000.json")
    data = json.loads(path.read_text())
    del data["items_digest"]
    path.write_text(json.dumps(data))
    old = legacy.manifest(NAME)
    assert old.items_digest is None and legacy.item_table(old).digest == abcde
    assert legacy.append(NAME, old, NEW, generation={}).items_digest == abcde
    assert legacy.fork(NAME, "toy-fork").items_digest == abcde
    # An item table without ids is refused before anything is written.
    with pytest.raises(RsirError, match="item table lacks column\\(s\\) 'raw_id'"):
        store_at(tmp_path, "bad").create(NAME, BASE, ITEMS.drop_columns(["raw_id"]), source={})
    assert not (tmp_path / "bad" / "datasets").exists()


def test_input_column_order_and_types_are_normalised(tmp_path):
    # columns in another order and with int64 items are cast to the schema
    loose = pa.table({"origin": ["real"] * 3, "parent_seq_id": pa.array([None] * 3, pa.int64()),
                      "items": [[1, 2, 3, 4], [2, 3, 5], [5, 4, 3, 2, 1]], "user_id": ["u1", "u2", "u3"],
                      "seq_id": [1, 2, 3]})
    m = store_at(tmp_path, "a").create(NAME, loose, ITEMS, source={})
    assert m.digest == store_at(tmp_path, "b").create(NAME, BASE, ITEMS, source={}).digest


# --------------------------------------------------------------------------- integrity
def partition_file(tmp_path: Path, iteration: int) -> Path:
    (path,) = (tmp_path / "datasets" / NAME / "sequences" / f"iteration={iteration}").rglob("*.parquet")
    return path


def test_corrupt_partition_is_detected(tmp_path):
    store = store_at(tmp_path)
    store.create(NAME, BASE, ITEMS, source={})
    path = partition_file(tmp_path, 0)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(RsirError) as err:
        store.load(NAME)
    assert path.name in str(err.value) and NAME in str(err.value)
    with pytest.raises(RsirError):
        store.scan(NAME)


def test_missing_partition_is_detected(tmp_path):
    store = store_at(tmp_path)
    m0 = store.create(NAME, BASE, ITEMS, source={})
    store.append(NAME, m0, NEW, generation={})
    path = partition_file(tmp_path, 1)
    path.unlink()
    assert rows_of(store.load(NAME, 0)) == expected(BASE, 0)  # only the files of v0 are read
    with pytest.raises(RsirError) as err:
        store.load(NAME, 1)
    assert path.name in str(err.value)


def test_corrupt_manifest(tmp_path):
    store = store_at(tmp_path)
    store.create(NAME, BASE, ITEMS, source={})
    mpath = tmp_path / "datasets" / NAME / "manifests" / "v00000.json"
    mpath.write_text("{not json")
    with pytest.raises(RsirError) as err:
        store.load(NAME)
    assert "v00000.json" in str(err.value)


def test_unknown_dataset_and_version(tmp_path):
    store = store_at(tmp_path)
    with pytest.raises(RsirError, match="nosuch"):
        store.load("nosuch")
    m0 = store.create(NAME, BASE, ITEMS, source={})
    with pytest.raises(RsirError) as err:
        store.manifest("nosuch")
    assert "nosuch" in str(err.value) and NAME in str(err.value)  # lists the known ones
    with pytest.raises(RsirError) as err:
        store.load(NAME, 7)
    assert "7" in str(err.value) and NAME in str(err.value)
    with pytest.raises(RsirError, match="7"):
        store.items(NAME, 7)
    assert store.manifest(NAME, 0) == m0


def test_orphan_files_are_invisible(tmp_path):
    store = store_at(tmp_path)
    store.create(NAME, BASE, ITEMS, source={})
    stray = tmp_path / "datasets" / NAME / "sequences" / "iteration=0" / "bucket=0" / "part-stray.parquet"
    import pyarrow.parquet as pq
    pq.write_table(NEW, stray)
    assert rows_of(store.load(NAME)) == expected(BASE, 0)


# --------------------------------------------------------------------------- crash safety
class Crash(BaseException):
    """A process killed between two steps: nothing of its own cleanup runs."""


def test_crash_between_publish_and_commit(tmp_path, monkeypatch):
    store = store_at(tmp_path)
    m0 = store.create(NAME, BASE, ITEMS, source={})
    published = []
    real_publish = DatasetStore._publish

    def spy_publish(self, stage, name, paths):
        real_publish(self, stage, name, paths)
        published.append(name)

    def crash(self, name, manifest):
        raise Crash("simulated crash before the commit")

    monkeypatch.setattr(DatasetStore, "_publish", spy_publish)
    monkeypatch.setattr(DatasetStore, "_commit", crash)
    with pytest.raises(Crash):
        store.append(NAME, m0, NEW, generation={})
    assert published == [NAME]  # the data files really were moved into the dataset root
    (orphan,) = (tmp_path / "datasets" / NAME / "sequences" / "iteration=1").rglob("*.parquet")
    monkeypatch.undo()

    # nothing is visible: still only version 0, with its rows
    fresh = store_at(tmp_path)
    for s in (store, fresh):
        assert s.versions(NAME) == [0]
        assert rows_of(s.load(NAME)) == expected(BASE, 0)
        assert s.manifest(NAME) == m0

    # a retry succeeds and equals a clean append elsewhere; the orphan stays invisible
    m1 = store.append(NAME, m0, NEW, generation={})
    clean = store_at(tmp_path, "clean")
    c1 = clean.append(NAME, clean.create(NAME, BASE, ITEMS, source={}), NEW, generation={})
    assert m1.digest == c1.digest
    assert store.versions(NAME) == [0, 1]
    assert rows_of(store.load(NAME)) == rows_of(clean.load(NAME))
    assert orphan.exists() and orphan.name not in {p.path.rsplit("/", 1)[-1] for p in m1.partitions}


def test_crash_with_different_retry_content(tmp_path, monkeypatch):
    """A retry with other rows must not pick up the crashed attempt's partition."""
    store = store_at(tmp_path)
    m0 = store.create(NAME, BASE, ITEMS, source={})
    monkeypatch.setattr(DatasetStore, "_commit", lambda self, name, manifest: (_ for _ in ()).throw(OSError("x")))
    with pytest.raises(OSError):
        store.append(NAME, m0, NEW, generation={})
    monkeypatch.undo()
    other = seq_table([(30, None, [1, 1], "synthetic", 2)])
    store.append(NAME, m0, other, generation={})
    assert rows_of(store.load(NAME)) == sorted(expected(BASE, 0) + expected(other, 1))
    # the crashed attempt's partition file was cleaned up
    assert len(list((tmp_path / "datasets" / NAME / "sequences" / "iteration=1").rglob("*.parquet"))) == 1


# --------------------------------------------------------------------------- fsspec roots
@pytest.fixture
def memory_root():
    root = f"memory://rsir-test-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    path = fs._strip_protocol(root)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def test_memory_root(memory_root, tmp_path):
    store = DatasetStore(memory_root, tmp_path / "staging")
    assert not store.is_local
    assert store.names() == []
    m0 = store.create(NAME, BASE, ITEMS, source={})
    assert store.names() == [NAME] and store.versions(NAME) == [0]
    assert rows_of(store.load(NAME)) == expected(BASE, 0)
    assert store.items(NAME)["raw_id"].to_list() == list("abcde")
    m1 = store.append(NAME, m0, NEW, generation={})
    assert store.versions(NAME) == [0, 1]
    assert rows_of(store.load(NAME)) == sorted(expected(BASE, 0) + expected(NEW, 1))
    assert rows_of(store.load(NAME, 0)) == expected(BASE, 0)
    assert rows_of(store.scan(NAME, iterations=[1]).collect()) == expected(NEW, 1)
    # same digests as on a local root
    local = store_at(tmp_path, "local")
    l0 = local.create(NAME, BASE, ITEMS, source={})
    assert (m0.digest, m1.digest) == (l0.digest, local.append(NAME, l0, NEW, generation={}).digest)
    # nothing written to the local staging area stays there, and nothing outside the root
    assert not (tmp_path / "staging").exists() or list((tmp_path / "staging").iterdir()) == []
    # a fresh store on the same root sees the same data; corruption is detected there too
    again = DatasetStore(memory_root, tmp_path / "staging")
    assert again.manifest(NAME, 1) == m1
    fs = fsspec.filesystem("memory")
    part = f"{store._root_path}/{NAME}/{m1.partitions[-1].path}"
    fs.pipe_file(part, b"garbage")
    with pytest.raises(RsirError) as err:
        again.load(NAME)
    assert m1.partitions[-1].path.rsplit("/", 1)[-1] in str(err.value)
    assert rows_of(again.load(NAME, 0)) == expected(BASE, 0)


def test_memory_roots_are_isolated(tmp_path):
    roots = [f"memory://rsir-test-{uuid.uuid4().hex}" for _ in range(2)]
    try:
        a, b = (DatasetStore(r, tmp_path / "staging") for r in roots)
        a.create(NAME, BASE, ITEMS, source={})
        assert b.names() == [] and a.names() == [NAME]
        with pytest.raises(RsirError, match=NAME):
            b.load(NAME)
    finally:
        fs = fsspec.filesystem("memory")
        for r in roots:
            p = fs._strip_protocol(r)
            if fs.exists(p):
                fs.rm(p, recursive=True)


def test_fork_copies_version_zero_with_the_same_digest(tmp_path):
    store = DatasetStore(tmp_path / "datasets", tmp_path / "staging")
    table = pa.table({"seq_id": [0, 1], "user_id": ["a", "b"], "items": [[1, 2, 3], [2, 3, 1]],
                      "origin": ["real", "real"], "parent_seq_id": [None, None]})
    items = pa.table({"item_id": pa.array([1, 2, 3], pa.int32()), "raw_id": ["x", "y", "z"]})
    base = store.create("base", table, items, source={})
    fork = store.fork("base", "base--run")
    assert fork.digest == base.digest and fork.version == 0
    assert store.load("base--run").drop("iteration").equals(store.load("base").drop("iteration"))
    assert store.fork("base", "base--run").digest == base.digest  # idempotent
    new = pa.table({"seq_id": [2], "user_id": [None], "items": [[3, 2]], "origin": ["synthetic"],
                    "parent_seq_id": [0]})
    store.append("base--run", fork, new, generation={"key": "g"})
    assert store.versions("base") == [0] and store.versions("base--run") == [0, 1]


# --------------------------------------------------------------------------- issue 12: names, paths, disk errors
@pytest.mark.parametrize("bad", ["t\n", "..", "...", "../datasets/t", "t/../t", "/abs", ".hidden"])
def test_invalid_names_are_refused_by_every_reader(tmp_path, bad):
    store = store_at(tmp_path)
    store.create("t", BASE, ITEMS, source={})
    readers = [store.versions, store.manifest, store.load, store.scan, store.items,
               lambda n: store.fork("t", n), lambda n: store.fork(n, "copy")]
    for read in readers:
        with pytest.raises(RsirError, match="invalid dataset name"):
            read(bad)
    assert store.names() == ["t"]


def test_check_name_matches_the_whole_name():
    from storage.dataset import check_name

    assert check_name("ml-100k.v2_a") == "ml-100k.v2_a"
    with pytest.raises(RsirError) as err:
        check_name("t\n")
    assert "'t\\n'" in str(err.value) and "\n" not in str(err.value)


def test_names_skip_folders_that_are_not_dataset_names(tmp_path):
    store = store_at(tmp_path)
    store.create(NAME, BASE, ITEMS, source={})
    (tmp_path / "datasets" / ".trash" / "manifests").mkdir(parents=True)
    (tmp_path / "datasets" / ".trash" / "manifests" / "v00000.json").write_text("{}")
    assert store.names() == [NAME]


def _edit_manifest(tmp_path: Path, name: str, edit) -> None:
    import json

    path = tmp_path / "datasets" / name / "manifests" / "v00000.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("entry", ["items", "partition"])
@pytest.mark.parametrize("target", ["../other/items.parquet", "/etc/passwd", "sequences/../../other/items.parquet",
                                    "C:\\data\\items.parquet", ""])
def test_manifest_entries_outside_the_dataset_are_rejected(tmp_path, entry, target):
    store = store_at(tmp_path)
    store.create(NAME, BASE, ITEMS, source={})
    store.create("other", BASE, ITEMS, source={})

    def edit(m):
        (m["items"] if entry == "items" else m["partitions"][0])["path"] = target

    _edit_manifest(tmp_path, NAME, edit)
    for read in (store.manifest, store.load, store.items):
        with pytest.raises(RsirError) as err:
            read(NAME)
        assert f"dataset {NAME!r} v0" in str(err.value) and repr(target) in str(err.value)
    assert rows_of(store.load("other")) == expected(BASE, 0)


def test_corrupt_manifest_error_is_one_line(tmp_path):
    store = store_at(tmp_path)
    store.create(NAME, BASE, ITEMS, source={})
    _edit_manifest(tmp_path, NAME, lambda m: m.update(num_items="many"))
    with pytest.raises(RsirError) as err:
        store.manifest(NAME)
    assert "v00000.json" in str(err.value) and "num_items" in str(err.value) and "\n" not in str(err.value)


def _no_space(*args, **kwargs):
    import errno

    raise OSError(errno.ENOSPC, "No space left on device")


def _staged_moves_fail(monkeypatch) -> None:
    """Disk full when a staged file is moved into the dataset root (other moves still work)."""
    import shutil

    real_move = shutil.move

    def move(src, dst, *args, **kwargs):
        if "stage-" in str(src):
            _no_space()
        return real_move(src, dst, *args, **kwargs)

    monkeypatch.setattr("storage.dataset.shutil.move", move)


FAILURES = {
    "staging": lambda mp: mp.setattr("storage.dataset.pq.write_table", _no_space),
    "copying": _staged_moves_fail,
    "committing": lambda mp: mp.setattr("storage.files.os.fsync", _no_space),
}


def _assert_disk_error(err, operation: str) -> None:
    message = str(err.value)
    assert f"dataset {NAME!r}" in message and operation in message and "No space left on device" in message
    assert "\n" not in message


def _staging_is_empty(tmp_path: Path) -> bool:
    staging = tmp_path / "staging"
    return not staging.exists() or list(staging.iterdir()) == []


def test_disk_full_while_staging_leaves_nothing(tmp_path, monkeypatch):
    store = store_at(tmp_path)
    FAILURES["staging"](monkeypatch)
    with pytest.raises(RsirError) as err:
        store.create(NAME, BASE, ITEMS, source={})
    _assert_disk_error(err, "staging")
    assert store.names() == [] and not (tmp_path / "datasets").exists() and _staging_is_empty(tmp_path)


@pytest.mark.parametrize("operation", ["staging", "copying", "committing"])
def test_disk_full_while_appending_keeps_the_previous_version(tmp_path, monkeypatch, operation):
    store = store_at(tmp_path)
    m0 = store.create(NAME, BASE, ITEMS, source={})
    before = all_files(tmp_path / "datasets")
    with monkeypatch.context() as patch, pytest.raises(RsirError) as err:
        FAILURES[operation](patch)
        store.append(NAME, m0, NEW, generation={})
    _assert_disk_error(err, operation)
    assert all_files(tmp_path / "datasets") == before and _staging_is_empty(tmp_path)
    assert store.versions(NAME) == [0] and rows_of(store.load(NAME)) == expected(BASE, 0)
    assert store.append(NAME, m0, NEW, generation={}).version == 1  # a retry works


@pytest.mark.parametrize("operation", ["staging", "copying", "committing"])
def test_disk_full_while_replacing_keeps_the_previous_dataset(tmp_path, monkeypatch, operation):
    store = store_at(tmp_path)
    m0 = store.create(NAME, BASE, ITEMS, source={})
    store.append(NAME, m0, NEW, generation={})
    before = all_files(tmp_path / "datasets")
    with monkeypatch.context() as patch, pytest.raises(RsirError) as err:
        FAILURES[operation](patch)
        store.create(NAME, NEW, ITEMS, source={}, replace=True)
    _assert_disk_error(err, operation)
    assert all_files(tmp_path / "datasets") == before and _staging_is_empty(tmp_path)
    assert store.names() == [NAME] and store.versions(NAME) == [0, 1] and store.manifest(NAME, 0) == m0
    assert rows_of(store.load(NAME)) == sorted(expected(BASE, 0) + expected(NEW, 1))


def test_disk_full_while_forking_leaves_nothing(tmp_path, monkeypatch):
    store = store_at(tmp_path)
    store.create("base", BASE, ITEMS, source={})
    before = all_files(tmp_path / "datasets")
    FAILURES["committing"](monkeypatch)
    with pytest.raises(RsirError) as err:
        store.fork("base", NAME)
    _assert_disk_error(err, "committing")
    assert all_files(tmp_path / "datasets") == before and store.names() == ["base"] and _staging_is_empty(tmp_path)


# --------------------------------------------------------------------------- tracking URIs
@pytest.mark.parametrize("uri,shown", [
    ("postgresql://rsir:s3cret@db.example:5432/mlflow", "postgresql://rsir:***@db.example:5432/mlflow"),
    ("https://user:p%40ss@mlflow.example/", "https://user:***@mlflow.example/"),
    ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
])
def test_tracking_uris_are_shown_without_passwords(uri, shown):
    from storage.tracking import redact_uri

    assert redact_uri(uri) == shown


def test_an_unreachable_tracking_uri_error_hides_the_password():
    from storage.tracking import Tracker

    with pytest.raises(RsirError) as err:
        Tracker.open("http://rsir:s3cret@127.0.0.1:1", "x")
    assert "s3cret" not in str(err.value) and "rsir:***@127.0.0.1:1" in str(err.value)


def _registered(tracker, score: float, base: str = "d0"):
    """A run with a logged model registered as a version of 'm' with validation ndcg@10 `score`."""
    run_id = tracker.start_run("r", {})
    model_id = tracker._client.create_logged_model(tracker.experiment_id, name="theta-0", source_run_id=run_id).model_id
    return tracker.register_champion("m", run_id, model_id, {"valid_ndcg_at_10": score}, "ndcg@10", base)


def test_a_sqlite_store_keeps_its_artifacts_beside_its_database(tmp_path, monkeypatch):
    """Not in MLflow's default ./mlruns of the caller's directory (tests and `rsir report` restored
    archives into the repository's mlruns/ that way)."""
    from storage.tracking import Tracker

    monkeypatch.chdir(tmp_path)
    db = tmp_path / "store" / "mlflow.db"
    tracker = Tracker.open(f"sqlite:///{db}", "x")
    run = tracker.start_run("r")
    (tmp_path / "a.json").write_text("{}")
    tracker.log_artifact(run, tmp_path / "a.json", "here")
    assert not (tmp_path / "mlruns").exists()
    assert [p.name for p in (db.parent / "mlartifacts").rglob("a.json")] == ["a.json"]


def test_champion_alias_survives_a_concurrent_insert(tmp_path, monkeypatch):
    """Two runs setting `champion` at once on one SQL store: one insert loses to the other's
    unique key. The loser sets it again (now an update) instead of failing its run."""
    from mlflow.exceptions import MlflowException

    from storage.tracking import Tracker

    tracker = Tracker.open(f"sqlite:///{tmp_path / 'mlflow.db'}", "x", tmp_path / "artifacts")
    client = tracker._client
    real, calls = client.set_registered_model_alias, []

    def racing(name, alias, version):
        calls.append(version)
        if len(calls) == 1:  # another writer inserted the alias between MLflow's read and insert
            real(name, alias, version)
            raise MlflowException('(psycopg.errors.UniqueViolation) duplicate key value violates unique '
                                  'constraint "registered_model_alias_pk"', error_code="BAD_REQUEST")
        return real(name, alias, version)

    monkeypatch.setattr(client, "set_registered_model_alias", racing)
    registration = _registered(tracker, 0.05)
    assert len(calls) == 2 and int(client.get_model_version_by_alias("m", "champion").version) == registration.version
    monkeypatch.setattr(client, "set_registered_model_alias", lambda *a: (_ for _ in ()).throw(
        MlflowException("some other failure", error_code="BAD_REQUEST")))
    with pytest.raises(MlflowException, match="some other failure"):
        _registered(tracker, 0.06)  # better: the alias must move, and moving it fails


def test_the_champion_alias_moves_only_to_a_better_version_on_the_same_data(tmp_path):
    """The issue's case: v1 at 0.0518, then a re-run at 0.0397 took the alias. Now a worse or
    equal version is registered but the alias stays; a better one on the same D_0 takes it; on a
    replaced D_0 the old scores are not comparable and the best on the new data takes it."""
    from storage.tracking import Tracker

    tracker = Tracker.open(f"sqlite:///{tmp_path / 'mlflow.db'}", "x", tmp_path / "artifacts")
    champion = lambda: int(tracker._client.get_model_version_by_alias("m", "champion").version)  # noqa: E731
    assert _registered(tracker, 0.0518).champion == 1
    worse = _registered(tracker, 0.0397)
    assert (worse.version, worse.champion, champion()) == (2, 1, 1)
    assert _registered(tracker, 0.0518).champion == 1  # a tie keeps the champion
    assert _registered(tracker, 0.0600).champion == 4
    version = tracker._client.get_model_version("m", "4")
    assert version.source.startswith("models:/m-")  # the logged model the version points at
    assert version.tags["rsir.metric"] == "ndcg@10" and version.tags["rsir.base_digest"] == "d0"
    assert _registered(tracker, 0.0100, base="d0-replaced").champion == 5  # other data: not comparable
    assert _registered(tracker, 0.0700).champion == 6  # on d0 again: v5 is not comparable, the best on d0 is v6
    assert champion() == 6


def test_champion_rule():
    from storage.tracking import VersionScore as V
    from storage.tracking import champion_rule

    same = [V(1, "a", 0.5), V(2, "a", 0.4), V(3, "b", 0.9), V(4, None, 0.99), V(5, "a", None)]
    assert champion_rule(same, 1, "a") == 1  # nothing on "a" beats v1
    assert champion_rule(same, None, "a") == 1
    assert champion_rule(same, 3, "a") == 1  # v3 is on other data: the best on "a" takes the alias
    assert champion_rule(same, 2, "a") == 1  # someone set it by hand to a worse one: the best takes it
    assert champion_rule([*same, V(6, "a", 0.5)], 1, "a") == 1  # ties keep the earlier
    assert champion_rule([V(1, None, 0.3)], 1, "a") == 1  # nothing comparable: unchanged


# --------------------------------------------------------------------------- run ownership
def _sleep():
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


@pytest.fixture
def sleeper():
    """A live process other than this one (a second worker of the same lineage)."""
    proc = _sleep()
    yield proc
    proc.kill()
    proc.wait()


def _owner_of(proc):
    import psutil

    from storage.tracking import RunOwner

    here = RunOwner.current()
    return RunOwner(here.host, here.machine, proc.pid, psutil.Process(proc.pid).create_time())


def _utc(seconds_ago: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(time.time() - seconds_ago, timezone.utc).isoformat(timespec="seconds")


def test_a_run_is_dead_only_when_its_process_is_gone(sleeper):
    """On this machine the pid and start time decide, whatever the heartbeat says; a reused pid
    (another start time) or a reaped process is dead, a sleeping one is not."""
    from dataclasses import replace

    from storage.tracking import RunOwner, dead_reason

    here, now = RunOwner.current(), time.time()
    owner = _owner_of(sleeper)
    old_beat = {"rsir.heartbeat": _utc(86400)}
    assert dead_reason({**owner.tags(), **old_beat}, now - 86400, here, now) is None
    assert dead_reason({**here.tags(), **old_beat}, now - 86400, here, now) is None  # this very process
    reused = replace(owner, started=owner.started - 3600)
    assert dead_reason({**reused.tags(), "rsir.heartbeat": _utc(0)}, now, here, now) == f"process {reused} is gone"
    sleeper.kill()
    sleeper.wait()
    assert dead_reason({**owner.tags(), "rsir.heartbeat": _utc(0)}, now, here, now) == f"process {owner} is gone"


def test_a_run_on_another_machine_is_dead_when_its_heartbeat_is_stale():
    """Its pid means nothing here: the heartbeat decides (the start time for a run without one)."""
    from dataclasses import replace

    from storage.tracking import STALE_AFTER_SECONDS, RunOwner, dead_reason

    here, now = RunOwner.current(), time.time()
    elsewhere = replace(here, host="another-host", pid=1)
    container = replace(here, machine=here.machine + "-other-pid-namespace", pid=2 ** 22 + 7)  # no such pid here
    for owner in (elsewhere, container):
        fresh = {**owner.tags(), "rsir.heartbeat": _utc(STALE_AFTER_SECONDS - 60)}
        assert dead_reason(fresh, now - 86400, here, now) is None
        stale = {**owner.tags(), "rsir.heartbeat": _utc(STALE_AFTER_SECONDS + 60)}
        assert dead_reason(stale, now - 86400, here, now) == f"{owner} sent no heartbeat for 11 min"
    assert dead_reason({}, now - 60, here, now) is None  # an older rsir's run, just started
    assert dead_reason({}, now - 3600, here, now) == "its process sent no heartbeat for 60 min"


def test_dead_runs_are_killed_with_their_children_and_live_ones_are_left(tmp_path, sleeper):
    from storage.tracking import Tracker, owner_tags

    tracker = Tracker.open(f"sqlite:///{tmp_path / 'mlflow.db'}", "x", tmp_path / "artifacts")
    lineage = {"rsir.lineage": "abc"}
    mine = tracker.start_run("mine", {**lineage, **owner_tags()})
    other_worker = tracker.start_run("other", {**lineage, **_owner_of(sleeper).tags(), "rsir.heartbeat": _utc(3600)})
    gone = _sleep()
    owner = _owner_of(gone)
    gone.kill()
    gone.wait()
    killed = tracker.start_run("killed", {**lineage, **owner.tags(), "rsir.heartbeat": _utc(0)})
    cut_short = tracker.start_run("iteration-1", {}, parent=killed)
    done = tracker.start_run("iteration-0", {}, parent=killed)
    tracker.end_run(done)
    unrelated = tracker.start_run("unrelated", {"rsir.lineage": "zzz", **owner.tags()})

    found = tracker.dead_runs("tags.`rsir.lineage` = 'abc'")
    assert [(d.run_id, d.reason) for d in found] == [(killed, f"process {owner} is gone")]
    tracker.kill(killed)
    status = {run.info.run_id: run.info.status for run in tracker.search_runs()}
    assert status == {mine: "RUNNING", other_worker: "RUNNING", killed: "KILLED", cut_short: "KILLED",
                      done: "FINISHED", unrelated: "RUNNING"}


def test_heartbeat_is_refreshed_and_a_failed_block_ends_its_run(tmp_path):
    from storage.tracking import HEARTBEAT_TAG, Tracker

    tracker = Tracker.open(f"sqlite:///{tmp_path / 'mlflow.db'}", "x", tmp_path / "artifacts")
    old = _utc(3600)
    run = tracker.start_run("r", {HEARTBEAT_TAG: old})

    def beat():
        return tracker._client.get_run(run).data.tags[HEARTBEAT_TAG]

    with tracker.heartbeat(run, every=0.05):
        deadline = time.monotonic() + 30
        while beat() == old and time.monotonic() < deadline:
            time.sleep(0.05)
        assert beat() != old
    assert tracker._client.get_run(run).info.status == "RUNNING"  # the block ends its run itself

    for error, status in ((ValueError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")):
        run = tracker.start_run("r", {})
        with pytest.raises(type(error)):
            with tracker.heartbeat(run, every=0.05):
                raise error
        assert tracker._client.get_run(run).info.status == status


# A manifest as the code before typed records wrote it (issue 25): stats and generation were
# plain dicts, the filter's counts written twice (flat and in filter_counts). Trimmed to one partition.
OLD_MANIFEST = r"""
{
  "format": 1,
  "dataset": "ml-100k-sparse--3728a9b63e",
  "version": 1,
  "parent_version": 0,
  "lineage": 0,
  "num_items": 1414,
  "items": {
    "path": "items-b376c439649fd8d7-eb701e93ce15.parquet",
    "rows": 1414,
    "bytes": 30554,
    "sha256": "b376c439649fd8d73cd9174efa9d5bc736b490b4306a5157939ce673465d1bfe"
  },
  "items_digest": "5966188ec2e2c8e0d149da691eefbf1b6044cc991258ebeea48969c0490f0736",
  "partitions": [
    {
      "path": "sequences/iteration=0/bucket=0/part-54784d113a56d4a6-eb701e93ce15.parquet",
      "rows": 943,
      "bytes": 38372,
      "sha256": "54784d113a56d4a6f09401250f8eff3aea27753dcd598af04e0f669d038333ba",
      "iteration": 0,
      "bucket": 0
    }
  ],
  "digest": "e720b056d5d5942c4ad9985d6c16ac19524d42fad96103772db84284a07a51d0",
  "created_at": "2026-11-30T01:36:18.961805+00:00",
  "source": {
    "derived_from": "ml-100k",
    "view": {
      "rule": "sparse",
      "stride": 5,
      "min_items": 5
    }
  },
  "generation": {
    "key": "0bb2864a392ffae4446f894446e575613ebc8392a0d201cdd509cdcdddeea65c:{'tau': 78, 'min_len': 3, 'fidelity': True}",
    "parent_digest": "d03615dab72bf2e007faba81c32819ea519a5dd52759f939a4679f05d3de2f11",
    "checkpoint": "/ws/checkpoints/by-content/023409470b.pt",
    "checkpoint_sha256": "899d549608bd00ddca036133ef59812413c924142b9a8a0c5d90e512749924e7",
    "mode": "rollout",
    "params": {
      "m": 2,
      "tau": 100,
      "p": 0.5,
      "min_len": 3,
      "max_len": 50,
      "seed": 0,
      "batch_size": 1024,
      "device": "cpu",
      "max_sources": 707,
      "incremental": true,
      "item_chunk": 262144,
      "retrieval": "exact",
      "candidates": 256,
      "nprobe": 16
    },
    "filter": {
      "tau": 78,
      "min_len": 3,
      "fidelity": true
    },
    "generator": {
      "backbone": "sasrec",
      "checkpoint": "/ws/checkpoints/by-content/023409470b.pt"
    }
  },
  "stats": {
    "sequences": 2123,
    "real_sequences": 943,
    "synthetic_sequences": 1180,
    "interactions": 36333,
    "synthetic_interactions": 15831,
    "mean_length": 17.1139896373057,
    "mean_synthetic_length": 13.416101694915254,
    "num_items": 1414,
    "density": 0.02724834671014443,
    "pair_density": 0.02724834671014443,
    "item_entropy": 6.2292062054392385,
    "item_entropy_normalised": 0.8587060225552712,
    "item_gini": 0.7045678293014198,
    "apen_real": 0.6572213334276463,
    "apen_synthetic": 0.4636104772167924,
    "acceptance_rate": 0.8345120226308345,
    "accepted": 1180,
    "generated": 1414,
    "mean_new_length": 13.416101694915254,
    "filter_counts": {
      "generated": 1414,
      "cut_by_tau": 1273,
      "too_short": 193,
      "duplicate_in_batch": 25,
      "duplicate_of_existing": 16,
      "accepted": 1180,
      "acceptance_rate": 0.8345120226308345,
      "mean_accepted_length": 13.416101694915254
    },
    "stop_reasons": {
      "exhausted": 145,
      "fidelity": 1202,
      "max_len": 67
    },
    "generation_seconds": 2.305823908000093
  }
}
"""


def test_an_old_manifest_loads_typed_and_writes_back_unchanged():
    from storage.manifest import FilterCounts, FilterParams, GenerationRecord, VersionStats

    m = Manifest.model_validate_json(OLD_MANIFEST)
    assert isinstance(m.stats, VersionStats) and isinstance(m.generation, GenerationRecord)
    assert isinstance(m.stats.filter_counts, FilterCounts) and m.stats.filter_counts.accepted == 1180
    assert m.stats.filter_counts.acceptance_rate == pytest.approx(1180 / 1414)  # one attribute, not two
    assert "acceptance_rate" not in m.stats.model_fields_set and not m.stats.model_extra
    assert m.generation.filter == FilterParams(tau=78, min_len=3) and m.generation.filter.fidelity
    assert m.generation.generator.backbone == "sasrec" and m.ref().stats is m.stats
    # The file names and MLflow's data/* metrics are those of the old dict.
    assert m.stats.metrics()["acceptance_rate"] == m.stats.filter_counts.acceptance_rate
    assert m.stats.metrics()["mean_new_length"] == m.stats.filter_counts.mean_accepted_length
    assert m.model_dump_json(indent=2) == OLD_MANIFEST.strip()
    off = json.loads(OLD_MANIFEST)
    off["generation"]["filter"] = {"tau": None, "min_len": 3, "fidelity": False}
    assert not Manifest.model_validate(off).generation.filter.fidelity


def test_a_manifest_without_generation_statistics_writes_none():
    m = Manifest.model_validate({**json.loads(OLD_MANIFEST), "generation": None, "stats": {"sequences": 3}})
    assert json.loads(m.model_dump_json())["stats"] == {"sequences": 3}
    assert m.stats.filter_counts is None and m.stats.metrics() == {"sequences": 3}
