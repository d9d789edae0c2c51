"""The running parts of one Batcher: what start() builds and close() takes down (caller).

Shared-memory load counters, the worker processes (lifecycle.Pool), routing and pacing, the
dispatcher with its ledgers, and the collector thread, started in that order and stopped in
the reverse one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import cloudpickle

from .affinity import Affinity
from .bulk import block_limit
from .collector import Collector
from .costs import Costs
from .counters import LoadCounters
from .deadletters import DeadLetterStore
from .dispatch import PACED_BATCHES, SPREAD_PACED_BATCHES, Dispatcher, Pacer, Router
from .errors import Closed, SerializationError
from .intake import Intake
from .lifecycle import Pool, default_start_method, default_workers
from .options import Options
from .stats import Accounts
from .worker import WorkerConfig

STOP_GRACE = 5.0  # seconds close() gives idle workers to exit before killing them


def worker_config(do: Callable[..., Any], opts: Options) -> bytes:
    """What every worker needs (do, init and the batch limits), pickled once."""
    config = WorkerConfig(do, opts.init, opts.batch_items, opts.max_bytes,
                          want_values=opts.want_values,
                          max_batches=opts.max_batches_per_worker, max_rss=opts.max_rss)
    try:
        return cloudpickle.dumps(config)
    except Exception as exc:
        raise SerializationError(
            f"do= or init= cannot be pickled for the workers ({type(exc).__name__}: {exc}); "
            f"they travel with cloudpickle, so they must not hold locks, sockets or open "
            f"files: create those in init= instead") from exc


class Engine:
    """Counters, pool, router, pacer, dispatcher and collector of a started Batcher."""

    def __init__(self, do: Callable[..., Any], opts: Options, accounts: Accounts,
                 intake: Intake, on_broken: Callable[[], None],
                 store: DeadLetterStore | None = None) -> None:
        """Start everything; on a failure, stop what did start and raise."""
        self.workers = opts.workers or default_workers()
        blob = worker_config(do, opts)
        self.counters = LoadCounters(self.workers, shared=opts.backend != "ray")
        pool = None
        try:
            pool = self._pool(opts, blob)
            if opts.backend == "ray":
                # Past half the buffer in flight, the caller waits on results for room:
                # the Ray pool then answers and sends at once instead of gathering.
                cap = opts.buffer * self.workers
                pool.pressed = lambda: accounts.outstanding * 2 >= cap  # type: ignore
            self.collector = self._start(pool, opts, accounts, intake, store)
        except BaseException:
            if pool is not None:
                pool.discard()
            self.counters.unlink()
            raise
        self.pool = pool
        self.collector.recovery.on_broken = on_broken

    def _pool(self, opts: Options, blob: bytes) -> Pool:
        if opts.backend == "ray":
            from .raypool import RayPool  # Ray loads only for backend="ray"

            return RayPool(self.workers, blob, self.counters,  # type: ignore[return-value]
                           opts.batch_items, opts.address, opts.ray_options)
        # The default is chosen now: whether this process has other threads decides it.
        return Pool(self.workers, opts.start_method or default_start_method(),
                    self.counters.name, blob)

    def _start(self, pool: Pool, opts: Options, accounts: Accounts, intake: Intake,
               store: DeadLetterStore | None) -> Collector:
        """Route, pace, start every worker and the collector thread; on a failure, the
        collector made so far is discarded (the caller discards the pool)."""
        counters = self.counters
        batch = opts.batch_items
        costs = Costs(counters)  # per worker: routing, pacing, stealing, affinity
        affinity = (Affinity(counters, costs, batch, opts.spill_after)  # type: ignore[arg-type]
                    if opts.routing == "affinity" else None)
        self.router = Router(opts.routing, counters, affinity, costs)
        # add_many's blocks go to the least-loaded worker (or to keys' homes, which move
        # by queued work): pace them by work, not count.
        self.pacer = None
        if opts.routing in ("least-loaded", "affinity"):
            batches = SPREAD_PACED_BATCHES if opts.routing == "affinity" else PACED_BATCHES
            self.pacer = Pacer(costs, batch, 2 * block_limit(batch), batches)
        self.dispatcher = Dispatcher(pool, counters, self.router)
        intake.attach(pool.workers, self.router, self.dispatcher)
        for i in range(pool.workers):
            pool.start(i)
        # Its wakeup pipe and epoll set may fail as a worker's pipes can (EMFILE).
        collector = Collector(pool, counters, self.dispatcher, accounts, opts,
                              intake.next_seal_ns, intake.seal_due, store)
        try:
            collector.start()
        except BaseException:
            collector.discard()
            raise
        intake.collector = collector
        self.dispatcher.reject = collector.reject
        return collector

    def stop(self, error: BaseException | None) -> Closed | BaseException:
        """Stop the workers (at once if ``error``, else once they ran what they hold) and
        the collector; returns the error for what is still held."""
        collector = self.collector
        collector.recovery.stop_error = error
        collector.recovery.stopping = True  # read under send_locks: no replacement after this
        self.pool.stopping = True  # (Ray: an actor killed now counts as ended at once)
        if error is not None:
            for i in range(self.workers):
                self.pool.kill(i)
        self.pool.stop(0 if error is not None else STOP_GRACE)
        collector.exit()
        collector.join()
        self.pool.close_pipes()
        return error or Closed("the Batcher closed before these items finished")
