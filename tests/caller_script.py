"""A caller process for the signal and orphan tests: python caller_script.py MODE.

It prints lines the test waits on (no sleeps needed on the test's side):
  pids <worker pids>      the workers are up
  method <m> <zygote pid> the start method it resolved to, and its zygote's pid (or 0)
  segments <names>        its shared-memory segments: the counters, and the rings if any
  added                   every item is accepted
  batch <pid>             a worker entered do() (printed by the worker; with BACKEND=ray,
                          "batch 0" by the caller once its counters show a batch in do())
  interrupted             (mode "wait") the first Ctrl-C landed; close() runs next
  closed <done> <stats>   close() returned (after a first Ctrl-C, that means it flushed)
  streaming               (mode "stream") the stream reached item AT; adding goes on
  closing                 (mode "closing") every item is accepted; close() runs next
  inside close            (mode "closing") close() has begun: the Batcher is closing
HIGH_FDS=N: hold descriptors numbered up to past N, opened before the Batcher starts.
MODE: "wait" (block until a signal), "closing" (leave the with block at once: close()
flushes for most of the run, where a first Ctrl-C must still flush), "exit" (os._exit while
workers are busy), "noclose" (return from main without close(): atexit must flush), "stream"
(add items without end, through ADD=add or ADD=add_many, until a signal lands wherever the
adding thread is), "stuck" (init() never returns and holds the GIL, in C, so not even the
worker's reader thread drains the item pipes; add_many of 64 MB then waits for room in a
full pipe; prints "adding" once the pipes are full).
BACKEND=ray: the workers are actors of a local Ray this process starts (run it under
scripts/offline-ray, as every Ray start here).
"""

import atexit
import ctypes
import itertools
import os
import signal
import sys
import threading
import time

# Started in the background by a non-interactive shell, this process inherits SIGINT as
# ignored, and Python then never raises KeyboardInterrupt: the Ctrl-C tests would wait out
# their timeouts. Ctrl-C is what these tests are about, so take Python's own handler back.
signal.signal(signal.SIGINT, signal.default_int_handler)

REPORT = []  # filled in "noclose" mode: (done, batcher)


@atexit.register  # before mpbatch's own hook: atexit runs last-registered first
def _report():
    for done, b in REPORT:
        print("closed", len(done), b.stats(), flush=True)


import mpbatch  # noqa: E402 - after the hook above, on purpose
from mpbatch.closing import CLOSING  # noqa: E402


def do(batch):
    if os.environ.get("QUIET") is None:
        # One write: workers' stdout writes through, and print() writes each part and its end apart,
        # which would interleave with the caller's lines.
        sys.stdout.write(f"batch {os.getpid()}\n")
        sys.stdout.flush()
    time.sleep(float(os.environ.get("BATCH_SECONDS", "0.3")))  # the work itself
    return {k: [v * 2 for v in vs] for k, vs in batch.items()}


def hang():
    """init() stuck in C code that keeps the GIL (ctypes.PyDLL does not release it)."""
    ctypes.PyDLL(None).sleep(3600)


def stuck_items():
    """64 KiB values; "adding" as the fifth block starts: add_many pulls blocks of 1, 2, 4,
    8, 16 items, each to the less loaded worker, so the fifth (1 MiB) goes to a pipe that
    already holds 5 items (320 KiB) of its 1 MiB, and its write waits for room."""
    for i in range(1000):
        if i == 15:
            print("adding", flush=True)
        yield "k", bytes(65536)


def main():
    mode = sys.argv[1]
    items = int(os.environ.get("ITEMS", "40"))
    done = []
    ray = os.environ.get("BACKEND") == "ray"  # a local Ray this process starts (and stops)
    held = hold_descriptors(int(os.environ.get("HIGH_FDS", "0")))  # noqa: F841 - kept open
    b = mpbatch.Batcher(do, size=int(os.environ.get("SIZE", "5")), workers=2, interval=0.05,
                        on_result=lambda k, vs, rs: done.extend(rs),
                        init=hang if mode == "stuck" else None,
                        start_method=os.environ.get("START_METHOD"),
                        backend="ray" if ray else "process")
    b.start()
    while ray and not all(b._pool.ready):  # an actor's pid is known once it reported
        time.sleep(0.01)  # a state to watch, not a time to wait out
    print("pids", *[p.pid for p in b._pool.procs], flush=True)
    if ray:  # an actor's stdout reaches no pipe of ours: say "batch" when one is in do()
        threading.Thread(target=say_when_busy, args=(b,), daemon=True).start()
    zygote = b._pool.zygote
    print("method", b._pool.start_method, zygote.pid if zygote else 0, flush=True)
    print("segments", b._counters.name, getattr(b._pool, "ring_name", "") or "", flush=True)
    if mode == "noclose":
        REPORT.append((done, b))  # printed after mpbatch's atexit hook flushed and joined
        b.add_many(("k", i) for i in range(items))
        print("leaving", flush=True)
        return
    try:
        with b:
            if mode == "stream":
                stream(b, int(os.environ["AT"]), os.environ["ADD"])
            if mode == "stuck":
                b.add_many(stuck_items())
            b.add_many(("k", i) for i in range(items))
            try:
                # Inside the try: print() may not have returned yet when the test, which
                # has read the line, sends its Ctrl-C (seen on CPython 3.13).
                print("added", flush=True)
                if mode == "closing":
                    threading.Thread(target=say_when_closing, args=(b,), daemon=True).start()
                    print("closing", flush=True)
                    return
                if mode == "exit":
                    os._exit(0)
                threading.Event().wait()
            except KeyboardInterrupt:
                print("interrupted", flush=True)  # the with block's close() comes next
                raise
    finally:
        print("closed", len(done), b.stats(), flush=True)


def hold_descriptors(past):
    """Open descriptors until one is numbered past ``past``: a program holding many sockets
    or files, whose forked workers inherit them all."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft <= past + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, past + 256), hard))
    held = []
    while past and (not held or held[-1] <= past):
        held.append(os.open(os.devnull, os.O_RDONLY))
    return held


def say_when_closing(b):
    """Print "inside close" once close() has begun: a Ctrl-C sent on "closing" alone could
    land before it, in the print itself (seen on CPython 3.13)."""
    while b._state is not CLOSING:
        time.sleep(0.001)  # a state to watch, not a time to wait out
    print("inside close", flush=True)


def say_when_busy(b):
    """Print "batch 0" once the counters show a batch inside do() (backend="ray")."""
    from mpbatch.counters import BUSY_NS, CELLS

    cells = b._pool.counters.cells
    while not any(cells[CELLS * i + BUSY_NS] for i in range(b._pool.workers)):
        time.sleep(0.01)  # a state to watch, not a time to wait out
    print("batch 0", flush=True)


def stream(b, at, how):
    """Add items without end; say "streaming" once `at` of them are in."""
    def items():
        for i in itertools.count():
            if i == at:
                print("streaming", flush=True)
            yield "k" + str(i % 7), i

    if how == "add_many":
        b.add_many(items())
    for key, value in items():
        b.add(key, value, block=True)


if __name__ == "__main__":
    main()
