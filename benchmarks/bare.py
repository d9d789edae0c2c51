"""The reference floor: hand-written minimal pipe pools, what this machine allows.

No library, no retries, no ledger: one pipe each way per worker, items pickled in chunks,
results pickled back, and one caller thread that feeds and drains the pipes without ever
blocking on either (a blocking write would deadlock against a worker blocked on writing its
results back). Each worker keeps DEPTH chunks in hand, so it never idles while the caller
prepares the next one. Three of them:

- ``bare``: values only, ``[fn(v) for v in chunk]``, as Pool's contender (no keys at all).
- ``bare-keyed``: mpbatch's shape without its guarantees. The caller splits (key, value)
  pairs into two columns, the worker groups them by key and calls the workload's ``do(batch)``
  once per chunk, and sends the batch's values back with the results, so the caller can make
  the same per-key call mpbatch's ``on_result(key, values, results)`` gets (on DK, the one
  call per chunk that ``on_batch(batch, results)`` gets). On a stream of distinct keys (DK)
  the worker builds each batch in C and only the results go back; the caller rebuilds the
  batch from the chunk it kept, as mpbatch does: the floor is then the least that keyed
  batches of distinct keys cost (it knows the keys are distinct; mpbatch must check).
- ``bare-keyed-key``: ``bare-keyed`` with each key pinned to one worker, as mpbatch's
  ``routing="key"``: the caller splits each chunk by owner (crc32 of the key's UTF-8 modulo
  the workers: the cheapest route that is the same in every run; mpbatch spreads the crc32
  with a multiply first) and sends each part to its owner. On DK, the least a stable key
  route costs on top of ``bare-keyed``; its keys split evenly so (every chunk of 1,000
  within 2 items of half and half on two workers).

What they score on a workload is the ceiling a library works under on this machine, with and
without keys. Their ratios are taken against the best peer like everyone's, but they are not
peers (a user does not write them), so they never set the bar.

``bare-keyed-2t`` is ``bare-keyed`` with a second caller thread that reads every result, as
the result-handler and collector threads of Pool, ProcessPoolExecutor and mpbatch do (run
on W1): what splitting the caller into a sending and a reading thread costs on its own.

A fourth, ``pipe-floor``, is for the large-value workloads (L16K-L1M) only: the machine's pipe
bandwidth, with no pickle at all. Each value's raw bytes go, after a 4-byte length, straight
from the caller's ``bytes`` object into one ``os.pipe()`` per worker (``os.writev``: no copy,
no concatenation), and each worker reads them into one reused buffer (``os.readv``) and
digests that buffer in place; results come back as packed 32-bit digests.
"""

import contextlib
import os
import pickle
import select
import struct
import threading
import zlib
from array import array
from collections import deque
from itertools import islice

from contenders import Pacer, Tally, _context

DEPTH = 2  # chunks in flight per worker: one running, one waiting in its pipe
_LENGTH = struct.Struct("!i")  # multiprocessing.Connection's framing, read by the worker


def _serve(fn, items, results):
    """Worker: run fn over each chunk of values, send the list of results back."""
    recv, send, loads, dumps = items.recv_bytes, results.send_bytes, pickle.loads, pickle.dumps
    while True:
        data = recv()
        if not data:  # the caller's stop (EOF may never come: fork copies the write end)
            return
        send(dumps([fn(v) for v in loads(data)], pickle.HIGHEST_PROTOCOL))


def _received(items):
    """Worker: each chunk the caller sends, unpickled, until its stop (an empty message)."""
    recv, loads = items.recv_bytes, pickle.loads
    while data := recv():
        yield loads(data)


def _serve_keyed(do, items, results):
    """Worker: group each chunk of (keys, values) by key, run do(batch) once, and send back
    (batch, one list of results per key, in the batch's key order)."""
    send, dumps = results.send_bytes, pickle.dumps
    for keys, values in _received(items):
        batch = {}
        for key, value in zip(keys, values, strict=True):
            group = batch.get(key)
            if group is None:
                batch[key] = [value]
            else:
                group.append(value)
        out = do(batch)
        send(dumps((batch, [out[key] for key in batch]), pickle.HIGHEST_PROTOCOL))


