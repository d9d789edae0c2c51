"""The worker's item pipe (worker process): frames in, read by whichever thread is free.

The main thread reads it while it waits for items; a reader thread drains it while do()
runs, when the caller finds it full or asks for work back (see Inlet).
"""

from __future__ import annotations

import _thread
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from . import transport as tp
from .ring import RingReader

POLL_MAX_MS = 0x7FFFFFFF  # poll() refuses a longer timeout (~24.8 days; interval may exceed it)
TICK = object()  # next() waited its time out: the held batch's interval ran out
_NONE = object()  # _pop(): no frame is queued


class Inlet:
    """The item pipe: read by the main thread when it waits for items, drained by a reader
    thread when the caller finds it full.

    An idle worker's main thread waits in poll() on the pipe itself, so an item that
    arrives wakes the thread that runs do(): one wake-up. Handing every frame over from a
    reader thread, as before, cost a second wake-up and a GIL hand-over per item (~20-40
    us of an idle worker's latency here).

    The reader thread keeps the caller from waiting on a worker that runs a long batch:
    when a write finds the pipe full, the caller writes a byte to this worker's drain pipe,
    and the reader moves everything in the item pipe to ``frames`` while do() runs. It
    costs nothing when pipes do not fill: no wake-up of the reader per batch.

    ``lock`` goes with the item pipe and the partial frame in ``wire`` (a FrameReader): one
    thread reads at a time, and frames keep their order. A chunk whose values are in this
    worker's ring (ring.py) has them copied out as its frame is read, in that order.

    Frames leave ``frames`` at the front, under ``taking``: the main thread takes them one
    by one, and either thread may hand whole chunks back to the caller unrun (steal.py;
    the reader while do() runs, see ``on_drain``). ``front`` counts the items of every
    chunk that left, so it is the stream position of the next chunk's first item.
    """

    def __init__(self, items: Connection, drain: Connection,
                 ring: RingReader | None = None) -> None:
        self.fd = items.fileno()
        os.set_blocking(self.fd, False)  # the reader drains it until it is empty
        self.drain_fd = drain.fileno()
        self.wire = tp.FrameReader()  # what was read of the pipe, partial frame included
        self.ring = ring
        self.frames: deque = deque()  # read, not yet taken; None marks EOF
        self.lock = threading.Lock()
        self.taking = threading.Lock()
        self.front = 0  # stream position of the first item of the next chunk to leave
        self.at = 0  # stream position of the first item of the chunk taken last (main thread)
        # Called by the reader thread each time it has drained the pipe (a wake-up from the
        # caller: a full pipe, or a hand-back request to answer while do() runs).
        self.on_drain: Callable[[], None] | None = None
        self._poll = select.poll()  # the main thread's; not select(): it fails past fd 1024
        self._poll.register(self.fd, select.POLLIN)

    def start(self) -> None:
        """Start the reader thread. Not threading.Thread.start(), which waits until the new
        thread runs: two workers starting at once on two vCPUs waited 0.3-3 ms each there,
        before their first batch. Like the daemon thread it replaces, nothing joins it: it
        ends when the drain pipe closes, or with the process."""
        _thread.start_new_thread(self._drain, ())

    def next(self, wait: float | None) -> Any:
        """The next frame, None at EOF, or TICK once ``wait`` seconds pass (main thread)."""
        frame = self._pop()
        if frame is not _NONE:
            return frame
        deadline = None if wait is None else time.monotonic() + wait
        # Held by the reader for one read at a time, when it drains a full pipe.
        if not self.lock.acquire(timeout=-1 if wait is None else max(0.0, wait)):
            return TICK
        try:
            # the reader may have left frames before letting go
            while (frame := self._pop()) is _NONE:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return TICK
                # poll() waits whole milliseconds, at most 2**31 - 1 of them, and rounds a
                # fraction up (an interval-flushed batch started ~0.75 ms late): wait the
                # whole ones there and sleep out the last fraction.
                ms = None if left is None else min(int(left * 1000), POLL_MAX_MS)
                if self._poll.poll(ms):
                    self._take()
                elif ms == 0:
                    time.sleep(left)
            return frame
        finally:
            self.lock.release()

    def _pop(self) -> Any:
        """The front frame, taken off (its chunk's position in ``at``), or _NONE."""
        with self.taking:
            if not self.frames:
                return _NONE
            frame = self.frames.popleft()
            if frame is not None:
                kind, _, n, _ = tp.read_to_worker(frame)
                if kind == tp.CHUNK:
                    self.at = self.front
                    self.front += n
            return frame

    def hand_back(self, want: int) -> tuple[int, int]:
        """Take whole chunks off the front, up to ``want`` items in all, for the caller to
        re-send, stopping at the first frame that is no plain chunk (_plain_chunk).
        Returns (the stream position of their first item, their number of items)."""
        frames, given = self.frames, 0
        with self.taking:
            start = self.front
            while frames:
                n = _plain_chunk(frames[0])
                if n is None or given + n > want:
                    break
                # Not recycled: that takes ``lock``, which an idle main thread holds while
                # it waits for the pipe (a buffer less to reuse, on a rare path).
                frames.popleft()
                given += n
            self.front += given
        return start, given

    def next_chunk(self) -> Any:
        """The front frame taken off if it is a plain chunk (see hand_back), else None; its
        items start at ``at``. ``put_back`` undoes it (main thread)."""
        with self.taking:
            frames = self.frames
            n = _plain_chunk(frames[0]) if frames else None
            if n is None:
                return None
            self.at = self.front
            self.front += n
            return frames.popleft()

    def put_back(self, frame: Any) -> None:
        """Undo next_chunk() (main thread)."""
        with self.taking:
            self.frames.appendleft(frame)
            self.front = self.at

    def _take(self) -> bool:
        """Move what the pipe holds (up to 1 MiB) to ``frames`` (hold ``lock``); False when
        it held nothing, or at EOF. All of it at once: one frame per hand-over between
        threads capped a worker at ~200 frames/s when the other thread held the GIL."""
        try:
            frames = self.wire.read(self.fd)
        except BlockingIOError:
            return False
        except OSError:
            frames = None
        if frames is None:
            self.frames.append(None)
            return False
        if self.ring is not None:
            frames = [self._out_of_ring(frame) for frame in frames]
        self.frames.extend(frames)
        return True

    def _out_of_ring(self, frame: Any) -> Any:
        """``frame``, or a RingFrame holding its values if they are in the ring."""
        place = tp.ring_place(frame)
        if place is None:
            return frame
        taken = tp.RingFrame(frame)
        taken.values = self.ring.take(*place)  # type: ignore[union-attr]
        self.wire.recycle(frame)  # a big frame's buffer (one of many keys) is free again
        return taken

    def take_all(self) -> None:
        """Drain the pipe into ``frames`` (main thread): the worker may hand some back
        unstarted (worker._Loop._queued_back)."""
        with self.lock:
            while self._take():
                pass

    def close_ring(self) -> None:
        """Release the ring (the worker exits): the reader thread, which may still drain
        the pipe until then, stops taking values out of it first."""
        with self.lock:
            ring, self.ring = self.ring, None
            if ring is not None:
                ring.close()

    def recycle(self, frame: Any) -> None:
        """The main thread is done with ``frame``: its buffer may be read into again."""
        with self.lock:
            self.wire.recycle(frame)

    def _drain(self) -> None:
        """Reader thread: each byte on the drain pipe means "the caller found me full"."""
        while True:
            try:
                if not os.read(self.drain_fd, 4096):
                    return  # the caller closed it: it is stopping us, or gone
            except OSError:
                return
            while True:
                with self.lock:  # per read: an idle main thread may take the pipe back
                    if not self._take():
                        break
            if self.on_drain is not None:
                self.on_drain()


def _plain_chunk(frame: Any) -> int | None:
    """The items of ``frame`` if it is a chunk that may be handed back, else None: a FLUSH,
    STOP or DEFINE keeps its place after what precedes it, a retry (SOLO) runs as a batch
    of its own, and None marks EOF."""
    if frame is None:
        return None
    kind, flags, n, _ = tp.read_to_worker(frame)
    return n if kind == tp.CHUNK and not flags & tp.SOLO else None
