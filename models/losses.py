"""Next-item losses shared by all backbones.

Each loss gives one value per target position (P of them) from the hidden states, the
targets (ids in 1..N; 0 = no target) and the item embedding matrix (N+1, d) whose row 0 is
padding. Without `weights` a backbone's loss is the mean over the P positions; with `weights` it
is the weighted sum Σ w_p ℓ_p (the trainer normalises the weights so that every target position of
an epoch weighs the same, synthetic ones times λ: see tasks/split.batch_scales).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Rounds of redrawing negatives that hit an excluded item; after them a leftover hit (about
# (|excluded|/N)^5 of the draws) is masked out instead of being counted as a negative.
_REDRAWS = 4


def reduce_positions(per_position: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """(P,) losses -> their mean, or Σ w ℓ with per-position weights (P,)."""
    if weights is None:
        return per_position.mean()
    return (per_position * weights).sum()


def full_softmax_ce(hidden: torch.Tensor, targets: torch.Tensor, item_emb: torch.Tensor) -> torch.Tensor:
    """(P,) cross-entropy of every target against all N items."""
    logits = hidden @ item_emb.T
    logits[:, 0] = float("-inf")  # padding is never a valid next item
    return F.cross_entropy(logits, targets, reduction="none")


def is_member(values: torch.Tensor, sets: torch.Tensor, ordered: bool = False) -> torch.Tensor:
    """values (P, K) ids, sets (P, S) ids (0 = padding, never a member) -> (P, K) bool: is
    values[p, k] one of sets[p]? Sorted search: O(P K log S), no (P, N) mask. `ordered`: each row
    of `sets` is already ascending."""
    if not ordered:
        sets = sets.sort(dim=1).values
    idx = torch.searchsorted(sets, values).clamp(max=sets.shape[1] - 1)
    return (sets.gather(1, idx) == values) & (values != 0)


def draw_negatives(rows: int, num_items: int, negatives: int, exclude: torch.Tensor | None,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform negatives (rows, negatives) in 1..N, one set per sequence shared by its positions,
    and a mask of the usable ones: never an item of `exclude` (rows, S) when given (the release
    draws negatives outside the input sequence). Hits are redrawn, so almost all are usable."""
    neg = torch.randint(1, num_items + 1, (rows, negatives), device=device)
    if exclude is None:
        return neg, torch.ones_like(neg, dtype=torch.bool)
    exclude = exclude.sort(dim=1).values  # once, not per redraw
    hit = is_member(neg, exclude, ordered=True)
    for _ in range(_REDRAWS):
        if not bool(hit.any()):
            break
        neg = torch.where(hit, torch.randint_like(neg, 1, num_items + 1), neg)
        hit = is_member(neg, exclude, ordered=True)
    return neg, ~hit


def sampled_softmax_ce(hidden: torch.Tensor, targets: torch.Tensor, item_emb: torch.Tensor, negatives: int,
                       exclude: torch.Tensor | None = None) -> torch.Tensor:
    """(P,) softmax cross-entropy of each target position (targets != 0, row-major order) over its
    target and the `negatives` uniform items drawn for its row; hidden (B, L, d), targets (B, L).

    One draw per row keeps the cost at B·L·negatives logits (per-position draws gather a
    (positions, negatives, d) tensor: ~0.8 GB per batch of 256 × 50 at d = 64). A negative equal
    to a position's target is masked for that position, not counted as a false negative."""
    neg, usable = draw_negatives(hidden.shape[0], item_emb.shape[0] - 1, negatives, exclude, hidden.device)
    has_target = targets != 0
    pos_logit = (hidden * item_emb[targets]).sum(-1)  # (B, L)
    neg_logit = torch.einsum("bld,bkd->blk", hidden, item_emb[neg])  # (B, L, negatives)
    masked = ~usable[:, None, :] | (neg[:, None, :] == targets[:, :, None])
    neg_logit = neg_logit.masked_fill(masked, float("-inf"))
    logits = torch.cat([pos_logit[has_target][:, None], neg_logit[has_target]], dim=1)
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device),
                           reduction="none")


def bce_one_negative(hidden: torch.Tensor, targets: torch.Tensor, item_emb: torch.Tensor) -> torch.Tensor:
    """(P,) original SASRec loss: one uniform negative per position."""
    num_items = item_emb.shape[0] - 1
    neg = torch.randint(1, num_items + 1, targets.shape, device=hidden.device)
    pos_logit = (hidden * item_emb[targets]).sum(-1)
    neg_logit = (hidden * item_emb[neg]).sum(-1)
    keep = (neg != targets).float()
    pos_loss = F.binary_cross_entropy_with_logits(pos_logit, torch.ones_like(pos_logit), reduction="none")
    neg_loss = F.binary_cross_entropy_with_logits(neg_logit, torch.zeros_like(neg_logit), reduction="none")
    return pos_loss + keep * neg_loss


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 1.0,
             similarity: str = "dot") -> torch.Tensor:
    """NT-Xent over 2B views with in-batch negatives: view i of z1 is the positive of view i of
    z2 and every other view of the batch (both sides, except itself) is a negative.

    z1, z2: (B, d) representations of two views of the same B sequences. B = 1 gives 0 (no
    negatives). similarity: "dot" (inner product, as CL4SRec/RecBole) or "cosine" (SimCLR)."""
    if similarity == "cosine":
        z1, z2 = F.normalize(z1, dim=-1), F.normalize(z2, dim=-1)
    elif similarity != "dot":
        raise ValueError(f"unknown similarity {similarity!r}")
    B = z1.shape[0]
    z = torch.cat([z1, z2], dim=0)
    logits = (z @ z.T) / temperature
    self_pair = torch.eye(2 * B, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_pair, float("-inf"))
    idx = torch.arange(B, device=z.device)
    labels = torch.cat([idx + B, idx])
    return F.cross_entropy(logits, labels)


def sequence_loss(config, hidden: torch.Tensor, seqs: torch.Tensor, targets: torch.Tensor,
                  item_emb: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The next-item loss of a backbone (config.loss) over every position whose target is not
    padding, reduced by `reduce_positions`.

    hidden (B, L, d) encoder states, already scaled as the scores are; seqs and targets (B, L);
    weights (B, L) per-position weights or None (mean over target positions); item_emb (N+1, d).
    With config.negatives_exclude_input (loss=sampled), a row's negatives avoid its input items."""
    has_target = targets != 0
    if config.loss == "ce":
        per_position = full_softmax_ce(hidden[has_target], targets[has_target], item_emb)
    elif config.loss == "sampled":
        exclude = seqs if config.negatives_exclude_input else None
        per_position = sampled_softmax_ce(hidden, targets, item_emb, config.negatives, exclude)
    elif config.loss == "bce":
        per_position = bce_one_negative(hidden[has_target], targets[has_target], item_emb)
    else:
        raise ValueError(f"unknown loss {config.loss!r}")
    return reduce_positions(per_position, None if weights is None else weights[has_target])
