"""Train a backbone on a dataset version: Adam, early stopping on validation NDCG@10."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from prefect import task
from tqdm import tqdm

from models import build_model
from rsir.config import TrainConfig
from rsir.errors import RsirError
from rsir.workspace import Workspace
from storage.checkpoints import read_checkpoint, save_checkpoint
from tasks.evaluate import evaluate_split
from tasks.ingest import dataset_store
from tasks.runtime import resolve_device, seed_everything, timed
from tasks.split import LeaveOneOut, leave_one_out, training_windows, window_batches, window_tensors

EARLY_STOP_METRIC = "ndcg@10"


@dataclass
class TrainResult:
    valid: dict[str, float]
    test: dict[str, float]
    epochs: int
    best_epoch: int
    seconds_per_epoch: float
    seconds_total: float
    checkpoint: str
    dataset: str
    version: int
    digest: str
    device: str
    curve: list[dict[str, float]] = field(default_factory=list)
    reused: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Settings that change how fast a training runs or what it prints, never what it learns.
_NOT_LEARNED = {"progress", "threads", "device", "eval_batch_size"}


def config_hash(cfg: TrainConfig) -> str:
    keep = cfg.model_dump(mode="json", exclude=_NOT_LEARNED)
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:10]


def fit(model: torch.nn.Module, split: LeaveOneOut, cfg: TrainConfig, device: torch.device,
        on_epoch: Callable[[dict[str, float]], None] | None = None) -> tuple[int, int, list[dict[str, float]]]:
    """Train in place; leave the best (validation NDCG@10) weights loaded.
    Returns (epochs run, best epoch, per-epoch curve)."""
    max_len = cfg.model.max_len
    windows = training_windows(split.train, max_len)
    if len(windows) == 0:
        raise RsirError(f"dataset {cfg.dataset!r} has no training sequence with 2 or more items")
    rng = np.random.default_rng(cfg.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best_score, best_epoch, best_state = -1.0, 0, copy.deepcopy(model.state_dict())
    curve: list[dict[str, float]] = []
    epoch = 0
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        batches = window_batches(windows, cfg.batch_size, rng)
        total_loss = 0.0
        bar = tqdm(batches, desc=f"epoch {epoch}", leave=False, disable=not cfg.progress,
                   file=sys.stderr, unit="batch")
        for idx in bar:
            inputs, targets = window_tensors(split.train, windows, idx)
            loss = model.loss(inputs.to(device), targets.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(idx)
        train_seconds = time.perf_counter() - t0
        valid = evaluate_split(model, split, "valid", max_len, cfg.eval_batch_size, cfg.exclude_history, device)
        point = {"epoch": epoch, "loss": total_loss / len(windows), "valid_ndcg@10": valid["ndcg@10"],
                 "valid_recall@10": valid["recall@10"], "seconds": time.perf_counter() - t0,
                 "train_seconds": train_seconds}
        curve.append(point)
        if on_epoch:
            on_epoch(point)
        if valid[EARLY_STOP_METRIC] > best_score:
            best_score, best_epoch = valid[EARLY_STOP_METRIC], epoch
            best_state = copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= cfg.patience:
            break
    model.load_state_dict(best_state)
    return epoch, best_epoch, curve


def content_key(cfg: TrainConfig, digest: str) -> str:
    """What a training depends on: the data (digest, not the dataset's name) and the config."""
    keep = cfg.model_dump(mode="json", exclude=_NOT_LEARNED | {"dataset", "version"})
    return hashlib.sha256(json.dumps([digest, keep], sort_keys=True).encode()).hexdigest()[:20]


def shared_checkpoint_path(ws: Workspace, key: str) -> Path:
    return ws.checkpoints / "by-content" / f"{key}.pt"


def checkpoint_path(cfg: TrainConfig, ws: Workspace, version: int) -> Path:
    """Deterministic for (dataset, version, config): lets a resumed flow find a finished training."""
    return ws.checkpoints / cfg.dataset / f"{cfg.model.name}-v{version}-seed{cfg.seed}-{config_hash(cfg)}.pt"


def train_model(cfg: TrainConfig, ws: Workspace, checkpoint: Path | None = None,
                on_epoch: Callable[[dict[str, float]], None] | None = None,
                evaluate: bool = True, reuse: bool = False) -> TrainResult:
    """Load D_k, train from scratch, evaluate the best epoch on validation and test, save it.

    With `reuse`, a checkpoint already committed at the same path (same dataset version and
    config) is returned with its stored result instead of training again (crash-resume)."""
    store = dataset_store(ws)
    manifest = store.manifest(cfg.dataset, cfg.version)  # clear error for unknown names/versions
    path = checkpoint or checkpoint_path(cfg, ws, manifest.version)
    shared = shared_checkpoint_path(ws, content_key(cfg, manifest.digest))
    if reuse:
        found = _reusable(path, shared, manifest.digest)
        if found is not None:
            return TrainResult(**{**found, "checkpoint": str(path), "dataset": cfg.dataset,
                                  "version": manifest.version, "reused": True})
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    started = time.perf_counter()
    split = leave_one_out(store.load(cfg.dataset, manifest.version), manifest.num_items)
    seed_everything(cfg.seed)
    model = build_model(cfg.model, manifest.num_items).to(device)
    epochs, best_epoch, curve = fit(model, split, cfg, device, on_epoch)
    valid: dict[str, float] = {}
    test: dict[str, float] = {}
    if evaluate:
        args = (cfg.model.max_len, cfg.eval_batch_size, cfg.exclude_history, device)
        valid = evaluate_split(model, split, "valid", *args)
        test = evaluate_split(model, split, "test", *args)
    result = TrainResult(
        valid=valid, test=test, epochs=epochs, best_epoch=best_epoch,
        seconds_per_epoch=sum(p["seconds"] for p in curve) / max(len(curve), 1),
        seconds_total=time.perf_counter() - started, checkpoint=str(path), dataset=cfg.dataset,
        version=manifest.version, digest=manifest.digest, device=str(device), curve=curve,
    )
    meta = {"dataset": cfg.dataset, "version": manifest.version, "digest": manifest.digest,
            "seed": cfg.seed, "result": result.to_dict()}
    save_checkpoint(path, model, cfg.model, manifest.num_items, meta)
    _copy_atomically(path, shared)
    return result


def _reusable(path: Path, shared: Path, digest: str) -> dict[str, Any] | None:
    """The stored result of a finished training of the same data and config: at `path` (this
    run's own, crash-resume) or in the content-addressed store (another run trained the same
    θ, e.g. the common θ_0 of every arm of an experiment), copied to `path` first."""
    for candidate in (path, shared):
        if candidate.is_file():
            stored = read_checkpoint(candidate)["meta"].get("result")
            if stored and stored.get("digest") == digest:
                if candidate != path:
                    _copy_atomically(candidate, path)
                return stored
    return None


def _copy_atomically(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)


@task(name="train", task_run_name="train-{role}-{config.model.name}-v{config.version}")
def train_task(config: TrainConfig, home: str, role: str = "student") -> dict[str, Any]:
    """Prefect wrapper: takes and returns small things (config, workspace path, curve + checkpoint
    path); reuses a finished checkpoint of the same inputs; evaluation is its own task."""
    return timed(lambda: train_model(config, Workspace.at(home), evaluate=False, reuse=True).to_dict())
