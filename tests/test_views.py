"""Dataset views: the rules against plain per-user references, the real ml-100k-last50, the
`rsir data view` command and its errors (one line, exit 2, nothing written)."""

from __future__ import annotations

import shutil

import polars as pl
import pytest

from core.workspace import Workspace
from storage.dataset import dataset_store
from tasks.builtin import BENCHMARKS, BUILTIN, BUILTIN_VIEWS, fetch_builtin
from tasks.views import derive_view, kept_interactions, last_n, last_view, sparse, sparse_positions
from tests.conftest import make_tiny_home, workspace_files

LAST = 50


def _raw_lists(ws: Workspace, name: str) -> list[list[str]]:
    """Each sequence as raw item ids, in seq_id order."""
    store = dataset_store(ws)
    items = store.items(name)
    raw = dict(zip(items["item_id"].to_list(), items["raw_id"].to_list()))
    return [[raw[i] for i in seq] for seq in store.load(name).sort("seq_id")["items"].to_list()]


def _with_ml100k(ml100k_ws: Workspace, root) -> Workspace:
    """A fresh workspace holding a copy of the session's ml-100k (which stays read-only)."""
    ws = Workspace.at(root)
    shutil.copytree(ml100k_ws.datasets / "ml-100k", ws.datasets / "ml-100k")
    return ws


@pytest.fixture(scope="module")
def last_ws(ml100k_ws, tmp_path_factory) -> Workspace:
    """ml-100k and its view `x` = newest 50 interactions, built with derive_view."""
    ws = _with_ml100k(ml100k_ws, tmp_path_factory.mktemp("views") / "workspace")
    derive_view(ws, "ml-100k", "x", last_view(LAST))
    return ws


# ------------------------------------------------------------------ rules
def _positions(lengths: list[int], keep: pl.Expr) -> list[list[int]]:
    seqs = pl.DataFrame({"seq_id": range(len(lengths)), "user_id": [str(n) for n in lengths],
                         "items": [list(range(1, n + 1)) for n in lengths]},
                        schema_overrides={"items": pl.List(pl.Int32)})
    kept = kept_interactions(seqs, keep).group_by("seq_id", maintain_order=True).agg("pos")
    got = dict(zip(kept["seq_id"].to_list(), kept["pos"].to_list()))
    return [got.get(i, []) for i in range(len(lengths))]


def test_vectorized_rules_match_per_sequence_references():
    lengths = list(range(1, 130))
    assert _positions(lengths, last_n(5)) == [list(range(max(0, n - 5), n)) for n in lengths]
    assert _positions(lengths, sparse()) == [sparse_positions(n) for n in lengths]


def test_builtin_names_agree():
    assert set(BUILTIN) == {"ml-100k", *BUILTIN_VIEWS, *BENCHMARKS}
    assert set(BENCHMARKS) == {"amazon-beauty", "amazon-sports", "amazon-toys", "yelp"}


# ------------------------------------------------------------------ real data
def test_last_n_on_real_ml100k(ml100k_ws, last_ws):
    dense, view = _raw_lists(ml100k_ws, "ml-100k"), _raw_lists(last_ws, "x")
    assert len(view) == len(dense) == 943
    # Brute force, user by user: the newest 50 raw items in their order.
    assert view[:100] == [seq[-LAST:] for seq in dense[:100]]
    assert [len(v) for v in view] == [min(len(d), LAST) for d in dense]
    store = dataset_store(last_ws)
    seqs, n_items = store.load("x"), store.manifest("x").num_items
    assert sorted(set(seqs["items"].explode().to_list())) == list(range(1, n_items + 1))
    assert seqs["user_id"].to_list() == store.load("ml-100k").sort("seq_id")["user_id"].to_list()
    # Item metadata follows the raw id.
    toy = store.items("x").filter(pl.col("raw_id") == "1").row(0, named=True)
    assert toy["title"] == "Toy Story" and toy["year"] == 1995 and "Animation" in toy["genres"]
    source = store.manifest("x").source
    assert source["derived_from"] == "ml-100k" and source["view"] == {"rule": "last", "n": LAST}
    assert source["parent_digest"] == store.manifest("ml-100k").digest


def test_builtin_last50_is_deterministic_and_equals_the_cli_view(ml100k_ws, last_ws, tmp_path):
    # Two fresh workspaces with only the downloaded files: ml-100k is built first, then the view.
    digests = []
    for name in ("a", "b"):
        ws = Workspace.at(tmp_path / name)
        shutil.copytree(ml100k_ws.downloads / "ml-100k", ws.downloads / "ml-100k")
        result = fetch_builtin(ws, "ml-100k-last50")
        assert result["view"] == {"rule": "last", "n": LAST} and result["users"] == 943
        digests.append(result["digest"])
        assert fetch_builtin(ws, "ml-100k-last50")["status"] == "exists"
    # The digest covers content only (items and sequences), not the dataset name or source
    # record, so the built-in and a view named otherwise with the same N are equal.
    assert digests[0] == digests[1] == dataset_store(last_ws).manifest("x").digest


# ------------------------------------------------------------------ CLI
@pytest.fixture
def tiny_ws(ws, tiny_csv) -> Workspace:
    return make_tiny_home(ws.root, tiny_csv)


def test_cli_view_on_imported_dataset(cli, tiny_ws):
    result = cli("data", "view", "tiny", "--name", "t5", "--last", "5", "--json")
    assert result.code == 0, result.err
    out = result.json()  # exactly one JSON object
    assert out["dataset"] == "t5" and out["version"] == 0 and out["view"] == {"rule": "last", "n": 5}
    tiny, t5 = _raw_lists(tiny_ws, "tiny"), _raw_lists(tiny_ws, "t5")
    assert t5 == [seq[-5:] for seq in tiny] and out["users"] == len(tiny)
    assert out["stats"]["interactions"] == sum(min(len(s), 5) for s in tiny)
    again = cli("data", "view", "tiny", "--name", "t5", "--last", "4", "--force")
    assert again.code == 0 and "newest 4 interactions" in again.out
    assert max(len(s) for s in _raw_lists(tiny_ws, "t5")) == 4


VIEW_ERRORS = {
    "N below 3": (["tiny", "--name", "t2", "--last", "2"], "--last must be >= 3", "got 2"),
    "unknown source": (["nope", "--name", "t5", "--last", "5"], "unknown dataset 'nope'"),
    "existing target": (["tiny", "--name", "tiny-old", "--last", "5"], "'tiny-old' already exists", "--force"),
    "bad name": (["tiny", "--name", "a/b", "--last", "5"], "invalid dataset name 'a/b'"),
    "name of the source": (["tiny", "--name", "tiny", "--last", "5", "--force"], "'tiny'", "source"),
}


@pytest.mark.parametrize("case", sorted(VIEW_ERRORS))
def test_cli_view_errors_write_nothing(case, cli, tiny_ws):
    args, *needles = VIEW_ERRORS[case]
    shutil.copytree(tiny_ws.datasets / "tiny", tiny_ws.datasets / "tiny-old")
    before = workspace_files(tiny_ws)
    result = cli("data", "view", *args)
    assert result.code == 2 and result.out == ""
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rsir: error: "), result.err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert workspace_files(tiny_ws) == before
    assert not (tiny_ws.staging.exists() and any(tiny_ws.staging.iterdir()))
