"""Statistics of a dataset version (stored in its manifest).

Definitions (logs are natural):
* density = interactions / (real users x items): synthetic pseudo-users add interactions but
  not users, so density grows as the data is expanded (the paper's convention);
  pair_density counts distinct (sequence, item) pairs instead of interactions.
* item-popularity entropy H = -sum_i p_i ln p_i over all interactions; normalised H / ln |I|;
  Gini of the item-popularity counts (items never seen count as zero).
* Approximate Entropy of a categorical sequence, ApEn(m=1, r=0) = Phi_1 - Phi_2 with
  Phi_m = mean_i ln(C_i^m), C_i^m = the share of the sequence's length-m windows equal to
  window i. Items rarely repeat inside a sequence, so on raw item ids ApEn depends only on the
  length; we compute it on the item's popularity decile instead (10 bins of equal interaction
  mass in the real sequences, most popular first), which measures how varied a sequence is
  between head and tail items. Sequences shorter than 3 items are skipped.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from storage.manifest import VersionStats

APEN_BINS = 10


def item_counts(seqs: pl.DataFrame, num_items: int) -> np.ndarray:
    flat = seqs["items"].explode().drop_nulls().to_numpy()
    return np.bincount(flat, minlength=num_items + 1)[1:].astype(np.float64)


def popularity_entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def gini(counts: np.ndarray) -> float:
    c = np.sort(counts)
    n = len(c)
    if n == 0 or c.sum() == 0:
        return 0.0
    i = np.arange(1, n + 1)
    return float(((2 * i - n - 1) * c).sum() / (n * c.sum()))


def popularity_bins(real_counts: np.ndarray, bins: int = APEN_BINS) -> np.ndarray:
    """Symbol per item id (index 0 unused): its bin of equal interaction mass, 0 = most popular."""
    order = np.argsort(-real_counts, kind="stable")
    mass_before = np.cumsum(real_counts[order]) - real_counts[order]
    total = max(real_counts.sum(), 1.0)
    symbol = np.empty(len(real_counts), dtype=np.int64)
    symbol[order] = np.minimum((mass_before / total * bins).astype(np.int64), bins - 1)
    symbol[real_counts == 0] = bins - 1
    return np.concatenate([[0], symbol])


def _phi(symbols: pl.DataFrame, m: int) -> pl.DataFrame:
    """Phi_m per sequence from (seq_id, pos, sym) rows, r = 0 (exact matches)."""
    code = pl.lit(0, dtype=pl.Int64)
    for k in range(m):
        code = code * APEN_BINS + pl.col("sym").shift(-k).over("seq_id")
    grams = symbols.with_columns(code.alias("code")).drop_nulls("code")
    return (grams.with_columns(pl.len().over("seq_id", "code").alias("same"),
                               pl.len().over("seq_id").alias("windows"))
            .group_by("seq_id").agg((pl.col("same") / pl.col("windows")).log().mean().alias(f"phi{m}")))


def approximate_entropy(seqs: pl.DataFrame, symbol: np.ndarray) -> pl.DataFrame:
    """ApEn(1, 0) per sequence of at least 3 items: columns seq_id, apen."""
    long = seqs.filter(pl.col("items").list.len() >= 3).select("seq_id", "items").explode("items")
    if long.height == 0:
        return pl.DataFrame({"seq_id": [], "apen": []}, schema={"seq_id": pl.Int64, "apen": pl.Float64})
    syms = long.with_columns(pl.Series("sym", symbol[long["items"].to_numpy()]))
    return _phi(syms, 1).join(_phi(syms, 2), on="seq_id").select(
        "seq_id", (pl.col("phi1") - pl.col("phi2")).alias("apen"))


def version_statistics(seqs: pl.DataFrame, num_items: int) -> VersionStats:
    """The statistics of a version's sequences (columns items, origin, seq_id; item ids 1..num_items)."""
    lengths = seqs["items"].list.len()
    is_real = seqs["origin"] == "real"
    real, synthetic = seqs.filter(is_real), seqs.filter(~is_real)
    n_real = real.height
    interactions = int(lengths.sum())
    counts = item_counts(seqs, num_items)
    pairs = int(seqs.select(pl.col("items").list.unique().list.len().sum()).item())
    apen = approximate_entropy(seqs, popularity_bins(item_counts(real, num_items)))
    apen = apen.join(seqs.select("seq_id", "origin"), on="seq_id")
    entropy = popularity_entropy(counts)
    return VersionStats.model_validate({
        "sequences": seqs.height,
        "real_sequences": n_real,
        "synthetic_sequences": synthetic.height,
        "interactions": interactions,
        "synthetic_interactions": int(synthetic["items"].list.len().sum()) if synthetic.height else 0,
        "mean_length": interactions / max(seqs.height, 1),
        "mean_synthetic_length": float(synthetic["items"].list.len().mean()) if synthetic.height else 0.0,
        "num_items": num_items,
        "density": interactions / max(n_real * num_items, 1),
        "pair_density": pairs / max(n_real * num_items, 1),
        "item_entropy": entropy,
        "item_entropy_normalised": float(entropy / np.log(num_items)) if num_items > 1 else 0.0,
        "item_gini": gini(counts),
        "apen_real": _mean(apen.filter(pl.col("origin") == "real")["apen"]),
        "apen_synthetic": _mean(apen.filter(pl.col("origin") != "real")["apen"]),
    })


def _mean(values: pl.Series) -> float | None:
    return float(values.mean()) if values.len() else None
