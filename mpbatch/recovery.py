"""Recovery (caller process, the collector's role): failed attempts, retries, deaths, timeouts.

A failed attempt reaches it from whoever holds the collector's role lock (the collector
thread, or an add_many() recording reports itself); deaths and retries due come from the
collector thread alone.

A failed attempt (do() raised, returned a bad shape, its results did not unpickle) charges
every item of the batch; those with attempts left wait ``retry_backoff * 2**n`` (jittered)
in a heap and go out again as a batch of their own, the rest are dead-lettered. A death
splits what the dead worker held at the cut the worker left in shared memory: items inside
do() are isolated (poison-item isolation: halves re-run on their own, within a budget) or
charged an attempt; items only queued are re-sent with none spent. Workers that keep dying
before they take items, or a replacement that cannot be created, stop the Batcher: from
then on every item gets that reason as its outcome.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import transport as tp
from .counters import B_END, B_START, BUSY_NS, LoadCounters
from .dispatch import Dispatcher
from .errors import BatchTimeout, Closed, WorkerDied, shown, signal_name
from .ledger import Isolation, Segment, WorkerLedger, halves, split_at
from .lifecycle import Pool
from .outcomes import Outcomes
from .stats import Accounts
from .steal import batches_per_chunk
from .worker import EXIT_RECYCLED

if TYPE_CHECKING:
    from .options import Options

MAX_START_FAILURES = 3  # workers in a row that died before READY: stop respawning
MAX_BACKOFF = 30.0  # seconds; the cap of one retry's wait


@dataclass
class Orphans:
    """What a dead worker held, split at the batch that was inside do() when it died."""

    inside: list[Segment]
    """Items inside do(): they spent an attempt (or are isolated)."""
    queued: list[Segment]
    """Items only queued there: re-sent with no attempt spent."""
    restarted: bool
    """A replacement worker started."""


class Recovery:
    """Retries, poison isolation, deaths and timeouts of one Batcher's workers."""

    def __init__(self, pool: Pool, counters: LoadCounters, dispatcher: Dispatcher,
                 accounts: Accounts, options: Options, outcomes: Outcomes) -> None:
        self.pool = pool
        self.counters = counters
        self.dispatcher = dispatcher
        self.accounts = accounts
        self.options = options
        self.outcomes = outcomes
        self.broken: BaseException | None = None  # set when workers cannot start
        # broken, and every item held when it broke has its outcome: flush() may return
        self.halted = False
        self.on_broken: Callable[[], None] = lambda: None  # the Batcher stops taking items
        self.stopping = False  # close() is stopping the workers: no replacements
        self.stop_error: BaseException | None = None  # why items left at stop fail
        self.cancelling = False  # run()'s Ctrl-C: what is not inside do() is cancelled
        self._retries: list[tuple[int, int, list[Segment]]] = []  # (due_ns, tie, segments)
        self._tie = itertools.count()
        self._timed_out: dict[Any, BatchTimeout] = {}  # worker process -> why it was killed
        self.init_errors: dict[int, BaseException] = {}  # worker -> why its init() failed
        self.start_failures = 0  # workers in a row that died before READY

    # -- failed attempts and retries ------------------------------------------------------

    def attempt_failed(self, segments: list[Segment], error: BaseException,
                       worker: int | None) -> None:
        retry, dead = [], []
        for seg in segments:
            seg.attempts += 1
            (retry if seg.attempts < self.options.max_attempts else dead).append(seg)
        self.accounts.bump(failed_attempts=sum(len(s) for s in segments))
        if retry:
            attempt = max(s.attempts for s in retry)
            delay = self.options.retry_backoff * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)
            due = time.monotonic_ns() + int(min(delay, MAX_BACKOFF) * 1e9)
            heapq.heappush(self._retries, (due, next(self._tie), retry))
        if dead:
            self.outcomes.dead_letter(dead, error, worker)

    def next_retry_ns(self) -> int | None:
        """When the next retry is due."""
        return self._retries[0][0] if self._retries else None

    def send_due_retries(self, now: int) -> None:
        if self.cancelling:
            while self._retries:
                self.outcomes.cancelled(heapq.heappop(self._retries)[2])
            return
        while self._retries and self._retries[0][0] <= now:
            _, _, segments = heapq.heappop(self._retries)
            self._resend(segments, solo=True)

    def _crashed(self, segments: list[Segment], error: BaseException, worker: int) -> None:
        """A batch killed its worker or timed out: isolate the culprit, or charge attempts."""
        n = sum(len(s) for s in segments)
        if not self.options.isolate_poison or n < 2 or self.cancelling:
            self.attempt_failed(segments, error, worker)
            return
        budget = segments[0].isolation or Isolation(n)
        if not budget.spend():
            self.attempt_failed(segments, error, worker)
            return
        for seg in segments:
            seg.isolation = budget
        self.accounts.bump(splits=1)
        for half in halves(segments):
            self.dispatcher.send_routed(half, solo=True)

    def handed_back(self, segments: list[Segment], cost_ns: float) -> None:
        """Items a worker handed back unstarted (steal.py), each costing about ``cost_ns``
        there: routed again, no attempt spent."""
        if self.stopping:  # close() gave up on what is held (timeout, a second Ctrl-C)
            self.outcomes.dead_letter(segments, self.stop_error or Closed("the Batcher closed"),
                                      None)
            return
        # FULL: they go to a worker running dry, which runs them at once; held for more
        # items, a part batch would wait out what is left of its interval there. Each piece
        # is FULL: one that waited for the next would wait out that interval if the thief's
        # reader gave the next back (and a worker that held items of its own runs them as
        # a batch of their own, once).
        # A chunk per batch (a few short ones): that worker's reader can give them back.
        size = self.options.batch_items
        self._resend(segments, solo=False, stat="stolen", full=True,
                     batch=(size, self.options.max_bytes, batches_per_chunk(cost_ns, size)))

    def _resend(self, segments: list[Segment], solo: bool, stat: str | None = None,
                full: bool = False, batch: tuple[int, int | None, int] | None = None) -> None:
        if self.cancelling:
            self.outcomes.cancelled(segments)
            return
        if self.broken is not None:
            self.outcomes.dead_letter(segments, self.broken, None)
            return
        n = sum(len(s) for s in segments)
        self.accounts.bump(**{stat or ("retries" if solo else "redelivered"): n})
        workers = self.dispatcher.send_routed(segments, solo, full, batch)
        if not solo and min(s.epoch for s in segments) <= self.accounts.flushing_through:
            # A flush() waits for these: the FLUSH it sent went to the dead worker.
            for i in workers:
                self.dispatcher.flush(i)

    # -- timeouts and deaths --------------------------------------------------------------

    def kill_overdue(self) -> None:
        """Kill every worker whose do() has run past timeout=.

        The collector calls it on its timer, and so does a thread writing to a full item
        pipe while it waits (Pool.on_stall): that writer may hold the locks the collector's
        loop needs. Such a thread may run it while the collector replaces a dead worker:
        so it reads the process first and kills that process, never a replacement.
        """
        if self.options.timeout is None:
            return
        now = time.monotonic_ns()
        limit = int(self.options.timeout * 1e9)
        for i in range(self.pool.workers):
            proc = self.pool.procs[i]
            busy = self.counters.get(i, BUSY_NS)
            if not busy or now - busy <= limit or proc in self._timed_out:
                continue
            if self.pool.procs[i] is not proc:
                continue  # replaced since: ``busy`` may have been the dead one's
            # setdefault: of two threads here at once, one message is kept; both kill
            self._timed_out.setdefault(proc, BatchTimeout(
                f"do() ran longer than timeout={self.options.timeout:g}s on worker {i} "
                f"(pid {proc.pid}); the worker was killed and replaced"))
            self.pool.kill_process(proc)

    def take_orphans(self, i: int, proc: Any) -> Orphans:
        """Worker i died (reaped, its last reports read): empty its ledger, start its
        replacement (or stop the Batcher), and say what it held."""
        with self.pool.send_locks[i]:
            cut = (self.counters.get(i, B_START), self.counters.get(i, B_END))
            inside, queued = _orphans(self.dispatcher.ledgers[i].take_all(), cut)
            self.dispatcher.ledgers[i] = WorkerLedger()
            self.counters.reset(i)
            restart = self._note_start(i, self.pool.ready[i], proc.exitcode)
            requeued = 0
            if restart:
                restart = self._replace(i)
                self.dispatcher.defined[i] = 0  # the replacement has no definitions yet
                # Only queued (recycled, or killed between batches): they keep their place
                # ahead of later adds. A crashed batch's items go first, the long way.
                if restart and queued and not inside and self._requeue(i, queued):
                    requeued, queued = sum(len(s) for s in queued), []
        self.accounts.wake()
        if requeued:  # outside the send lock, like every use of the Batcher's lock here
            self.accounts.bump(redelivered=requeued)
        if restart:
            recycled = int(proc.exitcode == EXIT_RECYCLED)
            self.accounts.bump(worker_restarts=1, recycled=recycled)
        return Orphans(inside, queued, restart)

    def halt_if_broken(self, orphans: Orphans) -> None:
        """No replacement started because the Batcher stopped: stop everything (once)."""
        if not orphans.restarted and self.broken is not None and self.dispatcher.stopped is None:
            self._halt(self.broken)

    def mark_halted(self) -> None:
        """After a death: if the Batcher stopped, every item it held has its outcome now,
        and a flush() waiting on the stop may return."""
        if self.broken is not None and not self.halted:
            self.halted = True
            self.accounts.wake()

    def _halt(self, error: BaseException) -> None:
        """The Batcher stops (workers cannot start): no send is taken from now on, and
        everything held gets ``error``."""
        # Set before the ledgers are emptied: a send either finds it set (under its worker's
        # send lock) and is dead-lettered, or it got that lock first, and what it recorded
        # is taken below.
        self.dispatcher.stopped = error
        self.on_broken()
        self._fail_everything(error, locked=True)

    def _note_start(self, i: int, started: bool, exitcode: int | None) -> bool:
        """Whether to replace worker i; after repeated start failures, stop for good."""
        if self.stopping or self.broken is not None:
            return False
        if started:
            return True
        self.start_failures += 1
        if self.start_failures < MAX_START_FAILURES:
            return True
        cause = self.init_errors.get(i)
        why = str(cause) if cause is not None else f"it exited with {signal_name(exitcode)}"
        if cause is None and exitcode is None:  # a Ray actor: no exit code is reported
            why = "its actor died; Ray does not report an exit code"
        self.broken = WorkerDied(
            f"{MAX_START_FAILURES} workers in a row died before taking items (worker {i}: "
            f"{why}), so the Batcher stopped; {self._start_advice(cause, exitcode)}, then "
            f"create a new Batcher", None, exitcode)
        return False

    def _start_advice(self, cause: BaseException | None, exitcode: int | None) -> str:
        if cause is None and exitcode == 1 and self.pool.start_method in ("spawn", "forkserver"):
            # Died in multiprocessing's bootstrap, before our code ran: under spawn and
            # forkserver that is where a child imports the caller's main module.
            return (f"under {self.pool.start_method} each worker first imports your main "
                    f"module; if that import fails, or starts a Batcher itself (no "
                    f"`if __name__ == \"__main__\":` guard), every worker dies so (the worker's "
                    f"traceback is on stderr): fix that")
        return "fix init= or the environment"

    def _replace(self, i: int) -> bool:
        """Start worker i's replacement (hold send_locks[i]); False if it cannot start (no
        file descriptors, no memory): the Batcher stops, and what it holds is dead-lettered
        with the reason, rather than lost with a dead worker's pipes."""
        try:
            self.pool.start(i)
        except Exception as exc:
            self.broken = WorkerDied(
                f"a replacement for worker {i} could not be started ({type(exc).__name__}: "
                f"{exc}); the Batcher stopped: free the resource and create a new Batcher",
                None, None)
            return False
        return True

    def _requeue(self, i: int, queued: list[Segment]) -> bool:
        """Send items only queued in dead worker i to its replacement, in their order,
        before the send lock lets an add() in: a recycled worker (max_batches_per_worker)
        must not reorder a key under routing="key" (hold send_locks[i]).

        False for other routings (order is not promised there, and the least-loaded worker
        may be another), or if an item no longer pickles: the caller then re-sends them the
        long way, which rejects that item (and takes the Batcher's lock, not allowed here).
        """
        if self.dispatcher.router.routing != "key":
            return False
        try:
            frame = self.dispatcher.chunk_of(queued)
        except BaseException:  # a value's __reduce__ is user code: even SystemExit
            return False
        self.dispatcher.send_held(i, queued, frame)
        if min(s.epoch for s in queued) <= self.accounts.flushing_through:
            self.pool.send(i, tp.FLUSH_WIRE)  # a flush() waits for them: its FLUSH was lost
        return True

    def place_orphans(self, i: int, proc: Any, orphans: Orphans) -> None:
        """Items a dead worker held and no replacement took: inside do() spent an attempt;
        the rest are re-sent."""
        inside, queued = orphans.inside, orphans.queued
        timed_out = self._timed_out.pop(proc, None)
        if self.stopping:  # close() gave up on them (timeout or a second Ctrl-C)
            self.outcomes.dead_letter(inside + queued,
                                      self.stop_error or Closed("the Batcher closed"), None)
            return
        if self.broken is not None:  # nobody will run them: the Batcher stopped
            self.outcomes.dead_letter(inside + queued, self.broken, None)
            return
        if inside:
            self._crashed(inside, timed_out or self._death_error(i, proc, inside), i)
        if queued:
            self._resend(queued, solo=False)

    def _death_error(self, i: int, proc: Any, inside: list[Segment]) -> WorkerDied:
        n = sum(len(s) for s in inside)
        keys = _distinct([k for s in inside for k in s.keys])
        names = ", ".join(shown(k) for k in keys[:2])
        if len(keys) > 2:
            names += f", +{len(keys) - 2} more"
        attempt = max(s.attempts for s in inside) + 1
        how = signal_name(proc.exitcode)
        verb = f"was killed by {how}" if proc.exitcode and proc.exitcode < 0 else f"exited ({how})"
        if proc.exitcode is None:  # a Ray actor (raypool.py)
            verb = "died (Ray does not report an actor's exit code or signal)"
        hint = ("; a SIGKILL with no traceback is typical of the OOM killer: try a smaller size= "
                "or max_bytes=" if proc.exitcode == -9 else "")
        return WorkerDied(
            f"worker {i} (pid {proc.pid}) {verb} while running a batch of {n} items "
            f"(keys {names}), "
            f"attempt {attempt} of {self.options.max_attempts}{hint}", proc.pid, proc.exitcode)

    def _fail_everything(self, error: BaseException, locked: bool = False) -> None:
        """Dead-letter every item held. ``locked``: take each ledger under its worker's send
        lock (senders may still be running); dead-letter outside it (settling takes the
        Batcher's lock, and add_many takes the two in the other order)."""
        for i in range(self.pool.workers):
            with self.pool.send_locks[i] if locked else contextlib.nullcontext():
                left = [seg for _, seg in self.dispatcher.ledgers[i].take_all()]
            self.outcomes.dead_letter(left, error, None)
        while self._retries:
            self.outcomes.dead_letter(heapq.heappop(self._retries)[2], error, None)

    def abandon(self, error: BaseException) -> None:
        """After the collector stopped: everything still held fails with ``error``."""
        self._fail_everything(error)


def _distinct(keys: list) -> list:
    """The keys without repeats, in order; as they are if comparing them raises (user code
    on this thread: even SystemExit must not end it)."""
    try:
        return list(dict.fromkeys(keys))
    except BaseException:
        return keys


def _orphans(left: list[tuple[int, Segment]],
             cut: tuple[int, int]) -> tuple[list[Segment], list[Segment]]:
    """A dead worker's items: (inside do() when it died, only queued), in stream order."""
    inside: list[Segment] = []
    queued: list[Segment] = []
    for position, seg in left:
        a, b = split_at(position, seg, *cut)
        inside += a
        queued += b
    return inside, queued
