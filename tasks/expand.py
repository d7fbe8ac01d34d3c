"""Expand: D_{k+1} = D_k ∪ D'_{k+1}, published as one new partition and a committed manifest.

The new sequences become pseudo-users (origin = synthetic, user_id null) with fresh seq_ids
after the largest existing one, their source sequence in parent_seq_id, and iteration = k+1
as the partition key. Re-running an expansion that was already committed with the same
generation key returns the committed version instead of writing a second one.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
from prefect import task

from core.errors import RsirError
from core.workspace import Workspace
from storage.artifacts import read_table
from storage.dataset import SEQUENCE_SCHEMA, DatasetStore, dataset_store
from storage.manifest import Manifest, VersionRef
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
                   parent_seq_ids: np.ndarray, generation: dict[str, Any],
                   generation_stats: dict[str, Any] | None = None) -> Manifest:
    """Publish version parent_version + 1. `generation` must hold a `key` identifying the inputs
    (parent digest, checkpoint, parameters): it makes a retried expansion idempotent."""
    parent = store.manifest(dataset, parent_version)
    target = parent.version + 1
    if target in store.versions(dataset):
        existing = store.manifest(dataset, target)
        if (existing.generation or {}).get("key") == generation.get("key"):
            return existing
        raise RsirError(f"dataset {dataset!r} already has version {target}, produced by other inputs "
                        f"(generation key {(existing.generation or {}).get('key')}); expand from the latest version")
    current = store.load(dataset, parent.version)
    first = int(current["seq_id"].max()) + 1 if current.height else 0
    new = synthetic_table(items, parent_seq_ids, first)
    union = pl.concat([current.drop("iteration"), pl.from_arrow(new)], how="vertical")
    stats = {**version_statistics(union, parent.num_items), **(generation_stats or {})}
    return store.append(dataset, parent, new, generation=generation, stats=stats)


def expand_step(home: str, accepted_path: str, generator: dict[str, Any] | None = None) -> VersionRef:
    """Publish D_{k+1} from a filtered generation of D_k; idempotent for the same inputs."""
    table, meta = read_table(accepted_path)
    gen = meta["generation"]
    frame = pl.from_arrow(table)
    generation = {
        "key": f"{gen['key']}:{meta['filter']}",
        # A shared generation names whichever run made it first; the caller's copy of the same
        # weights (checkpoint_sha256 says so) is the lineage link of this dataset.
        "parent_digest": gen["digest"], "checkpoint": (generator or {}).get("checkpoint", gen["checkpoint"]),
        "checkpoint_sha256": gen["checkpoint_sha256"], "mode": gen["mode"], "params": gen["params"],
        "filter": meta["filter"], "generator": generator or {},
    }
    generation_stats = {
        "acceptance_rate": meta["counts"]["acceptance_rate"],
        "accepted": meta["counts"]["accepted"],
        "generated": meta["counts"]["generated"],
        "mean_new_length": meta["counts"]["mean_accepted_length"],
        "filter_counts": meta["counts"],
        "stop_reasons": gen["stop_reasons"],
        "generation_seconds": gen["seconds"],
    }
    store = dataset_store(Workspace.at(home))
    manifest = expand_dataset(store, gen["dataset"], gen["version"], Ragged.from_series(frame["items"]),
                              frame["parent_seq_id"].to_numpy(), generation, generation_stats)
    return manifest.ref()


@task(name="expand", task_run_name="expand-to-v{version}")
def expand_task(home: str, accepted_path: str, version: int, generator: dict[str, Any] | None = None
                ) -> Timed[VersionRef]:
    """`version` (the one to be produced) only names the task run in the Prefect UI."""
    return timed(expand_step, home, accepted_path, generator)
