"""Start, replace and stop worker processes (caller process).

Each worker i has an item pipe (caller writes), a drain pipe (a byte when the item pipe is
full: the worker's reader thread empties it), a result pipe (worker writes) and a process
sentinel, and a ring in shared memory for large values (ring.py). ``send_locks[i]``
serialises writes to pipe i and ring i, the matching ledger appends, and the swap to a
replacement process, so that every item the worker is sent is in its ledger, in the order
it was sent.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import select
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from typing import Any

import psutil

from . import transport as tp
from . import worker, zygote
from .interrupts import held_interrupt
from .ring import Rings, region_bytes

START_METHODS = ("fork", "spawn", "forkserver", "zygote")
WORKER_MODULE = worker.__name__  # "mpbatch.worker": what the fork server preloads
WRITE_POLL = 0.1  # s between looks at a full item pipe (and at a pending Ctrl-C)
STUCK_WRITE = 1.0  # s a worker may read nothing after a Ctrl-C before it is given up


def default_start_method() -> str:
    """zygote if this process has one thread now, else forkserver where the platform has
    it, else spawn (called when the workers start).

    The caller runs a collector thread, and forking a process that has threads can copy a
    lock in a held state into the child (CPython warns about it from 3.12). A zygote is
    forked before that thread exists and forks every worker from one thread (zygote.py),
    in milliseconds; a fork server must first boot an interpreter (~150 ms here, for every
    short program). With other threads running already (a notebook, a server, a BLAS pool),
    the zygote would be such a fork: then forkserver, the Linux default from Python 3.14.
    ``do`` travels by cloudpickle either way.
    """
    if zygote.available() and zygote.single_threaded():
        return "zygote"
    methods = multiprocessing.get_all_start_methods()
    return "forkserver" if "forkserver" in methods else "spawn"


def _cgroup_cpu_limit() -> float | None:
    """CPUs allowed by a container's CFS quota (cgroup v2, then v1), if any."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
            quota_us = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
            period_us = int(f.read())
        return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def default_workers() -> int:
    """CPUs this process may use: affinity, container quota, physical cores preferred.

    The same rule as loky's ``cpu_count()``: hyper-threads rarely speed up CPU-bound batches.
    """
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    if limit:
        n = min(n, max(1, math.ceil(limit)))
    physical = psutil.cpu_count(logical=False)
    if physical:
        n = min(n, physical)
    return max(1, n)


def wake_reader(drain: int) -> None:
    """A byte on a worker's drain pipe: its reader thread wakes (inlet.Inlet._drain)."""
    with contextlib.suppress(OSError):  # BlockingIOError: enough wake-ups are waiting
        os.write(drain, b"!")


def _write(fd: int, frame: bytes | list, hold: held_interrupt, drain: int,
           stalled: Callable[[], bool]) -> bool:
    """Write a whole frame to a non-blocking pipe; False if a Ctrl-C is pending and the
    worker has taken nothing from its pipe for STUCK_WRITE seconds (init() or do() hung).

    A full pipe means the worker's main thread is busy (in do() or init()): a byte on
    ``drain`` wakes its reader thread, which empties the pipe (worker._Inlet). Only code that
    holds the GIL, in C, for long keeps the reader from it. Then the pipe stays full, and
    whoever waits here calls ``stalled`` every WRITE_POLL: the timeout= watch, which this
    wait may keep from the collector (it waits for this writer's locks), kills a do() that
    ran too long, and the write ends in EPIPE; past close(timeout)'s deadline, ``stalled``
    returns False and the worker is given up. So does a pending Ctrl-C.
    """
    parts = [memoryview(p) for p in frame] if isinstance(frame, list) else [memoryview(frame)]
    stuck = 0.0
    while parts:
        try:
            if len(parts) == 1:
                parts[0] = parts[0][os.write(fd, parts[0]):]
                if not parts[0]:
                    parts.clear()
            else:
                tp.drop_written(parts, os.writev(fd, parts[:tp.IOV_MAX]))
            stuck = 0.0
            continue
        except BlockingIOError:
            pass
        wake_reader(drain)
        if hold.pending():
            if stuck >= STUCK_WRITE:
                return False
            stuck += WRITE_POLL
        room = select.poll()  # not select(): it fails on descriptors past 1024
        room.register(fd, select.POLLOUT)
        if not room.poll(WRITE_POLL * 1000) and not stalled():
            return False
    return True


def _widen(conn: Connection) -> None:
    """Grow a pipe to 1 MiB (Linux): a 64 KiB pipe makes a 50 KiB chunk cost a context
    switch or two; a wider one lets the caller queue several chunks and move on."""
    # Not Linux, or over /proc/sys/fs/pipe-max-size: the default pipe still works.
    with contextlib.suppress(ImportError, OSError):
        import fcntl

        fcntl.fcntl(conn.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)


