"""Kill storms and chaos: workers SIGKILLed from outside while work flows; nothing is lost."""

import contextlib
import itertools
import os
import random
import signal
import threading

import pytest

from tests import fns


def kill(proc):
    with contextlib.suppress(ProcessLookupError):  # already dead, between two kills
        os.kill(proc.pid, signal.SIGKILL)


def assert_all_delivered(b, futs, expect):
    for fut, want in zip(futs, expect, strict=True):
        assert fut.result(timeout=60) == want
    s = b.stats()
    assert s.accepted == s.succeeded + s.dead_lettered and s.pending == 0
    return s


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_chaos_random_sigkill_every_50ms(batcher_factory):
    b = batcher_factory(fns.slow_double, size=20, workers=2, max_attempts=10,
                        retry_backoff=0.01)
    stop = threading.Event()
    kills = []

    def chaos():
        rng = random.Random(1)
        while not stop.wait(0.05):  # the storm's pace, not a synchronisation
            proc = rng.choice(b._pool.procs)
            kill(proc)
            kills.append(proc.pid)

    samples = []

    def watch():  # guarantee 1 "at every moment": sample the accounts during the storm
        while not stop.wait(0.002):  # a sampling pace, not a synchronisation
            samples.append(b.stats())

    futs = [b.submit(f"k{i % 50}", i) for i in range(200)]  # started before the storm
    storm, watcher = threading.Thread(target=chaos), threading.Thread(target=watch)
    storm.start()
    watcher.start()
    try:
        futs += [b.submit(f"k{i % 50}", i) for i in range(200, 10_000)]
        b.flush()
    finally:
        stop.set()
        storm.join()
        watcher.join()
    assert len(samples) > 10
    for before, after in itertools.pairwise(samples):
        assert after.pending >= 0 and after.accepted == (
            after.succeeded + after.dead_lettered + after.pending)
        assert after.succeeded >= before.succeeded and after.accepted >= before.accepted
    s = assert_all_delivered(b, futs, [2 * i for i in range(10_000)])
    assert s.succeeded == 10_000 and s.dead_lettered == 0
    assert s.worker_restarts >= len(kills) // 2 > 0
    name = b._counters.name
    b.close()
    assert not os.path.exists(f"/dev/shm/{name}")


def test_several_workers_killed_at_once(gated):
    b, started = gated(size=5, workers=4, max_attempts=3, retry_backoff=0)
    futs = [b.submit(f"k{i % 7}", i) for i in range(100)]
    busy = {int(started.readline()) for _ in range(4)}  # all four inside do()
    for pid in list(busy)[:3]:
        os.kill(pid, signal.SIGKILL)
    gated.gate()
    b.flush()
    s = assert_all_delivered(b, futs, [2 * i for i in range(100)])
    assert s.worker_restarts == 3 and s.succeeded == 100


@pytest.mark.parametrize("during", ["flush", "close"])
def test_kill_while_flush_or_close_waits(gated, during):
    b, started = gated(size=10, workers=2, max_attempts=2, retry_backoff=0)
    futs = [b.submit(f"k{i % 3}", i) for i in range(60)]
    waiter = threading.Thread(target=b.flush if during == "flush" else b.close)
    victim = int(started.readline())
    waiter.start()  # flush()/close() now waits on the held batches
    os.kill(victim, signal.SIGKILL)
    gated.gate()
    waiter.join(60)
    assert not waiter.is_alive()
    s = assert_all_delivered(b, futs, [2 * i for i in range(60)])
    assert s.worker_restarts == 1 and s.succeeded == 60


def test_kill_a_replacement_while_it_runs_init(batcher_factory, tmp_path):
    fifo, gate = tmp_path / "init", tmp_path / "gate"
    os.mkfifo(fifo)
    gate.touch()  # the first workers' init returns at once
    b = batcher_factory(fns.use_state, init=fns.init_announce_then_wait(str(fifo), str(gate)),
                        size=5, workers=2, max_attempts=3, retry_backoff=0).start()
    with fns.fifo_reader(fifo) as inits:
        first = {int(inits.readline()) for _ in range(2)}
        gate.unlink()  # from now on init() blocks until the gate is back
        os.kill(first.pop(), signal.SIGKILL)  # an idle worker dies: a replacement starts
        replacement = int(inits.readline())  # ... and is now inside init()
        os.kill(replacement, signal.SIGKILL)
        second = int(inits.readline())
        gate.touch()
        assert second not in (replacement, *first)
        futs = [b.submit("k", i) for i in range(50)]
        b.flush()
    s = assert_all_delivered(b, futs, [10 * i for i in range(50)])
    assert s.worker_restarts == 2 and s.succeeded == 50
