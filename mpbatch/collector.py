"""The collector thread (caller process): outcomes, callbacks, retries, deaths, timeouts.

One ``wait()`` covers every result pipe, every worker sentinel and a wakeup pipe. The
collector is the only reader of result pipes and the only thread that starts replacement
workers, so a death is handled once, after the dead worker's last reports are read.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import random
import selectors
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from typing import TYPE_CHECKING, Any

from . import transport as tp
from .counters import B_END, B_START, BUSY_NS, LoadCounters
from .deadletters import DeadLetter
from .dispatch import Dispatcher
from .errors import (
    BatchTimeout,
    Closed,
    SerializationError,
    WorkerDied,
    described,
    reraise_copy,
    shown,
    signal_name,
)
from .ledger import Isolation, Segment, WorkerLedger, halves, merged_batch, split_at
from .lifecycle import Pool
from .stats import Accounts
from .worker import EXIT_RECYCLED

if TYPE_CHECKING:
    from .options import Options

log = logging.getLogger("mpbatch")

MAX_START_FAILURES = 3  # workers in a row that died before READY: stop respawning
MAX_BACKOFF = 30.0  # seconds; the cap of one retry's wait
MAX_SLEEP = 86_400.0  # seconds; the collector wakes at least daily (epoll's limit is ~24.8 d)


class Collector(threading.Thread):
    """Reads every worker's reports and turns them into outcomes."""

    def __init__(self, pool: Pool, counters: LoadCounters, dispatcher: Dispatcher,
                 accounts: Accounts, options: Options,
                 next_seal: Callable[[], int | None], seal_due: Callable[[int], None]) -> None:
        super().__init__(name="mpbatch-collector", daemon=True)
        self.pool = pool
        self.counters = counters
        self.dispatcher = dispatcher
        self.accounts = accounts
        self.options = options
        self.next_seal = next_seal  # the intake's: when its oldest open chunk is due
        self.seal_due = seal_due  # the intake's: send the open chunks due by now
        self.dead_letters: list[DeadLetter] = []
        self.broken: BaseException | None = None  # set when workers cannot start
        self.on_broken: Callable[[], None] = lambda: None  # the Batcher stops taking items
        self.stopping = False  # close() is stopping the workers: no replacements
        self.stop_error: BaseException | None = None  # why items left at stop fail
        self.sleep_until_ns = 0  # when the collector wakes up next (under accounts.lock)
        self._exit = False
        self._wake_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._retries: list[tuple[int, int, list[Segment]]] = []  # (due_ns, tie, segments)
        self._tie = itertools.count()
        self._timed_out: dict[Any, BatchTimeout] = {}  # worker process -> why it was killed
        self._init_error: dict[int, BaseException] = {}
        self._start_failures = 0
        # broken, and every item held when it broke has its outcome: flush() may return
        self.halted = False
        self._waitables: dict[Any, tuple[str, int]] = {}
        self._buried: set[Any] = set()  # processes whose death was handled, not replaced
        self._partial: dict[Any, bytearray] = {}  # result pipe -> bytes of a partial frame
        # Items another thread could not send, for this thread to dead-letter (see reject).
        self._handed: deque[tuple[list[Segment], BaseException]] = deque()
        self._hand_lock = threading.Lock()
        self._handed_in = self._handed_out = 0
        self._ended = False  # run() has ended: a sender dead-letters its rejects itself
        try:  # epoll can fail as the pipe could (EMFILE): a failed start leaks no descriptor
            self._selector: selectors.BaseSelector = selectors.DefaultSelector()
            self._rebuild_waitables()
        except BaseException:
            self._close_descriptors()
            raise
        pool.on_stall = self.kill_overdue

    # -- the loop -------------------------------------------------------------------------

    def poke(self) -> None:
        """Wake the collector (new open chunk, flush, close); safe from any thread."""
        # Under the lock that closing takes: a number checked here and closed before the
        # write could be reused by then, and the byte would land in someone else's file.
        with self._wake_lock:
            if self._wake_w < 0:
                return  # the thread has stopped: nobody to wake
            with contextlib.suppress(OSError):  # a wakeup already pending
                os.write(self._wake_w, b"!")

    def exit(self) -> None:
        self._exit = True
        self.poke()

    def discard(self) -> None:
        """Undo a construction whose Batcher failed to start: its thread, if it started
        (no replacement may start for the workers being killed), and its wakeup pipe."""
        self.stopping = True
        if self.is_alive():
            self.exit()
            self.join()  # run() closes the pipe and the selector
            return
        self._close_descriptors()

    def _close_descriptors(self) -> None:
        """Close the epoll set (if made) and the wakeup pipe: once, at the end of run() or
        of a construction that went no further."""
        if hasattr(self, "_selector"):
            self._selector.close()
        with self._wake_lock:
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1

    def run(self) -> None:
        while not self._exit:
            try:
                self._step()
            except BaseException:  # a bug of ours (or a SystemExit from user code) must not
                # silently stop every later outcome: flush() and close() would wait forever
                log.exception("mpbatch collector: unexpected error; continuing")
        self._ended = True  # set before the last look: a later reject runs in its sender
        self._take_handed()
        self._close_descriptors()

    def _step(self) -> None:
        for key, _ in self._selector.select(self._wait_seconds()):
            kind, i = key.data
            if key.fileobj not in self._waitables:
                continue  # forgotten by an earlier event of this round
            if kind == "wake":
                os.read(self._wake_r, 4096)
            elif kind == "results":
                self._drain(i)
            elif kind == "sentinel":
                self._on_death(i)
        if self._handed:
            self._take_handed()
        self._timers()

    def _rebuild_waitables(self) -> None:
        # Watch every worker whose death is not handled yet. Never ask proc.exitcode here:
        # it consumes the death notice, and a worker that died meanwhile would be lost.
        table: dict[Any, tuple[str, int]] = {self._wake_r: ("wake", -1)}
        for i in range(self.pool.workers):
            proc, conn = self.pool.procs[i], self.pool.results[i]
            if proc is not None and proc not in self._buried:
                table[proc.sentinel] = ("sentinel", i)
                if conn is not None and not conn.closed:
                    table[conn] = ("results", i)
        self._waitables = table
        # One epoll set for the life of a worker set, instead of one per wait() call.
        self._selector.close()
        self._selector = selectors.DefaultSelector()
        for obj, what in table.items():
            self._selector.register(obj, selectors.EVENT_READ, what)

    def _wait_seconds(self) -> float | None:
        now = time.monotonic_ns()
        due = [self._retries[0][0]] if self._retries else []
        if self.options.timeout is not None:
            due.append(now + int(min(0.05, self.options.timeout / 4) * 1e9))
        with self.accounts.lock:
            seal = self.next_seal()
            if seal is not None:
                due.append(seal)
            wake = min(due) if due else None
            self.sleep_until_ns = wake if wake is not None else 1 << 62
        # epoll takes at most 2**31 - 1 ms (~24.8 days); interval may be longer.
        return None if wake is None else min(max(0.0, (wake - now) / 1e9), MAX_SLEEP)

    def _timers(self) -> None:
        now = time.monotonic_ns()
        while self._retries and self._retries[0][0] <= now:
            _, _, segments = heapq.heappop(self._retries)
            self._resend(segments, solo=True)
        with self.accounts.lock:
            self.seal_due(now)
        self.kill_overdue()

    # -- reports --------------------------------------------------------------------------

    def _drain(self, i: int) -> None:
        """Read every report worker i has written so far: one read per 1 MiB, no blocking."""
        conn = self.pool.results[i]
        if conn is None:
            return
        pending = self._partial.setdefault(conn, bytearray())
        while True:
            try:
                data = os.read(conn.fileno(), 1 << 20)
            except BlockingIOError:
                return  # all read; a partial frame waits in ``pending``
            except OSError:
                data = b""
            if not data:  # EOF: the worker is exiting; its sentinel will fire
                if self._waitables.pop(conn, None) is not None:
                    with contextlib.suppress(KeyError, ValueError, OSError):
                        self._selector.unregister(conn)
                return
            pending += data
            for frame in tp.split_frames(pending):
                self._on_frame(i, frame)
            if len(data) < 1 << 20:
                return

    def _on_frame(self, i: int, frame: bytes) -> None:
        kind, start, n = tp.read_to_caller(frame)
        if kind == tp.FINISHED:
            self._finished(i, start, n, frame)
        elif kind == tp.FAILED:
            segments = self.dispatcher.ledgers[i].take(start, n)
            if not segments:  # as in _finished
                return
            worker: int | None = i
            try:
                error = tp.payload_of(frame, tp.TO_CALLER_SIZE)
            except BaseException as exc:  # user code: even SystemExit must not end us
                worker, error = None, SerializationError(
                    f"worker {i} reported a failure that cannot be unpickled in the caller "
                    f"({described(exc)})")
            self.accounts.bump(batches=1)
            self._attempt_failed(segments, error, worker)
            self.accounts.wake()
        elif kind == tp.READY:
            self.pool.ready[i] = True
            self._start_failures = 0
        elif kind == tp.INIT_FAILED:
            self._init_error[i] = tp.payload_of(frame, tp.TO_CALLER_SIZE)

    def _finished(self, i: int, start: int, n: int, frame: bytes) -> None:
        segments = self.dispatcher.ledgers[i].take(start, n)
        if not segments:  # dead-lettered already (the Batcher stopped): one outcome each
            return
        try:
            batch, grouped, items = tp.payload_of(frame, tp.TO_CALLER_SIZE)
        except BaseException as exc:  # __reduce__ of a result is user code: even a
            # SystemExit or KeyboardInterrupt it raises costs only this batch, not this thread
            self.accounts.bump(batches=1)
            error = SerializationError(
                f"the results of a batch of {n} items from worker {i} cannot be unpickled in "
                f"the caller ({described(exc)}); return plain data from do()")
            self._attempt_failed(segments, error, None)
            return
        # on_result first: once fut.result() returns, its batch's on_result has run. The
        # counters come last: flush() returns on them, and every future is done by then.
        if self.options.on_result is not None and batch is not None:
            self._call_on_result(batch, grouped)
        _resolve_futures(segments, items)
        self.accounts.settle([(s.epoch, len(s)) for s in segments], ok=True, batches=1)

    def _call_on_result(self, batch: dict, grouped: list | None) -> None:
        on_result = self.options.on_result
        results = grouped if grouped is not None else itertools.repeat(None, len(batch))
        for (key, values), got in zip(batch.items(), results, strict=True):
            try:
                on_result(key, values, got)
            except BaseException:  # sys.exit() too: it would end this thread, and every outcome
                log.exception("mpbatch: on_result raised for key %s; the item still "
                              "counts as succeeded", shown(key))

    # -- failures, retries, dead letters --------------------------------------------------

    def _attempt_failed(self, segments: list[Segment], error: BaseException,
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
            self.dead_letter(dead, error, worker)

    def _crashed(self, segments: list[Segment], error: BaseException, worker: int) -> None:
        """A batch killed its worker or timed out: isolate the culprit, or charge attempts."""
        n = sum(len(s) for s in segments)
        if not self.options.isolate_poison or n < 2:
            self._attempt_failed(segments, error, worker)
            return
        budget = segments[0].isolation or Isolation(n)
        if not budget.spend():
            self._attempt_failed(segments, error, worker)
            return
        for seg in segments:
            seg.isolation = budget
        self.accounts.bump(splits=1)
        for half in halves(segments):
            self.dispatcher.send_routed(half, solo=True)

    def _resend(self, segments: list[Segment], solo: bool) -> None:
        if self.broken is not None:
            self.dead_letter(segments, self.broken, None)
            return
        n = sum(len(s) for s in segments)
        self.accounts.bump(**{"retries" if solo else "redelivered": n})
        workers = self.dispatcher.send_routed(segments, solo)
        if not solo and min(s.epoch for s in segments) <= self.accounts.flushing_through:
            # A flush() waits for these: the FLUSH it sent went to the dead worker.
            for i in workers:
                self.dispatcher.flush(i)

    def reject(self, segments: list[Segment], error: BaseException) -> None:
        """Dead-letter items a sender could not send (they no longer pickle, or the Batcher
        stopped), in this thread like every other outcome: the sender may be an add() that
        holds the Batcher's lock, where an on_dead_letter calling close() or flush() would
        wait for itself."""
        if threading.current_thread() is self:
            self.dead_letter(segments, error, None)
            return
        with self._hand_lock:
            self._handed.append((segments, error))
            self._handed_in += 1
        self.poke()
        if self._ended:  # nobody else will take them (close() has joined this thread)
            self._take_handed()

    def handing(self) -> bool:
        """Rejects handed over are still without their outcome."""
        with self._hand_lock:
            return self._handed_in != self._handed_out

    def _take_handed(self) -> None:
        while True:
            try:
                segments, error = self._handed.popleft()
            except IndexError:  # (another thread may take the last one: both may run this)
                return
            try:
                self.dead_letter(segments, error, None)
            finally:
                with self._hand_lock:
                    self._handed_out += 1
                self.accounts.wake()  # a flush() of a stopped Batcher looks at handing()

    def dead_letter(self, segments: list[Segment], error: BaseException,
                    worker: int | None) -> None:
        """Record items that will not be tried again; any thread once the collector stopped
        (on_dead_letter and done-callbacks then run in that thread: close()'s)."""
        if not segments:
            return
        letter = DeadLetter(merged_batch(segments), error,
                            max(s.attempts for s in segments), worker)
        # In the order of _finished: a future that raised has its letter in dead_letters()
        # and its on_dead_letter run.
        self.dead_letters.append(letter)
        if self.options.on_dead_letter is not None:
            try:
                self.options.on_dead_letter(letter)
            except BaseException:  # sys.exit() too (see _call_on_result)
                log.exception("mpbatch: on_dead_letter raised; the dead letter is kept")
        for seg in segments:
            for fut in seg.futures or ():
                if fut is not None:
                    _set(fut, exception=reraise_copy(error))
        self.accounts.settle([(s.epoch, len(s)) for s in segments], ok=False)

    # -- deaths and timeouts --------------------------------------------------------------

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

    def _on_death(self, i: int) -> None:
        proc = self.pool.procs[i]
        if proc in self._buried:
            return
        self.pool.reap(proc)  # the sentinel fired: this only reaps it and sets exitcode
        self._drain(i)  # what it reported before dying is real
        with self.pool.send_locks[i]:
            cut = (self.counters.get(i, B_START), self.counters.get(i, B_END))
            inside, queued = _orphans(self.dispatcher.ledgers[i].take_all(), cut)
            self.dispatcher.ledgers[i] = WorkerLedger()
            self.counters.reset(i)
            started = self.pool.ready[i]
            restart = self._note_start(i, started, proc.exitcode)
            self._partial.pop(self.pool.results[i], None)  # a cut-off report is no report
            requeued = 0
            if restart:
                restart = self._replace(i)
                # Only queued (recycled, or killed between batches): they keep their place
                # ahead of later adds. A crashed batch's items go first, the long way.
                if restart and queued and not inside and self._requeue(i, queued):
                    requeued, queued = sum(len(s) for s in queued), []
            if not restart:
                self._buried.add(proc)
        self.accounts.wake()
        if requeued:  # outside the send lock, like every use of the Batcher's lock here
            self.accounts.bump(redelivered=requeued)
        if restart:
            recycled = int(proc.exitcode == EXIT_RECYCLED)
            self.accounts.bump(worker_restarts=1, recycled=recycled)
        try:
            if not restart and self.broken is not None and self.dispatcher.stopped is None:
                self._halt(self.broken)
            self._rebuild_waitables()
            self._place_orphaned_items(i, proc, inside, queued)
        finally:  # even if something above failed: a flush() waiting on a stop must return
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
        self._start_failures += 1
        if self._start_failures < MAX_START_FAILURES:
            return True
        cause = self._init_error.get(i)
        why = str(cause) if cause is not None else f"it exited with {signal_name(exitcode)}"
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
        except Exception:
            return False
        self.dispatcher.send_held(i, queued, frame)
        if min(s.epoch for s in queued) <= self.accounts.flushing_through:
            self.pool.send(i, tp.FLUSH_WIRE)  # a flush() waits for them: its FLUSH was lost
        return True

    def _place_orphaned_items(self, i: int, proc: Any, inside: list[Segment],
                              queued: list[Segment]) -> None:
        """Items a dead worker held and no replacement took: inside do() spent an attempt;
        the rest are re-sent."""
        timed_out = self._timed_out.pop(proc, None)
        if self.stopping:  # close() gave up on them (timeout or a second Ctrl-C)
            self.dead_letter(inside + queued, self.stop_error or Closed("the Batcher closed"),
                             None)
            return
        if self.broken is not None:  # nobody will run them: the Batcher stopped
            self.dead_letter(inside + queued, self.broken, None)
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
            self.dead_letter(left, error, None)
        while self._retries:
            self.dead_letter(heapq.heappop(self._retries)[2], error, None)

    def abandon(self, error: BaseException) -> None:
        """After the thread stopped: everything still held fails with ``error``."""
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


def _set(fut: Future, result: Any = None, exception: BaseException | None = None) -> None:
    try:
        if exception is not None:
            fut.set_exception(exception)
        else:
            fut.set_result(result)
    except InvalidStateError:
        pass  # the user cancelled it
    except BaseException:  # concurrent.futures lets a done-callback's SystemExit through
        log.exception("mpbatch: a done-callback of a Future raised; its result is set")


def _resolve_futures(segments: list[Segment], items: list | None) -> None:
    """Give each submit() future its own result, by position in the batch (see transport)."""
    if all(seg.futures is None for seg in segments):
        return
    pos = 0
    for seg in segments:
        if seg.futures is not None:
            for j, fut in enumerate(seg.futures):
                if fut is not None:
                    _set(fut, None if items is None else items[pos + j])
        pos += len(seg)
