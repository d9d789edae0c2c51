"""Stats: a frozen snapshot of the Batcher's counters (caller process)."""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class Stats:
    """What the Batcher has done so far; ``accepted == succeeded + dead_lettered + pending``
    (``+ cancelled``, which only mpbatch.run() makes nonzero)."""

    accepted: int
    """Items taken by add()/submit()/add_many()."""
    succeeded: int
    """Items whose batch returned without error."""
    dead_lettered: int
    """Items that ran out of attempts (or could never run); see dead_letters()."""
    cancelled: int
    """Items cancelled before they started (mpbatch.run() after a Ctrl-C); 0 otherwise."""
    pending: int
    """Items accepted whose outcome is not known yet."""
    batches: int
    """Batch reports: do() calls that returned or raised, and chunks that failed to unpickle."""
    retries: int
    """Items sent again after a failed attempt (one item tried 3 times counts 2)."""
    worker_restarts: int
    """Workers started to replace one that died, timed out or was recycled."""
    failed_attempts: int
    """Items whose attempt failed (do raised, bad shape, timeout, death inside do)."""
    redelivered: int
    """Items re-sent after their worker died before handing them to do (no attempt spent)."""
    splits: int
    """Crashed batches split in two by poison-item isolation (see isolate_poison)."""
    recycled: int
    """Workers replaced on purpose: max_batches_per_worker or max_rss reached."""
    stolen: int
    """Items a busy worker handed back unstarted, to run on one running dry (``steal``);
    no attempt spent."""
    workers: int
    """Worker processes the Batcher runs."""


class BatchLog:
    """Sizes and do() times of the batches so far, in bounded memory (collector thread).

    Counts per size are exact while there are at most SIZES distinct sizes (a stream has
    few: ``size``, and what interval or a flush cut short); do() times are a uniform sample
    of at most SAMPLE batches (reservoir sampling), the largest kept exactly.
    """

    SIZES = 4096
    SAMPLE = 8192

    def __init__(self) -> None:
        self.count = 0
        self.sizes: dict[int, int] = {}  # items in a batch -> batches of that size
        self.times_ns: list[int] = []  # sample of do() times
        self.max_ns = 0
        self._rng = random.Random(0)

    def add(self, n: int, ns: int) -> None:
        self.count += 1
        if n in self.sizes or len(self.sizes) < self.SIZES:
            self.sizes[n] = self.sizes.get(n, 0) + 1
        self.max_ns = max(self.max_ns, ns)
        if len(self.times_ns) < self.SAMPLE:
            self.times_ns.append(ns)
        else:
            j = self._rng.randrange(self.count)
            if j < self.SAMPLE:
                self.times_ns[j] = ns


class Accounts:
    """The live counters behind Stats, and the condition that flush()/add() wait on.

    Writers: the caller (sealing chunks) and the collector (outcomes), under ``lock``. An
    outcome is counted after its callback returned, so flush() waits for callbacks too.
    """

    def __init__(self) -> None:
        # Re-entrant: a chunk rejected while sealing (the caller holds the lock) settles too.
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)  # an outcome landed, or a state change
        self.sealed = 0  # accepted items that left the caller's open chunks
        self.outstanding = 0  # sealed items without an outcome: sealed - succeeded - dead
        self.succeeded = 0
        self.dead_lettered = 0
        self.cancelled = 0
        self.batches = 0
        self.retries = 0
        self.worker_restarts = 0
        self.failed_attempts = 0
        self.redelivered = 0
        self.splits = 0
        self.recycled = 0
        self.stolen = 0
        self.unresolved: dict[int, int] = {}  # flush epoch -> items without an outcome
        self.waiters = 0  # threads inside changed.wait(); skip notify when none
        self.flushing_through = -1  # a flush() waits for the epochs up to this one
        self.batch_log = BatchLog()  # written by the collector only: no lock

    def seal(self, n: int, epoch: int) -> None:
        """n items of ``epoch`` left an open chunk (hold ``lock``)."""
        self.sealed += n
        self.outstanding += n
        self.unresolved[epoch] = self.unresolved.get(epoch, 0) + n

    def settle(self, epochs: list[tuple[int, int]], ok: bool, batches: int = 0,
               cancelled: bool = False) -> None:
        """(epoch, n) pairs reached an outcome: succeeded if ``ok``, else dead-lettered (or
        ``cancelled``)."""
        with self.lock:
            self.batches += batches
            total = 0
            for epoch, n in epochs:
                total += n
                left = self.unresolved[epoch] - n
                if left:
                    self.unresolved[epoch] = left
                else:
                    del self.unresolved[epoch]
            self.outstanding -= total
            if ok:
                self.succeeded += total
            elif cancelled:
                self.cancelled += total
            else:
                self.dead_lettered += total
            if self.waiters:
                self.changed.notify_all()

    def bump(self, **counts: int) -> None:
        with self.lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def wake(self) -> None:
        """A worker's load fell without an outcome (a failed attempt, a respawn): waiters
        that pace by load look again."""
        with self.lock:
            if self.waiters:
                self.changed.notify_all()

    def snapshot(self, unsealed: int, workers: int) -> Stats:
        """Stats now, counting ``unsealed`` items still in open chunks (hold ``lock``)."""
        accepted = self.sealed + unsealed
        return Stats(
            accepted=accepted, succeeded=self.succeeded, dead_lettered=self.dead_lettered,
            cancelled=self.cancelled,
            pending=accepted - self.succeeded - self.dead_lettered - self.cancelled,
            batches=self.batches,
            retries=self.retries, worker_restarts=self.worker_restarts,
            failed_attempts=self.failed_attempts, redelivered=self.redelivered,
            splits=self.splits, recycled=self.recycled, stolen=self.stolen,
            workers=workers)

    def settled_through(self, epoch: int) -> bool:
        """Every item of epochs <= ``epoch`` has an outcome (hold ``lock``)."""
        return not self.unresolved or min(self.unresolved) > epoch
