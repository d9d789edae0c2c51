"""The in-flight ledger: every item sent to a worker, kept until its outcome is known (caller).

Items travel in Segments (runs of items that share attempts, flush epoch and deadline).
A worker's ledger lists its segments in the order they were sent, each at its position in
the worker's item stream, so a report "[start, start+n) finished" names its items without
a per-item id crossing the pipe.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from .deadletters import UncomparableKey


@dataclass(slots=True)
class Segment:
    """A run of accepted items that share their bookkeeping."""

    keys: list[Any]
    """Keys in add() order (columns, not pairs: no tuple per item stays alive)."""
    values: list[Any]
    """The values, in the same order."""
    sizes: list[int] | None
    """Pickled size of each value; only when max_bytes is set."""
    futures: list[Future | None] | None
    """A Future per item where submit() made one; None when no item has one."""
    attempts: int
    """Attempts of do() already spent on these items."""
    epoch: int
    """The flush() epoch the items were accepted in."""
    deadline_ns: int
    """monotonic_ns by which the first item should be inside do() (interval)."""
    isolation: Isolation | None = None
    """Set once the items were in a batch that crashed: the split budget they share."""
    tag: int | None = None
    """An int that numbers these items, the first one's (Executor.map: its calls, which
    come in order); None for items with no number."""

    def __len__(self) -> int:
        return len(self.keys)

    def pairs(self) -> zip:
        """(key, value) of each item, in order."""
        return zip(self.keys, self.values, strict=True)

    def part(self, lo: int, hi: int) -> Segment:
        """Items [lo, hi) as a segment of their own (self when that is all of it)."""
        if lo == 0 and hi == len(self.keys):
            return self
        return Segment(self.keys[lo:hi], self.values[lo:hi],
                       None if self.sizes is None else self.sizes[lo:hi],
                       None if self.futures is None else self.futures[lo:hi],
                       self.attempts, self.epoch, self.deadline_ns, self.isolation,
                       None if self.tag is None else self.tag + lo)


class Isolation:
    """The split budget of one batch that crashed its worker or timed out.

    Poison-item isolation re-runs the halves of such a batch as batches of their own, and
    the halves of a half that crashes again, so that innocent items succeed and only the
    item that crashes is charged an attempt. Every split costs two do() calls (and a worker
    restart for each half that crashes); all pieces of one batch share this budget of
    4 * ceil(log2(n)) + 2 calls: enough to corner two culprits, while a do() that crashes
    on everything stops splitting after a few calls and is charged as usual.
    """

    __slots__ = ("left",)

    def __init__(self, items: int) -> None:
        self.left = 4 * max(1, math.ceil(math.log2(items))) + 2

    def spend(self) -> bool:
        """Pay for one split (two do() calls); False when the budget is gone."""
        if self.left < 2:
            return False
        self.left -= 2
        return True


def halves(segments: list[Segment]) -> tuple[list[Segment], list[Segment]]:
    """Split segments into two runs of (nearly) equal item counts, order kept."""
    left, *right = cut(segments, [sum(len(s) for s in segments) // 2])
    return left, right[0] if right else []


def cut(segments: list[Segment], at: Iterable[int]) -> list[list[Segment]]:
    """``segments`` cut at item positions ``at``, order kept: a run of segments before the
    first position, between each two, and after the last. Positions strictly ascending,
    inside (0, total): else a run may be empty (and a position past the end is ignored)."""
    pieces: list[list[Segment]] = [[]]
    marks = iter(at)
    mark = next(marks, None)
    pos = 0
    for seg in segments:
        lo, n = 0, len(seg)
        while mark is not None and mark < pos + n:
            if mark - pos > lo:
                pieces[-1].append(seg.part(lo, mark - pos))
            lo = mark - pos
            pieces.append([])
            mark = next(marks, None)
        if n > lo or not n:  # (an empty segment is kept, as halves() always did)
            pieces[-1].append(seg.part(lo, n))
        pos += n
    return pieces


def batch_cuts(segments: list[Segment], size: int, max_bytes: int | None) -> list[int]:
    """Where a worker holding only ``segments`` would run a batch, by count and by bytes as
    worker._Loop._hold_by_count and _hold_by_bytes do: cut there, each run is one batch."""
    total = sum(len(s) for s in segments)
    if max_bytes is None or any(s.sizes is None for s in segments):
        return list(range(size, total, size))
    cuts, held_n, held_bytes = [], 0, 0
    for j, nbytes in enumerate(n for s in segments for n in s.sizes):  # type: ignore[union-attr]
        if held_n and held_bytes + nbytes > max_bytes:
            cuts.append(j)
            held_n = held_bytes = 0
        held_n += 1
        held_bytes += nbytes
        if held_n >= size or held_bytes >= max_bytes:
            cuts.append(j + 1)
            held_n = held_bytes = 0
    return [c for c in cuts if c < total]


def items_of(segments: list[Segment]) -> tuple[list, list]:
    """The keys and values of ``segments``, in stream order (a lone segment's own lists)."""
    if len(segments) == 1:
        return segments[0].keys, segments[0].values
    return [k for s in segments for k in s.keys], [v for s in segments for v in s.values]


def merged_batch(segments: list[Segment]) -> dict[Any, list[Any]]:
    """key -> values of all these items, as do() would receive them (for a DeadLetter).

    If grouping raises (a key's hash() or == is user code, and may raise anything, even
    SystemExit, on the thread that dead-letters), each key object keeps its own entry,
    under an UncomparableKey that holds it: the items are kept, never lost.
    """
    grouped: dict[Any, list[Any]] = {}
    try:
        for seg in segments:
            for key, value in seg.pairs():
                grouped.setdefault(key, []).append(value)
    except BaseException:
        by_object: dict[int, tuple[Any, list[Any]]] = {}
        for seg in segments:
            for key, value in seg.pairs():
                by_object.setdefault(id(key), (key, []))[1].append(value)
        return {UncomparableKey(key): values for key, values in by_object.values()}
    return grouped


class WorkerLedger:
    """Segments sent to one worker process (one incarnation) and not yet reported.

    No lock: the caller appends on the right (under the worker's send lock), the collector
    takes from the left, and each end of a deque is atomic under the GIL. A lock here cost
    more than the work: whenever the collector found it held, it gave up the GIL and could
    wait a whole switch interval to get it back. take_all() runs under the send lock.
    """

    def __init__(self) -> None:
        self._entries: deque[tuple[int, Segment]] = deque()  # (stream start, segment)
        self.sent = 0  # stream position of the next item sent; writer: the sender
        self.reported = 0  # every item before this position has an outcome; writer: collector
        # Ranges reported ahead of ``reported`` (items handed back while the batch before
        # them ran: steal.py), as (start, end), ascending; and how many items they hold.
        self._ahead: list[tuple[int, int]] = []
        self._ahead_n = 0

    @property
    def held(self) -> int:
        """Items sent to this worker whose outcome is not known."""
        return self.sent - self.reported - self._ahead_n

    def append(self, segment: Segment) -> None:
        """Record a segment about to be written to the worker's pipe (under its send lock)."""
        self._entries.append((self.sent, segment))
        self.sent += len(segment)

    def take(self, start: int, n: int) -> list[Segment]:
        """Remove and return the items of stream positions [start, start + n).

        Reports arrive in stream order, since a worker runs its batches one after another,
        but for items it hands back while a batch before them runs (_take_ahead).
        """
        end = start + n
        if start > self.reported and n:
            return self._take_ahead(start, end)
        out: list[Segment] = []
        entries = self._entries
        pos = max(start, self.reported)
        while entries and pos < end:
            first, seg = entries[0]
            seg_end = first + len(seg)
            out.append(seg.part(pos - first, min(end, seg_end) - first))
            if seg_end <= end:
                entries.popleft()
            pos = min(end, seg_end)
        self.reported = max(self.reported, end)
        while self._ahead and self._ahead[0][0] <= self.reported:
            first, last = self._ahead.pop(0)
            self._ahead_n -= last - first
            self.reported = max(self.reported, last)
        return out

    def _take_ahead(self, start: int, end: int) -> list[Segment]:
        """take() of items after some that have no outcome yet. Only the left end of the
        deque is touched (the sender appends at the right meanwhile): the entries up to
        ``end`` are taken off, and what lies outside [start, end) is put back, in order."""
        entries = self._entries
        front: list[tuple[int, Segment]] = []
        while entries and entries[0][0] < end:
            front.append(entries.popleft())
        out: list[Segment] = []
        kept: list[tuple[int, Segment]] = []
        for first, seg in front:
            seg_end = first + len(seg)
            if seg_end <= start:
                kept.append((first, seg))
                continue
            if first < start:
                kept.append((first, seg.part(0, start - first)))
            out.append(seg.part(max(start, first) - first, min(end, seg_end) - first))
            if seg_end > end:
                kept.append((end, seg.part(end - first, len(seg))))
        entries.extendleft(reversed(kept))
        self._ahead.append((start, end))
        self._ahead.sort()
        self._ahead_n += end - start
        return out

    def take_all(self) -> list[tuple[int, Segment]]:
        """Remove every unreported item, as (stream position, segment): the worker is gone."""
        out = []
        for first, seg in self._entries:
            lo = max(0, self.reported - first)
            if lo < len(seg):
                out.append((first + lo, seg.part(lo, len(seg))))
        self._entries.clear()
        self.reported = self.sent
        self._ahead, self._ahead_n = [], 0
        return out


def split_items(segments: list[Segment],
                offsets: list[int]) -> tuple[list[Segment], list[Segment]]:
    """The items at ``offsets`` (ascending positions in these segments, end to end), one
    segment each, apart from the rest: (the rest, in order; one segment per offset)."""
    rest: list[Segment] = []
    picked: list[Segment] = []
    wanted = iter(offsets)
    nxt = next(wanted, None)
    base = 0
    for seg in segments:
        n, lo = len(seg), 0
        while nxt is not None and nxt < base + n:
            j = nxt - base
            if j > lo:
                rest.append(seg.part(lo, j))
            picked.append(seg.part(j, j + 1))
            lo = j + 1
            nxt = next(wanted, None)
        if lo < n:
            rest.append(seg.part(lo, n))
        base += n
    return rest, picked


def split_at(position: int, segment: Segment, cut_lo: int, cut_hi: int) -> tuple[list, list]:
    """Split a segment at stream ``position`` into the items inside [cut_lo, cut_hi) and the rest.

    Used after a death: items inside the batch that was in do() spent an attempt; the
    others were only queued.
    """
    n = len(segment)
    lo = min(max(cut_lo - position, 0), n)
    hi = min(max(cut_hi - position, lo), n)
    inside = [segment.part(lo, hi)] if hi > lo else []
    outside = [segment.part(a, b) for a, b in ((0, lo), (hi, n)) if b > a]
    return inside, outside
