"""Leave-one-out split and padded batches built with array ops (no per-row Python loops)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from rsir.errors import RsirError


@dataclass(frozen=True)
class Ragged:
    """Variable-length integer sequences stored flat: row r is values[offsets[r]:offsets[r+1]]."""

    values: np.ndarray
    offsets: np.ndarray

    @classmethod
    def from_series(cls, lists: pl.Series) -> "Ragged":
        lengths = lists.list.len().to_numpy().astype(np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        values = lists.explode().drop_nulls().to_numpy().astype(np.int64) if offsets[-1] else np.zeros(0, np.int64)
        return cls(values, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def tails(self, rows: np.ndarray, width: int) -> torch.Tensor:
        """Left-padded (len(rows), <=width) tensor of the newest `width` items of each row."""
        ends = self.offsets[rows + 1]
        starts = np.maximum(self.offsets[rows], ends - width)
        return gather_padded(self.values, starts, ends - starts)

    def rows(self, rows: np.ndarray) -> torch.Tensor:
        """Left-padded tensor of whole rows (width = longest row)."""
        starts = self.offsets[rows]
        return gather_padded(self.values, starts, self.offsets[rows + 1] - starts)


def gather_padded(values: np.ndarray, starts: np.ndarray, lengths: np.ndarray, shift: int = 0) -> torch.Tensor:
    """values[starts[b] + shift : starts[b] + lengths[b] + shift], left-padded with 0 to max(lengths)."""
    width = max(int(lengths.max(initial=0)), 1)
    col = np.arange(width)[None, :]
    pad = (width - lengths)[:, None]
    idx = starts[:, None] + shift + col - pad
    real = col >= pad
    out = np.where(real, values[np.clip(idx, 0, max(len(values) - 1, 0))] if len(values) else 0, 0)
    return torch.from_numpy(out.astype(np.int64))


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
    )


@dataclass(frozen=True)
class Windows:
    """Training samples: each predicts every position of a window of <= max_len pairs."""

    starts: np.ndarray  # absolute index into Ragged.values of the first input item
    lengths: np.ndarray  # number of (input, target) pairs

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def positions(self) -> int:
        return int(self.lengths.sum())


def training_windows(train: Ragged, max_len: int) -> Windows:
    """Sequences longer than max_len+1 are cut into windows counted back from the newest item,
    so every target is predicted exactly once per epoch."""
    pairs = np.maximum(train.lengths - 1, 0)
    counts = -(-pairs // max_len)  # windows per sequence (0 for sequences of one item)
    row = np.repeat(np.arange(len(train)), counts)
    first = np.cumsum(counts) - counts
    j = np.arange(counts.sum()) - np.repeat(first, counts)  # 0 = newest window
    end = pairs[row] - j * max_len
    start = np.maximum(end - max_len, 0)
    return Windows(starts=train.offsets[row] + start, lengths=end - start)


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


def window_tensors(train: Ragged, windows: Windows, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    starts, lengths = windows.starts[idx], windows.lengths[idx]
    return gather_padded(train.values, starts, lengths), gather_padded(train.values, starts, lengths, shift=1)
