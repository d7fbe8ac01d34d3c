"""Every registered backbone (SASRec, CL4SRec, HSTU) against the shared interface, plus the
CL4SRec augmentations / InfoNCE and the HSTU layer against brute-force references. Tiny models."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from core.errors import RsirError
from models import backbone_names, build_model, get_backbone
from models.cl4srec import CROP, MASK, REORDER, CL4SRec, augment, crop, mask_items, reorder
from models.config import ModelConfig
from models.hstu import HSTU
from models.losses import draw_negatives, info_nce
from models.padding import Group, length_groups, spans
from models.sasrec import SASRec
from tasks.checkpoints import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

N = 30
BACKBONES = ["sasrec", "cl4srec", "hstu"]


def tiny(name: str, **kw) -> ModelConfig:
    base = dict(name=name, hidden=16, layers=1, heads=2, max_len=12, dropout=0.0, negatives=8)
    base.update(kw)
    return ModelConfig(**base)


def make(name: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build_model(tiny(name, **kw), N)


def rand_seqs(B: int, L: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, N + 1, (B, L), generator=g)


def next_targets(seqs: torch.Tensor, seed: int = 6) -> torch.Tensor:
    targets = torch.roll(seqs, -1, dims=1)
    targets[:, -1] = rand_seqs(seqs.shape[0], 1, seed=seed)[:, 0]
    targets[seqs == 0] = 0
    return targets


# --------------------------------------------------------------------------- registry/config
def test_registry():
    assert set(BACKBONES) <= set(backbone_names())
    assert get_backbone("cl4srec").build is CL4SRec
    assert get_backbone("hstu").build is HSTU
    assert isinstance(make("cl4srec"), SASRec)  # the SASRec encoder, reused


def test_option_defaults():
    assert tiny("cl4srec").options == {
        "ffn_mult": 1, "positions": "oldest", "crop_ratio": 0.2, "mask_ratio": 0.7, "reorder_ratio": 0.2,
        "cl_temperature": 1.0, "cl_weight": 0.1, "cl_similarity": "dot"}
    assert tiny("hstu").options == {"abs_pos": True, "positions": "newest", "l2_norm": False, "temperature": 0.05}
    assert make("hstu", options={"abs_pos": False}).pos_emb is None


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("bad", [
    dict(hidden=16, heads=3),
    dict(layers=0),
    dict(layers=-1),
    dict(dropout=1.0),
    dict(options={"no_such_option": 1}),
])
def test_invalid_shared_configs_raise(name, bad):
    with pytest.raises(ValidationError):
        tiny(name, **bad)


@pytest.mark.parametrize("name,options", [
    ("cl4srec", {"cl_temperature": 0.0}),
    ("cl4srec", {"cl_temperature": -1.0}),
    ("cl4srec", {"mask_ratio": 1.5}),
    ("cl4srec", {"crop_ratio": 0.0}),
    ("cl4srec", {"reorder_ratio": 1.01}),
    ("cl4srec", {"cl_weight": -0.1}),
    ("cl4srec", {"cl_similarity": "euclid"}),
    ("cl4srec", {"ffn_mult": 0}),
    ("hstu", {"temperature": 0.0}),
    ("hstu", {"ffn_mult": 1}),  # HSTU has no FFN
    ("hstu", {"l2_norm": "maybe"}),
])
def test_invalid_options_raise(name, options):
    with pytest.raises(ValidationError):
        tiny(name, options=options)


# --------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("name", BACKBONES)
def test_shapes(name):
    model = make(name, layers=2).eval()
    seqs = rand_seqs(3, 7)
    seqs[0, :4] = 0
    h = model.encode(seqs)
    assert h.shape == (3, 7, 16)
    assert model.item_emb.weight.shape == (N + 1, 16)
    assert model.item_emb.padding_idx == 0
    s = model.score_last(seqs)
    assert s.shape == (3, N + 1)
    assert torch.isneginf(s[:, 0]).all()
    assert torch.isfinite(s[:, 1:]).all()
    full = model.item_scores(h)
    assert full.shape == (3, 7, N + 1)
    assert torch.isneginf(full[..., 0]).all()
    torch.testing.assert_close(full[:, -1], s)
    with pytest.raises(ValueError, match="max_len"):
        model.encode(rand_seqs(2, 13))


# --------------------------------------------------------------------------- causality/padding
@pytest.mark.parametrize("name", BACKBONES)
def test_causality(name):
    model = make(name, layers=2, dropout=0.3).eval()
    seqs = rand_seqs(4, 10, seed=1)
    seqs[1, :3] = 0
    base = model.encode(seqs)
    for t in range(9):
        changed = seqs.clone()
        changed[:, t + 1:] = rand_seqs(4, 9 - t, seed=100 + t)
        torch.testing.assert_close(model.encode(changed)[:, :t + 1], base[:, :t + 1], atol=1e-6, rtol=0)
    changed = seqs.clone()
    changed[:, 5] = changed[:, 5] % N + 1
    assert not torch.allclose(model.encode(changed)[:, 5:], base[:, 5:], atol=1e-4)  # the past matters


@pytest.mark.parametrize("name,options", [
    ("sasrec", {}), ("cl4srec", {}), ("hstu", {}), ("hstu", {"l2_norm": True}), ("hstu", {"abs_pos": False}),
])
def test_left_padding_invariance(name, options):
    model = make(name, layers=2, max_len=20, dropout=0.3, options=options).eval()
    rows = [[5, 9, 1], [7], [3, 3, 3, 2, 30, 11, 4, 8]]
    ref = None
    for width in (8, 11, 20):
        seqs = torch.tensor([[0] * (width - len(r)) + r for r in rows])
        scores, hidden = model.score_last(seqs), model.encode(seqs)
        if ref is None:
            ref, ref_hidden = scores, hidden
        else:
            torch.testing.assert_close(scores, ref, atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(hidden[:, -8:], ref_hidden[:, -8:], atol=1e-5, rtol=0)
    assert not torch.allclose(ref[0, 1:], ref[1, 1:], atol=1e-4)


# --------------------------------------------------------------------------- length groups
def padded_reference_loss(model, seqs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None):
    """The next-item loss as it was computed before length groups (commit 3302937): the whole
    padded batch encoded at once, F.cross_entropy over logits with column 0 at -inf, and the
    sampled softmax's negative logits at every position (B, L, K)."""
    cfg = model.config
    hidden = model.scaled(model.encode(seqs))
    emb = model.output_embeddings()
    has = targets != 0
    if cfg.loss == "ce":
        logits = hidden[has] @ emb.T
        logits[:, 0] = float("-inf")
        per_position = F.cross_entropy(logits, targets[has], reduction="none")
    else:
        assert cfg.loss == "sampled"
        exclude = seqs if cfg.negatives_exclude_input else None
        neg, usable = draw_negatives(seqs.shape[0], emb.shape[0] - 1, cfg.negatives, exclude)
        pos_logit = (hidden * emb[targets]).sum(-1)
        neg_logit = torch.einsum("bld,bkd->blk", hidden, emb[neg])
        masked = ~usable[:, None, :] | (neg[:, None, :] == targets[:, :, None])
        neg_logit = neg_logit.masked_fill(masked, float("-inf"))
        logits = torch.cat([pos_logit[has][:, None], neg_logit[has]], dim=1)
        per_position = F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long), reduction="none")
    return per_position.mean() if weights is None else (per_position * weights[has]).sum()


