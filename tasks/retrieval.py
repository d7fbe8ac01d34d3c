"""Approximate retrieval for generation (optional, `retrieval = "ivf"`): an inverted-file index
over the item vectors (faiss IndexIVFFlat, inner product) proposes each step's top candidates;
they are re-scored exactly, together with the user's items, and the step reads only those
(tasks.decoding.RetrievedStep).

What is approximate, and only where the index misses an item (its recall):
- the global pool's pick is the best unused item among the candidates and the user's items;
- a rank counts the candidates and user's items scoring above the threshold: exact whenever
  every item above it is among them, which the fidelity check (rank <= tau <= candidates)
  needs; a larger rank in a trace is a lower bound.
Exact scoring stays the default. Needs the optional extra `ann` (faiss-cpu).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from core.errors import RsirError


def require_faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise RsirError("retrieval 'ivf' needs faiss: pip install -c requirements.lock -e '.[ann]'") from None
    return faiss


@dataclass
class ItemIndex:
    """faiss IVF index over the scoring table (N+1, d); item 0 (padding) is never proposed."""

    index: Any
    candidates: int

    @classmethod
    def build(cls, table: torch.Tensor, candidates: int, nprobe: int, seed: int) -> "ItemIndex":
        faiss = require_faiss()
        vectors = np.ascontiguousarray(table[1:].detach().float().cpu().numpy())
        n, d = vectors.shape
        lists = max(1, min(int(math.sqrt(n)), n // 39))  # faiss wants >= 39 training points per list
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, lists, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.cp.max_points_per_centroid = 64  # k-means on a sample: seconds, not minutes, at 10^6 items
        index.train(vectors)
        index.add(vectors)
        index.nprobe = min(nprobe, lists)
        return cls(index, min(candidates, n))

    def search(self, queries: torch.Tensor) -> torch.Tensor:
        """(B, d) -> (B, K) item ids 1..N (0 where the index found fewer than K)."""
        _, found = self.index.search(np.ascontiguousarray(queries.detach().float().cpu().numpy()), self.candidates)
        return torch.from_numpy(found + 1).clamp(min=0).to(queries.device)  # faiss: -1 = none