def _serve_distinct(do, items, results):
    """Worker, for a stream whose keys are all distinct (DK): each chunk's batch is built in
    C (a one-item list per key), do(batch) runs once, and only the results go back, in the
    chunk's order: the caller rebuilds the batch from the chunk it kept."""
    send, dumps = results.send_bytes, pickle.dumps
    for keys, values in _received(items):
        out = do(dict(zip(keys, map(list, zip(values)), strict=True)))
        send(dumps((None, list(map(out.__getitem__, keys))), pickle.HIGHEST_PROTOCOL))


class PipePool:
    """Workers and their pipes, driven by the caller's single thread through ``pump``."""

    def __init__(self, job, serve, function, on_results):
        ctx = _context(job)
        self.on_results = on_results  # (worker, what serve sent back) for each chunk done
        self.procs, self.conns, self.item_fds, self.result_fds = [], [], [], []
        self.outbox = []  # bytes still to write, per worker
        self.inbox = []  # bytes read, not yet a whole frame, per worker
        self.inflight = []  # chunks sent and not answered, per worker
        for w in range(job.workers):
            item_r, item_w = ctx.Pipe(duplex=False)
            result_r, result_w = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=serve, args=(function, item_r, result_w), daemon=True)
            proc.start()
            item_r.close()
            result_w.close()
            self.procs.append(proc)
            self.conns += [item_w, result_r]
            self.item_fds.append(item_w.fileno())
            self.result_fds.append(result_r.fileno())
            os.set_blocking(self.item_fds[w], False)
            self.outbox.append(bytearray())
            self.inbox.append(bytearray())
            self.inflight.append(0)

    def least_busy(self, limit=None):
        """The worker with the fewest chunks in flight; None if all have ``limit``."""
        w = min(range(len(self.procs)), key=self.inflight.__getitem__)
        return None if limit is not None and self.inflight[w] >= limit else w

    def send(self, w, chunk):
        self._queue(w, pickle.dumps(chunk, pickle.HIGHEST_PROTOCOL))
        self.inflight[w] += 1

    def _queue(self, w, payload):
        box = self.outbox[w]
        box += _LENGTH.pack(len(payload))
        box += payload
        self._write(w)

    def pump(self, timeout):
        """Move bytes for up to ``timeout`` seconds (None: until something happens).

        select(), not epoll: epoll rounds a timeout up to whole milliseconds, which made
        W4's offers late by up to 1 ms; select() waits to the microsecond (and the
        benchmark's descriptors are all below 1024)."""
        writes = [self.item_fds[w] for w, box in enumerate(self.outbox) if box]
        readable, writable, _ = select.select(self.result_fds, writes, [], timeout)
        for fd in writable:
            self._write(self.item_fds.index(fd))
        for fd in readable:
            self._read(self.result_fds.index(fd))

    def _write(self, w):
        box = self.outbox[w]
        with contextlib.suppress(BlockingIOError):  # full: pump() finishes it later
            del box[:os.write(self.item_fds[w], box)]

    def _read(self, w):
        box, data = self.inbox[w], os.read(self.result_fds[w], 1 << 20)
        if not data:
            raise RuntimeError(f"worker {w} exited with {len(box)} bytes of a result unread")
        box += data
        pos = 0
        while len(box) - pos >= 4:
            (n,) = _LENGTH.unpack_from(box, pos)
            if len(box) - pos - 4 < n:
                break
            answer = pickle.loads(memoryview(box)[pos + 4:pos + 4 + n])
            pos += 4 + n
            self._answered(w)
            self.on_results(w, answer)
        del box[:pos]

    def _answered(self, w):
        self.inflight[w] -= 1

    def finish(self):
        """Wait for every chunk's results, then stop and join the workers."""
        while any(self.inflight):
            self.pump(None)
        for w in range(len(self.procs)):
            self._queue(w, b"")  # stop
        while any(self.outbox):
            self.pump(None)
        self.close()

    def abort(self):
        for proc in self.procs:
            proc.kill()
        self.close()

    def close(self):
        for conn in self.conns:
            conn.close()
        for proc in self.procs:
            proc.join()


