"""Contenders: one workload run through each library, written the way its users write it.

Each contender is a pair of small functions, one for streamed workloads (W1-W3, MEM, DK,
L16K-L1M) and one for the paced latency workload (W4). Each takes a `Job` and returns
`(count, checksum, extra)`: how many per-item results reached this (the caller) process,
their sum, and metrics of its own. The pool is created and torn down inside the call, so
cold start and teardown are timed.

Libraries are imported inside the functions: a run imports only what it measures, and mpbatch
may not be importable yet while the peers are measured.
"""

import multiprocessing
import statistics
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial

from workloads import RATE, Workload

MPBATCH_INTERVAL = 0.05  # s; mpbatch's interval= in streamed runs (the README's example)
LATENCY_INTERVAL = 0.001  # s; W4 with size=1: nothing should wait for a timer


@dataclass(frozen=True)
class Job:
    """One measured run: a workload, its size and the knobs chosen for this contender."""

    workload: Workload
    n: int  # items
    chunk: int | str | None  # chunksize / batch_size / chunk_size, or mpbatch size=
    rounds: int  # hash rounds per unit of work, calibrated once in the parent
    workers: int = 2
    start_method: str | None = None  # None: each library's own default
    keys: int | None = None  # distinct keys in W1 / MEM (scaling.py); None: the workload's
    max_bytes: int | None = None  # mpbatch's max_bytes= (run.py --max-bytes); None: not passed

    def pairs(self):
        """A fresh (key, value) generator: item generation is part of the timed run."""
        if self.keys is not None:
            return self.workload.items(self.n, self.rounds, keys=self.keys)
        return self.workload.items(self.n, self.rounds)

    def values(self):
        """The values alone, for peers that have no notion of a key."""
        return (value for _, value in self.pairs())

    def warmups(self):
        """One no-work item per worker (negative indices), sent before W4's schedule starts."""
        return [(f"k{j}", (-1 - j, 0)) for j in range(self.workers)]


class Tally:
    """Count and sum of the per-item results that reached the caller."""

    def __init__(self):
        self.count = 0
        self.total = 0

    def add(self, result):
        self.count += 1
        self.total += result

    def on_result(self, key, values, results):
        """mpbatch on_result (collector thread). A None `results` leaves the count short."""
        del key, values
        results = results or ()
        self.count += len(results)
        self.total += sum(results)

    def on_batch(self, batch, results):
        """mpbatch on_batch (collector thread): one call per batch, the keys walked in C."""
        del batch
        results = results or {}
        self.count += sum(map(len, results.values()))
        self.total += sum(map(sum, results.values()))

    def outcome(self, **extra):
        return self.count, self.total, extra


class Pacer:
    """W4: offers item i at t0 + i / rate and records its latency when its result arrives.

    Results arrive on library threads (result handlers, done-callbacks, mpbatch's collector),
    sometimes two at once, hence the lock. Warm-up items (negative index) are not recorded.
    """

    def __init__(self, job):
        self.period = 1.0 / RATE
        self.latency = [None] * job.n
        self.tally = Tally()
        self.lock = threading.Lock()
        self.t0 = 0.0
        self.behind = 0  # items offered more than one period after their due time

    def due(self, i):
        return self.t0 + i * self.period

    def offer_all(self, job, offer, sleep=time.sleep):
        """Call offer(i, key, value) for every item on schedule; open loop, no catch-up skips.
        ``sleep(seconds)`` waits for the next due time; it may return early (the bare floor
        reads results while it waits), and is called again until the item is due."""
        self.t0 = time.monotonic()
        for i, (key, value) in enumerate(job.pairs()):
            self.wait(i, sleep)
            offer(i, key, value)

    def paced(self, job):
        """The same schedule as a generator of pairs, for mpbatch's add_many."""
        self.t0 = time.monotonic()
        for i, pair in enumerate(job.pairs()):
            self.wait(i)
            yield pair

    def wait(self, i, sleep=time.sleep):
        delay = self.due(i) - time.monotonic()
        if delay < -self.period:
            self.behind += 1
        while delay > 0:
            sleep(delay)
            delay = self.due(i) - time.monotonic()

    def record(self, i, result):
        now = time.monotonic()
        if i < 0:
            return
        with self.lock:
            self.latency[i] = now - self.due(i)
            self.tally.add(result)

    def record_future(self, i, future):
        self.record(i, future.result())

    def on_result(self, key, values, results):
        """mpbatch on_result: the item's index travels in its value."""
        del key
        for value, result in zip(values, results or (), strict=False):
            self.record(value[0], result)

    def outcome(self, **extra):
        got = sorted(x for x in self.latency if x is not None)
        if got:
            q = statistics.quantiles(got, n=100, method="inclusive")
            extra |= {"p50_ms": q[49] * 1e3, "p90_ms": q[89] * 1e3, "p99_ms": q[98] * 1e3,
                      "max_ms": got[-1] * 1e3}
        return self.tally.outcome(behind=self.behind, **extra)