def mixed_lengths(seed: int = 0, B: int = 9, L: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded rows of 1..L items (a random batch, as the release recipe draws them), with
    targets where the trainer puts them: on real items only, none on a skipped first pair."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([1, L, 3, 2, L - 1, 5, 1, 7, 3][:B])
    seqs = torch.randint(1, N + 1, (B, L), generator=g)
    seqs[torch.arange(L)[None, :] < (L - lengths)[:, None]] = 0
    targets = next_targets(seqs)
    targets[1, L - 12:L - 6] = 0  # a long window whose older pairs another window predicts
    return seqs, targets


def gradients(model) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("name,loss,options", [
    ("sasrec", "ce", {}), ("sasrec", "sampled", {}), ("sasrec", "sampled", {"exclude": True}),
    ("cl4srec", "ce", {"cl_weight": 0.0}), ("hstu", "ce", {}), ("hstu", "sampled", {"l2_norm": True}),
    ("hstu", "ce", {"positions": "oldest"}), ("sasrec", "ce", {"positions": "newest"}),
])
def test_loss_in_length_groups_equals_the_whole_padded_batch(monkeypatch, name, loss, options, weighted):
    """Each group cut to its longest row (GROUP_COST 0: a group per distinct length) gives the
    padded batch's loss and gradients: trimming leading padding changes nothing, positions
    included (counted from the oldest or the newest item)."""
    import models.padding

    options = dict(options)
    exclude = options.pop("exclude", False)
    model = make(name, loss=loss, layers=2, negatives=6, negatives_exclude_input=exclude, options=options)
    model.train()  # dropout is 0: training mode with identical computations
    seqs, targets = mixed_lengths()
    weights = torch.rand(targets.shape, generator=torch.Generator().manual_seed(1)) * (targets != 0) if weighted else None
    torch.manual_seed(7)  # the same negatives: both draw (B, K) once, after encoding
    want = padded_reference_loss(model, seqs, targets, weights)
    want.backward()
    want_grads = gradients(model)
    model.zero_grad()
    monkeypatch.setattr(models.padding, "GROUP_COST", 0)
    monkeypatch.setattr(models.padding, "MIN_SAVING", 0.0)
    assert len(length_groups(spans(seqs, targets))) == 7  # widths 1, 2, 3, 5, 7, 11, 12
    torch.manual_seed(7)
    got = model.loss(seqs, targets, weights) if name != "cl4srec" else model.next_item_loss(seqs, targets, weights)
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got_grads = gradients(model)
    assert got_grads.keys() == want_grads.keys()
    for key, want_grad in want_grads.items():  # float rounding, relative to the gradient's scale
        torch.testing.assert_close(got_grads[key], want_grad, rtol=1e-4, atol=1e-5 * float(want_grad.abs().max()),
                                   msg=key)


@pytest.mark.parametrize("name,loss", [("sasrec", "ce"), ("sasrec", "sampled"), ("hstu", "ce")])
def test_one_group_keeps_the_padded_batchs_random_draws(name, loss):
    """A batch of similar lengths (the default trainer batches by length) stays one group: with
    dropout on, the same seed gives the padded batch's loss, draw for draw."""
    model = make(name, loss=loss, dropout=0.5, layers=2, negatives=6)
    model.train()
    seqs = rand_seqs(6, 10, seed=3)
    seqs[:3, :2] = 0  # 8 or 10 items: splitting would save 12 positions, less than a group costs
    targets = next_targets(seqs)
    assert len(length_groups(spans(seqs, targets))) == 1
    torch.manual_seed(5)
    want = padded_reference_loss(model, seqs, targets)
    torch.manual_seed(5)
    torch.testing.assert_close(model.loss(seqs, targets), want, rtol=1e-5, atol=1e-6)
    torch.manual_seed(6)
    assert not torch.allclose(model.loss(seqs, targets), want)  # other draws, another value


@pytest.mark.parametrize("name", BACKBONES)
def test_last_hidden_in_length_groups_equals_the_whole_padded_batch(monkeypatch, name):
    """Evaluation and generation score the newest position of rows of every length at once."""
    import models.padding

    model = make(name, layers=2).eval()
    seqs, _ = mixed_lengths(seed=2)
    seqs[3] = 0  # a row without items scores as it always did (padding only)
    want = model.item_scores(model.encode(seqs)[:, -1])
    monkeypatch.setattr(models.padding, "GROUP_COST", 0)
    monkeypatch.setattr(models.padding, "MIN_SAVING", 0.0)
    assert len(length_groups(spans(seqs))) > 1
    torch.testing.assert_close(model.score_last(seqs), want, rtol=1e-5, atol=1e-5)


def test_length_groups_are_the_cheapest_partition():
    """Against every partition of the sorted distinct widths into consecutive runs (brute force):
    the cheapest Σ rows x width + cost per group, every row exactly once, its width covered."""
    from itertools import combinations

    rng = np.random.default_rng(0)
    for trial in range(40):
        widths = torch.from_numpy(rng.integers(0, 13, size=int(rng.integers(1, 30))))
        cost = int(rng.choice([0, 4, 16, 64]))
        groups = length_groups(widths, group_cost=cost, min_saving=0.0)
        w = np.maximum(widths.numpy(), 1)
        rows = [np.arange(len(w)) if g.rows is None else g.rows.numpy() for g in groups]
        assert sorted(np.concatenate(rows).tolist()) == list(range(len(w)))
        assert all((w[r] <= g.width).all() and w[r].max() == g.width for g, r in zip(groups, rows))
        assert all(np.all(np.diff(w[r]) >= 0) for g, r in zip(groups, rows) if g.rows is not None)
        got = sum(len(r) * g.width + cost for g, r in zip(groups, rows))
        values = np.unique(w)
        best = min(sum((w[(w > lo) & (w <= hi)]).size * hi + cost for lo, hi in zip((0, *cut), (*cut, values[-1])))
                   for k in range(len(values)) for cut in (tuple(values[list(c)]) for c in combinations(range(len(values) - 1), k)))
        assert got == best, (trial, widths.tolist(), cost)
    assert length_groups(torch.tensor([3, 3, 3])) == [Group(None, 3)]  # one width: the batch as it is
    nearly_even = torch.tensor([9] * 100 + [12] * 100)  # splitting saves 12.5%: not worth other draws
    assert length_groups(nearly_even, group_cost=0) == [Group(None, 12)]
    assert len(length_groups(nearly_even, group_cost=0, min_saving=0.1)) == 2
    assert length_groups(torch.tensor([1, 12, 1, 1]), group_cost=0, split=False) == [Group(None, 12)]
    assert length_groups(torch.tensor([0, 0])) == [Group(None, 1)]
    assert spans(torch.tensor([[0, 0, 4, 5], [0, 0, 0, 0], [1, 2, 3, 4]])).tolist() == [2, 0, 4]
    assert spans(torch.tensor([[0, 0, 0, 5]]), torch.tensor([[0, 0, 9, 0]])).tolist() == [2]


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("name,loss,options", [
    ("sasrec", "ce", {}), ("cl4srec", "ce", {}), ("cl4srec", "sampled", {"cl_similarity": "cosine"}),
    ("hstu", "ce", {}), ("hstu", "sampled", {"l2_norm": True}), ("hstu", "bce", {}),
])
def test_padding_and_short_rows_are_finite_with_gradients(name, loss, options, train):
    model = make(name, dropout=0.5, loss=loss, options=options)
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
    for pname, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), pname
    model.zero_grad()
    value = model.loss(seqs, targets)
    assert value.ndim == 0 and torch.isfinite(value)
    value.backward()
    for pname, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), pname
    assert torch.count_nonzero(model.item_emb.weight.grad[0]) == 0  # padding gets no gradient
    # only padding and one-item rows, and a single row: still finite
    model.zero_grad()
    value = model.loss(seqs[:2], targets[:2]) + model.loss(seqs[1:2], targets[1:2])
    assert torch.isfinite(value)
    value.backward()
    for pname, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name,loss,options", [
    ("sasrec", "ce", {}), ("cl4srec", "ce", {}), ("cl4srec", "sampled", {}), ("hstu", "ce", {}),
    ("hstu", "sampled", {"l2_norm": True}), ("hstu", "bce", {}),
])
def test_losses_decrease_with_adam(name, loss, options):
    model = make(name, seed=1, loss=loss, negatives=10, options=options)
    seqs = rand_seqs(6, 8, seed=5)
    seqs[0, :5] = 0
    targets = next_targets(seqs)

    def measure(fn) -> float:
        torch.manual_seed(1234)  # same negatives and augmentations before and after training
        with torch.no_grad():
            return float(np.mean([fn(seqs, targets).item() for _ in range(3)]))

    model.train()
    before = measure(model.loss)
    assert before > 0 and math.isfinite(before)
    if name == "cl4srec":
        before_next = measure(model.next_item_loss)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(25):
        value = model.loss(seqs, targets)
        assert torch.isfinite(value)
        opt.zero_grad()
        value.backward()
        opt.step()
    after = measure(model.loss)
    assert after < 0.8 * before, (before, after)
    if name == "cl4srec":
        assert measure(model.next_item_loss) < 0.8 * before_next
    assert torch.count_nonzero(model.item_emb.weight[0]) == 0  # the padding row is never updated


