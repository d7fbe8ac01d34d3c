"""Left-padded batches of mixed lengths, computed without their padding.

A batch of B rows padded to the longest row costs B x L positions in the encoder whatever the
rows' lengths; with plain random batches (the release recipe) on a catalogue of short histories
that is mostly padding (Amazon Beauty, batch 256, max_len 50: 1.11 million padded positions per
epoch for 0.14 million real ones). Every backbone's `encode` is invariant to leading all-padding
columns (models/base.py, checked for every backbone in tests/test_backbones.py), so a batch can
be computed as a few groups of rows of similar length, each cut to its own longest row, with the
same result up to float rounding: `length_groups` chooses the groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Fixed cost of one more group, in padded positions: the group's own forward and backward
# operators (Python and dispatch: about 100 of them for two SASRec blocks and the loss).
# Measured on the project's 2-core CPU, threads 1, Beauty's 12,101 items: a 1 x 1 batch's
# forward and backward took 7 ms (default settings, encoder) and 26 ms (release: sampled loss,
# FFN 4d), against 35 and 150 us per position of a 256 x 50 batch, i.e. 170-200 positions
# either way; rounded up, as fewer groups also means larger matrix products.
GROUP_COST = 256
# A batch is split only when that at least halves its positions. Batches of the default trainer
# (windows batched by length) are nearly padding-free: splitting the few that would split (8 of
# 177 per Beauty epoch) saves 4-30% of their positions, under 1% of an epoch, and would change
# their dropout draws; random batches of the release recipe save 59-86% (every batch).
MIN_SAVING = 0.5


@dataclass(frozen=True)
class Group:
    """Rows of a batch computed together: `rows` (B',) indices into the batch (None = every row,
    in order) and `width`, the columns kept (the newest `width`, enough for each of its rows)."""

    rows: torch.Tensor | None
    width: int

    def pick(self, x: torch.Tensor) -> torch.Tensor:
        """(B, ...) -> (B', ...): this group's rows."""
        return x if self.rows is None else x[self.rows]

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, ...) -> (B', width, ...): this group's rows, their newest `width` columns."""
        return self.pick(x[:, x.shape[1] - self.width:])


def spans(seqs: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) int64 columns each left-padded row needs (B, L): from its first real item (or first
    target, when `targets` (B, L) is given) to the end; 0 for a row with neither."""
    used = seqs != 0 if targets is None else (seqs != 0) | (targets != 0)
    first = used.to(torch.uint8).argmax(dim=1)  # the first True (argmax returns the first maximum)
    return torch.where(used.any(dim=1), seqs.shape[1] - first, 0)


def length_groups(widths: torch.Tensor, split: bool = True, group_cost: int | None = None,
                  min_saving: float | None = None) -> list[Group]:
    """Partition the rows of a batch by their needed widths (B,) so that the padded positions
    Σ_groups rows x width plus `group_cost` (default GROUP_COST) per group are fewest (exact, by
    dynamic programming over the distinct widths, at most max_len of them). Every row lands in a
    group, a row of width 0 (nothing real) in the first, computed one column wide, as padding is
    anywhere.

    One group (every row, in order) unless the split saves at least `min_saving` (default
    MIN_SAVING) of the one group's cost, or when `split` is False (then only leading all-padding
    columns are cut): the computation is then the untrimmed batch's, with the same random draws.
    Rows of a group are in ascending width (ties in batch order)."""
    group_cost = GROUP_COST if group_cost is None else group_cost
    min_saving = MIN_SAVING if min_saving is None else min_saving
    w = np.maximum(widths.cpu().numpy(), 1)  # a row of padding still needs one column
    widest = int(w.max(initial=1))
    values, counts = np.unique(w, return_counts=True)
    if not split or len(values) == 1:
        return [Group(None, widest)]
    rows_below = np.concatenate([[0], np.cumsum(counts)])  # rows narrower than values[j]
    best = np.zeros(len(values) + 1)  # cheapest cost of the rows of the j narrowest widths
    start = np.zeros(len(values) + 1, dtype=np.int64)  # where the last group of that optimum starts
    for j in range(1, len(values) + 1):  # over distinct widths (<= max_len), not rows
        cost = best[:j] + (rows_below[j] - rows_below[:j]) * values[j - 1] + group_cost
        start[j] = int(np.argmin(cost))
        best[j] = cost[start[j]]
    ends = [len(values)]
    while start[ends[-1]] > 0:
        ends.append(int(start[ends[-1]]))
    if len(ends) == 1 or best[-1] > (1 - min_saving) * (len(w) * widest + group_cost):
        return [Group(None, widest)]
    order = np.argsort(w, kind="stable")
    bounds = np.searchsorted(w[order], values[np.array(ends[::-1]) - 1], side="right")
    device = widths.device
    return [Group(torch.from_numpy(order[lo:hi]).to(device), int(w[order[hi - 1]]))
            for lo, hi in zip(np.concatenate([[0], bounds[:-1]]), bounds)]


def splits_pay(device: torch.device) -> bool:
    """Whether to split batches into length groups on `device`: on a CPU the cost is the padded
    positions; a GPU computes a batch this size in parallel (a padded position costs about nothing
    until it is saturated) and would only pay more kernel launches, so there only leading
    all-padding columns are cut (not measured on a GPU: the conservative choice keeps its path)."""
    return device.type == "cpu"
