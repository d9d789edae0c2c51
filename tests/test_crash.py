"""One row per way a batch can fail inside a worker; the others items and the Batcher go on."""

import array
import fcntl
import os
import signal
import termios
import threading
import time

import pytest

import mpbatch
from tests import fns

# 64 KiB values that a worker holding the GIL cannot take in: 7.9 MB, more than its ring
# (ring.REGION, 4 MiB) and its pipe (1 MiB) hold together, so an add() waits on the pipe.
FILL = 120

CRASHES = [  # (id, do, error the future raises, text its message must contain, extra options)
    ("raises", fns.raise_value_error, mpbatch.BatchFailed, "ValueError: bad batch", {}),
    ("sys-exit", fns.sys_exit, mpbatch.BatchFailed, "SystemExit: 5", {}),
    ("sigkill", fns.kill_self, mpbatch.WorkerDied, "was killed by SIGKILL", {}),
    ("os-exit", fns.exit_self, mpbatch.WorkerDied, "exited (exit code 3)", {}),
    ("c-exit", fns.c_exit, mpbatch.WorkerDied, "exited (exit code 4)", {}),
    ("hang", fns.sleep_forever, mpbatch.BatchTimeout, "timeout=0.5", {"timeout": 0.5}),
]


@pytest.mark.parametrize(("do", "error", "text", "options"),
                         [c[1:] for c in CRASHES], ids=[c[0] for c in CRASHES])
def test_crash_fails_only_its_batch(batcher_factory, do, error, text, options):
    letters = []
    b = batcher_factory(fns.once_then_bad(do), size=3, workers=2, on_dead_letter=letters.append,
                        **options)
    bad = [b.submit("bad", i) for i in range(3)]  # the first batch: it crashes
    b.flush()
    good = [b.submit(f"k{i % 2}", i) for i in range(30)]
    b.flush()
    for fut in bad:
        with pytest.raises(error, match=None) as info:
            fut.result()
        assert text in str(info.value)
    assert [f.result() for f in good] == [2 * i for i in range(30)]
    # Every item of the batch crashes: isolation splits it until each is alone.
    assert sorted(v for letter in letters for v in letter.batch["bad"]) == [0, 1, 2]
    assert all(letter.attempts == 1 for letter in letters)
    s = b.stats()
    assert (s.accepted, s.succeeded, s.dead_lettered, s.pending) == (33, 30, 3, 0)


def test_timeout_kills_a_do_holding_the_gil_while_add_waits_on_its_full_pipe(
        batcher_factory, tmp_path, start_method):
    # The worker's reader thread cannot empty its pipe while do() holds the GIL in C: the
    # adds below wait on a full pipe, holding the Batcher's lock that the collector's
    # timeout watch waits for. They used to wait forever.
    fifo = tmp_path / "stuck"
    os.mkfifo(fifo)
    reader = fns.fifo_reader(fifo)
    letters = []
    b = batcher_factory(fns.hold_gil_on("stuck", str(fifo)), workers=1, size=1, timeout=1,
                        start_method=start_method, on_dead_letter=letters.append)
    b.add("stuck", b"")
    reader.readline()  # the worker is inside do(), holding the GIL
    reader.close()
    for _ in range(FILL):
        b.add("k", bytes(64 * 1024))
    b.flush()
    [letter] = letters
    assert isinstance(letter.error, mpbatch.BatchTimeout) and letter.batch == {"stuck": [b""]}
    s = b.stats()
    assert (s.succeeded, s.dead_lettered, s.pending, s.worker_restarts) == (FILL, 1, 0, 1)


def test_worker_died_names_pid_exitcode_and_keys(batcher_factory):
    b = batcher_factory(fns.kill_self, size=2, workers=1, isolate_poison=False)
    fut = b.submit("user:1", 1)
    b.submit("user:2", 2)
    b.flush()
    err = fut.exception()
    assert isinstance(err, mpbatch.WorkerDied)
    assert err.exitcode == -9 and err.pid > 0
    assert "keys 'user:1', 'user:2'" in str(err) and "attempt 1 of 1" in str(err)
    assert "OOM killer" in str(err)
    assert b.stats().worker_restarts == 1


