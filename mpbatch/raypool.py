"""Workers as Ray actors (backend="ray", caller process): the Pool of lifecycle.py, on Ray.

The dispatcher, the ledgers, the collector and recovery are those of the process backend:
this module gives them the same face a Pool of worker processes does. Worker i is one
actor (rayworker.py) that runs the worker loop unchanged; two threads of the caller
stand for the pipes between them:

 dispatcher --send(i, frame)--> outbox i --sender i--> actor.push(token, frames)
 collector <== result pipe i <== pump i <--actor.pull()-- frames, counters, exit
   (epoll, as locally)             |  copies the actor's counters into the caller's
                                   |  shared-memory line i (done, work, the batch in do())
                                   '-> the sentinel of procs[i] on a death

A sender keeps one push in flight (Ray's calls then arrive in order) and sends all that
queued behind it in the next: under load, pushes grow, and their cost per item falls.
A pull waits in the actor until the loop reports something, so results come back as they
are made.

Deaths. Actors are created with max_restarts=-1, max_task_retries=0: Ray restarts a dead
actor in place and never re-runs a call, so attempts stay mpbatch's. A pull that fails
(ActorUnavailableError, ActorDiedError; ~1.5 s after a SIGKILL) ends that instance's
RayProc: the collector sees its sentinel and handles the death as it would a process's.
Ray cannot tell a call that ran from one only queued, and the frames the actor wrote
before it died die with it, so the cut is drawn from what the caller last saw: items
from the first one not reported to the end of the batch last seen inside do(), and at
least one batch (``size`` items), count as inside do() (isolated, or charged with
isolate_poison=False); the rest were only queued. Each instance draws a token: pushes meant
for a dead instance are dropped by its successor, and replies from an instance given up
for dead make the pool restart it.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
from multiprocessing import Pipe
from multiprocessing.connection import Connection
from typing import Any

from . import transport as tp
from .counters import (
    B_END,
    B_START,
    BATCHES,
    BUSY_NS,
    CANCEL,
    CELLS,
    DONE,
    WORK_NS,
    LoadCounters,
)
from .errors import MpbatchError
from .rayworker import RayWorker

EXTRA = 'backend="ray" needs Ray, which is not installed: pip install "mpbatch[ray]"'
OBJECT_STORE_BYTES = 256 << 20  # a local Ray started by mpbatch: chunks pass through it
GET_WAIT = 0.5  # s between a pump's or a sender's looks at close()
ROOM_WAIT = 3.0  # s start() waits for CPUs that closed actors are giving back
KILLED = -9  # the exit code recorded for an actor mpbatch killed while stopping


def import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ImportError(EXTRA) from exc
    return ray


def connect(ray: Any, address: str | None, workers: int) -> bool:
    """Reuse the Ray this program initialised, join ``address``, or start a local Ray
    sized to ``workers``; True if this call started one (close() then shuts it down).

    A new local instance is asked for as address="local": plain ray.init() would follow
    RAY_ADDRESS, or a ray_current_cluster file that a cluster stopped without ``ray stop``
    leaves behind, and join whatever that names.
    """
    if address is None and ray.is_initialized():
        return False
    if address is not None:
        ray.init(address=address, log_to_driver=True)
        return False
    ray.init(address="local", num_cpus=workers, include_dashboard=False,
             object_store_memory=OBJECT_STORE_BYTES, log_to_driver=True,
             _node_ip_address="127.0.0.1")
    return True


class RayProc:
    """One instance of worker i's actor, as the collector and recovery see a process:
    ``sentinel`` becomes readable when it ends; ``pid`` is the actor's once it replied;
    ``exitcode`` is 0 (stopped), EXIT_RECYCLED or EXIT_INIT_FAILED, KILLED when mpbatch
    killed it while stopping, and None after a death, since Ray reports no exit code."""

    def __init__(self) -> None:
        self.sentinel, self._fire = os.pipe()
        self.pid: int | None = None
        self.token: int | None = None
        self.exitcode: int | None = None
        self.ended = threading.Event()

    def end(self, exitcode: int | None) -> None:
        self.exitcode = exitcode
        self.ended.set()
        with contextlib.suppress(OSError):
            os.write(self._fire, b"!")

    def is_alive(self) -> bool:
        return not self.ended.is_set()

    def join(self, timeout: float | None = None) -> None:
        self.ended.wait(timeout)

    def close(self) -> None:
        for fd in (self.sentinel, self._fire):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.sentinel = self._fire = -1


class _Slot:
    """Worker i: its actor, its current instance, and what waits to be pushed to it."""

    def __init__(self, i: int) -> None:
        self.i = i
        self.handle: Any = None
        self.proc = RayProc()
        self.token: int | None = None  # the current instance's, once it replied
        self.outbox: list[bytes] = []
        self.cond = threading.Condition()
        self.results_w: Connection | None = None
        self.retired: list[Connection] = []  # result pipes of ended instances: the pump,
        # their only writer, closes them (closing one it may be writing to could hand its
        # descriptor's number to another file mid-write)
        self.dead_tokens: set[int] = set()
        self.dead_handle = False  # Ray will not restart it (its creation failed)
        self.threads: list[threading.Thread] = []
        self.procs = [self.proc]  # every instance's, closed at close()


class RayPool:
    """The workers as Ray actors; the interface of lifecycle.Pool."""

    start_method = "ray"
    zygote = None

    def __init__(self, workers: int, config_blob: bytes, counters: LoadCounters, size: int,
                 address: str | None, ray_options: dict | None) -> None:
        self.ray = ray = import_ray()
        self.workers = workers
        self.config_blob = config_blob
        self.counters = counters
        self.size = size
        self.started_ray = connect(ray, address, workers)
        options = {"num_cpus": 1, **(ray_options or {})}
        try:
            self._check_room(options)
        except BaseException:
            self._shutdown_ray()
            raise
        self.actor_class = ray.remote(RayWorker).options(
            max_restarts=-1, max_task_retries=0, max_concurrency=4, **options)
        self.procs: list[Any] = [None] * workers
        self.results: list[Connection | None] = [None] * workers
        self.ready = [False] * workers
        self.send_locks = [threading.Lock() for _ in range(workers)]
        self.slots = [_Slot(i) for i in range(workers)]
        self.on_stall: Any = lambda: None  # (a push never waits on a full pipe here)
        self.give_up_at: float | None = None
        self.stopping = False
        self._closed = False

    def _check_room(self, options: dict) -> None:
        """Fail at start when the cluster lacks the CPUs for every actor: Ray would make
        the extra ones wait for a CPU forever."""
        need = options.get("num_cpus", 1) * self.workers
        deadline = time.monotonic() + ROOM_WAIT
        while (free := self.ray.available_resources().get("CPU", 0)) < need:
            if time.monotonic() >= deadline:
                break
            time.sleep(0.1)  # actors released a moment ago give their CPUs back soon
        if free < need:
            raise MpbatchError(
                f"backend='ray' needs {need:g} free CPUs for workers={self.workers} actors "
                f"of num_cpus={options.get('num_cpus', 1):g}, and the Ray cluster has "
                f"{free:g} free; pass fewer workers=, a smaller ray_options['num_cpus'], or "
                f"add nodes to the cluster")

    # -- the Pool interface ---------------------------------------------------------------

    def start(self, i: int) -> None:
        """Start worker i's actor, or stand up its next instance (hold send_locks[i])."""
        slot = self.slots[i]
        old = slot.proc if slot.handle is not None else None
        results_r, results_w = Pipe(duplex=False)
        os.set_blocking(results_r.fileno(), False)
        os.set_blocking(results_w.fileno(), False)
        proc = RayProc()
        with slot.cond:
            if slot.handle is None or slot.dead_handle:
                slot.handle = self.actor_class.remote(self.config_blob)
                slot.dead_handle = False
            elif old is not None and old.exitcode is not None:
                # Alive but done (recycled, init() failed): a fresh process takes its place.
                self.ray.kill(slot.handle, no_restart=False)
            if slot.results_w is not None:
                slot.retired.append(slot.results_w)
            slot.proc, slot.token, slot.results_w, slot.outbox = proc, None, results_w, []
            slot.procs.append(proc)
            slot.cond.notify_all()
        old_r = self.results[i]
        self.procs[i], self.results[i] = proc, results_r
        self.ready[i] = False
        if old_r is not None:
            old_r.close()
        if not slot.threads:
            for name, target in (("sender", self._send_loop), ("pump", self._pump_loop)):
                thread = threading.Thread(target=target, args=(slot,), daemon=True,
                                          name=f"mpbatch-ray-{name}-{i}")
                thread.start()
                slot.threads.append(thread)

    def send(self, i: int, frame: bytes | list) -> bool:
        """Queue one wire frame for worker i (hold send_locks[i]); the sender pushes it."""
        slot = self.slots[i]
        data = b"".join(frame) if isinstance(frame, list) else frame
        with slot.cond:
            slot.outbox.append(data)
            slot.cond.notify_all()
        return True

    def give_up_by(self, deadline: float) -> None:
        self.give_up_at = deadline

    def reap(self, proc: Any, timeout: float | None = None) -> None:
        proc.join(timeout)

    def kill(self, i: int) -> None:
        proc = self.procs[i]
        if proc is not None:
            self.kill_process(proc)

    def kill_process(self, proc: Any) -> None:
        """Kill the actor instance ``proc`` if it is still the current one and alive (a
        timeout, a close() that gives up). Ray restarts it, unless the pool is stopping;
        then it counts as ended at once, instead of when Ray notices (~1.5 s)."""
        for slot in self.slots:
            with slot.cond:
                if slot.proc is not proc or not proc.is_alive():
                    continue
                with contextlib.suppress(Exception):  # gone already
                    self.ray.kill(slot.handle, no_restart=self.stopping)
                if self.stopping:
                    self._end(slot, proc, KILLED)

    def stop(self, timeout: float) -> None:
        """Ask every worker to finish and exit; kill those still running after ``timeout``."""
        self.stopping = True
        for i in range(self.workers):
            with self.send_locks[i]:
                self.send(i, tp.STOP_WIRE)
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            if proc is not None:
                proc.join(max(0.0, deadline - time.monotonic()))
        for i in range(self.workers):
            self.kill(i)

    def discard(self) -> None:
        """Undo a start that failed half-way: every actor made so far, and Ray if ours."""
        self.stopping = True
        self.close_pipes()

    def close_pipes(self) -> None:
        """Release every actor and descriptor, and shut Ray down if this pool started it
        (once the collector has stopped)."""
        self._closed = True
        for slot in self.slots:
            with slot.cond:
                slot.cond.notify_all()
            if slot.handle is not None:
                with contextlib.suppress(Exception):
                    self.ray.kill(slot.handle, no_restart=True)
        for slot in self.slots:
            for thread in slot.threads:
                thread.join()
            for conn in [*slot.retired, slot.results_w]:
                if conn is not None:
                    conn.close()
            for proc in slot.procs:
                proc.close()
        for conn in self.results:
            if conn is not None:
                conn.close()
        self._shutdown_ray()

    def _shutdown_ray(self) -> None:
        if self.started_ray:
            self.started_ray = False
            self.ray.shutdown()

    # -- the threads ----------------------------------------------------------------------

    def _get(self, ref: Any) -> Any:
        """ray.get, looking at close() every GET_WAIT; None once the pool closed."""
        while True:
            try:
                return self.ray.get(ref, timeout=GET_WAIT)
            except self.ray.exceptions.GetTimeoutError:
                if self._closed:
                    return None

    def _cancel(self, slot: _Slot) -> bool:
        """run()'s Ctrl-C (closing.py sets CANCEL): the actor starts no new batch."""
        return bool(self.counters.get(slot.i, CANCEL))

    def _send_loop(self, slot: _Slot) -> None:
        """Push what queued for worker i, one push in flight (so pushes arrive in order)."""
        ray = self.ray
        while True:
            with slot.cond:
                while not (slot.outbox and slot.token is not None) and not self._closed:
                    slot.cond.wait()
                if self._closed:
                    return
                parts, slot.outbox, token = slot.outbox, [], slot.token
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            # A death: the pump sees it, and the items are in the ledger.
            with contextlib.suppress(ray.exceptions.RayError):
                self._get(slot.handle.push.remote(token, time.monotonic_ns(), [data],
                                                  self._cancel(slot)))

    def _pump_loop(self, slot: _Slot) -> None:
        """Pull worker i's reports into its result pipe and counters; end an instance that
        died, and wait for the collector to start the next."""
        stash = None  # a reply from the next instance, read before the collector started it
        while True:
            with slot.cond:
                while not slot.proc.is_alive() and not self._closed:
                    slot.cond.wait()
                if self._closed:
                    return
                proc = slot.proc
                retired, slot.retired = slot.retired, []
            for conn in retired:
                conn.close()
            reply, stash = stash, None
            if reply is None:
                reply = self._pull(slot, proc)
                if reply is None:
                    continue
            token, pid, data, snapshot, exitcode = reply
            if token in slot.dead_tokens:  # an instance given up for dead still runs
                with contextlib.suppress(Exception):
                    self.ray.kill(slot.handle, no_restart=False)
                continue
            if proc.token is None:
                proc.token, proc.pid = token, pid
                with slot.cond:
                    if slot.proc is proc:
                        slot.token = token
                        slot.cond.notify_all()
            elif token != proc.token:  # it died and restarted between two pulls
                stash = reply
                with slot.cond:
                    self._end(slot, proc, None)
                continue
            if not self._forward(slot, proc, data, snapshot):
                continue
            if exitcode is not None:
                with slot.cond:
                    self._end(slot, proc, exitcode)

    def _pull(self, slot: _Slot, proc: RayProc) -> tuple | None:
        """One pull; None (having ended ``proc``) if the actor died or is gone."""
        ray = self.ray
        try:
            return self._get(slot.handle.pull.remote(self._cancel(slot)))
        except ray.exceptions.RayError as exc:
            with slot.cond:
                if isinstance(exc, ray.exceptions.ActorDiedError):
                    slot.dead_handle = True  # no restart will come: start() makes a new one
                if slot.proc is proc:
                    self._end(slot, proc, None)
            return None

    def _forward(self, slot: _Slot, proc: RayProc, data: bytes, snapshot: tuple) -> bool:
        """Copy the actor's counters into line i, then hand its frames to the collector;
        False if ``proc`` is no longer the current instance."""
        done, work_ns, batches, b_start, b_end, busy_age = snapshot
        cells, base = self.counters.cells, CELLS * slot.i
        with slot.cond:
            if slot.proc is not proc or not proc.is_alive():
                return False
            # In the order a worker writes them: work before done (the pacer's cost), done
            # before the report (a caller reacting to it sees the lower load).
            cells[base + WORK_NS] = work_ns
            cells[base + BATCHES] = batches
            cells[base + B_START] = b_start
            cells[base + B_END] = b_end
            cells[base + BUSY_NS] = time.monotonic_ns() - busy_age if busy_age >= 0 else 0
            cells[base + DONE] = done
            conn = slot.results_w
        if data and conn is not None:
            self._write(conn, data)
        return True

    def _write(self, conn: Connection, data: bytes) -> None:
        """Write to the collector's end; give up only when the pool closes."""
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(conn.fileno(), view):]
                continue
            except BlockingIOError:
                pass
            except OSError:  # closed by start() (a replacement) or close()
                return
            if self._closed:
                return
            room = select.poll()
            room.register(conn.fileno(), select.POLLOUT)
            room.poll(100)

    def _end(self, slot: _Slot, proc: RayProc, exitcode: int | None) -> None:
        """``proc`` has ended (hold slot.cond): after a death, mark as inside do() what the
        actor may have been running, then fire the sentinel."""
        if not proc.is_alive():
            return
        if proc.token is not None:
            slot.dead_tokens.add(proc.token)
        if exitcode is None or exitcode == KILLED:
            cells, base = self.counters.cells, CELLS * slot.i
            first = cells[base + DONE]  # reports tile the stream in order: the first not
            cells[base + B_START] = first  # reported is the first that may have run
            cells[base + B_END] = max(cells[base + B_END], first + self.size)
        slot.token = None
        proc.end(exitcode)
        slot.cond.notify_all()
