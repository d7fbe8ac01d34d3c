"""CL4SRec (Xie et al., 2022): the SASRec encoder trained with next-item loss plus a
contrastive (InfoNCE) term between two augmented views of every training sequence.

Augmentations (one drawn uniformly per sequence and view, as in the paper), on the n real
items of a left-padded row (real items are the contiguous right end of the row):
  crop    keep a random contiguous sub-sequence of ceil(crop_ratio * n) items (>= 1);
  mask    replace floor(mask_ratio * n) random items by the mask token (id num_items + 1);
  reorder shuffle a random contiguous span of floor(reorder_ratio * n) items.
Views stay left-padded at the input width. Everything is vectorized (random keys + argsort /
gather); randomness comes from torch's global RNG (seeded by training).

The mask token lies outside the item range 1..N: its embedding is a separate learned vector
held by `MaskableEmbedding`, so `item_emb.weight` keeps exactly N+1 rows and `item_scores`
never scores the mask token. The sequence representation for the contrastive term is the
hidden state at the last (newest) position.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field

from models.layers import POSITIONS_HELP, Positions
from models.losses import info_nce
from models.sasrec import SASRec

if TYPE_CHECKING:  # annotations only: models.config's validators import the registry (no circle)
    from models.config import ModelConfig

CROP, MASK, REORDER = 0, 1, 2
_EPS = 1e-9  # so that e.g. 0.2 * 15 counts as 3, not 3.0000000000000004


class CL4SRecOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ffn_mult: int = Field(1, ge=1, le=64, description="FFN inner size = ffn_mult * hidden (as SASRec)")
    positions: Positions = Field("oldest", description=POSITIONS_HELP + " (SASRec's default: the same encoder)")
    crop_ratio: float = Field(0.2, gt=0.0, le=1.0, description="share of items kept by crop (eta)")
    mask_ratio: float = Field(0.7, gt=0.0, le=1.0, description="share of items masked (gamma)")
    reorder_ratio: float = Field(0.2, gt=0.0, le=1.0, description="share of items in the shuffled span (beta)")
    cl_temperature: float = Field(1.0, gt=0.0, description="InfoNCE temperature")
    cl_weight: float = Field(0.1, ge=0.0, description="weight of the InfoNCE term (0 = plain SASRec)")
    cl_similarity: Literal["dot", "cosine"] = Field("dot", description="view similarity in InfoNCE")


class MaskableEmbedding(nn.Embedding):
    """nn.Embedding over ids 0..N (row 0 = padding) that also accepts the mask id N+1, whose
    vector is the separate parameter `mask_vector` (so `weight` stays (N+1, d))."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__(num_embeddings, embedding_dim, padding_idx=0)
        self.mask_id = num_embeddings
        self.mask_vector = nn.Parameter(torch.randn(embedding_dim) * 0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        is_mask = ids == self.mask_id
        x = super().forward(ids.masked_fill(is_mask, 0))
        return torch.where(is_mask.unsqueeze(-1), self.mask_vector.to(x.dtype), x)


# ------------------------------------------------------------------ augmentations
def _lengths(seqs: torch.Tensor) -> torch.Tensor:
    return (seqs != 0).sum(dim=1)


def _uniform_start(n: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    """Uniform integer start in [0, n - span] per row (0 where span > n)."""
    room = (n - span).clamp(min=0) + 1
    return (torch.rand(n.shape, device=n.device) * room).long().clamp(max=room - 1)


def crop(seqs: torch.Tensor, ratio: float) -> torch.Tensor:
    """Keep a random contiguous run of ceil(ratio * n) real items per row, left-padded."""
    L = seqs.shape[1]
    n = _lengths(seqs)
    k = torch.ceil(n.to(torch.float64) * ratio - _EPS).long().clamp(min=1).clamp(max=n)  # >= 1 when n >= 1
    start = _uniform_start(n, k)
    p = torch.arange(L, device=seqs.device)[None, :]
    src = p + (k - n + start)[:, None]  # input position of item start + p - (L - k)
    keep = p >= (L - k)[:, None]
    return torch.where(keep, seqs.gather(1, src.clamp(0, L - 1)), 0)


def mask_items(seqs: torch.Tensor, ratio: float, mask_id: int) -> torch.Tensor:
    """Replace floor(ratio * n) randomly chosen real items of each row by `mask_id`."""
    n = _lengths(seqs)
    count = torch.floor(n.to(torch.float64) * ratio + _EPS).long()
    real = seqs != 0
    key = torch.rand(seqs.shape, device=seqs.device).masked_fill(~real, 2.0)  # padding ranks last
    rank = key.argsort(dim=1).argsort(dim=1)
    return seqs.masked_fill(real & (rank < count[:, None]), mask_id)


def reorder(seqs: torch.Tensor, ratio: float) -> torch.Tensor:
    """Shuffle a random contiguous span of floor(ratio * n) real items of each row."""
    L = seqs.shape[1]
    n = _lengths(seqs)
    span = torch.floor(n.to(torch.float64) * ratio + _EPS).long()
    first = (L - n) + _uniform_start(n, span)  # first position of the span
    p = torch.arange(L, device=seqs.device)[None, :]
    inside = (p >= first[:, None]) & (p < (first + span)[:, None])
    # Outside the span the sort key is the position itself; inside it is a random value in
    # (first - 0.5, first + span - 0.5), so the span is permuted in place and nothing else moves.
    noise = first[:, None] - 0.5 + torch.rand(seqs.shape, device=seqs.device) * span[:, None]
    key = torch.where(inside, noise, p.to(noise.dtype))
    return seqs.gather(1, key.argsort(dim=1))


def augment(seqs: torch.Tensor, crop_ratio: float, mask_ratio: float, reorder_ratio: float,
            mask_id: int, ops: torch.Tensor | None = None) -> torch.Tensor:
    """One random view per row: crop, mask or reorder, chosen uniformly (or given by `ops`,
    a (B,) tensor of CROP/MASK/REORDER codes)."""
    if ops is None:
        ops = torch.randint(0, 3, (seqs.shape[0],), device=seqs.device)
    ops = ops[:, None]
    return torch.where(ops == CROP, crop(seqs, crop_ratio),
                       torch.where(ops == MASK, mask_items(seqs, mask_ratio, mask_id),
                                   reorder(seqs, reorder_ratio)))


# ------------------------------------------------------------------ model
class CL4SRec(SASRec):
    def __init__(self, config: ModelConfig, num_items: int):
        super().__init__(config, num_items)
        self.item_emb = MaskableEmbedding(num_items + 1, config.hidden)
        self._init_weights(self.item_emb)
        self.mask_id = num_items + 1

    def augment(self, seqs: torch.Tensor, ops: torch.Tensor | None = None) -> torch.Tensor:
        o = self.config.options
        return augment(seqs, o["crop_ratio"], o["mask_ratio"], o["reorder_ratio"], self.mask_id, ops)

    def contrastive_loss(self, seqs: torch.Tensor) -> torch.Tensor:
        """InfoNCE between two augmented views of every row with at least one item."""
        seqs = seqs[(seqs != 0).any(dim=1)]
        if seqs.shape[0] == 0:
            return self.item_emb.mask_vector.sum() * 0.0
        views = torch.cat([self.augment(seqs), self.augment(seqs)], dim=0)
        z = self.encode(views)[:, -1]
        z1, z2 = z.chunk(2, dim=0)
        o = self.config.options
        return info_nce(z1, z2, o["cl_temperature"], o["cl_similarity"])

    def next_item_loss(self, seqs: torch.Tensor, targets: torch.Tensor,
                       weights: torch.Tensor | None = None) -> torch.Tensor:
        return super().loss(seqs, targets, weights)

    def loss(self, seqs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Next-item loss (over positions with a target; mean, or weighted sum with weights) +
        cl_weight * InfoNCE (a mean over the batch's sequences: the weights concern targets)."""
        value = self.next_item_loss(seqs, targets, weights)
        weight = self.config.options["cl_weight"]
        if weight > 0:
            value = value + weight * self.contrastive_loss(seqs)
        return value
