"""Data ingest: formats, preprocessing rules, the real MovieLens-100K data and the sparse view."""

from __future__ import annotations

import polars as pl

from storage.dataset import dataset_store
from tasks.ingest import ML100K_INTER_SHA256, ImportSpec, build_sequences, import_dataset, read_interactions
from tasks.views import sparse_positions
from tests.conftest import write


def _seqs(ws, name):
    return dataset_store(ws).load(name).sort("seq_id")


def test_csv_import_orders_chronologically_with_stable_ties(ws, tmp_path):
    # user 7: items 30 (t=5), 10 (t=1), 20 (t=1, after 10 in the file) -> 10, 20, 30
    csv = write(tmp_path / "x.csv", "u,i,t\n7,30,5\n7,10,1\n7,20,1\n8,20,2\n8,30,3\n8,10,4\n9,10,1\n")
    result = import_dataset(ws, ImportSpec(path=csv, name="x", format="csv", user_col="u", item_col="i",
                                           time_col="t"))
    assert result["dropped_short_users"] == 1  # user 9 has one interaction
    assert result["users"] == 2 and result["items"] == 3
    seqs = _seqs(ws, "x")
    items = dataset_store(ws).items("x")
    raw = dict(zip(items["item_id"].to_list(), items["raw_id"].to_list()))
    assert [[raw[i] for i in s] for s in seqs["items"].to_list()] == [["10", "20", "30"], ["20", "30", "10"]]
    assert sorted(raw) == [1, 2, 3]  # contiguous from 1
    assert seqs["origin"].to_list() == ["real", "real"]
    assert seqs.schema["items"] == pl.List(pl.Int32)


def test_datetime_string_timestamps_are_parsed(ws, tmp_path):
    csv = write(tmp_path / "d.csv", "user_id,item_id,timestamp\n"
                "1,5,2020-01-03\n1,6,2020-01-01\n1,7,2020-01-02\n2,5,2020-01-01\n2,6,2020-01-02\n2,7,2020-01-03\n")
    import_dataset(ws, ImportSpec(path=csv, name="d", format="csv"))
    raw_items = dataset_store(ws).items("d")["raw_id"].to_list()
    first = [raw_items[i - 1] for i in _seqs(ws, "d")["items"][0]]
    assert first == ["6", "7", "5"]


def test_leading_zeros_id_rule(ws, tmp_path):
    """--id-type int: ids are integers, so '007' and '7' are one user (and '01' and '1' one item),
    stored under the canonical '7'; --id-type str: they are different ids, kept as written."""
    csv = write(tmp_path / "z.csv", "user_id,item_id,timestamp\n007,01,1\n007,2,2\n007,3,3\n"
                "7,1,4\n7,4,5\n7,5,6\n8,1,1\n8,2,2\n8,3,3\n")
    as_int = import_dataset(ws, ImportSpec(path=csv, name="zi", format="csv"))
    assert (as_int["users"], as_int["items"], as_int["interactions"]) == (2, 5, 9)
    seqs, items = _seqs(ws, "zi"), dataset_store(ws).items("zi")
    raw = dict(zip(items["item_id"].to_list(), items["raw_id"].to_list()))
    assert seqs["user_id"].to_list() == ["7", "8"]
    assert [raw[i] for i in seqs["items"][0]] == ["1", "2", "3", "1", "4", "5"]  # one history, in time order
    as_str = import_dataset(ws, ImportSpec(path=csv, name="zs", format="csv", id_type="str"))
    assert (as_str["users"], as_str["items"], as_str["interactions"]) == (3, 6, 9)
    assert sorted(_seqs(ws, "zs")["user_id"].to_list()) == ["007", "7", "8"]
    assert sorted(dataset_store(ws).items("zs")["raw_id"].to_list()) == ["01", "1", "2", "3", "4", "5"]


