"""Synthetic-sequence generation with fidelity control (the released RSIR algorithm), vectorized.

Every rollout of a batch advances one item per step, so the whole batch is scored at once per
step (tasks/decoding.py: cached keys and values where the model allows, scores whole or in item
chunks, or approximate candidates); the fidelity check, both pools and the greedy pick are
tensor ops over all active rollouts at once. Rollouts leave the active set as they stop. Memory
is bounded by the batch: scores (batch, min(N+1, item_chunk)) plus item lists (batch, distinct
items of a source <= N, and max_len), never by the number of rollouts. (Extension mode also
keeps each source's prefix in a (batch, longest prefix + m) buffer.)

Randomness: the only random choice is the pool (local S with probability p, else all items).
Its uniform is a counter-based hash of (seed, rollout id, step), so results do not depend on
the batch size, the device, or which other rollouts are active.

Pure computation: no file IO; the caller moves the model to `params.device` beforehand.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
from prefect import task
from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.config import BatchSize, Device, ItemChunk, Rank, Rollouts, Seed, SequenceCount, SequenceLength, Workers
from core.errors import RsirError
from core.hashing import json_digest
from core.workspace import Workspace
from models import SequenceModel, SequentialRecommender
from storage.artifacts import read_table, write_table
from storage.files import exists, file_sha256, join, location
from storage.checkpoints import check_compatible, read_checkpoint
from tasks.checkpoints import load_checkpoint
from storage.dataset import dataset_store
from tasks.decoding import Decoder, best_of_listed
from tasks.executor import LOCAL, Executor, map_shards
from tasks.retrieval import ItemIndex, require_faiss
from tasks.runtime import Timed, resolve_device, timed
from tasks.split import Ragged, flat_index, gather_padded, leave_one_out


# Stop reasons of the main generator, stored as int8 codes into this table.
STOP_REASONS: tuple[str, ...] = ("exhausted", "fidelity", "no_candidate", "max_len")
EXHAUSTED, FIDELITY, NO_CANDIDATE, MAX_LEN = range(4)
# Outcomes of the "second reading" (extension) mode.
EXTEND_REASONS: tuple[str, ...] = ("accepted", "rejected", "exhausted", "no_candidate")
ACCEPTED, REJECTED, EXT_EXHAUSTED, EXT_NO_CANDIDATE = range(4)
# Trace value of a check that found no real item left (ranks are >= 1, so it never exceeds tau).
NO_REAL_ITEM = 0


class GenerationParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    m: Rollouts = Field(5, description="rollouts per source (extension mode: most items added)")
    tau: Rank | None = Field(10, description="rank threshold; None = fidelity off (no rank limit)")
    p: float = Field(0.5, ge=0.0, le=1.0, description="probability of the local pool (the user's items)")
    min_len: SequenceLength = Field(3, description="shortest synthetic sequence kept by the filter")
    max_len: SequenceLength | None = Field(None, description="longest rollout; default the model's max_len")
    seed: Seed = 0
    batch_size: BatchSize = Field(1024, description="rollouts scored together")
    device: Device = "cpu"
    max_sources: SequenceCount | None = Field(None, description="generate from at most this many training "
                                    "sequences, a uniform sample seeded by `seed`; None = all (the paper)")
    incremental: bool = Field(True, description="cache each layer's keys and values and encode only the newest "
                              "item per step (models whose positions allow it); False: the full forward")
    item_chunk: ItemChunk = Field(2 ** 18, description="score at most this many items at once: a step holds "
                            "batch_size x item_chunk scores (more items: two passes over the item table)")
    retrieval: Literal["exact", "ivf"] = Field("exact", description="exact: score every item; ivf: an "
                                               "approximate index (faiss, extra 'ann') proposes candidates")
    candidates: Rank = Field(256, description="retrieval=ivf: candidates per step, re-scored exactly")
    nprobe: Workers = Field(16, description="retrieval=ivf: inverted lists searched per query")


    @model_validator(mode="after")
    def _lengths(self) -> "GenerationParams":
        if self.max_len is not None and self.min_len > self.max_len:
            raise ValueError(f"min_len={self.min_len} exceeds max_len={self.max_len}")
        if self.retrieval != "exact" and self.tau is not None and self.tau > self.candidates:
            raise ValueError(f"tau={self.tau} exceeds candidates={self.candidates}: ranks above the candidates "
                             f"are not known with retrieval={self.retrieval!r}")
        return self


def resolve_params(params: GenerationParams, model: SequenceModel) -> GenerationParams:
    """Fill max_len from the model and check it against the model (before any compute)."""
    model_max = int(model.config.max_len)
    max_len = model_max if params.max_len is None else params.max_len
    if max_len > model_max:
        raise RsirError(f"invalid parameter 'max_len': {max_len} exceeds the model's max_len={model_max}")
    if params.min_len > max_len:
        raise RsirError(f"invalid parameter 'min_len': {params.min_len} exceeds max_len={max_len}")
    if params.retrieval != "exact":
        if not isinstance(model, SequentialRecommender):
            raise RsirError(f"invalid parameter 'retrieval': {params.retrieval!r} needs a model with item vectors")
        require_faiss()
    return params.model_copy(update={"max_len": max_len})


# ------------------------------------------------------------------ counter-based uniforms
_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def _as_i64(x: int) -> int:
    """The int64 with the same 64 bits as x (torch has no uint64 arithmetic)."""
    x &= _MASK64
    return x - (1 << 64) if x >> 63 else x


def _srl(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic: mask off the sign copies)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser on int64 tensors (multiplication wraps modulo 2^64)."""
    x = (x ^ _srl(x, 30)) * _as_i64(_MIX1)
    x = (x ^ _srl(x, 27)) * _as_i64(_MIX2)
    return x ^ _srl(x, 31)


