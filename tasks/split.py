"""Leave-one-out split and padded batches built with array ops (no per-row Python loops; the
ragged-array operations are tasks/ragged.py's)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from core.errors import RsirError
from tasks.config import Weighting
from tasks.ragged import Ragged, gather_padded


@dataclass(frozen=True)
class LeaveOneOut:
    """Real users: last item test, second-to-last validation, the rest training.
    Synthetic sequences (pseudo-users) are training data only."""

    train: Ragged  # every training sequence: real prefixes first, then synthetic ones
    valid_input: Ragged  # real users' training part
    valid_target: np.ndarray
    test_input: Ragged  # real users' training part + validation item
    test_target: np.ndarray
    num_items: int
    train_seq_ids: np.ndarray | None = None  # seq_id of each training row (parents of generated data)
    train_synthetic: np.ndarray | None = None  # bool per training row: a synthetic sequence

    @property
    def num_users(self) -> int:
        return len(self.valid_target)


def leave_one_out(seqs: pl.DataFrame, num_items: int) -> LeaveOneOut:
    seqs = seqs.sort("seq_id")
    real = seqs.filter(pl.col("origin") == "real")
    synthetic = seqs.filter(pl.col("origin") != "real")
    n = pl.col("items").list.len()
    short = real.filter(n < 3)
    if short.height:
        raise RsirError(f"real sequence {short['seq_id'][0]} has fewer than 3 items; "
                        f"leave-one-out needs 3 (training, validation, test)")
    parts = real.select(
        pl.col("items").list.slice(0, n - 2).alias("train"),
        pl.col("items").list.slice(0, n - 1).alias("test_input"),
        pl.col("items").list.get(-2).alias("valid"),
        pl.col("items").list.get(-1).alias("test"),
    )
    train_lists = pl.concat([parts["train"], synthetic["items"]])
    return LeaveOneOut(
        train=Ragged.from_series(train_lists),
        valid_input=Ragged.from_series(parts["train"]),
        valid_target=parts["valid"].to_numpy().astype(np.int64),
        test_input=Ragged.from_series(parts["test_input"]),
        test_target=parts["test"].to_numpy().astype(np.int64),
        num_items=num_items,
        train_seq_ids=np.concatenate([real["seq_id"].to_numpy(), synthetic["seq_id"].to_numpy()]).astype(np.int64),
        train_synthetic=np.repeat([False, True], [real.height, synthetic.height]),
    )


@dataclass(frozen=True)
class Windows:
    """Training samples: each predicts the positions of a window of <= max_len pairs, except its
    first `skip` ones (their targets are another window's, which sees a longer context)."""

    starts: np.ndarray  # absolute index into Ragged.values of the first input item
    lengths: np.ndarray  # number of (input, target) pairs
    rows: np.ndarray  # training row (index into LeaveOneOut.train) of each window
    skip: np.ndarray  # leading pairs whose target this window does not predict

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def targets(self) -> np.ndarray:
        """Target positions each window predicts."""
        return self.lengths - self.skip

    @property
    def positions(self) -> int:
        return int(self.targets.sum())


def training_windows(train: Ragged, max_len: int, stride: int | None = None) -> Windows:
    """Cut every sequence into windows of <= max_len pairs counted back from the newest item, one
    every `stride` pairs (default max_len: disjoint windows). A window predicts only its newest
    `stride` targets (the oldest window all that are left), so every target is predicted
    exactly once per epoch, with at least max_len - stride items of context unless it lies
    near the start of its sequence. stride = 1 gives every target its full context (one sample
    per prefix, as RecBole) at max_len times the cost of stride = max_len."""
    stride = max_len if stride is None else stride
    if not 1 <= stride <= max_len:
        raise ValueError(f"stride must be in 1..max_len={max_len}, got {stride}")
    pairs = np.maximum(train.lengths - 1, 0)
    counts = np.where(pairs > 0, -(-np.maximum(pairs - max_len, 0) // stride) + 1, 0)
    row = np.repeat(np.arange(len(train)), counts)
    first = np.cumsum(counts) - counts
    j = np.arange(counts.sum()) - np.repeat(first, counts)  # 0 = newest window
    end = pairs[row] - j * stride
    start = np.maximum(end - max_len, 0)
    oldest = start == 0
    skip = np.where(oldest, 0, end - stride - start)
    return Windows(starts=train.offsets[row] + start, lengths=end - start, rows=row, skip=skip)


def window_batches(windows: Windows, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled batches of windows of similar length (less padding): shuffle, sort by length
    inside chunks of 50 batches, cut into batches, shuffle the batch order."""
    order = rng.permutation(len(windows))
    chunk = batch_size * 50
    batches = []
    for c in range(0, len(order), chunk):
        part = order[c:c + chunk]
        part = part[np.argsort(windows.lengths[part], kind="stable")]
        batches.extend(part[i:i + batch_size] for i in range(0, len(part), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def random_batches(windows: Windows, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Plain random batches (the RSIR release): a permutation cut into batches; lengths mix."""
    order = rng.permutation(len(windows))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


BATCHINGS = {"length": window_batches, "random": random_batches}


def window_tensors(train: Ragged, windows: Windows, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), both (len(idx), longest window) and left-padded; a target is 0 where
    there is none: padding, and the skipped pairs of overlapping windows."""
    starts, lengths = windows.starts[idx], windows.lengths[idx]
    inputs = gather_padded(train.values, starts, lengths)
    targets = gather_padded(train.values, starts, lengths, shift=1)
    width = targets.shape[1]
    # Left padding puts pair s of a window at column width - length + s.
    first_counted = torch.from_numpy(width - lengths + windows.skip[idx])[:, None]
    targets[torch.arange(width)[None, :] < first_counted] = 0
    return inputs, targets


# ------------------------------------------------------------------ how much each target weighs
@dataclass(frozen=True)
class TargetWeights:
    """Per-window weight of each of its targets: `synthetic_weight` (λ) for windows of synthetic
    sequences, 1 for real ones (the paper's L_k + λ·L_gen)."""

    per_window: np.ndarray  # (windows,) λ or 1
    synthetic: np.ndarray  # (windows,) bool

    @classmethod
    def of(cls, windows: Windows, train_synthetic: np.ndarray, synthetic_weight: float) -> "TargetWeights":
        synthetic = train_synthetic[windows.rows]
        return cls(np.where(synthetic, synthetic_weight, 1.0), synthetic)


def batch_scales(windows: Windows, weights: TargetWeights, batches: list[np.ndarray],
                 weighting: Weighting) -> np.ndarray:
    """Factor that turns a batch's Σ w ℓ into its loss, one per batch.

    position: every target position of the epoch weighs the same (times λ if synthetic), in
              whatever batch it falls: factor = batches / Σ_epoch w, so the mean of the batch
              losses is exactly the λ-weighted mean over all target positions of the epoch.
    batch:    each batch's own weighted mean, factor = 1 / Σ_batch w (the trainer before issue
              10: a batch of short sequences weighs as much as one of long ones)."""
    mass = weights.per_window * windows.targets
    if weighting == "position":
        return np.full(len(batches), len(batches) / mass.sum())
    if weighting == "batch":
        return 1.0 / _batch_sums(mass, batches)
    raise ValueError(f"unknown weighting {weighting!r}")


def _batch_sums(values: np.ndarray, batches: list[np.ndarray]) -> np.ndarray:
    """Σ values[idx] for every batch idx (one reduceat over the concatenated batches)."""
    if not batches:
        return np.zeros(0)
    sizes = np.array([len(b) for b in batches])
    return np.add.reduceat(values[np.concatenate(batches)], np.cumsum(sizes) - sizes)


def synthetic_position_share(windows: Windows, weights: TargetWeights) -> float:
    """Share of the epoch's target positions that are synthetic."""
    targets = windows.targets
    return float(targets[weights.synthetic].sum() / max(targets.sum(), 1))


def synthetic_weight_share(windows: Windows, weights: TargetWeights, batches: list[np.ndarray],
                           scales: np.ndarray) -> float:
    """Share of the epoch's gradient weight that synthetic targets carry under these batches and
    scales (= the position share under weighting=position with λ = 1)."""
    mass = weights.per_window * windows.targets
    total = (scales * _batch_sums(mass, batches)).sum()
    synthetic = (scales * _batch_sums(np.where(weights.synthetic, mass, 0.0), batches)).sum()
    return float(synthetic / total) if total else 0.0
