"""tasks.ragged's operations against plain Python lists (Ragged itself and gather_padded: test_split.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tasks.ragged import Ragged, concat, flatten, joined, left_aligned, newest, offsets_of, slices


def ragged(rows: list[list[int]]) -> Ragged:
    return Ragged(np.array([x for r in rows for x in r], dtype=np.int64), offsets_of(np.array([len(r) for r in rows])))


def as_lists(r: Ragged) -> list[list[int]]:
    return [r.values[r.offsets[i]: r.offsets[i + 1]].tolist() for i in range(len(r))]


def random_rows(seed: int, n: int = 9, longest: int = 7) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 20, size=int(rng.integers(0, longest + 1))).tolist() for _ in range(n)]


@pytest.mark.parametrize("seed", range(4))
def test_take_slices_and_coordinates_match_lists(seed):
    rows = random_rows(seed)
    r = ragged(rows)
    pick = np.array([3, 0, 3, 8, 5])
    assert as_lists(r.take(pick)) == [rows[i] for i in pick]
    cut = np.array([min(2, len(rows[i])) for i in pick])
    assert as_lists(r.take(pick, cut)) == [rows[i][:c] for i, c in zip(pick, cut)]
    starts, ends = r.offsets[pick] + np.minimum(1, r.lengths[pick]), r.offsets[pick + 1]
    assert as_lists(slices(r.values, starts, ends)) == [rows[i][1:] for i in pick]
    row, col = r.coordinates()
    assert list(zip(row.tolist(), col.tolist())) == [(i, j) for i, x in enumerate(rows) for j in range(len(x))]
    assert r.to_series().to_list() == rows


def test_concat_and_joined_match_lists():
    a, b = random_rows(7, n=4), random_rows(8, n=3)
    parts = [ragged(a), ragged(b)]
    assert as_lists(concat([p.values for p in parts], [p.lengths for p in parts])) == a + b
    assert as_lists(concat([], [])) == []
    first, second = ragged(a), ragged(random_rows(9, n=4))
    values, lengths = joined(first, second.values, second.lengths)
    assert as_lists(Ragged(values, offsets_of(lengths))) == [x + y for x, y in zip(a, as_lists(second))]


def test_left_aligned_flatten_and_newest_round_trip():
    rows = [r or [1] for r in random_rows(3)]
    r = ragged(rows)
    width = max(map(len, rows)) + 2
    buf = left_aligned(r.values, r.offsets[:-1], r.lengths, width)
    assert buf.tolist() == [x + [0] * (width - len(x)) for x in rows]
    values, lengths = flatten(torch.from_numpy(buf), torch.from_numpy(r.lengths))
    assert as_lists(Ragged(values, offsets_of(lengths))) == rows
    window = newest(torch.from_numpy(buf), torch.from_numpy(r.lengths), 3)
    assert window.tolist() == [[0] * (min(3, max(map(len, rows))) - len(x[-3:])) + x[-3:] for x in rows]
