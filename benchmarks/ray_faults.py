"""What backend="ray" costs beside throughput: start-up, memory, and how long a death and a
timeout take to become outcomes. One run, on a local Ray this script starts.

    scripts/offline-ray python benchmarks/ray_faults.py [--mpbatch DIR]

Prints: ray.init's time; a Batcher's start to its first result; the Ray processes' PSS
(the actors' part of it); after a SIGKILL of an actor inside do(), when the death was
noticed, when its replacement was ready and when the batch's items were done; with
timeout=1, when a hung do()'s BatchTimeout arrived; and close()'s time.
"""

import argparse
import contextlib
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pss(procs) -> int:
    import psutil

    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):  # it exited meanwhile
            total += p.memory_full_info().pss
    return total


def wait(condition, limit: float = 60.0) -> None:
    end = time.monotonic() + limit
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError("the Batcher did not get there in 60 s")
        time.sleep(0.005)  # polling a counter: the probe itself must not wait on mpbatch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mpbatch", help="import mpbatch from this folder (a snapshot)")
    args = parser.parse_args()
    if os.environ.get("MPBATCH_OFFLINE_RAY") != "1":
        print("starts a local Ray: run it as scripts/offline-ray python "
              "benchmarks/ray_faults.py", file=sys.stderr)
        return 2
    if args.mpbatch:
        sys.path.insert(0, args.mpbatch)
    sys.path.insert(1, str(ROOT))
    import psutil
    import ray

    import mpbatch
    from tests import fns, rayenv

    began = time.monotonic()
    rayenv.start_local()
    print(f"ray.init: {time.monotonic() - began:.2f} s")
    gate = Path(tempfile.mkdtemp()) / "gate"
    began = time.monotonic()
    b = mpbatch.Batcher(fns.wait_for_file(str(gate), key="slow"), backend="ray", workers=2,
                        size=4)
    b.submit("warm", 1).result(timeout=60)
    print(f"Batcher start to its first result: {time.monotonic() - began:.2f} s")
    kids = psutil.Process().children(recursive=True)
    print(f"Ray processes: {len(kids)}, PSS {pss(kids) / 2**20:.0f} MB "
          f"(the 2 actors: {pss(rayenv.actors()) / 2**20:.0f} MB)")
    futs = [b.submit("slow", i) for i in range(4)]
    wait(lambda: any(b._counters.get(i, 4) for i in range(2)))  # BUSY_NS: inside do()
    i = next(i for i in range(2) if b._counters.get(i, 4))
    proc = b._pool.procs[i]
    began = time.monotonic()
    os.kill(proc.pid, signal.SIGKILL)
    wait(lambda: not proc.is_alive())
    print(f"SIGKILL inside do(): noticed after {time.monotonic() - began:.2f} s")
    wait(lambda: all(b._pool.ready))
    print(f"  replacement ready after {time.monotonic() - began:.2f} s")
    gate.touch()
    assert [f.result(timeout=60) for f in futs] == [0, 2, 4, 6]
    print(f"  the batch's items done after {time.monotonic() - began:.2f} s "
          f"({b.stats().splits} isolation splits)")
    b.close()
    b = mpbatch.Batcher(fns.hang_on(1), backend="ray", workers=2, size=1, timeout=1.0,
                        isolate_poison=False)
    b.submit("k", 0).result(timeout=60)
    began = time.monotonic()
    try:
        b.submit("k", 1).result(timeout=60)
    except mpbatch.BatchTimeout:
        print(f"timeout=1: BatchTimeout after {time.monotonic() - began:.2f} s")
    began = time.monotonic()
    b.close()
    print(f"close(): {time.monotonic() - began:.2f} s")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
