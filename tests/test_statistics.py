"""Dataset-version statistics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from tasks.statistics import approximate_entropy, gini, popularity_bins, popularity_entropy, version_statistics


def _seqs(rows):
    return pl.DataFrame({"seq_id": list(range(len(rows))), "items": [r[0] for r in rows],
                         "origin": [r[1] for r in rows]}, schema={"seq_id": pl.Int64, "items": pl.List(pl.Int32),
                                                                  "origin": pl.String})


def test_apen_matches_hand_computation():
    # symbols 0,0,1,1: Phi_1 = ln(2/4), Phi_2 = ln(1/3) -> ApEn = ln 1.5
    symbol = np.array([0, 0, 0, 1, 1])  # item id -> symbol (index 0 = padding)
    out = approximate_entropy(_seqs([([1, 2, 3, 4], "real"), ([1, 2], "real")]), symbol)
    assert out["seq_id"].to_list() == [0]  # the 2-item sequence is skipped
    assert out["apen"][0] == pytest.approx(math.log(1.5))
    # A constant sequence is perfectly regular: ApEn = 0.
    assert approximate_entropy(_seqs([([1, 2, 1, 2, 1], "real")]), np.zeros(5, int))["apen"][0] == pytest.approx(0.0)


def test_entropy_and_gini():
    assert popularity_entropy(np.array([1.0, 1.0, 0.0])) == pytest.approx(math.log(2))
    assert gini(np.array([5.0, 5.0, 5.0])) == pytest.approx(0.0)
    assert gini(np.array([0.0, 0.0, 9.0])) == pytest.approx(2 / 3)


def test_popularity_bins_are_equal_mass_most_popular_first():
    counts = np.array([50.0, 30.0, 10.0, 10.0, 0.0])
    sym = popularity_bins(counts, bins=2)
    assert sym.tolist() == [0, 0, 1, 1, 1, 1]


def test_version_statistics():
    seqs = _seqs([([1, 2, 3], "real"), ([2, 3, 4], "real"), ([1, 1, 2, 3], "synthetic")])
    st = version_statistics(seqs, num_items=4)
    assert (st.sequences, st.real_sequences, st.synthetic_sequences) == (3, 2, 1)
    assert st.interactions == 10 and st.synthetic_interactions == 4
    assert st.density == pytest.approx(10 / (2 * 4))
    assert st.pair_density == pytest.approx(9 / (2 * 4))  # item 1 twice in one sequence counts once
    assert st.mean_synthetic_length == 4
    counts = np.array([3, 3, 3, 1.0])
    assert st.item_entropy == pytest.approx(popularity_entropy(counts))
    assert st.item_entropy_normalised == pytest.approx(popularity_entropy(counts) / math.log(4))
    assert st.apen_real is not None and st.apen_synthetic is not None
