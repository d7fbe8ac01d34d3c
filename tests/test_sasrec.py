"""SASRec backbone, losses and ModelConfig validation, on tiny models."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from models import backbone_names, build_model, get_backbone
from models.config import ModelConfig
from models.sasrec import SASRec, attention_mask

# Tiny models gain nothing from threads; with other processes on the machine, OpenMP
# spin-waiting makes multi-threaded tiny ops ~100x slower.
torch.set_num_threads(1)

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
def test_registry():
    assert "sasrec" in backbone_names()
    assert get_backbone("sasrec").build is SASRec
    with pytest.raises(ValueError, match="nope"):
        get_backbone("nope")
    with pytest.raises(ValueError):
        build_model(tiny(), 0)


def test_config_defaults_and_options_normalised():
    cfg = tiny()
    assert cfg.options == {"ffn_mult": 1}
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
@pytest.mark.parametrize("layers", [1, 2])
def test_causality(layers):
    model = make(layers=layers, dropout=0.3).eval()
    seqs = rand_seqs(4, 10, seed=1)
    seqs[1, :3] = 0
    base = model.encode(seqs)
    for t in range(9):
        changed = seqs.clone()
        changed[:, t + 1:] = rand_seqs(4, 9 - t, seed=100 + t)
        out = model.encode(changed)
        torch.testing.assert_close(out[:, :t + 1], base[:, :t + 1], atol=1e-6, rtol=0)
    # and the past does matter (the test above can fail)
    changed = seqs.clone()
    changed[:, 5] = changed[:, 5] % N + 1
    assert not torch.allclose(model.encode(changed)[:, 5:], base[:, 5:], atol=1e-4)


@pytest.mark.parametrize("layers", [1, 2])
def test_left_padding_invariance(layers):
    model = make(layers=layers, max_len=20, dropout=0.3).eval()
    rows = [[5, 9, 1], [7], [3, 3, 3, 2, 30, 11, 4, 8]]
    ref = None
    for width in (8, 11, 20):
        seqs = torch.tensor([[0] * (width - len(r)) + r for r in rows])
        scores = model.score_last(seqs)
        hidden = model.encode(seqs)
        if ref is None:
            ref, ref_hidden = scores, hidden
        else:
            torch.testing.assert_close(scores, ref, atol=1e-5, rtol=0)
            torch.testing.assert_close(hidden[:, -8:], ref_hidden[:, -8:], atol=1e-5, rtol=0)
    # different sequences give different scores
    assert not torch.allclose(ref[0, 1:], ref[1, 1:], atol=1e-4)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("loss", ["ce", "sampled", "bce"])
def test_padding_and_short_rows_are_finite_with_gradients(train, loss):
    model = make(dropout=0.5, loss=loss)
    model.train(train)
    seqs = torch.tensor([
        [0, 0, 0, 0, 0, 0],  # all padding
        [0, 0, 0, 0, 0, 7],  # one item
        [0, 0, 4, 9, 2, 11],
    ])
    targets = torch.tensor([
        [0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 3],
        [0, 0, 9, 2, 11, 5],
    ])
    hidden = model.encode(seqs)
    assert torch.isfinite(hidden).all()
    scores = model.score_last(seqs)
    assert torch.isfinite(scores[:, 1:]).all()
    (scores[:, 1:].sum() + hidden.sum()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    model.zero_grad()
    value = model.loss(seqs, targets)
    assert value.ndim == 0 and torch.isfinite(value)
    value.backward()
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name
    # padding never receives gradient from padded inputs
    assert torch.count_nonzero(model.item_emb.weight.grad[0]) == 0


def test_only_padding_targets_are_averaged():
    model = make(loss="ce").eval()
    seqs = rand_seqs(2, 6, seed=3)
    targets = rand_seqs(2, 6, seed=4)
    masked = targets.clone()
    masked[0] = 0
    full_first = model.loss(seqs[1:], targets[1:])
    torch.testing.assert_close(model.loss(seqs, masked), full_first)


@pytest.mark.parametrize("loss", ["ce", "sampled", "bce"])
def test_losses_decrease_with_adam(loss):
    model = make(seed=1, loss=loss, negatives=10)
    seqs = rand_seqs(6, 8, seed=5)
    seqs[0, :5] = 0
    targets = torch.roll(seqs, -1, dims=1)
    targets[:, -1] = rand_seqs(6, 1, seed=6)[:, 0]
    targets[seqs == 0] = 0

    def measure() -> float:
        torch.manual_seed(1234)  # same negatives before and after training
        with torch.no_grad():
            return model.loss(seqs, targets).item()

    model.train()
    before = measure()
    assert before > 0 and torch.isfinite(torch.tensor(before))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(25):
        value = model.loss(seqs, targets)
        assert torch.isfinite(value)
        opt.zero_grad()
        value.backward()
        opt.step()
    after = measure()
    assert after < 0.8 * before, (before, after)
    # the padding row is never updated
    assert torch.count_nonzero(model.item_emb.weight[0]) == 0


def test_dropout_only_in_training():
    model = make(dropout=0.5)
    seqs = rand_seqs(2, 8)
    model.eval()
    torch.testing.assert_close(model.score_last(seqs), model.score_last(seqs))
    model.train()
    torch.manual_seed(0)
    a = model.score_last(seqs)
    b = model.score_last(seqs)
    assert not torch.allclose(a[:, 1:], b[:, 1:])
