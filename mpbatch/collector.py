"""The collector thread (caller process): reads the reports, sees every death, keeps time.

One ``wait()`` covers every result pipe (not while an add_many() reads them itself), every
worker sentinel and a wakeup pipe. A report
becomes an outcome (outcomes.py), a failed attempt (recovery.py) or items handed back unrun,
routed again (steal.py asks for them after a report, when a worker runs dry); a sentinel, a
death handled by recovery.py; the timer seals overdue open chunks (intake.py), sends due
retries and kills a do() past timeout=. Result pipes are read, and reports recorded, only by
the holder of ``role``: this thread, or an add_many() reading them itself between its
blocks (help); deaths, timers and replacement workers are this thread's alone. So a death is
handled once, after the dead worker's last reports are read.
"""

from __future__ import annotations

import _signal
import contextlib
import logging
import os
import selectors
import signal
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import transport as tp
from .counters import LoadCounters
from .deadletters import DeadLetterStore
from .dispatch import Dispatcher
from .errors import SerializationError, described
from .interrupts import held_interrupt
from .ledger import Segment, items_of, split_items
from .lifecycle import Pool
from .outcomes import Outcomes
from .recovery import Recovery
from .stats import Accounts
from .steal import Stealer

if TYPE_CHECKING:
    from .options import Options

log = logging.getLogger("mpbatch")
_GONE = object()  # an item result taken out of a batch's results (failed alone)

MAX_SLEEP = 86_400.0  # seconds; the collector wakes at least daily (epoll's limit is ~24.8 d)
# While add_many() reads the results itself (help), the collector still drains them if it has
# not for half of interval, within these bounds: a producer that stalls after a quick burst
# delays outcomes no longer. Each such wake-up costs the helper the GIL: at 5 ms, W1 lost
# ~12 % of its wall to them; at 20 ms and at 50 ms, ~4 % (in-process, 10 runs each).
HELP_LAG_NS = (1_000_000, 20_000_000)
# When no helper was heard from for this long, every helper is forgotten: a Ctrl-C in
# add_many()'s last bytecodes can keep one from leaving, and the pipes would go unwatched for
# good. One still helping joins again at its next help().
HELP_STALE_NS = 1_000_000_000
# An add_many() stops helping once a report this large comes whose batch held one item per
# key (Bulk._help): a tail of a few items, or one add() sealed by interval, does not count.
ONE_EACH_ITEMS = 64


