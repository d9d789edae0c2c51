"""A worker as a Ray actor (backend="ray"; runs in the actor's process, on any node).

The actor runs the worker loop of worker.py unchanged, on a thread of its own, behind the
same three local pipes a worker process has; two actor methods stand in for the caller's
ends of them:

    caller's sender thread --push(token, parts)--> item pipe --> worker loop (_Loop)
    caller's pump thread   <--pull(token)--------- result pipe <-- READY, FINISHED, FAILED

``pull`` waits until the loop has reported something (or PULL_WAIT passes) and returns the
frames with a snapshot of the loop's counters (items done, time in do(), the batch in
do() and since when, the items of the batch being filled), which the caller copies into its
own shared-memory line for this worker: routing, pacing, timeouts and death handling read
them there as they do locally.

Each instance draws a token when it starts. Ray restarts a dead actor in place
(max_restarts=-1), and calls that were meant for the dead instance may reach the new one:
``push`` takes frames only with the token of the instance they were sent to.

This module imports no Ray: the caller applies ``ray.remote`` (raypool.py).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import threading
import time
from multiprocessing import Pipe

import cloudpickle

from . import transport as tp
from . import worker
from .counters import B_END, B_START, BATCHES, BUSY_NS, CANCEL, CELLS, DONE, HELD, WORK_NS
from .inlet import Inlet
from .lifecycle import _widen
from .results import failure

PULL_WAIT = 0.2  # s a pull waits for a report before it returns an empty one
# While the loop has items to run, a pull is answered at most this long after the previous
# answer: a Ray call costs ~1 ms of CPU across both ends, and answering each report as it
# came made one call per batch (the pacer keeps ~20 ms of work queued on a worker).
REPLY_GAP = 0.016
WRITE_WAIT_MS = 100  # ms between looks at a full item pipe


class _LocalCounters:
    """The one line of counters the worker loop writes, in this process's memory: shared
    memory would not reach the caller on another node, and a SIGKILL would leak it."""

    def __init__(self) -> None:
        self.cells = memoryview(bytearray(8 * CELLS)).cast("q")


class RayWorker:
    """One mpbatch worker: init() in the constructor, batches on a thread of its own."""

    def __init__(self, config_blob: bytes) -> None:
        self.token = secrets.randbits(62)
        self.pid = os.getpid()
        items_r, items_w = Pipe(duplex=False)
        drain_r, drain_w = Pipe(duplex=False)
        results_r, results_w = Pipe(duplex=False)
        self._items_w, self._drain_w = items_w.fileno(), drain_w.fileno()
        self._results_r = results_r.fileno()
        self._keep = (items_r, items_w, drain_r, drain_w, results_r, results_w)
        for conn in (items_w, results_r):
            _widen(conn)
        os.set_blocking(self._items_w, False)
        os.set_blocking(self._drain_w, False)
        os.set_blocking(self._results_r, False)
        self._push_lock = threading.Lock()
        self._next_seq = 0  # the next push to write (push())
        self._early: dict[int, tuple[list, int]] = {}  # pushes ahead of their predecessor
        self._pushed = 0  # items written to the loop's pipe
        self._pull_lock = threading.Lock()
        self._answered = 0.0  # time.monotonic() of the last pull's answer
        self.counters = _LocalCounters()
        self.exitcode: int | None = None  # the loop ended: 0 (STOP) or EXIT_RECYCLED
        self.clock_offset = None  # this node's monotonic clock minus the caller's, at least
        worker._keep_freed_memory()
        try:
            config = cloudpickle.loads(config_blob)
            state = config.init() if config.init is not None else None
        except BaseException as exc:  # reported by the first pull, as a worker process would
            error = failure(exc, "init()" if "config" in locals() else
                            "unpickling do and init in the worker")
            tp.write_all(results_w.fileno(), tp.caller_frame(tp.INIT_FAILED, self.pid, 0, error))
            self.exitcode = worker.EXIT_INIT_FAILED
            return
        inlet = Inlet(items_r, drain_r)
        inlet.start()
        self._loop = worker._Loop(0, inlet, results_w, self.counters, config, state)
        tp.write_all(results_w.fileno(), tp.caller_frame(tp.READY, self.pid, 0))
        self._thread = threading.Thread(target=self._run, name="mpbatch-loop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        recycle = self._loop.run()
        self.exitcode = worker.EXIT_RECYCLED if recycle else 0

    def push(self, token: int, seq: int, caller_ns: int, parts: list, items: int,
             cancel: bool) -> bool:
        """Write frames (wire format, several to a part; ``items`` in all) to the loop's
        item pipe, in the order of ``seq`` (0, 1, ... per instance: a push and an exchange
        may run at once on two threads); False if they were meant for another instance
        (then dropped)."""
        if token != self.token:
            return False
        offset = time.monotonic_ns() - caller_ns  # clock offset plus this call's transit
        if self.clock_offset is None or offset < self.clock_offset:
            self.clock_offset = offset
            self._loop.clock_offset_ns = offset
        if cancel:  # never undone: a push sent before the cancel must not clear it
            self.counters.cells[CANCEL] = 1
        with self._push_lock:
            if seq != self._next_seq:
                self._early[seq] = (parts, items)  # its predecessor is still on its way
                return True
            while True:
                for part in parts:
                    self._write(memoryview(part))
                self._pushed += items
                self._next_seq += 1
                if self._next_seq not in self._early:
                    break
                parts, items = self._early.pop(self._next_seq)
        return True

    def exchange(self, token: int, seq: int, caller_ns: int, parts: list, items: int,
                 cancel: bool, hurry: bool = False) -> tuple[bool, tuple]:
        """push(), then pull(): one call where two would cost twice Ray's overhead."""
        taken = self.push(token, seq, caller_ns, parts, items, cancel)
        return taken, self.pull(cancel, hurry)

    def _write(self, view: memoryview) -> None:
        while view:
            try:
                view = view[os.write(self._items_w, view):]
                continue
            except BlockingIOError:
                pass
            with contextlib.suppress(OSError):  # the reader moves the pipe into memory
                os.write(self._drain_w, b"!")
            room = select.poll()
            room.register(self._items_w, select.POLLOUT)
            room.poll(WRITE_WAIT_MS)

    def retire(self, token: int) -> None:
        """Exit if this is instance ``token`` (done, or given up for dead by the caller):
        Ray then starts a fresh one in its place."""
        if token == self.token:
            os._exit(worker.EXIT_RECYCLED)

    def pull(self, cancel: bool, hurry: bool = False) -> tuple[int, int, bytes, tuple, int | None]:
        """(token, pid, frames, counters, exit code once the loop has ended): what the loop
        reported since the last pull, waiting up to PULL_WAIT for the first report, then
        (unless the caller is in a ``hurry``: it waits on results for room) letting more
        gather while the loop has items to run, up to REPLY_GAP after the last answer."""
        if cancel:
            self.counters.cells[CANCEL] = 1
        with self._pull_lock:
            wait = select.poll()
            wait.register(self._results_r, select.POLLIN)
            ended = False
            data = bytearray()
            if wait.poll(PULL_WAIT * 1000):
                if not hurry:
                    self._gather()
                while True:
                    try:
                        got = os.read(self._results_r, tp.READ_SIZE)
                    except BlockingIOError:
                        break
                    if not got:  # the loop closed its end: STOP, or due for recycling
                        ended = True
                        self._thread.join()
                        break
                    data += got
            cells = self.counters.cells
            busy = cells[BUSY_NS]
            snapshot = (cells[DONE], cells[WORK_NS], cells[BATCHES], cells[B_START],
                        cells[B_END], time.monotonic_ns() - busy if busy else -1, cells[HELD])
            self._answered = time.monotonic()
            exitcode = self.exitcode if ended or self.exitcode == worker.EXIT_INIT_FAILED \
                else None
            return self.token, self.pid, bytes(data), snapshot, exitcode

    def _gather(self) -> None:
        """Let reports gather until REPLY_GAP after the last answer, while the loop has
        items it has not reported (the last report of a flush is answered at once)."""
        cells = self.counters.cells
        until = self._answered + REPLY_GAP
        while self._pushed > cells[DONE] and not cells[CANCEL]:
            left = until - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.002))  # each wake-up takes the GIL from do()