class ReaderThreadPool(PipePool):
    """PipePool with a second caller thread that reads every result, as the result-handler
    and collector threads of Pool, ProcessPoolExecutor and mpbatch do: the caller's two
    threads share one GIL. The calling thread only pulls, pickles and writes (blocking:
    the reader keeps the results flowing)."""

    def __init__(self, job, serve, function, on_results):
        super().__init__(job, serve, function, on_results)
        for fd in self.item_fds:
            os.set_blocking(fd, True)
        self.room = threading.Condition()
        self.done = False
        self.error = None
        self.wake_r, self.wake_w = os.pipe()
        self.reader = threading.Thread(target=self._read_all, name="bare-reader", daemon=True)
        self.reader.start()

    def _answered(self, w):
        with self.room:
            self.inflight[w] -= 1
            self.room.notify()

    def _read_all(self):
        try:
            while not self.done:
                readable, _, _ = select.select([*self.result_fds, self.wake_r], [], [])
                for fd in readable:
                    if fd != self.wake_r:
                        self._read(self.result_fds.index(fd))
        except BaseException as exc:  # a worker died: the calling thread raises it
            with self.room:
                self.error = exc
                self.room.notify_all()

    def take(self):
        """The least busy worker once it has fewer than DEPTH chunks in flight (counted)."""
        with self.room:
            while (w := self.least_busy(DEPTH)) is None and self.error is None:
                self.room.wait()
            self._raise()
            self.inflight[w] += 1
            return w

    def write(self, w, chunk):
        payload = pickle.dumps(chunk, pickle.HIGHEST_PROTOCOL)
        data = memoryview(_LENGTH.pack(len(payload)) + payload)
        while data:
            data = data[os.write(self.item_fds[w], data):]

    def _raise(self):
        if self.error is not None:
            raise RuntimeError("the reader thread failed") from self.error

    def finish(self):
        with self.room:
            while any(self.inflight) and self.error is None:
                self.room.wait()
            self._raise()
        self._stop_reader()
        for w in range(len(self.procs)):
            os.write(self.item_fds[w], _LENGTH.pack(0))  # stop
        self.close()

    def abort(self):
        self._stop_reader()
        super().abort()

    def _stop_reader(self):
        self.done = True
        os.write(self.wake_w, b"!")
        self.reader.join()
        os.close(self.wake_r)
        os.close(self.wake_w)


def _columns(pairs, n):
    """Up to n pairs as (keys, values) columns; None when the stream is done."""
    keys, values = [], []
    add_key, add_value = keys.append, values.append
    for key, value in islice(pairs, n):
        add_key(key)
        add_value(value)
    return (keys, values) if keys else None


def _stream(job, serve, function, parts, on_results, sent=None):
    """Send ``parts``, (worker, chunk) pairs, each to its worker (None: the least busy one)
    once it has fewer than DEPTH in flight. ``sent(w, chunk)``: told of each chunk written
    to worker w, in order."""
    pool = PipePool(job, serve, function, on_results)
    try:
        for w, chunk in parts:
            if w is None:
                while (w := pool.least_busy(DEPTH)) is None:
                    pool.pump(None)
            while pool.inflight[w] >= DEPTH:
                pool.pump(None)
            pool.send(w, chunk)
            if sent is not None:
                sent(w, chunk)
        pool.finish()
    except BaseException:
        pool.abort()
        raise


def bare_stream(job):
    tally = Tally()

    def on_results(_, results):
        tally.on_result(None, None, results)

    values = job.values()
    chunks = iter(lambda: list(islice(values, job.chunk)), [])
    _stream(job, _serve, job.workload.fn, ((None, c) for c in chunks), on_results)
    return tally.outcome()


def _by_owner(pairs, n, workers):
    """Chunks of up to n pairs, each split by its keys' owners into (worker, chunk) parts."""
    crc32 = zlib.crc32
    while (chunk := _columns(pairs, n)) is not None:
        keys, values = chunk
        ks, vs = [[] for _ in range(workers)], [[] for _ in range(workers)]
        for w, key, value in zip([crc32(k.encode()) % workers for k in keys], keys, values,
                                 strict=True):
            ks[w].append(key)
            vs[w].append(value)
        yield from ((w, (ks[w], vs[w])) for w in range(workers) if ks[w])