def _preload_in_fork_server(ctx: BaseContext) -> None:
    """Have the fork server import the worker module, keeping what it preloads already.

    The default list is ["__main__"]: the server imports the caller's main module once and
    every worker forks with it, instead of each worker importing it again (a main script
    that imports a large library would cost each worker, and each replacement, that
    import). Only a server started after this call is affected.
    """
    from multiprocessing import forkserver

    current = getattr(forkserver._forkserver, "_preload_modules", None)  # [] is a choice
    preload = ["__main__"] if current is None else list(current)
    if WORKER_MODULE not in preload:
        ctx.set_forkserver_preload([*preload, WORKER_MODULE])


class Pool:
    """The worker processes, their pipes and the locks that keep their ledgers in order."""

    def __init__(self, workers: int, start_method: str, counters_name: str,
                 config_blob: bytes) -> None:
        self.workers = workers
        self.start_method = start_method
        self.zygote: zygote.Zygote | None = None
        self.ctx: BaseContext = multiprocessing.get_context(
            "fork" if start_method == "zygote" else start_method)
        if start_method == "forkserver":
            _preload_in_fork_server(self.ctx)
        self.counters_name = counters_name
        self.config_blob = config_blob
        self.caller_pid = os.getpid()
        if start_method == "zygote" and not zygote.available():
            raise ValueError("start_method='zygote' needs os.fork, pidfds and fd "
                             "passing (Linux 5.3+); use 'forkserver'")
        # Before the zygote, which passes every worker the name: a worker told of a ring
        # that was never made could not start.
        self.rings = _rings(f"{counters_name}_ring", workers)
        ring_name = self.rings.name if self.rings is not None else ""
        self.ring_name = ring_name
        if start_method in ("zygote", "fork"):
            worker.glibc_mallopt()  # looked up here once, not in every worker it forks
        if start_method == "zygote":  # before the pipes below: it must not hold copies
            try:
                self.zygote = zygote.Zygote(worker.main, (
                    counters_name, ring_name, workers, config_blob, self.caller_pid,
                    worker.PACKAGE_DIR), segments=(counters_name, ring_name))
            except BaseException:
                if self.rings is not None:
                    self.rings.unlink()
                raise
        self.procs: list[Any] = [None] * workers
        self.items: list[Connection | None] = [None] * workers
        self.drains: list[Connection | None] = [None] * workers  # wakes a busy worker's reader
        self.results: list[Connection | None] = [None] * workers
        self.send_locks = [threading.Lock() for _ in range(workers)]
        self.ready = [False] * workers  # READY seen from this incarnation
        # One joiner at a time: under forkserver the exit status is read from the sentinel
        # pipe, and a second concurrent reader gets EOF and reports exit code 255.
        self._reap_lock = threading.Lock()
        # Called by a write waiting on a full pipe: the collector's timeout= watch.
        self.on_stall: Callable[[], None] = lambda: None
        # close(timeout)'s deadline (monotonic s): a write still waiting then gives its
        # worker up, or close() could not even take the lock that writer holds.
        self.give_up_at: float | None = None
        self.stopping = False  # close() stops the workers (read by the Ray pool only)

    def start(self, i: int) -> None:
        """Start a process for slot i (first start or replacement); hold send_locks[i].

        Raises what starting raised (EMFILE, ENOMEM) with slot i as it was, and no new pipe
        left open.
        """
        if self.rings is not None:
            self.rings.reset(i)  # the worker before, the ring's only other user, is gone
        made: list[Connection] = []
        try:
            for _ in range(3):
                made += self.ctx.Pipe(duplex=False)
            proc = self._launch(i, *made)
        except BaseException:
            for conn in made:
                conn.close()
            raise
        items_r, items_w, drain_r, drain_w, results_r, results_w = made
        # Close our copies of the child's ends: a dead worker must mean EPIPE on send.
        items_r.close()
        drain_r.close()
        results_w.close()
        old = self.items[i], self.drains[i], self.results[i]
        self.procs[i], self.items[i], self.drains[i], self.results[i] = (
            proc, items_w, drain_w, results_r)
        self.ready[i] = False
        for conn in old:
            if conn is not None:
                conn.close()

    def wake(self, i: int) -> None:
        """Wake worker i's reader thread: it answers a hand-back request while do() runs
        (steal.py). Collector thread only: it alone replaces a worker's pipes while it runs."""
        drain = self.drains[i]
        if drain is not None:
            wake_reader(drain.fileno())

    def _launch(self, i: int, items_r: Connection, items_w: Connection, drain_r: Connection,
                drain_w: Connection, results_r: Connection, results_w: Connection) -> Any:
        for conn in (items_w, results_r):
            _widen(conn)
        # Writes wait for room in poll(), where a pending Ctrl-C can end the wait (_write).
        os.set_blocking(items_w.fileno(), False)
        os.set_blocking(drain_w.fileno(), False)
        # The collector reads what is there and never blocks: with fork, a sibling holding a
        # copy of the write end would keep a dead worker's pipe from ever reaching EOF.
        os.set_blocking(results_r.fileno(), False)
        if self.zygote is not None:
            return self.zygote.launch(i, [items_r.fileno(), drain_r.fileno(),
                                          results_w.fileno()])
        proc = self.ctx.Process(
            target=worker.main, name=f"mpbatch-worker-{i}",
            args=(i, items_r, drain_r, results_w, self.counters_name, self.ring_name,
                  self.workers, self.config_blob, self.caller_pid, worker.PACKAGE_DIR))
        proc.start()
        return proc

    def send(self, i: int, frame: bytes | list) -> bool:
        """Write one wire frame to worker i (hold send_locks[i]); False if it is gone (its
        death is handled elsewhere)."""
        conn = self.items[i]
        if conn is None:
            return False
        try:
            # Half a frame would garble the rest of the stream: a Ctrl-C waits for the end of
            # the frame, unless the worker reads nothing for STUCK_WRITE s after it. (Nor
            # may one come between filling the ring and writing the frame that empties it.)
            with held_interrupt() as hold:
                if self.rings is not None and type(frame) is tp.OutOfBand:
                    frame = self._into_ring(i, frame)
                if not _write(conn.fileno(), frame, hold, self.drains[i].fileno(),
                              self._stalled):
                    self.kill(i)  # its ledger's items are re-sent when the collector sees it
                    return False
        except (OSError, ValueError):  # EPIPE from a dead worker; OSError: closed here
            return False
        return True

    def _into_ring(self, i: int, frame: tp.OutOfBand) -> bytes | list:
        """``frame`` with its values copied into worker i's ring, if they fit there now."""
        rings = self.rings
        if rings is None:  # close() took them down meanwhile (the write fails as before)
            return frame
        placed = rings.place(i, frame.raws)
        if placed is None:
            return frame
        try:
            return tp.ring_frame(frame, *placed)
        except BaseException:  # (MemoryError) no frame will say where they are
            rings.unplace(i, placed[1])
            raise

    def _stalled(self) -> bool:
        """A write waits on a full pipe: watch timeout=; False once close() gives up."""
        self.on_stall()
        give_up_at = self.give_up_at
        return give_up_at is None or time.monotonic() < give_up_at

    def give_up_by(self, deadline: float) -> None:
        """close(timeout) ends at ``deadline``: writes waiting then give their workers up."""
        if self.give_up_at is None or deadline < self.give_up_at:
            self.give_up_at = deadline

    def reap(self, proc: Any, timeout: float | None = None) -> None:
        """Join ``proc`` (a worker process, current or replaced) from any thread."""
        with self._reap_lock:
            proc.join(timeout)

    def kill(self, i: int) -> None:
        """SIGKILL worker i if it still runs."""
        proc = self.procs[i]
        if proc is not None:
            self.kill_process(proc)

    def kill_process(self, proc: Any) -> None:
        """SIGKILL this worker process if it still runs (under the reap lock: see reap)."""
        with self._reap_lock, contextlib.suppress(OSError):  # it exited in between
            proc.kill()  # a no-op once its exit status was read

    def stop(self, timeout: float) -> None:
        """Ask every worker to finish and exit; kill those still alive after ``timeout``."""
        for i in range(self.workers):
            with self.send_locks[i]:
                self.send(i, tp.STOP_WIRE)
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            if proc is not None:
                self.reap(proc, max(0.0, deadline - time.monotonic()))
        for i in range(self.workers):
            self.kill(i)
        for proc in self.procs:
            if proc is not None:
                self.reap(proc)

    def discard(self) -> None:
        """Kill and reap every worker started so far, close the pipes: a first start that
        failed half-way must not leave the workers it did start running."""
        for i in range(self.workers):
            self.kill(i)
        for proc in self.procs:
            if proc is not None:
                self.reap(proc)
        self.close_pipes()

    def close_pipes(self) -> None:
        """Close our ends of every pipe, the descriptors of the reaped workers and the
        rings; only once the collector thread has stopped."""
        for conn in self.items + self.drains + self.results:
            if conn is not None:
                conn.close()
        rings, self.rings = self.rings, None
        if rings is not None:
            rings.unlink()
        # A closed Batcher the program keeps (in a list, in a traceback) must not keep its
        # workers' sentinels or pidfds open: a few hundred of them would exhaust the fds.
        for i, proc in enumerate(self.procs):
            if proc is not None and proc.exitcode is not None:
                self.procs[i] = Ended(proc.pid, proc.exitcode)
                proc.close()
        if self.zygote is not None:  # its workers are reaped: nothing more to fork
            self.zygote.close()


def _rings(name: str, workers: int) -> Rings | None:
    """The workers' rings for large values, or None: no room in /dev/shm for them (the
    pipes then carry every value)."""
    region = region_bytes(workers)
    if not region:
        return None
    try:
        return Rings(name, workers, region)
    except OSError:
        return None


class Ended:
    """A worker reaped at close(): its pid and exit code, and no descriptor."""

    sentinel = None

    def __init__(self, pid: int, exitcode: int) -> None:
        self.pid = pid
        self.exitcode = exitcode

    def is_alive(self) -> bool:
        return False

    def join(self, timeout: float | None = None) -> None:
        pass

    def kill(self) -> None:
        pass