@pytest.mark.parametrize("name", BACKBONES)
def test_dropout_only_in_training(name):
    model = make(name, dropout=0.5)
    seqs = rand_seqs(2, 8)
    model.eval()
    torch.testing.assert_close(model.score_last(seqs), model.score_last(seqs))
    model.train()
    torch.manual_seed(0)
    assert not torch.allclose(model.score_last(seqs)[:, 1:], model.score_last(seqs)[:, 1:])


# --------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("name,options", [("sasrec", {}), ("cl4srec", {}), ("hstu", {"l2_norm": True})])
def test_checkpoint_round_trip(tmp_path, name, options):
    cfg = tiny(name, dropout=0.1, options=options)
    torch.manual_seed(0)
    model = build_model(cfg, N)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)  # move away from the init
    seqs = rand_seqs(4, 6)
    for _ in range(3):
        loss = model.loss(seqs, next_targets(seqs))
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = save_checkpoint(tmp_path / f"{name}.pt", model, cfg, N, {"k": 1})
    loaded, payload = load_checkpoint(path, num_items=N, backbone=name)
    assert type(loaded) is type(model) and loaded.config == cfg and payload["meta"] == {"k": 1}
    model.eval(), loaded.eval()
    probe = torch.tensor([[0, 0, 0, 4, 5, 6], [1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 0, 9]])
    with torch.no_grad():
        assert torch.equal(loaded.score_last(probe), model.score_last(probe))


