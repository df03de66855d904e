"""Where a growing history is cut between the expert cache and the recent window (the refresh policy).

An expert model reads a window of W = P + R items: P history items summarised by the expert tokens, then R
recent items. The evaluator's window always ends at the user's last item, so every new interaction moves
the cut and the cache would have to be rebuilt at every event. With `refresh_every = N`, the cut moves
only in steps of N interactions:

    cut(n) = N * ceil((n - R) / N)   for a history of n > R items (0 while n <= R)

The cache covers the P items before the cut (left-padded); the recent window holds the n - cut items after
it, placed from the window's first recent slot (between R - N + 1 and R of them), and the user's state is
read at the last of them. Because attention is causal, that is exactly the state the model computes at that
slot of the full window of the cut's P + R items: the position training puts a query at. Nothing is ever
dropped, every item reaches the query through the cache or directly. With N = 1 the window is the
evaluator's; while n <= R nothing is cached and the recent window is right-aligned, as the evaluator's.

`staleness` counts the interactions since the cut last moved (0 right after a rebuild, at most N - 1).
The plan depends on n alone, so a server that keeps caches and `Recommender.recommend` on the full history
compute the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from persrec.models.base import KVCache


@dataclass(frozen=True)
class WindowPlan:
    length: int  # n: items in the history
    cut: int  # items before the cut: the cache summarises the last P of them
    history_length: int  # P
    recent_length: int  # R
    every: int  # N

    @property
    def offset(self) -> int:
        """First recent slot holding an item."""
        return self.recent_length - self.length if self.length <= self.recent_length else 0

    @property
    def query_slot(self) -> int:
        """Recent slot of the user's last item, where the state is read."""
        return self.offset + self.length - self.cut - 1

    @property
    def staleness(self) -> int:
        if self.length <= self.recent_length:
            return 0
        return self.length - (self.cut + self.recent_length - self.every + 1)

    def history_part(self, values: np.ndarray) -> np.ndarray:
        """[P]: the P values before the cut, left-padded with 0."""
        out = np.zeros(self.history_length, dtype=np.int64)
        part = values[max(0, self.cut - self.history_length) : self.cut]
        if len(part):
            out[-len(part) :] = part
        return out

    def recent_part(self, values: np.ndarray) -> np.ndarray:
        """[R]: the values after the cut from slot `offset`, 0 elsewhere."""
        out = np.zeros(self.recent_length, dtype=np.int64)
        part = values[self.cut : self.length]
        out[self.offset : self.offset + len(part)] = part
        return out


@dataclass(frozen=True)
class RefreshPolicy:
    history_length: int  # P
    recent_length: int  # R
    every: int = 1  # N

    def __post_init__(self) -> None:
        if not 1 <= self.every <= self.recent_length:
            raise ValueError(
                f"refresh_every must lie in [1, {self.recent_length}] (the recent window R), got {self.every}"
            )

    def cut(self, length: int) -> int:
        if length <= self.recent_length:
            return 0
        return -(-(length - self.recent_length) // self.every) * self.every

    def plan(self, length: int) -> WindowPlan:
        return WindowPlan(length, self.cut(length), self.history_length, self.recent_length, self.every)


def stack_caches(caches: list[KVCache]) -> KVCache:
    """Several users' caches ([1, ...] each, the same expert slots) as one batch."""
    if len(caches) == 1:
        return caches[0]
    first = caches[0]
    return KVCache(
        keys=[torch.cat([c.keys[i] for c in caches]) for i in range(len(first.keys))],
        values=[torch.cat([c.values[i] for c in caches]) for i in range(len(first.values))],
        positions=torch.cat([c.positions for c in caches]),
        timestamps=None if first.timestamps is None else torch.cat([c.timestamps for c in caches]),
        valid=torch.cat([c.valid for c in caches]),
    )
