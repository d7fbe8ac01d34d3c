"""Ragged arrays: rows of different lengths stored flat, and every operation on them, with array
ops only (no per-row Python loops). One module for them, as generative-recommenders keeps its
jagged ops: the split, evaluation, generation and the filter all use these.

Two layouts besides `Ragged` (values + offsets) cross this module's border:
- padded: a (B, W) tensor with each row's items at the right, 0 before (`gather_padded`,
  `Ragged.tails`, `sorted_rows`), the models' input layout;
- left-aligned: a (B, W) buffer with each row's items at the left and a length per row
  (`left_aligned`, `flatten`, `newest`), the generator's growing sequences.
Item id 0 is padding everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa
import torch


def offsets_of(lengths: np.ndarray) -> np.ndarray:
    """(len(lengths) + 1,) int64 offsets of rows of these lengths: 0, then the running sums."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def flat_index(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Indices of the slices [starts[b], starts[b] + lengths[b]), concatenated (vectorized)."""
    first = np.cumsum(lengths) - lengths
    return np.repeat(starts - first, lengths) + np.arange(int(lengths.sum()))


@dataclass(frozen=True)
class Ragged:
    """Variable-length integer sequences stored flat: row r is values[offsets[r]:offsets[r+1]]."""

    values: np.ndarray
    offsets: np.ndarray

    @classmethod
    def from_series(cls, lists: pl.Series) -> "Ragged":
        lengths = lists.list.len().to_numpy().astype(np.int64)
        offsets = offsets_of(lengths)
        values = lists.explode().drop_nulls().to_numpy().astype(np.int64) if offsets[-1] else np.zeros(0, np.int64)
        return cls(values, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def to_arrow(self, large: bool = False) -> pa.Array:
        """One list per row, without a per-row copy: list<int32> (the dataset schema's items), or
        with `large` large_list<int64> (what polars reads back from its own list columns)."""
        if large:
            return pa.LargeListArray.from_arrays(pa.array(self.offsets.astype(np.int64)),
                                                 pa.array(self.values.astype(np.int64)))
        return pa.ListArray.from_arrays(pa.array(self.offsets.astype(np.int32)),
                                        pa.array(self.values.astype(np.int32), type=pa.int32()))

    def to_series(self) -> pl.Series:
        """A polars list[i64] series named "items", without copying row by row."""
        return pl.Series("items", self.to_arrow(large=True))

    def tails(self, rows: np.ndarray, width: int) -> torch.Tensor:
        """Left-padded (len(rows), <=width) tensor of the newest `width` items of each row."""
        ends = self.offsets[rows + 1]
        starts = np.maximum(self.offsets[rows], ends - width)
        return gather_padded(self.values, starts, ends - starts)

    def pairs(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(b, value) for every value of row rows[b], flat and without padding: memory is the
        rows' total length, whatever the longest row."""
        starts = self.offsets[rows]
        lengths = self.offsets[rows + 1] - starts
        return np.repeat(np.arange(len(rows)), lengths), self.values[flat_index(starts, lengths)]

    def coordinates(self) -> tuple[np.ndarray, np.ndarray]:
        """(row, position in the row) of every value, flat (len(values),) each."""
        lengths = self.lengths
        return (np.repeat(np.arange(len(lengths)), lengths),
                np.arange(len(self.values)) - np.repeat(self.offsets[:-1], lengths))

    def take(self, rows: np.ndarray, lengths: np.ndarray | None = None) -> "Ragged":
        """Row rows[b] for each b, cut to its first lengths[b] items when `lengths` is given."""
        starts = self.offsets[rows]
        return slices(self.values, starts, starts + (self.offsets[rows + 1] - starts if lengths is None else lengths))


def slices(values: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> Ragged:
    """Ragged of values[starts[b]:ends[b]] (copied flat, vectorized)."""
    lengths = ends - starts
    return Ragged(values[flat_index(starts, lengths)].astype(np.int64), offsets_of(lengths))


def concat(values: list[np.ndarray], lengths: list[np.ndarray]) -> Ragged:
    """One Ragged of the rows of several flat parts (values[i], lengths[i]), in order."""
    lens = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    vals = np.concatenate(values).astype(np.int64) if values else np.zeros(0, np.int64)
    return Ragged(vals, offsets_of(lens))


def joined(first: Ragged, values: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row b = first[b] followed by the b-th row of (values, lengths): flat values and lengths."""
    total = first.lengths + lengths
    out = np.empty(int(total.sum()), dtype=np.int64)
    starts = np.cumsum(total) - total
    out[flat_index(starts, first.lengths)] = first.values
    out[flat_index(starts + first.lengths, lengths)] = values
    return out, total.astype(np.int64)


# ------------------------------------------------------------------ padded and left-aligned layouts
def gather_padded(values: np.ndarray, starts: np.ndarray, lengths: np.ndarray, shift: int = 0) -> torch.Tensor:
    """values[starts[b] + shift : starts[b] + lengths[b] + shift], left-padded with 0 to max(lengths)."""
    width = max(int(lengths.max(initial=0)), 1)
    col = np.arange(width)[None, :]
    pad = (width - lengths)[:, None]
    idx = starts[:, None] + shift + col - pad
    real = col >= pad
    out = np.where(real, values[np.clip(idx, 0, max(len(values) - 1, 0))] if len(values) else 0, 0)
    return torch.from_numpy(out.astype(np.int64))


def left_aligned(values: np.ndarray, starts: np.ndarray, lengths: np.ndarray, width: int) -> np.ndarray:
    """(B, width) int64: values[starts[b]:starts[b]+lengths[b]] at the left of row b, zeros after."""
    col = np.arange(width)[None, :]
    idx = np.clip(starts[:, None] + col, 0, max(len(values) - 1, 0))
    return np.where(col < lengths[:, None], values[idx], 0).astype(np.int64)


def flatten(buf: torch.Tensor, lengths: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Left-aligned (B, W) buffer + lengths -> flat values (row-major) and lengths, on the host."""
    keep = torch.arange(buf.shape[1], device=buf.device)[None, :] < lengths[:, None]
    return buf[keep].cpu().numpy(), lengths.cpu().numpy().astype(np.int64)


def newest(buf: torch.Tensor, lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """Newest min(length, max_len) items of each left-aligned row, left-padded to a common width."""
    width = min(int(lengths.max()), max_len)
    idx = lengths[:, None] - width + torch.arange(width, device=buf.device)[None, :]
    return torch.where(idx >= 0, buf.gather(1, idx.clamp(min=0)), 0)


def sorted_rows(rows: Ragged, index: np.ndarray, device: torch.device) -> torch.Tensor:
    """(len(index), W) distinct item ids of rows[index], each row ascending, 0-padded at the front
    (padding is never live). W = the most distinct items of a row (<= N), not the longest row:
    a repeated item adds nothing, since every use of an item marks all its copies."""
    which, items = rows.pairs(index)
    span = int(items.max(initial=0)) + 1
    distinct = np.unique(which * span + items)  # sorted by (row, item), each pair once
    counts = np.bincount(distinct // span, minlength=len(index))
    return gather_padded(distinct % span, np.cumsum(counts) - counts, counts).to(device)


def membership(rows: Ragged, index: np.ndarray, num_items: int, device: torch.device) -> torch.Tensor:
    """(len(index), N+1) bool: True where the item occurs in row index[b] of `rows`."""
    which, items = (torch.from_numpy(a).to(device) for a in rows.pairs(index))
    mask = torch.zeros(len(index), num_items + 1, dtype=torch.bool, device=device)
    mask[which, items] = True
    mask[:, 0] = False
    return mask
