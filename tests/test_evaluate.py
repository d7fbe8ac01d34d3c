"""tasks.evaluate against a deliberately naive per-user reference."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import torch

from tasks.evaluate import (
    KS,
    MRR_K,
    evaluate_split,
    metric_names,
    metrics_from_ranks,
    rank_users,
    target_ranks,
)
from tasks.ragged import Ragged
from tasks.split import LeaveOneOut


# --------------------------------------------------------------------------- references
def ref_rank(scores: list[float], target: int, history: list[int], exclude_history: bool) -> int:
    """1 + number of other ranked items (never 0, never a history item other than the target)
    whose score is at least the target's: ties count against the target (tasks/ranking.py)."""
    excluded = {0}
    if exclude_history:
        excluded |= {h for h in history if h != target}
    t = scores[target]
    return 1 + sum(1 for i in range(len(scores)) if i not in excluded and i != target and scores[i] >= t)


def ref_metrics(ranks: list[int]) -> dict[str, float]:
    n = len(ranks)
    out = {}
    for k in KS:
        out[f"ndcg@{k}"] = sum(1.0 / math.log2(r + 1) if r <= k else 0.0 for r in ranks) / n
    for k in KS:
        out[f"recall@{k}"] = sum(1.0 if r <= k else 0.0 for r in ranks) / n
    out[f"mrr@{MRR_K}"] = sum(1.0 / r if r <= MRR_K else 0.0 for r in ranks) / n
    return out


def random_case(rng: np.random.Generator, users: int, num_items: int, score_range: int = 3):
    scores = rng.integers(0, score_range, size=(users, num_items + 1)).astype(np.float32)
    targets = rng.integers(1, num_items + 1, size=users)
    histories = []
    for u in range(users):
        h = list(rng.integers(1, num_items + 1, size=int(rng.integers(0, 12))))
        if rng.random() < 0.4:  # the target was consumed before
            h.insert(int(rng.integers(0, len(h) + 1)), int(targets[u]))
        histories.append([int(x) for x in h])
    return scores, targets, histories


def left_pad(rows: list[list[int]]) -> torch.Tensor:
    width = max([len(r) for r in rows] + [1])
    return torch.tensor([[0] * (width - len(r)) + r for r in rows], dtype=torch.int64)


def ragged(rows: list[list[int]]) -> Ragged:
    return Ragged.from_series(pl.Series(rows, dtype=pl.List(pl.Int64)))