@pytest.mark.parametrize("isolate", [True, False])
def test_sigkill_mid_batch_redelivers_with_attempts_left(batcher_factory, tmp_path, isolate):
    b = batcher_factory(fns.once_then(str(tmp_path), fns.kill_self), size=5, max_attempts=2,
                        retry_backoff=0, isolate_poison=isolate)
    futs = [b.submit(f"k{i % 3}", i) for i in range(50)]
    b.flush()
    assert [f.result() for f in futs] == [2 * i for i in range(50)]
    s = b.stats()
    assert (s.succeeded, s.dead_lettered, s.pending, s.worker_restarts) == (50, 0, 0, 1)
    if isolate:  # the crashed batch's halves ran on their own and succeeded: no attempt spent
        assert (s.splits, s.retries, s.failed_attempts) == (1, 0, 0)
    else:  # the crashed batch spent an attempt and was retried whole
        assert (s.splits, s.retries, s.failed_attempts) == (0, 5, 5)


def test_external_sigkill_of_a_busy_worker(gated):
    """A real kill from outside, of a worker inside do(): its items come back."""
    b, started = gated(size=10, workers=2, max_attempts=2, retry_backoff=0)
    futs = [b.submit(f"k{i % 4}", i) for i in range(40)]
    victim = int(started.readline())  # blocks until a worker is inside do()
    os.kill(victim, signal.SIGKILL)
    gated.gate()
    b.flush()
    assert [f.result() for f in futs] == [2 * i for i in range(40)]
    s = b.stats()
    assert s.worker_restarts == 1 and s.pending == 0 and s.succeeded == 40
    assert s.splits == 1 and s.failed_attempts == 0  # the halves of the killed batch succeeded


def test_items_queued_in_a_dead_worker_are_resent_without_an_attempt(batcher_factory, tmp_path):
    # One worker, size=1: the first item kills it inside do(); the others were only queued.
    b = batcher_factory(fns.kill_on(0), size=1, workers=1, interval=5)
    futs = [b.submit("k", i) for i in range(6)]
    b.flush()
    with pytest.raises(mpbatch.WorkerDied):
        futs[0].result()
    assert [f.result() for f in futs[1:]] == [2, 4, 6, 8, 10]
    s = b.stats()
    assert s.failed_attempts == 1 and s.dead_lettered == 1 and s.succeeded == 5
    assert s.redelivered >= 1


@pytest.mark.parametrize("failing", ["worker 1", "collector"])
def test_a_first_start_that_fails_half_way_leaves_no_worker(batcher_factory, monkeypatch,
                                                            start_method, failing):
    """Worker 1, or the collector's wakeup pipe, could not be made (EMFILE): the workers
    already started used to run on until the Batcher was garbage-collected."""
    import psutil

    from mpbatch import engine, lifecycle

    def no_descriptors(*args):
        raise OSError(24, "Too many open files")  # the fault: no descriptors left

    if failing == "collector":
        monkeypatch.setattr(engine, "Collector", no_descriptors)
    else:
        real_start = lifecycle.Pool.start
        monkeypatch.setattr(lifecycle.Pool, "start", lambda pool, i: (
            no_descriptors() if i == 1 else real_start(pool, i)))
    b = batcher_factory(fns.double, workers=2, start_method=start_method)
    with pytest.raises(OSError, match="Too many open files"):
        b.add("k", 1)
    workers = [p for p in psutil.Process().children(recursive=True)
               if "forkserver" not in " ".join(p.cmdline())
               and "resource_tracker" not in " ".join(p.cmdline())]
    assert workers == []
    assert b.stats().accepted == 0


