"""The fidelity filter: cut semantics, length and duplicate rules, counts, re-filter equivalence."""

from __future__ import annotations

import numpy as np
import pytest

from core.errors import RsirError
from tasks.filter import filter_extensions, filter_rollouts
from tasks.generate import extend_sequences, generate_rollouts
from tasks.rollout import ACCEPTED, EXHAUSTED, FIDELITY, MAX_LEN, REJECTED, Extensions, GenerationParams, Rollouts
from test_generate import TieModel, ragged, random_sources, row, tiny_sasrec

pytestmark = pytest.mark.usefixtures("one_thread")


def make_rollouts(rows: list[tuple[list[int], list[int], int]], tau: int | None = None,
                  ids: list[int] | None = None) -> Rollouts:
    """rows: (items, trace, stop code); rollout ids 0.. (or `ids`), one source per rollout."""
    ids = list(range(len(rows))) if ids is None else ids
    return Rollouts(
        items=ragged([r[0] for r in rows]), source_index=np.array(ids, dtype=np.int64),
        rollout_id=np.array(ids, dtype=np.int64), stop_reason=np.array([r[2] for r in rows], dtype=np.int8),
        trace=ragged([r[1] for r in rows]), params=GenerationParams(tau=tau, max_len=6),
    )


def seqs_of(acc) -> list[list[int]]:
    return [row(acc.items, k) for k in range(len(acc))]


def test_cut_at_first_failed_check_keeps_t_plus_one_items():
    r = make_rollouts([
        ([1, 2, 3, 4, 5, 6], [2, 5, 1, 7, 3], MAX_LEN),
        ([7, 8, 9], [1, 1, 0], EXHAUSTED),  # the sentinel 0 never fails
        ([9, 10, 11, 12], [3, 3, 3, 9], FIDELITY),
    ])
    acc = filter_rollouts(r, tau=4, min_len=2, existing=None)
    assert seqs_of(acc) == [[1, 2], [7, 8, 9], [9, 10, 11, 12]]
    assert acc.counts.cut_by_tau == 2
    acc = filter_rollouts(r, tau=5, min_len=2, existing=None)
    assert seqs_of(acc) == [[1, 2, 3, 4], [7, 8, 9], [9, 10, 11, 12]]
    acc = filter_rollouts(r, tau=9, min_len=2, existing=None)
    assert seqs_of(acc) == [[1, 2, 3, 4, 5, 6], [7, 8, 9], [9, 10, 11, 12]]
    assert acc.counts.cut_by_tau == 0
    acc = filter_rollouts(r, tau=1, min_len=2, existing=None)
    assert seqs_of(acc) == [[7, 8, 9]]  # rows 0 and 2 fail at check 0: one item, too short
    assert acc.counts.too_short == 2 and acc.counts.cut_by_tau == 2


def test_cut_semantics_tau_one():
    r = make_rollouts([([1, 2, 3], [2, 1, 1], FIDELITY), ([4, 5, 6], [1, 1, 2], FIDELITY)])
    acc = filter_rollouts(r, tau=1, min_len=2, existing=None)
    assert seqs_of(acc) == [[4, 5, 6]]
    assert acc.counts.model_dump() == {"generated": 2, "cut_by_tau": 2, "too_short": 1, "duplicate_in_batch": 0,
                          "duplicate_of_existing": 0, "accepted": 1, "acceptance_rate": 0.5}


def test_min_len_and_fidelity_off_keeps_whole_rollouts():
    r = make_rollouts([([1, 2], [9, 9], FIDELITY), ([3, 4, 5], [50, 50, 0], EXHAUSTED),
                       ([6], [0], EXHAUSTED)])
    acc = filter_rollouts(r, tau=None, min_len=3, existing=None)
    assert seqs_of(acc) == [[3, 4, 5]] and acc.rollout_id.tolist() == [1]
    assert acc.counts.too_short == 2 and acc.counts.cut_by_tau == 0
    acc = filter_rollouts(r, tau=None, min_len=2, existing=None)
    assert seqs_of(acc) == [[1, 2], [3, 4, 5]]


def test_duplicates_in_batch_keep_lowest_rollout_id():
    rows = [([1, 2, 3], [1, 1, 1], FIDELITY), ([1, 2, 3, 4], [1, 1, 9, 1], FIDELITY),
            ([5, 6], [1, 0], EXHAUSTED), ([1, 2, 3], [1, 1, 1], FIDELITY), ([5, 6], [1, 0], EXHAUSTED)]
    ids = [4, 1, 3, 0, 2]  # given out of order on purpose
    acc = filter_rollouts(make_rollouts(rows, ids=ids), tau=5, min_len=2, existing=None)
    # after the cut: id4 [1,2,3], id1 [1,2,3], id3 [5,6], id0 [1,2,3], id2 [5,6]
    assert acc.rollout_id.tolist() == [0, 2]
    assert seqs_of(acc) == [[1, 2, 3], [5, 6]]
    assert acc.counts.duplicate_in_batch == 3 and acc.counts.accepted == 2


def test_duplicates_of_existing_dataset():
    rows = [([1, 2, 3], [1, 1, 0], EXHAUSTED), ([1, 2], [1, 0], EXHAUSTED), ([1, 2, 3], [1, 1, 0], EXHAUSTED),
            ([3, 2, 1], [1, 1, 0], EXHAUSTED)]
    existing = ragged([[1, 2, 3, 4], [1, 2, 3], [9]])
    acc = filter_rollouts(make_rollouts(rows), tau=None, min_len=2, existing=existing)
    assert seqs_of(acc) == [[1, 2], [3, 2, 1]] and acc.rollout_id.tolist() == [1, 3]
    c = acc.counts
    assert (c.duplicate_of_existing, c.duplicate_in_batch, c.accepted) == (2, 0, 2)
    assert c.generated == c.too_short + c.duplicate_in_batch + c.duplicate_of_existing + c.accepted
    empty = filter_rollouts(make_rollouts(rows), tau=None, min_len=2, existing=ragged([]))
    assert empty.counts.duplicate_in_batch == 1 and empty.counts.accepted == 3


