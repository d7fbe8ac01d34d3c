"""Next-item losses shared by all backbones.

Every loss takes hidden states at the positions that have a target (P, d), the targets
(P,) with ids in 1..N, and the item embedding matrix (N+1, d) whose row 0 is padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def full_softmax_ce(hidden: torch.Tensor, targets: torch.Tensor, item_emb: torch.Tensor) -> torch.Tensor:
    logits = hidden @ item_emb.T
    logits[:, 0] = float("-inf")  # padding is never a valid next item
    return F.cross_entropy(logits, targets)


def sampled_softmax_ce(
    hidden: torch.Tensor, targets: torch.Tensor, item_emb: torch.Tensor, negatives: int,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Softmax over the target and `negatives` uniform items (per position); a negative that
    happens to equal the target is masked out rather than counted as a false negative."""
    num_items = item_emb.shape[0] - 1
    neg = torch.randint(1, num_items + 1, (hidden.shape[0], negatives), device=hidden.device)
    pos_logit = (hidden * item_emb[targets]).sum(-1, keepdim=True)
    neg_logit = torch.einsum("pd,pnd->pn", hidden, item_emb[neg])
    neg_logit = neg_logit.masked_fill(neg == targets[:, None], float("-inf"))
    logits = torch.cat([pos_logit, neg_logit], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros_like(targets))


def bce_one_negative(hidden: torch.Tensor, targets: torch.Tensor, item_emb: torch.Tensor) -> torch.Tensor:
    """The original SASRec loss: one uniform negative per position."""
    num_items = item_emb.shape[0] - 1
    neg = torch.randint(1, num_items + 1, targets.shape, device=hidden.device)
    pos_logit = (hidden * item_emb[targets]).sum(-1)
    neg_logit = (hidden * item_emb[neg]).sum(-1)
    keep = (neg != targets).float()
    pos_loss = F.binary_cross_entropy_with_logits(pos_logit, torch.ones_like(pos_logit))
    neg_loss = F.binary_cross_entropy_with_logits(neg_logit, torch.zeros_like(neg_logit), weight=keep)
    return pos_loss + neg_loss


def next_item_loss(
    kind: str, hidden: torch.Tensor, targets: torch.Tensor, item_emb: torch.Tensor, negatives: int,
    temperature: float = 1.0,
) -> torch.Tensor:
    if kind == "ce":
        return full_softmax_ce(hidden, targets, item_emb)
    if kind == "sampled":
        return sampled_softmax_ce(hidden, targets, item_emb, negatives, temperature)
    if kind == "bce":
        return bce_one_negative(hidden, targets, item_emb)
    raise ValueError(f"unknown loss {kind!r}")


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