def test_checkpoint_refuses_other_backbone_or_item_count(tmp_path):
    cfg = tiny("cl4srec")
    path = save_checkpoint(tmp_path / "c.pt", make("cl4srec"), cfg, N, {})
    with pytest.raises(RsirError, match="cl4srec"):
        load_checkpoint(path, backbone="hstu")
    with pytest.raises(RsirError, match="items"):
        load_checkpoint(path, num_items=N + 1, backbone="cl4srec")
    # a state dict of another backbone under a forged name is refused too
    payload = torch.load(path, weights_only=True)
    payload["backbone"] = "hstu"
    payload["model_config"]["name"] = "hstu"
    payload["model_config"]["options"] = {}
    torch.save(payload, tmp_path / "forged.pt")
    with pytest.raises(RsirError, match="does not match"):
        load_checkpoint(tmp_path / "forged.pt")


# --------------------------------------------------------------------------- CL4SRec
def left_padded(rows: list[list[int]], width: int) -> torch.Tensor:
    return torch.tensor([[0] * (width - len(r)) + r for r in rows])


AUG_ROWS = [[], [7], [3, 4], [1, 2, 3, 4, 5], list(range(1, 11)), [9, 9, 8, 8, 7, 6, 30, 29, 28, 27, 26, 1]]


