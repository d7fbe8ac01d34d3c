"""Small layers shared by the backbones."""

from __future__ import annotations

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
