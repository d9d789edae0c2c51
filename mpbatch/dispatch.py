"""Routing policies, the Pacer and the Dispatcher that writes chunks to workers (caller).

The dispatcher never takes a lock per item: it routes by reading the shared-memory load
counters (counters.py), where each cell has one writer (``sent`` the dispatcher, ``done``
and the batch cells worker i), and a reader that sees a slightly stale value only routes a
little less evenly.
"""

from __future__ import annotations

import pickle
import zlib
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

from .costs import Costs
from .counters import CELLS, SENT, LoadCounters
from .errors import SerializationError, described, shown
from .ledger import Segment, WorkerLedger, batch_cuts, cut, items_of
from .transport import FLUSH_WIRE, PROTOCOL, chunk_frame, define_frame

if TYPE_CHECKING:
    from .affinity import Affinity
    from .lifecycle import Pool

ROUTINGS = ("least-loaded", "key", "affinity", "round-robin")
PER_WORKER = ("key", "affinity")  # routings that choose a worker per item, not per chunk
INT_MASK = 0x7FFFFFFFFFFFFFFF  # an int key's hash: itself, made non-negative
HORIZON_NS = 20_000_000  # add_many keeps about this much estimated work queued per worker
PACED_BATCHES = 2  # ... and never less than this many batches (Pacer.floor)
SPREAD_PACED_BATCHES = 3  # ... under "affinity", whose blocks spread over keys' homes


GOLDEN = 0x9E3779B97F4A7C15  # 2**64 / the golden ratio (Fibonacci hashing)
M64 = 0xFFFFFFFFFFFFFFFF


def key_hash(key: Hashable) -> int:
    """A hash of ``key`` that is the same in every process and every run.

    Python's ``hash()`` of str and bytes is salted per process (PYTHONHASHSEED), so it
    cannot pin a key to a worker across a restart or a replay. The raw hash (crc32 of the
    key's bytes, an int key itself) is spread before it is taken modulo the workers: crc32
    is linear, so ``crc32(k) % 2`` put "k0".."k3" on one worker of two and "k4".."k7" on
    the other, and even ids would all go to worker 0.
    """
    kind = type(key)
    if kind is str:
        raw = zlib.crc32(key.encode("utf-8", "surrogatepass"))  # type: ignore[union-attr]
    elif kind is int:
        raw = key & INT_MASK  # type: ignore[operator]
    elif kind is bytes:
        raw = zlib.crc32(key)  # type: ignore[arg-type]
    else:
        raw = zlib.crc32(pickle.dumps(key, protocol=4))
    return (raw * GOLDEN & M64) >> 32  # the top half of the product: every bit moves it


class Router:
    """Picks the worker for a chunk (least-loaded, round-robin) or for a key ("key",
    "affinity": see affinity.py)."""

    _KEY_CACHE_MAX = 65_536  # bounded: a stream of distinct keys must not grow memory

    def __init__(self, routing: str, counters: LoadCounters,
                 affinity: Affinity | None = None, costs: Costs | None = None) -> None:
        self.routing = routing
        self.counters = counters
        self.costs = costs or Costs(counters)
        self.workers = counters.workers
        self._next = 0
        self._key_cache: dict[Hashable, int] = {}
        self.affinity = affinity
        if affinity is not None:  # "affinity": a key's worker is its home, which can move
            self.for_key = affinity.for_key  # type: ignore[method-assign]
            self.owners = affinity.owners  # type: ignore[method-assign]

    def least_loaded(self, fill: bool = True) -> int:
        """The worker with the least work queued ahead: items sent but not reported, less
        those of the batch it is filling (not with ``fill=False``), times its cost per item
        (costs.Costs.least); O(workers) per chunk."""
        return self.costs.least(fill)

    def round_robin(self) -> int:
        i = self._next
        self._next = (i + 1) % self.workers
        return i

    def for_chunk(self) -> int:
        """The worker for a chunk under "least-loaded" or "round-robin" ("key" routes by
        key before items form a chunk)."""
        return self.round_robin() if self.routing == "round-robin" else self.least_loaded()

    def owners(self, keys: list) -> list[int]:
        """for_key() of every key, in bulk (add_many's blocks). str, int and bytes keys are
        hashed directly: for them the cache costs more than the hash it saves."""
        workers = self.workers
        kinds = set(map(type, keys))
        if kinds == {str}:  # key_hash(), inlined
            crc32 = zlib.crc32
            return [((crc32(k.encode("utf-8", "surrogatepass")) * GOLDEN & M64) >> 32)
                    % workers for k in keys]
        if kinds == {int}:
            return [(((k & INT_MASK) * GOLDEN & M64) >> 32) % workers for k in keys]
        if kinds <= {str, int, bytes}:
            return [key_hash(k) % workers for k in keys]
        return list(map(self.for_key, keys))

    def for_key(self, key: Hashable) -> int:
        """The worker that owns ``key``: one key always goes to one worker."""
        i = self._key_cache.get(key)
        if i is not None:
            return i
        i = key_hash(key) % self.workers
        if len(self._key_cache) >= self._KEY_CACHE_MAX:
            self._key_cache.clear()
        self._key_cache[key] = i
        return i


