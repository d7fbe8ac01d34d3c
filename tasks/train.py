"""Train a backbone on a dataset version: Adam, early stopping on a validation metric.

Every target position of an epoch weighs the same in the objective (a synthetic one times
λ = synthetic_weight), whatever batch it falls in: the paper's L_k(θ) + λ·L_gen(θ)."""

from __future__ import annotations

import contextlib
import copy
import io
import math
import sys
import time
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
from prefect import task
from tqdm import tqdm

from core.config import key_fields
from core.errors import RsirError
from core.hashing import json_digest
from core.workspace import Workspace
from models import build_model
from storage.checkpoints import read_checkpoint
from storage.dataset import dataset_store
from storage.files import Location, copy_file, exists, join, read_bytes, remove_file, write_bytes
from tasks.checkpoints import commit_checkpoint, save_checkpoint
from tasks.config import TrainConfig, TrainingSettings
from tasks.evaluate import evaluate_split
from tasks.executor import LOCAL, Executor, report_result, run_data_parallel
from tasks.ranking import NonFiniteScores
from tasks.runtime import Timed, hardware, resolve_device, seed_everything, timed, torch_threads
from tasks.split import (
    BATCHINGS,
    LeaveOneOut,
    TargetWeights,
    Windows,
    batch_scales,
    leave_one_out,
    synthetic_position_share,
    synthetic_weight_share,
    training_windows,
    window_tensors,
)


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
    name: str = ""  # <model>-v<k>-seed<s>-<content key>.pt: θ's file name where people read it (MLflow)
    synthetic_position_share: float = 0.0  # synthetic target positions / all, per epoch
    synthetic_weight_share: float = 0.0  # their share of the gradient weight (mean over epochs)
    resumed_after: int = 0  # the epoch an interrupted training continued after (0: one sitting)
    hardware: str = ""  # what trained θ (tasks/runtime.py hardware; "" in checkpoints written before)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)



@dataclass(frozen=True)
class EpochPlan:
    """One epoch's batches: window indices and the factor of each batch's Σ w ℓ."""

    batches: list[np.ndarray]
    scales: np.ndarray


def plan_epoch(windows: Windows, weights: TargetWeights, cfg: TrainingSettings,
               rng: np.random.Generator) -> EpochPlan:
    batches = BATCHINGS[cfg.batching](windows, cfg.batch_size, rng)
    return EpochPlan(batches, batch_scales(windows, weights, batches, cfg.weighting))


def epoch_batches(split: LeaveOneOut, windows: Windows, weights: TargetWeights, plan: EpochPlan
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(inputs, targets, weights) per batch, each (B, L); a batch's loss is Σ weights·ℓ over its
    target positions, and the mean of an epoch's batch losses is the λ-weighted mean over all
    its target positions (weighting=position)."""
    for idx, scale in zip(plan.batches, plan.scales):
        inputs, targets = window_tensors(split.train, windows, idx)
        per_window = torch.from_numpy(weights.per_window[idx] * scale).float()[:, None]
        yield inputs, targets, per_window.expand_as(targets) * (targets != 0)


@dataclass(frozen=True)
class Fit:
    epochs: int
    best_epoch: int
    curve: list[dict[str, float]]
    synthetic_position_share: float  # of the target positions (the same every epoch)
    synthetic_weight_share: float  # of the gradient weight, mean over epochs (batchings vary)
    earlier_seconds: float = 0.0  # spent before an interrupt, in the sittings this training resumed from
    resumed_after: int = 0  # the last epoch of those sittings (0: none)


class DataParallel:
    """This process's place among `world` training processes (torch.distributed is set up): it
    takes rows rank, rank + world, ... of every batch, and the gradients are summed over the
    processes. A batch's loss is a weighted *sum* over its rows (the epoch's scale is in the
    weights), so the summed gradient is the whole batch's, up to the order of float additions."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    def share(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t[self.rank::self.world] for t in tensors)

    def sum_scalar(self, value: float) -> float:
        import torch.distributed as dist

        total = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(total)
        return float(total.item())

    def sum_gradients(self, model: torch.nn.Module) -> None:
        """One all-reduce of every parameter's gradient (zeros where this share had none)."""
        import torch.distributed as dist

        params = [p for p in model.parameters() if p.requires_grad]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        dist.all_reduce(flat)
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            p.grad = g.view_as(p).clone()


