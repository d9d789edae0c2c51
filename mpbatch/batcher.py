"""Caller side of mpbatch: the Batcher, and the road every item travels.

 caller process                                          worker i of N (process)
 add(key, value) / submit / add_many
   checks: key hashable, value pickles, value <= max_bytes, room in buffer; errors
   raise here, at the call, and nothing is taken
   the item joins an open chunk (one for least-loaded and round-robin, one per worker
   for "key"; add() appends without a lock); a chunk is sealed when it holds
   min(size, 1024) items or 1 MiB, when half of interval has passed (the collector's
   timer), or on flush()/close(); add_many sends blocks of up to 4 x size items
 dispatch: pick i (least-loaded: min sent[i] - done[i] from shared memory; round-robin;
   key: crc32 of the key), record the chunk in ledger i, sent[i] += n; add_many pulls its
   next block only while the least-loaded worker holds under ~20 ms of work, or 1.5 x size
   items (Pacer: work_ns / done); a Ctrl-C waits until the chunk is recorded and written
   (held_interrupt)
 item pipe i ==== CHUNK(n, deadline, pickle(keys, values)) ===>  main thread (idle) or reader
                                                              group by key; flush at size,
                                                              max_bytes, deadline or FLUSH;
                                                              do(batch[, state]); check shape
 collector thread <== FINISHED/FAILED(start, n, payload) ===  result pipe i; done[i] += n,
                                                              work_ns[i] += time in do()
   one epoll on all result pipes (read in bulk), all worker sentinels and a wakeup pipe:
   FINISHED -> futures, on_result, succeeded        FAILED -> retry after backoff (solo
   chunk) or DeadLetter, on_dead_letter             sentinel -> a replacement starts; the
   items that were inside do() are split in halves re-run on their own (poison isolation,
   within a budget), or spend an attempt (WorkerDied / BatchTimeout); items only queued
   are re-sent with no attempt spent
   timer -> seal overdue open chunks, send due retries, kill a do() past timeout=
 close(): add() raises Closed; flush everything; wait for pending == 0; STOP workers,
   join them; stop the collector; unlink the shared memory.

Every accepted item sits in an open chunk, in a ledger, or in the retry queue until its
outcome is counted, so accepted == succeeded + dead_lettered + pending at every moment.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import operator
import pickle
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from itertools import islice, repeat
from operator import itemgetter
from types import TracebackType
from typing import Any

import cloudpickle

from .collector import Collector
from .counters import LoadCounters
from .deadletters import DeadLetter
from .dispatch import ROUTINGS, Dispatcher, Pacer, Router
from .errors import Closed, Full, ItemTooLarge, SerializationError
from .interrupts import held_interrupt
from .ledger import Segment
from .lifecycle import START_METHODS, Pool, default_start_method, default_workers
from .stats import Accounts, Stats
from .transport import PROTOCOL, chunk_frame
from .worker import WorkerConfig

CHUNK_ITEMS = 1024  # most items in one add() chunk; add_many blocks go up to BLOCK_ITEMS
CHUNK_BYTES = 1 << 20  # seal an add() chunk at about this many bytes of values
BLOCK_ITEMS = 4096
PACE_WAIT = 1.0  # s add_many waits for the pacer at most (liveness, should a wake-up be missed)
STOP_GRACE = 5.0  # seconds close() gives idle workers to exit before killing them
_PLAIN = frozenset({int, str, bytes, float, bool, type(None)})  # always pickle, always hash

_NEW, _RUNNING, _CLOSING, _CLOSED = "new", "running", "closing", "closed"
_first, _second = itemgetter(0), itemgetter(1)


@dataclass(frozen=True)
class Options:
    """The Batcher's knobs, checked; see Batcher for units and defaults."""

    size: int
    max_bytes: int | None
    interval: float
    workers: int | None
    buffer: int
    routing: str
    max_attempts: int
    retry_backoff: float
    timeout: float | None
    on_result: Callable[[Any, list, list | None], None] | None
    on_dead_letter: Callable[[DeadLetter], None] | None
    init: Callable[[], Any] | None
    start_method: str | None
    isolate_poison: bool
    max_batches_per_worker: int | None
    max_rss: int | None

    @property
    def batch_items(self) -> int:
        """Items a worker runs as a full batch: ``size``, or ``buffer`` if that is smaller,
        since a worker holds at most ``buffer`` items and a larger batch would never fill."""
        return min(self.size, self.buffer)


