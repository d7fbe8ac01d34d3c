"""The generate step: the rollout engine (tasks/rollout.py) over every training sequence of D_k,
its batches sharded over an executor, the result stored in a content-addressed file.

`generate_rollouts` and `extend_sequences` run the engine's loops on batches of ids (the shards:
on any executor, with any batch size, the same rollouts come out); `generate_step` reads the
dataset and the checkpoint, calls one of them and writes the rollouts (with traces and stop
reasons) beside their `Generation` record; `generate_task` is its Prefect task.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from prefect import task

from core.config import key_fields
from core.errors import RsirError
from core.hashing import json_digest
from core.workspace import Workspace
from models import SequenceModel
from storage.artifacts import read_table, write_table
from storage.checkpoints import check_compatible, read_checkpoint
from storage.dataset import dataset_store
from storage.files import exists, file_sha256, join, location
from tasks.checkpoints import load_checkpoint
from tasks.executor import LOCAL, Executor, map_shards
from tasks.ragged import Ragged, concat, slices
from tasks.retrieval import ItemIndex
from tasks.rollout import (
    EXTEND_REASONS,
    STOP_REASONS,
    Extensions,
    GenerationParams,
    Rollouts,
    check_sources,
    extend_batch,
    frozen,
    resolve_params,
    rollout_batch,
)
from tasks.runtime import Timed, resolve_device, timed
from tasks.split import leave_one_out


def generate_rollouts(model: SequenceModel, sources: Ragged, params: GenerationParams,
                      executor: Executor = LOCAL) -> Rollouts:
    """Run params.m rollouts from every source sequence (see ../shared/docs/rsir-method.md, section 3).
    Batches of params.batch_size rollout ids are the shards: on any executor, with any batch
    size, the same rollouts come out (global ids, counter-based pool draws)."""
    params = resolve_params(params, model)
    check_sources(sources, int(model.num_items))
    total = len(sources) * params.m
    items, trace, reasons = run_batches(model, sources, params, rollout_batch, (),
                                        np.arange(total, dtype=np.int64), executor)
    rollout_id = np.arange(total, dtype=np.int64)
    return Rollouts(items=items, source_index=rollout_id // params.m, rollout_id=rollout_id, stop_reason=reasons,
                    trace=trace, params=params)


@dataclass
class BatchShard:
    """A shard worker of generation: the model, the sources, the parameters and the batch step
    (`rollout_batch` or `extend_batch`, with its `extra` arguments); called with a batch of ids
    (rollout ids, or source rows), returns their (items, trace, stop reasons) as flat arrays."""

    model: SequenceModel
    sources: Ragged
    params: GenerationParams
    step: Callable[..., Any]
    extra: tuple
    index: ItemIndex | None = None  # retrieval=ivf: built on the first batch of each process

    def __call__(self, ids: np.ndarray):
        device = resolve_device(self.params.device)
        self.model.to(device)  # a no-op in the process that built it; once per Ray task group
        with frozen(self.model):
            if self.params.retrieval != "exact" and self.index is None:
                self.index = ItemIndex.build(self.model.output_embeddings(), self.params.candidates,
                                             self.params.nprobe, self.params.seed)
            return self.step(self.model, self.sources, ids, self.params, *self.extra, int(self.model.num_items),
                             device, self.index)


def run_batches(model: SequenceModel, sources: Ragged, params: GenerationParams, step: Callable[..., Any],
                extra: tuple, ids: np.ndarray, executor: Executor) -> tuple[Ragged, Ragged, np.ndarray]:
    """`step` over consecutive batches of `ids` on `executor`; the results joined in id order."""
    shards = [ids[lo: lo + params.batch_size] for lo in range(0, len(ids), params.batch_size)]
    done = map_shards(executor, BatchShard(model, sources, params, step, extra), shards,
                      gpu=resolve_device(params.device).type == "cuda")
    return (concat([d[0][0] for d in done], [d[0][1] for d in done]),
            concat([d[1][0] for d in done], [d[1][1] for d in done]),
            np.concatenate([d[2] for d in done]) if done else np.zeros(0, np.int8))


def extend_sequences(model: SequenceModel, sources: Ragged, params: GenerationParams,
                     holdout_h: int, executor: Executor = LOCAL) -> Extensions:
    """Hold out the last h items of each source (training parts only: the caller's job), extend
    the prefix greedily by up to m items (same pool rule; local pool = the source's items) and
    accept at the first step after which a held-out item ranks <= tau (tau None: any rank).
    Pool draws use pool_uniform(seed, source index, number of generated items)."""
    if not isinstance(holdout_h, (int, np.integer)) or holdout_h < 1:
        raise RsirError(f"invalid parameter 'holdout_h': must be an integer >= 1 (got {holdout_h!r})")
    params = resolve_params(params, model)
    eligible = np.flatnonzero(sources.lengths > holdout_h).astype(np.int64)
    check_sources(sources, int(model.num_items), min_items=0)
    items, trace, reasons = run_batches(model, sources, params, extend_batch, (holdout_h,), eligible, executor)
    return Extensions(
        items=items, source_index=eligible, prefix_len=sources.lengths[eligible] - holdout_h,
        stop_reason=reasons, trace=trace, holdout_h=int(holdout_h), params=params,
    )


# ------------------------------------------------------------------ the pipeline step (IO)
def sample_sources(n: int, max_sources: int | None, seed: int) -> np.ndarray:
    """Sorted rows of the sources to generate from: all n, or a seeded uniform sample."""
    if max_sources is None or max_sources >= n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng([seed, n])
    return np.sort(rng.choice(n, size=max_sources, replace=False)).astype(np.int64)


def generation_key(*parts: Any) -> str:
    return json_digest(list(parts))


@dataclass(frozen=True)
class Generation:
    """A stored generation: the file and what it was made from (its Parquet metadata is this
    record without `path` and `reused`)."""

    path: str
    key: str  # content key: data digest, weights, parameters, mode
    dataset: str
    version: int
    digest: str
    checkpoint: str
    checkpoint_sha256: str
    mode: str
    holdout_h: int
    params: GenerationParams  # as the generator ran: max_len filled from the model, device resolved
    rollouts: int
    sources: int
    seconds: float
    stop_reasons: dict[str, int]
    reused: bool = False

    def file_meta(self) -> dict[str, Any]:
        """The file's metadata (JSON): this record without `path` and `reused`."""
        meta = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("path", "reused")}
        return {**meta, "params": self.params.model_dump(mode="json")}

    @classmethod
    def from_file(cls, path: str | Path, meta: dict[str, Any], **update: Any) -> "Generation":
        known = {f.name for f in fields(cls)}
        given = {k: v for k, v in meta.items() if k in known}
        return cls(**{**given, "params": GenerationParams.model_validate(meta["params"]), "path": str(path),
                      **update})


def generate_step(home: str, dataset: str, version: int, checkpoint: str, params: GenerationParams,
                  mode: str = "rollout", holdout_h: int = 1, executor: Executor = LOCAL) -> Generation:
    """Generate from every training sequence of D_version with the model in `checkpoint`;
    write the rollouts (with traces and stop reasons) to a file keyed by the inputs and
    return its reference. An existing file for the same inputs is reused (resume)."""
    if mode not in ("rollout", "extend"):
        raise RsirError(f"invalid parameter 'mode': {mode!r} (rollout or extend)")
    ws = Workspace.at(home)
    store = dataset_store(ws)
    manifest = store.manifest(dataset, version)
    device = resolve_device(params.device)
    items = store.item_table(manifest)
    # Clear error for a missing or foreign file, or one trained on another item table, before
    # anything else (a stored generation of these inputs is returned below without loading it).
    check_compatible(checkpoint, read_checkpoint(checkpoint), items=items)
    payload_sha = file_sha256(location(checkpoint))
    key = generation_key(manifest.digest, payload_sha, key_fields(params), mode, holdout_h)
    # Content-addressed (data digest, weights, parameters): runs that share D_k and θ_k, such as
    # the arms of a sensitivity sweep, share one generation.
    path = join(ws.runs, "generations", f"rollouts-{key[:16]}.parquet")
    if exists(path):
        _, meta = read_table(path)  # made for whichever dataset of this content came first
        return Generation.from_file(path, meta, dataset=dataset, version=version, reused=True)
    model, _ = load_checkpoint(checkpoint, items=items, device=device)
    params = resolve_params(params.model_copy(update={"device": str(device)}), model)
    split = leave_one_out(store.load(dataset, manifest.version), manifest.num_items)
    rows = sample_sources(len(split.train), params.max_sources, params.seed)
    sources = slices(split.train.values, split.train.offsets[rows], split.train.offsets[rows + 1])
    started = time.perf_counter()
    if mode == "rollout":
        out: Rollouts | Extensions = generate_rollouts(model, sources, params, executor)
        rollout_id = out.rollout_id
    else:
        out = extend_sequences(model, sources, params, holdout_h, executor)
        rollout_id = rows[out.source_index]  # extension ids are source rows of D_k
    seconds = time.perf_counter() - started
    reasons = np.asarray(STOP_REASONS if mode == "rollout" else EXTEND_REASONS)[out.stop_reason]
    table = generation_table(out, rollout_id, rows[out.source_index], split.train_seq_ids, reasons)
    names, counts = np.unique(reasons.astype(str), return_counts=True)
    generation = Generation(str(path), key, dataset, version, manifest.digest, str(checkpoint), payload_sha, mode,
                            holdout_h, params, len(table), len(rows), seconds,
                            {str(n): int(c) for n, c in zip(names, counts)})
    write_table(path, table, generation.file_meta())
    return generation


def generation_table(out: Rollouts | Extensions, rollout_id: np.ndarray, source_rows: np.ndarray,
                     seq_ids: np.ndarray, reasons: np.ndarray) -> pa.Table:
    """One row per rollout (or extension): ids, its source row of D_k and that row's seq_id,
    items, fidelity trace, stop reason (and, for extensions, the prefix length)."""
    table = pa.table({
        "rollout_id": pa.array(rollout_id, pa.int64()),
        "source_index": pa.array(source_rows, pa.int64()),
        "parent_seq_id": pa.array(seq_ids[source_rows], pa.int64()),
        "items": out.items.to_arrow(),
        "trace": out.trace.to_arrow(),
        "stop_reason": pa.array(reasons.astype(str)),
    })
    if isinstance(out, Extensions):
        table = table.append_column("prefix_len", pa.array(out.prefix_len, pa.int64()))
    return table


@task(name="generate", task_run_name="generate-{dataset}-v{version}")
def generate_task(home: str, dataset: str, version: int, checkpoint: str, params: GenerationParams,
                  mode: str = "rollout", holdout_h: int = 1, executor: Executor = LOCAL) -> Timed[Generation]:
    return timed(generate_step, home, dataset, version, checkpoint, params, mode, holdout_h, executor)
