"""Named shared-memory segments that no resource tracker follows (caller and workers).

``multiprocessing.shared_memory.SharedMemory`` registers every segment it creates or
attaches with multiprocessing's resource tracker (``track=False`` exists from Python 3.13
only), and the first registration starts that tracker: a fresh interpreter, 20-30 ms of CPU
taken from the workers as they start, and ~5.5 MB of PSS for the rest of the program (peak
PSS of the benchmark's MEM run: 47.2 MB with it, 41.6 without). A Batcher knows who
outlives whom without it, so its segments are removed

- by close() (``Batcher._shutdown``, ``Pool.close_pipes``);
- when the caller dies: by its zygote and by each worker, which watch the caller and
  unlink its segments before they exit (``unlink_all``: whoever comes first). The zygote
  also does when the caller's end of its socket closes with no EXIT sent first (an
  ``exec`` that keeps the caller's pid: the caller cannot use them any more);
- otherwise, by the next Batcher on the machine (``counters.sweep_orphaned_segments``),
  once their creator's pid is gone: a caller killed with every process of its group, one
  that dies while none of its fork, spawn or forkserver workers is alive (between a death
  and its replacement), or one that calls ``exec`` with such workers (they see their pipes
  end and exit: the segments stay until that pid has exited too).

The Ray backend's counters have no name at all (``LoadCounters(shared=False)``): only the
caller reads them. A Segment is SharedMemory's POSIX path (``shm_open``, ``ftruncate``,
``mmap``) without the registration.
"""

from __future__ import annotations

import _posixshmem
import contextlib
import mmap
import os
from collections.abc import Iterable

MODE = 0o600  # as SharedMemory: the caller's user only


class Segment:
    """A POSIX shared-memory segment: ``buf`` maps all of it; ``fd`` stays open (ring.py
    writes through it)."""

    def __init__(self, name: str, size: int = 0, create: bool = False) -> None:
        if create and size <= 0:
            raise ValueError(f"a segment needs a size > 0, not {size}")
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        self.name = name
        self.fd = _posixshmem.shm_open("/" + name, flags, mode=MODE)
        try:
            if create:
                os.ftruncate(self.fd, size)
            self.size = os.fstat(self.fd).st_size
            self._mmap = mmap.mmap(self.fd, self.size)
        except BaseException:
            os.close(self.fd)
            if create:
                unlink(name)
            raise
        self.buf = memoryview(self._mmap)

    def close(self) -> None:
        """Unmap it and close the descriptor (release every view of ``buf`` first)."""
        if self.fd < 0:
            return
        self.buf.release()
        self._mmap.close()
        os.close(self.fd)
        self.fd = -1

    def unlink(self) -> None:
        """Remove its name: the memory goes once every process has closed it."""
        unlink(self.name)


def unlink(name: str) -> None:
    """Remove segment ``name`` if it is still there (another process may have first)."""
    with contextlib.suppress(FileNotFoundError):
        _posixshmem.shm_unlink("/" + name)


def unlink_all(names: Iterable[str]) -> None:
    """Remove each named segment there is ("" names none), whatever fails for another: a
    dying caller's zygote and workers clean up this way on their way out."""
    for name in filter(None, names):
        with contextlib.suppress(OSError):
            unlink(name)