def test_kcore_filter_is_iterative(tmp_path):
    # item 99 is seen by one user only; with k=2 it goes, which then takes user 3 below 2.
    rows = [(1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (3, 99)]
    df = pl.DataFrame({"user": [str(u) for u, _ in rows], "item": [str(i) for _, i in rows],
                       "ts": [float(t) for t in range(len(rows))]})
    seqs, items, report = build_sequences(df, kcore=2, min_seq_len=2, where="t")
    assert report["users"] == 2 and report["items"] == 2
    assert report["kcore_removed_interactions"] == 2


def test_parquet_recbole_and_amazon_formats(ws, tmp_path):
    pl.DataFrame({"user_id": [1, 1, 1, 2, 2, 2], "item_id": [4, 5, 6, 4, 5, 6],
                  "timestamp": [1, 2, 3, 1, 2, 3]}).write_parquet(tmp_path / "p.parquet")
    assert import_dataset(ws, ImportSpec(path=tmp_path / "p.parquet", name="p", format="parquet"))["users"] == 2
    inter = write(tmp_path / "r.inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                  + "".join(f"{u}\t{i}\t3\t{t}\n" for u in (1, 2) for t, i in enumerate((7, 8, 9))))
    assert import_dataset(ws, ImportSpec(path=inter, name="r", format="recbole"))["interactions"] == 6
    # Amazon ratings: no header, string ids, 5-core by default.
    lines = [f"U{u},B{i:03d},5.0,{1000 + u * 10 + i}" for u in range(6) for i in range(5)]
    lines.append("LONELY,B999,1.0,5")
    amazon = write(tmp_path / "ratings_Beauty.csv", "\n".join(lines) + "\n")
    result = import_dataset(ws, ImportSpec(path=amazon, name="a", format="amazon"))
    assert result["kcore"] == 5 and result["users"] == 6 and result["items"] == 5
    assert result["kcore_removed_interactions"] == 1


def test_real_ml100k(ml100k_ws):
    store = dataset_store(ml100k_ws)
    manifest = store.manifest("ml-100k")
    assert manifest.source["sha256"] == ML100K_INTER_SHA256
    seqs = store.load("ml-100k")
    assert seqs.height == 943 and manifest.num_items == 1682
    assert int(seqs["items"].list.len().sum()) == 100_000
    assert seqs["items"].list.min().min() == 1 and seqs["items"].list.max().max() == 1682
    items = store.items("ml-100k")
    toy = items.filter(pl.col("raw_id") == "1").row(0, named=True)
    assert toy["title"] == "Toy Story" and toy["year"] == 1995 and "Animation" in toy["genres"]
    # The first user's first interactions in time (ml-100k.inter, user 1, earliest timestamps).
    inter = read_interactions(ImportSpec(path=ml100k_ws.downloads / "ml-100k" / "ml-100k.inter",
                                         name="x", format="recbole"))
    first = inter.with_row_index().filter(pl.col("user") == "1").sort(["ts", "index"])["item"].to_list()
    raw = dict(zip(items["item_id"].to_list(), items["raw_id"].to_list()))
    assert [raw[i] for i in seqs.filter(pl.col("user_id") == "1")["items"][0]] == first


def test_sparse_view_rule(ml100k_ws):
    store = dataset_store(ml100k_ws)
    dense, sparse = store.load("ml-100k").sort("seq_id"), store.load("ml-100k-sparse").sort("seq_id")
    dense_raw = dict(zip(*store.items("ml-100k").select("item_id", "raw_id").to_dict(as_series=False).values()))
    sparse_raw = dict(zip(*store.items("ml-100k-sparse").select("item_id", "raw_id").to_dict(as_series=False).values()))
    assert sparse.height == dense.height
    assert sparse["items"].list.len().mean() <= 25
    assert sparse["items"].list.len().min() >= 5
    for d, s in zip(dense["items"].to_list()[:50], sparse["items"].to_list()[:50]):
        expected = [dense_raw[d[i]] for i in sparse_positions(len(d))]
        assert [sparse_raw[i] for i in s] == expected
    n_items = store.manifest("ml-100k-sparse").num_items
    assert sorted(set(sparse["items"].explode().to_list())) == list(range(1, n_items + 1))


def test_fetch_is_reproducible(ml100k_ws, tmp_path):
    from core.workspace import Workspace
    from tasks.ingest import fetch_builtin

    other = Workspace.at(tmp_path / "again")
    other.downloads.mkdir(parents=True)
    # Reuse the downloaded files; the rebuild must give identical digests.
    import shutil
    shutil.copytree(ml100k_ws.downloads / "ml-100k", other.downloads / "ml-100k")
    assert fetch_builtin(other, "ml-100k-sparse")["digest"] == dataset_store(ml100k_ws).manifest("ml-100k-sparse").digest
    assert dataset_store(other).manifest("ml-100k").digest == dataset_store(ml100k_ws).manifest("ml-100k").digest


def test_sparse_positions_doc_rule():
    assert sparse_positions(25) == [4, 9, 14, 19, 24]
    assert sparse_positions(20) == [3, 7, 11, 15, 19]  # stride 4 keeps 5 items
    assert sparse_positions(3) == [0, 1, 2]


def test_movielens_download_takes_a_wheel_only_and_gives_up_in_bounded_time(tmp_path, monkeypatch):
    import subprocess

    import pytest

    from core.errors import RsirError
    from core.workspace import Workspace
    from tasks import ingest

    seen = {}

    def silent_index(cmd, **kwargs):
        seen.update(cmd=cmd, timeout=kwargs.get("timeout"))
        raise subprocess.TimeoutExpired(cmd, kwargs.get("timeout"))

    monkeypatch.setattr(ingest.subprocess, "run", silent_index)
    with pytest.raises(RsirError) as err:
        ingest.download_ml100k(Workspace.at(tmp_path / "ws"))
    assert "--only-binary=:all:" in seen["cmd"] and "--timeout" in seen["cmd"]
    assert seen["timeout"] == ingest.PIP_DOWNLOAD_TIMEOUT_S
    assert str(err.value) == (f"could not download recbole==1.2.1: no answer from the package index within "
                              f"{ingest.PIP_DOWNLOAD_TIMEOUT_S} s")
