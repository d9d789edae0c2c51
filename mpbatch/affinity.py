"""routing="affinity" (caller process): each key has a home worker, and moves when it is busy.

A key goes to its home, the worker that took it last, so that state a worker keeps per key
(a model, a connection, a warmed cache: see Batcher's ``init``) stays warm. While the
home's queued work is under ``spill_after`` seconds the key stays; past it, the key goes to
the least-loaded worker, which becomes its new home, if that worker holds at least half
the bound less (so a key that keeps every worker past its bound moves in runs, not item
by item). So a hot key does not pin one worker as under "key", and a cold key is not
scattered over every worker as under "least-loaded".

Two kinds of key are placed otherwise, judged by their share of the last window of items
(WINDOW of them; the first is FIRST_WINDOW and each next one twice the last, so that a key
too hot for one worker is found within the first few hundred items, not after it has dragged
its home past the bound and moved a few times with the keys around it):
- a key too hot for one worker (a share above 1/workers) has no home that could keep up:
  its items go to the least-loaded worker one by one, and every worker keeps it warm, while
  the other keys stay where they are (moving the hot key from home to home cost a warm-up
  of every key it displaced, each time);
- a new key goes to the least-loaded worker or one within half a bound of it, whichever is
  home to the fewest busy keys (a share of BUSY or more): warm slots are spread, not
  stacked where the hot keys already live.

Queued work is read from the shared-memory counters (items sent and not done, times the
worker's cost per item over all it has run: costs.py, ``steady``) plus the items waiting in
the caller's open chunk for that worker. The bound is never under four batches of items
(add_many's pacing keeps three queued on a worker anyway); before any batch has ended no
cost is known, and it is those four. A worker whose batch in do() has overrun its estimate (at
the fastest worker's recent cost, when that is higher: a slowed machine stretches every
batch) by more than the bound is stuck: its keys move to a worker that is not, and no key
goes to it while another is free. A worker is not judged so before it has ended four
batches or run four batches' worth of items: its first batches warm keys up beside a caller
that is filling every queue, and one overran by the bound with nothing wrong. Per-key order
is not promised:
a key that moves may run on its new home before its last items finish on the old one.
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from typing import TYPE_CHECKING

from .counters import BATCHES, CELLS, DONE, GIVEN, SENT
from .dispatch import SPREAD_PACED_BATCHES

if TYPE_CHECKING:
    from .costs import Costs
    from .counters import LoadCounters
    from .intake import OpenChunk

SPILL_AFTER = 0.05  # s of queued work on its home before a key moves (the default)
WINDOW = 2048  # items in the longest window: keys' shares are counted over one, then anew
FIRST_WINDOW = 256  # items in the first window; each next one is twice the last, to WINDOW
BUSY = 0.02  # a key with this share of the last window holds a warm slot on its home


class Affinity:
    """Homes of keys, and the choice to keep a key at home or move it."""

    HOMES_MAX = 65_536  # bounded: a stream of distinct keys must not grow memory

    def __init__(self, counters: LoadCounters, costs: Costs, batch_items: int,
                 spill_after: float) -> None:
        self.counters = counters
        self.costs = costs
        self.workers = counters.workers
        self.bound_ns = spill_after * 1e9
        # Never under a batch more than add_many's pacing keeps queued on a worker
        # (dispatch.Pacer): a home holding that is not overloaded, and a batch cannot form
        # with fewer items queued. Under it, a machine shared with other work (each item
        # slower, so fewer items to the bound) put homes past it in the ordinary run of
        # things: on benchmarks/keyed.py beside a busy loop, 21 and 400 moves (157 and 429
        # warm-ups) in two runs, against 8 and 22 (147 and 267) with it. It is also the
        # bound while a worker's cost is unknown.
        self.least_items = (SPREAD_PACED_BATCHES + 1) * batch_items
        self.homes: dict[Hashable, int] = {}
        # The open chunks of Intake, one per worker (the same list): their items are
        # queued work too, though no counter has them yet.
        self.waiting: list[OpenChunk] = []
        self.moves = 0  # keys that left a home for another worker
        self.counts: dict[Hashable, int] = {}  # items per key in the current window
        self.seen = 0  # items in the current window
        self.window = FIRST_WINDOW  # items the current window counts
        self.hot: frozenset = frozenset()  # keys above 1/workers of the last window
        self.busy = [0] * self.workers  # busy keys homed on each worker, last window

    def limits(self) -> list[float]:
        """Items each worker may have queued before its keys move: ``spill_after`` of work
        at its cost, never under ``least_items`` (also the bound while no cost is known);
        0.0, stuck, on a worker whose batch in do() has overrun its estimate by more than
        the bound (its queue waits that long at least). A batch that warmed a few keys up
        overruns by less; were any overrun enough, each would move keys, each move a
        warm-up more. A worker is never stuck in its first batches, until it has ended
        four or run ``least_items``: on benchmarks/keyed.py a first batch of 100 items
        took 93 ms against an estimate of 12 (its keys warmed up while the caller filled
        every queue), and its keys moved away and back."""
        in_do, bound, now = self.counters.in_do, self.bound_ns, time.monotonic_ns()
        steady = self.costs.steady()  # brings the recent costs up to date too
        least = self.least_items
        out = []
        for i, cost in enumerate(steady):
            began, inside = in_do(i)
            # (inside <= 0: the batch ended between the reads; nothing to set it against.)
            if (began and cost and inside > 0 and now - began - cost * inside > bound
                    and now - began - self._pace() * inside > bound and self._seasoned(i)):
                out.append(0.0)
            else:
                out.append(max(bound / cost, least) if cost else least)
        return out

    def _seasoned(self, i: int) -> bool:
        """Worker i is past its first batches: it has ended four, or run ``least_items``
        (its counters, this incarnation's). Read only for a batch that has overrun."""
        base = CELLS * i
        cells = self.counters.cells
        ran = cells[base + DONE] - cells[base + GIVEN]
        return ran >= self.least_items or cells[base + BATCHES] > SPREAD_PACED_BATCHES

    def _pace(self) -> float:
        """The machine's pace lately: the fastest worker's recent cost (0.0: none known).
        A machine shared with other work stretches every batch; keys moved off a worker no
        slower than the rest gain nothing and cost a warm-up each. A worker slowed alone
        (its keys grew costly) is judged at its own steady cost: its keys may run faster
        elsewhere. Read only for a batch that has overrun its steady estimate already."""
        return min((c for c in self.costs.per_worker if c), default=0.0)

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
        limits, loads = self.limits(), self.loads()
        # Workers not stuck in an overrun batch: the only ones keys go to, unless all are.
        free = [i for i in range(self.workers) if limits[i]] or list(range(self.workers))
        out: list[int] = []
        start = 0
        while True:  # a window that ends inside the block judges the rest of it
            room = self.window - self.seen
            if room <= 0:  # another thread's block filled it (add_many runs unlocked)
                self._new_window()
                continue
            stop = start + room
            part = keys[start:stop] if start or stop < len(keys) else keys
            self._place(part, loads, limits, free, out)
            self.seen += len(part)
            if self.seen >= self.window:
                self._new_window()
            if stop >= len(keys):
                return out
            start = stop

    def _place(self, keys: list, loads: list[int], limits: list[float], free: list[int],
               out: list[int]) -> None:
        """Append the worker for each of ``keys`` to ``out``, counting each on ``loads``."""
        homes, counts, hot = self.homes, self.counts, self.hot
        for key in keys:
            counts[key] = counts.get(key, 0) + 1
            if key in hot:
                home = min(free, key=loads.__getitem__)
            else:
                home = homes.get(key)
                if home is None:
                    home = self._settle(key, loads, limits, free)
                elif loads[home] >= limits[home]:
                    home = self._move(key, home, loads, limits, free)
            loads[home] += 1
            out.append(home)

    def _new_window(self) -> None:
        """Judge the keys by their shares of the window that ends now, and start another."""
        counts, seen, homes = self.counts, self.seen, self.homes
        self.hot = frozenset(k for k, c in counts.items() if c * self.workers > seen)
        busy = [0] * self.workers
        for key, c in counts.items():
            home = homes.get(key)
            if home is not None and c >= BUSY * seen and key not in self.hot:
                busy[home] += 1
        self.busy = busy
        self.counts, self.seen = {}, 0
        self.window = min(2 * self.window, WINDOW)

    def _settle(self, key: Hashable, loads: list[int], limits: list[float],
                free: list[int]) -> int:
        """A key without a home: of the free workers within half a bound of the least-loaded
        of them, the one home to the fewest busy keys becomes it."""
        if len(self.homes) >= self.HOMES_MAX:
            self.homes.clear()  # homes are a hint: losing them costs warm-ups, not items
        least = min(loads[i] for i in free)
        near = [i for i in free if loads[i] - least <= limits[i] / 2]
        home = self.homes[key] = min(near, key=lambda i: (self.busy[i], loads[i]))
        return home

    def _move(self, key: Hashable, home: int, loads: list[int], limits: list[float],
              free: list[int]) -> int:
        """The key's home is past its bound: it moves to the least-loaded free worker if
        that one holds at least half a bound less (were every worker past its bound, a plain
        "least" would bounce a hot key between them item by item), or at once if its home
        is stuck in an overrun batch (nothing runs there until that batch ends)."""
        limit = limits[home]
        if not limit and home in free:  # every worker is stuck: moving gains nothing
            return home
        least = min(free, key=loads.__getitem__)
        # least == home: the home is the least-loaded free worker; the key stays, and it
        # is no move
        if least == home or (limit and loads[least] > loads[home] - limit / 2):
            return home
        self.moves += 1
        self.homes[key] = least
        return least