def _context(job):
    return multiprocessing.get_context(job.start_method)


# --- serial, in-process ------------------------------------------------------------------------


def serial_stream(job):
    tally, fn = Tally(), job.workload.fn
    for value in job.values():
        tally.add(fn(value))
    return tally.outcome()


def serial_paced(job):
    pacer, fn = Pacer(job), job.workload.fn
    pacer.offer_all(job, lambda i, key, value: pacer.record(i, fn(value)))
    return pacer.outcome()


# --- multiprocessing.Pool ----------------------------------------------------------------------


def pool_stream(job):
    tally = Tally()
    with _context(job).Pool(job.workers) as pool:
        for result in pool.imap_unordered(job.workload.fn, job.values(), chunksize=job.chunk):
            tally.add(result)
    return tally.outcome()


def pool_paced(job):
    pacer, fn = Pacer(job), job.workload.fn
    with _context(job).Pool(job.workers) as pool:
        pool.map(fn, [v for _, v in job.warmups()])

        def offer(i, key, value):
            pool.apply_async(fn, (value,), callback=partial(pacer.record, i))

        pacer.offer_all(job, offer)
        pool.close()
        pool.join()  # joins the result-handler thread: every callback has run
    return pacer.outcome()


# --- concurrent.futures.ProcessPoolExecutor ----------------------------------------------------


def ppe_stream(job):
    tally = Tally()
    with ProcessPoolExecutor(job.workers, mp_context=_context(job)) as ex:
        for result in ex.map(job.workload.fn, job.values(), chunksize=job.chunk):
            tally.add(result)
    return tally.outcome()


def ppe_paced(job):
    pacer, fn = Pacer(job), job.workload.fn
    with ProcessPoolExecutor(job.workers, mp_context=_context(job)) as ex:
        list(ex.map(fn, [v for _, v in job.warmups()]))  # 3.11 spawns workers on demand

        def offer(i, key, value):
            ex.submit(fn, value).add_done_callback(partial(pacer.record_future, i))

        pacer.offer_all(job, offer)
    return pacer.outcome()  # shutdown(wait=True) joined the thread that runs the callbacks


# --- joblib (loky backend) ---------------------------------------------------------------------


def _joblib_return_as():
    """The cheapest result mode this joblib offers: 'generator_unordered' came in 1.4."""
    import joblib

    major, minor = (int(x) for x in joblib.__version__.split(".")[:2])
    return "generator_unordered" if (major, minor) >= (1, 4) else "list"


def _stop_loky():
    """Shut joblib's reusable loky executor down, so its teardown is timed like the others'.

    Without this its workers idle on for 300 s after the call and would serve the next run
    warm (and outlive the process that started them).
    """
    from joblib.externals.loky import get_reusable_executor

    get_reusable_executor().shutdown(wait=True)


def joblib_stream(job):
    from joblib import Parallel, delayed

    tally, fn = Tally(), job.workload.fn
    run = Parallel(n_jobs=job.workers, batch_size=job.chunk, return_as=_joblib_return_as())
    for result in run(delayed(fn)(value) for value in job.values()):
        tally.add(result)
    _stop_loky()
    return tally.outcome()


def joblib_paced(job):
    """Parallel has no per-item submit; joblib users reach for its loky executor instead."""
    from joblib.externals.loky import get_reusable_executor

    pacer, fn = Pacer(job), job.workload.fn
    ex = get_reusable_executor(max_workers=job.workers)
    list(ex.map(fn, [v for _, v in job.warmups()]))

    def offer(i, key, value):
        ex.submit(fn, value).add_done_callback(partial(pacer.record_future, i))

    pacer.offer_all(job, offer)
    ex.shutdown(wait=True)
    return pacer.outcome()


# --- mpire -------------------------------------------------------------------------------------


def _mpire_pool(job):
    from mpire import WorkerPool

    return WorkerPool(n_jobs=job.workers, start_method=job.start_method or "fork")