def test_init_that_always_fails_stops_the_batcher(batcher_factory, backend):
    b = batcher_factory(fns.use_state, init=fns.init_fails, workers=2)
    futs = [b.submit("k", i) for i in range(3)]
    for fut in futs:
        with pytest.raises(mpbatch.WorkerDied, match="no model here"):
            fut.result(timeout=30)
    with pytest.raises(mpbatch.Closed, match="the Batcher stopped"):
        b.add("k", 9)
    s = b.stats()
    assert s.pending == 0 and s.dead_lettered == 3



def test_flush_returns_after_a_stopped_batcher_settled_every_item(batcher_factory):
    # The Batcher stops when workers keep dying before taking items; flush() must still
    # return only once each item has its outcome (here: dead-lettered), not as soon as it
    # sees the stop.
    letters = []
    b = batcher_factory(fns.use_state, init=fns.init_fails, workers=2,
                        on_dead_letter=letters.append)
    for i in range(5):
        b.add("k", i)
    b.flush()
    s = b.stats()
    assert (s.pending, s.dead_lettered) == (0, 5)
    assert sorted(v for letter in letters for v in letter.batch["k"]) == [0, 1, 2, 3, 4]
    assert all(isinstance(letter.error, mpbatch.WorkerDied) for letter in letters)



def _paced_pairs(n):
    for i in range(n):
        time.sleep(0.002)  # a slow source: the stop comes while add_many is still pulling
        yield "k", i


def test_add_many_into_a_batcher_that_stops_raises_and_loses_nothing(batcher_factory):
    """add_many() kept sending blocks after the Batcher stopped (to worker slots nobody
    replaces), returned normally, and flush() then left those items pending."""
    b = batcher_factory(fns.use_state, init=fns.init_fails, workers=2, size=10)
    with pytest.raises(mpbatch.Closed, match="no longer takes items"):
        b.add_many(_paced_pairs(3000))
    b.flush()
    s = b.stats()
    assert s.pending == 0 and s.accepted == s.dead_lettered > 0
    assert sum(len(letter.batch["k"]) for letter in b.dead_letters()) == s.accepted

def test_a_do_that_cannot_be_unpickled_in_a_worker_is_named(batcher_factory, backend):
    b = batcher_factory(fns.needs_the_caller(fns.LoadsOnlyInTheCaller()), workers=2)
    futs = [b.submit("k", i) for i in range(3)]
    for fut in futs:
        with pytest.raises(mpbatch.WorkerDied, match="unpickling do and init in the worker "
                           "raised RuntimeError: this object cannot be rebuilt in a worker"):
            fut.result(timeout=30)
    with pytest.raises(mpbatch.Closed, match="no longer takes items: 3 workers in a row"):
        b.add("k", 9)


