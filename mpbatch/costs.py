"""What an item costs on each worker, as its batches show it (caller process).

A worker adds the time each batch took to its WORK_NS cell, then the batch's items to DONE,
and items it handed back unrun to GIVEN (counters.py). ``Costs.update()`` folds what changed
since its last look into a smoothed cost per item for each worker and one over all of
them. Three readers weigh queued items by it:

- routing (dispatch.Router.least_loaded): a chunk goes to the worker with the least queued
  *work*, its queued items times its cost per item, not the fewest queued items: a worker
  whose queue is a run of costly items (hot keys) looks as busy as it is;
- add_many's pacing (dispatch.Pacer): about HORIZON_NS of work ahead of that worker;
- work stealing (steal.Stealer): the victim is the worker with the most queued work.

A worker's cost is what its recent batches cost, so it describes what it has queued as far
as the stream is clustered (the queue was filled at the same time). Reads of another
process's cells are racy: a hint, which is all routing needs. One instance is shared by
the caller's threads and the collector: a sample lost to a race only delays the estimate.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .counters import CELLS, DONE, GIVEN, SENT, WORK_NS

if TYPE_CHECKING:
    from .counters import LoadCounters


class Costs:
    """Smoothed ns per item, per worker (``of(i)``) and over all workers (``pooled``)."""

    def __init__(self, counters: LoadCounters) -> None:
        self.counters = counters
        self.workers = counters.workers
        self.per_worker = [0.0] * self.workers  # 0.0: nothing run yet by that incarnation
        self.pooled = 0.0  # 0.0: nothing run yet by any worker
        # (done, run, work_ns) at the last sample taken from each worker; run = done - given
        self._seen = [(0, 0, 0)] * self.workers

    def update(self) -> None:
        """Fold the batches every worker finished since the last look into the estimates.

        Each batch is one sample for its worker; the pooled cost takes one sample per look
        (all workers' new time over all their new items), so a look that saw no batch end
        changes nothing.
        """
        cells, seen, per_worker = self.counters.cells, self._seen, self.per_worker
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
                seen[i] = (d, r, w)
                per_worker[i] = 0.0
            elif r > r_was and w > w_was:
                sample = (w - w_was) / (r - r_was)
                per_worker[i] = sample if not per_worker[i] else (per_worker[i] + sample) / 2
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

    def forget(self, i: int) -> None:
        """Worker i died: its replacement's cost is not known yet."""
        self.per_worker[i] = 0.0
        self._seen[i] = (0, 0, 0)

    def least(self) -> int:
        """The worker with the least queued work (the lowest index of equals), with the
        estimates brought up to date first: items sent and not done, times the worker's
        cost per item (items alone while no cost is known); O(workers)."""
        self.update()
        cells, per_worker, pooled = self.counters.cells, self.per_worker, self.pooled or 1.0
        best, best_work = 0, 0.0
        for i in range(self.workers):
            base = CELLS * i
            work = (cells[base + SENT] - cells[base + DONE]) * (per_worker[i] or pooled)
            if i == 0 or work < best_work:
                best, best_work = i, work
        return best