def mpire_stream(job):
    tally = Tally()
    # mpire unpacks a tuple item into positional arguments; W2-W4 values are tuples, so each
    # is wrapped in a 1-tuple, as mpire's docs advise.
    args = ((value,) for value in job.values())
    with _mpire_pool(job) as pool:
        for result in pool.imap_unordered(job.workload.fn, args, chunk_size=job.chunk):
            tally.add(result)
    return tally.outcome()


def mpire_paced(job):
    pacer, fn = Pacer(job), job.workload.fn
    with _mpire_pool(job) as pool:
        for warm in [pool.apply_async(fn, args=(v,)) for _, v in job.warmups()]:
            warm.get()
        pending = []

        def offer(i, key, value):
            cb = partial(pacer.record, i)
            pending.append(pool.apply_async(fn, args=(value,), callback=cb))

        pacer.offer_all(job, offer)
        for result in pending:
            result.wait()
    return pacer.outcome()


# --- mpbatch -----------------------------------------------------------------------------------


def _batcher(job, on_result, size, interval, **extra):
    """The Batcher of every mpbatch contender; ``extra``: on_batch=, routing=."""
    import mpbatch

    if job.max_bytes is not None:
        extra["max_bytes"] = job.max_bytes
    # size may not exceed buffer (a batch could never fill); a user raises buffer with it.
    return mpbatch.Batcher(job.workload.do, size=size, interval=interval, workers=job.workers,
                           buffer=max(10_000, size), on_result=on_result,
                           start_method=job.start_method, **extra)


def _stats(batcher):
    """stats() as a dict of its int fields, whatever dataclass or object it is."""
    snap = batcher.stats()
    names = ("accepted", "succeeded", "dead_lettered", "pending", "batches", "retries",
             "worker_restarts")
    out = {name: getattr(snap, name, None) for name in names}
    # The start method it resolved to (the default depends on the caller's threads): not
    # public API, so read defensively.
    out["start_method"] = getattr(getattr(batcher, "_pool", None), "start_method", None)
    return out


def mpbatch_add_stream(job):
    tally = Tally()
    with _batcher(job, tally.on_result, job.chunk, MPBATCH_INTERVAL) as b:
        for key, value in job.pairs():
            b.add(key, value, block=True)
    return tally.outcome(stats=_stats(b))


def mpbatch_add_many_stream(job, **extra):
    """add_many; on a workload with ``on_batch`` (DK) results come through on_batch, one
    call per batch, the bulk delivery a user picks when keys are many."""
    tally = Tally()
    if job.workload.on_batch:
        callbacks = {"on_result": None, "on_batch": tally.on_batch}
    else:
        callbacks = {"on_result": tally.on_result}
    with _batcher(job, size=job.chunk, interval=MPBATCH_INTERVAL, **callbacks, **extra) as b:
        accepted = b.add_many(job.pairs())
    return tally.outcome(stats=_stats(b), add_many_returned=accepted)


def mpbatch_add_many_key_stream(job):
    """The same with routing="key": a key's items always go to one worker."""
    return mpbatch_add_many_stream(job, routing="key")


def mpbatch_submit_stream(job):
    tally = Tally()
    with _batcher(job, None, job.chunk, MPBATCH_INTERVAL) as b:
        futures = [b.submit(key, value, block=True) for key, value in job.pairs()]
    for future in futures:
        tally.add(future.result())
    return tally.outcome(stats=_stats(b))


def _mpbatch_warm(b, job):
    """Start the workers and take one round trip before W4's schedule, as the peers do."""
    for key, value in job.warmups():
        b.add(key, value, block=True)
    b.flush()


def mpbatch_add_paced(job):
    pacer = Pacer(job)
    with _batcher(job, pacer.on_result, 1, LATENCY_INTERVAL) as b:
        _mpbatch_warm(b, job)
        pacer.offer_all(job, lambda i, key, value: b.add(key, value, block=True))
    return pacer.outcome(stats=_stats(b))


def mpbatch_add_many_paced(job):
    pacer = Pacer(job)
    with _batcher(job, pacer.on_result, 1, LATENCY_INTERVAL) as b:
        _mpbatch_warm(b, job)
        b.add_many(pacer.paced(job))
    return pacer.outcome(stats=_stats(b))


def mpbatch_submit_paced(job):
    pacer = Pacer(job)
    with _batcher(job, None, 1, LATENCY_INTERVAL) as b:
        _mpbatch_warm(b, job)

        def offer(i, key, value):
            b.submit(key, value, block=True).add_done_callback(partial(pacer.record_future, i))

        pacer.offer_all(job, offer)
    return pacer.outcome(stats=_stats(b))


