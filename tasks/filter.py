"""Fidelity filter over generated rollouts: cut at the first failed check, drop short sequences,
drop duplicates (within the batch and of the current dataset). Vectorized with numpy and
polars (exact list equality, no per-sequence Python loops)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
from prefect import task

from core.errors import RsirError
from core.hashing import json_digest
from core.workspace import Workspace
from storage.artifacts import read_table, write_table
from storage.dataset import dataset_store
from storage.files import join
from storage.manifest import FilterCounts, FilterParams
from tasks.generate import Generation
from tasks.ragged import Ragged
from tasks.rollout import EXTEND_REASONS, STOP_REASONS, Extensions, Rollouts
from tasks.runtime import Timed, timed
from tasks.split import leave_one_out


@dataclass(frozen=True)
class Accepted:
    """Sequences to add as pseudo-users, in rollout-id order, with their parent source row."""

    items: Ragged
    source_index: np.ndarray
    rollout_id: np.ndarray
    counts: FilterCounts  # without mean_accepted_length (the step adds it)

    def __len__(self) -> int:
        return len(self.rollout_id)


def filter_rollouts(rollouts: Rollouts, tau: int | None, min_len: int, existing: Ragged | None) -> Accepted:
    """Cut each rollout at its first failed fidelity check (a rank above `tau`; tau None: fidelity
    off, no cut), drop those shorter than `min_len` items and duplicates (of `existing` or within
    the batch). Raises RsirError for tau < 1, min_len < 2, a tau looser than the generation's
    (its rollouts stopped there) or fidelity off on rollouts generated with a threshold.
    Counts: generated = too_short + duplicate_of_existing + duplicate_in_batch + accepted.
    cut_by_tau counts rollouts that end at a failed fidelity check (rank > tau), whether the
    generator stopped them there or this filter cut them, so re-filtering a generation at
    tau' <= tau reports exactly what a fresh generation at tau' would."""
    gen_tau = rollouts.params.tau
    if min_len < 2:
        raise RsirError(f"invalid parameter 'min_len': must be >= 2 (got {min_len})")
    if tau is not None:
        if tau < 1:
            raise RsirError(f"invalid parameter 'tau': must be >= 1 (got {tau})")
        if gen_tau is not None and tau > gen_tau:
            raise RsirError(f"invalid parameter 'tau': {tau} exceeds the generation's tau={gen_tau}; "
                            f"rollouts stopped at tau={gen_tau} cannot be re-filtered more loosely")
    elif gen_tau is not None:
        raise RsirError(f"fidelity off needs rollouts generated without a rank limit (tau=None), "
                        f"these were generated with tau={gen_tau}")
    keep_len, by_tau = fidelity_cut(rollouts.items, rollouts.trace, tau)
    too_short = keep_len < min_len
    order = np.argsort(rollouts.rollout_id, kind="stable")  # "first" = lowest rollout id
    kept = order[~too_short[order]]
    seqs = rollouts.items.take(kept, keep_len[kept])
    return _deduplicate(seqs, kept, existing, rollouts.source_index, rollouts.rollout_id, {
        "generated": len(rollouts), "cut_by_tau": int(by_tau.sum()), "too_short": int(too_short.sum())})


def filter_extensions(extensions: Extensions, min_len: int, existing: Ragged | None) -> Accepted:
    """Accepted extensions (second reading), minus short ones and duplicates; rollout_id is
    the source index (one extension per source)."""
    if min_len < 2:
        raise RsirError(f"invalid parameter 'min_len': must be >= 2 (got {min_len})")
    lengths = extensions.items.lengths
    taken = extensions.accepted
    too_short = taken & (lengths < min_len)
    kept = np.flatnonzero(taken & ~too_short)
    seqs = extensions.items.take(kept, lengths[kept])
    return _deduplicate(seqs, kept, existing, extensions.source_index, extensions.source_index, {
        "generated": len(extensions), "rejected": int((~taken).sum()), "too_short": int(too_short.sum())})


def _deduplicate(seqs: Ragged, kept: np.ndarray, existing: Ragged | None, source_index: np.ndarray,
                 ids: np.ndarray, counts: dict[str, int]) -> Accepted:
    """Drop sequences of D_k and repeats within the batch; finish the counts."""
    of_existing, in_batch = duplicates(seqs, existing)
    ok = ~of_existing & ~in_batch
    chosen = kept[ok]
    counts = {**counts, "duplicate_in_batch": int(in_batch.sum()),
              "duplicate_of_existing": int(of_existing.sum()), "accepted": int(ok.sum())}
    rate = counts["accepted"] / counts["generated"] if counts["generated"] else 0.0
    return Accepted(seqs.take(np.flatnonzero(ok)), source_index[chosen], ids[chosen].copy(),
                    FilterCounts(**counts, acceptance_rate=rate))


def fidelity_cut(items: Ragged, trace: Ragged, tau: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Kept length of each rollout and whether it ends at a failed check.
    Check t happened with t+1 items, so a first failure at check t keeps t+1 items."""
    keep = items.lengths.copy()
    ends_by_tau = np.zeros(len(keep), dtype=bool)
    if tau is None or len(trace.values) == 0:
        return keep, ends_by_tau
    row, check = trace.coordinates()
    failed = np.flatnonzero(trace.values > tau)  # the NO_REAL_ITEM sentinel (0) never fails
    rows, first = np.unique(row[failed], return_index=True)  # row-major: first failure per row
    keep[rows] = np.minimum(keep[rows], check[failed[first]] + 1)
    ends_by_tau[rows] = True
    return keep, ends_by_tau


