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

import atexit
import contextlib
import logging
import os
import select
import struct
import threading
import time
from collections.abc import Callable
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
    HELD,
    WORK_NS,
    LoadCounters,
)
from .errors import MpbatchError
from .lifecycle import _widen
from .rayworker import PULL_WAIT, RayWorker

log = logging.getLogger("mpbatch")

EXTRA = 'backend="ray" needs Ray, which is not installed: pip install "mpbatch[ray]"'
OBJECT_STORE_BYTES = 256 << 20  # a local Ray started by mpbatch: chunks pass through it
GET_WAIT = 0.5  # s between a pump's or a sender's looks at close()
ROOM_WAIT = 3.0  # s start() waits for the actors' resources (closed actors give theirs back)
KILLED = -9  # the exit code recorded for an actor mpbatch killed while stopping
LINGER = 0.002  # s a pump between pulls waits for frames to carry, while the actor is busy
PUSH_BYTES = 32 << 20  # at most this much in one push (it passes through the object store)
START_ERRORS = 3  # failed pulls in a row before an instance that never replied counts dead
_CHUNK_HEAD = struct.Struct("<BBq")  # a CHUNK frame's kind, flags and item count


def items_in(frame: bytes) -> int:
    """Items in a wire frame: n of a CHUNK, 0 for any other frame."""
    at = 12 if frame[:4] == b"\xff\xff\xff\xff" else 4  # tp.wire: a 2 GiB frame's longer length
    kind, _, n = _CHUNK_HEAD.unpack_from(frame, at)
    return n if kind == tp.CHUNK else 0


def import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ImportError(EXTRA) from exc
    # Ray registers its shutdown at exit when imported: register mpbatch's close of open
    # Batchers again, after it, so that it runs first (atexit runs the last one first) and
    # flushes on actors that still exist.
    from .batcher import _close_all

    atexit.unregister(_close_all)
    atexit.register(_close_all)
    return ray


_ours = 0  # pools open on a Ray that mpbatch started: the last one to close shuts it down
_ours_lock = threading.Lock()


def connect(ray: Any, address: str | None, workers: int) -> bool:
    """Reuse the Ray this program initialised, join ``address``, or start a local Ray
    sized to ``workers``; True if the Ray in use is one mpbatch started (the last pool on
    it to close shuts it down).

    A new local instance is asked for as address="local": plain ray.init() would follow
    RAY_ADDRESS, or a ray_current_cluster file that a cluster stopped without ``ray stop``
    leaves behind, and join whatever that names.
    """
    global _ours
    with _ours_lock:
        if ray.is_initialized():
            if address is not None:
                raise MpbatchError(
                    f"address={address!r}, but this program has initialised Ray already "
                    f"(ray.init); a process joins one cluster: pass address=None to use "
                    f"that one, or call ray.shutdown() first")
            if _ours:
                _ours += 1
                return True
            return False
        if address is not None:
            ray.init(address=address, log_to_driver=True)
            return False
        ray.init(address="local", num_cpus=workers, include_dashboard=False,
                 object_store_memory=OBJECT_STORE_BYTES, log_to_driver=True,
                 _node_ip_address="127.0.0.1")
        _ours = 1
        return True


