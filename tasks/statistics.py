"""Statistics of a dataset version (stored in its manifest)."""

from __future__ import annotations

from typing import Any

import polars as pl


def version_statistics(seqs: pl.DataFrame, num_items: int) -> dict[str, Any]:
    lengths = seqs["items"].list.len()
    real = seqs.filter(pl.col("origin") == "real")
    n_real = real.height
    interactions = int(lengths.sum())
    return {
        "sequences": seqs.height,
        "real_sequences": n_real,
        "synthetic_sequences": seqs.height - n_real,
        "interactions": interactions,
        "mean_length": round(interactions / max(seqs.height, 1), 4),
        "num_items": num_items,
        # Density relative to the real user base: synthetic pseudo-users add interactions,
        # not users, so density grows as the data is expanded (the paper's convention).
        "density": interactions / max(n_real * num_items, 1),
    }
