"""Large values through shared memory: one ring per worker, filled by the caller and
emptied by the worker as it reads its item pipe (caller and worker).

A chunk of large ``bytes`` values (transport.OUT_OF_BAND) crossed the item pipe after its
pickle: the kernel copied every value into the pipe and out again, a page at a time, and
that write was most of the caller's time (one writer on a 2-vCPU VM: ~2.5 GB/s into a
pipe, ~20 GB/s of memcpy into shared memory). Now the caller copies the values into
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
counters when its caller is gone), REGION bytes per worker: an 8-byte ``tail`` cell
(writer: the worker) in a 64-byte header, then the data. A replacement worker's region
starts empty (``reset``, under the send lock, before it starts). Each region's pages are
reserved (posix_fallocate) before first use, so a full /dev/shm refuses the ring instead
of killing a process with SIGBUS later; a region that cannot be reserved is not used.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from multiprocessing import shared_memory

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
        self.shm = shared_memory.SharedMemory(name=name, create=True, size=region * workers)
        self.region = region
        self.capacity = region - HEADER
        self.head = [0] * workers
        self.usable = [None] * workers  # region i reserved (True), refused (False), not yet
        self.cells = self.shm.buf.cast("q")
        self.stride = region // 8  # cells per region: worker i's tail is cells[i * stride]
        for i in range(workers):
            self.cells[i * self.stride] = 0

    @property
    def name(self) -> str:
        return self.shm.name

    def place(self, i: int, raws: list) -> tuple[int, int] | None:
        """Copy ``raws`` (a chunk's values, in order) into ring i: (offset of the first,
        bytes taken from the ring), or None if they do not fit now. Hold send_locks[i]."""
        total = sum(map(len, raws))
        capacity = self.capacity
        if total > capacity or not self._usable(i):
            return None
        head = self.head[i]
        at = head % capacity
        span = total if at + total <= capacity else capacity - at + total  # no wrap inside
        if head + span - self.cells[i * self.stride] > capacity:
            return None  # the worker has not read that far yet
        if span != total:
            at = 0
        offset = at
        base = i * self.region + HEADER
        buf = self.shm.buf
        for raw in raws:
            end = at + len(raw)
            buf[base + at:base + end] = raw
            at = end
        self.head[i] = head + span
        return offset, span

    def reset(self, i: int) -> None:
        """Ring i starts empty: worker i is (re)started (hold send_locks[i]; the previous
        worker, the only other writer of the tail, is gone)."""
        self.head[i] = 0
        self.cells[i * self.stride] = 0

    def _usable(self, i: int) -> bool:
        usable = self.usable[i]
        if usable is None:
            usable = self.usable[i] = _reserve(self.shm, i * self.region, self.region)
        return usable

    def unlink(self) -> None:
        """Close and remove the segment (the caller's job, once its workers are gone)."""
        self.cells.release()
        self.shm.close()
        with contextlib.suppress(FileNotFoundError):  # swept by another caller meanwhile
            self.shm.unlink()


def _reserve(shm: shared_memory.SharedMemory, start: int, size: int) -> bool:
    """Reserve a region's pages in /dev/shm now: False if there is no room for them."""
    fd = getattr(shm, "_fd", -1)
    if fd < 0 or not hasattr(os, "posix_fallocate"):
        return True  # not POSIX shm_open (or no fallocate): nothing to reserve with
    try:
        os.posix_fallocate(fd, start, size)
    except OSError:
        return False
    return True


class RingReader:
    """Worker i's side: copies a chunk's values out of its ring and gives the space back."""

    def __init__(self, name: str, index: int, workers: int) -> None:
        self.shm = shared_memory.SharedMemory(name=name)
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
        """Release the views, then the mapping (the worker is exiting)."""
        with contextlib.suppress(BufferError):  # the reader thread is inside take()
            for view in (self.tail, self.data, self.view):
                view.release()
            self.shm.close()
