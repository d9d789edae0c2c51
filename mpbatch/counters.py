"""The shared-memory load counters: one line of int64 cells per worker (caller and workers).

The dispatcher reads them to route items and to pace add_many; the collector reads which
items were inside do() when a worker died, and how long do() has run (as does a caller
thread waiting on a worker's full pipe); each worker writes its own line. Every cell has one
writer, so no lock is taken.

This module is all a worker needs of the caller's bookkeeping: it imports nothing that a
worker does not use (a worker's start, under forkserver and spawn, pays for every import).
"""

from __future__ import annotations

import os
import secrets

from .shm import Segment

# Shared-memory layout: worker i owns 128 bytes (16 int64 cells, 5 unused), two cache
# lines, so that two workers never write the same cache line.
#   int64 sent     at 128*i + 0   writer: dispatcher   items sent to worker i (this incarnation)
#   int64 done     at 128*i + 8   writer: worker i     items worker i has reported back
#   int64 b_start  at 128*i + 16  writer: worker i     stream position of the batch in do()
#   int64 b_end    at 128*i + 24  writer: worker i     end (exclusive) of that batch
#   int64 busy_ns  at 128*i + 32  writer: worker i     monotonic_ns when do() began; 0 = idle
#   int64 batches  at 128*i + 40  writer: worker i     batches this incarnation has run
#   int64 work_ns  at 128*i + 48  writer: worker i     ns spent running batches (do() and
#                                                      pickling the outcome), this incarnation
#   int64 cancel   at 128*i + 56  writer: caller       1: start no batch, report what is held
#                                                      as cancelled (run()'s first Ctrl-C)
#   int64 ask      at 128*i + 64  writer: caller       a hand-back request: ask_seq << 32 |
#                                                      items; a new value is a new request
#                                                      (steal.py); one store, never torn
#   int64 given    at 128*i + 72  writer: worker i     items of ``done`` handed back unrun
#                                                      (cost per item: work_ns/(done-given))
#   int64 held     at 128*i + 80  writer: worker i     items in the batch it is filling (not
#                                                      yet in do(); routing, costs.py)
CELLS = 16
SENT, DONE, B_START, B_END, BUSY_NS, BATCHES, WORK_NS, CANCEL, ASK, GIVEN, HELD = range(11)
ASK_ITEMS = 0xFFFFFFFF  # the low half of ``ask``: items asked for


class LoadCounters:
    """Per-worker counters in one shared-memory segment (shm.py).

    Named ``mpbatch_<caller pid>_<random>``, so a segment left behind names its owner.
    The caller creates and unlinks it; workers attach by name (``attach``). A worker's
    death leaves the segment intact (the caller zeroes that worker's line on respawn).
    Not ``shared``: the caller's memory alone, nameless (the Ray backend: its actors keep
    their own counters, which the caller copies in), so nothing is left if it dies.
    """

    def __init__(self, workers: int, name: str | None = None, shared: bool = True) -> None:
        self.workers = workers
        size = 8 * CELLS * workers
        self.shm: Segment | None = None
        if not shared:
            self.cells = memoryview(bytearray(size)).cast("q")
            return
        create = name is None
        if create:
            sweep_orphaned_segments()
        self.shm = Segment(name or f"mpbatch_{os.getpid()}_{secrets.token_hex(4)}",
                           size=size, create=create)
        self.cells = self.shm.buf.cast("q")
        if create:
            for j in range(CELLS * workers):
                self.cells[j] = 0

    @classmethod
    def attach(cls, name: str, workers: int) -> LoadCounters:
        """The worker's view of the caller's segment."""
        return cls(workers, name=name)

    @property
    def name(self) -> str:
        """The segment's name ("" when not shared)."""
        return "" if self.shm is None else self.shm.name

    def get(self, i: int, cell: int) -> int:
        return self.cells[CELLS * i + cell]

    def set(self, i: int, cell: int, value: int) -> None:
        self.cells[CELLS * i + cell] = value

    def load(self, i: int) -> int:
        """Items sent to worker i that it has not reported back yet."""
        base = CELLS * i
        return self.cells[base + SENT] - self.cells[base + DONE]

    def in_do(self, i: int) -> tuple[int, int]:
        """Worker i's batch in do(): when it began (monotonic ns) and its items; (0, 0)
        while it runs none. Racy reads of another process's cells: the items read <= 0
        when the batch ended (and the next began) between them."""
        base = CELLS * i
        began = self.cells[base + BUSY_NS]
        if not began:
            return 0, 0
        return began, self.cells[base + B_END] - self.cells[base + B_START]

    def reset(self, i: int) -> None:
        """Zero worker i's line before its replacement starts (the old writer is dead);
        ``cancel`` is the caller's, and holds for the replacement too."""
        for j in range(CELLS * i, CELLS * (i + 1)):
            if j != CELLS * i + CANCEL:
                self.cells[j] = 0

    def close(self) -> None:
        self.cells.release()
        if self.shm is not None:
            self.shm.close()

    def unlink(self) -> None:
        """Close and remove the segment from /dev/shm; the caller's job, once."""
        self.close()
        if self.shm is not None:
            self.shm.unlink()


SHM_DIR = "/dev/shm"


def sweep_orphaned_segments() -> list[str]:
    """Remove counters left by callers that no longer exist; returns the names removed.

    close() unlinks its segment, and if the caller dies, its zygote and workers do (shm.py).
    Only a SIGKILL of the whole process group (a harness timeout, an OOM kill of the group)
    takes them along, and then nobody is left to do it. The pid in the name
    says whose a segment is; a segment whose creator is gone is garbage.
    """
    removed = []
    try:
        names = [n for n in os.listdir(SHM_DIR) if n.startswith("mpbatch_")]
    except OSError:
        return removed  # no /dev/shm here (not Linux)
    import psutil  # here, not at the top: workers import this module, and never sweep

    for name in names:
        try:
            pid = int(name.split("_")[1])
        except (IndexError, ValueError):
            continue
        if pid == os.getpid() or psutil.pid_exists(pid):
            continue
        try:
            os.unlink(os.path.join(SHM_DIR, name))
            removed.append(name)
        except OSError:
            pass  # another caller swept it first, or not ours to remove
    return removed