def real_items(row: torch.Tensor) -> list[int]:
    values = row.tolist()
    first = next((i for i, v in enumerate(values) if v != 0), len(values))
    assert all(v != 0 for v in values[first:]), f"not left-padded: {values}"
    return values[first:]


def test_crop():
    seqs = left_padded(AUG_ROWS, 12)
    for seed in range(20):
        torch.manual_seed(seed)
        out = crop(seqs, 0.2)
        assert out.shape == seqs.shape
        for row, view in zip(AUG_ROWS, out):
            got = real_items(view)
            assert len(got) == (math.ceil(0.2 * len(row) - 1e-9) if row else 0) and (len(got) >= 1 or not row)
            starts = [s for s in range(len(row) - len(got) + 1) if row[s:s + len(got)] == got]
            assert starts, (row, got)  # a contiguous sub-sequence
    full = crop(seqs, 1.0)
    assert torch.equal(full, seqs)


def test_mask():
    seqs = left_padded(AUG_ROWS, 12)
    mask_id = N + 1
    for seed in range(20):
        torch.manual_seed(seed)
        out = mask_items(seqs, 0.7, mask_id)
        for row, view in zip(AUG_ROWS, out):
            got = real_items(view)
            assert len(got) == len(row)
            assert sum(v == mask_id for v in got) == math.floor(0.7 * len(row) + 1e-9)
            assert all(g == r for g, r in zip(got, row) if g != mask_id)
    assert (mask_items(seqs, 1.0, mask_id)[seqs != 0] == mask_id).all()


def test_reorder():
    seqs = left_padded(AUG_ROWS, 12)
    moved = 0
    for seed in range(20):
        torch.manual_seed(seed)
        out = reorder(seqs, 0.5)
        for row, view in zip(AUG_ROWS, out):
            got = real_items(view)
            assert sorted(got) == sorted(row)
            diff = [i for i, (g, r) in enumerate(zip(got, row)) if g != r]
            if diff:  # changes stay within one span of floor(0.5 n) items
                assert diff[-1] - diff[0] < math.floor(0.5 * len(row))
                moved += 1
    assert moved > 0
    assert torch.equal(reorder(seqs, 0.01), seqs)  # span of 0 items


