"""mpbatch.Executor (caller process): ProcessPoolExecutor's interface, calls batched behind
the scenes, and every call failing alone.

Each call is an item of one Batcher: its key is a token for the function (the function
itself travels once per worker, as a DEFINE frame: dispatch.Dispatcher.define), its value
the arguments. A worker runs a batch call by call (per-item outcomes, peritem.py), so a
call that raises fails alone with its own exception and the worker's traceback as its
__cause__, as ProcessPoolExecutor gives it; a call that kills its worker, or runs past
``timeout``, is found by poison-item isolation and fails alone with an error that is both
mpbatch.WorkerDied (or BatchTimeout) and BrokenProcessPool. The executor stays usable.

submit() gives each call a LightFuture (futures.py). map() gives none: results come back
in bulk to the map that asked for them, and its iterator yields them in input order.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import pickle
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import cloudpickle

from .batcher import Batcher
from .calls import Calls, Initializer, call_name
from .errors import BatchTimeout, Closed, SerializationError, WorkerDied
from .futures import LightFuture
from .ledger import Segment
from .maps import TAG_INDEX, TAG_SHIFT, MapRun, split_tag
from .transport import PROTOCOL

DEFAULT_SIZE = 1024  # calls per batch: one pipe round trip carries this many
DEFAULT_INTERVAL = 0.002  # s a lone call may wait for batch-mates
# Calls in flight per worker before submit() waits: ProcessPoolExecutor's queue has no
# bound; this one is only there to bound memory (a pending call costs ~200 bytes here).
DEFAULT_BUFFER = 1 << 17


class WorkerCrashed(WorkerDied, BrokenProcessPool):
    """A call killed its worker (or was in a batch that did, and was found to be the one
    that did): WorkerDied to mpbatch, BrokenProcessPool to code written for
    ProcessPoolExecutor. The executor goes on."""


class CallTimeout(BatchTimeout, BrokenProcessPool):
    """A call ran past ``timeout``: its worker was killed; the executor goes on."""


def _as_broken(error: BaseException) -> BaseException:
    """What a crash looks like to a caller of ProcessPoolExecutor."""
    for plain, broken in ((BatchTimeout, CallTimeout), (WorkerDied, WorkerCrashed)):
        if type(error) is plain:
            copy = broken(*error.args)
            copy.__cause__ = error.__cause__
            return copy
    return error


class CallFuture(LightFuture):
    """The future of one call: its result comes pickled on its own (unpickled here, so
    one that will not unpickle fails this call alone); a crash is also BrokenProcessPool."""

    __slots__ = ()

    def set_result(self, result: Any) -> None:
        try:
            value = pickle.loads(result)
        except BaseException as exc:  # user code (__reduce__), even SystemExit: this call's
            self.set_exception(SerializationError(
                f"the result of this call cannot be unpickled in the caller "
                f"({type(exc).__name__}: {exc}); return plain data"))
            return
        super().set_result(value)

    def set_exception(self, exception: BaseException | None) -> None:
        super().set_exception(None if exception is None else _as_broken(exception))


class Executor(futures.Executor):
    """A concurrent.futures.Executor with ProcessPoolExecutor's signature and semantics,
    whose calls run in batches in mpbatch's workers and fail one by one.

    max_workers, mp_context, initializer, initargs, max_tasks_per_child: as for
    ProcessPoolExecutor (mp_context chooses the start method; mpbatch's default is its
    zygote, see Batcher's start_method).
    size: calls per batch (default 1024); interval: seconds a call may wait for batch-mates
        (default 0.002); max_attempts (default 1), timeout: seconds one call may run (its
        worker is killed; the call fails with CallTimeout), start_method, and any other
        Batcher option.
    """

    def __init__(self, max_workers: int | None = None, mp_context: Any = None,
                 initializer: Callable[..., Any] | None = None, initargs: tuple = (), *,
                 max_tasks_per_child: int | None = None, size: int = DEFAULT_SIZE,
                 interval: float = DEFAULT_INTERVAL, start_method: str | None = None,
                 buffer: int = DEFAULT_BUFFER, **options: Any) -> None:
        workers = _check_workers(max_workers)
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        start_method = _start_method(mp_context, start_method)
        if max_tasks_per_child is not None:
            _check_tasks(max_tasks_per_child, start_method)
            # A worker runs at most one batch of at most max_tasks_per_child calls.
            size = min(size, max_tasks_per_child)
            options["max_batches_per_worker"] = 1
        self._lock = threading.Lock()
        self._shutdown = False
        self._maps: dict[int, MapRun] = {}  # maps whose results are wanted, by ident
        self._feeding: set[MapRun] = set()  # maps whose feeder thread runs
        self._map_ids = itertools.count()
        self._tokens: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # fn -> token
        self._by_digest: dict[bytes, int] = {}  # what a function pickles to -> its token
        self._token_ids = itertools.count()
        self._batcher = Batcher(
            Calls(), workers=workers, size=size, interval=interval, start_method=start_method,
            buffer=buffer,
            init=None if initializer is None else Initializer(initializer, initargs),
            **options)
        # Garbage collected without shutdown(): the workers finish what was submitted and
        # exit, as ProcessPoolExecutor's do. (The Batcher holds this executor only weakly:
        # the Batcher itself stays alive until closed, for its atexit flush.)
        weakref.finalize(self, _close_in_background, self._batcher, os.getpid()).atexit = False

    # -- submit ---------------------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future:
        """Schedule ``fn(*args, **kwargs)``; a Future of its result (an argument that does
        not pickle lands on the future, as in ProcessPoolExecutor)."""
        fut = CallFuture()
        with self._lock:
            self._check_open()
            try:
                token = self._token(fn)
            except SerializationError as exc:
                fut.set_exception(exc)
                return fut
        try:
            call = pickle.dumps((args, kwargs), PROTOCOL)
        except Exception as exc:
            error = SerializationError(
                f"an argument of {call_name(fn)} cannot be pickled ({type(exc).__name__}: "
                f"{exc}); arguments cross to worker processes with pickle")
            error.__cause__ = exc
            fut.set_exception(error)
            return fut
        try:
            self._batcher._accept(token, call, fut, True, None)
        except Closed as exc:
            raise self._refusal(exc) from exc
        return fut

    def _check_open(self) -> None:
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def _check_unbroken(self) -> None:
        collector = self._batcher._collector
        if collector is not None and collector.broken is not None:
            raise BrokenProcessPool(f"the executor is broken: {collector.broken}")

    def _refusal(self, exc: Closed) -> BaseException:
        """submit() on a stopped Batcher: broken (workers cannot start), or shut down."""
        if self._batcher._collector is not None and self._batcher._collector.broken:
            return BrokenProcessPool(f"the executor is broken: {exc}")
        return RuntimeError("cannot schedule new futures after shutdown")

    def _token(self, fn: Callable[..., Any]) -> int:
        """The function's token; it is sent to each worker once, before its first call
        (hold the lock). Functions are known by the bytes they pickle to, and held only
        weakly (CPython issue #16284: an executor keeps no submitted callable alive): a new
        bound method of the same object each time pickles the same, and gets one token."""
        try:
            return self._tokens[fn]
        except (KeyError, TypeError):  # new, or not weakly referable / hashable
            pass
        try:
            blob = cloudpickle.dumps(fn)
        except Exception as exc:
            raise SerializationError(f"{fn!r:.80} cannot be pickled for the workers "
                                     f"({type(exc).__name__}: {exc})") from exc
        digest = hashlib.blake2b(blob, digest_size=16).digest()
        token = self._by_digest.get(digest)
        if token is None:
            b = self._batcher.start()
            outcomes = b._collector.outcomes  # type: ignore[union-attr]
            outcomes.keep_letters = False  # the futures and maps hold every outcome
            outcomes.on_items = _weakly(self._on_items)
            outcomes.on_dead_segments = _weakly(self._on_dead_segments)
            b._dispatcher.item_results = True
            token = self._by_digest[digest] = next(self._token_ids)
            b._dispatcher.define(token, blob)
        with contextlib.suppress(TypeError):
            self._tokens[fn] = token
        return token

    # -- map ------------------------------------------------------------------------------

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any],
            timeout: float | None = None, chunksize: int = 1,
            buffersize: int | None = None) -> Iterator[Any]:
        """Results of ``fn`` over the iterables, in their order, as they are ready.

        As ProcessPoolExecutor.map: every call is scheduled (in a feeder thread: this
        returns at once; shutdown() waits until they all are), unless ``buffersize`` bounds
        how many may be scheduled whose results were not yet yielded, which keeps an
        endless iterable in bounded memory. ``timeout`` counts from this call; past it, the
        iterator raises TimeoutError. The first call that raised raises from the iterator;
        so does an iterable that raises, once the calls before it are yielded. ``chunksize``
        is accepted and not needed: calls are batched anyway.
        """
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if buffersize is not None:
            if not isinstance(buffersize, int) or isinstance(buffersize, bool):
                raise TypeError("buffersize must be an integer or None")
            if buffersize < 1:
                raise ValueError("buffersize must be None or > 0")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            self._check_open()
            self._check_unbroken()
            token = self._token(fn)
            job = MapRun(next(self._map_ids), buffersize)
            self._maps[job.ident] = job
            self._feeding.add(job)
        calls = zip(*iterables, strict=False)  # the shortest iterable ends it, as in map()
        job.feeder = threading.Thread(target=self._feed, args=(job, token, calls),
                                      name="mpbatch-map-feeder", daemon=True)
        job.feeder.start()
        results = job.results(deadline, lambda: self._maps.pop(job.ident, None))
        # A map dropped before its first next() never runs its generator's finally.
        weakref.finalize(results, self._dropped, job).atexit = False
        return results

    def _feed(self, job: MapRun, token: int, calls: Iterator[tuple]) -> None:
        """The feeder thread of one map()."""
        try:
            job.feed(self._batcher, token, calls, self._refusal)
        finally:
            with self._lock:
                self._feeding.discard(job)

    def _dropped(self, job: MapRun) -> None:
        """A map's iterator was garbage collected: its results are dropped; its calls run
        as ProcessPoolExecutor's, which map() submitted: all of them, or with buffersize
        the first buffersize."""
        job.drop()
        self._maps.pop(job.ident, None)

    # -- outcomes (collector thread) -------------------------------------------------------

    def _on_items(self, segments: list[Segment], results: list) -> None:
        """A batch's results, one per call in stream order: each segment of map() calls
        (numbered, Segment.tag) hands its run of them to its map, whole."""
        pos = 0
        maps = self._maps
        for seg in segments:
            n = len(seg)
            if seg.tag is not None:  # submit()'s have futures instead
                job = maps.get(seg.tag >> TAG_SHIFT)
                if job is not None:
                    job.deliver_run(seg.tag & TAG_INDEX, results[pos:pos + n])
            pos += n

    def _on_dead_segments(self, segments: list[Segment], error: BaseException) -> None:
        """Calls that failed (or were given up): map()'s raise it from their maps."""
        by_map: dict[int, list] = {}
        error = _as_broken(error)
        for seg in segments:
            if seg.tag is not None:
                ident, first = split_tag(seg.tag)
                by_map.setdefault(ident, []).extend(
                    (index, False, error) for index in range(first, first + len(seg)))
        self._deliver(by_map)

    def _deliver(self, by_map: dict[int, list]) -> None:
        for ident, outcomes in by_map.items():
            job = self._maps.get(ident)
            if job is not None:
                job.deliver(outcomes)

    # -- shutdown --------------------------------------------------------------------------

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """As ProcessPoolExecutor.shutdown: no new calls; with ``cancel_futures``, calls
        not started are cancelled; with ``wait``, return once every call has its outcome
        and the workers are gone (else at once: they go when their calls are done).

        The calls of a map() are all scheduled first, as ProcessPoolExecutor's map()
        submits them all before it returns; with buffersize, those not yet scheduled never
        are (its iterator raises RuntimeError there, as ProcessPoolExecutor's does)."""
        with self._lock:
            self._shutdown = True
            # copy(): a map's finalizer (_dropped) may pop from _maps in this very thread
            jobs = set(self._maps.copy().values()) | self._feeding
        for job in jobs:
            if cancel_futures or job.room is not None:
                job.halt(cancel_futures)
        if cancel_futures:
            self._batcher._closing.cancel()
        if wait:
            self._close(jobs)
        else:
            threading.Thread(target=self._close, args=(jobs,),
                             name="mpbatch-executor-shutdown", daemon=True).start()

    def _close(self, jobs: set[MapRun]) -> None:
        try:
            for job in jobs:
                if job.feeder is not None:
                    job.feeder.join()
            self._batcher.close()
        finally:
            for job in jobs:
                job.end()  # a call of theirs with no outcome now was cancelled


def _weakly(method: Callable[..., None]) -> Callable[..., None]:
    """``method``, holding its object weakly (a no-op once it is gone)."""
    ref = weakref.WeakMethod(method)

    def call(*args: Any) -> None:
        bound = ref()
        if bound is not None:
            bound(*args)

    return call


def _close_in_background(batcher: Batcher, creator: int) -> None:
    """Close a dropped executor's Batcher without waiting (a finalizer runs in whatever
    thread let go of the executor: it must not wait there). Not in a child forked from
    its ``creator``: that copy shares the parent's workers, which are the parent's to stop
    (see batcher._LIVE)."""
    if os.getpid() != creator:
        return
    # RuntimeError: the interpreter is shutting down, and the atexit hook closes it.
    with contextlib.suppress(RuntimeError):
        threading.Thread(target=batcher.close, name="mpbatch-executor-shutdown",
                         daemon=True).start()


def _check_workers(max_workers: int | None) -> int | None:
    if max_workers is None:
        return None
    if not isinstance(max_workers, int) or isinstance(max_workers, bool):
        raise TypeError(f"max_workers must be an int or None (got "
                        f"{type(max_workers).__name__})")
    if max_workers <= 0:
        raise ValueError("max_workers must be greater than 0")
    return max_workers


def _start_method(mp_context: Any, start_method: str | None) -> str | None:
    if mp_context is None:
        return start_method
    method = mp_context.get_start_method()
    if start_method is not None and start_method != method:
        raise ValueError(f"mp_context is {method!r} but start_method={start_method!r}")
    return method


def _check_tasks(max_tasks_per_child: int, start_method: str | None) -> None:
    if not isinstance(max_tasks_per_child, int) or max_tasks_per_child < 1:
        raise ValueError("max_tasks_per_child must be >= 1")
    if start_method == "fork":
        raise ValueError("max_tasks_per_child is incompatible with the 'fork' start method; "
                         "use 'forkserver', 'spawn' or mpbatch's default")
