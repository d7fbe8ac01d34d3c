"""Next-item losses shared by all backbones.

Each loss gives one value per target position (P of them) from the hidden states, the
targets (ids in 1..N; 0 = no target) and the item embedding matrix (N+1, d) whose row 0 is
padding. Without `weights` a backbone's loss is the mean over the P positions; with `weights` it
is the weighted sum Σ w_p ℓ_p (the trainer normalises the weights so that every target position of
an epoch weighs the same, synthetic ones times λ: see tasks/split.batch_scales).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from models.padding import length_groups, spans, splits_pay

# Rounds of redrawing negatives that hit an excluded item; after them a leftover hit (about
# (|excluded|/N)^5 of the draws) is masked out instead of being counted as a negative.
_REDRAWS = 4


def reduce_positions(per_position: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """(P,) losses -> their mean, or Σ w ℓ with per-position weights (P,)."""
    if weights is None:
        return per_position.mean()
    return (per_position * weights).sum()


def full_softmax_ce(hidden: torch.Tensor, targets: torch.Tensor, item_emb: torch.Tensor) -> torch.Tensor:
    """(P,) cross-entropy of every target (P,) in 1..N against all N items: hidden (P, d),
    item_emb (N+1, d) whose row 0 (padding) is never a candidate. Equal to
    F.cross_entropy(hidden @ item_emb.T with column 0 at -inf, targets) up to float rounding."""
    return _FullSoftmaxCE.apply(hidden, item_emb, targets)


class _FullSoftmaxCE(torch.autograd.Function):
    """The full softmax with one (P, N) buffer instead of five: F.cross_entropy on masked logits
    allocates the logits, the in-place -inf column's copy for autograd, the log-softmax, the
    gradient's zeros and its log-softmax backward, each a fresh P x N tensor (36 MB at P = 740,
    N = 12,101), paid in page faults and memory passes: 39% of a default training step on Amazon
    Beauty (torch.profiler, threads 1), beside 46% for the three matrix products. Here the buffer
    holds exp(logit - max) after the forward and becomes the logits' gradient in the backward.

    loss_p = log Σ_i exp(h_p·e_i) - h_p·e_t(p), i in 1..N; d loss_p / d logit_pi = softmax_pi - [i = t(p)]."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, item_emb: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        items = item_emb[1:]  # padding is never a candidate: left out, not set to -inf
        shifted = hidden @ items.T  # (P, N)
        top = shifted.amax(dim=1, keepdim=True) if len(shifted) else shifted.new_zeros(0, 1)
        total = shifted.sub_(top).exp_().sum(dim=1, keepdim=True)  # the buffer is now exp(logit - max)
        ctx.save_for_backward(hidden, item_emb, targets, shifted, total)
        return (top + total.log()).squeeze(1) - (hidden * item_emb[targets]).sum(dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        hidden, item_emb, targets, shifted, total = ctx.saved_tensors
        items = item_emb[1:]
        # In place on the saved buffer: a second backward through this graph fails loudly on
        # autograd's version check instead of reading a gradient as probabilities.
        grad_logits = shifted.mul_(grad[:, None] / total)  # softmax x grad
        grad_hidden = grad_logits @ items - grad[:, None] * item_emb[targets]
        grad_emb = torch.zeros_like(item_emb)
        grad_emb[1:] = grad_logits.T @ hidden
        grad_emb.index_add_(0, targets, -grad[:, None] * hidden)
        return grad_hidden, grad_emb, None


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


def sampled_softmax_ce(hidden: torch.Tensor, targets: torch.Tensor, item_emb: torch.Tensor, neg: torch.Tensor,
                       usable: torch.Tensor) -> torch.Tensor:
    """(P,) softmax cross-entropy of each target position (targets != 0, row-major order) over its
    target and its row's negatives neg (B, K) that are `usable` (B, K) (draw_negatives);
    hidden (B, L, d), targets (B, L).

    One draw per row keeps the cost at B·L·K logits (per-position draws gather a (positions, K, d)
    tensor: ~0.8 GB per batch of 256 × 50 at d = 64), and only the columns from the first target
    on are scored, the mask and the softmax at the P target positions only. A negative equal to a
    position's target is masked for that position, not counted as a false negative."""
    has_target = targets != 0
    first = int(has_target.any(dim=0).to(torch.uint8).argmax()) if has_target.any() else targets.shape[1]
    hidden, targets, has_target = hidden[:, first:], targets[:, first:], has_target[:, first:]
    row = has_target.nonzero()[:, 0]  # (P,) the row of each target position
    target = targets[has_target]
    pos_logit = (hidden[has_target] * item_emb[target]).sum(-1)  # (P,)
    neg_logit = torch.bmm(hidden, item_emb[neg].transpose(1, 2))[has_target]  # (P, K)
    masked = ~usable[row] | (neg[row] == target[:, None])
    logits = torch.cat([pos_logit[:, None], neg_logit.masked_fill(masked, float("-inf"))], dim=1)
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


def sequence_loss(config, encode: Callable[[torch.Tensor], torch.Tensor], seqs: torch.Tensor, targets: torch.Tensor,
                  item_emb: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The next-item loss of a backbone (config.loss) over every position whose target is not
    padding, reduced by `reduce_positions`.

    encode: left-padded rows (B', L') -> (B', L', d) hidden states as the scores use them (scaled);
    seqs and targets (B, L); weights (B, L) per-position weights or None (mean over target
    positions); item_emb (N+1, d). With config.negatives_exclude_input (loss=sampled), a row's
    negatives avoid its input items.

    The batch is encoded in length groups (models/padding.py: on a CPU, rows of similar length,
    each group cut to its longest row), which equals encoding it whole up to float rounding, as
    encode ignores leading padding columns; only the random draws (dropout) land elsewhere when
    there is more than one group. With one group (every length-batched batch of the default
    trainer) the computation and the draws are those of the whole padded batch."""
    groups = length_groups(spans(seqs, targets), splits_pay(seqs.device))
    # Every group encoded before the negatives are drawn: with one group, dropout then negatives
    # draw in the order (and the shapes) they always did.
    hidden = [encode(group.take(seqs)) for group in groups]
    group_targets = [group.take(targets) for group in groups]
    has_target = [t != 0 for t in group_targets]

    def at_targets(per_group: list[torch.Tensor]) -> torch.Tensor:  # (P, ...), group by group
        return torch.cat([x[m] for x, m in zip(per_group, has_target)])

    if config.loss == "ce":
        per_position = full_softmax_ce(at_targets(hidden), at_targets(group_targets), item_emb)
    elif config.loss == "sampled":
        exclude = seqs if config.negatives_exclude_input else None
        neg, usable = draw_negatives(seqs.shape[0], item_emb.shape[0] - 1, config.negatives, exclude, seqs.device)
        per_position = torch.cat([sampled_softmax_ce(h, t, item_emb, g.pick(neg), g.pick(usable))
                                  for g, h, t in zip(groups, hidden, group_targets)])
    elif config.loss == "bce":
        per_position = bce_one_negative(at_targets(hidden), at_targets(group_targets), item_emb)
    else:
        raise ValueError(f"unknown loss {config.loss!r}")
    return reduce_positions(per_position, None if weights is None else at_targets([g.take(weights) for g in groups]))
