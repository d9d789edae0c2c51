"""add_many()'s paths (caller process): blocks pulled, checked, pickled and sent whole.

Without max_bytes a block of pairs is pulled from the iterator as key and value columns
and pickled whole: under "least-loaded" as one chunk for the least-loaded worker, paced by
the work the workers report (dispatch.Pacer); under "round-robin" for the next worker;
either way of about one batch when items are worth stealing (Bulk.batch_blocks); under
"key" and "affinity" (KeyedBulk) split by key owner, a chunk for each. max_bytes
takes add_each(): the checked add() path, one item at a time, still chunked.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Iterable, Iterator
from itertools import islice
from typing import TYPE_CHECKING, Any

from .errors import Full, SerializationError
from .intake import CHUNK_BYTES, PLAIN, check_item
from .interrupts import held_interrupt
from .ledger import Segment
from .steal import ITEM_MIN_NS, batches_per_chunk
from .transport import chunk_frame, frame_size

if TYPE_CHECKING:
    from .batcher import Batcher
    from .collector import Collector

BLOCK_ITEMS = 4096  # most items in one block
PACE_WAIT = 1.0  # s add_many waits for the pacer at most (liveness, should a wake-up be missed)
# add_many reads the results itself (Collector.help) while its iterator yields an item in
# less than this on average (a generator, a list: not a queue that items trickle into, whose
# waits would hold the outcomes back).
HELP_ITEM_S = 20e-6
PACED_BLOCKS = 8  # ... and has not waited for the pacer for this many blocks (see Bulk)


class Bulk:
    """One add_many() call on the block path: pull, check, pickle and send blocks."""

    # Items worth stealing (steal.ITEM_MIN_NS): a block of one batch at most, or a few
    # short ones (steal.batches_per_chunk), since a block is one chunk. A worker's reader
    # thread hands back only whole chunks queued behind the batch in do(); the rest of the
    # chunk in do() is the main thread's, given only when that batch ends. With blocks of
    # two batches a thief on W3 sat idle 20-100 ms at the stream's end, waiting for a hot
    # batch to end.
    batch_blocks = True

    def __init__(self, batcher: Batcher, items: Any, deadline: float | None) -> None:
        self.b = batcher
        self.items = items
        self.deadline = deadline
        self.accepted = 0
        # Adapts: a block grows while pulling it from the iterator is quick, and shrinks when
        # it is not, since the first item of a block waits for the last (a slow iterator,
        # e.g. items arriving at 1,000/s, must not hold an item back for a whole block).
        self.block = 1
        self.item_s = 0.0  # s the iterator took per item, over recent blocks (0: none yet)
        self.item_bytes = 0.0  # pickled bytes per item of the last block (0: none yet)
        self.collector: Collector | None = None  # if this call may read results (_help)
        self.helping = False
        self.signals_checked = False
        # Blocks sent, and the block at which the pacer last held this call back: the
        # workers then have ~20 ms of work queued, so they, not this thread, set the pace,
        # and reports are better read as they come (by the collector thread). On W2, where
        # the pacer holds back most blocks, reading them between blocks cost ~9 % of the
        # wall. Held back at start-up (spawn workers still importing), it helps later.
        self.sent_blocks = 0
        self.paced_at = -PACED_BLOCKS
        self.one_each_at = 0  # the collector's count of such reports when this call began

    def run(self) -> int:
        collector = self.b._collector
        if collector is not None and collector.may_help():
            self.collector = collector
            self.one_each_at = collector.one_each
        try:
            return self._run()
        finally:
            self._stop_helping()

    def _help(self) -> None:
        """Read the results that arrived, here, while the iterator keeps up: one thread
        then does what two would share a GIL for (Collector.help)."""
        collector = self.collector
        if collector is None:
            return
        if collector.one_each != self.one_each_at:
            # Large reports of one item per key are rebuilt item by item in the caller: on
            # the thread that also feeds the workers that load cost DK 5-7 % of its wall.
            self._stop_helping()
            self.collector = None  # for the rest of this call
            return
        if (self.sent_blocks - self.paced_at <= PACED_BLOCKS
                or not 0 < self.item_s < HELP_ITEM_S):
            self._stop_helping()
            return
        if not self.helping:
            if not self.signals_checked:  # once a call
                self.signals_checked = True
                if not collector.signals_allow_help():
                    self.collector = None
                    return
            with held_interrupt():  # the flag and the collector's set change together
                self.helping = True
                collector.join_helpers(id(self))
        collector.help(id(self))

    def _stop_helping(self) -> None:
        """Before a wait, and at the end: the collector reads the results again."""
        if self.helping:
            assert self.collector is not None
            with held_interrupt():
                self.helping = False
                self.collector.leave_helpers(id(self))

    def _run(self) -> int:
        b = self.b
        # A block may take a quarter of interval to pull: the first item of a block waits
        # for the last, and must not wait past interval. (A tighter cap, 2 ms, kept halving
        # blocks whenever the collector took the GIL mid-pull, and cost W1 40 %.)
        budget = b._options.interval / 4
        limit = block_limit(b._options.batch_items)
        while True:
            room = min(self._paced(self._room()), self._steal_cap())
            started = time.monotonic()
            keys, values, bad = self._pull(min(room, self.block))
            if keys:
                self._resize(time.monotonic() - started, len(keys), budget, limit)
                self._send(keys, values, int(started * 1e9) + b._intake.interval_ns)
                self.sent_blocks += 1
                if self.item_bytes:  # large values: a block of about CHUNK_BYTES at most
                    self.block = max(1, min(self.block, int(CHUNK_BYTES / self.item_bytes)))
                self._help()
            if bad is not None:
                raise TypeError(f"add_many() takes (key, value) pairs; item {self.accepted} is "
                                f"{type(bad[0]).__name__}: {bad[0]!r:.80}")
            if not keys:
                return self.accepted

    def _resize(self, took: float, n: int, budget: float, limit: int) -> None:
        """The next block: twice this one after a quick pull, half after a slow one, and
        never more items than the iterator yields in ``budget`` at its recent pace (each
        block's time per item, averaged with halving weights). Without that cap, one quick
        pull of an item already due (a producer behind its own schedule) doubled the block,
        and the next block's first item waited for the one after it, a period late: on W4's
        schedule (an item a millisecond) 2-9 such blocks a run, against 0-1 with it."""
        per_item = took / n
        self.item_s = (self.item_s + per_item) / 2 if self.item_s else per_item
        block = min(limit, self.block * 2) if took <= budget else self.block // 2
        cap = int(budget / self.item_s) if self.item_s else limit
        self.block = max(1, min(block, cap))

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

        return self._wait_for_room(free, f"with {cap} items unfinished (buffer="
                                         f"{b._options.buffer} x {b._workers} workers)")

    def _wait_for_room(self, free: Any, where: str) -> int:
        """``free()`` (read under the lock) once it is above 0; Full past timeout=."""
        b = self.b
        if self.helping and free() <= 0:  # (a hint, unlocked) room may be in unread results
            self._help()
        with b._lock:
            if free() <= 0:
                b._refuse_to_wait_for_room_in_a_callback("add_many()")
                self._stop_helping()  # the collector frees room while this waits
            if free() <= 0 and not b._wait_until(lambda: free() > 0, self.deadline):
                b._ensure_running()  # raises Closed if close() or a failure stopped us
                raise Full(f"add_many() waited past its timeout {where}; {self.accepted} "
                           f"items went in", self.accepted)
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
            if allowed < pacer.least:
                self.paced_at = self.sent_blocks
                self._stop_helping()
                b._wait_until(lambda: pacer.allowance() >= pacer.least,
                              time.monotonic() + PACE_WAIT)
                allowed = pacer.allowance()
        # After PACE_WAIT without a wake-up, the floor goes anyway (two batches, three
        # under affinity): not one item.
        return min(room, allowed if allowed >= pacer.least else pacer.floor)

    def _steal_cap(self) -> int:
        """Most items in the next block: a chunk of items worth stealing is about one batch
        (see batch_blocks); BLOCK_ITEMS otherwise, and until a batch has reported a cost
        (blocks then grow from one item, see _resize)."""
        b = self.b
        if not (self.batch_blocks and b._options.steal and b._workers > 1):
            return BLOCK_ITEMS
        cost = b._router.costs.pooled  # a float written by one thread: a hint; 0: unknown
        if cost < ITEM_MIN_NS:
            return BLOCK_ITEMS
        size = b._options.batch_items
        return size * batches_per_chunk(cost, size)

    def _send(self, keys: list, values: list, deadline_ns: int, tag: int | None = None) -> None:
        try:
            if not PLAIN.issuperset(map(type, keys)):
                dict.fromkeys(keys)  # every key hashable
            parts = self._parts(keys, values)
            item_results = self.b._dispatcher.item_results
            frames = [chunk_frame(k, v, None, deadline_ns, item_results=item_results)
                      for _, k, v in parts]
            self.item_bytes = sum(map(frame_size, frames)) / len(keys)
        except Exception:
            self._send_good_prefix(keys, values, deadline_ns)
            return
        # Every part checked and pickled before any is sent: the items that went in are a
        # prefix of the stream, whatever raised.
        for (i, k, v), frame in zip(parts, frames, strict=True):
            self._post(i, k, v, frame, deadline_ns, tag)

    def _parts(self, keys: list, values: list) -> list[tuple[int | None, list, list]]:
        """The block as (worker, keys, values) parts; worker None: the least-loaded."""
        return [(None, keys, values)]

    def _post(self, i: int | None, keys: list, values: list, frame: bytes | list,
              deadline_ns: int, tag: int | None) -> None:
        b = self.b
        with held_interrupt(), b._lock:  # counted as accepted, in a ledger and written, or not
            b._ensure_running()  # close() began or it stopped: raise Closed, nothing of
            # this part taken
            seg = Segment(keys, values, None, None, 0, b._intake.epoch, deadline_ns, tag=tag)
            b._accounts.seal(len(keys), b._intake.epoch)
            if i is None:
                i = b._router.for_chunk()
            # The write happens outside the Batcher's lock (the collector settles outcomes
            # under it) but inside worker i's send lock, taken first: a flush() or close()
            # that follows still writes after this chunk.
            b._dispatcher.send(i, [seg], frame=frame, unlock=b._lock)
            self.accepted += len(keys)

    def _send_good_prefix(self, keys: list, values: list, deadline_ns: int) -> None:
        """The block did not check out: send the items before the first bad one, raise for it."""
        for j, (key, value) in enumerate(zip(keys, values, strict=True)):
            try:
                check_item(key, value, self.b._options.max_bytes)
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


class ColumnBulk(Bulk):
    """The block path for items that come as blocks of (keys, values, first tag) columns
    already (Executor.map: its calls, numbered in order): nothing is done per item in
    Python, and a segment's items are known by its first tag (Segment.tag)."""

    def __init__(self, batcher: Batcher, blocks: Iterator[tuple[list, list, int]],
                 deadline: float | None) -> None:
        super().__init__(batcher, None, deadline)
        self.blocks = blocks
        self.keys: list = []  # taken from ``blocks``, not yet sent
        self.values: list = []
        self.tag = 0  # the first one's
        self.pulled = 0  # the tag of the last block pulled
        self.block = block_limit(batcher._options.batch_items)  # pulling costs nothing

    def _pull(self, n: int) -> tuple[list, list, tuple | None]:
        keys, values = self.keys, self.values
        while len(keys) < n:
            block = next(self.blocks, None)
            if block is None:
                break
            if not keys:
                self.tag = block[2]
            keys += block[0]
            values += block[1]
        self.keys, self.values = keys[n:], values[n:]
        self.pulled, self.tag = self.tag, self.tag + n
        return keys[:n], values[:n], None

    def _send(self, keys: list, values: list, deadline_ns: int, tag: int | None = None) -> None:
        super()._send(keys, values, deadline_ns, self.pulled if tag is None else tag)



class KeyedBulk(Bulk):
    """The block path under "key" and "affinity" routing: each block is split by key owner
    in one pass and every part goes to its owner.

    A block is pulled only as large as the fullest worker has room for, so every part fits
    at once: what went in is always a prefix of the stream, even when timeout= runs out.
    """

    # A block is split by owner, so its parts do not line up with batches whatever its
    # size; a cap would only make more, smaller blocks, each split again (the keyed
    # workload's figures for "affinity" are with blocks of up to three batches).
    batch_blocks = False

    def _room(self) -> int:
        b = self.b
        buffer, workers, opened = b._options.buffer, b._workers, b._open
        held = b._dispatcher.held

        def free() -> int:
            return buffer - max(held(i) + len(opened[i].entries) for i in range(workers))

        return self._wait_for_room(free, f"for room in every worker (buffer={buffer}, "
                                         f"routing={b._options.routing!r}: a worker holds "
                                         f"{buffer} unfinished items)")

    def _parts(self, keys: list, values: list) -> list[tuple[int | None, list, list]]:
        workers = self.b._workers
        owners = self.b._router.owners(keys)
        ks: list[list] = [[] for _ in range(workers)]
        vs: list[list] = [[] for _ in range(workers)]
        for i, key, value in zip(owners, keys, values, strict=True):
            ks[i].append(key)
            vs[i].append(value)
        return [(i, ks[i], vs[i]) for i in range(workers) if ks[i]]


def block_limit(size: int) -> int:
    """Most items in one add_many block. A block goes to one worker: a few batches' worth at
    most, so that a run of costly items (hot keys) cannot pin seconds of work to one worker
    while another idles."""
    return min(BLOCK_ITEMS, max(4 * size, 64))


def pair(item: Any, index: int) -> tuple[Hashable, Any]:
    try:
        key, value = item
    except (TypeError, ValueError):
        raise TypeError(f"add_many() takes (key, value) pairs; item {index} is "
                        f"{type(item).__name__}: {item!r:.80}") from None
    return key, value


def add_each(b: Batcher, pairs: Iterable[tuple[Hashable, Any]], deadline: float | None) -> int:
    """add_many with max_bytes: per-item checks and sizes, still chunked."""
    accepted = 0
    for item in pairs:
        key, value = pair(item, accepted)
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            b._accept(key, value, None, True, left)
        except (Full, SerializationError) as exc:
            raise type(exc)(str(exc), accepted) from exc
        accepted += 1
    return accepted
