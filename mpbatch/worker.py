"""Worker process main loop: hold items by key, flush on size/bytes/interval, run do().

Runs in worker process i. The main thread reads the item pipe when it waits for items,
groups them and runs batches; when the caller finds the pipe full, a reader thread drains it
(see Inlet), so the caller does not wait on a worker that runs a long batch or a slow
init() (unless that holds the GIL throughout, in C code). Failed attempts are reported,
never retried here: the caller's collector owns retries, so a batch may be retried on
another worker.
"""

from __future__ import annotations

import _thread
import contextlib
import functools
import os
import select
import signal
import sys
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain, islice
from multiprocessing.connection import Connection
from typing import Any, NoReturn

import cloudpickle

from . import shm
from . import transport as tp
from .calls import DEFINITIONS
from .counters import (
    ASK,
    ASK_ITEMS,
    B_END,
    B_START,
    BATCHES,
    BUSY_NS,
    CANCEL,
    CELLS,
    DONE,
    GIVEN,
    HELD,
    WORK_NS,
    LoadCounters,
)
from .errors import BatchFailed, SerializationError
from .inlet import TICK, Inlet
from .results import (
    checked_results,
    fail_unpicklable,
    failure,
    in_stream_order,
    item_failures,
    layout_of,
    one_each,
    unpicklable,
)
from .ring import RingReader

EXIT_INIT_FAILED = 3
EXIT_ORPHANED = 70  # the caller died; see _exit_with_caller
EXIT_RECYCLED = 75  # max_batches_per_worker or max_rss reached: replace me


@dataclass(frozen=True)
class WorkerConfig:
    """What every worker needs, shipped once with cloudpickle (lambdas and closures travel)."""

    do: Callable[..., Any]
    init: Callable[[], Any] | None
    size: int
    max_bytes: int | None
    want_values: bool  # on_result is set: ship the batch's values back with the results
    max_batches: int | None = None  # recycle after this many batches
    max_rss: int | None = None  # recycle, between batches, above this resident size (bytes)


PACKAGE_DIR = os.path.dirname(os.path.realpath(__file__))

def main(index: int, items: Connection, drain: Connection, results: Connection,
         counters_name: str, ring_name: str, workers: int, config_blob: bytes,
         caller_pid: int, caller_package: str) -> None:
    """Entry point of worker ``index`` (the Process target); ``ring_name``: the caller's
    rings for large values (ring.py), or "" for none."""
    # Ctrl-C goes to the whole foreground process group; it is the caller's to handle, and
    # the caller's close() still needs this worker to finish what it holds.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_caller(caller_pid, (counters_name, ring_name))
    _keep_freed_memory()
    if caller_package != PACKAGE_DIR:
        # Python 3.11's fork server imports from its own working directory: a checkout of
        # mpbatch there wins over the caller's, and the two then misread each other's frames.
        error = BatchFailed(
            f"the worker imported mpbatch from {PACKAGE_DIR}, the caller from "
            f"{caller_package}; start the program from another directory, or use one copy "
            f"of mpbatch", "ImportError")
        _init_failed(results, error)
    try:
        config: WorkerConfig = cloudpickle.loads(config_blob)
    except BaseException as exc:  # e.g. do() needs a module this process cannot import
        _init_failed(results, failure(exc, "unpickling do and init in the worker"))
    counters = LoadCounters.attach(counters_name, workers)
    ring = RingReader(ring_name, index, workers) if ring_name else None
    # The reader drains a full item pipe from now on: while init() loads a model for
    # seconds, neither the caller's adds nor the collector re-sending a replaced worker's
    # items to this one wait on it.
    inlet = Inlet(items, drain, ring)
    inlet.start()
    state = None
    if config.init is not None:
        try:
            state = config.init()
        except BaseException as exc:
            _init_failed(results, failure(exc, "init()"))
    tp.write_all(results.fileno(), tp.caller_frame(tp.READY, os.getpid(), 0))
    loop = _Loop(index, inlet, results, counters, config, state)
    try:
        recycle = loop.run()
    finally:
        loop.stop_answering()  # the reader reads the counters while it answers
        counters.close()
        inlet.close_ring()
    if recycle:
        # Items still queued here are in the caller's ledger: it re-sends them, with no
        # attempt spent, to the worker that replaces this one.
        sys.exit(EXIT_RECYCLED)


MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks below it come from the heap
TRIM_THRESHOLD = 64 << 20  # free memory a worker keeps at the top of its heap


def _keep_freed_memory() -> None:
    """Let glibc's malloc reuse the memory of a freed frame or value instead of handing it
    back to the kernel and faulting it in again, page by page, for the next one.

    Every chunk of large values allocates as many bytes as it carries, and frees them once
    do() returns. By default glibc maps blocks above ~128 KiB-32 MiB (it adapts) with mmap
    and returns free heap tops above twice that; each new block then costs a page fault
    per 4 KiB. Measured with 1 MiB values: 4 faults per page moved and 2.4-3.5 s of a
    worker's CPU per GiB; with these settings ~35,000 faults and ~1.2 s. A worker keeps up
    to TRIM_THRESHOLD of freed heap (counted by max_rss). Not glibc: nothing to tune.
    """
    mallopt = glibc_mallopt()
    if mallopt is None:  # pragma: no cover - not glibc
        return
    mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD (fixes it: no more adapting)
    mallopt(-1, TRIM_THRESHOLD)  # M_TRIM_THRESHOLD


@functools.cache
def glibc_mallopt() -> Any:
    """glibc's ``mallopt``, or None elsewhere; looked up once per process. The caller looks
    it up before it forks the zygote or the workers (lifecycle.Pool): ``import ctypes`` took
    a forked worker 2.5-7 ms of its start, two workers starting at once on two vCPUs."""
    try:
        import ctypes

        return ctypes.CDLL(None).mallopt
    except (ImportError, OSError, AttributeError):  # pragma: no cover - not glibc
        return None


def _init_failed(results: Connection, error: BatchFailed) -> NoReturn:
    """Tell the caller why this worker cannot take items, and exit."""
    tp.write_all(results.fileno(), tp.caller_frame(tp.INIT_FAILED, os.getpid(), 0, error))
    os._exit(EXIT_INIT_FAILED)


def _exit_with_caller(caller_pid: int, segments: tuple[str, ...]) -> None:
    """Exit at once when the caller process dies, however it dies (no orphans), and remove
    the caller's shared-memory ``segments`` first: nobody else is left to (shm.py).

    A pidfd turns the caller's exit into an event on Linux >= 5.3, for every start method
    (under forkserver and the zygote our parent is not the caller, so neither the parent
    pid nor PR_SET_PDEATHSIG names the right process). Elsewhere, poll the caller's pid.
    """
    def orphaned() -> NoReturn:
        try:
            shm.unlink_all(segments)
        finally:
            os._exit(EXIT_ORPHANED)

    try:
        fd = os.pidfd_open(caller_pid)
    except ProcessLookupError:
        orphaned()
    except (AttributeError, OSError):
        fd = None

    def watch() -> None:
        if fd is not None:
            # poll(), not select(): a fork or zygote worker inherits the caller's descriptors,
            # and in a program holding ~1,000 of them the pidfd is past select()'s limit
            # (ValueError: the thread died, and the worker outlived its caller).
            caller = select.poll()
            caller.register(fd, select.POLLIN)
            while not caller.poll():
                pass
            orphaned()
        while True:
            time.sleep(0.1)  # no event to wait on without pidfd
            try:
                os.kill(caller_pid, 0)
            except ProcessLookupError:
                orphaned()
            except PermissionError:
                pass

    _thread.start_new_thread(watch, ())  # not Thread.start(): see Inlet.start


_append = list.append
_consume = deque(maxlen=0).extend  # runs an iterator to its end, in C


def _rss() -> int:
    import psutil  # only with max_rss: psutil costs a worker's start ~14 ms

    return psutil.Process().memory_info().rss


