"""The one rank rule of the project: every rank rsir computes (evaluation, early stopping and the
champion choice through the metrics, the fidelity check of generation, the reports, the
benchmarks and the test oracles) is this one.

    rank(target) = 1 + #{other ranked items whose score is >= the target's score}

Ties count against the target (the pessimistic rank). Why not the strict count (1 + #{higher}),
the rule of the authors' release and of many SASRec ports: under it the target wins every tie,
so a model that scores every item alike (all-zero embeddings, or NaN everywhere) ranks every
target first and gets every metric = 1.0. Why not the expected rank under random tie-breaking
(1 + #{higher} + #{tied others} / 2): it is fractional, the metric of an expected rank is not
the expected metric, and it rewards a constant scorer with a rank of about N/2. The pessimistic
rank is an integer, needs no random draws, never rewards a tie, and equals the strict rank
whenever scores do not tie (the usual case with float32 scores of a trained model), so a
trained model's figures do not move. A set's best rank (the fidelity check: the best rank of a
user's remaining items) follows: it is the rank of the set's best-scoring member, i.e.
#{items scoring >= the set's best score}, counting tied members of the set against each other.

NaN and +inf scores are an error (`NonFiniteScores`), never a rank: NaN compares false with
everything, so any count-based rule would rank a NaN target first (or last) by accident, and
+inf only comes from a diverged model. A score of -inf is a model's way to say "never this
item" (a masked catalogue): it ranks below every finite score, tied with the other -inf items.
NaN or infinite weights and hidden states are errors too (a checkpoint, a generation step), as
is a non-finite training loss (tasks/train.py).
Source of the metric definitions: Krichene & Rendle, "On Sampled Metrics for Item
Recommendation" (KDD 2020), full ranking; ties: Sun et al., "Are We Evaluating Rigorously?"
(RecSys 2020), section 4.
"""

from __future__ import annotations

import torch

from core.errors import RsirError

COUNT_TILE = 2 ** 22  # floats of the comparison tile (16 MiB); also its widest block (< 2^24)


class NonFiniteScores(RsirError):
    """A model produced NaN or infinite scores (or weights): a diverged or corrupted model."""


def require_finite(values: torch.Tensor, what: str) -> None:
    """Raise NonFiniteScores naming `what` if any of `values` is NaN or ±inf. One pass, one sync."""
    if not bool(torch.isfinite(values).all()):
        bad = int((~torch.isfinite(values)).sum())
        raise NonFiniteScores(f"{what}: {bad} of {values.numel()} values are NaN or infinite "
                              "(a diverged or corrupted model)")


def require_rankable(scores: torch.Tensor, what: str) -> None:
    """Raise NonFiniteScores naming `what` if any score is NaN or +inf (-inf is a valid score)."""
    bad = ~(scores < float("inf"))  # NaN and +inf in one pass (NaN compares false)
    if bool(bad.any()):
        raise NonFiniteScores(f"{what}: {int(bad.sum())} of {scores.numel()} scores are NaN or +inf "
                              "(a diverged or corrupted model)")


def count_at_least(scores: torch.Tensor, threshold: torch.Tensor, tile: torch.Tensor) -> torch.Tensor:
    """(B,) int64 #{columns of scores (B, C) with a score >= threshold (B,)}, through `tile`, a
    flat float32 buffer of at least B x 1 values, a column block at a time. The 0/1 comparisons
    are summed as floats: on CPU that is several times faster than summing bools, and exact,
    since a block is at most COUNT_TILE < 2^24 columns wide (its partial sums are integers below
    2^24); blocks add up in int64."""
    B, C = scores.shape
    width = max(1, min(C, tile.numel() // max(B, 1)))
    total = torch.zeros(B, dtype=torch.int64, device=scores.device)
    for lo in range(0, C, width):
        block = scores[:, lo: lo + width]
        at_least = tile[: block.numel()].view(block.shape)
        total += torch.ge(block, threshold[:, None], out=at_least).sum(dim=1).long()
    return total


def new_tile(scores: torch.Tensor) -> torch.Tensor:
    return torch.empty(min(scores.numel(), COUNT_TILE), device=scores.device)


def best_rank(scores: torch.Tensor, top: torch.Tensor, tile: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) rank of the best member of a set of items whose best score per row is `top` (B,),
    among the items of scores (B, C) (without the padding column): #{items scoring >= top}, the
    set's best member counted once. Rows whose set is empty are meaningless, left to the caller."""
    return count_at_least(scores, top, new_tile(scores) if tile is None else tile)


def target_ranks(scores: torch.Tensor, targets: torch.Tensor,
                 excluded: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """(B,) int64 rank of each row's target. scores (B, N+1) with column 0 = padding (never
    ranked); targets (B,) in 1..N; excluded: flat (row, item) pairs removed from the ranking
    (the target is never removed, even when listed). Raises NonFiniteScores if a ranked score
    (items 1..N) is NaN or +inf."""
    require_rankable(scores[:, 1:], "model scores")
    target_score = scores.gather(1, targets[:, None]).squeeze(1)
    # Removed items become NaN in the copy: NaN is never >= anything, so they never count, even
    # against a target scored -inf (-inf is a valid score and cannot mark them).
    others = scores.clone()
    others[:, 0] = float("nan")
    if excluded is not None:
        others[excluded] = float("nan")
    others.scatter_(1, targets[:, None], float("nan"))  # the target counts once, below
    return 1 + count_at_least(others, target_score, new_tile(others))