@dataclass
class _Loop:
    """What a training loop carries from epoch to epoch besides the weights and Adam's moments:
    the state `ResumePoint` saves, so that a resumed loop continues exactly where it stopped."""

    best_score: float
    best_epoch: int
    best_state: dict[str, torch.Tensor]
    curve: list[dict[str, float]]
    weight_shares: list[float]
    epoch: int = 0  # the last finished epoch
    seconds: float = 0.0  # spent in earlier sittings (a resumed training's)


class ResumePoint:
    """An unfinished training's state at the end of an epoch, in one file (`path`): the weights,
    Adam's state, every random generator the loop draws from (numpy's batching generator,
    torch's CPU and CUDA generators: dropout, negatives), the best weights so far and the curve.
    A training of the same content key (same data, same settings) that finds it continues from
    the next epoch and ends with the weights the uninterrupted training would have, on the same
    device type; on another device type, or from a file it cannot read, it starts over.
    Saved at most every `cfg.resume_seconds` (and never after the stopping epoch), atomically
    (storage.files.write_bytes); removed once the finished checkpoint is kept."""

    def __init__(self, path: Location, device: torch.device):
        self.path, self.device = path, device

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rng: np.random.Generator,
             loop: _Loop, seconds: float) -> None:
        state = {"device": self.device.type, "epoch": loop.epoch, "model": model.state_dict(),
                 "optimizer": optimizer.state_dict(), "numpy_rng": rng.bit_generator.state,
                 "torch_rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
                 "best_score": loop.best_score, "best_epoch": loop.best_epoch, "best_state": loop.best_state,
                 "curve": loop.curve, "weight_shares": loop.weight_shares, "seconds": loop.seconds + seconds}
        buffer = io.BytesIO()
        torch.save(state, buffer)
        write_bytes(self.path, buffer.getvalue())

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                rng: np.random.Generator) -> _Loop | None:
        """The loop state to continue from, with the model, Adam and the generators set back;
        None, with all four as they were, when there is no usable file: a file that fails part
        way (the weights load, Adam's state does not) must not leave a fresh training starting
        from its weights, which no configuration reproduces."""
        if not exists(self.path):
            return None
        before = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()), rng.bit_generator.state,
                  torch.get_rng_state(), torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None)
        try:
            state = torch.load(io.BytesIO(read_bytes(self.path)), map_location=self.device, weights_only=True)
            if state["device"] != self.device.type:
                return None  # another device's arithmetic: its continuation would not be this training
            loop = _Loop(state["best_score"], state["best_epoch"], state["best_state"], state["curve"],
                         state["weight_shares"], int(state["epoch"]), state["seconds"])
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            rng.bit_generator.state = state["numpy_rng"]
            torch.set_rng_state(state["torch_rng"].cpu())
            if state["cuda_rng"] is not None:
                torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
        except Exception:  # a file from other code or cut short by a full disk: start over, as before it
            model.load_state_dict(before[0])
            optimizer.load_state_dict(before[1])
            rng.bit_generator.state = before[2]
            torch.set_rng_state(before[3])
            if before[4] is not None:
                torch.cuda.set_rng_state_all(before[4])
            return None
        # Said where a person sees it (stderr; a flow's log): the epochs before it are not rerun.
        print(f"resuming the training after epoch {loop.epoch} from its saved state {self.path}", file=sys.stderr)
        return loop

    def remove(self) -> None:
        remove_file(self.path)

    def saved_epoch(self) -> int | None:
        """The last epoch the saved state holds; None when there is none (or it cannot be read)."""
        if not exists(self.path):
            return None
        try:
            return int(torch.load(io.BytesIO(read_bytes(self.path)), map_location="cpu", weights_only=True)["epoch"])
        except Exception:
            return None

    @classmethod
    def of(cls, cfg: TrainConfig, ws: Workspace) -> "ResumePoint":
        """Where the training `cfg` keeps its unfinished state: by its content key, so the same
        training finds it from any run or command."""
        manifest = dataset_store(ws).manifest(cfg.dataset, cfg.version)
        key = content_key(cfg, manifest.digest, synthetic=manifest.stats.synthetic_sequences != 0)
        return cls(join(ws.checkpoints, "unfinished", f"{key}.pt"), resolve_device(cfg.device))