def duplicates(seqs: Ragged, existing: Ragged | None) -> tuple[np.ndarray, np.ndarray]:
    """(identical to a sequence of `existing`, repeat of an earlier row of `seqs` that is not)."""
    if len(seqs) == 0:
        return np.zeros(0, dtype=bool), np.zeros(0, dtype=bool)
    series = seqs.to_series()
    if existing is not None and len(existing):
        of_existing = series.is_in(existing.to_series().implode()).to_numpy()
    else:
        of_existing = np.zeros(len(seqs), dtype=bool)
    in_batch = np.zeros(len(seqs), dtype=bool)
    rest = np.flatnonzero(~of_existing)
    in_batch[rest] = ~series.gather(rest).is_first_distinct().to_numpy()
    return of_existing, in_batch


# ------------------------------------------------------------------ the pipeline step (IO)
def load_generation(generation: Generation) -> tuple[Rollouts | Extensions, np.ndarray]:
    """The rollouts (or extensions) of a stored generation, rebuilt from its file with the
    record's parameters, mode and holdout; and each row's parent seq id."""
    table, _ = read_table(generation.path)
    frame = pl.from_arrow(table)
    items, trace = Ragged.from_series(frame["items"]), Ragged.from_series(frame["trace"])
    source = frame["source_index"].to_numpy()
    if generation.mode == "extend":
        codes = _codes(frame["stop_reason"], EXTEND_REASONS)
        out: Rollouts | Extensions = Extensions(items, source, frame["prefix_len"].to_numpy(), codes, trace,
                                                generation.holdout_h, generation.params)
    else:
        codes = _codes(frame["stop_reason"], STOP_REASONS)
        out = Rollouts(items, source, frame["rollout_id"].to_numpy(), codes, trace, generation.params)
    return out, frame["parent_seq_id"].to_numpy()


def _codes(names: pl.Series, table: tuple[str, ...]) -> np.ndarray:
    return names.replace_strict({n: i for i, n in enumerate(table)}, return_dtype=pl.Int8).to_numpy()


@dataclass(frozen=True)
class Filtered:
    """The accepted sequences' file, the generation they came from (its `dataset` and `version`
    the caller's: generations are shared between datasets of equal content), the filter's
    parameters and its counts. The file's metadata also records them (the durable copy)."""

    path: str
    generation: Generation
    filter: FilterParams
    counts: FilterCounts

    @property
    def dataset(self) -> str:
        return self.generation.dataset

    @property
    def version(self) -> int:
        return self.generation.version


def filter_step(home: str, dataset: str, version: int, generation: Generation, params: FilterParams) -> Filtered:
    """Filter a stored generation for `dataset` v`version` (which must hold the data the generation
    was made from: generations are shared between datasets of equal content) and write the
    accepted sequences with their parent seq ids under it. Raises RsirError when the generation
    was made from other data, or for a bad parameter. Returns the file reference and counts."""
    ws = Workspace.at(home)
    store = dataset_store(ws)
    manifest = store.manifest(dataset, version)
    if manifest.digest != generation.digest:
        raise RsirError(f"generation {generation.path} was made from data {generation.digest[:12]}, "
                        f"not from {dataset!r} v{version} ({manifest.digest[:12]})")
    generated, parent_ids = load_generation(generation)
    existing = leave_one_out(store.load(dataset, manifest.version), manifest.num_items).train
    if isinstance(generated, Extensions):
        accepted = filter_extensions(generated, params.min_len, existing)
    else:
        accepted = filter_rollouts(generated, params.tau, params.min_len, existing)
    # The file's rows are sorted by id (rollout id, or source index for extensions).
    ids = generated.rollout_id if isinstance(generated, Rollouts) else generated.source_index
    parents = parent_ids[np.searchsorted(ids, accepted.rollout_id)]
    name = (Path(generation.path).stem.replace("rollouts-", "accepted-")
            + f"-{json_digest([params.model_dump()])[:8]}")
    path = join(ws.runs, dataset, f"v{version}", f"{name}.parquet")
    table = pa.table({"parent_seq_id": pa.array(parents, pa.int64()),
                      "rollout_id": pa.array(accepted.rollout_id, pa.int64()),
                      "items": accepted.items.to_arrow()})
    mean = float(accepted.items.lengths.mean()) if len(accepted) else 0.0
    counts = accepted.counts.model_copy(update={"mean_accepted_length": mean})
    generation = replace(generation, dataset=dataset, version=version)
    write_table(path, table, {"generation": generation.file_meta(), "filter": params.model_dump(),
                              "counts": counts.model_dump()})
    return Filtered(str(path), generation, params, counts)


@task(name="filter", task_run_name="filter-tau{params.tau}")
def filter_task(home: str, dataset: str, version: int, generation: Generation, params: FilterParams
                ) -> Timed[Filtered]:
    return timed(filter_step, home, dataset, version, generation, params)
