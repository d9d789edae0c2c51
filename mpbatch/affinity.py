"""routing="affinity" (caller process): each key has a home worker, and moves when it is busy.

A key goes to its home, the worker that took it last, so that state a worker keeps per key
(a model, a connection, a warmed cache: see Batcher's ``init``) stays warm. While the
home's queued work is under ``spill_after`` seconds the key stays; past it, the key goes to
the least-loaded worker, which becomes its new home, if that worker holds at least half
the bound less (so a hot key that keeps every worker past its bound moves in runs, not
item by item). So a hot key no longer pins one worker
as under "key", and a cold key is not scattered over every worker as under "least-loaded".

Queued work is read from the shared-memory counters (items sent and not done, times the
worker's measured cost per item: WORK_NS / DONE) plus the items waiting in the caller's
open chunk for that worker. Before a worker has finished anything its cost is unknown, and
the bound is two batches' worth of items. Per-key order is not promised: a key that moves
may run on its new home before its last items finish on the old one.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING

from .counters import CELLS, DONE, SENT, WORK_NS

if TYPE_CHECKING:
    from .counters import LoadCounters
    from .intake import OpenChunk

SPILL_AFTER = 0.05  # s of queued work on its home before a key moves (the default)


class Affinity:
    """Homes of keys, and the choice to keep a key at home or move it."""

    HOMES_MAX = 65_536  # bounded: a stream of distinct keys must not grow memory

    def __init__(self, counters: LoadCounters, batch_items: int, spill_after: float) -> None:
        self.counters = counters
        self.workers = counters.workers
        self.bound_ns = spill_after * 1e9
        self.bound_items = 2 * batch_items  # while a worker's cost is unknown
        self.homes: dict[Hashable, int] = {}
        # The open chunks of Intake, one per worker (the same list): their items are
        # queued work too, though no counter has them yet.
        self.waiting: list[OpenChunk] = []
        self.moves = 0  # keys that left a home for another worker

    def limits(self) -> list[float]:
        """Items each worker may have queued before its keys move."""
        cells = self.counters.cells
        out = []
        for i in range(self.workers):
            base = CELLS * i
            done = cells[base + DONE]
            cost = cells[base + WORK_NS] / done if done else 0.0
            out.append(self.bound_ns / cost if cost else self.bound_items)
        return out

    def loads(self) -> list[int]:
        """Items queued per worker: sent and not done, and waiting in its open chunk."""
        cells, waiting = self.counters.cells, self.waiting
        return [cells[CELLS * i + SENT] - cells[CELLS * i + DONE] + len(waiting[i].entries)
                for i in range(self.workers)]

    def for_key(self, key: Hashable) -> int:
        """The worker for one item of ``key`` (add(), submit())."""
        return self.owners([key])[0]

    def owners(self, keys: list) -> list[int]:
        """The worker for each of ``keys``, in order: a block is placed as if its items came
        one by one, each counted on the worker it goes to."""
        homes, limits, loads = self.homes, self.limits(), self.loads()
        out = []
        for key in keys:
            home = homes.get(key)
            if home is None:
                home = self._settle(key, loads)
            elif loads[home] >= limits[home]:
                home = self._move(key, home, loads, limits[home])
            loads[home] += 1
            out.append(home)
        return out

    def _settle(self, key: Hashable, loads: list[int]) -> int:
        """A key without a home: the least-loaded worker becomes it."""
        if len(self.homes) >= self.HOMES_MAX:
            self.homes.clear()  # homes are a hint: losing them costs warm-ups, not items
        home = self.homes[key] = min(range(self.workers), key=loads.__getitem__)
        return home

    def _move(self, key: Hashable, home: int, loads: list[int], limit: float) -> int:
        """The key's home is past its bound: it moves to the least-loaded worker if that one
        holds at least half a bound less. (Were every worker past its bound, a plain "least"
        would bounce a hot key between them item by item.)"""
        least = min(range(self.workers), key=loads.__getitem__)
        if loads[least] > loads[home] - limit / 2:
            return home
        self.moves += 1
        self.homes[key] = least
        return least