def fit(model: torch.nn.Module, split: LeaveOneOut, cfg: TrainConfig, device: torch.device,
        on_epoch: Callable[[dict[str, float]], None] | None = None, group: DataParallel | None = None,
        resume: ResumePoint | None = None) -> Fit:
    """Train in place; leave the best weights (validation `cfg.early_stop`) loaded. With `group`,
    this is one process of a data-parallel training: every process plans the same epochs (same
    seed), trains on its share of each batch, and evaluates the same weights (same decisions).
    With `resume` (one process only), a saved unfinished state of this training is continued
    and the state is saved as the training goes (ResumePoint); `on_epoch` sees the epochs run here."""
    windows = training_windows(split.train, cfg.model.max_len, cfg.window_stride)
    if len(windows) == 0:
        raise RsirError(f"dataset {cfg.dataset!r} has no training sequence with 2 or more items")
    weights = TargetWeights.of(windows, split.train_synthetic, cfg.synthetic_weight)
    rng = np.random.default_rng(cfg.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    resume = resume if group is None else None
    loop = (resume.restore(model, optimizer, rng) if resume is not None else None) or \
        _Loop(-1.0, 0, copy.deepcopy(model.state_dict()), [], [])
    best_score, best_epoch, best_state = loop.best_score, loop.best_epoch, loop.best_state
    curve, weight_shares = loop.curve, loop.weight_shares
    epoch, started, saved = loop.epoch, time.perf_counter(), time.perf_counter()
    for epoch in range(loop.epoch + 1, cfg.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        plan = plan_epoch(windows, weights, cfg, rng)
        total_loss = 0.0
        batches = epoch_batches(split, windows, weights, plan)
        for inputs, targets, w in tqdm(batches, total=len(plan.batches), desc=f"epoch {epoch}", leave=False,
                                       disable=not cfg.progress, file=sys.stderr, unit="batch"):
            if group is not None:
                inputs, targets, w = group.share(inputs, targets, w)
            optimizer.zero_grad(set_to_none=True)
            if len(targets):  # a share can be empty when a batch has fewer rows than processes
                loss = model.loss(inputs.to(device), targets.to(device), w.to(device))
                loss.backward()
                value = loss.item()
                # Alone, stop at the first bad batch; data-parallel processes decide together on
                # the epoch's summed loss below (one process raising alone would hang the others).
                if group is None:
                    _require_finite_loss(value, epoch, cfg)
                total_loss += value
            if group is not None:
                group.sum_gradients(model)
            optimizer.step()
        if group is not None:
            total_loss = group.sum_scalar(total_loss)
        _require_finite_loss(total_loss, epoch, cfg)
        train_seconds = time.perf_counter() - t0
        try:
            valid = evaluate_split(model, split, "valid", cfg.model.max_len, cfg.eval_batch_size,
                                   cfg.exclude_history, device)
        except NonFiniteScores:
            raise RsirError(_diverged(epoch, cfg, "the model's validation scores are NaN or +inf")) from None
        weight_shares.append(synthetic_weight_share(windows, weights, plan.batches, plan.scales))
        point = {"epoch": epoch, "loss": total_loss / len(plan.batches), f"valid_{cfg.early_stop}": valid[cfg.early_stop],
                 "valid_ndcg@10": valid["ndcg@10"], "valid_recall@10": valid["recall@10"],
                 "seconds": time.perf_counter() - t0, "train_seconds": train_seconds}
        curve.append(point)
        if on_epoch:
            on_epoch(point)
        if valid[cfg.early_stop] > best_score:
            best_score, best_epoch = valid[cfg.early_stop], epoch
            best_state = copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= cfg.patience:
            break
        if resume is not None and epoch < cfg.epochs and time.perf_counter() - saved >= cfg.resume_seconds:
            resume.save(model, optimizer, rng, _Loop(best_score, best_epoch, best_state, curve, weight_shares,
                                                     epoch, loop.seconds), time.perf_counter() - started)
            saved = time.perf_counter()
    model.load_state_dict(best_state)
    return Fit(epoch, best_epoch, curve, synthetic_position_share(windows, weights), float(np.mean(weight_shares)),
               loop.seconds, loop.epoch)


def _require_finite_loss(value: float, epoch: int, cfg: TrainConfig) -> None:
    """A NaN or infinite loss ends the training before anything is kept: NaN weights would score
    every item alike (or NaN), and no such epoch may become the best, a checkpoint or a champion."""
    if not math.isfinite(value):
        raise RsirError(_diverged(epoch, cfg, f"loss is {value}"))


def _diverged(epoch: int, cfg: TrainConfig, what: str) -> str:
    return f"training diverged in epoch {epoch}: {what} (lr={cfg.lr:g}); nothing was saved: lower --lr or check the data"


KEY_DIGITS = 20  # a checkpoint's content key: the one hash length of checkpoint names


def content_key(cfg: TrainConfig, digest: str, synthetic: bool = True) -> str:
    """What a training depends on: the data (digest, not the dataset's name) and the config;
    KEY_DIGITS hex digits of their SHA-256. On data without synthetic sequences (`synthetic`
    False) λ weighs no target (TargetWeights): it is keyed at its default, so trainings of θ_0
    that differ only in λ (`rsir tune`'s trials) share one checkpoint, and keys made at the
    default stay as they were."""
    if not synthetic:
        cfg = cfg.model_copy(update={"synthetic_weight": TrainingSettings.model_fields["synthetic_weight"].default})
    return json_digest([digest, key_fields(cfg)])[:KEY_DIGITS]


def checkpoint_path(ws: Workspace, key: str) -> Location:
    """The one stored copy of a training: `checkpoints/by-content/<content key>.pt`, found again
    by a resumed run (same lineage) and by any run training the same data and config (the common
    θ_0 of an experiment's arms)."""
    return join(ws.checkpoints, "by-content", f"{key}.pt")


def checkpoint_name(cfg: TrainConfig, version: int, key: str) -> str:
    """θ's readable name, `<model>-v<k>-seed<s>-<content key>.pt`: the file name it has in
    MLflow (a run's `checkpoint` artifact, its logged model); no second copy on disk."""
    return f"{cfg.model.name}-v{version}-seed{cfg.seed}-{key}.pt"


def fit_data_parallel(model: torch.nn.Module, split: LeaveOneOut, cfg: TrainConfig, executor: Executor,
                      ws: Workspace) -> Fit:
    """`fit` in cfg.train_workers processes on Ray (Ray Train, one CPU or GPU each); the best
    weights are loaded into `model`. Equal to one process up to float summation order and the
    dropout draws (each process seeds its own from (seed, rank))."""
    gpu = resolve_device(cfg.device).type == "cuda"
    storage = ws.shared("runs", "ray-train")
    payload = run_data_parallel(executor, data_parallel_worker, {"cfg": cfg, "split": split,
                                                                 "num_items": int(model.num_items)},
                                cfg.train_workers, gpu, str(storage))
    state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    model.load_state_dict(state["state_dict"])
    return Fit(**state["fit"])


def data_parallel_worker(config: dict[str, Any]) -> None:
    """One process of a data-parallel training (runs inside Ray Train, torch.distributed set up):
    the same initial weights everywhere, its share of every batch, rank 0 reports the result."""
    import ray.train
    from ray.train.torch import get_device

    cfg, split = config["cfg"], config["split"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(1)
    device = get_device()
    seed_everything(cfg.seed)  # identical initial weights in every process
    model = build_model(cfg.model, config["num_items"]).to(device)
    torch.manual_seed(cfg.seed * 1_000_003 + rank)  # each process its own dropout draws, reproducibly
    fitted = fit(model, split, cfg, device, group=DataParallel(rank, world))
    report_result(rank, {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                         "fit": asdict(fitted)})


# Who watches the epochs of the trainings this context runs (`rsir tune`'s pruner, tasks/tune.py):
# called after each epoch's validation with the training's config and its curve point; it may
# raise to stop the training (nothing is then saved). A context variable: Prefect runs a flow's
# tasks in the flow's context, so only the trainings of the flow that set it see it.
EpochWatcher = Callable[[TrainConfig, dict[str, float]], None]
_EPOCH_WATCHER: ContextVar[EpochWatcher | None] = ContextVar("rsir_epoch_watcher", default=None)


@contextlib.contextmanager
def watching_epochs(watcher: EpochWatcher) -> Iterator[None]:
    """Within the block, every training of this context that runs `fit` in this process (not a
    data-parallel one on Ray, not a reused checkpoint) calls `watcher(cfg, point)` per epoch."""
    token = _EPOCH_WATCHER.set(watcher)
    try:
        yield
    finally:
        _EPOCH_WATCHER.reset(token)


def train_model(cfg: TrainConfig, ws: Workspace, checkpoint: Location | None = None,
                on_epoch: Callable[[dict[str, float]], None] | None = None,
                evaluate: bool = True, reuse: bool = False, executor: Executor = LOCAL) -> TrainResult:
    """Load D_k, train from scratch, evaluate the best epoch on validation and test, save it.

    The checkpoint goes to the store by content key (`checkpoint_path`), or to `checkpoint`
    when given (a file the caller names; the store keeps its own copy for later reuse). With
    `reuse`, a training of the same data and config already in the store is returned with its
    stored result instead of training again (crash-resume, trainings shared between runs)."""
    store = dataset_store(ws)
    manifest = store.manifest(cfg.dataset, cfg.version)  # clear error for unknown names/versions
    key = content_key(cfg, manifest.digest, synthetic=manifest.stats.synthetic_sequences != 0)
    stored = checkpoint_path(ws, key)
    path = checkpoint or stored
    name = checkpoint_name(cfg, manifest.version, key)
    if reuse and _reusable(stored, manifest.digest):
        if path != stored:
            copy_file(stored, path)
        return _stored_result(path, cfg, manifest, name)
    watcher = _EPOCH_WATCHER.get()
    if on_epoch is None and watcher is not None:
        on_epoch = lambda point: watcher(cfg, point)  # noqa: E731
    device = resolve_device(cfg.device)
    started = time.perf_counter()
    split = leave_one_out(store.load(cfg.dataset, manifest.version), manifest.num_items)
    seed_everything(cfg.seed)
    model = build_model(cfg.model, manifest.num_items).to(device)
    valid: dict[str, float] = {}
    test: dict[str, float] = {}
    resume = ResumePoint.of(cfg, ws) if cfg.train_workers == 1 else None
    with torch_threads(cfg.threads):
        if resume is None:
            fitted = fit_data_parallel(model, split, cfg, executor, ws)
        else:
            fitted = fit(model, split, cfg, device, on_epoch, resume=resume)
        if evaluate:
            args = (cfg.model.max_len, cfg.eval_batch_size, cfg.exclude_history, device)
            valid = evaluate_split(model, split, "valid", *args)
            test = evaluate_split(model, split, "test", *args)
    result = TrainResult(
        valid=valid, test=test, epochs=fitted.epochs, best_epoch=fitted.best_epoch,
        seconds_per_epoch=sum(p["seconds"] for p in fitted.curve) / max(len(fitted.curve), 1),
        seconds_total=time.perf_counter() - started + fitted.earlier_seconds, checkpoint=str(path), dataset=cfg.dataset,
        version=manifest.version, digest=manifest.digest, device=str(device), hardware=hardware(device),
        curve=fitted.curve, name=name,
        synthetic_position_share=fitted.synthetic_position_share,
        synthetic_weight_share=fitted.synthetic_weight_share, resumed_after=fitted.resumed_after,
    )
    meta = {"dataset": cfg.dataset, "version": manifest.version, "digest": manifest.digest,
            "seed": cfg.seed, "result": result.to_dict()}
    # With `reuse` the content key names the θ of a lineage: two runs training it at once (two
    # workers, same parameters) must end with one θ, or their D_{k+1} would differ by whose bytes
    # each generator read. The first commit wins; the other adopts it.
    items_digest = store.item_table(manifest).digest  # what the ids in the weights denote
    if not reuse:
        save_checkpoint(path, model, cfg.model, manifest.num_items, meta, items_digest)
    elif not commit_checkpoint(path, model, cfg.model, manifest.num_items, meta, items_digest):
        result = _stored_result(path, cfg, manifest, name)
    if path != stored:
        copy_file(path, stored)
    if resume is not None:
        resume.remove()  # the finished checkpoint is kept: nothing left to resume
    return result


def _stored_result(path: Location, cfg: TrainConfig, manifest: Any, name: str) -> TrainResult:
    stored = read_checkpoint(path)["meta"]["result"]
    return TrainResult(**{**stored, "checkpoint": str(path), "dataset": cfg.dataset, "version": manifest.version,
                          "name": name, "reused": True})


def _reusable(path: Location, digest: str) -> bool:
    """Whether a finished training of the data with this digest is at `path`."""
    if not exists(path):
        return False
    stored = read_checkpoint(path)["meta"].get("result")
    return bool(stored) and stored.get("digest") == digest


@task(name="train", task_run_name="train-{role}-{config.model.name}-v{config.version}")
def train_task(config: TrainConfig, home: str, role: str = "student", executor: Executor = LOCAL
               ) -> Timed[TrainResult]:
    """Prefect wrapper: takes and returns small things (config, workspace path, curve + checkpoint
    path); reuses a finished checkpoint of the same inputs; evaluation is its own task."""
    return timed(train_model, config, Workspace.at(home), evaluate=False, reuse=True, executor=executor)
