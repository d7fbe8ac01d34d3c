"""Data ingest: formats, preprocessing rules (duplicates, timestamps, blank lines), the real MovieLens-100K
data, the sparse view and the paper's four benchmarks."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from core.errors import RsirError
from storage.dataset import dataset_store
from tasks.builtin import BENCHMARKS, ML100K_INTER_SHA256
from tasks.ingest import ImportSpec, build_sequences, import_dataset, read_interactions
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
    from tasks.builtin import fetch_builtin

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
    from tasks import builtin

    seen = {}

    def silent_index(cmd, **kwargs):
        seen.update(cmd=cmd, timeout=kwargs.get("timeout"))
        raise subprocess.TimeoutExpired(cmd, kwargs.get("timeout"))

    monkeypatch.setattr(builtin.subprocess, "run", silent_index)
    with pytest.raises(RsirError) as err:
        builtin.download_ml100k(Workspace.at(tmp_path / "ws"))
    assert "--only-binary=:all:" in seen["cmd"] and "--timeout" in seen["cmd"]
    assert seen["timeout"] == builtin.PIP_DOWNLOAD_TIMEOUT_S
    assert str(err.value) == (f"could not download recbole==1.2.1: no answer from the package index within "
                              f"{builtin.PIP_DOWNLOAD_TIMEOUT_S} s")


# ------------------------------------------------------------------ issue 21: duplicates, timestamps, blank lines
def _raw_sequences(ws, name) -> dict[str, list[str]]:
    """user id -> the user's raw item ids in stored (time) order."""
    store = dataset_store(ws)
    items = store.items(name)
    raw = dict(zip(items["item_id"].to_list(), items["raw_id"].to_list()))
    seqs = store.load(name).sort("seq_id")
    return {u: [raw[i] for i in s] for u, s in zip(seqs["user_id"].to_list(), seqs["items"].to_list())}


DUPLICATES = "1,10,1\n1,10,1\n1,11,2\n1,12,3\n1,12,3\n2,10,5\n2,11,6\n2,13,7\n2,13,7\n"


def test_exact_duplicate_events_are_collapsed_and_counted(cli, ws, tmp_path):
    csv = write(tmp_path / "dup.csv", "user_id,item_id,timestamp\n" + DUPLICATES)
    result = cli("data", "import", csv, "--name", "dup", "--format", "csv", "--json")
    assert result.code == 0, result.err
    out = result.json()
    assert (out["duplicates_removed"], out["input_interactions"], out["interactions"]) == (3, 9, 6)
    assert out["kcore_removed_interactions"] == 0 and out["stats"]["duplicates_removed"] == 3
    store = dataset_store(ws)
    assert store.manifest("dup", 0).stats.duplicates_removed == 3
    assert store.load("dup").sort("seq_id")["items"].to_list() == [[1, 2, 3], [1, 2, 4]]
    assert _raw_sequences(ws, "dup") == {"1": ["10", "11", "12"], "2": ["10", "11", "13"]}
    shown = cli("data", "import", csv, "--name", "dup2", "--format", "csv")
    assert "dropped: 3 duplicate events (same user, item and time)" in shown.out
    listed = cli("data", "list", "--json").json()["datasets"]
    assert listed[0]["duplicates_removed"] == 3


def test_duplicates_are_compared_on_exact_values_and_repeats_at_other_times_stay(ws, tmp_path):
    # '007' and '7' are one user (--id-type int), 1 and 1.0 one time: rows 1 and 2 are one event.
    # Item 10 again at t=3 is a second consumption and stays; 1.5 and 1.50000000000000001 differ.
    csv = write(tmp_path / "d.csv", "user_id,item_id,timestamp\n007,10,1\n7,10,1.0\n7,11,2\n7,10,3\n"
                "8,10,1.5\n8,10,1.50000000000000001\n8,11,2\n")
    result = import_dataset(ws, ImportSpec(path=csv, name="d", format="csv"))
    assert result["duplicates_removed"] == 1
    assert _raw_sequences(ws, "d") == {"7": ["10", "11", "10"], "8": ["10", "10", "11"]}