UNGUARDED_SCRIPT = """
import mpbatch
b = mpbatch.Batcher(lambda batch: None, workers=2, start_method=START_METHOD)
b.add("k", 1)  # a worker importing this module as __mp_main__ dies here
b.flush()
print("flushed", b.stats().pending, b.stats().dead_lettered, flush=True)
try:
    b.add("k", 2)
except mpbatch.Closed as exc:
    print("closed:", exc, flush=True)
b.close()
"""


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_a_main_script_without_a_main_guard_gets_advice(tmp_path, method):
    """Under spawn and forkserver a worker imports the caller's main module first; a script
    that starts a Batcher at import time kills every worker there, before mpbatch's code runs.
    The Batcher stops, dead-letters the item, and says what to fix."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED_SCRIPT.replace("START_METHOD", repr(method)))
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, timeout=90,
                         env=dict(os.environ, PYTHONPATH=root), capture_output=True, text=True,
                         check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "flushed 0 1" in run.stdout, run.stdout + run.stderr
    assert "died before taking items (worker" in run.stdout
    assert f"under {method} each worker first imports your main module" in run.stdout
    assert 'no `if __name__ == "__main__":` guard' in run.stdout

@pytest.mark.parametrize(("culprit_do", "options"), [
    (fns.kill_on(13), {}),
    (fns.hang_on(13), {"timeout": 0.5}),
], ids=["sigkill", "timeout"])
def test_poison_isolation_dead_letters_only_the_culprit(batcher_factory, culprit_do, options):
    b = batcher_factory(culprit_do, size=16, workers=2, **options)
    futs = [b.submit(f"k{i % 3}", i) for i in range(16)]  # one batch, one poison item
    b.flush()
    for i, fut in enumerate(futs):
        if i == 13:
            assert isinstance(fut.exception(), mpbatch.WorkerDied | mpbatch.BatchTimeout)
        else:
            assert fut.result() == 2 * i
    (letter,) = b.dead_letters()
    assert letter.batch == {"k1": [13]} and letter.attempts == 1
    s = b.stats()
    assert s.splits == 4  # 16 -> 8 -> 4 -> 2 -> 1
    assert (s.succeeded, s.dead_lettered, s.pending, s.failed_attempts) == (15, 1, 0, 1)


def test_poison_isolation_can_be_turned_off(batcher_factory):
    b = batcher_factory(fns.kill_on(13), size=16, workers=2, isolate_poison=False)
    futs = [b.submit("k", i) for i in range(16)]
    b.flush()
    assert all(isinstance(f.exception(), mpbatch.WorkerDied) for f in futs)
    s = b.stats()
    assert (s.splits, s.dead_lettered, s.failed_attempts) == (0, 16, 16)


def test_poison_isolation_is_bounded_when_everything_crashes(batcher_factory):
    # do() crashes on every batch: splitting cannot help; the budget stops it. One worker,
    # so the 64 items form one batch with one budget.
    b = batcher_factory(fns.kill_self, size=64, workers=1)
    b.add_many(("k", i) for i in range(64))
    b.flush()
    s = b.stats()
    assert s.dead_lettered == 64 and s.pending == 0
    assert s.splits <= (4 * 6 + 2) // 2  # budget: 4*ceil(log2(64)) + 2 do() calls


def test_a_worker_running_another_copy_of_mpbatch_is_refused_clearly(tmp_path):
    """Python 3.11's fork server imports from its working directory: a second copy of
    mpbatch there must end in a clear error, not in frames the two copies misread. (A
    zygote is a fork of the caller: one copy.)"""
    import shutil
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shutil.copytree(os.path.join(root, "mpbatch"), tmp_path / "mpbatch")
    code = ("import mpbatch, sys\n"
            "b = mpbatch.Batcher(lambda batch: None, workers=1, start_method='forkserver')\n"
            "f = b.submit('k', 1)\n"
            "print(type(f.exception(timeout=60)).__name__, f.exception(), flush=True)\n"
            "b.close()\n")
    # The caller imports the checkout (its script lives elsewhere, PYTHONPATH names the
    # checkout); the fork server, started in tmp_path, imports the copy.
    script = tmp_path / "scripts" / "caller.py"
    script.parent.mkdir()
    script.write_text("if __name__ == '__main__':\n" + "".join(
        f"    {line}\n" for line in code.splitlines()))
    env = dict(os.environ, PYTHONPATH=root)
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, timeout=90,
                         capture_output=True, text=True, check=False)
    assert "WorkerDied" in run.stdout, run.stdout + run.stderr
    assert "the worker imported mpbatch from" in run.stdout
    assert "use one copy of mpbatch" in run.stdout


def test_a_crash_keeps_each_keys_order_under_key_routing(batcher_factory, tmp_path):
    """The crashed batch's items (re-run as halves) go back before the items that were only
    queued behind them, and before later adds: routing="key" keeps per-key order."""
    fifo, gate = tmp_path / "started", tmp_path / "gate"
    os.mkfifo(fifo)
    seen = []
    with fns.fifo_reader(fifo) as started:
        b = batcher_factory(fns.crash_first_when_gated(str(fifo), str(gate), str(tmp_path)),
                            size=4, workers=1, routing="key",
                            on_result=lambda key, values, results: seen.extend(values))
        for v in range(12):
            b.add("k", v)
        started.readline()  # the first batch is inside do(); the other 8 items are queued
        gate.touch()  # ... and now it exits
        b.flush()
    s = b.stats()
    assert s.worker_restarts == 1 and s.succeeded == 12 and s.failed_attempts == 0
    assert seen == list(range(12))


def test_a_replacement_that_cannot_start_stops_the_batcher_and_loses_nothing(
        batcher_factory, monkeypatch):
    """Starting a replacement can fail (EMFILE, ENOMEM): the items the dead worker held are
    dead-lettered with the reason instead of vanishing with its pipes."""
    b = batcher_factory(fns.kill_on(5), size=2, workers=1, interval=0.01,
                        isolate_poison=False).start()

    def cannot_start(i):
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(b._pool, "start", cannot_start)  # the fault: the process table is full
    futs = [b.submit("k", v) for v in range(8)]
    errors = [fut.exception(timeout=20) for fut in futs]  # every item gets an outcome
    for error in filter(None, errors):
        assert isinstance(error, mpbatch.WorkerDied)
        assert "could not be started (OSError: [Errno 24] Too many open files)" in str(error)
    with pytest.raises(mpbatch.Closed, match="could not be started"):
        b.add("k", 1)
    b.close(timeout=10)
    s = b.stats()
    assert s.pending == 0 and s.accepted == 8 == s.succeeded + s.dead_lettered
    assert s.dead_lettered >= 2  # at least the batch that killed the worker


def test_close_timeout_ends_while_another_thread_waits_on_a_full_pipe(
        batcher_factory, tmp_path, start_method):
    """No timeout=: a do() holding the GIL in C keeps its pipe full, and an add() in another
    thread waits in the write holding worker 0's send lock (close() needs it to send the
    worker its stop). close(timeout) used to wait for that lock for good; now the writer
    gives the worker up at close()'s deadline."""
    fifo = tmp_path / "stuck"
    os.mkfifo(fifo)
    reader = fns.fifo_reader(fifo)
    b = batcher_factory(fns.hold_gil_on("stuck", str(fifo)), workers=1, size=1,
                        start_method=start_method)
    b.add("stuck", b"")
    reader.readline()  # the worker is inside do(), holding the GIL
    reader.close()
    refused = []

    def adder():
        try:
            for _ in range(FILL):
                b.add("k", bytes(64 * 1024))
        except mpbatch.Closed as exc:
            refused.append(exc)

    thread = threading.Thread(target=adder)
    thread.start()
    while not _writer_waits_on_full_pipe(b):
        time.sleep(0.01)  # polling a pipe's fill: nothing signals it
    began = time.monotonic()
    b.close(timeout=1)
    took = time.monotonic() - began
    thread.join(20)
    assert not thread.is_alive() and took < 10, took
    s = b.stats()
    assert s.pending == 0 and s.accepted == s.succeeded + s.dead_lettered, s
    letters = b.dead_letters()
    assert any("stuck" in letter.batch for letter in letters)
    # Given up by close() (Closed), or killed by the writer at the deadline first and
    # charged as a death (WorkerDied): an outcome either way.
    assert all(isinstance(letter.error, (mpbatch.Closed, mpbatch.WorkerDied))
               for letter in letters), letters


def _writer_waits_on_full_pipe(b):
    """Worker 0's item pipe is (about) full and another thread holds its send lock (the
    write no longer holds the Batcher's lock: the collector settles outcomes meanwhile)."""
    fd = b._pool.items[0].fileno()
    queued = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, queued)
    # Partly filled pages keep a pipe's bytes short of its size (F_GETPIPE_SZ = 1032).
    if queued[0] < fcntl.fcntl(fd, 1032) * 3 // 4:
        return False
    lock = b._pool.send_locks[0]
    free = lock.acquire(blocking=False)
    if free:
        lock.release()
    return not free
