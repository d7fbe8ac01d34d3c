"""Seconds per training epoch on a paper catalogue (Amazon Beauty: 22,363 users, 12,101 items),
before and after issue 22's padding-free batches, for the default trainer and the release recipe.

before: the loss and the scoring of commit 3302937, copied below unchanged (`before_loss`,
        `Before.score_last`): the whole padded batch through the encoder, negative logits at
        every position (B, L, K), F.cross_entropy over logits with a -inf padding column, and
        evaluation encoding every user at the batch's longest history.
after:  this tree: length groups (models/padding.py), the one-buffer full softmax and the
        sampled softmax at target positions only (models/losses.py).

Both variants train their own copy of one initial model on the same batches, interleaved batch by
batch (which one goes first alternates) and seeded alike before every step, so the machine's
load falls on both alike and, where the computations agree, so do the random draws (with
--dropout 0 the two trainings agree up to float rounding: the max |loss difference| column).
An epoch's seconds are its training steps (batch preparation, shared, counted in both) plus the
validation evaluation of every user that the trainer runs after each epoch (interleaved too, in
turns of 2,048 users).

    .venv/bin/python benchmarks/paper_speed.py [--data ../shared/data/Beauty.txt] [--recipes default release]
        [--batches N] [--eval-users N] [--dropout P] [--threads 1]

The data file is the one of the paper's release: one user per line, the user id then the item
ids in time order, separated by white space (items numbered from 1).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks._common import peak_rss_mib, print_json_last, print_table  # noqa: E402
from models import build_model  # noqa: E402
from models.losses import bce_one_negative, draw_negatives, reduce_positions  # noqa: E402
from tasks.config import TrainConfig  # noqa: E402
from tasks.evaluate import metrics_from_ranks, rank_users  # noqa: E402
from tasks.ragged import Ragged  # noqa: E402
from tasks.runtime import seed_everything  # noqa: E402
from tasks.split import LeaveOneOut, TargetWeights, leave_one_out, training_windows  # noqa: E402
from tasks.train import epoch_batches, plan_epoch  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "Beauty.txt"


def load_sequences(path: Path) -> tuple[LeaveOneOut, int]:
    """The leave-one-out split of a file of `user item item ...` lines, and the item count."""
    lines = pl.read_csv(path, has_header=False, new_columns=["line"], separator="\t", quote_char=None)
    ids = lines["line"].str.strip_chars().str.split(" ").list.eval(pl.element().filter(pl.element() != "")
                                                                  .cast(pl.Int64))
    items = ids.list.slice(1)
    seqs = pl.DataFrame({"seq_id": np.arange(len(ids), dtype=np.int64), "items": items.cast(pl.List(pl.Int32)),
                         "origin": ["real"] * len(ids)})
    num_items = int(items.list.max().max())
    return leave_one_out(seqs, num_items), num_items


# ------------------------------------------------------------------ before: commit 3302937, unchanged
def _before_full_softmax_ce(hidden: torch.Tensor, targets: torch.Tensor, item_emb: torch.Tensor) -> torch.Tensor:
    logits = hidden @ item_emb.T
    logits[:, 0] = float("-inf")  # padding is never a valid next item
    return F.cross_entropy(logits, targets, reduction="none")


def _before_sampled_softmax_ce(hidden: torch.Tensor, targets: torch.Tensor, item_emb: torch.Tensor, negatives: int,
                               exclude: torch.Tensor | None = None) -> torch.Tensor:
    neg, usable = draw_negatives(hidden.shape[0], item_emb.shape[0] - 1, negatives, exclude, hidden.device)
    has_target = targets != 0
    pos_logit = (hidden * item_emb[targets]).sum(-1)  # (B, L)
    neg_logit = torch.einsum("bld,bkd->blk", hidden, item_emb[neg])  # (B, L, negatives)
    masked = ~usable[:, None, :] | (neg[:, None, :] == targets[:, :, None])
    neg_logit = neg_logit.masked_fill(masked, float("-inf"))
    logits = torch.cat([pos_logit[has_target][:, None], neg_logit[has_target]], dim=1)
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device),
                           reduction="none")


def _before_sequence_loss(config, hidden: torch.Tensor, seqs: torch.Tensor, targets: torch.Tensor,
                          item_emb: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    has_target = targets != 0
    if config.loss == "ce":
        per_position = _before_full_softmax_ce(hidden[has_target], targets[has_target], item_emb)
    elif config.loss == "sampled":
        exclude = seqs if config.negatives_exclude_input else None
        per_position = _before_sampled_softmax_ce(hidden, targets, item_emb, config.negatives, exclude)
    elif config.loss == "bce":
        per_position = bce_one_negative(hidden[has_target], targets[has_target], item_emb)
    else:
        raise ValueError(f"unknown loss {config.loss!r}")
    return reduce_positions(per_position, None if weights is None else weights[has_target])


def before_loss(model, seqs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """SequentialRecommender.loss at commit 3302937."""
    return _before_sequence_loss(model.config, model.scaled(model.encode(seqs)), seqs, targets,
                                 model.output_embeddings(), weights)


class Before(nn.Module):
    """A model scored as at commit 3302937 (evaluation calls score_last)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def score_last(self, seqs: torch.Tensor) -> torch.Tensor:
        return self.model.item_scores(self.model.encode(seqs)[:, -1])


