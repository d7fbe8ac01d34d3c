"""Dataset views: a new dataset (version 0) that keeps, by one rule, part of each real user's
interactions of another dataset's version 0, in chronological order.

A rule is a polars expression over two columns of the exploded sequences: `pos` (0-based
position in the user's sequence, oldest first) and `n` (the sequence's length); it is true for
the interactions kept. Every view goes through the one derivation `derive_view`, which re-runs
the standard preprocessing (contiguous item ids again, users left with fewer than 3
interactions dropped and counted) and records in the manifest where it came from and how.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import polars as pl

from core.errors import RsirError
from core.workspace import Workspace
from storage.dataset import DatasetStore, check_name, dataset_store
from storage.manifest import Manifest
from tasks.ingest import build_sequences, publish

MIN_VIEW_ITEMS = 3  # leave-one-out needs a training, a validation and a test item
SPARSE_STRIDE = 5
SPARSE_MIN_ITEMS = 5
SPARSE_RULE = ("stride s = min(5, max(1, n // 5)); keep positions i with (n - 1 - i) % s == 0, i.e. every "
               "s-th interaction counted back from the newest one. That keeps the chronological order and "
               "the last item, and at least 5 items of every user with 5 or more.")

POS = pl.col("pos")
LENGTH = pl.col("n")


@dataclass(frozen=True)
class View:
    """A rule and how the manifest describes it (`source.view`)."""

    keep: pl.Expr
    record: dict[str, Any]


# ------------------------------------------------------------------ rules
def last_n(keep: int) -> pl.Expr:
    """The newest `keep` interactions of each user: positions i >= n - keep."""
    return POS >= LENGTH - keep


def sparse() -> pl.Expr:
    """The sparse rule (SPARSE_RULE), vectorized."""
    stride = pl.min_horizontal(pl.lit(SPARSE_STRIDE), pl.max_horizontal(pl.lit(1), LENGTH // SPARSE_MIN_ITEMS))
    return (LENGTH - 1 - POS) % stride == 0


def sparse_positions(length: int) -> list[int]:
    """The sparse rule (SPARSE_RULE) for one sequence of `length` items, written out plainly:
    the reference the vectorized `sparse` is checked against."""
    stride = min(SPARSE_STRIDE, max(1, length // SPARSE_MIN_ITEMS))
    return [i for i in range(length) if (length - 1 - i) % stride == 0]


def last_view(keep: int) -> View:
    if keep < MIN_VIEW_ITEMS:
        raise RsirError(f"--last must be >= {MIN_VIEW_ITEMS} (leave-one-out needs 3 items), got {keep}")
    return View(last_n(keep), {"rule": "last", "n": keep})


def sparse_view() -> View:
    return View(sparse(), {"rule": "sparse", "stride": SPARSE_STRIDE, "min_items": SPARSE_MIN_ITEMS,
                           "description": SPARSE_RULE})



# ------------------------------------------------------------------ derivation
def kept_interactions(real: pl.DataFrame, keep: pl.Expr) -> pl.DataFrame:
    """One row (seq_id, user_id, items, n, pos) per interaction the rule keeps."""
    # n as a signed integer: rules subtract from it (a list length is unsigned and would wrap).
    length = pl.col("items").list.len().cast(pl.Int64).alias("n")
    return (real.select("seq_id", "user_id", "items", length)
            .explode("items")
            .with_columns(pl.int_range(pl.len()).over("seq_id").alias("pos"))
            .filter(keep))


def _check_target(store: DatasetStore, source: str, name: str, replace: bool) -> Manifest:
    """Every check that needs no data, so that a bad request fails before any compute and
    writes nothing; returns the source's version-0 manifest."""
    check_name(name)
    if name == source:
        raise RsirError(f"view name {name!r} is the source dataset's own name; choose another --name")
    parent = store.manifest(source, 0)  # an unknown source names itself and the known datasets
    if store.versions(name) and not replace:
        raise RsirError(f"dataset {name!r} already exists in {store.root}; pass --force to replace it")
    return parent


def derive_view(ws: Workspace, source: str, name: str, view: View, replace: bool = False) -> dict[str, Any]:
    """Publish `name` v0 = `view` applied to the real sequences of `source` v0."""
    store = dataset_store(ws)
    parent = _check_target(store, source, name, replace)
    real = store.load(source, 0).filter(pl.col("origin") == "real")
    base_items = store.items(source, 0)
    long = kept_interactions(real, view.keep)
    # Raw ids and positions as timestamps: the standard preprocessing then keeps the order
    # and makes the item ids contiguous again, exactly as for an import.
    df = pl.DataFrame({
        "user": long["user_id"],
        "item": long["items"].replace_strict(base_items["item_id"], base_items["raw_id"],
                                             return_dtype=pl.String),
        "ts": long["pos"].cast(pl.Int64),
    })
    seqs, item_map, report = build_sequences(df, 0, MIN_VIEW_ITEMS, name)
    # Item metadata (title, year, genres, ...) follows the raw id.
    items = item_map.join(base_items.drop("item_id"), on="raw_id", how="left").sort("item_id")
    lineage = {"derived_from": source, "parent_digest": parent.digest, "view": view.record}
    return {**publish(store, name, seqs, items, lineage, report, replace), **lineage_fields(lineage)}


def lineage_fields(source: dict[str, Any]) -> dict[str, Any]:
    """The fields of a manifest's `source` that say a dataset is a view, and of what."""
    return {k: source[k] for k in ("derived_from", "view") if k in source}
