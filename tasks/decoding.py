"""One decoding step of many rollouts: what the generator needs from the next-item scores.

Per step and active rollout the generator needs (see tasks/rollout.py): the scores of some
listed items (the user's items for the fidelity check and the local pool), the best rank of a
score among all N items (the rank rule of tasks/ranking.py: ties count against), and the best
item outside a used list (the global pool). Two ways:

- `FullStep`: the (B, N+1) score matrix, as one matmul. Memory B x (N+1) floats.
- `ChunkedStep`: items in chunks of C; the matrix is never formed. Pass 1 gathers the listed
  scores and the best unused item chunk by chunk, pass 2 counts the higher scores. Memory
  B x C floats; the item-table matmul runs twice. Both passes score a chunk with the same
  call, so an item's score is the same number in both (a listed item counts itself once).

`Decoder` gives the step's hidden states: from cached keys and values (the model encodes only
the newest item; `SequentialRecommender.decode_next`, models/base.py) where the model allows it,
else the full forward over each rollout's prefix. Pure computation, no file IO.
"""

from __future__ import annotations

from typing import Protocol

import torch

from models import SequenceModel, SequentialRecommender
from tasks.ranking import COUNT_TILE, best_rank, count_at_least, require_finite, require_rankable
from tasks.retrieval import ItemIndex


# Membership is tested against per-rollout item lists, not (batch, N+1) masks: the user's items
# (batch, |s|) with a "not yet used" flag, and the rollout's own items (batch, len), written into
# the scores as -inf. Masking whole score rows with torch.where costs several times a plain pass
# on CPU; only the rank count and the global argmax touch all N items.
def best_of_listed(listed: torch.Tensor, items: torch.Tensor, live: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Over each row's live listed items (items (B, W) sorted ascending, listed (B, W) their
    scores): (best score, that item, any live). Ties go to the first position, i.e. the lowest id;
    dead entries count as -inf."""
    listed = torch.where(live, listed, float("-inf"))
    at = listed.argmax(dim=1)
    has = live.any(dim=1)
    # Every live score -inf: argmax may land on a dead entry; take the first live one.
    dead = ~live.gather(1, at[:, None]).squeeze(1)
    at = torch.where(dead, live.to(torch.uint8).argmax(dim=1), at)
    return listed.gather(1, at[:, None]).squeeze(1), items.gather(1, at[:, None]).squeeze(1), has


def lowest_unused(used: torch.Tensor, num_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) lowest item id 1..N not in `used` (B, W), and whether there is one. (B, N+1) bools:
    called only for the rows whose every unused score is -inf."""
    free = torch.ones(len(used), num_items + 1, dtype=torch.bool, device=used.device)
    free.scatter_(1, used, False)
    free[:, 0] = False
    return free.to(torch.uint8).argmax(dim=1), free.any(dim=1)


