"""Small layers shared by the backbones."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn


class Dropout(nn.Module):
    """Inverted dropout, like nn.Dropout, with the mask drawn as `rand >= p`: on CPU this is
    about 2x faster than nn.Dropout's bernoulli_ (12.5 ms vs 6.4 ms for a 128x200x64 tensor),
    which made dropout ~18% of a SASRec training step on ml-100k."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return x * (torch.rand_like(x) >= self.p) * (1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


Positions = Literal["newest", "oldest"]
POSITIONS_HELP = ("where absolute positions are counted from: the newest item, or the oldest item of the input "
                  "(RecBole, the RSIR release; an item keeps its position while the sequence grows)")


def position_ids(seqs: torch.Tensor, max_len: int, scheme: str) -> torch.Tensor:
    """Absolute position index of every column of left-padded rows (B, L), as (B, L) or (1, L).

    newest: counted back from the newest item, which always has max_len - 1 (the same for every
            row, so a (1, L) index); an item's position shifts each time the sequence grows.
    oldest: counted from the oldest item of the row's input, which has 0 (RecBole and the RSIR
            release); positions never shift when a sequence grows. Padding columns get 0 (they
            are masked out anyway)."""
    L = seqs.shape[1]
    if scheme == "newest":
        return torch.arange(max_len - L, max_len, device=seqs.device)[None, :]
    if scheme == "oldest":
        pad = L - (seqs != 0).sum(dim=1, keepdim=True)
        return (torch.arange(L, device=seqs.device)[None, :] - pad).clamp(min=0)
    raise ValueError(f"unknown position scheme {scheme!r}")
