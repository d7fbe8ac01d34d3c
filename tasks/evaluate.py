"""Full-ranking leave-one-out evaluation, batched over users (memory ~ batch x items, plus the
batch's history items, never batch x longest history).

Rank of the target: tasks/ranking.py, the project's one rank rule (1 + number of other items
scoring at least as high: ties count against the target; non-finite scores are an error). By
default the items of the user's input history are removed from the ranking (the target itself
is never removed, even when the user consumed it before).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from prefect import task

from core.workspace import Workspace
from storage.artifacts import write_table
from storage.dataset import dataset_store
from storage.files import join, location
from tasks.checkpoints import load_checkpoint
from tasks.executor import LOCAL, Executor, map_shards
from tasks.ragged import Ragged
from tasks.ranking import target_ranks
from tasks.runtime import Timed, resolve_device, timed
from tasks.split import LeaveOneOut, leave_one_out

KS = (5, 10, 20)
MRR_K = 20


def metric_names() -> list[str]:
    return [f"ndcg@{k}" for k in KS] + [f"recall@{k}" for k in KS] + [f"mrr@{MRR_K}"]


def per_user_metric(ranks: np.ndarray, metric: str) -> np.ndarray:
    """ndcg@k, recall@k or mrr@k of each user from the rank of their target (rank 1 = top)."""
    name, k = metric.split("@")
    ranks = np.asarray(ranks, dtype=np.float64)
    hit = ranks <= int(k)
    if name == "ndcg":
        return np.where(hit, 1.0 / np.log2(ranks + 1.0), 0.0)
    if name == "recall":
        return hit.astype(np.float64)
    if name == "mrr":
        return np.where(hit, 1.0 / ranks, 0.0)
    raise ValueError(f"unknown metric {metric!r}")


def metrics_from_ranks(ranks: np.ndarray) -> dict[str, float]:
    """Every metric of metric_names(): the mean over users (NaN without users)."""
    if len(ranks) == 0:
        return {name: float("nan") for name in metric_names()}
    return {name: float(per_user_metric(ranks, name).mean()) for name in metric_names()}


def rank_users(model: torch.nn.Module, inputs: Ragged, targets: np.ndarray, max_len: int,
               batch_size: int = 512, exclude_history: bool = True,
               device: torch.device | str = "cpu", executor: Executor = LOCAL) -> np.ndarray:
    """Rank of every user's target, scoring from the newest `max_len` items of `inputs`.
    Batches of users are the shards; ranks come back in user order on any executor."""
    shards = [np.arange(lo, min(lo + batch_size, len(targets))) for lo in range(0, len(targets), batch_size)]
    worker = RankShard(model, inputs, targets, max_len, exclude_history, str(device))
    ranks = map_shards(executor, worker, shards, gpu=torch.device(device).type == "cuda")
    return np.concatenate(ranks) if ranks else np.zeros(0, dtype=np.int64)


@dataclass
class RankShard:
    """A shard worker of evaluation: called with user rows, returns their targets' ranks."""

    model: torch.nn.Module
    inputs: Ragged
    targets: np.ndarray
    max_len: int
    exclude_history: bool
    device: str

    @torch.no_grad()
    def __call__(self, rows: np.ndarray) -> np.ndarray:
        model = self.model.to(self.device)  # a no-op in the process that built it
        was_training = model.training
        model.eval()
        try:
            seqs = self.inputs.tails(rows, self.max_len).to(self.device)
            scores = model.score_last(seqs)
            # Flat (row, item) pairs, not a (batch, longest history) tensor: one user with 10^6
            # interactions must not make every row of the batch 10^6 wide.
            history = (tuple(torch.from_numpy(a).to(self.device) for a in self.inputs.pairs(rows))
                       if self.exclude_history else None)
            target = torch.from_numpy(self.targets[rows]).to(self.device)
            return target_ranks(scores, target, history).cpu().numpy()
        finally:
            model.train(was_training)


def split_ranks(model: torch.nn.Module, split: LeaveOneOut, which: str, max_len: int,
                batch_size: int = 512, exclude_history: bool = True,
                device: torch.device | str = "cpu", executor: Executor = LOCAL) -> np.ndarray:
    """Target rank of every real user (in seq_id order) on the validation or test split."""
    if which == "valid":
        inputs, targets = split.valid_input, split.valid_target
    elif which == "test":
        inputs, targets = split.test_input, split.test_target
    else:
        raise ValueError(f"which must be 'valid' or 'test', got {which!r}")
    return rank_users(model, inputs, targets, max_len, batch_size, exclude_history, device, executor)


def evaluate_split(model: torch.nn.Module, split: LeaveOneOut, which: str, max_len: int,
                   batch_size: int = 512, exclude_history: bool = True,
                   device: torch.device | str = "cpu") -> dict[str, float]:
    return metrics_from_ranks(split_ranks(model, split, which, max_len, batch_size, exclude_history, device))


@dataclass(frozen=True)
class Evaluation:
    """Validation and test metrics of one checkpoint on one dataset version's real users."""

    model: str
    checkpoint: str
    dataset: str
    version: int
    digest: str
    valid: dict[str, float]  # metric name (metric_names()) -> value
    test: dict[str, float]
    ranks_path: str | None = None  # per-user target ranks (Parquet), for paired comparisons


def evaluate_checkpoint(ws: Workspace, checkpoint: str | Path, dataset: str, version: int | None = None,
                        exclude_history: bool = True, device: str = "auto",
                        batch_size: int = 512, ranks_path: str | None = None,
                        executor: Executor = LOCAL) -> Evaluation:
    """Evaluate a stored checkpoint on a dataset version; refuses another item count or item table.
    With `ranks_path`, also write every real user's validation and test target rank there
    (Parquet), the input of paired comparisons between models."""
    store = dataset_store(ws)
    manifest = store.manifest(dataset, version)
    dev = resolve_device(device)
    model, payload = load_checkpoint(checkpoint, items=store.item_table(manifest), device=dev)
    split = leave_one_out(store.load(dataset, manifest.version), manifest.num_items)
    args = (model.config.max_len, batch_size, exclude_history, dev)
    ranks = {which: split_ranks(model, split, which, *args, executor=executor) for which in ("valid", "test")}
    if ranks_path is not None:
        write_ranks(ranks_path, ranks)
    return Evaluation(payload["backbone"], str(checkpoint), dataset, manifest.version, manifest.digest,
                      metrics_from_ranks(ranks["valid"]), metrics_from_ranks(ranks["test"]),
                      None if ranks_path is None else str(ranks_path))


def write_ranks(path: str, ranks: dict[str, np.ndarray]) -> None:
    table = pa.table({"user_index": pa.array(np.arange(len(ranks["test"]), dtype=np.int64)),
                      **{f"{which}_rank": pa.array(r.astype(np.int64)) for which, r in ranks.items()}})
    write_table(location(path), table, {"columns": "target rank per real user, users in seq_id order"})


@task(name="evaluate", task_run_name="evaluate-v{version}")
def evaluate_task(home: str, checkpoint: str, dataset: str, version: int, device: str = "auto",
                  executor: Executor = LOCAL) -> Timed[Evaluation]:
    """Prefect wrapper: validation and test metrics of a checkpoint on D_version's real users,
    and the per-user ranks file next to the version's other run artifacts."""
    ws = Workspace.at(home)
    ranks_path = join(ws.runs, dataset, f"v{version}", f"ranks-{Path(checkpoint).stem}.parquet")
    return timed(evaluate_checkpoint, ws, checkpoint, dataset, version, device=device, ranks_path=str(ranks_path),
                 executor=executor)