class _Loop:
    """The worker's state between batches: held items and its position in the item stream."""

    def __init__(self, index: int, inlet: Inlet, results: Connection,
                 counters: LoadCounters, config: WorkerConfig, state: Any) -> None:
        self.results = results
        self.cells = counters.cells
        self.base = CELLS * index
        self.do = config.do
        self.state = state
        self.with_state = config.init is not None
        self.size = config.size
        self.max_bytes = config.max_bytes
        self.want_values = config.want_values
        # A do() with per-item outcomes (peritem.PerItem): look for ItemFailed results.
        self.per_item = bool(getattr(config.do, "per_item_outcomes", False))
        self.max_batches = config.max_batches
        self.max_rss = config.max_rss
        self.batches = 0
        self.inlet = inlet
        self.held: defaultdict[Any, list] = defaultdict(list)  # do() gets a plain dict
        self.few_keys = False  # the last batch had few keys for its items: group in C
        self.one_key = False  # the chunk being held has one key for all its items
        self.layout = False  # the last chunk's values were large: report a layout (results.py)
        self.held_n = 0
        self.held_bytes = 0
        self.held_start = 0  # stream position of the first held item
        self.held_parts: list[tuple[list, int, int]] = []  # (keys, lo, hi) in stream order
        self.held_values: list[tuple[list, int, int]] = []  # (values, lo, hi) alongside
        self.held_want = False  # some held chunk asked for ITEM_RESULTS
        self.pos = 0  # stream position of the next item to arrive
        self.deadline = 0  # monotonic_ns by which the held items must run
        # Added to a chunk's deadline: this node's monotonic clock minus the caller's (a Ray
        # actor on another node, rayworker.py); 0 in a worker process of the caller's.
        self.clock_offset_ns = 0
        self.given_values: list | None = None  # held_values of the batch in do() (_flush)
        self.ask_at = self.base + ASK
        self.ask_seen = 0  # the last hand-back request answered (counters.ASK)
        # Either thread answers a request: the main one between batches, the inlet's reader
        # while a batch runs (_answer_while_busy); one at a time.
        self.answering = _thread.allocate_lock()
        self.sending = _thread.allocate_lock()  # a report is written whole, DONE counted once
        self.closed = False  # stop_answering() ran: the reader answers nothing more
        self.room = select.poll()  # room on the result pipe, for the reader's answer
        self.room.register(results.fileno(), select.POLLOUT)
        inlet.on_drain = self._answer_while_busy

    def run(self) -> bool:
        """Serve until STOP or EOF (False), or until due for recycling (True)."""
        while True:
            if self._worn_out():
                self._close_results()
                return True
            if self.cells[self.ask_at] != self.ask_seen:
                self._hand_back()
                # Holding the rest of a split chunk may have run batches up to recycling,
                # and dropped what was left of it (the caller re-sends it): look again
                # before the next frame, which would take the dropped items' positions.
                continue
            frame = self._next_frame()
            if frame is TICK:
                self._flush()
                continue
            if frame is None:  # EOF: the caller closed the pipe
                frame = tp.STOP_FRAME
            kind, flags, n, deadline = tp.read_to_worker(frame)
            if kind == tp.STOP:
                self._flush()
                self._close_results()
                return False
            if kind == tp.FLUSH:
                self._flush()
            elif kind == tp.DEFINE:
                DEFINITIONS[n] = memoryview(frame)[tp.TO_WORKER_SIZE:].tobytes()  # calls.py
            else:
                self._take_chunk(frame, flags, n, deadline + self.clock_offset_ns)
                self.inlet.recycle(frame)  # its items are unpickled (and maybe run) by now

    def _close_results(self) -> None:
        """Close the result pipe, once the reader answers no more requests."""
        self.stop_answering()
        self.results.close()

    def stop_answering(self) -> None:
        """The reader answers no request after this: the result pipe and the counters'
        memory are about to go."""
        with self.answering:
            self.closed = True

    def _worn_out(self) -> bool:
        """Recycle between batches: nothing is held, every report is sent."""
        if self.held_n:
            return False
        if self.max_batches is not None and self.batches >= self.max_batches:
            return True
        return self.max_rss is not None and self.batches > 0 and _rss() > self.max_rss

    def _next_frame(self) -> Any:
        if not self.held_n:
            return self.inlet.next(None)
        wait = (self.deadline - time.monotonic_ns()) / 1e9
        if wait <= 0:
            return TICK
        return self.inlet.next(wait)

    def _take_chunk(self, frame: bytes, flags: int, n: int, deadline: int) -> None:
        if self.inlet.at != self.pos and self._skip_to(self.inlet.at):
            return  # worn out: the chunk is never reported, and the caller re-sends it
        cells, base = self.cells, self.base
        # Unpickling runs user code (__reduce__, __setstate__): should it kill us, these
        # items are charged an attempt like a crash in do(), instead of being re-sent
        # forever as "only queued". Earlier batches are all reported by now.
        cells[base + B_START] = self.pos
        cells[base + B_END] = self.pos + n
        try:
            keys, values, sizes = tp.chunk_payload(frame, flags)
            self.one_key = bool(flags & tp.ONE_KEY)
            if self.one_key:
                keys = keys * n  # (in_stream_order reads each item's key)
            if len(keys) != n or len(values) != n:  # _hold pairs them up without a check
                raise ValueError(f"a chunk of {n} items held {len(keys)} keys and "
                                 f"{len(values)} values")
            cells[base + B_END] = self.pos  # in hand, not in do(): a death re-sends them
        except BaseException as exc:
            # The items exist only as bytes we cannot read: fail exactly this chunk.
            self._flush()
            error = failure(exc, "unpickling items in the worker")
            self._send(tp.caller_frame(tp.FAILED, self.pos, n, error), n)
            self.pos += n
            self.held_start = self.pos
            return
        end = self.pos + n
        try:
            self._hold_chunk(keys, values, sizes, flags, deadline)
        except BaseException as exc:  # grouping hashes and compares keys: user code
            self._fail_held(exc, end)

    def _skip_to(self, at: int) -> bool:
        """The reader handed back the chunks before this one (starting at ``at``) while a
        batch ran: what is held runs first, for a batch is one run of stream positions.
        True if that batch wore the worker out."""
        self._flush()
        self.pos = self.held_start = at
        return self._worn_out()

    def _hold_chunk(self, keys: list, values: list, sizes: list | None, flags: int,
                    deadline: int) -> None:
        want = bool(flags & tp.ITEM_RESULTS)
        # Large values: report where each key's items sit, not the values (the caller has
        # them in its ledger); sending them back doubled what crossed the pipes.
        self.layout = bool(flags & tp.OUT_OF_BAND) and not self.per_item
        if flags & tp.SOLO:
            self._flush()
            self._hold(keys, values, 0, len(keys), deadline, want)
            self._flush()
        elif sizes is None:
            self._hold_by_count(keys, values, deadline, want)
        else:
            self._hold_by_bytes(keys, values, sizes, deadline, want)
        if flags & tp.FULL:  # the caller knows no more items can join this batch
            self._flush()
        # What waits for more items, once the chunk is in: routing fills this batch first
        # (costs.Costs.least). Not a batch about to run (size=1: never anything).
        self.cells[self.base + HELD] = self.held_n

    def _clear_held(self) -> None:
        """Hold nothing (the items held went to do(), back to the caller, or failed)."""
        self.held, self.held_n, self.held_bytes = defaultdict(list), 0, 0
        self.held_parts, self.held_values, self.held_want = [], [], False
        self.cells[self.base + HELD] = 0

    def _fail_held(self, exc: BaseException, end: int) -> None:
        """A key's hash() or == raised while items were grouped: fail every item held and
        the rest of the chunk (stream positions [held_start, end)), as if do() had raised
        on them. Were the exception to end the worker instead, the items would count as
        only queued there, and be re-sent to the next worker without end."""
        start = self.held_start
        self._clear_held()
        self.pos = self.held_start = end
        error = failure(exc, "grouping items by key in the worker")
        self._send(tp.caller_frame(tp.FAILED, start, end - start, error), end - start)

    def _start_holding(self, deadline: int) -> None:
        if not self.held_n:
            self.held_start = self.pos
            self.deadline = deadline
        elif deadline < self.deadline:
            self.deadline = deadline

    def _hold(self, keys: list, values: list, lo: int, hi: int, deadline: int,
              want: bool) -> None:
        """Group items [lo, hi) of a chunk by key into the held batch, no size check."""
        self._start_holding(deadline)
        self.held_parts.append((keys, lo, hi))
        self.held_values.append((values, lo, hi))
        self.held_want = self.held_want or want
        self._group(self.held, keys, values, lo, hi)
        self.held_n += hi - lo
        self.pos += hi - lo

    def _group(self, held: defaultdict, keys: list, values: list, lo: int, hi: int) -> None:
        if self.one_key:  # the whole chunk has one key: one extend, in C
            held[keys[lo]].extend(islice(values, lo, hi))
            return
        if lo or hi < len(keys):
            keys, values = islice(keys, lo, hi), islice(values, lo, hi)
        if self.few_keys:
            # In C: each item's group (made by the defaultdict at its key's first item),
            # then one append per value: ~15 ns an item less than the loop below.
            _consume(map(_append, map(held.__getitem__, keys), values))
        else:
            # Mostly new keys: the defaultdict's miss path costs more than the loop saves.
            for key, value in zip(keys, values, strict=True):
                group = held.get(key)
                if group is None:
                    held[key] = [value]
                else:
                    group.append(value)

    def _hold_by_count(self, keys: list, values: list, deadline: int, want: bool) -> None:
        i, n = 0, len(keys)
        while i < n:
            take = min(n - i, self.size - self.held_n)
            self._hold(keys, values, i, i + take, deadline, want)
            i += take
            if self.held_n >= self.size:
                self._flush()
                if self._worn_out():
                    return  # the rest of the chunk is never reported: the caller re-sends it
                if i < n and self.cells[self.ask_at] != self.ask_seen:
                    i += self._hand_back(n - i)

    def _hand_back(self, rest: int = 0) -> int:
        """Answer the caller's request for items this worker has not started (steal.py):
        hand back the next ones in stream order, up to the number asked, unrun: what is
        held, then ``rest`` items of the chunk being taken (the next in the stream), then
        chunks still queued in the inlet. A RETURNED report names them, so the caller's
        ledger takes them as it takes a batch, and re-sends them from there (no values
        travel back). Returns how many of ``rest`` went back. Answered even when nothing
        goes: the caller waits for it before it asks this worker again."""
        with self.answering:
            ask = self.cells[self.ask_at]
            if ask == self.ask_seen:  # the reader answered it (_answer_while_busy)
                return 0
            self.ask_seen = ask
            want = ask & ASK_ITEMS
            start = self.pos - self.held_n
            given = self.held_n
            if given:
                self._clear_held()
            from_rest = min(rest, max(0, want - given))
            self.pos += from_rest
            given += from_rest
            after = None
            if given < want and from_rest == rest:
                # Past a gap the reader made, queued chunks would need a second report
                # (the caller takes one per request: steal.Stealer.answered), unless
                # nothing comes before the gap: then the report starts after it.
                if not given and self.inlet.front != self.pos:
                    start = self.pos = self.inlet.front
                if self.inlet.front == self.pos:
                    given, after = self._queued_back(want, given)
            self.held_start = self.pos
            self._send(tp.caller_frame(tp.RETURNED, start, given), given, given)
        if after is not None:
            self._hold_rest(*after)
        return from_rest

    def _answer_while_busy(self) -> None:
        """Reader thread, woken by the caller: answer a hand-back request with whole chunks
        still queued in the inlet, while the main thread runs a batch (which would answer
        only once that batch ends: up to a whole batch later, while the thief waits dry).
        What is held and the rest of the chunk being taken are the main thread's: if no
        whole chunk fits the request, the main thread answers it between batches.

        It never waits to write: while this thread waits it drains nothing, and a caller
        waiting for room in our item pipe would not read the report we wait to write. So
        it answers only if no report is being written and the result pipe has room (a
        report this small then goes in whole at once); else a later wake-up, or the main
        thread, answers."""
        if not self.answering.acquire(False):
            return
        try:
            if self.closed or self.cells[self.ask_at] == self.ask_seen:
                return
            if not self.sending.acquire(False):
                return
            try:
                if not self.room.poll(0):
                    return
                ask = self.cells[self.ask_at]
                start, given = self.inlet.hand_back(ask & ASK_ITEMS)
                if given:
                    self.ask_seen = ask
                    self._write(tp.caller_frame(tp.RETURNED, start, given), given, given)
            finally:
                self.sending.release()
        finally:
            self.answering.release()

    def _queued_back(self, want: int, given: int) -> tuple[int, tuple | None]:
        """Hand back whole chunks from the front of the inlet's queue (the pipe drained into
        it first), and the front part of the next one where a whole one is more than asked.
        Returns (items given in all, the rest of a part-given chunk to hold or None)."""
        inlet = self.inlet
        inlet.take_all()
        whole = inlet.hand_back(want - given)[1]
        given += whole
        self.pos += whole
        if given >= want:
            return given, None
        frame = inlet.next_chunk()
        if frame is None:
            return given, None
        _, flags, n, deadline = tp.read_to_worker(frame)
        part = self._tail_of(frame, flags, n, deadline + self.clock_offset_ns, want - given)
        if part is None:  # it does not unpickle: taken as usual, it fails as usual
            inlet.put_back(frame)
            return given, None
        self.pos += want - given
        return want, part

    def _tail_of(self, frame: Any, flags: int, n: int, deadline: int,
                 skip: int) -> tuple | None:
        """The items of a chunk after its first ``skip``, as _hold_rest takes them; None if
        it does not unpickle (user code: a death in there charges the chunk an attempt, as
        in _take_chunk)."""
        cells, base = self.cells, self.base
        cells[base + B_START] = self.pos
        cells[base + B_END] = self.pos + n
        try:
            keys, values, sizes = tp.chunk_payload(frame, flags)
            if flags & tp.ONE_KEY:
                keys = keys * n
            ok = len(keys) == n and len(values) == n
        except BaseException:
            ok = False
        cells[base + B_END] = self.pos
        if not ok:
            return None
        self.inlet.recycle(frame)
        return (keys[skip:], values[skip:], None if sizes is None else sizes[skip:], flags,
                deadline)

    def _hold_rest(self, keys: list, values: list, sizes: list | None, flags: int,
                   deadline: int) -> None:
        """Hold the part of a chunk that _hand_back kept (its start is self.pos)."""
        self.one_key = bool(flags & tp.ONE_KEY)
        end = self.pos + len(keys)
        try:
            self._hold_chunk(keys, values, sizes, flags, deadline)
        except BaseException as exc:  # grouping hashes and compares keys: user code
            self._fail_held(exc, end)

    def _hold_by_bytes(self, keys: list, values: list, sizes: list, deadline: int,
                       want: bool) -> None:
        limit = self.max_bytes
        for j, nbytes in enumerate(sizes):
            if self.held_n and self.held_bytes + nbytes > limit:
                self._flush()
            self._hold(keys, values, j, j + 1, deadline, want)
            self.held_bytes += nbytes
            if self.held_n >= self.size or self.held_bytes >= limit:
                self._flush()
                if self._worn_out():
                    return

    def _flush(self) -> None:
        """Run do() on everything held, report the outcome, and count it done."""
        n = self.held_n
        if not n:
            return
        batch, start, parts, want = (dict(self.held), self.held_start, self.held_parts,
                                     self.held_want)
        # How the next batch's items are grouped (_group), judged on this whole batch. Not
        # on each part as it is held: a part that starts a batch finds every key new, so
        # the small tail of a chunk (e.g. 96 items of 4096, after two batches of 2000)
        # chose the Python loop for the 1904 items that came next, with 100 keys in all
        # (W1: a fifth of the items, at ~76 ns each instead of ~53 in C).
        self.few_keys = 4 * len(batch) < n
        # Distinct keys may come back as results alone (_finished_frame), if do() left
        # its values as it got them: these are they, as the chunks brought them.
        self.given_values = self.held_values if self.want_values and len(batch) == n \
            else None
        self._clear_held()
        self.held_start = self.pos
        cells, base = self.cells, self.base
        if cells[base + CANCEL]:  # the caller stops: what is held is not started
            self._send(tp.caller_frame(tp.CANCELLED, start, n), n)
            return
        # The caller reads these after a death or on a timeout: which items were inside do().
        cells[base + B_START] = start
        cells[base + B_END] = start + n
        began = cells[base + BUSY_NS] = time.monotonic_ns()
        try:
            result = self.do(batch, self.state) if self.with_state else self.do(batch)
            results, error = checked_results(batch, result)
        except BaseException as exc:  # SystemExit too: do() ending the worker is a failure
            results, error = None, failure(exc)
        ns = time.monotonic_ns() - began
        frame = self._outcome_frame(start, n, batch, results, error, parts, want, ns)
        self.given_values = None
        cells[base + WORK_NS] += time.monotonic_ns() - began  # before DONE: the pacer's cost
        cells[base + BUSY_NS] = 0
        cells[base + BATCHES] += 1
        self.batches += 1
        self._send(frame, n)

    def _outcome_frame(self, start: int, n: int, batch: dict, results: dict | None,
                       error: BaseException | None, parts: list, want: bool, ns: int) -> bytes:
        if error is None:
            try:
                return self._finished_frame(start, n, batch, results, parts, want, ns)
            except BaseException as exc:  # a result's __reduce__ is user code
                cause = exc
            if self.per_item and results is not None:
                # Per-item outcomes: only the items whose results do not pickle fail.
                where = getattr(self.do, "where", "do()")
                with contextlib.suppress(BaseException):
                    return self._finished_frame(start, n, batch,
                                                fail_unpicklable(results, where), parts,
                                                want, ns)
            error = SerializationError(
                f"a result of do() cannot be pickled, {unpicklable(results, batch)}; "
                f"return picklable results (plain data), or None")
            error.__cause__ = cause
        return tp.caller_frame(tp.FAILED, start, n, error, ns)

    def _finished_frame(self, start: int, n: int, batch: dict, results: dict | None,
                        parts: list, want: bool, ns: int) -> bytes:
        """FINISHED: values and results as on_result and futures need them; with per-item
        outcomes, the items that failed alone apart (see transport)."""
        if results is not None and self.given_values is not None and not self.per_item \
                and one_each(parts, batch, n, self.given_values):
            # Every key one item: the results alone, in stream order (= the batch's key
            # order here, which checked_results kept); the caller has keys and values.
            items = list(chain.from_iterable(results.values()))
            return tp.caller_frame(tp.FINISHED, start, n, (None, None, items, None,
                                                           tp.ONE_EACH), ns)
        grouped = items = failed = None
        if results is not None:
            kept_batch, kept = batch, results
            if self.per_item:
                kept_batch, kept, failed = item_failures(batch, results, parts)
            if self.want_values:
                batch, grouped = kept_batch, list(kept.values())
            if want:
                items = in_stream_order(parts, results)
                for offset, _ in failed or ():
                    items[offset] = None
        values, layout = batch if self.want_values else None, None
        if values is not None and self.layout:
            layout = layout_of(parts, batch)
            values = None if layout is not None else values
        payload = (values, grouped, items, failed, layout)
        return tp.caller_frame(tp.FINISHED, start, n, payload, ns)

    def _send(self, frame: bytes, n: int, given: int = 0) -> None:
        """Report ``n`` items (``given`` of them handed back unrun)."""
        with self.sending:
            self._write(frame, n, given)

    def _write(self, frame: bytes, n: int, given: int) -> None:
        """_send() under ``sending``."""
        # Done before the report is sent: a caller that reacts to the result must already
        # see this worker's lower load. The caller's ledger, not this counter, keeps the
        # items safe should we die in between. GIVEN first, together with DONE: cost
        # estimators subtract it (costs.py).
        if given:
            self.cells[self.base + GIVEN] += given
        self.cells[self.base + DONE] += n
        try:
            tp.write_all(self.results.fileno(), frame)
        except OSError:  # the caller is gone; the watchdog ends us
            os._exit(EXIT_ORPHANED)