class Pacer:
    """How many more items add_many may send now: about HORIZON_NS of estimated work ahead
    of the least-loaded worker (by queued items), at the cost per item the workers report,
    pooled over all of them (costs.py).

    Sending further ahead only moves items from the caller's iterator into a worker's
    queue, where they can no longer go to whichever worker frees up first: a run of costly
    items arriving late (hot keys) would be split by item count, and one worker would
    finish long after the other. Items of ~2 us or less are not held back (the horizon
    then spans more than the default buffer); at 100 us it is 200 items per worker.

    The pooled cost, not each worker's own: the block may go to keys' homes ("affinity"),
    not to the worker the allowance was reckoned for, and a worker whose own estimate is
    low but stale (stuck in a long batch) must not open the gate for everyone.
    """

    def __init__(self, costs: Costs, size: int, first: int,
                 batches: int = PACED_BATCHES) -> None:
        self.costs = costs
        # One batch in do() and the whole next one queued behind it: a worker that ends a
        # batch starts the next at once. With half of it queued, the worker waited for the
        # caller to top it up (a result read, a wake-up, a pull, a write): on W2 at
        # size=200 each worker sat idle 26-74 ms between batches per run, 10-21 after.
        # Under "affinity" (SPREAD_PACED_BATCHES) a block reckoned for the least-loaded
        # worker spreads over keys' homes, so that worker got part of it and its next
        # batch was often short when the one in do() ended: on benchmarks/keyed.py each
        # worker waited ~60 ms per run for the caller, ~30 with a third batch.
        self.floor = batches * size
        # A smaller allowance waits for the next batch to end. Sent at once, it made ever
        # smaller blocks: under "affinity" a block spreads over keys' homes, so the
        # allowance (reckoned for the least-loaded worker) shrank by only part of each
        # block. benchmarks/keyed.py sent 30,000 items in 1,218 blocks, half of them of 5
        # items or fewer, each one pickle, frame and write.
        self.least = max(1, size // 2)
        # Items per worker before any cost is known: at least the floor, or the first
        # batch would wait for interval to run.
        self.first = max(first, self.floor)

    @property
    def cost(self) -> float:
        """ns per item over all workers, smoothed over recent batches; 0: not known yet."""
        return self.costs.pooled

    def allowance(self) -> int:
        """Items the least-loaded worker may receive now (under ``least``: add_many waits
        for a batch to end)."""
        costs = self.costs
        costs.update()
        load = costs.counters.load
        least = min(load(i) for i in range(costs.workers))
        cost = costs.pooled
        cap = max(self.floor, HORIZON_NS / cost) if cost else self.first
        return int(cap) - least


class Dispatcher:
    """Writes chunks of segments to workers, recording each in that worker's ledger first.

    Used by the caller's add path (fresh items) and by the collector (retries and items
    re-sent after a death). ``reject`` dead-letters items that turn out not to pickle.
    """

    def __init__(self, pool: Pool, counters: LoadCounters, router: Router) -> None:
        self.pool = pool
        self.counters = counters
        self.router = router
        self.ledgers = [WorkerLedger() for _ in range(counters.workers)]
        # Objects every worker must have before a chunk that uses them (Executor's
        # functions): DEFINE frames, sent to a worker ahead of its next chunk.
        self.definitions: list[tuple[int, bytes]] = []
        self.defined = [0] * counters.workers  # definitions worker i has (this incarnation)
        self.reject: Callable[[list[Segment], BaseException], None] = _no_reject
        self.stopped: BaseException | None = None  # the Batcher stopped: refuse every send
        # Every chunk asks for one result per item, in stream order (Executor.map: results
        # are matched to the caller's own values, which need not travel back).
        self.item_results = False

    def held(self, i: int) -> int:
        return self.ledgers[i].held

    def send(self, i: int, segments: list[Segment], solo: bool = False,
             frame: bytes | list | None = None, unlock: Any = None, full: bool = False) -> None:
        """Write ``segments`` to worker i as one chunk (``frame``: already pickled; ``full``:
        the worker runs what it holds once this chunk is in, see transport.FULL).

        ``unlock``: a lock the caller holds, let go as soon as worker i's send lock is
        taken and taken back once the write is done (send lock let go first: no order of
        the two is ever held the other way round), so that the write, which may wait for
        a busy worker, does not hold it up; what is sent to worker i stays in order, under
        its send lock. Call it inside held_interrupt(): a Ctrl-C must not stop the lock
        from being taken back.
        """
        if frame is None:
            segments, frame = self._frame(segments, solo, full)
            if frame is None:
                return
        released = False
        try:
            with self.pool.send_locks[i]:
                if unlock is not None:
                    unlock.release()
                    released = True
                stopped = self.stopped  # read under the send lock: see Collector._halt
                if stopped is None:
                    self.send_held(i, segments, frame)
        finally:
            if released:
                unlock.acquire()
        if stopped is not None:
            self.reject(segments, stopped)  # outside the send lock, as settling must be

    def send_held(self, i: int, segments: list[Segment], frame: bytes | list) -> None:
        """send() of a pickled chunk (``chunk_of``), for a caller that holds worker i's send
        lock already."""
        if self.defined[i] < len(self.definitions):
            self._define(i)
        ledger = self.ledgers[i]
        for seg in segments:
            ledger.append(seg)
        n = sum(len(s) for s in segments)
        cells, at = self.counters.cells, CELLS * i + SENT
        cells[at] += n
        self.pool.send(i, frame)  # a failure means a death: the collector re-sends

    def define(self, token: int, blob: bytes) -> None:
        """Make ``blob`` (cloudpickle of an object) worker.defined(token) in every worker,
        each getting it once, before its next chunk (any thread)."""
        self.definitions.append((token, blob))

    def _define(self, i: int) -> None:
        """Send worker i the definitions it lacks (hold its send lock)."""
        start = self.defined[i]
        pending = self.definitions[start:]  # one that another thread adds now: next time
        for token, blob in pending:
            self.pool.send(i, define_frame(token, blob))
        self.defined[i] = start + len(pending)

    def send_routed(self, segments: list[Segment], solo: bool = False,
                    full: bool = False,
                    batch: tuple[int, int | None, int] | None = None) -> list[int]:
        """Route items that are already accepted (retries, re-sends) and send them
        (``full``: the worker runs them at once, see send()). ``batch``: (size, max_bytes,
        batches per chunk), to send them as chunks of whole batches (see _send_each).

        Returns the workers they went to.
        """
        if self.router.routing != "key":
            # A solo chunk runs after what the worker holds, alone: that part batch is
            # work ahead of it, and would run short.
            i = self.router.least_loaded(fill=not solo)
            self._send_each(i, segments, solo, full, batch)
            return [i]
        by_worker: dict[int, list[Segment]] = {}
        for seg in segments:
            try:
                parts = _split_by_key_owner(seg, self.router)
            except BaseException as exc:  # a key's hash, == or pickle raised (user code)
                self.reject([seg], SerializationError(
                    f"items could not be routed by key again ({described(exc)}); a key must "
                    f"hash, compare and pickle the same way every time"))
                continue
            for i, part in parts:
                by_worker.setdefault(i, []).append(part)
        for i, parts in by_worker.items():
            self._send_each(i, parts, solo, full, batch)
        return list(by_worker)

    def _send_each(self, i: int, segments: list[Segment], solo: bool, full: bool,
                   batch: tuple[int, int | None, int] | None) -> None:
        """send() as one chunk, or (``batch``) as chunks of the batches the worker will run.

        A worker's reader thread hands back only whole chunks queued behind the batch in
        do() (steal.py); the rest of the chunk being run is the main thread's, given only
        between batches. Stolen items sent as one chunk (2,000 items on W3) left the next
        request to that worker waiting for its batch to end: 20-100 ms of a hot batch, with
        the thief idle.
        """
        if batch is None:
            self.send(i, segments, solo, full=full)
            return
        size, max_bytes, per_chunk = batch
        at = batch_cuts(segments, size, max_bytes)[per_chunk - 1::per_chunk]
        for piece in cut(segments, at):
            self.send(i, piece, solo, full=full)

    def flush(self, i: int) -> None:
        """Ask worker i to run what it holds now."""
        with self.pool.send_locks[i]:
            self.pool.send(i, FLUSH_WIRE)

    def _frame(self, segments: list[Segment], solo: bool,
               full: bool = False) -> tuple[list[Segment], bytes | None]:
        """The CHUNK frame; items that no longer pickle are split off and rejected."""
        try:
            return segments, self.chunk_of(segments, solo, full)
        # A value's __reduce__ is user code, and may raise anything (SystemExit too): on the
        # collector thread that must cost only its item. (No Ctrl-C is raised here: senders
        # on the main thread hold it, see interrupts.py.)
        except BaseException as exc:
            good = self._drop_unpicklable(segments)
            if len(good) == sum(len(s) for s in segments):
                # each pickles alone, not together (depth): give up
                self.reject(segments, SerializationError(
                    f"a chunk of {len(good)} items cannot be pickled ({described(exc)}); the "
                    f"items were dead-lettered"))
                return [], None
            if not good:
                return good, None
            return self._frame(good, solo, full)

    def chunk_of(self, segments: list[Segment], solo: bool = False,
                 full: bool = False) -> bytes | list:
        """The CHUNK frame of these segments, as one chunk; raises if an item does not
        pickle."""
        keys, values = items_of(segments)
        sizes = None
        if segments[0].sizes is not None:
            sizes = [n for s in segments for n in s.sizes]  # type: ignore[union-attr]
        deadline = min(s.deadline_ns for s in segments)
        items = self.item_results or any(s.futures is not None for s in segments)
        return chunk_frame(keys, values, sizes, deadline, solo, items, full)

    def _drop_unpicklable(self, segments: list[Segment]) -> list[Segment]:
        """The slow path: an item that passed add() no longer pickles (mutated since)."""
        good: list[Segment] = []
        for seg in segments:
            keep = []
            for j, (key, value) in enumerate(seg.pairs()):
                try:
                    pickle.dumps((key, value), PROTOCOL)
                    keep.append(j)
                except BaseException as exc:
                    bad = seg.part(j, j + 1)
                    self.reject([bad], SerializationError(
                        f"the item with key {shown(key)} ({type(value).__name__}) no longer "
                        f"pickles when its chunk is sent ({described(exc)}); an item must "
                        f"pickle every time: do not change a value after add()"))
            for j in keep:
                good.append(seg.part(j, j + 1))
        return good


def _split_by_key_owner(seg: Segment, router: Router) -> list[tuple[int, Segment]]:
    owners = [router.for_key(key) for key in seg.keys]
    if len(set(owners)) == 1:
        return [(owners[0], seg)]
    out = []
    start = 0
    for j in range(1, len(owners) + 1):
        if j == len(owners) or owners[j] != owners[start]:
            out.append((owners[start], seg.part(start, j)))
            start = j
    return out


def _no_reject(segments: list[Segment], error: BaseException) -> None:
    raise error