def test_parent_source_index_is_carried():
    r = make_rollouts([([1, 2, 3], [1, 1, 0], EXHAUSTED), ([4, 5, 6], [1, 1, 0], EXHAUSTED)])
    r = Rollouts(r.items, np.array([7, 9]), r.rollout_id, r.stop_reason, r.trace, r.params)
    acc = filter_rollouts(r, tau=None, min_len=2, existing=None)
    assert acc.source_index.tolist() == [7, 9]


def test_errors():
    r = make_rollouts([([1, 2, 3], [1, 1, 0], EXHAUSTED)], tau=5)
    with pytest.raises(RsirError, match="tau"):
        filter_rollouts(r, tau=6, min_len=2, existing=None)
    with pytest.raises(RsirError, match="tau"):
        filter_rollouts(r, tau=0, min_len=2, existing=None)
    with pytest.raises(RsirError, match="min_len"):
        filter_rollouts(r, tau=5, min_len=1, existing=None)
    with pytest.raises(RsirError, match="fidelity off"):
        filter_rollouts(r, tau=None, min_len=2, existing=None)
    # tau=None is fidelity off: refused above for rollouts stopped at tau=5; at their own tau they pass
    assert filter_rollouts(r, tau=5, min_len=2, existing=None).counts.accepted == 1


def test_empty_rollouts():
    acc = filter_rollouts(make_rollouts([]), tau=None, min_len=2, existing=ragged([[1, 2]]))
    assert len(acc) == 0 and acc.counts.generated == 0 and acc.counts.acceptance_rate == 0.0


# --------------------------------------------------------------------------- against generation
@pytest.mark.parametrize("model_name,gen_tau", [("sasrec", 10), ("sasrec", None), ("ties", None), ("ties", 3)])
def test_refilter_equals_fresh_generation(model_name, gen_tau):
    if model_name == "sasrec":
        model, n = tiny_sasrec(25, 3), 25
    else:
        model, n = TieModel(20), 20
    seqs = random_sources(n, 25, seed=8)
    existing = ragged(seqs)
    base = GenerationParams(m=3, tau=gen_tau, p=0.5, seed=2, batch_size=16)
    once = generate_rollouts(model, existing, base)
    for tau in [t for t in (1, 2, 3, 5, 10) if gen_tau is None or t <= gen_tau]:
        fresh = generate_rollouts(model, existing, base.model_copy(update={"tau": tau}))
        for min_len in (2, 3):
            a = filter_rollouts(once, tau, min_len, existing)
            b = filter_rollouts(fresh, tau, min_len, existing)
            assert seqs_of(a) == seqs_of(b)
            assert a.rollout_id.tolist() == b.rollout_id.tolist()
            assert a.source_index.tolist() == b.source_index.tolist()
            assert a.counts == b.counts


def test_filter_output_is_clean():
    model = tiny_sasrec(30, 4)
    seqs = random_sources(30, 30, seed=1)
    r = generate_rollouts(model, ragged(seqs), GenerationParams(m=5, tau=None, p=0.5))
    existing = ragged(seqs)
    acc = filter_rollouts(r, tau=None, min_len=3, existing=existing)
    out = [tuple(s) for s in seqs_of(acc)]
    assert len(out) == len(set(out)) and not set(out) & {tuple(s) for s in seqs}
    assert all(len(s) >= 3 for s in out)
    assert np.all(np.diff(acc.rollout_id) > 0)
    c = acc.counts
    dropped = c.too_short + c.duplicate_in_batch + c.duplicate_of_existing
    assert c.generated == len(r) == dropped + c.accepted
    assert c.acceptance_rate == pytest.approx(c.accepted / len(r))
    for k, rid in enumerate(acc.rollout_id):
        assert row(acc.items, k) == row(r.items, int(rid))


def test_filter_extensions():
    ext = Extensions(items=ragged([[1, 2, 3], [1, 2, 3], [4, 5], [6, 7, 8], [1, 2, 3]]),
                     source_index=np.array([0, 2, 3, 4, 5]), prefix_len=np.array([2, 2, 1, 2, 2]),
                     stop_reason=np.array([ACCEPTED, ACCEPTED, ACCEPTED, REJECTED, ACCEPTED], dtype=np.int8),
                     trace=ragged([[1], [1], [1], [9], [1]]), holdout_h=1, params=GenerationParams(tau=3))
    acc = filter_extensions(ext, min_len=3, existing=ragged([[4, 5, 6]]))
    assert seqs_of(acc) == [[1, 2, 3]] and acc.source_index.tolist() == [0]
    assert acc.counts.model_dump() == {"generated": 5, "rejected": 1, "too_short": 1, "duplicate_in_batch": 2,
                          "duplicate_of_existing": 0, "accepted": 1, "acceptance_rate": 0.2}
    model = tiny_sasrec(30, 4)
    seqs = random_sources(30, 12, seed=6)
    real = extend_sequences(model, ragged(seqs), GenerationParams(m=3, tau=5), 1)
    acc = filter_extensions(real, min_len=3, existing=ragged(seqs))
    assert acc.counts.generated == len(real) and set(acc.source_index) <= set(real.source_index[real.accepted])