def test_every_format_goes_through_the_duplicate_rule(ws, tmp_path):
    rows = [tuple(int(v) for v in line.split(",")) for line in DUPLICATES.splitlines()]
    pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp"], orient="row").write_parquet(tmp_path / "p.parquet")
    write(tmp_path / "r.inter", "user_id:token\titem_id:token\ttimestamp:float\n"
          + "".join(f"{u}\t{i}\t{t}\n" for u, i, t in rows))
    write(tmp_path / "a.csv", "".join(f"U{u},I{i},5.0,{t}\n" for u, i, t in rows))
    specs = [ImportSpec(path=tmp_path / "p.parquet", name="p", format="parquet"),
             ImportSpec(path=tmp_path / "r.inter", name="r", format="recbole"),
             ImportSpec(path=tmp_path / "a.csv", name="a", format="amazon", kcore=0)]
    for spec in specs:
        result = import_dataset(ws, spec)
        assert (result["duplicates_removed"], result["interactions"]) == (3, 6), spec.format
    assert _raw_sequences(ws, "a") == {"U1": ["I10", "I11", "I12"], "U2": ["I10", "I11", "I13"]}


def _writes_csv(text_values):
    def write_file(path):
        ts = list(text_values)
        rows = [(1, 30, ts[2]), (1, 20, ts[1]), (1, 10, ts[0]), (2, 10, ts[0]), (2, 20, ts[1]), (2, 30, ts[2])]
        path = path.with_suffix(".csv")
        path.write_text("user_id,item_id,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in rows))
        return path, "csv"
    return write_file


def _writes_parquet(series):
    def write_file(path):
        order = [2, 1, 0, 0, 1, 2]
        pl.DataFrame({"user_id": [1, 1, 1, 2, 2, 2], "item_id": [30, 20, 10, 10, 20, 30],
                      "timestamp": series.gather(order)}).write_parquet(path.with_suffix(".parquet"))
        return path.with_suffix(".parquet"), "parquet"
    return write_file


def _datetimes(*values, unit, zone=None):
    return pl.Series(values, dtype=pl.Int64).cast(pl.Datetime(unit, zone))


# Three times t1 < t2 < t3 per case; user 1's rows are written t3 (item 30), t2 (20), t1 (10),
# so the right order is 10, 20, 30. Each case's times tie or swap under the conversion before
# issue 21 (through float64 or whole seconds), or were refused by it (a duration with a
# traceback, a time of day), except two guards of the new rules: a float column (exact in
# float64 already, and must stay exact) and date/times past 2262 (beyond a 64-bit count of
# nanoseconds, which polars would silently wrap around to 1830).
PRECISION_CASES = {
    "csv int64 nanoseconds": _writes_csv(["1700000000000000000", "1700000000000000100", "1700000000000000200"]),
    "csv integers wider than 64 bits": _writes_csv(["18446744073709551616000", "18446744073709551616001",
                                                    "18446744073709551616002"]),
    "csv decimals": _writes_csv(["1700000000.00000001", "1700000000.00000002", "1700000000.00000003"]),
    "csv exponents": _writes_csv(["1700000000000000001e-9", "1700000000000000002e-9", "1.700000000000000003E+9"]),
    "csv datetimes with fractions of a second": _writes_csv(["2020-01-01 00:00:00.1", "2020-01-01 00:00:00.2",
                                                             "2020-01-01 00:00:00.3"]),
    "csv datetimes in nanoseconds": _writes_csv(["2020-01-01T00:00:00.000000001", "2020-01-01T00:00:00.000000002",
                                                 "2020-01-01T00:00:00.000000003"]),
    "csv datetimes with offsets": _writes_csv(["2020-01-01T01:00:00.1+01:00", "2020-01-01T00:00:00.2Z",
                                               "2019-12-31T23:00:00.3-01:00"]),
    "csv datetimes past 2262": _writes_csv(["2000-01-01", "3000-01-01", "3000-01-02"]),
    "parquet int64": _writes_parquet(pl.Series([1700000000000000000, 1700000000000000100, 1700000000000000200])),
    "parquet uint64": _writes_parquet(pl.Series([2**64 - 301, 2**64 - 201, 2**64 - 101], dtype=pl.UInt64)),
    "parquet decimal": _writes_parquet(pl.Series(["1700000000.000000001", "1700000000.000000002",
                                                  "1700000000.000000003"]).str.to_decimal(scale=9)),
    "parquet float": _writes_parquet(pl.Series([0.1, 0.2, 0.3])),
    "parquet datetime ns": _writes_parquet(_datetimes(1_700_000_000_000_000_001, 1_700_000_000_000_000_002,
                                                      1_700_000_000_000_000_003, unit="ns")),
    "parquet datetime ms with zone": _writes_parquet(_datetimes(1_700_000_000_001, 1_700_000_000_002,
                                                                1_700_000_000_003, unit="ms", zone="Europe/Paris")),
    "parquet duration": _writes_parquet(pl.Series([1, 2, 3], dtype=pl.Int64).cast(pl.Duration("ns"))),
    "parquet time of day": _writes_parquet(pl.Series([1, 2, 3], dtype=pl.Int64).cast(pl.Time)),
}


@pytest.mark.parametrize("case", sorted(PRECISION_CASES))
def test_timestamps_keep_full_precision(case, ws, tmp_path):
    path, fmt = PRECISION_CASES[case](tmp_path / "t")
    import_dataset(ws, ImportSpec(path=path, name="t", format=fmt))
    assert dataset_store(ws).load("t").sort("seq_id")["items"].to_list() == [[1, 2, 3], [1, 2, 3]]
    assert _raw_sequences(ws, "t") == {"1": ["10", "20", "30"], "2": ["10", "20", "30"]}


BLANK_LINE_FILES = {
    "csv, blank last line": ("csv", "user_id,item_id,timestamp\n1,10,1\n1,11,2\n1,12,3\n2,10,1\n2,11,2\n2,12,3\n\n"),
    "csv, blank lines inside": ("csv", "user_id,item_id,timestamp\n1,10,1\n\n1,11,2\n  \n1,12,3\n,,\n2,10,1\n"
                                "2,11,2\n\r\n2,12,3\n"),
    "recbole": ("recbole", "user_id:token\titem_id:token\ttimestamp:float\n1\t10\t1\n1\t11\t2\n\n1\t12\t3\n"
                "2\t10\t1\n2\t11\t2\n2\t12\t3\n\n\n"),
    "amazon": ("amazon", "\n1,10,5.0,1\n1,11,5.0,2\n1,12,5.0,3\n\n2,10,5.0,1\n2,11,5.0,2\n2,12,5.0,3\n\n"),
    "sequences": ("sequences", "\n1 10 11 12\n   \n2 10 11 12\n\n"),
}


@pytest.mark.parametrize("case", sorted(BLANK_LINE_FILES))
def test_blank_lines_are_skipped(case, ws, tmp_path):
    fmt, text = BLANK_LINE_FILES[case]
    path = write(tmp_path / "b.txt", text)
    result = import_dataset(ws, ImportSpec(path=path, name="b", format=fmt, kcore=0))
    assert (result["input_interactions"], result["interactions"], result["duplicates_removed"]) == (6, 6, 0)
    assert _raw_sequences(ws, "b") == {"1": ["10", "11", "12"], "2": ["10", "11", "12"]}


# ------------------------------------------------------------------ issue 22: formats without timestamps
def test_sequences_format(cli, ws, tmp_path):
    # Whitespace of any kind between ids; a user's items in time order, repeats kept (the position
    # is the time, so no row is a duplicate event); a user on two lines continues in file order,
    # which also reads the one "user item" pair per line layout.
    path = write(tmp_path / "s.txt", "1 10 11 12\n2\t10  10 13\n3 12\n4 11\n3 11 10\n4 10\n4 12\n")
    result = cli("data", "import", path, "--name", "s", "--format", "sequences", "--json")
    assert result.code == 0, result.err
    out = result.json()
    assert (out["users"], out["items"], out["interactions"], out["duplicates_removed"]) == (4, 4, 12, 0)
    assert _raw_sequences(ws, "s") == {"1": ["10", "11", "12"], "2": ["10", "10", "13"],
                                       "3": ["12", "11", "10"], "4": ["11", "10", "12"]}


def test_files_without_a_time_column_are_in_row_order(cli, ws, tmp_path):
    rows = [(1, 30), (2, 10), (1, 20), (1, 20), (2, 11), (1, 10), (2, 12)]
    write(tmp_path / "n.csv", "user_id,item_id\n" + "".join(f"{u},{i}\n" for u, i in rows))
    pl.DataFrame(rows, schema=["user_id", "item_id"], orient="row").write_parquet(tmp_path / "n.parquet")
    write(tmp_path / "n.inter", "user_id:token\titem_id:token\n" + "".join(f"{u}\t{i}\n" for u, i in rows))
    for fmt, suffix in (("csv", "csv"), ("parquet", "parquet"), ("recbole", "inter")):
        result = cli("data", "import", tmp_path / f"n.{suffix}", "--name", fmt, "--format", fmt, "--no-time", "--json")
        assert result.code == 0, result.err
        assert (result.json()["interactions"], result.json()["duplicates_removed"]) == (7, 0)
        assert _raw_sequences(ws, fmt) == {"1": ["30", "20", "20", "10"], "2": ["10", "11", "12"]}
    assert dataset_store(ws).manifest("csv").source["spec"]["time_col"] is None


# ------------------------------------------------------------------ issue 22: the paper's benchmarks
REPO = Path(__file__).resolve().parents[1]
MIRROR = next((d for d in (REPO / "shared" / "data", REPO.parent / "shared" / "data") if d.is_dir()), None)
needs_mirror = pytest.mark.skipif(MIRROR is None, reason="the benchmark mirror shared/data is absent")

# users, items, interactions of each stored benchmark (= the S3-Rec files, one user per line).
BENCHMARK_STATS = {"amazon-beauty": (22_363, 12_101, 198_502), "amazon-sports": (35_598, 18_357, 296_337),
                   "amazon-toys": (19_412, 11_924, 167_597), "yelp": (30_431, 20_033, 316_354)}


@needs_mirror
def test_fetch_beauty_from_the_mirror(cli, ws):
    result = cli("data", "fetch", "amazon-beauty", "--from", MIRROR, "--json")
    assert result.code == 0, result.err
    out = result.json()
    assert (out["users"], out["items"], out["interactions"]) == BENCHMARK_STATS["amazon-beauty"]
    assert out["stats"]["interactions"] == 198_502 and out["duplicates_removed"] == 0
    assert out["dropped_short_users"] == 0 and out["kcore_removed_interactions"] == 0
    manifest = dataset_store(ws).manifest("amazon-beauty")
    assert manifest.num_items == 12_101 and manifest.source["sha256"] == BENCHMARKS["amazon-beauty"].sha256
    assert manifest.source["origin"] == ("https://raw.githubusercontent.com/aHuiWang/CIKM2020-S3Rec/"
                                         "49a890dcb516c9ed3126564495234ea74d5cd566/data/Beauty.txt")
    # Every user's stored sequence is the file's line, item for item.
    lines = (MIRROR / "Beauty.txt").read_text().splitlines()
    expected = {line.split()[0]: line.split()[1:] for line in lines}
    assert _raw_sequences(ws, "amazon-beauty") == expected
    assert cli("data", "fetch", "amazon-beauty", "--json").json()["status"] == "exists"


@needs_mirror
@pytest.mark.parametrize("name", ["amazon-sports", "amazon-toys", "yelp"])
def test_fetch_benchmark_from_the_mirror_variable(name, ws, monkeypatch):
    from tasks.builtin import fetch_builtin

    monkeypatch.setenv("RSIR_DATA_MIRROR", str(MIRROR))
    result = fetch_builtin(ws, name)
    assert (result["users"], result["items"], result["interactions"]) == BENCHMARK_STATS[name]
    # Yelp repeats items within users (also back to back): the position is the time, nothing is dropped.
    assert result["duplicates_removed"] == 0 and result["stats"]["interactions"] == BENCHMARK_STATS[name][2]


@needs_mirror
def test_benchmark_download_is_verified_and_cached(ws, monkeypatch):
    import io

    from tasks import builtin

    monkeypatch.delenv("RSIR_DATA_MIRROR", raising=False)
    good = (MIRROR / "Toys_and_Games.txt").read_bytes()
    asked = []

    def answer(body):
        def urlopen(url, timeout):
            asked.append((url, timeout))
            return io.BytesIO(body)
        return urlopen

    monkeypatch.setattr(builtin.urllib.request, "urlopen", answer(good[:-1] + b"7"))
    with pytest.raises(RsirError) as err:
        builtin.fetch_builtin(ws, "amazon-toys")
    assert "Toys_and_Games.txt: sha256 " in str(err.value) and BENCHMARKS["amazon-toys"].sha256 in str(err.value)
    assert not (ws.downloads / "s3rec" / "Toys_and_Games.txt").exists() and not dataset_store(ws).names()
    monkeypatch.setattr(builtin.urllib.request, "urlopen", answer(good))
    assert builtin.fetch_builtin(ws, "amazon-toys")["interactions"] == 167_597
    assert asked[-1] == (builtin.S3REC_URL + "Toys_and_Games.txt", builtin.DOWNLOAD_TIMEOUT_S)
    assert builtin.S3REC_URL == ("https://raw.githubusercontent.com/aHuiWang/CIKM2020-S3Rec/"
                                "49a890dcb516c9ed3126564495234ea74d5cd566/data/")
    # The verified download is cached: a rebuild reads it without asking again.
    builtin.fetch_builtin(ws, "amazon-toys", replace=True)
    assert len(asked) == 2