def pool_uniform(seed: int, rollout_ids: torch.Tensor, step: int) -> torch.Tensor:
    """Uniform in [0, 1) (float64) for each (seed, rollout id, step); step = items appended so far."""
    ids = rollout_ids.to(torch.int64)
    x = _mix64(ids * _as_i64(_GAMMA) + _as_i64(seed * _MIX2))
    x = _mix64(x + _as_i64((step + 1) * _GAMMA))
    return _srl(x, 11).to(torch.float64) * 2.0 ** -53


# ------------------------------------------------------------------ shared step pieces
def local_draw(seed: int, ids: torch.Tensor, step: int, p: float) -> torch.Tensor:
    """True where the rollout decodes from its local pool (the user's items) at this step."""
    return pool_uniform(seed, ids, step) < p


def sorted_rows(rows: Ragged, index: np.ndarray, device: torch.device) -> torch.Tensor:
    """(len(index), W) distinct item ids of rows[index], each row ascending, 0-padded at the front
    (padding is never live). W = the most distinct items of a row (<= N), not the longest row:
    a repeated item adds nothing, since every use of an item marks all its copies."""
    which, items = rows.pairs(index)
    span = int(items.max(initial=0)) + 1
    distinct = np.unique(which * span + items)  # sorted by (row, item), each pair once
    counts = np.bincount(distinct // span, minlength=len(index))
    return gather_padded(distinct % span, np.cumsum(counts) - counts, counts).to(device)


def membership(rows: Ragged, index: np.ndarray, num_items: int, device: torch.device) -> torch.Tensor:
    """(len(index), N+1) bool: True where the item occurs in row index[b] of `rows`."""
    which, items = (torch.from_numpy(a).to(device) for a in rows.pairs(index))
    mask = torch.zeros(len(index), num_items + 1, dtype=torch.bool, device=device)
    mask[which, items] = True
    mask[:, 0] = False
    return mask


def _check_sources(sources: Ragged, num_items: int, min_items: int = 1) -> None:
    if len(sources) and sources.lengths.min() < min_items:
        row = int(np.argmax(sources.lengths < min_items))
        raise RsirError(f"invalid sources: sequence {row} has {sources.lengths[row]} items "
                        f"(at least {min_items} needed)")
    if len(sources.values) and (sources.values.min() < 1 or sources.values.max() > num_items):
        raise RsirError(f"invalid sources: item ids must lie in 1..{num_items} (the model's items), "
                        f"got {sources.values.min()}..{sources.values.max()}")


def _ragged(values: list[np.ndarray], lengths: list[np.ndarray]) -> Ragged:
    lens = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    offsets = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    vals = np.concatenate(values).astype(np.int64) if values else np.zeros(0, np.int64)
    return Ragged(vals, offsets)


def _flatten(buf: torch.Tensor, lengths: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Left-aligned (B, W) buffer + lengths -> flat values (row-major) and lengths, on the host."""
    keep = torch.arange(buf.shape[1], device=buf.device)[None, :] < lengths[:, None]
    return buf[keep].cpu().numpy(), lengths.cpu().numpy().astype(np.int64)


def _compact(keep: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    idx = keep.nonzero().squeeze(1)
    return [t[idx] for t in tensors]


@contextmanager
def _frozen(model: SequenceModel) -> Iterator[None]:
    """Eval mode (no dropout) and no autograd for the duration; restores the training flag.
    inference_mode rather than no_grad: a step is ~70 small ops, and it skips their autograd
    bookkeeping (version counters) too; nothing made here ever meets autograd."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


# ------------------------------------------------------------------ main generator
@dataclass(frozen=True)
class Rollouts:
    """Generated rollouts in rollout-id order (rollout r comes from source r // m).

    trace: best rank of a remaining real item at each fidelity check; trace[t] was checked
    when the rollout had t+1 items; NO_REAL_ITEM (0) where none remained ("exhausted").
    A rollout stopped at check t has a trace of t+1 values (max_len: one fewer check than items)."""

    items: Ragged
    source_index: np.ndarray
    rollout_id: np.ndarray
    stop_reason: np.ndarray  # int8 codes into STOP_REASONS
    trace: Ragged
    params: GenerationParams

    def __len__(self) -> int:
        return len(self.rollout_id)


def stop_reason_counts(rollouts: Rollouts) -> dict[str, int]:
    counts = np.bincount(rollouts.stop_reason, minlength=len(STOP_REASONS))
    return {name: int(c) for name, c in zip(STOP_REASONS, counts)}


def generate_rollouts(model: SequenceModel, sources: Ragged, params: GenerationParams,
                      executor: Executor = LOCAL) -> Rollouts:
    """Run params.m rollouts from every source sequence (see ../shared/docs/rsir-method.md, section 3).
    Batches of params.batch_size rollout ids are the shards: on any executor, with any batch
    size, the same rollouts come out (global ids, counter-based pool draws)."""
    params = resolve_params(params, model)
    _check_sources(sources, int(model.num_items))
    total = len(sources) * params.m
    items, trace, reasons = _run_batches(model, sources, params, _rollout_batch, (),
                                         np.arange(total, dtype=np.int64), executor)
    rollout_id = np.arange(total, dtype=np.int64)
    return Rollouts(items=items, source_index=rollout_id // params.m, rollout_id=rollout_id, stop_reason=reasons,
                    trace=trace, params=params)


@dataclass
class BatchShard:
    """A shard worker of generation: the model, the sources, the parameters and the batch step
    (`_rollout_batch` or `_extend_batch`, with its `extra` arguments); called with a batch of ids
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
        with _frozen(self.model):
            if self.params.retrieval != "exact" and self.index is None:
                self.index = ItemIndex.build(self.model.output_embeddings(), self.params.candidates,
                                             self.params.nprobe, self.params.seed)
            return self.step(self.model, self.sources, ids, self.params, *self.extra, int(self.model.num_items),
                             device, self.index)


def _run_batches(model: SequenceModel, sources: Ragged, params: GenerationParams, step: Callable[..., Any],
                 extra: tuple, ids: np.ndarray, executor: Executor) -> tuple[Ragged, Ragged, np.ndarray]:
    """`step` over consecutive batches of `ids` on `executor`; the results joined in id order."""
    shards = [ids[lo: lo + params.batch_size] for lo in range(0, len(ids), params.batch_size)]
    done = map_shards(executor, BatchShard(model, sources, params, step, extra), shards,
                      gpu=resolve_device(params.device).type == "cuda")
    return (_ragged([d[0][0] for d in done], [d[0][1] for d in done]),
            _ragged([d[1][0] for d in done], [d[1][1] for d in done]),
            np.concatenate([d[2] for d in done]) if done else np.zeros(0, np.int8))


def _rollout_batch(model: SequenceModel, sources: Ragged, ids: np.ndarray, params: GenerationParams,
                   num_items: int, device: torch.device, index: ItemIndex | None = None):
    B, L = len(ids), params.max_len
    src = ids // params.m
    first = torch.from_numpy(sources.values[sources.offsets[src]]).to(device)
    # Outputs for the whole batch, written as rollouts advance (row = position in the batch).
    out = torch.zeros(B, L, dtype=torch.int64, device=device)
    out[:, 0] = first
    out_len = torch.ones(B, dtype=torch.int64, device=device)
    trace = torch.zeros(B, L, dtype=torch.int64, device=device)
    trace_len = torch.zeros(B, dtype=torch.int64, device=device)
    reason = torch.full((B,), -1, dtype=torch.int8, device=device)
    # Active state, compacted as rollouts stop; every active rollout has t+1 items at step t.
    # own: the user's items S (sorted); live: that item is not in the rollout yet (R = live items).
    pos, rid, seq = torch.arange(B, device=device), torch.from_numpy(ids).to(device), out.clone()
    distinct_src, copy_of = np.unique(src, return_inverse=True)  # the m rollouts of a source share S
    own = sorted_rows(sources, distinct_src, device)[torch.from_numpy(copy_of).to(device)]
    live = (own != 0) & (own != first[:, None])
    decoder = Decoder(model, B, device, params.incremental, params.item_chunk, index)
    for t in range(L - 1):
        used = seq[:, : t + 1]
        step = decoder.step(used, [own], used)
        # Fidelity check before extending: best rank over R.
        top, local_item, has_real = best_of_listed(step.listed(own), own, live)
        rank = step.rank(top)
        trace[pos, t] = torch.where(has_real, rank, NO_REAL_ITEM)
        trace_len[pos] = t + 1
        # Decoding, greedy top-1: the local pool's best is the best live item of S (never
        # empty here: R is not); the global pool's best is the best item not in the rollout.
        # (So no_candidate cannot happen in this mode: a live item of S is in either pool.)
        global_item, _ = step.best_unused(used)
        go = has_real if params.tau is None else has_real & (rank <= params.tau)
        if not bool(go.all()):
            reason[pos[~has_real]] = EXHAUSTED
            reason[pos[has_real & ~go]] = FIDELITY
            keep = go.nonzero().squeeze(1)
            pos, rid, seq, own, live, local_item, global_item = (
                x[keep] for x in (pos, rid, seq, own, live, local_item, global_item))
            decoder.keep(keep)
            if len(pos) == 0:
                break
        local = local_draw(params.seed, rid, t, params.p)
        item = torch.where(local, local_item, global_item)
        live &= own != item[:, None]
        seq[:, t + 1] = item
        out[pos, t + 1] = item
        out_len[pos] = t + 2
        if t + 2 == L:
            reason[pos] = MAX_LEN
    return _flatten(out, out_len), _flatten(trace, trace_len), reason.cpu().numpy()


# ------------------------------------------------------------------ extension mode ("second reading")
@dataclass(frozen=True)
class Extensions:
    """One greedy extension of every source with more than holdout_h items.

    items: prefix (source minus its last h items) + generated items; for an accepted
    extension up to and including the accepting step, otherwise all that was generated.
    trace[k]: best rank of a held-out item not in the sequence, checked after k+1 generated
    items; NO_REAL_ITEM (0) when every held-out item was already in the sequence."""

    items: Ragged
    source_index: np.ndarray
    prefix_len: np.ndarray
    stop_reason: np.ndarray  # int8 codes into EXTEND_REASONS
    trace: Ragged
    holdout_h: int
    params: GenerationParams

    def __len__(self) -> int:
        return len(self.source_index)

    @property
    def accepted(self) -> np.ndarray:
        return self.stop_reason == ACCEPTED


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
    _check_sources(sources, int(model.num_items), min_items=0)
    items, trace, reasons = _run_batches(model, sources, params, _extend_batch, (holdout_h,), eligible, executor)
    return Extensions(
        items=items, source_index=eligible, prefix_len=sources.lengths[eligible] - holdout_h,
        stop_reason=reasons, trace=trace, holdout_h=int(holdout_h), params=params,
    )


def _window(buf: torch.Tensor, lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """Newest min(length, max_len) items of each left-aligned row, left-padded to a common width."""
    width = min(int(lengths.max()), max_len)
    idx = lengths[:, None] - width + torch.arange(width, device=buf.device)[None, :]
    return torch.where(idx >= 0, buf.gather(1, idx.clamp(min=0)), 0)


def _extend_batch(model: SequenceModel, sources: Ragged, rows: np.ndarray, params: GenerationParams,
                  h: int, num_items: int, device: torch.device, index: ItemIndex | None = None):
    """Memory is bounded by B × (max_len + m) and B × (N + 1), whatever the longest prefix: the
    model sees only the newest max_len items, and "already in the sequence" is the prefix's
    distinct items (at most N) plus the generated ones; the prefix joins the output on the host."""
    B, m = len(rows), params.m
    starts, ends = sources.offsets[rows], sources.offsets[rows + 1]
    prefix_len = ends - starts - h
    keep = np.minimum(prefix_len, params.max_len)
    seq = torch.from_numpy(_left_aligned(sources.values, ends - h - keep, keep, int(keep.max()) + m)).to(device)
    seq_len = torch.from_numpy(keep).to(device).clone()
    gen = torch.zeros(B, m, dtype=torch.int64, device=device)
    gen_len = torch.zeros(B, dtype=torch.int64, device=device)
    trace = torch.zeros(B, m, dtype=torch.int64, device=device)
    trace_len = torch.zeros(B, dtype=torch.int64, device=device)
    reason = torch.full((B,), REJECTED, dtype=torch.int8, device=device)
    # Active state: own = the source's items (sorted; the local pool = its live ones), held =
    # the held-out items (the acceptance check); live flags: not in the sequence yet.
    batch = np.arange(B)
    prefixes = _slices(sources.values, starts, ends - h)
    in_prefix = membership(prefixes, batch, num_items, device)
    own = sorted_rows(sources, rows, device)
    own_live = (own != 0) & ~in_prefix.gather(1, own)
    held = sorted_rows(_slices(sources.values, ends - h, ends), batch, device)
    held_live = (held != 0) & ~in_prefix.gather(1, held)
    del in_prefix
    used = sorted_rows(prefixes, batch, device)  # distinct prefix items: the global pool excludes them
    pos = torch.arange(B, device=device)
    rid = torch.from_numpy(rows).to(device)
    # Windows shift the positions as they slide: no key/value cache here, the full forward.
    decoder = Decoder(model, B, device, incremental=False, item_chunk=params.item_chunk, index=index)
    for j in range(m + 1):  # j = items generated so far
        excluded = torch.cat([used, gen[pos, :j]], dim=1)  # the global pool excludes them
        step = decoder.step(_window(seq, seq_len, params.max_len), [held, own], excluded)
        own_scores = step.listed(own)
        go = None
        if j >= 1:  # acceptance check after each generated item
            top, _, has_held = best_of_listed(step.listed(held), held, held_live)
            rank = step.rank(top)
            trace[pos, j - 1] = torch.where(has_held, rank, NO_REAL_ITEM)
            trace_len[pos] = j
            ok = has_held if params.tau is None else has_held & (rank <= params.tau)
            reason[pos[ok]] = ACCEPTED
            reason[pos[~has_held]] = EXT_EXHAUSTED
            go = ~ok & has_held
        if j == m:
            break  # whatever is still active stays REJECTED
        global_item, has_global = step.best_unused(excluded)
        if go is not None and not bool(go.all()):
            pos, rid, seq, seq_len, own, own_live, held, held_live, used, own_scores, global_item, has_global = (
                _compact(go, pos, rid, seq, seq_len, own, own_live, held, held_live, used, own_scores,
                         global_item, has_global))
            if len(pos) == 0:
                break
        _, local_item, has_local = best_of_listed(own_scores, own, own_live)
        local = local_draw(params.seed, rid, j, params.p)
        item = torch.where(local, local_item, global_item)
        has = torch.where(local, has_local, has_global)
        if not bool(has.all()):
            reason[pos[~has]] = EXT_NO_CANDIDATE
            pos, rid, seq, seq_len, own, own_live, held, held_live, used, item = _compact(
                has, pos, rid, seq, seq_len, own, own_live, held, held_live, used, item)
            if len(pos) == 0:
                break
        own_live &= own != item[:, None]
        held_live &= held != item[:, None]
        seq[torch.arange(len(pos), device=device), seq_len] = item
        seq_len += 1
        gen[pos, gen_len[pos]] = item
        gen_len[pos] += 1
    return _joined(prefixes, *_flatten(gen, gen_len)), _flatten(trace, trace_len), reason.cpu().numpy()


def _joined(first: Ragged, values: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row b = first[b] followed by the b-th row of (values, lengths): flat values and lengths."""
    total = first.lengths + lengths
    out = np.empty(int(total.sum()), dtype=np.int64)
    starts = np.cumsum(total) - total
    out[flat_index(starts, first.lengths)] = first.values
    out[flat_index(starts + first.lengths, lengths)] = values
    return out, total.astype(np.int64)


def _slices(values: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> Ragged:
    """Ragged of values[starts[b]:ends[b]] (copied flat, vectorized)."""
    lengths = ends - starts
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return Ragged(values[flat_index(starts, lengths)].astype(np.int64), offsets)


def _left_aligned(values: np.ndarray, starts: np.ndarray, lengths: np.ndarray, width: int) -> np.ndarray:
    """(B, width) int64: values[starts[b]:starts[b]+lengths[b]] at the left of row b, zeros after."""
    col = np.arange(width)[None, :]
    idx = np.clip(starts[:, None] + col, 0, max(len(values) - 1, 0))
    return np.where(col < lengths[:, None], values[idx], 0).astype(np.int64)


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
    params: dict[str, Any]
    rollouts: int
    sources: int
    seconds: float
    stop_reasons: dict[str, int]
    reused: bool = False

    def file_meta(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("path", "reused")}

    @classmethod
    def from_file(cls, path: str | Path, meta: dict[str, Any], **update: Any) -> "Generation":
        known = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in meta.items() if k in known}, "path": str(path), **update})


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
    key = generation_key(manifest.digest, payload_sha, params.model_dump(exclude={"device", "batch_size"}),
                         mode, holdout_h)
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
    sources = _slices(split.train.values, split.train.offsets[rows], split.train.offsets[rows + 1])
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
                            holdout_h, params.model_dump(mode="json"), len(table), len(rows), seconds,
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
