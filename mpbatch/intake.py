"""The caller's intake: item checks, the open chunks items join, and sealing (caller process).

An accepted item waits in an open chunk (one for least-loaded and round-robin, one per
worker for "key" and "affinity") until the chunk is sealed: at ``min(batch_items,
CHUNK_ITEMS)`` items or CHUNK_BYTES, when it is a full batch by max_bytes, when the buffer is
full, when half of interval has passed (the collector's timer), or on flush()/close().
Sealing moves the items into a Segment of the current flush epoch and hands it to the
dispatcher, which records it in a worker's ledger and writes it to that worker's pipe.
"""

from __future__ import annotations

import operator
import pickle
import time
from collections import deque
from collections.abc import Hashable
from concurrent.futures import Future
from itertools import repeat
from operator import itemgetter
from typing import TYPE_CHECKING, Any

from .dispatch import PER_WORKER
from .errors import Full, ItemTooLarge, SerializationError
from .interrupts import held_interrupt
from .ledger import Segment
from .stats import Accounts
from .transport import PROTOCOL

if TYPE_CHECKING:
    from .collector import Collector
    from .dispatch import Dispatcher, Router
    from .options import Options

CHUNK_ITEMS = 1024  # most items in one add() chunk; add_many blocks go up to bulk.BLOCK_ITEMS
CHUNK_BYTES = 1 << 20  # seal an add() chunk at about this many bytes of values
PLAIN = frozenset({int, str, bytes, float, bool, type(None)})  # always pickle, always hash
TEXT = frozenset({str, bytes})  # the PLAIN types whose size is their length
ELEMENT_BYTES = 9  # a float or an int below 2**63 in a pickled tuple, at most, framing aside


def plain_bytes(thing: Any) -> int | None:
    """A PLAIN key or value, or a flat tuple of them (which also always pickles and
    hashes): about the bytes it adds to a chunk (its length for a str or bytes, 0 for
    another PLAIN value; a tuple: ELEMENT_BYTES an element, plus the length of its str and
    bytes), a hint for sealing a chunk by bytes. None for anything else, which
    check_item() pickles to check."""
    kind = type(thing)
    if kind in PLAIN:
        return len(thing) if kind in TEXT else 0
    if kind is not tuple:
        return None
    types = set(map(type, thing))
    if not types <= PLAIN:
        return None
    size = ELEMENT_BYTES * len(thing)
    return size + sum(len(e) for e in thing if type(e) in TEXT) if types & TEXT else size


_first, _second = itemgetter(0), itemgetter(1)


def check_item(key: Hashable, value: Any, max_bytes: int | None) -> int | None:
    """Pickled size of ``value`` when it is needed; raise on a bad key or value."""
    kind = type(key)
    plain_key = kind in PLAIN or plain_bytes(key) is not None
    if not plain_key:
        try:
            hash(key)
        except TypeError:
            raise TypeError(f"key must be hashable (got {kind.__name__}: {key!r:.80}); "
                            f"use a str, int, bytes or tuple key") from None
    if max_bytes is None and plain_key:  # no pickle needed to know these pickle
        if type(value) in PLAIN:
            return len(value) if type(value) in TEXT else 16
        size = plain_bytes(value)
        if size is not None:
            return 16 + size
    try:
        blob = pickle.dumps(value, PROTOCOL)
        if not plain_key:
            pickle.dumps(key, PROTOCOL)
    except Exception as exc:
        raise SerializationError(
            f"the item with key {key!r:.80} cannot be pickled: {type(value).__name__} value "
            f"or {kind.__name__} key ({type(exc).__name__}: {exc}); items cross to worker "
            f"processes with pickle, so send plain data") from exc
    if max_bytes is not None and len(blob) > max_bytes:
        raise ItemTooLarge(
            f"the value for key {key!r:.80} is {len(blob)} bytes pickled, over "
            f"max_bytes={max_bytes}; split it or raise max_bytes")
    return len(blob)


class OpenChunk:
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
        self.worker = worker  # for "key" and "affinity": the worker this chunk goes to
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