class Collector(threading.Thread):
    """Reads the workers' reports (all of them, unless add_many() helps) and turns them into
    outcomes; handles every death and timer."""

    def __init__(self, pool: Pool, counters: LoadCounters, dispatcher: Dispatcher,
                 accounts: Accounts, options: Options,
                 next_seal: Callable[[], int | None], seal_due: Callable[[int], None],
                 store: DeadLetterStore | None = None) -> None:
        super().__init__(name="mpbatch-collector", daemon=True)
        self.pool = pool
        self.counters = counters
        self.dispatcher = dispatcher
        self.accounts = accounts
        self.options = options
        self.next_seal = next_seal  # the intake's: when its oldest open chunk is due
        self.seal_due = seal_due  # the intake's: send the open chunks due by now
        self.outcomes = Outcomes(accounts, options, store, f"batcher-{uuid.uuid4().hex[:12]}")
        self.recovery = Recovery(pool, counters, dispatcher, accounts, options, self.outcomes)
        self.dead_letter = self.outcomes.dead_letter
        # Work stealing (steal.py), where the options allow it: None otherwise.
        self.costs = dispatcher.router.costs
        self.stealer = Stealer(self.costs, pool.ready, pool.wake) if options.steal \
            else None
        self.sleep_until_ns = 0  # when the collector wakes up next (under accounts.lock)
        self._exit = False
        self._wake_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._waitables: dict[Any, tuple[str, int]] = {}
        self._buried: set[Any] = set()  # processes whose death was handled, not replaced
        self._partial: dict[Any, tp.FrameReader] = {}  # result pipe -> its partial frame
        # Items another thread could not send, for this thread to dead-letter (see reject).
        self._handed: deque[tuple[list[Segment], BaseException]] = deque()
        self._hand_lock = threading.Lock()
        self._handed_in = self._handed_out = 0
        self._ended = False  # run() has ended: a sender dead-letters its rejects itself
        # Whoever reads the result pipes and records outcomes holds the role: this thread,
        # or a thread inside add_many() that reads them itself (help).
        self.role = threading.Lock()
        self._helpers: set[int] = set()  # add_many() calls reading the results themselves
        self._help_lock = threading.Lock()
        self._helper: int | None = None  # the thread in help() now
        self._last_help_ns = 0  # the pipes were last drained for the helpers (or one joined)
        self._heard_ns = 0  # a helper last joined, or began or ended a help()
        low, high = HELP_LAG_NS
        self._help_lag_ns = min(high, max(low, int(options.interval * 5e8)))
        self._watching = True  # result pipes are in the epoll set (not while helped)
        # Reports of ONE_EACH_ITEMS or more whose batch is rebuilt item by item (help)
        self.one_each = 0
        try:  # epoll can fail as the pipe could (EMFILE): a failed start leaks no descriptor
            self._selector: selectors.BaseSelector = selectors.DefaultSelector()
            self._rebuild_waitables()
        except BaseException:
            self._close_descriptors()
            raise
        pool.on_stall = self.recovery.kill_overdue

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
        self.recovery.stopping = True
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
        with self.role:  # no help() records outcomes after this
            self._ended = True  # set before the last look: a later reject runs in its sender
            self._take_handed()
            self._close_descriptors()

    def _step(self) -> None:
        events = self._selector.select(self._wait_seconds())
        with self.role:
            for key, _ in events:
                kind, i = key.data
                if key.fileobj not in self._waitables:
                    continue  # forgotten by an earlier event of this round
                if kind == "wake":
                    os.read(self._wake_r, 4096)
                elif kind == "results":
                    self._drain(i)
                elif kind == "sentinel":
                    self._on_death(i)
            if self._helpers:
                self._check_helpers()
            self._watch_results(not self._helpers)
            if self._handed:
                self._take_handed()
            self._timers()

    # -- add_many() reading the results itself ------------------------------------------
    #
    # A caller split into a feeding thread and this reading one pays for it on the
    # cheapest items: the two threads share one GIL, and each report wakes this one to take
    # it (benchmarks/bare.py's bare-keyed-2t: ~7 % of W1's wall). So an add_many() whose
    # items come quickly reads the reports itself between blocks, and this thread stops
    # watching the result pipes until it leaves, or waits; it still watches deaths and
    # timers, and drains the pipes itself after _help_lag_ns without a help().

    def may_help(self) -> bool:
        """Whether the calling thread may read results itself: not from inside a callback
        (this thread, or a help() of its own), nor on Ray (no result pipes)."""
        return (self.options.backend != "ray" and threading.current_thread() is not self
                and not self.helping())

    @staticmethod
    def signals_allow_help() -> bool:
        """Nor in the main thread of a program with signal handlers of its own in Python:
        one could raise between taking reports and recording them (held_interrupt holds
        Ctrl-C only). Asked once an add_many() would start to help (~15 us)."""
        return threading.current_thread() is not threading.main_thread() \
            or not _python_handlers()

    def helping(self) -> bool:
        """The calling thread is inside help(), running the callbacks of outcomes."""
        return self._helper == threading.get_ident()

    def join_helpers(self, token: int) -> None:
        """add_many() call ``token`` reads results itself: stop watching the result pipes."""
        with self._help_lock:  # heard of first: _check_helpers must not forget it at once
            self._last_help_ns = self._heard_ns = time.monotonic_ns()
            first = not self._helpers
            self._helpers.add(token)
        if first:
            self.poke()

    def leave_helpers(self, token: int) -> None:
        """Call ``token`` ends or waits: watch the pipes again, unless another call still
        reads them. Idempotent, and a no-op for a call forgotten by _check_helpers."""
        with self._help_lock:
            if token not in self._helpers:
                return
            self._helpers.discard(token)
            last = not self._helpers
        if last:
            self.poke()

    def _check_helpers(self) -> None:
        """(Under role.) Drain the pipes when the helpers are away (a producer stalls), and
        forget them after HELP_STALE_NS without a help()."""
        now = time.monotonic_ns()
        if now - self._heard_ns >= HELP_STALE_NS:
            with self._help_lock:
                if time.monotonic_ns() - self._heard_ns >= HELP_STALE_NS:  # none joined since
                    self._helpers.clear()
        if now - self._last_help_ns >= self._help_lag_ns:
            self._drain_all()
            self._last_help_ns = time.monotonic_ns()

    def help(self, token: int) -> None:
        """Read and record every report that has arrived, in the calling thread (inside
        add_many() call ``token``, between blocks); nothing if another thread holds the
        role now (the collector is reading them)."""
        self._heard_ns = time.monotonic_ns()
        if token not in self._helpers:  # (a hint, unlocked) forgotten while away: back in
            self.join_helpers(token)
        # A Ctrl-C anywhere in here, the lock's acquire and release included, would leave
        # the role held or reports taken and not recorded: it waits for the end.
        with held_interrupt():
            if not self.role.acquire(blocking=False):
                return
            try:
                if not self._ended:  # (set under role before close() closes the pipes)
                    self._helper = threading.get_ident()
                    self._drain_all()
            except BaseException:  # as in run(): user code's, and ours, must not escape into
                # add_many(), whose items are in already
                log.exception("mpbatch collector: unexpected error; continuing")
            finally:
                self._helper = None
                self._last_help_ns = self._heard_ns = time.monotonic_ns()
                self.role.release()

    def _drain_all(self) -> None:
        for i in range(self.pool.workers):
            self._drain(i)

    def _watch_results(self, on: bool) -> None:
        """Put the result pipes in the epoll set, or take them out (while helped)."""
        if on == self._watching:
            return
        self._watching = on
        for obj, what in self._waitables.items():
            if what[0] == "results":
                with contextlib.suppress(KeyError, ValueError, OSError):
                    if on:
                        self._selector.register(obj, selectors.EVENT_READ, what)
                    else:
                        self._selector.unregister(obj)

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
            if what[0] != "results" or self._watching:
                self._selector.register(obj, selectors.EVENT_READ, what)

    def _wait_seconds(self) -> float | None:
        now = time.monotonic_ns()
        retry = self.recovery.next_retry_ns()
        due = [] if retry is None else [retry]
        if self.options.timeout is not None:
            due.append(now + int(min(0.05, self.options.timeout / 4) * 1e9))
        if self._helpers:
            due.append(self._last_help_ns + self._help_lag_ns)
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
        self.recovery.send_due_retries(now)
        with self.accounts.lock:
            self.seal_due(now)
        self.recovery.kill_overdue()

    # -- reports --------------------------------------------------------------------------

    def _drain(self, i: int) -> None:
        """Read every report worker i has written so far: one read per 1 MiB, no blocking."""
        conn = self.pool.results[i]
        if conn is None:
            return
        reader = self._partial.get(conn)
        if reader is None:
            reader = self._partial[conn] = tp.FrameReader()
        while True:
            try:
                frames = reader.read(conn.fileno())
            except BlockingIOError:
                return  # all read; a partial frame waits in the reader
            except OSError:
                frames = None
            if frames is None:  # EOF: the worker is exiting; its sentinel will fire
                if self._waitables.pop(conn, None) is not None:
                    with contextlib.suppress(KeyError, ValueError, OSError):
                        self._selector.unregister(conn)
                return
            for frame in frames:
                self._on_frame(i, frame)
            if reader.short:
                return

    def _on_frame(self, i: int, frame: bytes) -> None:
        kind, start, n, ns = tp.read_to_caller(frame)
        if kind == tp.FINISHED:
            self.accounts.batch_log.add(n, ns)
            self._finished(i, start, n, frame)
            if self.stealer is not None:
                self.stealer.consider()
        elif kind == tp.RETURNED:
            segments = self.dispatcher.ledgers[i].take(start, n)
            if self.stealer is not None:  # (only a stealer asks)
                self.stealer.answered(i)
            if segments:
                self.recovery.handed_back(segments, self.costs.per_worker[i])
        elif kind == tp.FAILED:
            self.accounts.batch_log.add(n, ns)
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
            self.recovery.attempt_failed(segments, error, worker)
            self.accounts.wake()
            if self.stealer is not None:
                self.stealer.consider()
        elif kind == tp.CANCELLED:
            self.outcomes.cancelled(self.dispatcher.ledgers[i].take(start, n))
        elif kind == tp.READY:
            self.pool.ready[i] = True
            self.recovery.start_failures = 0
        elif kind == tp.INIT_FAILED:
            self.recovery.init_errors[i] = tp.payload_of(frame, tp.TO_CALLER_SIZE)

    def _finished(self, i: int, start: int, n: int, frame: bytes) -> None:
        segments = self.dispatcher.ledgers[i].take(start, n)
        if not segments:  # dead-lettered already (the Batcher stopped): one outcome each
            return
        try:
            batch, grouped, items, failed, layout = tp.payload_of(frame, tp.TO_CALLER_SIZE)
        except BaseException as exc:  # __reduce__ of a result is user code: even a
            # SystemExit or KeyboardInterrupt it raises costs only this batch, not this thread
            self.accounts.bump(batches=1)
            error = SerializationError(
                f"the results of a batch of {n} items from worker {i} cannot be unpickled in "
                f"the caller ({described(exc)}); return plain data from do()")
            self.recovery.attempt_failed(segments, error, None)
            return
        if layout == tp.ONE_EACH:
            if n >= ONE_EACH_ITEMS:
                self.one_each += 1
            batch, grouped = _one_each(segments, items)
        elif layout is not None:
            batch, grouped = _rebuilt(segments, layout, grouped)
        if failed:
            segments = self._fail_alone(i, segments, failed, items)
        self.outcomes.succeeded(segments, batch, grouped, items)

    def _fail_alone(self, i: int, segments: list[Segment], failed: list,
                    items: list | None) -> list[Segment]:
        """Per-item outcomes: each failed item spends an attempt of its own; returns the
        segments of the items that succeeded (``items`` loses the failed ones' places)."""
        ok, bad = split_items(segments, [offset for offset, _ in failed])
        for seg, (offset, item) in zip(bad, failed, strict=True):
            self.recovery.attempt_failed([seg], item.exception(), i)
            if items is not None:
                items[offset] = _GONE
        if items is not None:
            items[:] = [item for item in items if item is not _GONE]
        return ok

    # -- items other threads could not send ---------------------------------------------

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

    def _on_death(self, i: int) -> None:
        proc = self.pool.procs[i]
        if proc in self._buried:
            return
        self.pool.reap(proc)  # the sentinel fired: this only reaps it and sets exitcode
        self._drain(i)  # what it reported before dying is real
        self._partial.pop(self.pool.results[i], None)  # a cut-off report is no report
        recovery = self.recovery
        orphans = recovery.take_orphans(i, proc)
        self.costs.forget(i)
        if self.stealer is not None:
            self.stealer.forget(i)
        if not orphans.restarted:
            self._buried.add(proc)
        try:
            recovery.halt_if_broken(orphans)
            self._rebuild_waitables()
            recovery.place_orphans(i, proc, orphans)
        finally:  # even if something above failed: a flush() waiting on a stop must return
            recovery.mark_halted()

    # -- what the Batcher reads ----------------------------------------------------------

    @property
    def broken(self) -> BaseException | None:
        """Why the Batcher stopped taking items (workers cannot start), or None."""
        return self.recovery.broken

    @property
    def halted(self) -> bool:
        """Stopped, and every item held then has its outcome."""
        return self.recovery.halted