def release(ray: Any) -> None:
    """A pool on a Ray that mpbatch started has closed."""
    global _ours
    with _ours_lock:
        _ours -= 1
        if _ours == 0:
            ray.shutdown()


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
        self.sent = 0  # items pushed to this instance (in flight included): the most it ran
        self.errors = 0  # failed pulls in a row before its first reply

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
        self.seq = 0  # the next push's number (per instance: the actor writes them in order)
        self.pulling = False  # the pump waits on a pull: frames queued now go by push
        self.outbox: list[tuple[bytes, int]] = []  # (wire frames, items in them)
        self.cond = threading.Condition()
        self.results_w: Connection | None = None
        self.retired: list[Connection] = []  # result pipes of ended instances: the pump,
        # their only writer, closes them (closing one it may be writing to could hand its
        # descriptor's number to another file mid-write)
        self.dead_tokens: set[int] = set()
        self.retiring: set[int] = set()  # instances asked to exit (retire())
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
        # No task events by default: Ray's GCS keeps a record of each call (up to its cap
        # of 100,000), which grew its memory with the stream, and reporting them costs CPU
        # on every call. ray_options={"enable_task_events": True} turns them back on.
        options = {"num_cpus": 1, "enable_task_events": False, **(ray_options or {})}
        self.group: Any = None
        try:
            options = self._reserve(options)
            self.actor_class = ray.remote(RayWorker).options(
                max_restarts=-1, max_task_retries=0, max_concurrency=4, **options)
        except BaseException:
            self._release_group()
            self._shutdown_ray()
            raise
        self.procs: list[Any] = [None] * workers
        self.results: list[Connection | None] = [None] * workers
        self.ready = [False] * workers
        self.send_locks = [threading.Lock() for _ in range(workers)]
        self.slots = [_Slot(i) for i in range(workers)]
        self.on_stall: Any = lambda: None  # (a push never waits on a full pipe here)
        self.give_up_at: float | None = None
        self.stopping = False
        # True while the caller waits on results for room (engine.py sets it): no
        # lingering to carry frames along, and the actor answers pulls at once.
        self.pressed: Callable[[], bool] = lambda: False
        self._closed = False

    def _reserve(self, options: dict) -> dict:
        """Reserve every actor's resources at once (a placement group, one bundle an
        actor), and fail at start when the cluster cannot hold them: Ray would make the
        extra actors wait for a CPU forever. Returns the actor options that use it (as
        they are if the caller chose where actors go)."""
        if "scheduling_strategy" in options or "placement_group" in options:
            return options
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = {"CPU": options.get("num_cpus", 1), "GPU": options.get("num_gpus", 0),
                  **options.get("resources", {})}
        if options.get("memory"):
            bundle["memory"] = options["memory"]
        bundle = {k: v for k, v in bundle.items() if v}
        if not bundle:  # actors that ask for nothing: nothing to reserve
            return options
        self.group = placement_group([bundle] * self.workers)
        try:  # freed CPUs of actors closed a moment ago come back within it
            self.ray.get(self.group.ready(), timeout=ROOM_WAIT)
        except self.ray.exceptions.GetTimeoutError:
            free = self.ray.available_resources()
            shown = ", ".join(f"{k}={free.get(k, 0):g}" for k in bundle)
            raise MpbatchError(
                f"backend='ray' needs {bundle} for each of workers={self.workers} actors, "
                f"and the Ray cluster cannot hold them all (free now: {shown}); pass fewer "
                f"workers=, ask less in ray_options, or add nodes to the cluster") from None
        return {**options, "scheduling_strategy": PlacementGroupSchedulingStrategy(
            self.group, placement_group_capture_child_tasks=False)}

    def _release_group(self) -> None:
        if self.group is not None:
            from ray.util.placement_group import remove_placement_group

            with contextlib.suppress(Exception):
                remove_placement_group(self.group)
            self.group = None

    # -- the Pool interface ---------------------------------------------------------------

    def start(self, i: int) -> None:
        """Start worker i's actor, or stand up its next instance (hold send_locks[i])."""
        slot = self.slots[i]
        old = slot.proc if slot.handle is not None else None
        results_r, results_w = Pipe(duplex=False)
        proc = None
        try:
            for conn in (results_r, results_w):
                os.set_blocking(conn.fileno(), False)
            _widen(results_w)
            proc = RayProc()
            with slot.cond:
                if slot.handle is None or slot.dead_handle:
                    slot.handle = self.actor_class.remote(self.config_blob)
                    slot.dead_handle = False
                elif old is not None and old.exitcode is not None and old.token is not None:
                    # Alive but done (recycled, init() failed): a fresh process takes its
                    # place. That instance exits, not whichever one is current by then.
                    self._retire(slot, old.token)
                if slot.results_w is not None:
                    slot.retired.append(slot.results_w)
                slot.proc, slot.token, slot.results_w, slot.outbox = proc, None, results_w, []
                slot.seq = 0
                slot.procs.append(proc)
                slot.cond.notify_all()
        except BaseException:
            results_r.close()
            results_w.close()
            if proc is not None:
                proc.close()
            raise
        # The collector is done with every instance but the last two (the one it is
        # replacing may still be in its epoll set until it rebuilds it).
        for done in slot.procs[:-3]:
            done.close()
        del slot.procs[:-3]
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
        n = items_in(data)
        with slot.cond:
            slot.outbox.append((data, n))
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
        self._release_group()
        self._shutdown_ray()

    def _shutdown_ray(self) -> None:
        if self.started_ray:
            self.started_ray = False
            release(self.ray)

    def _retire(self, slot: _Slot, token: int) -> None:
        """Ask the instance ``token`` of worker i to exit (once): Ray starts a fresh one.
        ray.kill would kill whichever instance is current when it lands."""
        if token in slot.retiring:
            return
        slot.retiring.add(token)
        with contextlib.suppress(Exception):  # it is gone already
            slot.handle.retire.remote(token)

    # -- the threads ----------------------------------------------------------------------

    def _get(self, ref: Any, waiting: Any = None) -> Any:
        """ray.get, looking at close() (and calling ``waiting``) every GET_WAIT; None once
        the pool closed."""
        while True:
            try:
                return self.ray.get(ref, timeout=GET_WAIT)
            except self.ray.exceptions.GetTimeoutError:
                if self._closed:
                    return None
                if waiting is not None:
                    waiting()

    def _cancel(self, slot: _Slot) -> bool:
        """run()'s Ctrl-C (closing.py sets CANCEL): the actor starts no new batch."""
        return bool(self.counters.get(slot.i, CANCEL))

    def _send_loop(self, slot: _Slot) -> None:
        """Push what queued for worker i, one push in flight (so pushes arrive in order)."""
        while not self._closed:
            try:
                self._push_next(slot)
            except Exception:  # a bug of ours: end the instance rather than go silent
                log.exception("mpbatch ray sender %d: unexpected error", slot.i)
                with slot.cond:
                    self._end(slot, slot.proc, None)

    def _push_next(self, slot: _Slot) -> None:
        with slot.cond:
            while not (slot.outbox and slot.token is not None) and not self._closed:
                slot.cond.wait()
            if self._closed:
                return
            if not slot.pulling and not self.pressed():
                # The pump is between two pulls: its next one carries the frames (one call
                # where a push and a pull would be two), unless it does not come soon.
                slot.cond.wait(LINGER)
                if not (slot.outbox and slot.token is not None) or self._closed:
                    return
            parts, seq, token, proc, items = self._take_outbox(slot)
        try:
            taken = self._get(slot.handle.push.remote(token, seq, time.monotonic_ns(), parts,
                                                      items, self._cancel(slot)))
        except self.ray.exceptions.RayError:
            taken = False
        if taken is None:  # the pool closed
            return
        if not taken:
            with slot.cond:
                self._not_taken(slot, proc, token)

    def _take_outbox(self, slot: _Slot) -> tuple[list[bytes], int, int, RayProc, int]:
        """The frames to send next, at most PUSH_BYTES (one call crosses the object store),
        with their push's sequence number, and the items in them (hold slot.cond; the
        outbox is not empty)."""
        take, size = 0, 0
        for data, _ in slot.outbox:
            if take and size + len(data) > PUSH_BYTES:
                break
            take, size = take + 1, size + len(data)
        batch, slot.outbox = slot.outbox[:take], slot.outbox[take:]
        proc = slot.proc
        proc.sent += sum(n for _, n in batch)  # before the push: a death mid-push may run them
        seq = slot.seq
        slot.seq += 1
        # As a list: the actor writes each frame as it is (joining them cost a copy here).
        return [d for d, _ in batch], seq, slot.token, proc, \
            sum(n for _, n in batch)  # type: ignore[return-value]

    def _not_taken(self, slot: _Slot, proc: RayProc, token: int) -> None:
        """A push that instance ``token`` did not take in order (it died, or the call
        failed): its stream no longer matches the ledger, so it ends here. Its items are in
        the ledger and are re-sent; a live instance is asked to exit (hold slot.cond)."""
        if proc.token == token:
            self._retire(slot, token)
            self._end(slot, proc, None)

    def _pump_loop(self, slot: _Slot) -> None:
        """Pull worker i's reports into its result pipe and counters; end an instance that
        died, and wait for the collector to start the next."""
        stash = None  # a reply from the next instance, read before the collector started it
        while not self._closed:
            try:
                stash = self._pump_once(slot, stash)
            except Exception:  # a bug of ours: end the instance rather than go silent
                log.exception("mpbatch ray pump %d: unexpected error", slot.i)
                stash = None
                with slot.cond:
                    self._end(slot, slot.proc, None)

    def _pump_once(self, slot: _Slot, stash: tuple | None) -> tuple | None:
        """One pull of worker i, or one wait for its next instance; returns the stash."""
        with slot.cond:
            while not slot.proc.is_alive() and not self._closed:
                slot.cond.wait()
            if self._closed:
                return None
            proc = slot.proc
            retired, slot.retired = slot.retired, []
        for conn in retired:
            conn.close()
        reply = stash or self._pull(slot, proc)
        if reply is None:
            return None
        token, pid, data, snapshot, exitcode = reply
        if token in slot.dead_tokens:  # an instance given up for dead still runs
            with slot.cond:
                self._retire(slot, token)
            time.sleep(0.05)  # until it has exited: pulls would reach it again at once
            return None
        if proc.token is None:
            with slot.cond:
                if slot.proc is not proc:
                    return reply  # replaced meanwhile: the next instance's first reply
                proc.token, proc.pid = token, pid
                if exitcode is None:  # (an instance whose init() failed takes no frames)
                    slot.token = token
                    slot.cond.notify_all()
        elif token != proc.token:  # it died and restarted between two pulls
            with slot.cond:
                self._end(slot, proc, None)
            return reply
        if self._forward(slot, proc, data, snapshot) and exitcode is not None:
            with slot.cond:
                self._end(slot, proc, exitcode)
        return None

    def _pull(self, slot: _Slot, proc: RayProc) -> tuple | None:
        """One pull, carrying what queued for the actor if anything did (an exchange);
        None if the actor died (``proc`` ended then) or is not up yet."""
        ray = self.ray
        with slot.cond:
            hurry = self.pressed()
            if self.counters.load(slot.i) and not slot.outbox and proc.token is not None \
                    and not hurry:
                # Items are queued there: its next report is not due at once, and add_many
                # sends its next block right after a report: wait a moment to carry it along.
                slot.cond.wait(LINGER)
            carried = None
            if slot.outbox and slot.token is not None and slot.proc is proc:
                carried = self._take_outbox(slot)
            slot.pulling = True
        sent = time.monotonic_ns()

        def unanswered() -> None:
            # do() holding the GIL keeps pulls from being answered: from a while after
            # this one was sent, count the actor as busy since then, for timeout=.
            cells, at = self.counters.cells, CELLS * slot.i + BUSY_NS
            if not cells[at] and time.monotonic_ns() - sent > (PULL_WAIT + 1.0) * 1e9:
                cells[at] = sent + int(PULL_WAIT * 1e9)

        try:
            watch = unanswered if proc.token is not None else None
            if carried is None:
                reply = self._get(slot.handle.pull.remote(self._cancel(slot), hurry), watch)
            else:
                parts, seq, token, _, items = carried
                both = self._get(slot.handle.exchange.remote(
                    token, seq, time.monotonic_ns(), parts, items, self._cancel(slot), hurry),
                    watch)
                if both is None:  # the pool closed
                    return None
                taken, reply = both
                if not taken:
                    with slot.cond:
                        self._not_taken(slot, proc, token)
            proc.errors = 0
            return reply
        except ray.exceptions.RayError as exc:
            with slot.cond:
                if isinstance(exc, ray.exceptions.ActorDiedError):
                    slot.dead_handle = True  # no restart will come: start() makes a new one
                elif proc.token is None and proc.errors + 1 < START_ERRORS:
                    # Not up yet (Ray is restarting it): not a death of this instance.
                    proc.errors += 1
                    slot.cond.wait(0.2)
                    return None
                if slot.proc is proc:
                    self._end(slot, proc, None)
            return None
        finally:
            slot.pulling = False

    def _forward(self, slot: _Slot, proc: RayProc, data: bytes, snapshot: tuple) -> bool:
        """Copy the actor's counters into line i, then hand its frames to the collector;
        False if ``proc`` is no longer the current instance."""
        done, work_ns, batches, b_start, b_end, busy_age, held = snapshot
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
            cells[base + HELD] = held
            cells[base + DONE] = done
            conn = slot.results_w
        if data and conn is not None:
            self._write(slot, conn, data)
        return True

    def _write(self, slot: _Slot, conn: Connection, data: bytes) -> None:
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
            # The collector is not reading: the counters copied with these frames grow old
            # meanwhile, and a batch long finished must not look like one past timeout=.
            self.counters.cells[CELLS * slot.i + BUSY_NS] = 0
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
            # Reports tile the stream in order: the first item not reported is the first
            # that may have run; the batch last seen in do(), or one batch from there, may
            # have; no item the instance was never sent can have.
            cells, base = self.counters.cells, CELLS * slot.i
            first = cells[base + DONE]
            last = min(max(cells[base + B_END], first + self.size), proc.sent)
            cells[base + B_START], cells[base + B_END] = (first, last) if last > first \
                else (0, 0)
        slot.token = None
        proc.end(exitcode)
        slot.cond.notify_all()