def bare_keyed_stream(job, route=False):
    tally = Tally()
    waiting = [deque() for _ in range(job.workers)]  # DK: chunks sent to each, in order

    def on_results(w, answer):
        batch, grouped = answer
        if batch is None:  # distinct keys: rebuilt from the chunk kept here, in C
            keys, values = waiting[w].popleft()
            batch = dict(zip(keys, map(list, zip(values)), strict=True))
        if job.workload.on_batch:  # the call mpbatch's add_many gets there: one per chunk
            tally.on_batch(batch, dict(zip(batch, grouped, strict=True)))
            return
        for (key, values), results in zip(batch.items(), grouped, strict=True):
            tally.on_result(key, values, results)  # the call mpbatch's contenders get

    pairs = job.pairs()
    serve = _serve_distinct if job.workload.distinct_keys else _serve_keyed

    def sent(w, chunk):  # distinct keys: results alone come back, keep each chunk till then
        if job.workload.distinct_keys:
            waiting[w].append(chunk)

    if route:
        parts = _by_owner(pairs, job.chunk, job.workers)
    else:
        parts = ((None, c) for c in iter(lambda: _columns(pairs, job.chunk), None))
    _stream(job, serve, job.workload.do, parts, on_results, sent)
    return tally.outcome()


def bare_keyed_2t_stream(job):
    """bare-keyed with its results read by a second caller thread (ReaderThreadPool):
    what a caller split into a sending and a reading thread costs, with the same work."""
    tally = Tally()

    def on_results(_, answer):
        batch, grouped = answer
        for (key, values), results in zip(batch.items(), grouped, strict=True):
            tally.on_result(key, values, results)

    pairs = job.pairs()
    pool = ReaderThreadPool(job, _serve_keyed, job.workload.do, on_results)
    try:
        while (chunk := _columns(pairs, job.chunk)) is not None:
            pool.write(pool.take(), chunk)
        pool.finish()
    except BaseException:
        pool.abort()
        raise
    return tally.outcome()


def bare_keyed_key_stream(job):
    return bare_keyed_stream(job, route=True)


def _paced(job, serve, function, one, results_of):
    """W4: each item goes to the least busy worker at its due time; the caller reads results
    while it waits for the next due time, so a result is seen as soon as it arrives.
    ``one(key, value)`` is the chunk an item travels in; ``results_of(answer)`` its results."""
    pacer = Pacer(job)
    waiting = [deque() for _ in range(job.workers)]  # item indices, in the order sent

    def on_results(w, answer):
        for result in results_of(answer):
            pacer.record(waiting[w].popleft(), result)

    pool = PipePool(job, serve, function, on_results)
    try:
        for j, (key, value) in enumerate(job.warmups()):
            waiting[j % job.workers].append(value[0])
            pool.send(j % job.workers, one(key, value))
        while any(pool.inflight):
            pool.pump(None)

        def offer(i, key, value):
            w = pool.least_busy()
            waiting[w].append(i)
            pool.send(w, one(key, value))

        pacer.offer_all(job, offer, sleep=pool.pump)
        pool.finish()
    except BaseException:
        pool.abort()
        raise
    return pacer.outcome()


def bare_paced(job):
    return _paced(job, _serve, job.workload.fn, lambda key, value: [value],
                  lambda results: results)


def bare_keyed_paced(job):
    return _paced(job, _serve_keyed, job.workload.do, lambda key, value: ([key], [value]),
                  lambda answer: [r for results in answer[1] for r in results])


# --- pipe-floor: raw bytes through one pipe per worker ---------------------------------------

PIPE_SIZE = 1 << 20  # F_SETPIPE_SZ, as mpbatch widens its item pipes (the default is 64 KiB)
_STOP = _LENGTH.pack(0)


def _widen(fd):
    with contextlib.suppress(ImportError, OSError):  # not Linux, or above pipe-max-size
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_SIZE)


def _read_into(fd, view):
    """Fill ``view`` from ``fd``; False at EOF."""
    while view:
        got = os.readv(fd, [view])
        if not got:
            return False
        view = view[got:]
    return True


def _serve_raw(digest, items, results, every):
    """Worker: read length-prefixed values into one reused buffer, digest each in place, and
    send the digests back every ``every`` values (and before stopping) as packed uint32s."""
    fd_in, fd_out = items.fileno(), results.fileno()
    head = bytearray(_LENGTH.size)
    buf = bytearray(PIPE_SIZE)
    view = memoryview(buf)
    out = array("I")
    while _read_into(fd_in, memoryview(head)):
        (n,) = _LENGTH.unpack(head)
        if n > 0:
            if n > len(buf):
                buf = bytearray(n)
                view = memoryview(buf)
            if not _read_into(fd_in, view[:n]):
                break
            out.append(digest(view[:n]))
        if out and (len(out) >= every or n == 0):
            data = out.tobytes()
            while data:
                data = data[os.write(fd_out, data):]
            del out[:]
        if n == 0:  # the caller's stop (EOF may never come: fork copies the write end)
            return