def _python_handlers() -> bool:
    """A signal other than SIGINT has a handler written in Python."""
    getsignal = _signal.getsignal  # (the C call: no enum wrapping, ~10x cheaper)
    for sig in range(1, signal.NSIG):
        if sig != signal.SIGINT:
            with contextlib.suppress(OSError, ValueError):
                if callable(getsignal(sig)):
                    return True
    return False


def _one_each(segments: list[Segment], items: list) -> tuple[dict, list]:
    """The batch and its results when every key of it held one item (layout ONE_EACH)."""
    keys, values = items_of(segments)
    # In C (zip and list over 1-tuples): a comprehension here cost as much as the
    # unpickling it replaces.
    batch = dict(zip(keys, map(list, zip(values)), strict=True))
    grouped = list(map(list, zip(items)))
    if len(batch) != len(keys):  # one key object twice here, two objects there (nan)
        return _rebuilt(segments, [[j] for j in range(len(keys))], grouped)
    return batch, grouped


def _rebuilt(segments: list[Segment], layout: list[list[int]],
             grouped: list | None) -> tuple[dict, list | None]:
    """The batch a worker ran (and its results), from the caller's own items (``layout``:
    each key's offsets in the batch, see results.layout_of). Each group takes the key
    object of its first item. Two groups meet under one key only when the worker held two
    objects of a key that is not equal to itself (nan) from two chunks, where the caller
    has one object: their items and results are joined, in stream order."""
    keys, values = items_of(segments)
    batch: dict = {}
    results: dict = {}
    for n, group in enumerate(layout):
        key = keys[group[0]]
        batch.setdefault(key, []).extend([values[j] for j in group])
        if grouped is not None:
            results.setdefault(key, []).extend(grouped[n])
    return batch, None if grouped is None else list(results.values())
