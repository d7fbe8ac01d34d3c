"""Expand: D_{k+1} = D_k ∪ D'_{k+1}, published as one new partition and a committed manifest.

The new sequences become pseudo-users (origin = synthetic, user_id null) with fresh seq_ids
after the largest existing one, their source sequence in parent_seq_id, and iteration = k+1
as the partition key. Re-running an expansion that was already committed with the same
generation key returns the committed version instead of writing a second one.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
from prefect import task

from core.errors import RsirError
from core.workspace import Workspace
from storage.artifacts import read_table
from storage.dataset import SEQUENCE_SCHEMA, DatasetStore, dataset_store
from storage.manifest import FilterCounts, GenerationRecord, GeneratorRef, Manifest, VersionRef
from tasks.filter import Filtered
from tasks.ragged import Ragged
from tasks.runtime import Timed, timed
from tasks.statistics import version_statistics


def synthetic_table(items: Ragged, parent_seq_ids: np.ndarray, first_seq_id: int) -> pa.Table:
    n = len(items)
    return pa.table({
        "seq_id": pa.array(np.arange(first_seq_id, first_seq_id + n, dtype=np.int64)),
        "user_id": pa.nulls(n, pa.string()),
        "items": items.to_arrow(),
        "origin": pa.array(["synthetic"] * n, pa.string()),
        "parent_seq_id": pa.array(parent_seq_ids.astype(np.int64)),
    }, schema=SEQUENCE_SCHEMA)


def expand_dataset(store: DatasetStore, dataset: str, parent_version: int, items: Ragged,
                   parent_seq_ids: np.ndarray, generation: GenerationRecord, counts: FilterCounts | None = None,
                   stop_reasons: dict[str, int] | None = None, generation_seconds: float | None = None
                   ) -> Manifest:
    """Publish version parent_version + 1. `generation.key` identifies the inputs (parent digest,
    checkpoint, parameters): it makes a retried expansion idempotent. The filter's `counts`, the
    `stop_reasons` and `generation_seconds` join the version's statistics when given. Raises
    RsirError when that version exists, made from other inputs."""
    parent = store.manifest(dataset, parent_version)
    target = parent.version + 1
    if target in store.versions(dataset):
        existing = store.manifest(dataset, target)
        if existing.generation is not None and existing.generation.key == generation.key:
            return existing
        raise RsirError(f"dataset {dataset!r} already has version {target}, produced by other inputs "
                        f"(generation key {existing.generation.key if existing.generation else None}); "
                        f"expand from the latest version")
    current = store.load(dataset, parent.version)
    first = int(current["seq_id"].max()) + 1 if current.height else 0
    new = synthetic_table(items, parent_seq_ids, first)
    union = pl.concat([current.drop("iteration"), pl.from_arrow(new)], how="vertical")
    expansion = {"filter_counts": counts, "stop_reasons": stop_reasons, "generation_seconds": generation_seconds}
    stats = version_statistics(union, parent.num_items).model_copy(
        update={k: v for k, v in expansion.items() if v is not None})
    return store.append(dataset, parent, new, generation=generation, stats=stats)


def expand_step(home: str, filtered: Filtered, generator: GeneratorRef | None = None) -> VersionRef:
    """Publish D_{k+1} from a filtered generation of D_k (`filtered.dataset` v`filtered.version`);
    idempotent for the same inputs. `generator`: the caller's backbone and copy of the weights."""
    table, _ = read_table(filtered.path)  # the accepted sequences themselves
    frame = pl.from_arrow(table)
    gen = filtered.generation
    generation = GenerationRecord(
        key=f"{gen.key}:{filtered.filter.model_dump()}",
        # A shared generation names whichever run made it first; the caller's copy of the same
        # weights (checkpoint_sha256 says so) is the lineage link of this dataset.
        parent_digest=gen.digest, checkpoint=generator.checkpoint if generator else gen.checkpoint,
        checkpoint_sha256=gen.checkpoint_sha256, mode=gen.mode, params=gen.params.model_dump(mode="json"),
        filter=filtered.filter, generator=generator or GeneratorRef(),
    )
    store = dataset_store(Workspace.at(home))
    manifest = expand_dataset(store, filtered.dataset, filtered.version, Ragged.from_series(frame["items"]),
                              frame["parent_seq_id"].to_numpy(), generation, filtered.counts, gen.stop_reasons,
                              gen.seconds)
    return manifest.ref()


@task(name="expand", task_run_name="expand-to-v{version}")
def expand_task(home: str, filtered: Filtered, version: int, generator: GeneratorRef | None = None
                ) -> Timed[VersionRef]:
    """`version` (the one to be produced) only names the task run in the Prefect UI."""
    return timed(expand_step, home, filtered, generator)