class Batcher:
    """Run ``do(batch)`` in worker processes on items added by key.

    do: callable(batch) -> None | {key: [result per value]}; with ``init``, do(batch, state).
        Shipped with cloudpickle, so lambdas and closures work.
    size: flush a worker's batch at this many items, all keys together (default 100); a
        worker holds at most ``buffer`` items, so with a smaller buffer its batches run at
        ``buffer`` items.
    max_bytes: also flush at this many bytes of pickled values; a larger value alone is
        refused at add() with ItemTooLarge (default None: no byte limit).
    interval: seconds an accepted item may wait before its batch starts (default 0.1).
    workers: worker processes (default: usable CPUs, physical cores preferred).
    buffer: items accepted but unfinished, per worker; beyond it add() raises Full
        (default 10_000).
    routing: "least-loaded" (default), "key" (one key, one worker: per-key order), or
        "round-robin".
    max_attempts: tries of do() per item before it is dead-lettered (default 1).
    retry_backoff: seconds before the first retry, doubled each time, jittered x0.5-1.5
        (default 0.1).
    timeout: seconds one do() call may run before its worker is killed (default None).
    on_result(key, values, results) / on_dead_letter(dead_letter): run in the caller, on
        the collector thread; keep them quick. Exceptions are logged, not raised.
    init: called once per worker process; its return value is do()'s second argument.
    start_method: "zygote" (a fork of the caller, made before its threads, forks every
        worker: the default while the process has one thread), "forkserver" (the default
        otherwise), "spawn" or "fork".
    isolate_poison: when a batch kills its worker or times out, re-run its halves as
        batches of their own (recursively, within a budget) so that only the item that
        crashes is charged an attempt (default True).
    max_batches_per_worker: replace a worker after this many batches (default None).
    max_rss: replace a worker, between batches, once its resident memory exceeds this
        many bytes (default None).
    """

    def __init__(
        self,
        do: Callable[..., Any],
        *,
        size: int = 100,
        max_bytes: int | None = None,
        interval: float = 0.1,
        workers: int | None = None,
        buffer: int = 10_000,
        routing: str = "least-loaded",
        max_attempts: int = 1,
        retry_backoff: float = 0.1,
        timeout: float | None = None,
        on_result: Callable[[Any, list, list | None], None] | None = None,
        on_dead_letter: Callable[[DeadLetter], None] | None = None,
        init: Callable[[], Any] | None = None,
        start_method: str | None = None,
        isolate_poison: bool = True,
        max_batches_per_worker: int | None = None,
        max_rss: int | None = None,
    ) -> None:
        _check_callable("do", do, optional=False)
        self._do = do
        self._options = Options(
            size=_check_int("size", size, 1),
            max_bytes=_check_int("max_bytes", max_bytes, 1, optional=True),
            interval=_check_number("interval", interval, positive=True),
            workers=_check_int("workers", workers, 1, optional=True),
            buffer=_check_int("buffer", buffer, 1),
            routing=_check_choice("routing", routing, ROUTINGS),
            max_attempts=_check_int("max_attempts", max_attempts, 1),
            retry_backoff=_check_number("retry_backoff", retry_backoff, positive=False),
            timeout=_check_number("timeout", timeout, positive=True, optional=True),
            on_result=_check_callable("on_result", on_result),
            on_dead_letter=_check_callable("on_dead_letter", on_dead_letter),
            init=_check_callable("init", init),
            start_method=_check_start_method(start_method),
            isolate_poison=_check_bool("isolate_poison", isolate_poison),
            max_batches_per_worker=_check_int("max_batches_per_worker", max_batches_per_worker,
                                              1, optional=True),
            max_rss=_check_int("max_rss", max_rss, 1, optional=True),
        )
        self._state = _NEW
        self._start_lock = threading.Lock()
        self._accounts = Accounts()
        self._lock = self._accounts.lock
        self._epoch = 0
        self._chunk_items = min(self._options.batch_items, CHUNK_ITEMS)
        self._interval_ns = int(self._options.interval * 1e9)
        self._open: list[_OpenChunk] = []
        self._collector: Collector | None = None
        self._pool: Pool | None = None
        self._workers = 0
        self._capacity = 0  # buffer x workers, once started
        self._fast = False  # add() may take its inlined path: running, one open chunk
        self._closed = threading.Event()  # close() has ended (in whichever thread ran it)
        self._closer: int | None = None  # the thread running close()
        self._cut_short: Closed | None = None  # a second close(timeout) ran out
        self._sealed_off = False  # close() took the last open items: nothing is sent now

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> Batcher:
        """Start the workers now (the first add/submit does it otherwise); returns self."""
        with self._start_lock:
            if self._state is _NEW:
                self._start()
            elif self._state is not _RUNNING:
                raise Closed("this Batcher is closed; create a new one")
        return self

    def _start(self) -> None:
        opts = self._options
        workers = opts.workers or default_workers()
        config = WorkerConfig(self._do, opts.init, opts.batch_items, opts.max_bytes,
                              want_values=opts.on_result is not None,
                              max_batches=opts.max_batches_per_worker, max_rss=opts.max_rss)
        try:
            blob = cloudpickle.dumps(config)
        except Exception as exc:
            raise SerializationError(
                f"do= or init= cannot be pickled for the workers ({type(exc).__name__}: {exc}); "
                f"they travel with cloudpickle, so they must not hold locks, sockets or open "
                f"files: create those in init= instead") from exc
        counters = LoadCounters(workers)
        pool = collector = None
        try:
            # The default is chosen now: whether this process has other threads decides it.
            pool = Pool(workers, opts.start_method or default_start_method(), counters.name,
                        blob)
            self._router = Router(opts.routing, counters)
            # add_many's blocks go to the least-loaded worker: pace them by work, not count.
            batch = opts.batch_items
            self._pacer = (Pacer(counters, batch, 2 * _block_limit(batch))
                           if opts.routing == "least-loaded" else None)
            self._dispatcher = Dispatcher(pool, counters, self._router)
            sized = opts.max_bytes is not None
            chunks = workers if opts.routing == "key" else 1
            self._open = [_OpenChunk(i, sized) for i in range(chunks)]
            for i in range(workers):
                pool.start(i)
            # Its wakeup pipe and epoll set may fail as a worker's pipes can (EMFILE).
            collector = Collector(pool, counters, self._dispatcher, self._accounts, opts,
                                  self._next_seal_ns, self._seal_due)
            collector.start()
        except BaseException:
            if collector is not None:
                collector.discard()
            if pool is not None:
                pool.discard()
            counters.unlink()
            raise
        self._counters, self._pool, self._workers = counters, pool, workers
        self._collector = collector
        self._dispatcher.reject = collector.reject
        collector.on_broken = self._stop_fast_path
        self._capacity = opts.buffer * workers
        self._state = _RUNNING
        self._fast = opts.routing != "key" and opts.max_bytes is None
        _LIVE.add(self)

    def _stop_fast_path(self) -> None:
        self._fast = False

    def close(self, timeout: float | None = None) -> None:
        """Stop accepting, flush, wait for every outcome, join workers, free shared memory.

        Idempotent. If ``timeout`` seconds pass first, the unfinished items are dead-lettered
        with Closed and the workers are killed; a callback still running then, and
        on_dead_letter for those items, run to their end first (a thread cannot be
        interrupted), so keep callbacks quick. Ctrl-C: a first one while close() waits
        changes nothing but what happens at the end (it says on stderr how many items it is
        finishing, and raises KeyboardInterrupt once they have their outcomes); a second one
        (or the first, if close() runs because of one) gives up at once as a timeout would,
        and says how many items were left. A close() while
        another thread's runs waits for that one to end (with ``timeout``, cutting it short
        as its own would).
        """
        _check_number("timeout", timeout, positive=False, optional=True)
        if self._state is _RUNNING:  # refused before anything changes: the Batcher goes on
            self._refuse_in_a_callback("close() cannot run", "it would wait for its own "
                                       "callback; call it from the thread that adds items")
        deadline = None if timeout is None else time.monotonic() + timeout
        if deadline is not None and self._pool is not None:
            # An add() writing to the full pipe of a worker stuck in C (holding the GIL)
            # holds the lock below: it gives that worker up at the deadline.
            self._pool.give_up_by(deadline)
        with self._start_lock, self._lock:  # add() checks the state under _lock
            self._fast = False
            state = self._state
            if state is _RUNNING or state is _NEW:
                self._state = _CLOSING if state is _RUNNING else _CLOSED
                self._closer = threading.get_ident()
        if state is _NEW:
            self._closed.set()
        elif state is not _RUNNING:
            self._await_close(timeout)
        else:
            try:
                self._close(timeout, deadline)
            finally:
                self._closed.set()

    def _close(self, timeout: float | None, deadline: float | None) -> None:
        error: BaseException | None = None
        first: list[KeyboardInterrupt] = []
        try:
            flushed = self._flush_through_first_interrupt(deadline, first)
        except BaseException:  # a second Ctrl-C, wherever it lands in there, or an error
            self._give_up()
            raise
        # A stopped Batcher's workers hold nothing it waits for: they are killed.
        if not flushed or self._collector.broken:  # type: ignore[union-attr]
            error = self._collector.broken or self._cut_short or Closed(  # type: ignore
                f"close(timeout={timeout:g}) ran out before these items finished")
        self._shutdown(error)
        if first:
            raise first[0]  # everything has its outcome: the program stops, as asked

    def _flush_through_first_interrupt(self, deadline: float | None,
                                       first: list[KeyboardInterrupt]) -> bool:
        """close()'s flush. A first Ctrl-C means "finish, then stop" wherever it lands: also
        here, where a `with` block that only adds spends most of its run. It is noted in
        ``first`` and the flush goes on; the next one is raised. If close() runs because of
        a Ctrl-C (a `with` block or a `finally` that it passes through), any is the second.
        """
        if isinstance(sys.exc_info()[1], KeyboardInterrupt):
            return self._flush(deadline, closing=True)
        while True:
            try:
                if first:
                    print(f"mpbatch: Ctrl-C: close() is finishing {self.stats().pending} "
                          f"items; press Ctrl-C again to give up and dead-letter them",
                          file=sys.stderr)
                return self._flush(deadline, closing=True)
            except KeyboardInterrupt as exc:
                if first:
                    raise
                first.append(exc)

    def _give_up(self) -> None:
        """A second Ctrl-C (or an error) in close()'s wait: stop now, dead-letter the rest.
        A Ctrl-C during this waits for its end: half a shutdown would leave workers that
        the interpreter's exit then waits for."""
        with held_interrupt():
            before = self.stats().dead_lettered  # counted after: some finish while we stop
            self._shutdown(Closed("close() was interrupted before these items finished"))
            left = self.stats().dead_lettered - before
            print(f"mpbatch: interrupted during close(); {left} unfinished items were "
                  f"dead-lettered (see dead_letters())", file=sys.stderr)

    def _await_close(self, timeout: float | None) -> None:
        """Another thread's close() runs: wait for it; at ``timeout``, have it give up.

        In the closing thread itself (a callback that close() runs: on_dead_letter for the
        items it gives up, a Future's done-callback) there is nothing to wait for."""
        if self._closed.is_set() or self._closer == threading.get_ident():
            return
        self._refuse_in_a_callback("close() cannot wait for another thread's close()",
                                   "it waits for this callback; call close() from the thread "
                                   "that adds items")
        try:
            if self._closed.wait(timeout):
                return
        except KeyboardInterrupt:  # a Ctrl-C here, as in close()'s own wait: give up now
            self._cut_close_short(Closed("close() was interrupted before these items "
                                         "finished"))
            raise
        self._cut_close_short(Closed(
            f"close(timeout={timeout:g}) ran out before these items finished"))
        self._closed.wait()

    def _cut_close_short(self, error: Closed) -> None:
        with self._lock:
            self._cut_short = error
            self._accounts.changed.notify_all()  # the first close() waits on it

    def _shutdown(self, error: BaseException | None) -> None:
        collector = self._collector
        assert collector is not None
        collector.stop_error = error
        collector.stopping = True  # read under send_locks: no replacement after this
        if error is not None:
            for i in range(self._workers):
                self._pool.kill(i)
        self._pool.stop(0 if error is not None else STOP_GRACE)
        collector.exit()
        collector.join()
        self._pool.close_pipes()
        abandon = error or Closed("the Batcher closed before these items finished")
        with held_interrupt():  # every item gets its outcome and the memory is freed, or none
            with self._lock:
                leftovers = [seg for chunk in self._open for seg in [self._take(chunk)] if seg]
                self._sealed_off = True  # nothing is sealed after the leftovers: _withdrawn
            collector.dead_letter(leftovers, abandon, None)  # its callbacks may call stats()
            collector.abandon(abandon)
            self._counters.unlink()
            self._state = _CLOSED  # last: a flush() in another thread waits until here
            _LIVE.discard(self)

    def __enter__(self) -> Batcher:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- adding items ---------------------------------------------------------------------

    def add(self, key: Hashable, value: Any, *, block: bool = False,
            timeout: float | None = None) -> None:
        """Accept one item; raises Full when there is no room (or waits, with ``block``)."""
        # The hot path, inlined and lock-free: a plain key and value (nothing to check), one
        # open chunk, and room. deque.append is atomic, and whoever seals the chunk pops what
        # is there under the lock (see _OpenChunk). The room check reads counters without the
        # lock: threads adding at once may overshoot buffer by one item each.
        # Anything else takes _accept(), which checks, locks and waits.
        kind = type(value)
        if self._fast and timeout is None and type(key) in _PLAIN and kind in _PLAIN:
            chunk = self._open[0]
            entries = chunk.entries
            n = len(entries)
            room = self._capacity - self._accounts.outstanding - n
            if room > 0:
                try:
                    pair = (key, value)
                    entries.append(pair)
                    if not self._fast and self._withdrawn(chunk, pair):
                        raise Closed("add() after close(): this Batcher no longer takes "
                                     "items; create a new one")
                    due = n + 1 >= self._chunk_items
                    if kind is str or kind is bytes:
                        chunk.nbytes += len(value)  # a hint for sealing: a lost update is harmless
                        due = due or chunk.nbytes >= CHUNK_BYTES
                    if not chunk.opened:
                        self._opened(chunk, wake=not due and room > 1)
                    if due or room == 1:  # full: no item can join it until one finishes
                        with self._lock:
                            self._seal(chunk, full=room == 1)
                except BaseException:
                    self._unsealed()
                    raise
                return
        self._accept(key, value, None, block, timeout)

    def _withdrawn(self, chunk: _OpenChunk, pair: tuple) -> bool:
        """add()'s lock-free append may land after close() began (or after the Batcher
        stopped: then it goes on as usual). If close() has not sent the item yet, it never
        will run it (close() has flushed, or will dead-letter it): it is taken back, and
        the add is refused (True). If close()'s flush took it, it runs (False)."""
        with self._lock, held_interrupt():  # the rotation below must not drop an entry
            if self._state is _RUNNING:
                return False
            entries = chunk.entries
            found = False
            for _ in range(len(entries)):  # other late adders may append meanwhile
                entry = entries.popleft()
                if entry is pair:
                    found = True
                else:
                    entries.append(entry)  # theirs: each late adder takes back its own
            return found

    def submit(self, key: Hashable, value: Any, *, block: bool = False,
               timeout: float | None = None) -> Future:
        """Like add(), and return a Future of the item's result (or of its error)."""
        fut: Future = Future()
        self._accept(key, value, fut, block, timeout)
        return fut

    def _accept(self, key: Hashable, value: Any, fut: Future | None, block: bool,
                timeout: float | None) -> None:
        if timeout is not None:
            _check_number("timeout", timeout, positive=False)
        if self._state is not _RUNNING or self._collector.broken:  # type: ignore[union-attr]
            self._ensure_running()
        nbytes = self._check_item(key, value)
        with self._lock:
            if self._state is not _RUNNING:  # close() began since the check above
                self._ensure_running()
            chunk = self._open[self._router.for_key(key) if len(self._open) > 1 else 0]
            if self._is_full(chunk):
                self._wait_for_room(chunk, block, timeout)
                if self._state is not _RUNNING:  # close() began while we waited
                    self._ensure_running()
            try:
                if self._overflows(chunk, nbytes):
                    self._seal(chunk, full=True)  # a full batch by bytes: it runs now
                n = chunk.add(key, value, fut, nbytes)
                limit = self._options.max_bytes
                full = self._is_full(chunk) or (limit is not None and chunk.nbytes >= limit)
                due = full or n >= self._chunk_items or chunk.nbytes >= CHUNK_BYTES
                if not chunk.opened:
                    self._opened(chunk, wake=not due)
                if due:
                    self._seal(chunk, full=full)
            except BaseException:
                self._unsealed()
                raise

    def _overflows(self, chunk: _OpenChunk, nbytes: int | None) -> bool:
        """The open chunk is a full batch by max_bytes: this item would take it past.

        The worker runs a batch once the next item would not fit, so a chunk that stopped
        short of max_bytes must say it is full (hold the lock)."""
        limit = self._options.max_bytes
        return (limit is not None and bool(chunk.entries)
                and chunk.nbytes + (nbytes or 0) > limit)

    def _opened(self, chunk: _OpenChunk, wake: bool = True) -> None:
        """The first item of an open chunk: set its deadlines, wake the collector's timer.

        ``wake=False``: the chunk is sealed right after. Waking the collector for nothing
        costs more than the write itself: its thread takes the GIL while ours waits in
        the os.write() of the wakeup (size=1: ~40 us more from add() to the worker).
        """
        now = time.monotonic_ns()
        chunk.deadline = now + self._interval_ns
        chunk.seal_at = now + self._interval_ns // 2
        chunk.opened = True
        if wake and chunk.seal_at < self._collector.sleep_until_ns:  # type: ignore[union-attr]
            self._collector.poke()  # type: ignore[union-attr]

    def _unsealed(self) -> None:
        """A Ctrl-C landed between an item's append and its seal: the chunk may hold it
        unopened, or opened with wake=False. Wake the collector, whose timer then seals it
        within interval."""
        self._collector.poke()  # type: ignore[union-attr]

    def _ensure_running(self) -> None:
        if self._state is _NEW:
            self.start()
        if self._state is not _RUNNING:
            raise Closed("add() after close(): this Batcher no longer takes items; "
                         "create a new one")
        collector = self._collector
        if collector is not None and collector.broken is not None:
            raise Closed(f"this Batcher no longer takes items: {collector.broken}"
                         ) from collector.broken

    def _check_item(self, key: Hashable, value: Any) -> int | None:
        """Pickled size of ``value`` when it is needed; raise on a bad key or value."""
        kind = type(key)
        if kind not in _PLAIN:
            try:
                hash(key)
            except TypeError:
                raise TypeError(f"key must be hashable (got {kind.__name__}: {key!r:.80}); "
                                f"use a str, int, bytes or tuple key") from None
        if self._options.max_bytes is None and type(value) in _PLAIN and kind in _PLAIN:
            return len(value) if type(value) in (str, bytes) else 16
        try:
            blob = pickle.dumps(value, PROTOCOL)
            if kind not in _PLAIN:
                pickle.dumps(key, PROTOCOL)
        except Exception as exc:
            raise SerializationError(
                f"the item with key {key!r:.80} cannot be pickled: {type(value).__name__} value "
                f"or {kind.__name__} key ({type(exc).__name__}: {exc}); items cross to worker "
                f"processes with pickle, so send plain data") from exc
        limit = self._options.max_bytes
        if limit is not None and len(blob) > limit:
            raise ItemTooLarge(
                f"the value for key {key!r:.80} is {len(blob)} bytes pickled, over "
                f"max_bytes={limit}; split it or raise max_bytes")
        return len(blob)

    def _is_full(self, chunk: _OpenChunk) -> bool:
        """No room (hold the lock): per worker for "key", all workers together otherwise."""
        if len(self._open) > 1:
            return self._dispatcher.held(chunk.worker) + len(chunk.entries) >= self._options.buffer
        return self._accounts.outstanding + len(chunk.entries) >= self._capacity

    def _wait_for_room(self, chunk: _OpenChunk, block: bool, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        if block:
            self._refuse_to_wait_for_room_in_a_callback("add(block=True) or submit(block=True)")
        if block and self._wait_until(lambda: not self._is_full(chunk), deadline):
            return
        self._ensure_running()  # raises Closed if close() or a failure stopped the wait
        where = (f"worker {chunk.worker} holds {self._options.buffer} unfinished items "
                 f"(buffer={self._options.buffer}, routing='key')" if len(self._open) > 1 else
                 f"{self._options.buffer * self._workers} items are unfinished "
                 f"(buffer={self._options.buffer} x {self._workers} workers)")
        waited = f" after waiting {timeout:g}s" if block else ""
        raise Full(f"no room{waited}: {where}; retry later, pass block=True, or raise buffer=")

    def _refuse_in_a_callback(self, what: str, advice: str) -> None:
        """Callbacks run in the collector thread, the one that records outcomes and frees
        room: a wait there for either would never end."""
        if threading.current_thread() is self._collector:
            raise RuntimeError(f"{what} inside on_result or on_dead_letter: {advice}")

    def _refuse_to_wait_for_room_in_a_callback(self, what: str) -> None:
        self._refuse_in_a_callback(f"{what} cannot wait for room", "only the thread running "
                                   "them frees room; use add() without block (it raises "
                                   "Full), or add from another thread")

    def _wait_until(self, ready: Callable[[], bool], deadline: float | None,
                    settle: bool = False, closing: bool = False) -> bool:
        """Wait (holding the lock) until ``ready()``; False at the deadline or on close.

        If the Batcher stops (workers cannot start), a wait for room ends at once; with
        ``settle`` (a flush) it ends once the collector has given an outcome to every item
        it held, so flush() never returns with an item unaccounted for. ``closing``: the
        flush of close(), which a second close(timeout) may cut short.
        """
        acc = self._accounts
        acc.waiters += 1
        try:
            while not ready():
                # close() ends waits for room (the item is refused), not a flush's wait
                if self._state is not _RUNNING and (not settle or self._state is not _CLOSING):
                    return False
                if closing and self._cut_short is not None:
                    return False
                collector = self._collector
                if collector is not None and collector.broken is not None:
                    if not settle:
                        return False
                    if collector.halted and not collector.handing():
                        return ready()
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                acc.changed.wait(left)
            return True
        finally:
            acc.waiters -= 1

    def add_many(self, pairs: Iterable[tuple[Hashable, Any]], *,
                 timeout: float | None = None) -> int:
        """Accept every (key, value) of ``pairs``, waiting for room; returns how many.

        The bulk path: items are checked and pickled a block at a time. On ``timeout`` it
        raises Full whose ``.accepted`` counts the items that went in; a bad item raises
        (SerializationError, ItemTooLarge, TypeError) after the items before it went in.
        """
        if self._state is not _RUNNING or self._collector.broken:  # type: ignore[union-attr]
            self._ensure_running()
        deadline = None if timeout is None else time.monotonic() + timeout
        if len(self._open) > 1 or self._options.max_bytes is not None:
            return self._add_each(pairs, deadline)
        with self._lock:
            self._seal(self._open[0])  # items add()ed earlier go first
        return _Bulk(self, iter(pairs), deadline).run()

    def _add_each(self, pairs: Iterable[tuple[Hashable, Any]], deadline: float | None) -> int:
        """add_many for "key" routing and max_bytes: per-item checks, still chunked."""
        accepted = 0
        for item in pairs:
            key, value = _pair(item, accepted)
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                self._accept(key, value, None, True, left)
            except (Full, SerializationError) as exc:
                raise type(exc)(str(exc), accepted) from exc
            accepted += 1
        return accepted

    # -- open chunks ----------------------------------------------------------------------

    def _take(self, chunk: _OpenChunk) -> Segment | None:
        """Seal ``chunk`` into a segment of the current epoch (hold the lock)."""
        deadline = chunk.deadline
        keys, values, sizes, futures = chunk.take()
        if chunk.entries:  # added while we took: they open the next chunk
            self._opened(chunk)
        if not keys:
            return None
        self._accounts.seal(len(keys), self._epoch)
        return Segment(keys, values, sizes, futures, 0, self._epoch, deadline)

    def _seal(self, chunk: _OpenChunk, full: bool = False) -> None:
        """Send an open chunk to its worker (hold the lock). ``full``: no more items can
        join its batch (max_bytes, or the buffer is full), so the worker runs it at once."""
        if self._sealed_off:
            return  # the workers are gone; a late add() takes its item back (_withdrawn)
        with held_interrupt():  # from the open chunk to a ledger, whole or not at all
            seg = self._take(chunk)
            if seg is None:
                return  # (once the Batcher stopped, the dispatcher dead-letters what it gets)
            i = chunk.worker if self._options.routing == "key" else self._router.for_chunk()
            self._dispatcher.send(i, [seg], full=full)

    def _next_seal_ns(self) -> int | None:
        """When the oldest open chunk must be sent (hold the lock)."""
        due = [c.seal_at for c in self._open if c.entries]
        return min(due) if due else None

    def _seal_due(self, now: int) -> None:
        """Send open chunks whose time has come (hold the lock); the collector's timer."""
        for chunk in self._open:
            if chunk.entries and chunk.seal_at <= now:
                self._seal(chunk)

    # -- flush, stats ---------------------------------------------------------------------

    def flush(self) -> None:
        """Send every partial batch now; return when each item added before the call has
        its outcome recorded and its callback returned."""
        if self._state is _NEW:
            return
        if self._state is _CLOSING:  # every item gets its outcome when close() ends
            self._await_close(None)
            return
        if self._state is not _RUNNING:
            raise Closed("flush() after close(); close() already flushed everything")
        self._flush(None)

    def _flush(self, deadline: float | None, closing: bool = False) -> bool:
        self._refuse_in_a_callback("flush() and close() cannot run", "they would wait for "
                                   "their own callback; call them from the thread that adds "
                                   "items")
        with self._lock:
            for chunk in self._open:
                self._seal(chunk)
            epoch = self._epoch
            self._epoch += 1
            self._accounts.flushing_through = epoch
        for i in range(self._workers):
            self._dispatcher.flush(i)
        with self._lock:
            return self._wait_until(lambda: self._accounts.settled_through(epoch), deadline,
                                    settle=True, closing=closing)

    def stats(self) -> Stats:
        """A consistent snapshot of the counters (works before start and after close)."""
        acc = self._accounts
        with self._lock:
            accepted = acc.sealed + sum(len(c.entries) for c in self._open)
            return Stats(
                accepted=accepted, succeeded=acc.succeeded, dead_lettered=acc.dead_lettered,
                pending=accepted - acc.succeeded - acc.dead_lettered, batches=acc.batches,
                retries=acc.retries, worker_restarts=acc.worker_restarts,
                failed_attempts=acc.failed_attempts, redelivered=acc.redelivered,
                splits=acc.splits, recycled=acc.recycled,
                workers=self._workers)

    def dead_letters(self) -> list[DeadLetter]:
        """Every DeadLetter so far, oldest first (a copy)."""
        return [] if self._collector is None else list(self._collector.dead_letters)

    def __repr__(self) -> str:
        s = self.stats()
        return (f"<mpbatch.Batcher {self._state} workers={s.workers} accepted={s.accepted} "
                f"pending={s.pending}>")


class _OpenChunk:
    """Items accepted in the caller and not yet sent to a worker.

    ``entries`` is a deque: add()'s fast path appends a (key, value) pair without a lock
    (deque.append is atomic), and a sealer, holding the Batcher's lock, pops what is there.
    Items that need more (a Future, a size for max_bytes) are appended under the lock as
    (key, value, future, nbytes); ``rich`` counts them, so a chunk of plain pairs is taken
    without looking at each item.

    ``opened`` says the current items have their deadlines. A sealer clears it before
    popping and sets it again if items arrived meanwhile; an adder sets it after appending
    if it finds it clear. Either way no item sits in a chunk the collector's timer does not
    know about.
    """

    __slots__ = ("deadline", "entries", "nbytes", "opened", "rich", "seal_at", "sized",
                 "worker")

    def __init__(self, worker: int, sized: bool) -> None:
        self.worker = worker  # for "key" routing: the worker this chunk goes to
        self.sized = sized  # max_bytes is set: the worker needs each value's size
        self.entries: deque[tuple] = deque()
        self.rich = 0
        self.nbytes = 0
        self.opened = False
        self.deadline = 0
        self.seal_at = 0

    def add(self, key: Any, value: Any, fut: Future | None, nbytes: int | None) -> int:
        """Append one item (hold the Batcher's lock); returns the chunk's new length."""
        if nbytes is not None:
            self.nbytes += nbytes
        if fut is None and not self.sized:
            self.entries.append((key, value))
        else:
            self.rich += 1  # before the append: a Ctrl-C in between must not hide the entry
            self.entries.append((key, value, fut, nbytes))
        return len(self.entries)

    def take(self) -> tuple[list, list, list[int] | None, list[Future | None] | None]:
        """Pop every item: (keys, values, sizes, futures) (hold the Batcher's lock)."""
        self.opened = False
        self.nbytes = 0
        pop = self.entries.popleft
        if not self.rich:
            # Pops and splits in C: adders may append behind us, never ahead (a sealer holds
            # the lock, and its caller holds Ctrl-C until the items are in a ledger).
            pairs = list(map(operator.call, repeat(pop, len(self.entries))))
            return list(map(_first, pairs)), list(map(_second, pairs)), None, None
        self.rich = 0  # every rich entry is popped: they are appended under the lock
        keys: list = []
        values: list = []
        sizes: list[int] | None = [] if self.sized else None
        futures: list[Future | None] = []
        for _ in range(len(self.entries)):
            key, value, *rest = pop()
            keys.append(key)
            values.append(value)
            fut, nbytes = rest or (None, 0)
            futures.append(fut)
            if sizes is not None:
                sizes.append(nbytes)
        return keys, values, sizes, (futures if any(f is not None for f in futures) else None)


class _Bulk:
    """One add_many() call on the block path: pull, check, pickle and send blocks."""

    def __init__(self, batcher: Batcher, items: Any, deadline: float | None) -> None:
        self.b = batcher
        self.items = items
        self.deadline = deadline
        self.accepted = 0
        # Adapts: a block grows while pulling it from the iterator is quick, and shrinks when
        # it is not, since the first item of a block waits for the last (a slow iterator,
        # e.g. items arriving at 1,000/s, must not hold an item back for a whole block).
        self.block = 1

    def run(self) -> int:
        b = self.b
        # A block may take a quarter of interval to pull: the first item of a block waits
        # for the last, and must not wait past interval. (A tighter cap, 2 ms, kept halving
        # blocks whenever the collector took the GIL mid-pull, and cost W1 40 %.)
        budget = b._options.interval / 4
        limit = _block_limit(b._options.batch_items)
        while True:
            room = self._paced(self._room())
            started = time.monotonic()
            keys, values, bad = self._pull(min(room, self.block))
            if keys:
                grow = time.monotonic() - started <= budget
                self.block = min(limit, self.block * 2) if grow else max(1, self.block // 2)
                self._send(keys, values, int(started * 1e9) + b._interval_ns)
            if bad is not None:
                raise TypeError(f"add_many() takes (key, value) pairs; item {self.accepted} is "
                                f"{type(bad[0]).__name__}: {bad[0]!r:.80}")
            if not keys:
                return self.accepted

    def _pull(self, n: int) -> tuple[list, list, tuple | None]:
        """Up to n items from the iterator as (keys, values) columns, and (item,) if one
        of them is not a pair (the pull stops there).

        Unpacking as we pull frees each pair at once, as a loop over the iterator would:
        a pair kept in a list until the block is pickled cost a GC-tracked tuple per item.
        """
        keys: list = []
        values: list = []
        add_key, add_value = keys.append, values.append
        for item in islice(self.items, n):
            try:
                key, value = item
            except (TypeError, ValueError):
                return keys, values, (item,)
            add_key(key)
            add_value(value)
        return keys, values, None

    def _room(self) -> int:
        b, acc = self.b, self.b._accounts
        cap = b._options.buffer * b._workers

        def free() -> int:
            return cap - acc.outstanding

        with b._lock:
            if free() <= 0:
                b._refuse_to_wait_for_room_in_a_callback("add_many()")
            if free() <= 0 and not b._wait_until(lambda: free() > 0, self.deadline):
                b._ensure_running()  # raises Closed if close() or a failure stopped us
                raise Full(f"add_many() waited past its timeout with {cap} items unfinished "
                           f"(buffer={b._options.buffer} x {b._workers} workers); "
                           f"{self.accepted} items went in", self.accepted)
            return free()

    def _paced(self, room: int) -> int:
        """Items to pull now: ``room``, but not further ahead of the workers than the pacer
        allows. A soft limit, apart from timeout= (which is about room): after PACE_WAIT a
        block goes anyway."""
        b, pacer = self.b, self.b._pacer
        if pacer is None:
            return room
        with b._lock:
            allowed = pacer.allowance()
            if allowed <= 0:
                b._wait_until(lambda: pacer.allowance() > 0, time.monotonic() + PACE_WAIT)
                allowed = pacer.allowance()
        # After PACE_WAIT without a wake-up, a batch and a half goes anyway: not one item.
        return min(room, allowed if allowed > 0 else pacer.floor)

    def _send(self, keys: list, values: list, deadline_ns: int) -> None:
        try:
            if not _PLAIN.issuperset(map(type, keys)):
                dict.fromkeys(keys)  # every key hashable
            frame = chunk_frame(keys, values, None, deadline_ns)
        except Exception:
            self._send_good_prefix(keys, values, deadline_ns)
            return
        b = self.b
        with held_interrupt():  # counted as accepted, recorded in a ledger and written, or not
            b._lock.acquire()
            try:
                if b._state is not _RUNNING or b._collector.broken:  # type: ignore[union-attr]
                    b._ensure_running()  # close() began or it stopped: raise Closed, nothing
                    # of this block taken
                seg = Segment(keys, values, None, None, 0, b._epoch, deadline_ns)
                b._accounts.seal(len(keys), b._epoch)
                i = b._router.for_chunk()
            except BaseException:
                b._lock.release()
                raise
            # The write happens outside the Batcher's lock (the collector settles outcomes
            # under it) but inside worker i's send lock, taken first: a flush() or close()
            # that follows still writes after this chunk.
            b._dispatcher.send(i, [seg], frame=frame, unlock=b._lock)
            self.accepted += len(keys)

    def _send_good_prefix(self, keys: list, values: list, deadline_ns: int) -> None:
        """The block did not check out: send the items before the first bad one, raise for it."""
        for j, (key, value) in enumerate(zip(keys, values, strict=True)):
            try:
                self.b._check_item(key, value)
            except Exception as exc:
                if j:
                    self._send(keys[:j], values[:j], deadline_ns)
                if isinstance(exc, SerializationError):
                    exc.args = (exc.args[0], self.accepted)
                    exc.accepted = self.accepted
                raise
        # Each item pickles alone but the block does not (a pickling side effect): go one by one.
        for key, value in zip(keys, values, strict=True):
            self.b._accept(key, value, None, True, None)
            self.accepted += 1


def _block_limit(size: int) -> int:
    """Most items in one add_many block. A block goes to one worker: a few batches' worth at
    most, so that a run of costly items (hot keys) cannot pin seconds of work to one worker
    while another idles."""
    return min(BLOCK_ITEMS, max(4 * size, 64))


def _pair(item: Any, index: int) -> tuple[Hashable, Any]:
    try:
        key, value = item
    except (TypeError, ValueError):
        raise TypeError(f"add_many() takes (key, value) pairs; item {index} is "
                        f"{type(item).__name__}: {item!r:.80}") from None
    return key, value


# -- argument checks: TypeError for a wrong type, ValueError for a value out of range ---------

def _show(value: Any) -> str:
    """repr() for an error message: an int too long to print becomes its size."""
    try:
        return repr(value)
    except ValueError:  # int over sys.get_int_max_str_digits()
        return f"<int of {value.bit_length()} bits>"


def _check_int(name: str, value: Any, low: int, optional: bool = False) -> Any:
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        none = " or None" if optional else ""
        raise TypeError(f"{name} must be an int{none} (got {type(value).__name__}: "
                        f"{_show(value)})")
    if value < low:
        raise ValueError(f"{name} must be >= {low} (got {_show(value)})")
    return value


MAX_SECONDS = 1e9  # about 31 years: past that a duration is a mistake, and ns overflow int64


def _check_number(name: str, value: Any, positive: bool, optional: bool = False) -> Any:
    if value is None and optional:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        none = " or None" if optional else ""
        raise TypeError(f"{name} must be a number of seconds{none} "
                        f"(got {type(value).__name__}: {_show(value)})")
    try:
        seconds = float(value)
    except OverflowError:  # an int too large for a float
        seconds = math.inf
    if not math.isfinite(seconds) or seconds < 0 or (positive and seconds == 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be finite and {bound} (got {_show(value)})")
    if seconds > MAX_SECONDS:
        raise ValueError(f"{name} must be at most {MAX_SECONDS:g} seconds (got {_show(value)})")
    return seconds


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False (got {type(value).__name__}: {value!r})")
    return value


def _check_callable(name: str, value: Any, optional: bool = True) -> Any:
    if value is None and optional:
        return None
    if not callable(value):
        raise TypeError(f"{name} must be callable (got {type(value).__name__}: {value!r:.80})")
    return value


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {choices} (got {type(value).__name__})")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices} (got {value!r})")
    return value


def _check_start_method(value: Any) -> str | None:
    if value is None:
        return None  # chosen when the workers start (default_start_method)
    return _check_choice("start_method", value, START_METHODS)


# Close what is still open at interpreter exit: flush, then join (guarantee 1 and 4).
_LIVE: weakref.WeakSet[Batcher] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for batcher in list(_LIVE):
        with contextlib.suppress(Exception):  # one failure must not skip the others
            batcher.close()