class Intake:
    """The open chunks of one Batcher, the flush epoch, and the room left in its buffer.

    Every method that changes a chunk runs under the Batcher's lock (``accounts.lock``),
    but for add()'s lock-free append (see OpenChunk).
    """

    def __init__(self, options: Options, accounts: Accounts) -> None:
        self.options = options
        self.accounts = accounts
        self.open: list[OpenChunk] = []
        self.epoch = 0  # the flush() epoch new items are accepted in
        self.sealed_off = False  # close() took the last open items: nothing is sent now
        self.chunk_items = min(options.batch_items, CHUNK_ITEMS)
        self.interval_ns = int(options.interval * 1e9)
        self.capacity = 0  # buffer x workers, once started
        self.router: Router | None = None
        self.dispatcher: Dispatcher | None = None
        self.collector: Collector | None = None

    def attach(self, workers: int, router: Router, dispatcher: Dispatcher) -> None:
        """The workers start: open a chunk per destination (the collector, whose timer
        seals them, is set once it runs)."""
        self.router, self.dispatcher = router, dispatcher
        self.capacity = self.options.buffer * workers
        sized = self.options.max_bytes is not None
        chunks = workers if self.options.routing in PER_WORKER else 1
        self.open[:] = [OpenChunk(i, sized) for i in range(chunks)]
        if router.affinity is not None:
            router.affinity.waiting = self.open

    def held(self) -> int:
        """Items in open chunks (accepted, not sealed)."""
        return sum(len(c.entries) for c in self.open)

    def chunk_for(self, key: Hashable) -> OpenChunk:
        return self.open[self.router.for_key(key) if len(self.open) > 1 else 0]  # type: ignore

    def is_full(self, chunk: OpenChunk) -> bool:
        """No room (hold the lock): per worker for "key" and "affinity", all workers together
        otherwise."""
        if len(self.open) > 1:
            held = self.dispatcher.held(chunk.worker)  # type: ignore[union-attr]
            return held + len(chunk.entries) >= self.options.buffer
        return self.accounts.outstanding + len(chunk.entries) >= self.capacity

    def no_room(self, chunk: OpenChunk, workers: int, waited: float | None) -> Full:
        """The error for an item that found no room (after waiting ``waited`` seconds)."""
        buffer = self.options.buffer
        where = (f"worker {chunk.worker} holds {buffer} unfinished items "
                 f"(buffer={buffer}, routing={self.options.routing!r})" if len(self.open) > 1 else
                 f"{buffer * workers} items are unfinished "
                 f"(buffer={buffer} x {workers} workers)")
        after = "" if waited is None else f" after waiting {waited:g}s"
        return Full(f"no room{after}: {where}; retry later, pass block=True, or raise buffer=")

    def append(self, chunk: OpenChunk, key: Hashable, value: Any, fut: Future | None,
               nbytes: int | None, unlock: Any = None) -> None:
        """Add one checked item to ``chunk``, which has room; seal it if that fills it
        (hold the lock; ``unlock``: the lock, to let go while that chunk is written, see
        seal())."""
        if self._overflows(chunk, nbytes):
            self.seal(chunk, full=True)  # a full batch by bytes: it runs now
        n = chunk.add(key, value, fut, nbytes)
        limit = self.options.max_bytes
        full = self.is_full(chunk) or (limit is not None and chunk.nbytes >= limit)
        due = full or n >= self.chunk_items or chunk.nbytes >= CHUNK_BYTES
        if not chunk.opened:
            self.opened(chunk, wake=not due)
        if due:
            self.seal(chunk, full=full, unlock=unlock)  # the last thing done under the lock

    def _overflows(self, chunk: OpenChunk, nbytes: int | None) -> bool:
        """The open chunk is a full batch by max_bytes: this item would take it past.

        The worker runs a batch once the next item would not fit, so a chunk that stopped
        short of max_bytes must say it is full (hold the lock)."""
        limit = self.options.max_bytes
        return (limit is not None and bool(chunk.entries)
                and chunk.nbytes + (nbytes or 0) > limit)

    def opened(self, chunk: OpenChunk, wake: bool = True) -> None:
        """The first item of an open chunk: set its deadlines, wake the collector's timer.

        ``wake=False``: the chunk is sealed right after. Waking the collector for nothing
        costs more than the write itself: its thread takes the GIL while ours waits in
        the os.write() of the wakeup (size=1: ~40 us more from add() to the worker).
        """
        now = time.monotonic_ns()
        chunk.deadline = now + self.interval_ns
        chunk.seal_at = now + self.interval_ns // 2
        chunk.opened = True
        collector = self.collector
        if wake and chunk.seal_at < collector.sleep_until_ns:  # type: ignore[union-attr]
            collector.poke()  # type: ignore[union-attr]

    def unsealed(self) -> None:
        """A Ctrl-C landed between an item's append and its seal: the chunk may hold it
        unopened, or opened with wake=False. Wake the collector, whose timer then seals it
        within interval."""
        self.collector.poke()  # type: ignore[union-attr]

    def take(self, chunk: OpenChunk, sending: bool = True) -> Segment | None:
        """Seal ``chunk`` into a segment of the current epoch (hold the lock). ``sending``:
        it goes to a worker now, so its futures are running (cancel() fails from now on),
        and the items whose futures were cancelled are left out, cancelled."""
        deadline = chunk.deadline
        keys, values, sizes, futures = chunk.take()
        if chunk.entries:  # added while we took: they open the next chunk
            self.opened(chunk)
        if not keys:
            return None
        self.accounts.seal(len(keys), self.epoch)
        if futures is not None and sending:
            keys, values, sizes, futures = self._running(keys, values, sizes, futures)
            if not keys:
                return None
        return Segment(keys, values, sizes, futures, 0, self.epoch, deadline)

    def _running(self, keys: list, values: list, sizes: list | None,
                 futures: list) -> tuple[list, list, list | None, list]:
        """Mark futures running; drop (and count as cancelled) the items of cancelled ones."""
        keep = [j for j, fut in enumerate(futures)
                if fut is None or fut.set_running_or_notify_cancel()]
        if len(keep) == len(keys):
            return keys, values, sizes, futures
        self.accounts.settle([(self.epoch, len(keys) - len(keep))], ok=False, cancelled=True)
        return ([keys[j] for j in keep], [values[j] for j in keep],
                None if sizes is None else [sizes[j] for j in keep], [futures[j] for j in keep])

    def seal(self, chunk: OpenChunk, full: bool = False, unlock: Any = None) -> None:
        """Send an open chunk to its worker (hold the lock). ``full``: no more items can
        join its batch (max_bytes, or the buffer is full), so the worker runs it at once.

        ``unlock``: the lock, when nothing is done under it after this seal (add()). It is
        let go once the chunk's worker's send lock is taken and taken back after the
        write (Dispatcher.send), so the write, which waits while that worker's pipe is
        full, does not keep the collector from settling outcomes: large values used to
        stall the whole pipeline there (the worker blocked writing results the collector
        could not read). The caller still takes and gives the lock back with ``with``: a
        Ctrl-C cannot leave it held.
        """
        if self.sealed_off:
            return  # the workers are gone; a late add() takes its item back (withdrawn)
        with held_interrupt():  # from the open chunk to a ledger, whole or not at all
            seg = self.take(chunk)
            if seg is None:
                return  # (once the Batcher stopped, the dispatcher dead-letters it)
            router = self.router
            i = chunk.worker if len(self.open) > 1 else router.for_chunk()  # type: ignore
            self.dispatcher.send(i, [seg], full=full, unlock=unlock)  # type: ignore

    def seal_all(self) -> None:
        """Send every open chunk now (hold the lock): flush() and close()."""
        for chunk in self.open:
            self.seal(chunk)

    def take_all(self) -> list[Segment]:
        """Take the items of every open chunk, never to be sent (hold the lock): close()
        dead-letters them once the workers are gone."""
        leftovers = [seg for chunk in self.open for seg in [self.take(chunk, False)] if seg]
        self.sealed_off = True  # nothing is sealed after the leftovers: Closing.withdrawn
        return leftovers

    def next_seal_ns(self) -> int | None:
        """When the oldest open chunk must be sent (hold the lock)."""
        due = [c.seal_at for c in self.open if c.entries]
        return min(due) if due else None

    def seal_due(self, now: int) -> None:
        """Send open chunks whose time has come (hold the lock); the collector's timer."""
        for chunk in self.open:
            if chunk.entries and chunk.seal_at <= now:
                self.seal(chunk)