# --- the reference floors: hand-written minimal pipe pools (bare.py) ------------------------------


def bare_stream(job):
    import bare  # imports this module: not at the top

    return bare.bare_stream(job)


def bare_paced(job):
    import bare

    return bare.bare_paced(job)


def bare_keyed_stream(job):
    import bare

    return bare.bare_keyed_stream(job)


def bare_keyed_2t_stream(job):
    import bare

    return bare.bare_keyed_2t_stream(job)


def bare_keyed_key_stream(job):
    import bare

    return bare.bare_keyed_key_stream(job)


def bare_keyed_paced(job):
    import bare

    return bare.bare_keyed_paced(job)


def pipe_floor_stream(job):
    import bare

    return bare.pipe_floor_stream(job)


# --- registry ----------------------------------------------------------------------------------

# name -> (kind, streamed, paced). Kinds: "serial" (the baseline), "peer" (what ratios are
# taken against), "reference" (the machine's floor, not something users write), "mpbatch"
# (the library under test).
CONTENDERS = {
    "serial": ("serial", serial_stream, serial_paced),
    "pool": ("peer", pool_stream, pool_paced),
    "ppe": ("peer", ppe_stream, ppe_paced),
    "joblib": ("peer", joblib_stream, joblib_paced),
    "mpire": ("peer", mpire_stream, mpire_paced),
    "bare": ("reference", bare_stream, bare_paced),
    "bare-keyed": ("reference", bare_keyed_stream, bare_keyed_paced),
    # Streamed only, with each key pinned to one worker (routing="key"'s floor); run.py
    # runs it on DK alone unless --only names it.
    "bare-keyed-key": ("reference", bare_keyed_key_stream, None),
    # Streamed only: bare-keyed with a second caller thread reading the results, as in
    # Pool, ProcessPoolExecutor and mpbatch; run.py runs it on W1 alone unless --only names it.
    "bare-keyed-2t": ("reference", bare_keyed_2t_stream, None),
    # Raw bytes only, streamed only: the large-value workloads (L16K-L1M).
    "pipe-floor": ("reference", pipe_floor_stream, None),
    "mpbatch-add": ("mpbatch", mpbatch_add_stream, mpbatch_add_paced),
    "mpbatch-add_many": ("mpbatch", mpbatch_add_many_stream, mpbatch_add_many_paced),
    "mpbatch-submit": ("mpbatch", mpbatch_submit_stream, mpbatch_submit_paced),
    # Streamed only; run.py runs it on DK alone unless --only names it.
    "mpbatch-add_many-key": ("mpbatch", mpbatch_add_many_key_stream, None),
}


# What each contender imports. The child imports it before starting the clock: a program
# imports a library once, while pool start-up and teardown belong to every run (and are timed).
LIBRARIES = {
    "pool": ("multiprocessing.pool",),
    "ppe": ("concurrent.futures.process",),
    "joblib": ("joblib", "joblib.externals.loky"),
    "mpire": ("mpire",),
    "bare": ("bare", "multiprocessing.connection"),
    "bare-keyed": ("bare", "multiprocessing.connection"),
    "bare-keyed-key": ("bare", "multiprocessing.connection"),
    "bare-keyed-2t": ("bare", "multiprocessing.connection"),
    "pipe-floor": ("bare", "multiprocessing.connection"),
    # `import mpbatch` alone imports nothing (PEP 562 lazy names): the Batcher's modules are
    # imported on first use, which put ~60-90 ms of imports inside mpbatch's timed run.
    "mpbatch-add": ("mpbatch", "mpbatch.batcher"),
    "mpbatch-add_many": ("mpbatch", "mpbatch.batcher"),
    "mpbatch-submit": ("mpbatch", "mpbatch.batcher"),
    "mpbatch-add_many-key": ("mpbatch", "mpbatch.batcher"),
}


def kind(name):
    return CONTENDERS[name][0]


def applies(name, workload):
    """Whether contender `name` can run `workload`: the pipe floor moves bytes values only,
    and a contender without a paced form sits out W4."""
    if workload.paced and CONTENDERS[name][2] is None:
        return False
    if name == "pipe-floor":
        return bool(workload.value_bytes)
    return True


def preload(name):
    """Import contender `name`'s library (outside the timed region)."""
    import importlib

    for module in LIBRARIES.get(name, ()):
        importlib.import_module(module)


def run(name, job):
    """Run contender `name` on `job`: (count, checksum, extra)."""
    _, streamed, paced = CONTENDERS[name]
    return (paced if job.workload.paced else streamed)(job)
