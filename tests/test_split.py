"""tasks.split (array-op implementation) against plain Python references."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from core.errors import RsirError
from tasks.ragged import Ragged, gather_padded
from tasks.split import leave_one_out, training_windows, window_batches, window_tensors


def random_rows(rng: np.random.Generator, n: int, max_items: int = 30, max_len: int = 25, min_len: int = 0):
    return [[int(x) for x in rng.integers(1, max_items + 1, size=int(rng.integers(min_len, max_len + 1)))]
            for _ in range(n)]


def ragged(rows) -> Ragged:
    return Ragged.from_series(pl.Series(rows, dtype=pl.List(pl.Int32)))


def ref_left_pad(rows, width=None) -> list[list[int]]:
    width = width if width is not None else max([len(r) for r in rows] + [1])
    return [[0] * (width - len(r)) + list(r) for r in rows]


# --------------------------------------------------------------------------- Ragged
@pytest.mark.parametrize("seed", range(4))
def test_ragged_matches_lists(seed):
    rng = np.random.default_rng(seed)
    rows = random_rows(rng, 23)
    rows[3] = []  # empty rows must not shift the others
    rows[-1] = []
    r = ragged(rows)
    assert len(r) == len(rows)
    assert r.lengths.tolist() == [len(x) for x in rows]
    for i, row in enumerate(rows):
        assert r.values[r.offsets[i]:r.offsets[i + 1]].tolist() == row
    sel = rng.permutation(len(rows))[:9]
    which, values = r.pairs(sel)
    assert list(zip(which.tolist(), values.tolist())) == [(b, v) for b, i in enumerate(sel) for v in rows[i]]
    for width in (1, 4, 40):
        tails = [rows[i][-width:] if rows[i] else [] for i in sel]
        got = r.tails(sel, width)
        assert got.dtype == torch.int64
        assert got.shape[1] <= width
        assert got.tolist() == ref_left_pad(tails)


def test_ragged_empty():
    r = ragged([])
    assert len(r) == 0 and r.values.shape == (0,)
    r = ragged([[], []])
    assert r.lengths.tolist() == [0, 0]
    assert [a.tolist() for a in r.pairs(np.arange(2))] == [[], []]


# --------------------------------------------------------------------------- gather_padded
@pytest.mark.parametrize("seed", range(4))
def test_gather_padded_matches_reference(seed):
    rng = np.random.default_rng(seed)
    values = rng.integers(1, 100, size=60)
    starts = rng.integers(0, 50, size=15)
    lengths = np.minimum(rng.integers(0, 12, size=15), 59 - starts)
    for shift in (0, 1):
        got = gather_padded(values, starts, lengths, shift=shift)
        want = ref_left_pad([values[s + shift:s + shift + n].tolist() for s, n in zip(starts, lengths)])
        assert got.tolist() == want


def test_gather_padded_degenerate():
    assert gather_padded(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)).shape == (0, 1)
    assert gather_padded(np.array([5, 6]), np.array([0, 1]), np.array([0, 0])).tolist() == [[0], [0]]


# --------------------------------------------------------------------------- leave_one_out
def make_frame(rng: np.random.Generator, real: int, synthetic: int) -> pl.DataFrame:
    rows = random_rows(rng, real, min_len=3) + random_rows(rng, synthetic, min_len=0)
    origin = ["real"] * real + ["synthetic"] * synthetic
    ids = rng.permutation(1000)[:real + synthetic]
    order = rng.permutation(real + synthetic)  # rows arrive unsorted
    return pl.DataFrame({
        "seq_id": [int(ids[i]) for i in order],
        "items": [rows[i] for i in order],
        "origin": [origin[i] for i in order],
    }, schema={"seq_id": pl.Int64, "items": pl.List(pl.Int32), "origin": pl.String})


def as_lists(r: Ragged) -> list[list[int]]:
    return [r.values[r.offsets[i]:r.offsets[i + 1]].tolist() for i in range(len(r))]


@pytest.mark.parametrize("seed", range(4))
def test_leave_one_out_matches_reference(seed):
    rng = np.random.default_rng(seed)
    df = make_frame(rng, real=17, synthetic=9)
    split = leave_one_out(df, num_items=30)
    recs = sorted(df.iter_rows(named=True), key=lambda r: r["seq_id"])
    real = [r["items"] for r in recs if r["origin"] == "real"]
    synth = [r["items"] for r in recs if r["origin"] != "real"]
    assert split.num_items == 30
    assert split.num_users == len(real) == 17
    assert as_lists(split.valid_input) == [s[:-2] for s in real]
    assert split.valid_target.tolist() == [s[-2] for s in real]
    assert as_lists(split.test_input) == [s[:-1] for s in real]
    assert split.test_target.tolist() == [s[-1] for s in real]
    # training: real prefixes (no held-out item) first, then the synthetic sequences whole
    assert as_lists(split.train) == [s[:-2] for s in real] + synth
    seq_ids = getattr(split, "train_seq_ids", None)  # newer field: seq_id of each training row
    if seq_ids is not None:
        assert seq_ids.tolist() == ([r["seq_id"] for r in recs if r["origin"] == "real"]
                                    + [r["seq_id"] for r in recs if r["origin"] != "real"])
    assert split.valid_target.dtype == np.int64 and split.test_target.dtype == np.int64


def test_leave_one_out_synthetic_only_train():
    df = pl.DataFrame({"seq_id": [1, 2], "items": [[1, 2, 3, 4], [5, 6]], "origin": ["real", "synthetic"]},
                      schema={"seq_id": pl.Int64, "items": pl.List(pl.Int32), "origin": pl.String})
    split = leave_one_out(df, 6)
    assert split.num_users == 1
    assert as_lists(split.train) == [[1, 2], [5, 6]]
    assert split.valid_target.tolist() == [3] and split.test_target.tolist() == [4]


@pytest.mark.parametrize("short", [[], [1], [1, 2]])
def test_leave_one_out_rejects_short_real_rows(short):
    df = pl.DataFrame({"seq_id": [1, 7, 3], "items": [[1, 2, 3], short, [1]],
                       "origin": ["real", "real", "synthetic"]},
                      schema={"seq_id": pl.Int64, "items": pl.List(pl.Int32), "origin": pl.String})
    with pytest.raises(RsirError, match="7"):
        leave_one_out(df, 3)


# --------------------------------------------------------------------------- windows
def ref_windows(rows, max_len):
    """(row, start-within-row, pairs) for each window, newest window first per row."""
    out = []
    for r, row in enumerate(rows):
        end = len(row) - 1
        while end > 0:
            start = max(end - max_len, 0)
            out.append((r, start, end - start))
            end = start
    return out


def window_rows(train: Ragged, windows) -> list[int]:
    return (np.searchsorted(train.offsets, windows.starts, side="right") - 1).tolist()


@pytest.mark.parametrize("max_len", [1, 2, 5, 8, 30])
@pytest.mark.parametrize("seed", range(3))
def test_training_windows(seed, max_len):
    rng = np.random.default_rng(seed)
    rows = random_rows(rng, 20, max_len=27)
    rows[0], rows[1] = [], [4]  # no windows for these
    train = ragged(rows)
    w = training_windows(train, max_len)
    rws = window_rows(train, w)
    got = sorted(zip(rws, (w.starts - train.offsets[rws]).tolist(), w.lengths.tolist()))
    assert got == sorted(ref_windows(rows, max_len))
    assert len(w) == len(got) and w.positions == sum(max(len(r) - 1, 0) for r in rows)
    assert (w.lengths >= 1).all() and (w.lengths <= max_len).all()
    # every target position (absolute index of a non-first item) is predicted exactly once,
    # and no window reads past the end of its row
    targets = np.concatenate([np.arange(s + 1, s + n + 1) for s, n in zip(w.starts, w.lengths)] + [[]])
    want = np.concatenate([np.arange(train.offsets[i] + 1, train.offsets[i + 1]) for i in range(len(rows))])
    assert sorted(targets.tolist()) == sorted(want.tolist())
    # counted back from the newest item: the newest window ends at the row's last item and
    # only the oldest window of a row may be shorter than max_len
    for r, row in enumerate(rows):
        mine = sorted((s, n) for rr, s, n in got if rr == r)
        if len(row) < 2:
            assert not mine
            continue
        assert mine[-1][0] + mine[-1][1] == len(row) - 1
        assert mine[0][0] == 0
        assert all(n == max_len for _, n in mine[1:])


def test_training_windows_empty():
    w = training_windows(ragged([[1], []]), 4)
    assert len(w) == 0 and w.positions == 0


@pytest.mark.parametrize("batch_size", [1, 3, 16, 500])
def test_window_batches_is_a_permutation(batch_size):
    rng = np.random.default_rng(0)
    train = ragged(random_rows(rng, 60, max_len=20))
    w = training_windows(train, 6)
    batches = window_batches(w, batch_size, np.random.default_rng(42))
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(w)))
    assert all(1 <= len(b) <= batch_size for b in batches)
    chunk = batch_size * 50
    expected = sum(-(-min(chunk, len(w) - c) // batch_size) for c in range(0, len(w), chunk))
    assert len(batches) == expected
    # batches group windows of similar length: each batch is sorted by length
    for b in batches:
        assert (np.diff(w.lengths[b]) >= 0).all()
    again = window_batches(w, batch_size, np.random.default_rng(42))
    assert len(again) == len(batches) and all(np.array_equal(a, b) for a, b in zip(again, batches))
    other = window_batches(w, batch_size, np.random.default_rng(43))
    assert not all(np.array_equal(a, b) for a, b in zip(other, batches)) or len(batches) == 1
    if len(batches) == 1:
        assert not np.array_equal(np.concatenate(other), flat)


def test_window_batches_empty():
    w = training_windows(ragged([[1]]), 4)
    assert window_batches(w, 8, np.random.default_rng(0)) == []


@pytest.mark.parametrize("seed", range(3))
def test_window_tensors(seed):
    rng = np.random.default_rng(seed)
    rows = random_rows(rng, 25, max_len=22)
    train = ragged(rows)
    max_len = 7
    w = training_windows(train, max_len)
    ref = sorted(ref_windows(rows, max_len))
    rws = window_rows(train, w)
    idx = rng.permutation(len(w))[:13]
    inputs, targets = window_tensors(train, w, idx)
    assert inputs.shape == targets.shape and inputs.dtype == torch.int64
    assert inputs.shape[1] == int(w.lengths[idx].max()) <= max_len
    want_in, want_tg = [], []
    for i in idx:
        row, s, n = rows[rws[i]], int(w.starts[i] - train.offsets[rws[i]]), int(w.lengths[i])
        assert (rws[i], s, n) in ref
        want_in.append(row[s:s + n])
        want_tg.append(row[s + 1:s + n + 1])
    assert inputs.tolist() == ref_left_pad(want_in)
    assert targets.tolist() == ref_left_pad(want_tg)
    # shifted by one within each window; padding coincides
    assert torch.equal(inputs != 0, targets != 0)
    real = inputs[:, 1:] != 0
    assert torch.equal(inputs[:, 1:][real & (inputs[:, :-1] != 0)], targets[:, :-1][real & (inputs[:, :-1] != 0)])
