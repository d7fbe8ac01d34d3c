"""What every backbone shares: the declared interface, the item table, scoring and the loss.

A backbone subclasses `SequentialRecommender` and implements `encode`; scoring and the
next-item loss use `output_embeddings()` and `temperature`, which a backbone may override
(HSTU: L2-normalised vectors and a temperature)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn

from models.config import ModelConfig
from models.losses import sequence_loss


@runtime_checkable
class SequenceModel(Protocol):
    """What training, evaluation and generation rely on (N = num_items; item 0 is padding)."""

    config: ModelConfig
    num_items: int

    def encode(self, seqs: torch.Tensor) -> torch.Tensor:
        """(B, L) left-padded item ids -> (B, L, d) hidden states."""
        ...

    def score_last(self, seqs: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, N+1) next-item scores after each sequence's newest item (column 0: -inf)."""
        ...

    def loss(self, seqs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Scalar next-item loss over the positions whose target (B, L) is not padding: their mean,
        or with weights (B, L) the weighted sum (models.losses)."""
        ...


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

    def item_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores of every item (column 0, padding, is -inf) for hidden states (..., d)."""
        scores = self.scaled(hidden) @ self.output_embeddings().T
        scores[..., 0] = float("-inf")
        return scores

    def score_last(self, seqs: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, N+1) next-item scores after the newest item of each sequence."""
        return self.item_scores(self.encode(seqs)[:, -1])

    def loss(self, seqs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Next-item loss over positions whose target is not padding (0): their mean, or with
        weights (B, L) the weighted sum (see models.losses); logits as item_scores."""
        return sequence_loss(self.config, self.scaled(self.encode(seqs)), seqs, targets, self.output_embeddings(),
                             weights)