class RawPipes:
    """The pipe floor's caller: non-blocking ``os.writev`` of the values' own buffers to the
    worker with the fewest values unanswered among those whose pipe has room, on one thread
    that waits on every pipe with ``select()``."""

    def __init__(self, job, tally):
        ctx = _context(job)
        self.tally = tally
        self.procs, self.conns, self.item_fds, self.result_fds = [], [], [], []
        self.pending = []  # per worker: memoryviews still to write, or None
        self.inbox = []  # per worker: digest bytes read, not yet a whole digest
        self.sent, self.done = [0] * job.workers, [0] * job.workers
        self.stopped = [False] * job.workers  # its stop frame is queued
        self.ended = set()  # result descriptors at EOF: the worker stopped as told
        for _ in range(job.workers):
            item_r, item_w = ctx.Pipe(duplex=False)  # os.pipe() underneath
            result_r, result_w = ctx.Pipe(duplex=False)
            _widen(item_w.fileno())
            proc = ctx.Process(target=_serve_raw, daemon=True,
                               args=(job.workload.fn, item_r, result_w, job.chunk))
            proc.start()
            item_r.close()
            result_w.close()
            self.procs.append(proc)
            self.conns += [item_w, result_r]
            self.item_fds.append(item_w.fileno())
            self.result_fds.append(result_r.fileno())
            os.set_blocking(item_w.fileno(), False)
            self.pending.append(None)
            self.inbox.append(bytearray())

    def send(self, chunk):
        """Queue ``chunk`` (a list of bytes values) for the least-busy worker with room."""
        while True:
            free = [w for w, parts in enumerate(self.pending) if parts is None]
            if free:
                break
            self.pump(None)
        w = min(free, key=lambda w: self.sent[w] - self.done[w])
        parts = []
        for value in chunk:
            parts += (_LENGTH.pack(len(value)), memoryview(value))
        self.pending[w] = parts
        self.sent[w] += len(chunk)
        self._write(w)

    def _write(self, w):
        parts = self.pending[w]
        try:
            n = os.writev(self.item_fds[w], parts)
        except BlockingIOError:
            return
        k = 0
        while k < len(parts) and n >= len(parts[k]):
            n -= len(parts[k])
            k += 1
        del parts[:k]
        if parts:
            parts[0] = parts[0][n:]
        else:
            self.pending[w] = None

    def pump(self, timeout):
        writes = [self.item_fds[w] for w, parts in enumerate(self.pending) if parts]
        reads = [fd for fd in self.result_fds if fd not in self.ended]
        readable, writable, _ = select.select(reads, writes, [], timeout)
        for fd in writable:
            self._write(self.item_fds.index(fd))
        for fd in readable:
            self._read(self.result_fds.index(fd))

    def _read(self, w):
        box, data = self.inbox[w], os.read(self.result_fds[w], 1 << 16)
        if not data:
            if self.stopped[w] and self.sent[w] == self.done[w]:
                self.ended.add(self.result_fds[w])
                return
            raise RuntimeError(f"worker {w} exited with {self.sent[w] - self.done[w]} "
                               "values unanswered")
        box += data
        whole = len(box) - len(box) % 4
        digests = array("I", box[:whole])
        del box[:whole]
        self.done[w] += len(digests)
        self.tally.count += len(digests)
        self.tally.total += sum(digests)

    def finish(self):
        """Send each worker its stop (it sends its last digests then), wait for every
        digest, and join the workers."""
        for w in range(len(self.procs)):
            while self.pending[w]:
                self.pump(None)
            self.pending[w] = [_STOP]
            self.stopped[w] = True
            self._write(w)
        while any(self.pending) or self.sent != self.done:
            self.pump(None)
        self.close()

    abort, close = PipePool.abort, PipePool.close  # the same teardown: procs and conns


def pipe_floor_stream(job):
    assert array("I").itemsize == 4
    tally = Tally()
    pipes = RawPipes(job, tally)
    try:
        values = job.values()
        for chunk in iter(lambda: list(islice(values, job.chunk)), []):
            pipes.send(chunk)
        pipes.finish()
    except BaseException:
        pipes.abort()
        raise
    return tally.outcome()
