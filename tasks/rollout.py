"""The rollout engine: the released RSIR algorithm's two decoding loops over one batch, vectorized.

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

Here: the parameters' resolution against the model (the parameters themselves, GenerationParams,
are declared in tasks/config.py), the counter-based uniforms, the loops (`rollout_batch`, `extend_batch`)
and their records (`Rollouts`, `Extensions`). Pure computation: no file IO, no executor; the
caller moves the model to `params.device` and freezes it (`frozen`) beforehand. Sharding the
batches over an executor and storing the result is the generate step's (tasks/generate.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from core.errors import RsirError
from models import SequenceModel, SequentialRecommender
from tasks.config import GenerationParams  # declared with the other knobs; the engine's parameters
from tasks.decoding import Decoder, best_of_listed
from tasks.ragged import Ragged, flatten, joined, left_aligned, membership, newest, slices, sorted_rows
from tasks.retrieval import ItemIndex, require_faiss

# Stop reasons of the main generator, stored as int8 codes into this table.
STOP_REASONS: tuple[str, ...] = ("exhausted", "fidelity", "no_candidate", "max_len")
EXHAUSTED, FIDELITY, NO_CANDIDATE, MAX_LEN = range(4)
# Outcomes of the "second reading" (extension) mode.
EXTEND_REASONS: tuple[str, ...] = ("accepted", "rejected", "exhausted", "no_candidate")
ACCEPTED, REJECTED, EXT_EXHAUSTED, EXT_NO_CANDIDATE = range(4)
# Trace value of a check that found no real item left (ranks are >= 1, so it never exceeds tau).
NO_REAL_ITEM = 0


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


def check_sources(sources: Ragged, num_items: int, min_items: int = 1) -> None:
    """Raise on a source shorter than `min_items` or an item id outside 1..num_items."""
    if len(sources) and sources.lengths.min() < min_items:
        row = int(np.argmax(sources.lengths < min_items))
        raise RsirError(f"invalid sources: sequence {row} has {sources.lengths[row]} items "
                        f"(at least {min_items} needed)")
    if len(sources.values) and (sources.values.min() < 1 or sources.values.max() > num_items):
        raise RsirError(f"invalid sources: item ids must lie in 1..{num_items} (the model's items), "
                        f"got {sources.values.min()}..{sources.values.max()}")


def compact(keep: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Each tensor's rows where `keep` (B,) is True: the active set after some rollouts stopped."""
    idx = keep.nonzero().squeeze(1)
    return [t[idx] for t in tensors]


@contextmanager
def frozen(model: SequenceModel) -> Iterator[None]:
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


def rollout_batch(model: SequenceModel, sources: Ragged, ids: np.ndarray, params: GenerationParams,
                  num_items: int, device: torch.device, index: ItemIndex | None = None
                  ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], np.ndarray]:
    """The rollouts `ids` (global rollout ids; rollout r starts from sources[r // m]): their items
    and fidelity traces as flat (values, lengths), and their int8 stop reasons."""
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
    return flatten(out, out_len), flatten(trace, trace_len), reason.cpu().numpy()



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


def extend_batch(model: SequenceModel, sources: Ragged, rows: np.ndarray, params: GenerationParams,
                 h: int, num_items: int, device: torch.device, index: ItemIndex | None = None
                 ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], np.ndarray]:
    """The extensions of sources[rows] with their last h items held out: items (prefix + generated)
    and acceptance traces as flat (values, lengths), and their int8 stop reasons (EXTEND_REASONS).
    Memory is bounded by B × (max_len + m) and B × (N + 1), whatever the longest prefix: the
    model sees only the newest max_len items, and "already in the sequence" is the prefix's
    distinct items (at most N) plus the generated ones; the prefix joins the output on the host."""
    B, m = len(rows), params.m
    starts, ends = sources.offsets[rows], sources.offsets[rows + 1]
    prefix_len = ends - starts - h
    keep = np.minimum(prefix_len, params.max_len)
    seq = torch.from_numpy(left_aligned(sources.values, ends - h - keep, keep, int(keep.max()) + m)).to(device)
    seq_len = torch.from_numpy(keep).to(device).clone()
    gen = torch.zeros(B, m, dtype=torch.int64, device=device)
    gen_len = torch.zeros(B, dtype=torch.int64, device=device)
    trace = torch.zeros(B, m, dtype=torch.int64, device=device)
    trace_len = torch.zeros(B, dtype=torch.int64, device=device)
    reason = torch.full((B,), REJECTED, dtype=torch.int8, device=device)
    # Active state: own = the source's items (sorted; the local pool = its live ones), held =
    # the held-out items (the acceptance check); live flags: not in the sequence yet.
    batch = np.arange(B)
    prefixes = slices(sources.values, starts, ends - h)
    in_prefix = membership(prefixes, batch, num_items, device)
    own = sorted_rows(sources, rows, device)
    own_live = (own != 0) & ~in_prefix.gather(1, own)
    held = sorted_rows(slices(sources.values, ends - h, ends), batch, device)
    held_live = (held != 0) & ~in_prefix.gather(1, held)
    del in_prefix
    used = sorted_rows(prefixes, batch, device)  # distinct prefix items: the global pool excludes them
    pos = torch.arange(B, device=device)
    rid = torch.from_numpy(rows).to(device)
    # Windows shift the positions as they slide: no key/value cache here, the full forward.
    decoder = Decoder(model, B, device, incremental=False, item_chunk=params.item_chunk, index=index)
    for j in range(m + 1):  # j = items generated so far
        excluded = torch.cat([used, gen[pos, :j]], dim=1)  # the global pool excludes them
        step = decoder.step(newest(seq, seq_len, params.max_len), [held, own], excluded)
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
                compact(go, pos, rid, seq, seq_len, own, own_live, held, held_live, used, own_scores,
                        global_item, has_global))
            if len(pos) == 0:
                break
        _, local_item, has_local = best_of_listed(own_scores, own, own_live)
        local = local_draw(params.seed, rid, j, params.p)
        item = torch.where(local, local_item, global_item)
        has = torch.where(local, has_local, has_global)
        if not bool(has.all()):
            reason[pos[~has]] = EXT_NO_CANDIDATE
            pos, rid, seq, seq_len, own, own_live, held, held_live, used, item = compact(
                has, pos, rid, seq, seq_len, own, own_live, held, held_live, used, item)
            if len(pos) == 0:
                break
        own_live &= own != item[:, None]
        held_live &= held != item[:, None]
        seq[torch.arange(len(pos), device=device), seq_len] = item
        seq_len += 1
        gen[pos, gen_len[pos]] = item
        gen_len[pos] += 1
    return joined(prefixes, *flatten(gen, gen_len)), flatten(trace, trace_len), reason.cpu().numpy()
