"""HSTU (Zhai et al., 2024, "Actions speak louder than words"): pointwise (no softmax)
causal attention with gating and a learned relative positional bias, no FFN.

Per layer:  x_hat = LayerNorm(x);  [u, v, q, k] = split(SiLU(x_hat W_uvqk))
            A = SiLU(q k^T + rab) / n   (causal, padding keys removed, per head, no softmax)
            x = x + W_o(dropout(u * LayerNorm(A v)))
Choices:
- n = config.max_len, a constant, as the reference implementation (which divides by the
  padded length, every sequence being padded to max_len). It keeps the model causal, prefix-
  consistent (a prefix scored alone gives the hidden states it has inside the full sequence)
  and invariant to the left-padding width. The LayerNorm on A v removes any per-query scale
  anyway, so n only sets the numeric range.
- rab: per layer and head, a learned table indexed by the relative distance i - j in
  0..max_len-1 (zero-initialised); timestamps are not available, so no time bias.
- inputs: item embedding x sqrt(d) + optional learned absolute positions (counted from the
  newest or the oldest item, options.positions, as SASRec), embedding dropout.
- output: final LayerNorm; with options.l2_norm the output and the item embeddings are also
  L2-normalised and scores are cosine / temperature (the sampled-softmax setup of the paper;
  works with every `loss`).
Inputs are left-padded with 0; dense padded tensors only (CPU and CUDA).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from models.base import DecodeCache, SequentialRecommender
from models.layers import POSITIONS_HELP, Dropout, Positions, position_ids

if TYPE_CHECKING:  # annotations only: models.config's validators import the registry (no circle)
    from models.config import ModelConfig


class HSTUOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    abs_pos: bool = Field(True, description="add learned absolute position embeddings to the input")
    # newest: the setting HSTU was tuned with (issue 5); oldest is not validated for HSTU yet.
    positions: Positions = Field("newest", description=POSITIONS_HELP + " (with abs_pos)")
    l2_norm: bool = Field(False, description="L2-normalise output and item embeddings (cosine scores)")
    temperature: float = Field(0.05, gt=0.0, description="score temperature, used only with l2_norm")


class HSTULayer(nn.Module):
    def __init__(self, hidden: int, heads: int, max_len: int, dropout: float):
        super().__init__()
        self.hidden, self.heads, self.max_len = hidden, heads, max_len
        self.ln_in = nn.LayerNorm(hidden)
        self.uvqk = nn.Linear(hidden, 4 * hidden)
        self.rab = nn.Parameter(torch.zeros(heads, max_len))  # bias by relative distance i - j
        self.ln_attn = nn.LayerNorm(hidden)
        self.drop = Dropout(dropout)
        self.out = nn.Linear(hidden, hidden)
        nn.init.xavier_uniform_(self.uvqk.weight)
        nn.init.zeros_(self.uvqk.bias)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """x (B, L, d); keep (B, 1, L, L) float, 1 where query i may use key j (j <= i, j real)."""
        B, L, D = x.shape
        H = self.heads
        u, v, q, k = F.silu(self.uvqk(self.ln_in(x))).split(D, dim=-1)
        q, k, v = (t.view(B, L, H, D // H).transpose(1, 2) for t in (q, k, v))
        i = torch.arange(L, device=x.device)
        distance = (i[:, None] - i[None, :]).clamp(0, self.max_len - 1)
        logits = q @ k.transpose(-1, -2) + self.rab[:, distance].unsqueeze(0)  # (B, H, L, L)
        attn = F.silu(logits) * keep / self.max_len
        y = (attn @ v).transpose(1, 2).reshape(B, L, D)
        return x + self.out(self.drop(u * self.ln_attn(y)))

    def step(self, x: torch.Tensor, cache: DecodeCache, layer: int) -> torch.Tensor:
        """forward() for the newest item only: x (B, D) -> (B, D), eval mode; it uses every
        cached item and itself, with the bias of its distance to each."""
        B, D = x.shape
        H = self.heads
        u, v, q, k = F.silu(self.uvqk(self.ln_in(x))).split(D, dim=-1)
        q, k, v = (t.view(B, H, 1, D // H) for t in (q, k, v))
        keys, values = cache.append(layer, k, v)  # (B, H, t + 1, D/H)
        t = keys.shape[2] - 1
        distance = (t - torch.arange(t + 1, device=x.device)).clamp(0, self.max_len - 1)
        logits = q @ keys.transpose(-1, -2) + self.rab[:, distance][None, :, None, :]  # (B, H, 1, t + 1)
        y = (F.silu(logits) / self.max_len @ values).reshape(B, D)
        return x + self.out(u * self.ln_attn(y))


class HSTU(SequentialRecommender):
    def __init__(self, config: ModelConfig, num_items: int):
        super().__init__(config, num_items)
        opts = config.options
        self.l2_norm = bool(opts["l2_norm"])
        self.temperature = float(opts["temperature"]) if self.l2_norm else 1.0
        d = config.hidden
        self.pos_emb = nn.Embedding(config.max_len, d) if opts["abs_pos"] else None
        self.emb_drop = Dropout(config.dropout)
        self.layers = nn.ModuleList(
            HSTULayer(d, config.heads, config.max_len, config.dropout) for _ in range(config.layers)
        )
        self.ln_f = nn.LayerNorm(d)
        for emb in (self.item_emb, self.pos_emb):
            if emb is not None:
                nn.init.normal_(emb.weight, std=0.02)
        self.item_emb.weight.data[0].zero_()

    def encode(self, seqs: torch.Tensor) -> torch.Tensor:
        """(B, L) left-padded item ids -> (B, L, d) hidden states (unit norm with l2_norm)."""
        self.check_length(seqs)
        L = seqs.shape[1]
        real = seqs != 0
        x = self.item_emb(seqs) * math.sqrt(self.config.hidden)
        if self.pos_emb is not None:
            x = x + self.pos_emb(position_ids(seqs, self.config.max_len, self.config.options["positions"]))
        x = self.emb_drop(x) * real.unsqueeze(-1)
        causal = torch.ones(L, L, dtype=torch.bool, device=seqs.device).tril()
        keep = (causal & real[:, None, None, :]).to(x.dtype)  # (B, 1, L, L)
        for layer in self.layers:
            x = layer(x, keep) * real.unsqueeze(-1)
        x = self.ln_f(x)
        return F.normalize(x, dim=-1) if self.l2_norm else x

    # ------------------------------------------------------------------ incremental decoding
    def decodes_incrementally(self) -> bool:
        """Relative bias alone, or absolute positions from the oldest item: an earlier item's
        input never changes as the sequence grows. From the newest item, it does."""
        return self.pos_emb is None or self.config.options["positions"] == "oldest"

    def new_cache(self, batch: int, device: torch.device) -> DecodeCache:
        return self.empty_cache(batch, len(self.layers), self.config.heads, device)

    def decode_next(self, items: torch.Tensor, cache: DecodeCache) -> torch.Tensor:
        """(B,) next items -> (B, d): encode()'s last hidden state of the cached sequences plus
        these items, in eval mode; appends them to the cache."""
        if not self.decodes_incrementally() or self.training:
            raise RuntimeError("incremental decoding needs abs_pos=False or positions='oldest', and eval mode")
        if cache.length >= self.config.max_len:
            raise ValueError(f"sequence length {cache.length + 1} exceeds max_len={self.config.max_len}")
        x = self.item_emb(items) * math.sqrt(self.config.hidden)
        if self.pos_emb is not None:
            x = x + self.pos_emb.weight[cache.length]
        for i, layer in enumerate(self.layers):
            x = layer.step(x, cache, i)
        cache.advance()
        x = self.ln_f(x)
        return F.normalize(x, dim=-1) if self.l2_norm else x

    def output_embeddings(self) -> torch.Tensor:
        """(N+1, d) item vectors used for scoring (L2-normalised with l2_norm)."""
        w = self.item_emb.weight
        return F.normalize(w, dim=-1) if self.l2_norm else w