def best_unused(scores: torch.Tensor, used: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Highest-scoring item not in `used` (batch, W; 0 = padding), ties to the lowest id; and
    whether any item was unused. Overwrites the used items' scores with -inf."""
    scores.scatter_(1, used, float("-inf"))
    item = scores.argmax(dim=1)
    has = torch.ones_like(item, dtype=torch.bool)
    odd = scores.gather(1, item[:, None]).squeeze(1) == float("-inf")
    if bool(odd.any()):  # all unused scores -inf (or none unused): take the lowest unused id
        rows = odd.nonzero().squeeze(1)
        item[rows], has[rows] = lowest_unused(used[rows], scores.shape[1] - 1)
    return item, has


class Step(Protocol):
    """The scores of one decoding step of B rollouts, as the generator reads them."""

    def listed(self, items: torch.Tensor) -> torch.Tensor:
        """(B, W) scores of the listed items (B, W)."""
        ...

    def rank(self, top: torch.Tensor) -> torch.Tensor:
        """(B,) #{items 1..N scoring >= top (B,)}: the best rank of the set whose best score is top
        (tasks.ranking.best_rank). Call before best_unused."""
        ...

    def best_unused(self, used: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) best item not in `used` (B, W) (ties: lowest id; all -inf: lowest unused id), and
        whether there is one."""
        ...


class FullStep:
    def __init__(self, scores: torch.Tensor, tile: torch.Tensor | None = None):
        self.scores, self.tile = scores, tile  # (B, N+1) float32; the comparison tile

    def listed(self, items: torch.Tensor) -> torch.Tensor:
        return self.scores.gather(1, items)

    def rank(self, top: torch.Tensor) -> torch.Tensor:
        return best_rank(self.scores[:, 1:], top, self.tile)  # item 0 is not ranked

    def best_unused(self, used: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return best_unused(self.scores, used)  # overwrites the used items' scores: last


class ChunkedStep:
    """Scores of items [lo, lo + chunk) at a time from hidden states (B, d) and the scoring table
    (N+1, d). `lists` are the item lists (B, W_i) whose scores the step will be asked for and
    `used` the rollouts' used items: both are read in the first pass."""

    def __init__(self, model: SequentialRecommender, hidden: torch.Tensor, table: torch.Tensor, chunk: int,
                 lists: list[torch.Tensor], used: torch.Tensor, buffer: torch.Tensor, tile: torch.Tensor):
        self.model, self.hidden, self.table, self.chunk = model, hidden, table, chunk
        self.buffer, self.tile = buffer, tile  # flat float32: >= B x chunk scores; the comparison tile
        self._listed = [torch.full(items.shape, float("-inf"), device=hidden.device) for items in lists]
        self._lists = lists
        best = torch.full((len(hidden),), float("-inf"), device=hidden.device)
        item = torch.zeros(len(hidden), dtype=torch.int64, device=hidden.device)
        for lo, scores in self._chunks():
            hi = lo + scores.shape[1]
            for items, out in zip(lists, self._listed):
                inside = (items >= lo) & (items < hi)
                out.copy_(torch.where(inside, scores.gather(1, (items - lo).clamp(0, hi - lo - 1)), out))
            # The chunk's best unused item: used items inside it to -inf first.
            rows, cols = ((used >= lo) & (used < hi)).nonzero(as_tuple=True)
            scores[rows, used[rows, cols] - lo] = float("-inf")
            value, at = scores.max(dim=1)  # first maximum: the lowest id
            better = value > best  # strictly: an earlier chunk (lower ids) keeps a tie
            best = torch.where(better, value, best)
            item = torch.where(better, at + lo, item)
        self._best, self._item = best, item

    def _chunks(self):
        B = len(self.hidden)
        for lo in range(0, self.table.shape[0], self.chunk):
            emb = self.table[lo: lo + self.chunk]
            yield lo, self.model.item_scores(self.hidden, emb, lo, out=self.buffer[: B * len(emb)].view(B, len(emb)))

    def listed(self, items: torch.Tensor) -> torch.Tensor:
        for known, out in zip(self._lists, self._listed):
            if known is items:
                return out
        raise ValueError("ChunkedStep.listed: items not among the lists given at construction")

    def rank(self, top: torch.Tensor) -> torch.Tensor:
        at_least = torch.zeros(len(top), dtype=torch.int64, device=top.device)
        for lo, scores in self._chunks():
            at_least += count_at_least(scores[:, 1:] if lo == 0 else scores, top, self.tile)  # item 0 is not ranked
        return at_least

    def best_unused(self, used: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        item, has = self._item.clone(), torch.ones_like(self._item, dtype=torch.bool)
        odd = self._best == float("-inf")
        if bool(odd.any()):
            rows = odd.nonzero().squeeze(1)
            item[rows], has[rows] = lowest_unused(used[rows], self.table.shape[0] - 1)
        return item, has


class RetrievedStep:
    """A decoding step (tasks.decoding.Step) over the index's candidates and the listed items,
    scored exactly in one computation so that an item has one score wherever it appears."""

    def __init__(self, model: SequentialRecommender, hidden: torch.Tensor, table: torch.Tensor, index: ItemIndex,
                 lists: list[torch.Tensor]):
        self.num_items = table.shape[0] - 1
        found = index.search(model.scaled(hidden))
        self._lists = lists
        ids = torch.cat([*lists, found], dim=1)  # (B, W) ids, 0 = none
        scores = (model.scaled(hidden)[:, None, :] * table[ids]).sum(dim=-1).float()
        # Each item once: a candidate that is also listed (or repeated) counts only where listed first.
        order = torch.sort(ids, dim=1, stable=True)
        repeat = torch.zeros_like(ids, dtype=torch.bool)
        repeat.scatter_(1, order.indices[:, 1:], order.values[:, 1:] == order.values[:, :-1])
        self.ids, self.scores = ids, scores
        self.distinct = (ids != 0) & ~repeat
        self._widths = [x.shape[1] for x in lists]

    def listed(self, items: torch.Tensor) -> torch.Tensor:
        start = 0
        for known, width in zip(self._lists, self._widths):
            if known is items:
                out = self.scores[:, start: start + width]
                return torch.where(items != 0, out, float("-inf"))
            start += width
        raise ValueError("RetrievedStep.listed: items not among the lists given at construction")

    def rank(self, top: torch.Tensor) -> torch.Tensor:
        return ((self.scores >= top[:, None]) & self.distinct).sum(dim=1)  # the rule of tasks.ranking

    def best_unused(self, used: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The best candidate or listed item not in `used`; ties to the lowest id."""
        free = self.distinct & ~(self.ids[:, :, None] == used[:, None, :]).any(dim=2)
        scores = torch.where(free, self.scores, float("-inf"))
        best = scores.max(dim=1).values
        at_best = free & (scores == best[:, None])
        item = torch.where(at_best, self.ids, self.num_items + 1).min(dim=1).values
        has = free.any(dim=1) & (best > float("-inf"))
        if not bool(has.all()):  # no candidate left, or all -inf: the lowest unused id (as exact)
            rows = (~has).nonzero().squeeze(1)
            item[rows], has[rows] = lowest_unused(used[rows], self.num_items)
        return item, has


class Decoder:
    """Next-item scores of the active rollouts of one batch, step by step.

    incremental: keys and values are cached and only each rollout's newest item is encoded
    (models that allow it: positions from the oldest item, or none); otherwise, or for models
    that are not a SequentialRecommender, the full forward over each prefix. Scores of more
    than `item_chunk` items (N+1 > item_chunk) are never formed whole (ChunkedStep). With an
    `index` (approximate retrieval, tasks.retrieval) a step reads only its candidates."""

    def __init__(self, model: SequenceModel, batch: int, device: torch.device, incremental: bool,
                 item_chunk: int, index: ItemIndex | None = None):
        self.model, self.index = model, index
        self.recommender = isinstance(model, SequentialRecommender)
        self.cache = (model.new_cache(batch, device)
                      if incremental and self.recommender and model.decodes_incrementally() else None)
        # The scoring table once per batch (HSTU normalises every row of it).
        self.table = model.output_embeddings() if self.recommender else None
        if self.table is not None:
            require_finite(self.table, "generation: the model's item table")
        self.item_chunk = item_chunk
        # Score buffer and comparison tile, allocated once per batch: a fresh (B, N+1) tensor per
        # step cost more in page faults than the matmul that fills it (measured at 10^5 items).
        if self.recommender and index is None:  # a retrieved step reads only its candidates
            width = min(self.table.shape[0], item_chunk)
            self.buffer = torch.empty(batch * width, dtype=torch.float32, device=device)
            self.tile = torch.empty(min(batch * width, COUNT_TILE), dtype=torch.float32, device=device)

    @property
    def incremental(self) -> bool:
        return self.cache is not None

    def step(self, seqs: torch.Tensor, lists: list[torch.Tensor], used: torch.Tensor) -> Step:
        """seqs (B, L): the rollouts' current sequences (left-padded windows without a cache; with
        one, every row has cache.length + 1 items and only the newest is read)."""
        if not self.recommender:
            scores = self.model.score_last(seqs).float()
            require_rankable(scores[:, 1:], "generation: the model's scores")
            return FullStep(scores)
        if self.cache is not None:
            hidden = self.model.decode_next(seqs[:, -1], self.cache)
        else:
            hidden = self.model.last_hidden(seqs)
        # Finite hidden states and a finite table give finite scores (barring float overflow, which
        # the rank rule handles: an infinite score ties and counts against); (B, d), not (B, N).
        require_finite(hidden, "generation: the model's hidden states")
        if self.index is not None:
            return RetrievedStep(self.model, hidden, self.table, self.index, lists)
        if self.table.shape[0] <= self.item_chunk:
            B, n = len(hidden), self.table.shape[0]
            scores = self.model.item_scores(hidden, self.table, out=self.buffer[: B * n].view(B, n))
            return FullStep(scores, self.tile)
        return ChunkedStep(self.model, hidden, self.table, self.item_chunk, lists, used, self.buffer, self.tile)

    def keep(self, rows: torch.Tensor) -> None:
        """Only these rows (B',) stay active, in this order."""
        if self.cache is not None:
            self.cache = self.cache.select(rows)
