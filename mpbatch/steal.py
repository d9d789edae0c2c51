"""Work stealing (caller process, the collector's role): a worker running dry takes queued work.

Routing commits items to a worker when their chunk is sealed, by the items queued there,
before anyone knows what they will cost: a run of costly items (hot keys) can leave one
worker with seconds of queued work while another has none. On every report the collector
(its thread, or an add_many() recording reports itself) calls ``Stealer.consider()``, which
looks for such a pair:

- a thief: a started worker with nothing queued behind the batch it runs, if any;
- a victim: the worker with the most queued, unstarted work, estimated as its queued items
  times its recent cost per item (costs.py), if that is at least STEAL_MIN_NS and an item
  costs at least ITEM_MIN_NS.

It asks the victim for half of its queued items by writing the victim's ``ask`` cell
(counters.py), and wakes the victim's reader thread with a byte on its drain pipe. The
victim answers with a RETURNED report naming items of its stream it has not started, which
it drops unrun: its reader, while do() runs, gives whole chunks still queued in its inlet
(worker._Loop._answer_while_busy); if none fits, its main thread answers between two
batches with the next items in stream order, held ones first (worker._Loop._hand_back).
The collector takes them from the victim's ledger (out of stream order when the reader
answered: the running batch reports after them) and routes them again, with no attempt
spent (recovery.Recovery.handed_back): the least-loaded worker is now the thief. They go
in chunks of one batch, or of a few short ones (batches_per_chunk), as add_many's blocks of
such items do (bulk.Bulk.batch_blocks), so that the thief's reader has whole chunks to give
in turn: the rest of a larger chunk would be its main thread's, given only when the batch
in do() ends.

The ledgers stay exact: items leave the victim's ledger only when its RETURNED report is
read, and enter the thief's before they are written to its pipe. A victim killed before it
reports still has them in its ledger, and they are re-sent as its orphans (only queued:
no attempt); a thief killed after they reached it has them in its own. ``accepted ==
succeeded + dead_lettered + pending`` holds throughout: a hand-back changes none of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from .counters import ASK, ASK_ITEMS, CELLS

if TYPE_CHECKING:
    from .costs import Costs

STEAL_MIN_NS = 40_000_000  # queued work a victim keeps without being asked (2x the Pacer's
# horizon: add_many queues ~20 ms, or a batch behind the one in do() (two under affinity),
# so only a misjudged run of costly items, or batches of 40 ms or more, make a victim: a
# dry worker then does better taking them than waiting)
ITEM_MIN_NS = 20_000  # cheaper items are never moved: re-sending one costs the caller ~1 us
CHUNK_NS = 5_000_000  # items worth moving travel in chunks of about this much work or less
SEQ_MASK = 0x7FFFFFFF  # ask numbers wrap here: ``seq << 32`` stays a positive int64


class Stealer:
    """When to ask which worker to hand work back; every method runs on the collector."""

    def __init__(self, costs: Costs, ready: list[bool],
                 wake: Callable[[int], None] = lambda i: None) -> None:
        self.costs = costs
        self.wake = wake  # the pool's: wakes worker i's reader thread, to answer now
        self.counters = counters = costs.counters
        self.workers = counters.workers
        self.ready = ready  # the pool's: READY seen from worker i's incarnation
        self.asking = [False] * self.workers  # an ask of worker i awaits its RETURNED
        self.seq = [0] * self.workers
        self.asks = 0  # requests written (tests and benchmarks read it)

    def consider(self) -> None:
        """Ask a victim for half its queued items if a thief is running dry (see module)."""
        self.costs.update()
        cost_of = self.costs.per_worker  # its own: a worker with no batch run is no victim
        thief = False
        victim, most = -1, float(STEAL_MIN_NS)
        for i in range(self.workers):
            cost = cost_of[i]
            queued = self._queued(i)
            if queued <= 0:
                thief = thief or self.ready[i]
            elif not self.asking[i] and cost >= ITEM_MIN_NS and queued * cost >= most:
                victim, most = i, queued * cost
        if thief and victim >= 0:
            self._ask(victim, self._queued(victim) // 2)

    def _queued(self, i: int) -> int:
        """Items sent to worker i and neither reported nor inside its running batch (racy
        reads of another process's cells: a hint, which is all routing needs)."""
        return self.counters.load(i) - max(0, self.counters.in_do(i)[1])

    def _ask(self, i: int, items: int) -> None:
        if items < 1:
            return
        self.seq[i] = seq = (self.seq[i] + 1) & SEQ_MASK or 1
        self.asking[i] = True
        self.asks += 1
        # One store of both halves: the worker never reads a new count with an old number.
        self.counters.cells[CELLS * i + ASK] = seq << 32 | min(items, ASK_ITEMS)
        self.wake(i)

    def answered(self, i: int) -> None:
        """Worker i's RETURNED report was read: it may be asked again."""
        self.asking[i] = False

    def forget(self, i: int) -> None:
        """Worker i died: its ask dies with it (its line is zeroed for the replacement)."""
        self.asking[i] = False


def batches_per_chunk(cost_ns: float, size: int) -> int:
    """Batches of ``size`` items costing ``cost_ns`` each to put in one chunk of items that
    may be stolen: one where a batch is CHUNK_NS of work or more, else as many as make
    CHUNK_NS. A chunk costs the caller ~20-30 us to route, pickle and write, and a reader
    hands back only whole chunks: one per batch of 20 us items would make the caller the
    bottleneck, while a thief waits at most a batch for a chunk of short ones anyway. A
    cost below ITEM_MIN_NS (0: not known) counts as ITEM_MIN_NS."""
    return max(1, math.ceil(CHUNK_NS / (size * max(cost_ns, ITEM_MIN_NS))))
