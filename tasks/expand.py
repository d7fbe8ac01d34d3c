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

from rsir.errors import RsirError
from storage.dataset import SEQUENCE_SCHEMA, DatasetStore
from storage.manifest import Manifest
from tasks.split import Ragged
from tasks.statistics import version_statistics


def synthetic_table(items: Ragged, parent_seq_ids: np.ndarray, first_seq_id: int) -> pa.Table:
    n = len(items)
    values = pa.array(items.values.astype(np.int32), type=pa.int32())
    lists = pa.ListArray.from_arrays(pa.array(items.offsets.astype(np.int32)), values)
    return pa.table({
        "seq_id": pa.array(np.arange(first_seq_id, first_seq_id + n, dtype=np.int64)),
        "user_id": pa.nulls(n, pa.string()),
        "items": lists,
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