def test_augmentation_placements_are_all_reachable():
    row = list(range(1, 11))
    seqs = left_padded([row] * 300, 12)
    torch.manual_seed(0)
    starts = {row.index(real_items(v)[0]) for v in crop(seqs, 0.2)}
    assert starts == set(range(9))  # k = 2 of 10 items: starts 0..8
    masked = (mask_items(seqs, 0.2, N + 1) == N + 1).sum(dim=0)
    assert (masked[2:] > 0).all() and (masked[:2] == 0).all()
    spans = set()
    for view in reorder(seqs, 0.3):
        diff = [i for i, (g, r) in enumerate(zip(real_items(view), row)) if g != r]
        if diff:
            spans.add(diff[0])
    assert spans == set(range(9))  # a 3-item span starting anywhere in 0..7 (first change 0..8)


def test_augmented_views_and_op_choice():
    seqs = left_padded(AUG_ROWS, 12)
    mask_id = N + 1
    torch.manual_seed(1)  # augment draws crop, mask and reorder views in this order, then selects
    each = {CROP: crop(seqs, 0.2), MASK: mask_items(seqs, 0.7, mask_id), REORDER: reorder(seqs, 0.2)}
    for op, want in each.items():
        torch.manual_seed(1)
        assert torch.equal(augment(seqs, 0.2, 0.7, 0.2, mask_id, torch.full((len(AUG_ROWS),), op)), want)
    ops = torch.tensor([CROP, MASK, REORDER, CROP, MASK, REORDER])
    torch.manual_seed(1)
    mixed = augment(seqs, 0.2, 0.7, 0.2, mask_id, ops)
    for b, op in enumerate(ops.tolist()):
        assert torch.equal(mixed[b], each[op][b])
    seen = set()
    for seed in range(10):
        torch.manual_seed(seed)
        views = augment(seqs, 0.2, 0.7, 0.2, mask_id)
        for row, view in zip(AUG_ROWS, views):
            got = real_items(view)
            assert set(got) <= set(row) | {mask_id}
            assert bool(row) == bool(got)
            seen.add(len(got) < len(row) and "crop" or (mask_id in got and "mask") or "other")
    assert {"crop", "mask"} <= seen


def test_cl4srec_mask_token_is_never_scored():
    model = make("cl4srec").eval()
    assert model.mask_id == N + 1
    seqs = torch.tensor([[0, 0, 3, N + 1, 5], [N + 1, N + 1, N + 1, N + 1, N + 1], [0, 0, 0, 0, 2]])
    scores = model.score_last(seqs)
    assert scores.shape == (3, N + 1)
    assert torch.isfinite(scores[:, 1:]).all()
    # the mask token has its own embedding, different from every item's
    h_mask = model.encode(seqs[:, -2:])
    h_item = model.encode(torch.tensor([[3, 5]]).expand(3, 2))
    assert not torch.allclose(h_mask[0, 0], h_item[0, 0])


def test_cl4srec_loss_composition():
    model = make("cl4srec", dropout=0.0)
    seqs = rand_seqs(5, 8, seed=2)
    seqs[0] = 0
    seqs[1, :7] = 0
    targets = next_targets(seqs)
    torch.manual_seed(3)
    total = model.loss(seqs, targets)
    torch.manual_seed(3)
    cl = model.contrastive_loss(seqs)
    assert torch.isfinite(cl) and cl > 0
    torch.testing.assert_close(total, model.next_item_loss(seqs, targets) + 0.1 * cl)
    torch.testing.assert_close(model.next_item_loss(seqs, targets), SASRec.loss(model, seqs, targets))
    plain = make("cl4srec", options={"cl_weight": 0.0})
    torch.testing.assert_close(plain.loss(seqs, targets), plain.next_item_loss(seqs, targets))
    assert model.contrastive_loss(torch.zeros(3, 8, dtype=torch.long)) == 0


def test_info_nce_matches_reference():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    z = torch.cat([z1, z2])
    for temperature, sim in ((1.0, "dot"), (0.5, "cosine")):
        zz = F.normalize(z, dim=1) if sim == "cosine" else z
        total = 0.0
        for i in range(8):
            pos = (i + 4) % 8
            logits = [float(zz[i] @ zz[j]) / temperature for j in range(8) if j != i]
            total += -(float(zz[i] @ zz[pos]) / temperature - math.log(sum(math.exp(x) for x in logits)))
        assert info_nce(z1, z2, temperature, sim).item() == pytest.approx(total / 8, rel=1e-5)
    assert info_nce(z1[:1], z2[:1]).item() == pytest.approx(0.0, abs=1e-6)


