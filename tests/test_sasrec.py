"""SASRec backbone, losses and ModelConfig validation, on tiny models."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from models import build_model
from models.config import ModelConfig
from models.sasrec import SASRec, attention_mask

pytestmark = pytest.mark.usefixtures("one_thread")

N = 30


def tiny(**kw) -> ModelConfig:
    base = dict(hidden=16, layers=1, heads=2, max_len=12, dropout=0.0, negatives=8)
    base.update(kw)
    return ModelConfig(**base)


def make(seed: int = 0, **kw) -> SASRec:
    torch.manual_seed(seed)
    return build_model(tiny(**kw), N)


def rand_seqs(B: int, L: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, N + 1, (B, L), generator=g)


# --------------------------------------------------------------------------- registry/config
def test_config_defaults_and_options_normalised():
    cfg = tiny()
    assert cfg.options == {"ffn_mult": 1, "positions": "oldest"}
    cfg = tiny(options={"ffn_mult": 3})
    model = build_model(cfg, N)
    assert model.blocks[0].ffn[0].out_features == 48


@pytest.mark.parametrize("bad", [
    dict(hidden=16, heads=3),
    dict(layers=0),
    dict(layers=-1),
    dict(dropout=1.0),
    dict(dropout=-0.1),
    dict(max_len=1),
    dict(name="transformer-xl"),
    dict(options={"ffn_multiplier": 2}),
    dict(options={"ffn_mult": 0}),
    dict(loss="hinge"),
    dict(unknown_key=1),
    dict(negatives=0),
])
def test_invalid_configs_raise(bad):
    with pytest.raises(ValidationError):
        tiny(**bad)


# --------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("layers,heads", [(1, 1), (2, 4)])
def test_shapes(layers, heads):
    model = make(layers=layers, heads=heads).eval()
    seqs = rand_seqs(3, 7)
    seqs[0, :4] = 0
    h = model.encode(seqs)
    assert h.shape == (3, 7, 16)
    s = model.score_last(seqs)
    assert s.shape == (3, N + 1)
    assert torch.isinf(s[:, 0]).all() and (s[:, 0] < 0).all()
    assert torch.isfinite(s[:, 1:]).all()
    full = model.item_scores(h)
    assert full.shape == (3, 7, N + 1)
    assert torch.isneginf(full[..., 0]).all()
    torch.testing.assert_close(full[:, -1], s)
    # scores are dot products with the shared item embedding
    torch.testing.assert_close(s[:, 1:], h[:, -1] @ model.item_emb.weight[1:].T)


def test_too_long_input_raises():
    model = make()
    with pytest.raises(ValueError, match="max_len"):
        model.encode(rand_seqs(2, 13))
    assert model.encode(rand_seqs(2, 12)).shape == (2, 12, 16)


def test_padding_row_zero_at_init():
    for seed in range(3):
        model = make(seed)
        assert torch.count_nonzero(model.item_emb.weight[0]) == 0
        assert torch.count_nonzero(model.item_emb.weight[1:]) > 0


def test_attention_mask():
    seqs = torch.tensor([[0, 0, 3, 4], [0, 0, 0, 0]])
    m = attention_mask(seqs)
    assert m.shape == (2, 1, 4, 4)
    assert m[0, 0].tolist() == [
        [True, False, False, False],
        [False, True, False, False],
        [False, False, True, False],
        [False, False, True, True],
    ]
    assert torch.equal(m[1, 0], torch.eye(4, dtype=torch.bool))


# --------------------------------------------------------------------------- causality/padding
def test_only_padding_targets_are_averaged():
    model = make(loss="ce").eval()
    seqs = rand_seqs(2, 6, seed=3)
    targets = rand_seqs(2, 6, seed=4)
    masked = targets.clone()
    masked[0] = 0
    full_first = model.loss(seqs[1:], targets[1:])
    torch.testing.assert_close(model.loss(seqs, masked), full_first)
