"""Large values through shared memory: one ring per worker, filled by the caller and
emptied by the worker as it reads its item pipe (caller and worker).

A chunk of large ``bytes`` values (transport.OUT_OF_BAND) crossed the item pipe after its
pickle: the kernel copied every value into the pipe and out again, a page at a time, and
that write was most of the caller's time (one writer on a 2-vCPU VM: ~2.5 GB/s into a
pipe, several times that into shared memory). Now the caller copies the values into
worker i's ring, and the pipe carries the chunk's header, where the values sit and the
pickle of the rest (transport.IN_RING):

    caller, Rings.place (under send_locks[i])       worker i, RingReader.take (the thread
      head: bytes placed in ring i, ever               reading the pipe, as each frame
      room: capacity - (head - tail)                   arrives, in pipe order)
      copy the values in, then write the frame  ==>   copy the values out,
                                                       then tail += the chunk's span

Frames reach the worker in the order they were written and it copies each chunk's values
out as soon as it reads the frame, before anything else can happen to the chunk (run,
handed back, dropped), so the ring is plain FIFO: the caller reuses the space behind
``tail``. A chunk that does not fit (the worker is behind, or the chunk is larger than
the ring) crosses the pipe as before: the ring never makes a sender wait, and a full
pipe still holds the caller back.

Layout: one segment per Batcher, ``mpbatch_<caller pid>_<random>_ring`` (swept like the
counters when its caller is gone), region_bytes() per worker: an 8-byte ``tail`` cell
(writer: the worker) in a 64-byte header, then the data. A replacement worker's region
starts empty (``reset``, under the send lock, before it starts). The caller writes every
byte of a ring with os.pwrite(v) on the segment's descriptor (see Rings.place), never
through its mapping: on a full /dev/shm a write fails (that ring is then left alone until
its worker is replaced) where a first touch of a page would kill the process with SIGBUS.
The worker only reads pages the caller wrote, and writes its tail in a page written first.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading

from .shm import Segment
from .transport import IOV_MAX, drop_written

REGION = 4 << 20  # bytes of ring per worker, header included
MIN_REGION = 256 << 10  # less than this and no ring is made: the pipe carries everything
SHARE = 8  # a Batcher's rings take at most this fraction of /dev/shm's free space
HEADER = 64  # the tail cell, alone on its cache line


def region_bytes(workers: int, shm_dir: str = "/dev/shm") -> int:
    """Bytes of ring per worker: REGION, less where /dev/shm is small (a container's 64 MiB);
    0 for none."""
    size = REGION
    with contextlib.suppress(OSError):  # no /dev/shm (not Linux): take REGION
        st = os.statvfs(shm_dir)
        size = min(size, st.f_bavail * st.f_frsize // (SHARE * workers))
    size -= size % mmap.PAGESIZE
    return size if size >= MIN_REGION else 0


class Rings:
    """The caller's side: every worker's ring, and how far it has filled each."""

    def __init__(self, name: str, workers: int, region: int) -> None:
        self.shm = Segment(name, size=region * workers, create=True)
        self.fd = self.shm.fd
        self.region = region
        self.capacity = region - HEADER
        self.head = [0] * workers
        self.usable = [True] * workers  # False once /dev/shm had no room for ring i
        # Held for each write and by unlink(): a sender racing close() must not write to
        # a descriptor number that is closed, and maybe reused by then.
        self.lock = threading.Lock()
        self.closed = False
        try:
            # Each header page is written, not touched through the mapping: on a full
            # /dev/shm the write fails here instead of a process taking SIGBUS later.
            for i in range(workers):
                os.pwrite(self.fd, bytes(HEADER), i * region)
        except OSError:
            self.unlink()
            raise
        self.cells = self.shm.buf.cast("q")
        self.stride = region // 8  # cells per region: worker i's tail is cells[i * stride]

    @property
    def name(self) -> str:
        return self.shm.name

    def place(self, i: int, raws: list[memoryview]) -> tuple[int, int] | None:
        """Copy ``raws`` (a chunk's values, in order) into ring i: (offset of the first,
        bytes taken from the ring), or None if they do not fit now. Hold send_locks[i]."""
        total = sum(map(len, raws))
        capacity = self.capacity
        if total > capacity or not self.usable[i]:
            return None
        head = self.head[i]
        at = head % capacity
        span = total if at + total <= capacity else capacity - at + total  # no wrap inside
        if span != total:
            at = 0
        with self.lock:
            if self.closed or head + span - self.cells[i * self.stride] > capacity:
                return None  # closed, or the worker has not read that far yet
            # Written, not stored through the mapping: the kernel copies with the GIL let
            # go, as the pipe's write did, so the collector thread keeps settling outcomes
            # (and freeing their values) meanwhile. A memcpy under the GIL let add() outrun
            # it: the caller held ~0.5 GB of finished 64 KiB values, up to buffer=.
            parts = list(raws)
            pos = i * self.region + HEADER + at
            try:
                while parts:
                    n = os.pwritev(self.fd, parts[:IOV_MAX], pos)
                    pos += n
                    drop_written(parts, n)
            except OSError:  # no room in /dev/shm: the pipe carries worker i's values
                self.usable[i] = False
                return None
        self.head[i] = head + span
        return at, span

    def unplace(self, i: int, span: int) -> None:
        """Take back the last place(i): its frame was never written (hold send_locks[i])."""
        self.head[i] -= span

    def reset(self, i: int) -> None:
        """Ring i starts empty: worker i is (re)started (hold send_locks[i]; the previous
        worker, the only other writer of the tail, is gone). A ring that found no room in
        /dev/shm is tried again."""
        self.head[i] = 0
        self.cells[i * self.stride] = 0
        self.usable[i] = True

    def unlink(self) -> None:
        """Close and remove the segment (the caller's job, once its workers are gone)."""
        with self.lock:
            self.closed = True
            if hasattr(self, "cells"):
                self.cells.release()
            self.shm.close()
        self.shm.unlink()  # no error if another caller swept it meanwhile


class RingReader:
    """Worker i's side: copies a chunk's values out of its ring and gives the space back."""

    def __init__(self, name: str, index: int, workers: int) -> None:
        self.shm = Segment(name)
        region = self.shm.size // workers
        self.view = self.shm.buf[index * region:(index + 1) * region]
        self.tail = self.view[:8].cast("q")
        self.data = self.view[HEADER:]

    def take(self, lengths: tuple[int, ...], offset: int, span: int) -> list[bytes]:
        """The values of one IN_RING chunk, copied out; their space is the caller's again."""
        data, at, values = self.data, offset, []
        for n in lengths:
            values.append(data[at:at + n].tobytes())
            at += n
        self.tail[0] += span
        return values

    def close(self) -> None:
        """Release the views, then the mapping (the worker is exiting; hold the inlet's
        lock, so that its reader thread is not inside take())."""
        for view in (self.tail, self.data, self.view):
            view.release()
        self.shm.close()