# --------------------------------------------------------------------------- HSTU
def reference_hstu_layer(layer, x: torch.Tensor, seqs: torch.Tensor) -> torch.Tensor:
    """One HSTU layer with explicit loops over rows, heads, queries and keys."""
    B, L, D = x.shape
    H, dh = layer.heads, D // layer.heads
    out = torch.zeros_like(x)
    for b in range(B):
        u, v, q, k = F.silu(layer.uvqk(F.layer_norm(x[b], (D,), layer.ln_in.weight, layer.ln_in.bias))).split(D, -1)
        y = torch.zeros(L, D)
        for h in range(H):
            cols = slice(h * dh, (h + 1) * dh)
            for i in range(L):
                for j in range(i + 1):
                    if seqs[b, j] == 0:
                        continue
                    a = F.silu(q[i, cols] @ k[j, cols] + layer.rab[h, min(i - j, layer.max_len - 1)]) / layer.max_len
                    y[i, cols] += a * v[j, cols]
        gated = u * F.layer_norm(y, (D,), layer.ln_attn.weight, layer.ln_attn.bias)
        out[b] = x[b] + layer.out(gated)
    return out


def test_hstu_layer_matches_reference():
    model = make("hstu", heads=2, max_len=6).eval()
    layer = model.layers[0]
    with torch.no_grad():
        layer.rab.normal_()
        seqs = torch.tensor([[0, 0, 4, 5, 6, 1], [0, 0, 0, 0, 0, 3], [7, 8, 9, 10, 11, 12]])
        x = torch.randn(3, 6, 16) * (seqs != 0).unsqueeze(-1)
        causal = torch.ones(6, 6, dtype=torch.bool).tril()
        keep = (causal & (seqs != 0)[:, None, None, :]).float()
        got = layer(x, keep)
        want = reference_hstu_layer(layer, x, seqs)
    torch.testing.assert_close(got[seqs != 0], want[seqs != 0], atol=1e-5, rtol=1e-4)


def test_hstu_relative_bias_is_learned_and_l2_scores():
    model = make("hstu", options={"l2_norm": True, "temperature": 0.1}, loss="sampled")
    seqs = rand_seqs(3, 6)
    model.loss(seqs, next_targets(seqs)).backward()
    assert torch.count_nonzero(model.layers[0].rab.grad) > 0
    model.eval()
    h = model.encode(seqs)
    torch.testing.assert_close(h.norm(dim=-1), torch.ones(3, 6))
    s = model.score_last(seqs)
    assert s[:, 1:].abs().max() <= 1 / 0.1 + 1e-4  # cosine / temperature


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", BACKBONES)
def test_cuda_matches_cpu(name):
    model = make(name, layers=2).eval()
    seqs = rand_seqs(3, 9)
    seqs[0, :5] = 0
    cpu = model.score_last(seqs)
    gpu = model.cuda().score_last(seqs.cuda()).cpu()
    torch.testing.assert_close(gpu, cpu, atol=1e-4, rtol=1e-4)
    model.train()
    assert torch.isfinite(model.loss(seqs.cuda(), next_targets(seqs).cuda()))


# --------------------------------------------------------------------------- generation
@pytest.mark.parametrize("name", BACKBONES)
def test_generation_runs(name):
    from tasks.generate import generate_rollouts
    from tasks.ragged import Ragged
    from tasks.rollout import GenerationParams

    model = make(name, seed=2)
    sources = Ragged.from_series(pl.Series([[1, 2, 3, 4], [5, 6], [7, 8, 9, 10, 11, 12], [30, 29, 1]]))
    params = GenerationParams(m=2, tau=5, p=0.5, min_len=2, max_len=8)
    model.train()
    rollouts = generate_rollouts(model, sources, params)
    assert model.training  # the generator restores the mode
    assert len(rollouts) == 8
    values, lengths = rollouts.items.values, rollouts.items.lengths
    assert ((values >= 1) & (values <= N)).all()
    assert ((lengths >= 1) & (lengths <= 8)).all()
    first = rollouts.items.values[rollouts.items.offsets[:-1]]
    assert np.array_equal(first, sources.values[sources.offsets[:-1]][rollouts.source_index])
    for r in range(len(rollouts)):  # no item repeats inside a rollout
        row = values[rollouts.items.offsets[r]:rollouts.items.offsets[r + 1]]
        assert len(set(row.tolist())) == len(row)
