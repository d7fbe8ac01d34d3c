"""Issue 21, ranks: a tie or a NaN never wins. The inputs are the issue's own; the right values are
worked out by hand in each test (tasks/ranking.py states the rule)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import write

# user_id,item_id,timestamp; users 1 and 2 are too short (fewer than 3 items) and are dropped.
SHORT = ("user_id,item_id,timestamp\n1,10,1\n2,10,1\n2,11,2\n3,10,1\n3,11,2\n3,12,3\n4,12,1\n4,13,2\n4,10,3\n"
         "4,11,4\n4,14,5\n5,14,1\n5,13,2\n5,12,3\n5,11,4\n")


def ndcg(rank: int, k: int = 10) -> float:
    return 1 / math.log2(rank + 1) if rank <= k else 0.0


@pytest.fixture
def short_checkpoint(cli, ws, tmp_path) -> Path:
    """The `short` dataset and a checkpoint trained on it (1 epoch: only its shape matters)."""
    csv = write(tmp_path / "short.csv", SHORT)
    assert cli("data", "import", csv, "--name", "short", "--format", "csv").code == 0
    ckpt = tmp_path / "short.pt"
    result = cli("train", "--dataset", "short", "--epochs", "1", "--home", ws.root, "--checkpoint", ckpt,
                 "--hidden", "8", "--max-len", "5", "--threads", "1", "--no-progress")
    assert result.code == 0, result.err
    return ckpt


def rewrite_weights(path: Path, change) -> None:
    payload = torch.load(path, weights_only=True)
    change(payload["state_dict"])
    torch.save(payload, path)


def test_a_constant_scorer_gets_the_ranks_of_ties_against_the_target(cli, ws, short_checkpoint):
    """All-zero item embeddings: every item scores 0. Validation targets and histories (raw ids):
    user 3 [10] -> 11 (4 items ranked: rank 4), user 4 [12, 13, 10] -> 11 (2: rank 2), user 5
    [14, 13] -> 12 (3: rank 3); tests: user 3 [10, 11] -> 12 (3), user 4 [.., 11] -> 14 (1), user 5
    [14, 13, 12] -> 11 (2). Never [1, 1, 1], which the strict count gave (every metric 1.0)."""
    rewrite_weights(short_checkpoint, lambda state: state["item_emb.weight"].zero_())
    result = cli("evaluate", "--checkpoint", short_checkpoint, "--dataset", "short", "--home", ws.root, "--json")
    assert result.code == 0, result.err
    out = result.json()
    assert out["valid"]["ndcg@10"] == pytest.approx((ndcg(4) + ndcg(2) + ndcg(3)) / 3)
    assert out["test"]["ndcg@10"] == pytest.approx((ndcg(3) + ndcg(1) + ndcg(2)) / 3)
    assert out["valid"]["mrr@20"] == pytest.approx((1 / 4 + 1 / 2 + 1 / 3) / 3)


def test_a_checkpoint_with_nan_weights_is_refused_in_one_line(cli, ws, short_checkpoint):
    rewrite_weights(short_checkpoint, lambda state: state["item_emb.weight"].fill_(float("nan")))
    result = cli("evaluate", "--checkpoint", short_checkpoint, "--dataset", "short", "--home", ws.root)
    assert result.code == 2
    line = result.err.strip()
    assert "\n" not in line and str(short_checkpoint) in line and "'item_emb.weight'" in line and "NaN" in line


@pytest.mark.parametrize("batch,seen", [("128", "the model's validation scores are NaN or +inf"),
                                        ("1", "loss is nan")])
def test_a_diverged_training_stops_at_its_first_non_finite_loss_and_keeps_nothing(batch, seen, cli, ws, tmp_path):
    """The issue's command: `rsir train --lr 1e8 --epochs 4` exited 0 with NDCG@10 = 1.0 after
    losses [3.709, nan, nan, nan]. Now: exit 2, one line naming the epoch, no checkpoint."""
    csv = write(tmp_path / "short.csv", SHORT)
    assert cli("data", "import", csv, "--name", "short", "--format", "csv").code == 0
    ckpt = tmp_path / "diverged.pt"
    result = cli("train", "--dataset", "short", "--epochs", "4", "--lr", "1e8", "--home", ws.root,
                 "--checkpoint", ckpt, "--threads", "1", "--no-progress", "--json", "--batch-size", batch)
    assert result.code == 2, (result.out, result.err)
    line = result.err.strip()
    assert "\n" not in line, line
    # lr = 1e8: the first step already makes the weights NaN; with one batch per epoch that shows
    # at the epoch's validation, with several as the next batch's loss.
    assert f"training diverged in epoch 1: {seen}" in line and "nothing was saved" in line, line
    assert not ckpt.exists() and not list((ws.root / "checkpoints").rglob("*.pt"))
    # The same command with a sane rate trains (the fault is the rate, not the data).
    ok = cli("train", "--dataset", "short", "--epochs", "2", "--lr", "1e-3", "--home", ws.root,
             "--checkpoint", ckpt, "--threads", "1", "--no-progress", "--json")
    assert ok.code == 0, ok.err


def test_generation_refuses_a_model_whose_hidden_states_are_nan():
    import polars as pl

    from models import build_model
    from models.config import ModelConfig
    from tasks.generate import generate_rollouts
    from tasks.ragged import Ragged
    from tasks.ranking import NonFiniteScores
    from tasks.rollout import GenerationParams

    model = build_model(ModelConfig(name="sasrec", hidden=8, layers=1, max_len=5), 6)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1 and p.numel() == 8:  # a layer norm's weights: the hidden states go NaN
                p.fill_(float("nan"))
    sources = Ragged.from_series(pl.Series([[1, 2, 3]], dtype=pl.List(pl.Int64)))
    with pytest.raises(NonFiniteScores, match="generation: the model's hidden states"):
        generate_rollouts(model, sources, GenerationParams(m=1, tau=3))
