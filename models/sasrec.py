"""SASRec (Kang & McAuley, 2018): causal self-attention over the item sequence.

Inputs are left-padded with item 0, so the last position always holds the newest item.
Learned absolute positions, counted from the newest or the oldest item (options.positions).
Pre-LayerNorm blocks; the item embedding is shared between input and output (scores are
dot products with every item embedding).
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


class SASRecOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ffn_mult: int = Field(1, ge=1, le=64, description="FFN inner size = ffn_mult * hidden (1 in the paper)")
    # Chosen on ml-100k validation NDCG@10 (issue 10): a tie with "newest" within seed noise,
    # and an item's position no longer shifts as a sequence grows (incremental decoding).
    positions: Positions = Field("oldest", description=POSITIONS_HELP)


def attention_mask(seqs: torch.Tensor) -> torch.Tensor:
    """(B, 1, L, L) boolean mask, True = may attend: causal, real keys only.

    The diagonal is always allowed so that fully padded query rows still attend to
    something (themselves) instead of producing NaN from an all -inf softmax row.
    """
    L = seqs.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=seqs.device).tril()
    real_key = (seqs != 0)[:, None, None, :]
    diagonal = torch.eye(L, dtype=torch.bool, device=seqs.device)
    return (causal & real_key) | diagonal


class CausalSelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=2)
        q, k, v = (t.view(B, L, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.proj(y.transpose(1, 2).reshape(B, L, D))

    def step(self, x: torch.Tensor, cache: DecodeCache, layer: int) -> torch.Tensor:
        """x (B, D), the newest item only -> (B, D); it attends to every cached item and itself
        (all real: no mask needed)."""
        B, D = x.shape
        q, k, v = (t.view(B, self.heads, 1, D // self.heads) for t in self.qkv(x).split(D, dim=1))
        keys, values = cache.append(layer, k, v)
        y = F.scaled_dot_product_attention(q, keys, values)
        return self.proj(y.reshape(B, D))


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float, ffn_mult: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(hidden)
        self.attn = CausalSelfAttention(hidden, heads, dropout)
        self.ln2 = nn.LayerNorm(hidden)
        self.ffn = nn.Sequential(
            nn.Linear(hidden, ffn_mult * hidden), nn.GELU(), Dropout(dropout),
            nn.Linear(ffn_mult * hidden, hidden),
        )
        self.drop = Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), mask))
        return x + self.drop(self.ffn(self.ln2(x)))

    def step(self, x: torch.Tensor, cache: DecodeCache, layer: int) -> torch.Tensor:
        """forward() for the newest item only (B, D), in eval mode."""
        x = x + self.attn.step(self.ln1(x), cache, layer)
        return x + self.ffn(self.ln2(x))


class SASRec(SequentialRecommender):
    def __init__(self, config: ModelConfig, num_items: int):
        super().__init__(config, num_items)
        d = config.hidden
        self.pos_emb = nn.Embedding(config.max_len, d)
        self.emb_drop = Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(d, config.heads, config.dropout, config.options["ffn_mult"]) for _ in range(config.layers)
        )
        self.ln_f = nn.LayerNorm(d)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()

    def encode(self, seqs: torch.Tensor) -> torch.Tensor:
        """(B, L) left-padded item ids -> (B, L, d) hidden states; padded rows stay finite."""
        self.check_length(seqs)
        real = (seqs != 0).unsqueeze(-1)
        pos = position_ids(seqs, self.config.max_len, self.config.options["positions"])
        x = self.item_emb(seqs) * math.sqrt(self.config.hidden) + self.pos_emb(pos)
        x = self.emb_drop(x) * real
        mask = attention_mask(seqs)
        for block in self.blocks:
            x = block(x, mask) * real
        return self.ln_f(x)

    # ------------------------------------------------------------------ incremental decoding
    def decodes_incrementally(self) -> bool:
        return self.config.options["positions"] == "oldest"

    def new_cache(self, batch: int, device: torch.device) -> DecodeCache:
        return self.empty_cache(batch, len(self.blocks), self.config.heads, device)

    def decode_next(self, items: torch.Tensor, cache: DecodeCache) -> torch.Tensor:
        """(B,) next items -> (B, d): encode()'s last hidden state of the cached sequences plus
        these items, in eval mode. Positions from the oldest item: the new item's is the cache
        length, and no earlier item's input changes."""
        if not self.decodes_incrementally() or self.training:
            raise RuntimeError("incremental decoding needs positions='oldest' and eval mode")
        if cache.length >= self.config.max_len:
            raise ValueError(f"sequence length {cache.length + 1} exceeds max_len={self.config.max_len}")
        x = self.item_emb(items) * math.sqrt(self.config.hidden) + self.pos_emb.weight[cache.length]
        for i, block in enumerate(self.blocks):
            x = block.step(x, cache, i)
        cache.advance()
        return self.ln_f(x)
