"""What an item costs on each worker, as its batches show it (caller process).

After each batch a worker adds the time it took to its WORK_NS cell, then its items to DONE;
items it hands back unrun go to GIVEN, also before DONE (counters.py). ``Costs.update()``
folds what changed since its last look into a cost per item for each worker and one over
all of them. Four readers use them:

- routing (dispatch.Router.least_loaded): a chunk goes to the worker with the least *work*
  queued ahead of it, its queued items (less those of the batch it is filling, which wait
  for the chunk) times its cost per item, not the fewest queued items: a worker whose
  queue is a run of costly items (hot keys) looks as busy as it is;
- add_many's pacing (dispatch.Pacer): about HORIZON_NS of work per worker, at the pooled
  cost;
- work stealing (steal.Stealer): the victim is the worker with the most queued work;
- routing="affinity" (affinity.py): a key's home is bounded by its queued work, at the
  worker's cost over all it has run (``steady()``, below), not its recent one; a batch in
  do() is stuck once it overruns that or the fastest worker's recent cost, whichever is
  higher, by the bound.

A worker's cost is what its recent batches cost, so it describes what it has queued as far
as the stream is clustered (the queue was filled at the same time). A batch still running
is a lower bound: once it has taken longer than the estimate says, its items cost at least
that much, so a worker stuck in a long ``do()`` does not keep looking cheap.

Reads of another process's cells are racy: a hint, which is all routing needs. One instance
is shared by the caller's threads and the collector: a sample lost to a race only delays
the estimate.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from .counters import CELLS, DONE, GIVEN, HELD, SENT, WORK_NS

if TYPE_CHECKING:
    from .counters import LoadCounters


class Costs:
    """ns per item, per worker (``of(i)``) and over all workers (``pooled``)."""

    def __init__(self, counters: LoadCounters) -> None:
        self.counters = counters
        self.workers = counters.workers
        self.per_worker = [0.0] * self.workers  # 0.0: nothing run yet by that incarnation
        self.pooled = 0.0  # 0.0: nothing run yet by any worker
        # (done, run, work_ns) at the last sample taken from each worker; run = done - given
        self._seen = [(0, 0, 0)] * self.workers
        # (work_ns, items) behind each worker's cost, halved at every sample: a sample
        # weighs as many items as it saw, so a batch of a few items (a flush, the tail of
        # a stream), whose fixed cost per batch falls on those few, barely moves it
        self._recent = [(0.0, 0.0)] * self.workers

    def update(self) -> None:
        """Fold the batches every worker finished since the last look into the estimates.

        A look that saw any batch of a worker end is one sample for that worker, weighed by
        its items; the pooled cost takes one sample per look (all workers' new time over
        all their new items), so a look that saw no batch end changes nothing.
        """
        cells, seen, recent = self.counters.cells, self._seen, self._recent
        work = ran = 0
        for i in range(self.workers):
            base = CELLS * i
            # DONE first: a worker adds WORK_NS (and GIVEN) before DONE, so a batch counted
            # here has its time counted too.
            d = cells[base + DONE]
            r = d - cells[base + GIVEN]
            w = cells[base + WORK_NS]
            d_was, r_was, w_was = seen[i]
            if d < d_was:  # a replacement's line, zeroed: a new baseline, a new cost
                self.forget(i, seen=(d, r, w))
            elif r > r_was and w > w_was:
                kept_w, kept_r = recent[i]
                recent[i] = kept = (kept_w / 2 + (w - w_was), kept_r / 2 + (r - r_was))
                self.per_worker[i] = kept[0] / kept[1]
                seen[i] = (d, r, w)
                ran += r - r_was
                work += w - w_was
            # else nothing ran since, or GIVEN was read between the worker's writes of GIVEN
            # and DONE (run dips for a moment): keep the baseline, take no sample
        if ran:
            sample = work / ran
            self.pooled = sample if not self.pooled else (self.pooled + sample) / 2

    def of(self, i: int) -> float:
        """Worker i's cost per item; the pooled one while its own is unknown (0.0: none)."""
        return self.per_worker[i] or self.pooled

    def forget(self, i: int, seen: tuple[int, int, int] = (0, 0, 0)) -> None:
        """Worker i died: its replacement's cost is not known yet."""
        self.per_worker[i] = 0.0
        self._recent[i] = (0.0, 0.0)
        self._seen[i] = seen

    def current(self) -> list[float]:
        """Each worker's cost per item now, with the estimates brought up to date first: its
        own (the pooled one while its own is unknown), raised to what the batch it has in
        do() has cost so far per item when that is more. All 0.0 while nothing has been
        measured: compare queued items then (a time is no match for a count of items)."""
        self.update()
        pooled = self.pooled
        if not pooled:
            return [0.0] * self.workers
        in_do, per_worker, now = self.counters.in_do, self.per_worker, time.monotonic_ns()
        out = []
        for i in range(self.workers):
            cost = per_worker[i] or pooled
            began, inside = in_do(i)
            # the batch in do() so far: its items cost at least this much each
            if inside > 0 and now - began > cost * inside:
                cost = (now - began) / inside
            out.append(cost)
        return out

    def steady(self) -> list[float]:
        """Each worker's cost per item over all its incarnation has run (the pooled one
        while it has run nothing); all 0.0 while nothing has been measured.

        Affinity bounds a key's home by it. The recent cost jumps with every batch that
        warmed a key up, and so does current()'s floor, the batch in do(): each jump of a
        home's bound moved keys, each move a warm-up more (27-35 moves on
        benchmarks/keyed.py against 10-14).
        """
        self.update()
        pooled = self.pooled
        # The cells at the last sample taken from a worker are its incarnation's totals.
        return [w / r if r > 0 else pooled for _, r, w in self._seen]

    def least(self, fill: bool = True) -> int:
        """The worker with the least work queued ahead of a new chunk: items sent and not
        done, less those of the batch it is filling, times its cost per item now
        (``current()``); of equals, the one whose batch is fullest, then the lowest index.
        O(workers). ``fill=False`` (a solo chunk, which runs after what is held, alone):
        the held items count as work ahead, and the batch is not filled.

        A batch being filled runs no sooner than the items that join it: its items wait
        for them. Counted as queued work, they kept their worker from the very items that
        would fill it, so under a steady stream each worker filled a batch of its own at a
        share of the rate (tests/test_routing.py: two workers, items sent one at a time,
        each held half a batch and neither ran). At 20,000 items/s with size=500 items
        waited a median 28 ms for their results, 23 ms once batches fill one at a time
        (benchmarks/fill.py; results/2026-12-08-0749e62-fill.json).
        """
        cells, best, best_key = self.counters.cells, 0, (0.0, 0)
        for i, cost in enumerate(self.current()):
            base = CELLS * i
            # Racy reads of another process's cells, a hint, in this order: items leave
            # HELD (the batch runs) before they reach DONE, so DONE read first never loses
            # them twice (they may count as queued for a moment: too many, not too few).
            done = cells[base + DONE]
            held = cells[base + HELD] if fill else 0
            queued = max(0, cells[base + SENT] - done - held)
            key = (queued * (cost or 1.0), -held)
            if i == 0 or key < best_key:
                best, best_key = i, key
        return best
