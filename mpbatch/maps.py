"""One Executor.map() (caller process): a feeder thread schedules its calls, results come
back in bulk by index, and the consumer's iterator yields them in input order.

The calls go through the Batcher's bulk path (add_many) as ``(tag, args)`` items, ``tag``
being (map, index); the workers send back tags, not arguments (calls.py). With
``buffersize``, at most that many calls are scheduled whose results were not yet yielded,
as in ProcessPoolExecutor from Python 3.14: an endless iterable stays in bounded memory.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import TYPE_CHECKING, Any

from . import interrupts
from .errors import Closed

# A call's tag: its map's ident above TAG_SHIFT bits, its index in the map below (an int:
# it crosses the pipes twice, and an int pickles and sorts cheaply).
TAG_SHIFT = 40
TAG_INDEX = (1 << TAG_SHIFT) - 1
FEED_BLOCK = 512  # calls taken from the input at a time


def split_tag(tag: int) -> tuple[int, int]:
    """(map ident, index) of a call's tag."""
    return tag >> TAG_SHIFT, tag & TAG_INDEX


if TYPE_CHECKING:
    from .batcher import Batcher


class MapRun:
    """One map() call: its results come in by index, in bulk, and go out in input order.

    Its feeder thread schedules the calls; with ``buffersize``, only as many as the
    consumer has room for: ``room`` calls may go in now, and each result handed to the
    consumer makes room for one more (ProcessPoolExecutor's bound: at most ``buffersize``
    calls scheduled whose results were not yet yielded).
    """

    def __init__(self, ident: int, buffersize: int | None) -> None:
        self.ident = ident
        self.cond = threading.Condition()
        # index -> (ok, outcomes): a run of results of the calls from that index on (a batch's
        # worth, kept as the list that came), or one call's error.
        self.arrived: dict[int, tuple[bool, list]] = {}
        self.sent = 0  # calls scheduled so far
        self.total: int | None = None  # calls in all, once the feeder is done
        self.room = buffersize  # calls that may be scheduled now (None: no bound)
        self.wanted = True  # False: nobody will read the results: they are dropped
        self.stop = False  # the feeder schedules no more calls
        self.halted = False  # by shutdown()
        self.cancelled = False  # by shutdown(cancel_futures=True)
        self.over = False  # the executor has shut down: every outcome is in
        self.input_error: Exception | None = None  # what the iterables raised
        self.feed_error: BaseException | None = None  # raised at index total
        self.broken = False  # the Batcher stopped under the feeder: feed_error for any index
        self.feeder: threading.Thread | None = None
        self.rest: Iterator[tuple] | None = None  # the input shutdown() stopped feeding

    def deliver(self, outcomes: list[tuple[int, bool, Any]]) -> None:
        """(index, ok, result or error) of some calls (collector thread)."""
        with self.cond:
            if self.wanted:
                for index, ok, value in outcomes:
                    self.arrived[index] = (ok, [value])
                self.cond.notify_all()

    def deliver_run(self, index: int, results: list) -> None:
        """The results of the calls from ``index`` on (collector thread): stored as one
        run, with no step per call."""
        with self.cond:
            if self.wanted:
                self.arrived[index] = (True, results)
                self.cond.notify_all()

    def ready(self, index: int, deadline: float | None) -> list[tuple[bool, list]]:
        """The runs of outcomes from ``index`` on that are in, in order (at least one:
        waits for it); [] once the map has no call ``index``."""
        with self.cond:
            while index not in self.arrived:
                end = self.total is not None and index >= self.total
                if self.feed_error is not None and (end or self.broken):
                    raise self.feed_error
                if end:
                    return []
                if self.over:  # shutdown(cancel_futures=True) cancelled it
                    raise futures.CancelledError()
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError()
                interrupts.wait(self.cond, left)
            out = []
            arrived = self.arrived
            while index in arrived:
                run = arrived.pop(index)
                out.append(run)
                index += len(run[1])
            return out

    def taken(self, n: int = 1) -> None:
        """The consumer took n results: as many more calls may be scheduled (buffersize)."""
        with self.cond:
            self.room += n  # type: ignore[operator]
            self.cond.notify_all()

    def wait_for_room(self) -> int:
        """Feeder: how many more calls may be scheduled (waits for one, unless no more room
        can come: the map was dropped or shut down); 0: no more."""
        if self.room is None:
            return 0 if self.stop else -1  # -1: no bound
        with self.cond:
            while self.room == 0 and self.wanted and not (self.stop or self.halted):
                self.cond.wait()
            if self.stop:
                return 0
            n, self.room = self.room, 0
            return n

    def check_rest(self) -> None:
        """At the end of the calls scheduled: if shutdown() stopped the feeder with input
        left, raise as ProcessPoolExecutor's map() would: CancelledError for a call
        cancel_futures cancelled, RuntimeError where a buffersize map would submit the next
        call (consumer thread: the feeder is done with the input)."""
        rest, self.rest = self.rest, None
        if rest is not None and next(rest, None) is not None:
            if self.cancelled:
                raise futures.CancelledError()
            raise RuntimeError("cannot schedule new futures after shutdown")

    def close(self) -> None:
        """The consumer is done: results are dropped, no more calls go in."""
        self.drop(stop=True)

    def drop(self, stop: bool = False) -> None:
        """Nobody will read the results (they are dropped); ``stop``: no more calls go in,
        else those scheduled or granted room go in (all of them, without buffersize)."""
        with self.cond:
            self.wanted = False
            self.stop = self.stop or stop
            self.arrived.clear()
            self.cond.notify_all()

    def halt(self, cancel: bool) -> None:
        """shutdown(): no more room is granted (the calls granted it still go in, as those
        ProcessPoolExecutor's map() submitted did); ``cancel`` (cancel_futures=True): no
        more calls go in at all."""
        with self.cond:
            self.halted = True
            self.cancelled = cancel
            self.stop = self.stop or cancel
            self.cond.notify_all()

    def end(self) -> None:
        """The executor has shut down: every call scheduled has its outcome."""
        with self.cond:
            self.over = True
            self.cond.notify_all()

    # -- the feeder thread ---------------------------------------------------------------

    def feed(self, batcher: Batcher, token: int, calls: Iterator[tuple],
             refusal: Callable[[Closed], BaseException]) -> None:
        """Feeder thread: schedule the map's calls, within buffersize of its results.

        add_many() may hold the items it pulled until its block is full, so it is never
        given more than there is room for: it would wait with them in hand for room that
        only their results make. ``refusal``: the error for a Batcher that stopped.
        """
        error: BaseException | None = None
        first = 0
        try:
            while (n := self.wait_for_room()) != 0:
                first = self.sent
                piece = calls if n < 0 else itertools.islice(calls, n)
                batcher._add_columns(self._columns(token, piece))
                if n < 0 or self.sent - first < n:
                    break  # the input ran out (or raised), or the map stopped
            if self.halted:
                self.rest = calls  # the consumer finds out whether any are left
            error = self.input_error
        except Closed as exc:  # broken (the workers cannot start), or closed under it
            error = refusal(exc)
            self.broken = True
        except BaseException as exc:  # a call that does not pickle (SerializationError)
            error = exc
            accepted = getattr(exc, "accepted", None)
            if isinstance(accepted, int):
                self.sent = first + accepted  # the calls that went in; the rest did not
        finally:
            with self.cond:
                self.feed_error = error
                self.total = self.sent
                self.cond.notify_all()

    def _columns(self, token: int,
                 calls: Iterator[tuple]) -> Iterator[tuple[list, list, int]]:
        """The map's calls as blocks of (keys, values, first tag) for the Batcher, values
        the calls' arguments, each block made in C (a Python step per call, as add_many's
        unpacking of pairs, cost the caller ~0.3 us a call); a call's tag is its number,
        known from its segment's (Segment.tag), never sent. ``stop`` is looked at between
        blocks (a block taken from the input goes in: none is lost), and an input that
        raises ends them (the error is kept for the consumer, after the calls before it)."""
        base = self.ident << TAG_SHIFT
        while not self.stop:
            block: list[tuple] = []
            try:
                block.extend(itertools.islice(calls, FEED_BLOCK))  # keeps what came first
            except Exception as exc:
                self.input_error = exc
            if block:
                first = self.sent
                self.sent = first + len(block)
                yield [token] * len(block), block, base + first
            if len(block) < FEED_BLOCK or self.input_error is not None:
                return

    # -- the consumer ---------------------------------------------------------------------

    def results(self, deadline: float | None, forget: Callable[[], None]) -> Iterator[Any]:
        """The consumer's iterator. It keeps no reference to a result it yielded (CPython
        issue #14406): each goes straight from the queue to the consumer. ``forget``: the
        executor stops delivering to this map."""
        index = 0
        bounded = self.room is not None
        try:
            while ready := self.ready(index, deadline):
                for ok, outcomes in ready:
                    index += len(outcomes)
                    if not ok:
                        raise outcomes.pop()
                    outcomes.reverse()  # popped from the end: none stays referenced here
                    pop = outcomes.pop
                    while outcomes:
                        if bounded:
                            self.taken()
                        yield pop()
            self.check_rest()
        finally:  # done, raised, or closed by the consumer: no more calls, results dropped
            self.close()
            forget()
