"""Issue 10: the training objective weighs every target position alike (synthetic ones times λ),
whatever the batching; overlapping windows; positions counted from the oldest item; negatives
drawn outside the input sequence; the release recipe as a preset."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F

from core.config import parse_config
from core.errors import RsirError
from models import build_model
from models.config import ModelConfig
from models.layers import position_ids
from models.losses import draw_negatives, full_softmax_ce, is_member, sampled_softmax_ce
from tasks.config import RECIPES, RunConfig, TrainConfig
from tasks.ragged import Ragged
from tasks.split import (
    TargetWeights,
    batch_scales,
    leave_one_out,
    synthetic_position_share,
    synthetic_weight_share,
    training_windows,
    window_tensors,
)
from tasks.train import content_key, epoch_batches, plan_epoch

pytestmark = pytest.mark.usefixtures("one_thread")


def ragged(rows) -> Ragged:
    return Ragged.from_series(pl.Series(rows, dtype=pl.List(pl.Int32)))


def random_split(rng: np.random.Generator, real: int, synthetic: int, num_items: int = 40):
    """A LeaveOneOut over random real rows (4..60 items, longer than max_len sometimes) and
    short synthetic ones (3..8 items, as fidelity-filtered rollouts are)."""
    def row(lo, hi):
        return [int(x) for x in rng.integers(1, num_items + 1, size=int(rng.integers(lo, hi + 1)))]

    seqs = pl.DataFrame({
        "seq_id": list(range(real + synthetic)),
        "items": [row(4, 60) for _ in range(real)] + [row(3, 8) for _ in range(synthetic)],
        "origin": ["real"] * real + ["synthetic"] * synthetic,
    }, schema={"seq_id": pl.Int64, "items": pl.List(pl.Int32), "origin": pl.String})
    return leave_one_out(seqs, num_items)


def every_target(split, synthetic_weight: float) -> tuple[np.ndarray, np.ndarray]:
    """Brute force: (target item, weight) of every target position of the training rows."""
    items, weights = [], []
    for r in range(len(split.train)):
        row = split.train.values[split.train.offsets[r]:split.train.offsets[r + 1]]
        items += row[1:].tolist()
        weights += [synthetic_weight if split.train_synthetic[r] else 1.0] * (len(row) - 1)
    return np.array(items), np.array(weights)


def per_position_loss(targets: torch.Tensor) -> torch.Tensor:
    """A fixed, target-dependent 'loss' per position: the objective is then exactly computable."""
    return torch.sin(targets.double()) + 2.0


@pytest.mark.parametrize("seed", range(6))
def test_epoch_objective_is_the_weighted_mean_over_all_target_positions(seed):
    rng = np.random.default_rng(seed)
    split = random_split(rng, real=int(rng.integers(5, 40)), synthetic=int(rng.integers(0, 120)))
    lam = float(rng.choice([0.0, 0.3, 1.0, 2.5]))
    max_len = int(rng.integers(4, 20))
    stride = int(rng.integers(1, max_len + 1)) if seed % 2 else None
    cfg = TrainConfig(batch_size=int(rng.integers(1, 50)), batching=str(rng.choice(["length", "random"])),
                      weighting="position", synthetic_weight=lam, stride=stride, model={"max_len": max_len})
    windows = training_windows(split.train, max_len, stride)
    weights = TargetWeights.of(windows, split.train_synthetic, lam)
    plan = plan_epoch(windows, weights, cfg, np.random.default_rng(seed))
    batch_losses = [float((per_position_loss(t) * w.double())[t != 0].sum())
                    for _, t, w in epoch_batches(split, windows, weights, plan)]
    objective = np.mean(batch_losses)
    items, w = every_target(split, lam)
    expected = float((per_position_loss(torch.from_numpy(items)).numpy() * w).sum() / w.sum())
    assert objective == pytest.approx(expected, rel=1e-6)  # weights are float32
    # The old trainer's weighting (each batch's own mean) is not that objective in general.
    if lam > 0 and len(plan.batches) > 1 and 0 < split.train_synthetic.sum():
        old = batch_scales(windows, weights, plan.batches, "batch")
        old_losses = [float((per_position_loss(t) * w.double())[t != 0].sum()) / s * o
                      for (_, t, w), s, o in zip(epoch_batches(split, windows, weights, plan), plan.scales, old)]
        assert np.mean(old_losses) != pytest.approx(expected, rel=1e-4)


def test_batch_weighting_overweights_short_synthetic_sequences_and_position_weighting_does_not():
    rng = np.random.default_rng(7)
    split = random_split(rng, real=60, synthetic=300)
    windows = training_windows(split.train, 20)
    weights = TargetWeights.of(windows, split.train_synthetic, 1.0)
    cfg = TrainConfig(batch_size=16, batching="length", model={"max_len": 20})
    batches = plan_epoch(windows, weights, cfg, np.random.default_rng(0)).batches
    position_share = synthetic_position_share(windows, weights)
    faithful = synthetic_weight_share(windows, weights, batches, batch_scales(windows, weights, batches, "position"))
    old = synthetic_weight_share(windows, weights, batches, batch_scales(windows, weights, batches, "batch"))
    items, _ = every_target(split, 1.0)
    assert position_share == pytest.approx(split.train_synthetic[windows.rows].dot(windows.targets) / len(items))
    assert faithful == pytest.approx(position_share)
    assert old > position_share + 0.1  # short synthetic rows fill their own batches
    scales = batch_scales(windows, weights, batches, "batch")  # against plain per-batch sums
    mass = windows.targets.astype(float)
    assert old == pytest.approx(sum(s * mass[b][weights.synthetic[b]].sum() for b, s in zip(batches, scales))
                                / sum(s * mass[b].sum() for b, s in zip(batches, scales)))
    assert scales == pytest.approx([1 / mass[b].sum() for b in batches])
    lam = 0.25
    w = TargetWeights.of(windows, split.train_synthetic, lam)
    weighted = synthetic_weight_share(windows, w, batches, batch_scales(windows, w, batches, "position"))
    assert weighted == pytest.approx(lam * position_share / (lam * position_share + 1 - position_share))


@pytest.mark.parametrize("name", ["sasrec", "hstu", "cl4srec"])
def test_model_loss_with_weights_is_the_weighted_sum_of_per_position_losses(name):
    torch.manual_seed(0)
    options = {"cl_weight": 0.0} if name == "cl4srec" else {}
    model = build_model(ModelConfig(name=name, hidden=16, layers=1, max_len=10, dropout=0.0, options=options), 30)
    model.eval()
    seqs = torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5], [0, 0, 0, 7, 9]])
    targets = torch.tensor([[0, 0, 4, 5, 6], [0, 3, 4, 5, 6], [0, 0, 0, 9, 2]])  # a skipped pair in row 1
    weights = torch.rand(3, 5) * (targets != 0)
    hidden = model.encode(seqs)
    if name == "hstu":
        hidden = hidden / model.temperature
    emb = model.output_embeddings() if name == "hstu" else model.item_emb.weight
    mask = targets != 0
    per_position = full_softmax_ce(hidden[mask], targets[mask], emb)
    torch.testing.assert_close(model.loss(seqs, targets, weights), (per_position * weights[mask]).sum())
    torch.testing.assert_close(model.loss(seqs, targets), per_position.mean())


# ------------------------------------------------------------------ overlapping windows
@pytest.mark.parametrize("stride", [1, 3, 7, 10])
@pytest.mark.parametrize("seed", range(3))
def test_overlapping_windows_predict_every_target_once_with_long_context(seed, stride):
    rng = np.random.default_rng(seed)
    rows = [[int(x) for x in rng.integers(1, 50, size=int(rng.integers(0, 45)))] for _ in range(25)]
    train, max_len = ragged(rows), 10
    w = training_windows(train, max_len, stride)
    inputs, targets = window_tensors(train, w, np.arange(len(w)))
    assert w.positions == sum(max(len(r) - 1, 0) for r in rows) == int((targets != 0).sum())
    seen = []  # (row, target index in row, context length)
    for i in range(len(w)):
        r, start = int(w.rows[i]), int(w.starts[i] - train.offsets[w.rows[i]])
        width = targets.shape[1]
        for col in range(width):
            if targets[i, col] != 0:
                pair = start + col - (width - int(w.lengths[i]))
                assert targets[i, col] == rows[r][pair + 1] and inputs[i, col] == rows[r][pair]
                seen.append((r, pair + 1, pair - start + 1))
    assert sorted((r, t) for r, t, _ in seen) == sorted((r, t) for r, row in enumerate(rows) for t in range(1, len(row)))
    # every target sees min(its position, max_len - stride + 1 .. max_len) items of context
    for r, t, context in seen:
        assert context >= min(t, max_len - stride + 1)
    if stride == 1:
        assert all(context == min(t, max_len) for _, t, context in seen)  # one sample per prefix


def test_default_stride_is_half_the_window():
    assert TrainConfig().window_stride == 25 and TrainConfig(model={"max_len": 7}).window_stride == 3
    assert TrainConfig(stride=50).window_stride == 50  # disjoint windows: the trainer before issue 10


def test_stride_is_validated():
    with pytest.raises(ValueError, match="stride"):
        training_windows(ragged([[1, 2, 3]]), 4, 5)
    with pytest.raises(RsirError, match="stride=60 exceeds the sasrec model's max_len=50"):
        parse_config(TrainConfig, {"stride": 60})
    with pytest.raises(RsirError, match="stride"):
        parse_config(RunConfig, {"stride": 30, "model": {"max_len": 20}})


# ------------------------------------------------------------------ positions
def test_oldest_positions_start_at_the_first_real_item_and_ignore_padding_width():
    seqs = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    assert position_ids(seqs, 8, "oldest").tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert position_ids(seqs, 8, "newest").tolist() == [[3, 4, 5, 6, 7]]


@pytest.mark.parametrize("name", ["sasrec", "hstu"])
def test_oldest_positions_make_a_prefix_keep_its_hidden_states_as_the_sequence_grows(name):
    torch.manual_seed(1)
    cfg = ModelConfig(name=name, hidden=16, layers=2, max_len=12, dropout=0.0, options={"positions": "oldest"})
    model = build_model(cfg, 30).eval()
    full = torch.tensor([[3, 8, 1, 9, 4, 22, 5]])
    grown = model.encode(full)
    for n in range(1, 7):
        prefix = torch.cat([torch.zeros(1, 7 - n, dtype=torch.long), full[:, :n]], dim=1)  # left-padded
        torch.testing.assert_close(model.encode(prefix)[:, -1], grown[:, n - 1], atol=1e-5, rtol=1e-5)
    newest = build_model(ModelConfig(**{**cfg.model_dump(), "options": {**cfg.options, "positions": "newest"}}), 30).eval()
    newest.load_state_dict(model.state_dict())
    prefix = torch.cat([torch.zeros(1, 4, dtype=torch.long), full[:, :3]], dim=1)
    assert not torch.allclose(newest.encode(prefix)[:, -1], newest.encode(full)[:, 2], atol=1e-4)


# ------------------------------------------------------------------ negatives
def test_negatives_avoid_the_input_sequence():
    torch.manual_seed(0)
    num_items, rows = 30, 400
    exclude = torch.randint(0, num_items + 1, (rows, 12))  # 0 = padding, never excluded
    neg, usable = draw_negatives(rows, num_items, 64, exclude)
    assert neg.shape == (rows, 64) and ((neg >= 1) & (neg <= num_items)).all()
    assert torch.equal(usable, ~is_member(neg, exclude))
    assert usable.float().mean() > 0.99  # redrawn, not merely masked
    members = torch.tensor([[0, 0, 3, 9]])
    assert is_member(torch.tensor([[0, 3, 4, 9]]), members).tolist() == [[False, True, False, True]]


def test_sampled_softmax_matches_a_per_position_reference():
    """Shared per-row negatives; each position's softmax is over its target and the row's usable
    negatives other than its target."""
    torch.manual_seed(3)
    B, L, d, N, K = 4, 6, 8, 20, 7
    hidden, emb = torch.randn(B, L, d), torch.randn(N + 1, d)
    seqs = torch.randint(1, N + 1, (B, L))
    targets = torch.roll(seqs, -1, 1)
    targets[:, -1], targets[0, :3], targets[1:, :2] = 5, 0, 0  # the first two columns have no target
    neg, usable = draw_negatives(B, N, K, seqs)
    got = sampled_softmax_ce(hidden, targets, emb, neg, usable)
    want = []
    for b in range(B):
        for t in range(L):
            if targets[b, t] == 0:
                continue
            keep = [int(n) for n, u in zip(neg[b], usable[b]) if u and n != targets[b, t]]
            logits = torch.stack([hidden[b, t] @ emb[targets[b, t]], *[hidden[b, t] @ emb[n] for n in keep]])
            want.append(-torch.log_softmax(logits, 0)[0])
    torch.testing.assert_close(got, torch.stack(want))


@pytest.mark.parametrize("P", [0, 1, 37])
def test_full_softmax_matches_cross_entropy_over_masked_logits(P):
    """The one-buffer full softmax against F.cross_entropy with the padding column at -inf (the
    code before): the same losses and gradients, for hidden states and every item row."""
    torch.manual_seed(2)
    N, d = 50, 8
    hidden, emb = torch.randn(P, d, requires_grad=True), torch.randn(N + 1, d, requires_grad=True)
    targets, weights = torch.randint(1, N + 1, (P,)), torch.rand(P)
    targets[:3] = 7  # a target shared by positions: its row's gradient adds up
    logits = hidden @ emb.T
    logits[:, 0] = float("-inf")
    want = F.cross_entropy(logits, targets, reduction="none")
    (want * weights).sum().backward()
    want_grads = hidden.grad.clone(), emb.grad.clone()
    hidden.grad, emb.grad = None, None
    got = full_softmax_ce(hidden, targets, emb)
    (got * weights).sum().backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close((hidden.grad, emb.grad), want_grads)
    assert torch.count_nonzero(emb.grad[0]) == 0  # padding is no candidate
    if P:
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss = full_softmax_ce(hidden, targets, emb).sum()
            loss.backward(retain_graph=True)
            loss.backward()  # its buffer became the gradient: refused, never silently wrong


def test_sampled_loss_with_excluded_inputs_trains():
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden=16, layers=1, max_len=10, loss="sampled", negatives=8,
                                    negatives_exclude_input=True), 30)
    seqs = torch.randint(1, 31, (6, 10))
    loss = model.loss(seqs, torch.roll(seqs, -1, 1))
    assert torch.isfinite(loss) and loss > 0
    loss.backward()


# ------------------------------------------------------------------ recipes and keys
def test_release_recipe_fills_only_what_is_not_given():
    cfg = TrainConfig(recipe="release")
    preset = RECIPES["release"]
    assert (cfg.batch_size, cfg.batching, cfg.early_stop, cfg.patience, cfg.epochs) == (
        preset["batch_size"], "random", "ndcg@20", 20, 1000)
    m = cfg.model
    assert (m.loss, m.negatives, m.negatives_exclude_input, m.heads, m.dropout, m.options["positions"], m.options["ffn_mult"]) == (
        "sampled", 256, True, 2, 0.5, "oldest", 4)
    mine = TrainConfig(recipe="release", patience=5, model={"dropout": 0.2, "options": {"ffn_mult": 2}})
    assert (mine.patience, mine.model.dropout, mine.model.options["ffn_mult"], mine.model.heads) == (5, 0.2, 2, 2)
    hstu = TrainConfig(recipe="release", model={"name": "hstu"}).model.options
    assert "ffn_mult" not in hstu and hstu["positions"] == "oldest"
    run = RunConfig(recipe="release", K=1)
    assert run.train_config("d", 0, run.model) == TrainConfig(recipe="release", dataset="d", version=0,
                                                              progress=False)
    assert TrainConfig().weighting == "position" and TrainConfig().synthetic_weight == 1.0


def test_sparse_recipe_is_the_default_with_the_grid_winner():
    """`sparse` changes only what the paper suite's grid found better on sparse data (hidden 128);
    an explicit setting still wins, and it trains a different checkpoint than the default."""
    sparse, default = TrainConfig(recipe="sparse"), TrainConfig()
    assert sparse.model.hidden == 128 and default.model.hidden != 128
    assert sparse.model.model_copy(update={"hidden": default.model.hidden}) == default.model
    assert (sparse.batch_size, sparse.patience, sparse.epochs, sparse.early_stop) == (
        default.batch_size, default.patience, default.epochs, default.early_stop)
    assert TrainConfig(recipe="sparse", model={"hidden": 32}).model.hidden == 32
    assert content_key(sparse, "d") != content_key(default, "d")


def test_early_stop_metrics_are_the_metrics_evaluation_computes():
    from typing import get_args

    from core.config import Metric
    from tasks.evaluate import metric_names

    assert set(get_args(Metric)) == set(metric_names())


def test_synthetic_weight_and_trainer_settings_key_checkpoints_and_lineage():
    base = TrainConfig()
    keys = {content_key(base.model_copy(update=u), "d") for u in (
        {}, {"synthetic_weight": 0.5}, {"weighting": "batch"}, {"batching": "random"}, {"stride": 25},
        {"early_stop": "ndcg@20"})}
    assert len(keys) == 6
    assert content_key(TrainConfig(recipe="release"), "d") == content_key(
        TrainConfig(**{k: v for k, v in TrainConfig(recipe="release").model_dump().items() if k != "recipe"}), "d")
    assert RunConfig(synthetic_weight=0.5).lineage_key() != RunConfig().lineage_key()


@pytest.mark.parametrize("args, fault", [
    # The error names the option as typed (the value as read: -1 is a float).
    (["--synthetic-weight", "-1"], "--synthetic-weight -1.0: "),
    (["--recipe", "paper"], "--recipe paper: "),
    (["--early-stop", "auc"], "--early-stop auc: "),
    (["--batching", "sorted"], "--batching sorted: "),
    (["--positions", "middle"], "--positions middle: "),  # as typed, not as the option it sets
    (["--stride", "0"], "--stride 0: "),
])
def test_bad_training_settings_are_one_line_errors(cli, ws, args, fault):
    result = cli("train", "--dataset", "ml-100k", "--home", ws.root, *args)
    assert result.code == 2 and fault in result.err and len(result.err.strip().splitlines()) == 1
    assert not (ws.root / "checkpoints").exists()
