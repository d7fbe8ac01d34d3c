"""What every backbone shares: the declared interface, the item table, scoring and the loss.

A backbone subclasses `SequentialRecommender` and implements `encode`, which must ignore leading
padding columns (the loss and `last_hidden` encode a batch in length groups, models/padding.py);
scoring and the next-item loss use `output_embeddings()` and `temperature`, which a backbone may
override (HSTU: L2-normalised vectors and a temperature)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
import torch.nn as nn

from models.losses import sequence_loss
from models.padding import length_groups, spans, splits_pay

if TYPE_CHECKING:  # annotations only: models.config's validators import the registry (no circle)
    from models.config import ModelConfig


@runtime_checkable
class SequenceModel(Protocol):
    """What training, evaluation and generation rely on (N = num_items; item 0 is padding)."""

    config: ModelConfig
    num_items: int

    def encode(self, seqs: torch.Tensor) -> torch.Tensor:
        """(B, L) left-padded item ids -> (B, L, d) hidden states. A real item's state must not
        depend on the padding width: encode(seqs[:, k:]) equals encode(seqs)[:, k:] wherever
        seqs[:, :k] is all padding (the loss and last_hidden cut it, models/padding.py)."""
        ...

    def score_last(self, seqs: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, N+1) next-item scores after each sequence's newest item (column 0: -inf)."""
        ...

    def loss(self, seqs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Scalar next-item loss over the positions whose target (B, L) is not padding: their mean,
        or with weights (B, L) the weighted sum (models.losses)."""
        ...


@dataclass
class DecodeCache:
    """Keys and values of every layer for the items decoded so far (incremental decoding):
    keys[i], values[i] (B, H, capacity, d/H), filled in columns [0, length); the capacity grows
    as needed. Every row holds the same number of items, none of them padding (a rollout's prefix)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0

    limit: int = 0  # the most columns ever needed (max_len); capacity grows to it by doubling

    def select(self, rows: torch.Tensor) -> "DecodeCache":
        """The cache of the given rows (B',), in that order. The capacity grows by doubling, so
        this copies fewer than 2 x length columns (at max_len columns, copying cost more than the
        attention it serves: most rollouts stop within a few steps)."""
        return DecodeCache([k[rows] for k in self.keys], [v[rows] for v in self.values], self.length, self.limit)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write layer's new key and value (B, H, 1, d/H) at column `length`; return its keys and
        values so far (B, H, length + 1, d/H). `advance` moves `length` on after the last layer."""
        t = self.length
        if self.keys[layer].shape[2] <= t:
            self.keys[layer], self.values[layer] = (_grown(x, t, self.limit) for x in (self.keys[layer],
                                                                                        self.values[layer]))
        self.keys[layer][:, :, t: t + 1] = k
        self.values[layer][:, :, t: t + 1] = v
        return self.keys[layer][:, :, : t + 1], self.values[layer][:, :, : t + 1]

    def advance(self) -> None:
        self.length += 1


def _grown(buffer: torch.Tensor, filled: int, limit: int) -> torch.Tensor:
    """buffer (B, H, C, d/H) with its first `filled` columns kept and room for at least one more:
    twice the columns, at most `limit`."""
    grown = buffer.new_zeros(*buffer.shape[:2], min(max(2 * filled, 8), max(limit, filled + 1)), buffer.shape[3])
    grown[:, :, :filled] = buffer[:, :, :filled]
    return grown


class SequentialRecommender(nn.Module):
    """Base of the backbones: config, item count, the shared item embedding (input and output)."""

    temperature: float = 1.0

    def __init__(self, config: ModelConfig, num_items: int):
        super().__init__()
        self.config = config
        self.num_items = num_items
        self.item_emb = nn.Embedding(num_items + 1, config.hidden, padding_idx=0)

    def encode(self, seqs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def check_length(self, seqs: torch.Tensor) -> None:
        if seqs.shape[1] > self.config.max_len:
            raise ValueError(f"sequence length {seqs.shape[1]} exceeds max_len={self.config.max_len}")

    def output_embeddings(self) -> torch.Tensor:
        """(N+1, d) item vectors used for scoring."""
        return self.item_emb.weight

    def scaled(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states divided by the temperature (no extra op in the hot path at 1)."""
        return hidden if self.temperature == 1.0 else hidden / self.temperature

    def item_scores(self, hidden: torch.Tensor, emb: torch.Tensor | None = None, first: int = 0,
                    out: torch.Tensor | None = None) -> torch.Tensor:
        """Scores (..., C) of items first..first+C-1 for hidden states (..., d); item 0 (padding)
        is -inf. emb: those items' rows of output_embeddings() (default: every item), so that a
        caller scoring a large catalogue chunk by chunk computes the table once. out: a buffer to
        write them into (a caller stepping many times avoids allocating, and page-faulting, a
        fresh batch x items tensor each step)."""
        emb = self.output_embeddings() if emb is None else emb
        scores = torch.matmul(self.scaled(hidden), emb.T, out=out)
        if first == 0:
            scores[..., 0] = float("-inf")
        return scores

    def last_hidden(self, seqs: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, d) hidden state after the newest item of each sequence. Rows are encoded
        in length groups (models/padding.py), as the loss does: evaluation ranks users of every
        history length together, padded to the longest."""
        groups = length_groups(spans(seqs), splits_pay(seqs.device))
        last = [self.encode(group.take(seqs))[:, -1] for group in groups]
        if len(groups) == 1:
            return last[0]
        order = torch.cat([group.rows for group in groups])
        return torch.cat(last)[torch.argsort(order)]

    # Incremental decoding: extend sequences one item at a time from cached keys and values,
    # giving the hidden state encode() would give for the newest item (up to float rounding).
    def decodes_incrementally(self) -> bool:
        """False where the cache cannot be reused (positions counted from the newest item shift
        every earlier item's input as the sequence grows): callers then run the full forward."""
        return False

    def new_cache(self, batch: int, device: torch.device) -> DecodeCache:
        raise NotImplementedError(f"{type(self).__name__} has no incremental decoding")

    def decode_next(self, items: torch.Tensor, cache: DecodeCache) -> torch.Tensor:
        """(B,) the next item of every cached sequence -> (B, d) hidden state after it; appends
        it to the cache."""
        raise NotImplementedError(f"{type(self).__name__} has no incremental decoding")

    def empty_cache(self, batch: int, layers: int, heads: int, device: torch.device) -> DecodeCache:
        """Zeroed key/value buffers for `batch` sequences of up to max_len items."""
        shape = (batch, heads, 0, self.config.hidden // heads)  # grows on the first append
        dtype = self.item_emb.weight.dtype
        return DecodeCache([torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)],
                           [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)],
                           limit=self.config.max_len)

    def score_last(self, seqs: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, N+1) next-item scores after the newest item of each sequence."""
        return self.item_scores(self.last_hidden(seqs))

    def loss(self, seqs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Next-item loss over positions whose target is not padding (0): their mean, or with
        weights (B, L) the weighted sum (see models.losses); logits as item_scores."""
        return sequence_loss(self.config, lambda rows: self.scaled(self.encode(rows)), seqs, targets,
                             self.output_embeddings(), weights)
