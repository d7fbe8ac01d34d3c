"""Deliberately simple reference for tasks.generate: one rollout at a time, plain Python loops,
written from the description in ../shared/docs/rsir-method.md (section 3). Slow on purpose; only the
model call (on a single unpadded (1, L) sequence) and the pool draw (`pool_uniform`) are shared
with the vectorized code."""

from __future__ import annotations

import torch

from tasks.rollout import pool_uniform

NO_REAL_ITEM = 0


def scores_of(model, seq: list[int], window: int) -> list[float]:
    """Next-item scores of items 0..N given the newest `window` items of seq (index 0 unused)."""
    x = torch.tensor([seq[-window:]], dtype=torch.int64)
    with torch.no_grad():
        return model.score_last(x)[0].float().tolist()


def rank_of(scores: list[float], item: int) -> int:
    """The project's rank rule (tasks/ranking.py), from its definition: 1 + the other items
    1..N scoring at least as high (ties count against the item)."""
    return 1 + sum(1 for i in range(1, len(scores)) if i != item and scores[i] >= scores[item])


def greedy(scores: list[float], pool: list[int]) -> int | None:
    """Highest score; ties go to the lowest item id. None for an empty pool."""
    best = None
    for i in sorted(pool):
        if best is None or scores[i] > scores[best]:
            best = i
    return best


def draw_local(seed: int, rollout_id: int, step: int, p: float) -> bool:
    return bool(pool_uniform(seed, torch.tensor([rollout_id]), step)[0] < p)


def rollout(model, source: list[int], rollout_id: int, tau: int | None, p: float, max_len: int,
            seed: int) -> tuple[list[int], str, list[int]]:
    """One rollout: (items, stop reason, trace of best ranks, 0 = no real item left)."""
    model.eval()
    num_items = None
    S = set(source)
    g = [source[0]]
    trace: list[int] = []
    while True:
        scores = scores_of(model, g, max_len)
        num_items = len(scores) - 1
        # Fidelity check: the user's real items not yet in the rollout.
        R = [i for i in S if i not in g]
        if not R:
            trace.append(NO_REAL_ITEM)
            return g, "exhausted", trace
        # Rank falls as the score rises, so the best rank over R is the rank of R's best item
        # (the same as min(rank_of(scores, i) for i in R), in O(N) instead of O(|R| N); tied
        # members of R count against each other, as any tie does).
        best = rank_of(scores, max(R, key=lambda i: scores[i]))
        trace.append(best)
        if tau is not None and best > tau:
            return g, "fidelity", trace
        # Decoding: the user's items with probability p, else all items; never one already used.
        step = len(g) - 1
        pool = S if draw_local(seed, rollout_id, step, p) else range(1, num_items + 1)
        item = greedy(scores, [i for i in pool if i not in g])
        if item is None:
            return g, "no_candidate", trace
        g.append(item)
        if len(g) == max_len:
            return g, "max_len", trace


def generate(model, sources: list[list[int]], m: int, tau: int | None, p: float, max_len: int,
             seed: int) -> list[tuple[list[int], str, list[int]]]:
    """All rollouts, rollout id r = source index * m + j."""
    return [rollout(model, s, i * m + j, tau, p, max_len, seed)
            for i, s in enumerate(sources) for j in range(m)]


def extend(model, source: list[int], source_index: int, h: int, m: int, tau: int | None, p: float,
           window: int, seed: int) -> tuple[list[int], str, list[int]]:
    """Second reading: extend source[:-h] by up to m items; accept at the first step after which
    a held-out item (not in the sequence) ranks <= tau."""
    model.eval()
    S = set(source)
    held = set(source[-h:])
    seq = list(source[:-h])
    trace: list[int] = []
    for j in range(m + 1):
        scores = scores_of(model, seq, window)
        if j >= 1:
            R = [i for i in held if i not in seq]
            if not R:
                trace.append(NO_REAL_ITEM)
                return seq, "exhausted", trace
            best = rank_of(scores, max(R, key=lambda i: scores[i]))
            trace.append(best)
            if tau is None or best <= tau:
                return seq, "accepted", trace
        if j == m:
            return seq, "rejected", trace
        pool = S if draw_local(seed, source_index, j, p) else range(1, len(scores))
        item = greedy(scores, [i for i in pool if i not in seq])
        if item is None:
            return seq, "no_candidate", trace
        seq.append(item)
    raise AssertionError("unreachable")
