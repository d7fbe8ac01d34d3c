"""The authors' generator, as the peer of our generator in benchmarks/generation_speed.py.

Follows `generate_and_save_sequences_parallel` in `model/basemodel.py` of the authors' release
(github.com/USTC-StarTeam/RSIR, commit 5eb326a), read for this benchmark (none of its code is
copied): rollouts are processed in batches of m copies per source; at every step ONE batched
forward scores all active rollouts (`all_scores = prediction_embeddings @ item_embedding.T`),
then a Python loop over the active rollouts does, per row:
  - the remaining real items: `set(original_seq) - set(generated_seq)`;
  - their ranks: `(scores_i > scores_i[remaining].unsqueeze(1)).sum(1) + 1`, a (|R|, N) compare,
    and the check `any(rank <= k)`;
  - the masking: a clone of the row with the generated items set to -inf;
  - the pool: the user's distinct items (probability p) or `arange(1, N)`, and its top-1.
What differs from the release, so that outputs can be checked equal to ours and to the oracle
(tests/oracle.py) and every implementation draws the same coins:
  - the pool coin is `pool_uniform(seed, rollout id, step) < p` (drawn for the step's active rows
    at once, as cheap as the release's `random.random()` per row), not Python's `random`;
  - the pick is `argmax` (ties to the lowest id; the release's `topk(…, 1)` leaves ties to the
    kernel), and a pool whose every unused score is -inf gives its lowest unused id, as the oracle;
  - ranks count ties against the item (`>=`, each item counting itself: the project's rank rule,
    tasks/ranking.py) where the release counts only strictly higher scores (`> … + 1`); the two
    agree whenever no scores tie, and the cost is the same compare;
  - the best rank is recorded (the fidelity trace) with a stop reason, which the release does not
    keep, and `tau=None` turns the check off.
"""

from __future__ import annotations

import torch

from tasks.rollout import pool_uniform

NO_REAL_ITEM = 0


@torch.no_grad()
def generate(model, sources: list[list[int]], m: int, tau: int | None, p: float, max_len: int, seed: int,
             batch_size: int = 1024) -> list[tuple[list[int], str, list[int]]]:
    """All rollouts (rollout id r = source index * m + j): (items, stop reason, trace)."""
    model.eval()
    rollouts = [(source, i * m + j) for i, source in enumerate(sources) for j in range(m)]
    out: list[tuple[list[int], str, list[int]]] = []
    for lo in range(0, len(rollouts), batch_size):
        out += _batch(model, rollouts[lo: lo + batch_size], tau, p, max_len, seed)
    return out


def _batch(model, rollouts: list[tuple[list[int], int]], tau: int | None, p: float, max_len: int, seed: int):
    B = len(rollouts)
    generated = torch.zeros(B, max_len, dtype=torch.long)
    generated[:, 0] = torch.tensor([source[0] for source, _ in rollouts])
    lengths = torch.ones(B, dtype=torch.long)
    active = torch.ones(B, dtype=torch.bool)
    ids = torch.tensor([rid for _, rid in rollouts])
    reasons: list[str | None] = [None] * B
    traces: list[list[int]] = [[] for _ in range(B)]
    for step in range(1, max_len):
        if not bool(active.any()):
            break
        active_rows = torch.where(active)[0]
        all_scores = model.score_last(generated[active_rows, :step]).float()  # every active row has `step` items
        num_items = all_scores.shape[1] - 1
        local = pool_uniform(seed, ids[active_rows], step - 1) < p
        next_items = torch.zeros(len(active_rows), dtype=torch.long)
        stopped = []
        for i, b in enumerate(active_rows.tolist()):
            source = rollouts[b][0]
            generated_seq = generated[b, : lengths[b]].tolist()
            # Quality verification: the best rank of a remaining real item.
            remaining = set(source) - set(generated_seq)
            if not remaining:
                traces[b].append(NO_REAL_ITEM)
                reasons[b] = "exhausted"
                stopped.append(i)
                continue
            scores_i = all_scores[i]
            remaining_tensor = torch.tensor(list(remaining))
            # >= where their release has >: the project's one rank rule (tasks/ranking.py), ties count
            # against; each item counts itself once, so no + 1 (identical whenever no scores tie); item 0
            # (padding) is not ranked.
            ranks = torch.sum(scores_i[1:] >= scores_i[remaining_tensor].unsqueeze(1), dim=1)
            best = int(ranks.min())
            traces[b].append(best)
            if tau is not None and best > tau:
                reasons[b] = "fidelity"
                stopped.append(i)
                continue
            # Decoding: shield the generated items, then the best of the pool.
            masked = scores_i.clone()
            masked[torch.tensor(generated_seq)] = float("-inf")
            pool = torch.tensor(sorted(set(source))) if bool(local[i]) else torch.arange(1, num_items + 1)
            candidate_scores = masked[pool]
            top = int(torch.argmax(candidate_scores))
            if candidate_scores[top] == float("-inf"):  # nothing scored: the lowest unused id, or none
                used = set(generated_seq)
                free = [item for item in pool.tolist() if item not in used]
                if not free:
                    reasons[b] = "no_candidate"
                    stopped.append(i)
                    continue
                next_items[i] = free[0]
            else:
                next_items[i] = pool[top]
        keep = torch.ones(len(active_rows), dtype=torch.bool)
        keep[stopped] = False
        active[active_rows[~keep]] = False
        grow = active_rows[keep]
        generated[grow, lengths[grow]] = next_items[keep]
        lengths[grow] += 1
        for b in grow[lengths[grow] == max_len].tolist():
            reasons[b] = "max_len"
            active[b] = False
    return [(generated[b, : lengths[b]].tolist(), reasons[b], traces[b]) for b in range(B)]