# ------------------------------------------------------------------ the measurement
def bench_recipe(recipe: str, split: LeaveOneOut, num_items: int, args: argparse.Namespace) -> list[dict]:
    model_params = {} if args.dropout is None else {"dropout": args.dropout}
    cfg = TrainConfig(dataset="beauty", recipe=recipe, seed=0, progress=False, model=model_params)
    seed_everything(cfg.seed)
    after = build_model(cfg.model, num_items)
    before = copy.deepcopy(after)
    variants = {
        "before": (before, torch.optim.Adam(before.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay),
                   lambda x, y, w: before_loss(before, x, y, w), Before(before)),
        "after": (after, torch.optim.Adam(after.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay),
                  lambda x, y, w: after.loss(x, y, w), after),
    }
    windows = training_windows(split.train, cfg.model.max_len, cfg.window_stride)
    weights = TargetWeights.of(windows, split.train_synthetic, cfg.synthetic_weight)
    plan = plan_epoch(windows, weights, cfg, np.random.default_rng(cfg.seed))
    total = len(plan.batches)
    steps = min(args.batches or total, total)
    seconds = {name: 0.0 for name in variants}
    losses: dict[str, list[float]] = {name: [] for name in variants}
    prepare = 0.0
    for model, *_ in variants.values():
        model.train()
    batches = epoch_batches(split, windows, weights, plan)
    for i in range(steps):
        t0 = time.perf_counter()
        inputs, targets, w = next(batches)
        prepare += time.perf_counter() - t0
        for name in (("before", "after") if i % 2 == 0 else ("after", "before")):
            model, optimizer, loss_fn, _ = variants[name]
            torch.manual_seed(cfg.seed * 1_000_003 + i)  # the same draws where the computations agree
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(inputs, targets, w)
            loss.backward()
            optimizer.step()
            value = loss.item()
            seconds[name] += time.perf_counter() - t0
            losses[name].append(value)
    n = min(args.eval_users or split.num_users, split.num_users)  # the first n users
    eval_seconds = {name: 0.0 for name in variants}
    ranks: dict[str, list[np.ndarray]] = {name: [] for name in variants}
    span = 4 * cfg.eval_batch_size  # users per turn: the variants alternate, as in training
    for j, lo in enumerate(range(0, n, span)):
        hi = min(lo + span, n)
        offsets = split.valid_input.offsets[lo: hi + 1]
        inputs = Ragged(split.valid_input.values[offsets[0]: offsets[-1]], offsets - offsets[0])
        for name in (("before", "after") if j % 2 == 0 else ("after", "before")):
            t0 = time.perf_counter()
            ranks[name].append(rank_users(variants[name][3], inputs, split.valid_target[lo:hi], cfg.model.max_len,
                                          cfg.eval_batch_size, cfg.exclude_history))
            eval_seconds[name] += time.perf_counter() - t0
    ndcg = {name: metrics_from_ranks(np.concatenate(r))["ndcg@10"] for name, r in ranks.items()}
    gap = float(np.max(np.abs(np.array(losses["before"]) - np.array(losses["after"]))))
    widths = np.array([windows.lengths[b].max() for b in plan.batches[:steps]])
    rows = []
    for name in ("before", "after"):
        train = (seconds[name] + prepare) * total / steps
        evaluation = eval_seconds[name] * split.num_users / n
        rows.append({
            "recipe": recipe, "code": name, "batches": f"{steps}/{total}", "train_s": train,
            "eval_s": evaluation, "epoch_s": train + evaluation,
            "speedup": 0.0, "mean_loss": float(np.mean(losses[name])), "max_loss_gap": gap,
            "valid_ndcg@10": ndcg[name], "mean_width": float(widths.mean()),
        })
    for row in rows:
        row["speedup"] = rows[0]["epoch_s"] / row["epoch_s"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="user-per-line sequence file")
    parser.add_argument("--recipes", nargs="+", default=["default", "release"], choices=["default", "release"])
    parser.add_argument("--batches", type=int, default=None, help="batches per variant (default: the whole "
                        "epoch); fewer are extrapolated to the epoch")
    parser.add_argument("--eval-users", type=int, default=None, help="users evaluated (default: all); fewer "
                        "are extrapolated")
    parser.add_argument("--dropout", type=float, default=None, help="override the recipe's dropout (0: both "
                        "variants compute the same training up to float rounding)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    split, num_items = load_sequences(args.data)
    rows = [row for recipe in args.recipes for row in bench_recipe(recipe, split, num_items, args)]
    load = os.getloadavg()
    print_table(f"seconds per epoch on {args.data.name} ({split.num_users} users, {num_items} items), "
                f"{torch.get_num_threads()} thread(s), load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", rows)
    print_json_last({"benchmark": "paper_speed", "data": str(args.data), "threads": torch.get_num_threads(),
                     "load_average": list(load), "dropout": args.dropout, "peak_rss_mib": peak_rss_mib(),
                     "results": rows})


if __name__ == "__main__":
    main()
