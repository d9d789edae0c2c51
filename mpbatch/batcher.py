"""Caller side of mpbatch: the Batcher, and the road every item travels.

 caller process                                          worker i of N (process)
 add(key, value) / submit / add_many
   checks (intake.py): key hashable, value pickles, value <= max_bytes, room in buffer;
   errors raise here, at the call, and nothing is taken
   the item joins an open chunk (intake.py: one for least-loaded and round-robin, one per
   worker for "key" and "affinity"; add() appends without a lock); a chunk is sealed at
   min(size, buffer, 1024) items or 1 MiB, when it is a full batch by max_bytes or the
   buffer is full (then flagged FULL: the worker runs it at once), when half of interval
   has passed (the collector's timer), or on flush()/close(); add_many (bulk.py) sends
   blocks of up to 4 batches ("key", "affinity": each block split by owner in one pass)
 dispatch (dispatch.py): pick i (least-loaded: least work queued ahead, min (sent[i] -
   done[i] - held[i]) x cost[i], the fullest batch held of equals, from shared memory,
   counters.py, with held[i] the items of the batch worker i is filling and cost[i] its
   recent work_ns per item, costs.py; round-robin; key: spread crc32 of the key;
   affinity: its home unless it has spill_after of work queued, affinity.py), record the
   chunk in ledger i (ledger.py), sent[i] += n; add_many pulls its next block once the
   worker with the fewest queued items has room for half a batch under ~20 ms of work at
   the pooled cost, or two batches (three under affinity: Pacer); a Ctrl-C waits until
   the chunk is recorded and written (interrupts.py)
 item pipe i ==== CHUNK(n, deadline, pickle(keys, values)) ===>  main thread (idle) or reader
   (transport.py; processes: lifecycle.py, zygote.py)         (inlet.py); group by key;
                                                              held[i] = its items; flush
                                                              at min(size, buffer),
                                                              max_bytes, deadline, FULL or
                                                              FLUSH; do(batch[, state]);
                                                              check its shape (results.py)
 ring i (ring.py) ~~~~~~~ bytes values of 8 KiB and more ~~~~> copied out when the CHUNK
   shared memory: copied in under send lock i when they fit,  naming where they sit is
   else they follow the pickle on the item pipe               read; tail[i] += their span
 collector thread <== FINISHED/FAILED(start, n, payload) ===  result pipe i; done[i] += n,
   (collector.py)                                             work_ns[i] += time in do()
   one epoll on all result pipes (read in bulk), all worker sentinels and a wakeup pipe;
   the result pipes leave it while an add_many() whose iterator is quick (< 20 us an
   item) reads them itself between blocks (Collector.help, under the collector's role
   lock; not in a main thread with Python signal handlers, for 8 blocks after the pacer
   held it back, nor once a report of one item per key came; back in it when add_many
   waits or ends; drained by the collector when add_many has not read them for half of
   interval, 1-20 ms):
   FINISHED -> on_result, futures, succeeded (outcomes.py)
   FAILED -> retry after backoff (solo chunk) or DeadLetter, on_dead_letter (recovery.py)
   sentinel -> a replacement starts; the items that were inside do() are split in halves
   re-run on their own (poison isolation, within a budget), or spend an attempt
   (WorkerDied / BatchTimeout); items only queued are re-sent with no attempt spent
   timer -> seal overdue open chunks, send due retries, kill a do() past timeout=
   steal (steal.py): on a report, if a worker runs dry while another has >= 40 ms of
   work queued, ask that one (its ask cell; a byte on drain i wakes its reader) for half
   its queue; it answers with RETURNED(start, n), those items unrun (whole chunks from
   its reader at once, even while do() runs; else from its main thread between batches),
   and they are routed again from the ledger with no attempt spent, in chunks of a
   batch (or of a few short ones)
 close() (closing.py): add() raises Closed; flush everything (a first Ctrl-C lets it
   finish, a second gives up); STOP workers, join them; stop the collector; unlink the
   shared memory (engine.py: what start() builds and close() takes down).

backend="ray" (raypool.py, rayworker.py): the same road, with worker i a Ray actor that runs
the same worker loop behind pipes of its own; the caller's item pipe i becomes a sender thread
pushing chunks to the actor, and result pipe i is fed by a pump thread pulling its reports and
copying its counters into line i of the shared memory, which the collector reads as above.

Every accepted item sits in an open chunk, in a ledger, or in the retry queue until its
outcome is counted, so accepted == succeeded + dead_lettered + pending at every moment.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Iterable, Iterator
from concurrent.futures import Future
from types import TracebackType
from typing import Any, NoReturn

from . import interrupts, options
from .bulk import Bulk, ColumnBulk, KeyedBulk, add_each
from .closing import CLOSED, CLOSING, INHERITED, NEW, RUNNING, Closing
from .collector import Collector
from .deadletters import DeadLetter, open_store
from .dispatch import PER_WORKER
from .engine import Engine
from .errors import Closed
from .futures import LightFuture
from .intake import CHUNK_BYTES, PLAIN, Intake, OpenChunk, check_item, plain_bytes
from .interrupts import held_interrupt
from .lifecycle import Pool
from .options import check_callable, check_number
from .stats import Accounts, Stats


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
    routing: "least-loaded" (default), "key" (one key, one worker: per-key order),
        "affinity" (a key stays on its worker while that worker has under spill_after
        seconds of work queued, then moves to the least-loaded one: warm per-key state,
        no per-key order), or "round-robin".
    spill_after: seconds of queued work on a key's worker before the key moves, under
        routing="affinity" only (default 0.05); never fewer than four batches of items
        (add_many keeps three queued on a worker under affinity).
    steal: let a worker running dry take items another worker has queued but not started
        (handed back over its result pipe and sent again, no attempt spent; see steal.py).
        Default None: on for every routing but "key" (whose per-key order it would break)
        under backend="process"; True there raises ValueError; False turns it off.
    max_attempts: tries of do() per item before it is dead-lettered (default 1).
    retry_backoff: seconds before the first retry, doubled each time, jittered x0.5-1.5
        (default 0.1).
    timeout: seconds one do() call may run before its worker is killed (default None).
    on_result(key, values, results) / on_dead_letter(dead_letter): run in the caller, on
        the collector thread, or inside add_many() while it reads results itself;
        keep them quick. Exceptions are logged, not raised.
    on_batch(batch, results): once per finished batch, with the dicts do() received and
        returned (results None when do() returned None): the bulk alternative to on_result,
        one call per batch instead of one per key (a million distinct keys: a million
        calls). Items that failed alone (per-item outcomes) are not in it.
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
    dead_letters: a SQLite file where every dead letter is committed, one row per item,
        before it is counted (default None: in memory only); read it with DeadLetterStore.
    backend: "process" (default: worker processes of this machine) or "ray" (each worker a
        Ray actor, on a local Ray or a cluster: pip install "mpbatch[ray]"; see README,
        "Beyond one machine").
    address: backend="ray" only: None (default) uses the Ray this program initialised, or
        starts a local one sized to ``workers`` and shuts it down at close(); "host:port"
        or "auto" joins an existing cluster.
    ray_options: backend="ray" only: options for each worker's actor (num_cpus, resources,
        runtime_env, ...); default {"num_cpus": 1}.
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
        spill_after: float | None = None,
        steal: bool | None = None,
        max_attempts: int = 1,
        retry_backoff: float = 0.1,
        timeout: float | None = None,
        on_result: Callable[[Any, list, list | None], None] | None = None,
        on_batch: Callable[[dict, dict | None], None] | None = None,
        on_dead_letter: Callable[[DeadLetter], None] | None = None,
        init: Callable[[], Any] | None = None,
        start_method: str | None = None,
        isolate_poison: bool = True,
        max_batches_per_worker: int | None = None,
        max_rss: int | None = None,
        dead_letters: str | os.PathLike[str] | None = None,
        backend: str = "process",
        address: str | None = None,
        ray_options: dict[str, Any] | None = None,
    ) -> None:
        check_callable("do", do, optional=False)
        self._do = do
        self._options = options.checked(
            size=size, max_bytes=max_bytes, interval=interval, workers=workers, buffer=buffer,
            routing=routing, spill_after=spill_after, max_attempts=max_attempts,
            retry_backoff=retry_backoff, timeout=timeout, on_result=on_result, on_batch=on_batch,
            on_dead_letter=on_dead_letter, init=init,
            start_method=start_method, isolate_poison=isolate_poison,
            max_batches_per_worker=max_batches_per_worker, max_rss=max_rss,
            dead_letters=dead_letters, backend=backend, address=address,
            ray_options=ray_options, steal=steal)
        self._store = open_store(self._options.dead_letters)
        self._state = NEW
        self._start_lock = threading.Lock()
        self._accounts = Accounts()
        self._lock = self._accounts.lock
        self._intake = Intake(self._options, self._accounts)
        self._open = self._intake.open  # the same list: add()'s fast path reads it directly
        self._chunk_items = self._intake.chunk_items
        self._collector: Collector | None = None
        self._pool: Pool | None = None
        self._workers = 0
        self._capacity = 0  # buffer x workers, once started
        self._fast = False  # add() may take its inlined path: running, one open chunk
        self._closing = Closing(self)

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> Batcher:
        """Start the workers now (the first add/submit does it otherwise); returns self."""
        if self._state is INHERITED:
            self._refuse_inherited()
        with self._start_lock:
            if self._state is NEW:
                self._start()
            elif self._state is not RUNNING:
                raise Closed("this Batcher is closed; create a new one")
        return self

    def _start(self) -> None:
        engine = Engine(self._do, self._options, self._accounts, self._intake,
                        self._stop_fast_path, self._store)
        self._engine = engine
        # Read on every add(): attributes of their own, not lookups through the engine.
        self._counters, self._pool, self._workers = engine.counters, engine.pool, engine.workers
        self._router, self._pacer = engine.router, engine.pacer
        self._dispatcher, self._collector = engine.dispatcher, engine.collector
        self._capacity = self._intake.capacity
        self._state = RUNNING
        self._fast = self._options.routing not in PER_WORKER and self._options.max_bytes is None
        self._owner = os.getpid()
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
        self._closing.close(timeout)

    def _shutdown(self, error: BaseException | None) -> None:
        """Stop the workers and the collector; everything still held gets its outcome."""
        abandon = self._engine.stop(error)
        collector = self._collector
        assert collector is not None
        with held_interrupt():  # every item gets its outcome and the memory is freed, or none
            with self._lock:
                leftovers = self._intake.take_all()
            collector.dead_letter(leftovers, abandon, None)  # its callbacks may call stats()
            collector.recovery.abandon(abandon)
            if self._store is not None:
                self._store.close()
            self._counters.unlink()
            self._state = CLOSED  # last: a flush() in another thread waits until here
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
        # The hot path, inlined and lock-free: a plain key and value (nothing to check: a
        # PLAIN type or a flat tuple of them, intake.plain_bytes), one open chunk, and room.
        # deque.append is atomic, and whoever seals the chunk pops what is there under the
        # lock (see intake.OpenChunk). The room check reads counters without the lock:
        # threads adding at once may overshoot buffer by one item each. Anything else takes
        # _accept(), which checks (a pickle of the value: ~1 us an item), locks and waits.
        if self._fast and timeout is None:
            kind = type(value)
            if kind in PLAIN:
                size = len(value) if kind is str or kind is bytes else 0
            else:
                size = plain_bytes(value)
            if size is not None and (type(key) in PLAIN or plain_bytes(key) is not None):
                chunk = self._open[0]
                entries = chunk.entries
                n = len(entries)
                room = self._capacity - self._accounts.outstanding - n
                if room > 0:
                    try:
                        pair = (key, value)
                        entries.append(pair)
                        if not self._fast and self._closing.withdrawn(chunk, pair):
                            raise Closed("add() after close(): this Batcher no longer takes "
                                         "items; create a new one")
                        due = n + 1 >= self._chunk_items
                        if size:
                            chunk.nbytes += size  # a hint for sealing: a lost update is harmless
                            due = due or chunk.nbytes >= CHUNK_BYTES
                        if not chunk.opened:
                            self._intake.opened(chunk, wake=not due and room > 1)
                        if due or room == 1:  # full: no item can join it until one finishes
                            with self._lock:  # let go while the chunk is written (seal())
                                self._intake.seal(chunk, full=room == 1, unlock=self._lock)
                    except BaseException:
                        self._intake.unsealed()
                        raise
                    return
        self._accept(key, value, None, block, timeout)

    def submit(self, key: Hashable, value: Any, *, block: bool = False,
               timeout: float | None = None) -> Future:
        """Like add(), and return a Future of the item's result (or of its error)."""
        fut: Future = LightFuture()
        self._accept(key, value, fut, block, timeout)
        return fut

    def _accept(self, key: Hashable, value: Any, fut: Future | None, block: bool,
                timeout: float | None) -> None:
        if timeout is not None:
            check_number("timeout", timeout, positive=False)
        if self._state is not RUNNING or self._collector.broken:  # type: ignore[union-attr]
            self._ensure_running()
        nbytes = check_item(key, value, self._options.max_bytes)
        intake = self._intake
        with self._lock:
            if self._state is not RUNNING:  # close() began since the check above
                self._ensure_running()
            chunk = intake.chunk_for(key)
            if intake.is_full(chunk):
                self._wait_for_room(chunk, block, timeout)
                if self._state is not RUNNING:  # close() began while we waited
                    self._ensure_running()
            try:  # the lock is let go while a chunk it seals is written (seal())
                intake.append(chunk, key, value, fut, nbytes, unlock=self._lock)
            except BaseException:
                intake.unsealed()
                raise

    def _ensure_running(self) -> None:
        if self._state is NEW:
            self.start()
        if self._state is INHERITED:
            self._refuse_inherited()
        if self._state is not RUNNING:
            raise Closed("add() after close(): this Batcher no longer takes items; "
                         "create a new one")
        collector = self._collector
        if collector is not None and collector.broken is not None:
            raise Closed(f"this Batcher no longer takes items: {collector.broken}"
                         ) from collector.broken

    def _wait_for_room(self, chunk: OpenChunk, block: bool, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        if block:
            self._refuse_to_wait_for_room_in_a_callback("add(block=True) or submit(block=True)")
        if block and self._wait_until(lambda: not self._intake.is_full(chunk), deadline):
            return
        self._ensure_running()  # raises Closed if close() or a failure stopped the wait
        raise self._intake.no_room(chunk, self._workers, timeout if block else None)

    def _refuse_inherited(self) -> NoReturn:
        raise Closed(f"this Batcher was started by process {self._owner}, and this process "
                     f"({os.getpid()}) is a fork of it: its workers and threads are that "
                     f"process's, so this copy takes no items (close() leaves it to that "
                     f"process); create a Batcher here")

    def _refuse_in_a_callback(self, what: str, advice: str) -> None:
        """Callbacks run where outcomes are recorded and room is freed: the collector thread,
        or an add_many() reading results itself. A wait there for either would never end."""
        collector = self._collector
        if collector is not None and (threading.current_thread() is collector
                                      or collector.helping()):
            raise RuntimeError(f"{what} inside on_result, on_batch or on_dead_letter: "
                               f"{advice}")

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
                if self._state is not RUNNING and (not settle or self._state is not CLOSING):
                    return False
                if closing and self._closing.cut_short is not None:
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
                interrupts.wait(acc.changed, left)
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
        if self._state is not RUNNING or self._collector.broken:  # type: ignore[union-attr]
            self._ensure_running()
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._options.max_bytes is not None:
            return add_each(self, pairs, deadline)
        with self._lock:
            self._intake.seal_all()  # items add()ed earlier go first
        bulk = KeyedBulk if len(self._open) > 1 else Bulk
        return bulk(self, iter(pairs), deadline).run()

    def _add_columns(self, blocks: Iterator[tuple[list, list]]) -> int:
        """add_many() for items that come as blocks of (keys, values) columns
        (Executor.map): the same checks, room and pacing, with no step per item."""
        if self._state is not RUNNING or self._collector.broken:  # type: ignore[union-attr]
            self._ensure_running()
        if len(self._open) > 1 or self._options.max_bytes is not None:
            pairs = (pair for keys, values in blocks for pair in zip(keys, values, strict=True))
            return add_each(self, pairs, None)
        with self._lock:
            self._intake.seal(self._open[0])  # items add()ed earlier go first
        return ColumnBulk(self, blocks, None).run()

    # -- flush, stats ---------------------------------------------------------------------

    def flush(self) -> None:
        """Send every partial batch now; return when each item added before the call has
        its outcome recorded and its callback returned."""
        if self._state is NEW:
            return
        if self._state is CLOSING:  # every item gets its outcome when close() ends
            self._closing.await_close(None)
            return
        if self._state is INHERITED:
            self._refuse_inherited()
        if self._state is not RUNNING:
            raise Closed("flush() after close(); close() already flushed everything")
        self._flush(None)

    def _flush(self, deadline: float | None, closing: bool = False) -> bool:
        self._refuse_in_a_callback("flush() and close() cannot run", "they would wait for "
                                   "their own callback; call them from the thread that adds "
                                   "items")
        with self._lock:
            self._intake.seal_all()
            epoch = self._intake.epoch
            self._intake.epoch += 1
            self._accounts.flushing_through = epoch
        for i in range(self._workers):
            self._dispatcher.flush(i)
        with self._lock:
            return self._wait_until(lambda: self._accounts.settled_through(epoch), deadline,
                                    settle=True, closing=closing)

    def stats(self) -> Stats:
        """A consistent snapshot of the counters (works before start and after close)."""
        with self._lock:
            return self._accounts.snapshot(self._intake.held(), self._workers)

    def dead_letters(self) -> list[DeadLetter]:
        """Every DeadLetter so far, oldest first (a copy)."""
        return [] if self._collector is None else list(self._collector.outcomes.letters)

    def __repr__(self) -> str:
        s = self.stats()
        return (f"<mpbatch.Batcher {self._state} workers={s.workers} accepted={s.accepted} "
                f"pending={s.pending}>")


# Close what is still open at interpreter exit: flush, then join (guarantee 1 and 4).
_LIVE: weakref.WeakSet[Batcher] = weakref.WeakSet()


def _disown_after_fork() -> None:
    """In a child the program forks (os.fork), every started Batcher is the parent's copy:
    it shares the pipes, zygote and shared memory, not the threads. Closed from here (by
    the exit hook, a with block or close()) it would stop the parent's workers and zygote
    and remove its segments; used, it would hang on threads that are not here. So it is
    marked INHERITED, without a lock (one may have been held at the fork)."""
    for batcher in list(_LIVE):
        batcher._fast = False
        batcher._state = INHERITED
    _LIVE.clear()


os.register_at_fork(after_in_child=_disown_after_fork)


@atexit.register
def _close_all() -> None:
    for batcher in list(_LIVE):
        with contextlib.suppress(Exception):  # one failure must not skip the others
            batcher.close()