# --------------------------------------------------------------------------- target_ranks
def pairs(history: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-user histories -> the flat (row, item) pairs target_ranks removes (as rank_users)."""
    return tuple(torch.from_numpy(a) for a in ragged(history).pairs(np.arange(len(history))))


def test_target_ranks_hand_made():
    # items 1..5; column 0 (padding) has the highest score but must never count.
    scores = torch.tensor([[9.0, 0.5, 3.0, 2.0, 2.0, 1.0]])
    assert target_ranks(scores, torch.tensor([2]), None).tolist() == [1]
    assert target_ranks(scores, torch.tensor([3]), None).tolist() == [3]  # the tie with item 4 counts against
    assert target_ranks(scores, torch.tensor([1]), None).tolist() == [5]
    # history {2, 5}: both removed; only items 3 and 4 remain above target 1.
    assert target_ranks(scores, torch.tensor([1]), pairs([[2, 5]])).tolist() == [3]
    # the target in the history is still ranked
    assert target_ranks(scores, torch.tensor([2]), pairs([[2, 2]])).tolist() == [1]
    assert target_ranks(scores, torch.tensor([4]), pairs([[4, 2]])).tolist() == [2]  # item 3 ties
    # the input is not modified
    assert scores[0, 0].item() == 9.0 and scores[0, 2].item() == 3.0


@pytest.mark.parametrize("exclude", [True, False])
@pytest.mark.parametrize("seed", range(5))
def test_target_ranks_matches_reference(seed, exclude):
    rng = np.random.default_rng(seed)
    scores, targets, histories = random_case(rng, users=40, num_items=15)
    got = target_ranks(torch.from_numpy(scores), torch.from_numpy(targets),
                       pairs(histories) if exclude else None)
    want = [ref_rank(scores[u].tolist(), int(targets[u]), histories[u], exclude) for u in range(40)]
    assert got.tolist() == want
    assert min(want) >= 1


def test_a_constant_scorer_ranks_every_target_last_not_first():
    """Every score equal (10 items): a tie with all 9 others, all counted against the target."""
    scores = torch.zeros(3, 11)
    assert target_ranks(scores, torch.tensor([1, 5, 10]), None).tolist() == [10, 10, 10]
    assert metrics_from_ranks(np.array([10, 10, 10]))["ndcg@5"] == 0.0


def expected_rank_under_random_ties(scores: list[float], target: int, ranked: list[int]) -> float:
    """The other rule the README weighs: the mean rank of the target over every order of its
    tied items (1 + #higher + #tied others / 2), computed by enumerating the orders."""
    from itertools import permutations

    tied = [i for i in ranked if scores[i] == scores[target]]
    higher = sum(1 for i in ranked if scores[i] > scores[target])
    orders = list(permutations(tied))
    return higher + sum(order.index(target) + 1 for order in orders) / len(orders)


def test_constant_scorer_on_the_short_dataset_both_rules():
    """Issue 21's `short` case: 5 items; the validation targets of users 3, 4, 5 and their
    histories (internal ids: raw 10..14 -> 1..5). A constant scorer: ties against the target give
    [4, 2, 3] (our rule), random tie-breaking would give [2.5, 1.5, 2] in expectation; the strict
    count that the target wins ties would give [1, 1, 1]."""
    targets, histories = [2, 2, 3], [[1], [3, 4, 1], [5, 4]]
    scores = torch.zeros(3, 6)
    ours = target_ranks(scores, torch.tensor(targets), pairs(histories)).tolist()
    assert ours == [4, 2, 3]
    expected = [expected_rank_under_random_ties([0.0] * 6, t, [i for i in range(1, 6) if i == t or i not in h])
                for t, h in zip(targets, histories)]
    assert expected == [2.5, 1.5, 2.0]
    assert all(o >= e for o, e in zip(ours, expected))  # ours never ranks a tie better than chance


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_infinite_scores_are_an_error_not_a_rank(bad):
    from tasks.ranking import NonFiniteScores

    scores = torch.rand(2, 6)
    scores[1, 3] = bad
    with pytest.raises(NonFiniteScores, match=r"model scores: 1 of 10 scores are NaN or \+inf"):
        target_ranks(scores, torch.tensor([1, 2]), None)
    scores[1, 3], scores[:, 0] = 0.5, bad  # column 0 (padding) is never ranked: any value is fine
    assert target_ranks(scores, torch.tensor([1, 2]), None).shape == (2,)


def test_minus_infinity_is_a_score_that_ranks_last_with_its_ties():
    """-inf says "never this item": below every finite score, tied with the other -inf items,
    and an excluded item is not counted whatever its score."""
    inf = float("-inf")
    scores = torch.tensor([[inf, 1.0, inf, inf, 0.5, inf]])
    assert target_ranks(scores, torch.tensor([2]), None).tolist() == [5]  # items 1, 4 above; 3, 5 tie
    assert target_ranks(scores, torch.tensor([2]), pairs([[3, 1]])).tolist() == [3]
    assert target_ranks(scores, torch.tensor([4]), pairs([[3, 1]])).tolist() == [1]


# --------------------------------------------------------------------------- metrics
def test_metrics_hand_made_values():
    m = metrics_from_ranks(np.array([1]))
    assert m["ndcg@5"] == pytest.approx(1.0) and m["recall@5"] == 1.0 and m["mrr@20"] == 1.0
    m = metrics_from_ranks(np.array([3]))
    assert m["ndcg@5"] == pytest.approx(0.5) and m["mrr@20"] == pytest.approx(1 / 3)
    m = metrics_from_ranks(np.array([7]))
    assert m["ndcg@5"] == 0.0 and m["recall@5"] == 0.0
    assert m["ndcg@10"] == pytest.approx(1 / 3) and m["recall@10"] == 1.0  # log2(8) = 3
    m = metrics_from_ranks(np.array([1, 3, 7, 30]))
    assert m["ndcg@5"] == pytest.approx((1 + 0.5) / 4)
    assert m["ndcg@10"] == pytest.approx((1 + 0.5 + 1 / 3) / 4)
    assert m["ndcg@20"] == pytest.approx((1 + 0.5 + 1 / 3) / 4)
    assert m["recall@5"] == 0.5 and m["recall@10"] == 0.75 and m["recall@20"] == 0.75
    assert m["mrr@20"] == pytest.approx((1 + 1 / 3 + 1 / 7) / 4)
    # boundaries are inclusive: rank k counts for @k, rank 21 counts for nothing
    m = metrics_from_ranks(np.array([20]))
    assert m["recall@20"] == 1.0 and m["recall@10"] == 0.0 and m["mrr@20"] == pytest.approx(1 / 20)
    m = metrics_from_ranks(np.array([21]))
    assert all(v == 0.0 for v in m.values())


def test_metrics_names_and_empty():
    assert list(metrics_from_ranks(np.array([2, 4]))) == metric_names()
    empty = metrics_from_ranks(np.array([], dtype=np.int64))
    assert list(empty) == metric_names() and all(math.isnan(v) for v in empty.values())


@pytest.mark.parametrize("seed", range(3))
def test_metrics_match_reference(seed):
    ranks = np.random.default_rng(seed).integers(1, 40, size=57)
    got = metrics_from_ranks(ranks)
    want = ref_metrics(ranks.tolist())
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-12), k


# --------------------------------------------------------------------------- rank_users
NUM_ITEMS = 25
TABLE_ROWS = 97


def tail_key(items: list[int]) -> int:
    """A padding-invariant fingerprint of a sequence: positions counted from the newest item."""
    return sum(int(x) * (j + 1) for j, x in enumerate(reversed(items))) % TABLE_ROWS


class StubModel(torch.nn.Module):
    """score_last looks scores up in a fixed table keyed by the (left-padded) input sequence."""

    def __init__(self, table: np.ndarray):
        super().__init__()
        self.register_buffer("table", torch.from_numpy(table))
        self.calls: list[tuple[int, int, bool]] = []

    def score_last(self, seqs: torch.Tensor) -> torch.Tensor:
        self.calls.append((seqs.shape[0], seqs.shape[1], self.training))
        weights = torch.arange(seqs.shape[1], 0, -1, dtype=torch.int64)  # newest item has weight 1
        keys = (seqs * weights).sum(dim=1) % TABLE_ROWS
        return self.table[keys].clone()


def make_users(rng: np.random.Generator, users: int):
    rows, targets = [], []
    for _ in range(users):
        n = int(rng.integers(0, 14))
        row = [int(x) for x in rng.integers(1, NUM_ITEMS + 1, size=n)]
        t = int(rng.choice(row)) if row and rng.random() < 0.4 else int(rng.integers(1, NUM_ITEMS + 1))
        rows.append(row)
        targets.append(t)
    return rows, np.array(targets, dtype=np.int64)


def ref_rank_users(table: np.ndarray, rows, targets, max_len: int, exclude: bool) -> list[int]:
    out = []
    for row, t in zip(rows, targets):
        scores = table[tail_key(row[-max_len:])].tolist()  # only the newest max_len items are input
        out.append(ref_rank(scores, int(t), row, exclude))  # but the whole history is excluded
    return out


@pytest.mark.parametrize("exclude", [True, False])
@pytest.mark.parametrize("seed", range(3))
def test_rank_users_matches_reference_for_any_batch_size(seed, exclude):
    rng = np.random.default_rng(100 + seed)
    table = rng.integers(0, 4, size=(TABLE_ROWS, NUM_ITEMS + 1)).astype(np.float32)
    rows, targets = make_users(rng, 37)
    inputs = ragged(rows)
    max_len = 6
    want = ref_rank_users(table, rows, targets, max_len, exclude)
    model = StubModel(table)
    for bs in (1, 3, 8, 37, 512):
        got = rank_users(model, inputs, targets, max_len, batch_size=bs, exclude_history=exclude)
        assert got.tolist() == want, f"batch_size={bs}"
    # the window really is the newest max_len items: a longer window gives other ranks here
    assert ref_rank_users(table, rows, targets, 100, exclude) != want


def test_rank_users_eval_mode_and_restores_training_flag():
    rng = np.random.default_rng(7)
    table = rng.integers(0, 4, size=(TABLE_ROWS, NUM_ITEMS + 1)).astype(np.float32)
    rows, targets = make_users(rng, 10)
    model = StubModel(table)
    model.train()
    rank_users(model, ragged(rows), targets, max_len=5, batch_size=4)
    assert model.training
    assert [c[0] for c in model.calls] == [4, 4, 2]
    assert all(not training for _, _, training in model.calls)
    assert all(width <= 5 for _, width, _ in model.calls)
    model.eval()
    rank_users(model, ragged(rows), targets, max_len=5)
    assert not model.training


def test_rank_users_no_users():
    model = StubModel(np.zeros((TABLE_ROWS, NUM_ITEMS + 1), np.float32))
    got = rank_users(model, ragged([]), np.zeros(0, np.int64), max_len=5)
    assert got.shape == (0,)


def test_evaluate_split_uses_the_right_inputs():
    rng = np.random.default_rng(11)
    table = rng.integers(0, 4, size=(TABLE_ROWS, NUM_ITEMS + 1)).astype(np.float32)
    valid_rows, valid_t = make_users(rng, 20)
    test_rows, test_t = make_users(rng, 20)
    split = LeaveOneOut(train=ragged([]), valid_input=ragged(valid_rows), valid_target=valid_t,
                        test_input=ragged(test_rows), test_target=test_t, num_items=NUM_ITEMS)
    model = StubModel(table)
    for which, rows, t in (("valid", valid_rows, valid_t), ("test", test_rows, test_t)):
        for exclude in (True, False):
            got = evaluate_split(model, split, which, max_len=4, batch_size=6, exclude_history=exclude)
            want = ref_metrics(ref_rank_users(table, rows, t, 4, exclude))
            assert got == pytest.approx(want)
    with pytest.raises(ValueError, match="which"):
        evaluate_split(model, split, "train", max_len=4)


def test_rank_users_memory_does_not_grow_with_the_longest_history(monkeypatch):
    """One user with 200,000 interactions among short ones: history exclusion works on the flat
    ragged values, so no (batch, longest history) tensor is built, and the ranks are unchanged."""
    import tasks.ragged

    rng = np.random.default_rng(5)
    table = rng.integers(0, 4, size=(TABLE_ROWS, NUM_ITEMS + 1)).astype(np.float32)
    rows, targets = make_users(rng, 40)
    rows[17] = [int(x) for x in rng.integers(1, NUM_ITEMS + 1, size=200_000)]
    inputs, max_len = ragged(rows), 6
    real_gather = tasks.ragged.gather_padded

    def bounded(values, starts, lengths, shift=0):
        assert int(lengths.max(initial=0)) <= max_len, "a padded tensor wider than max_len"
        return real_gather(values, starts, lengths, shift)

    monkeypatch.setattr(tasks.ragged, "gather_padded", bounded)
    model = StubModel(table)
    for exclude in (True, False):
        want = ref_rank_users(table, rows, targets, max_len, exclude)
        for bs in (7, 64):
            got = rank_users(model, inputs, targets, max_len, batch_size=bs, exclude_history=exclude)
            assert got.tolist() == want, (exclude, bs)
