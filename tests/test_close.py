"""close(): idempotent, flushes, joins workers, frees shared memory; __exit__ even on error."""

import contextlib
import gc
import os
import signal
import threading

import pytest

import mpbatch
from tests import fns


def test_close_flushes_joins_and_unlinks(batcher_factory, backend):
    b = batcher_factory(fns.double, size=1000, interval=60)
    futs = [b.submit("k", i) for i in range(10)]
    name = b._counters.name
    procs = list(b._pool.procs)
    pids = [p.pid for p in procs]  # an actor's pid is known once it replied
    if backend == "ray":  # its counters are the caller's alone: nothing a death leaves
        assert name == ""
    else:
        assert os.path.exists(f"/dev/shm/{name}")
    b.close()
    assert [f.result(timeout=0) for f in futs] == [2 * i for i in range(10)]
    assert not name or not os.path.exists(f"/dev/shm/{name}")
    # What is left of each worker: its pid and exit code (its descriptors are closed).
    if backend == "ray":
        pids = [p.pid for p in procs]
        assert None not in pids
    assert [(p.pid, p.exitcode) for p in b._pool.procs] == [(pid, 0) for pid in pids]
    b.close()  # idempotent
    assert b.stats().pending == 0


def test_exit_flushes_even_when_the_block_raises():
    seen = []
    b = mpbatch.Batcher(fns.double, workers=2, size=1000, interval=60,
                        on_result=lambda k, vs, rs: seen.extend(rs))

    def work():
        with b:
            b.add_many(("k", i) for i in range(100))
            raise RuntimeError("user bug")

    with pytest.raises(RuntimeError, match="user bug"):
        work()
    assert sorted(seen) == [2 * i for i in range(100)]
    assert b.stats().pending == 0


def test_close_timeout_dead_letters_what_is_unfinished(batcher_factory, backend):
    b = batcher_factory(fns.sleep_forever, size=2, workers=1)
    futs = [b.submit("k", i) for i in range(4)]
    b.close(timeout=0.5)
    for f in futs:
        with pytest.raises(mpbatch.Closed, match=r"close\(timeout=0.5\) ran out"):
            f.result(timeout=0)
    s = b.stats()
    assert (s.accepted, s.dead_lettered, s.pending) == (4, 4, 0)


def test_workers_survive_a_worker_death_and_counters_stay_attached(batcher_factory, tmp_path):
    b = batcher_factory(fns.once_then(str(tmp_path), fns.kill_self), size=1, workers=2,
                        max_attempts=2, retry_backoff=0)
    futs = [b.submit("k", i) for i in range(20)]
    b.flush()
    assert [f.result() for f in futs] == [2 * i for i in range(20)]
    assert os.path.exists(f"/dev/shm/{b._counters.name}")  # a death did not unlink it
    assert b.stats().worker_restarts == 1


def test_close_from_another_thread_while_adding(batcher_factory):
    import threading

    b = batcher_factory(fns.double, size=10)
    stop, thousand = threading.Event(), threading.Event()
    accepted = []

    def producer():
        i = 0
        while not stop.is_set():
            try:
                b.add("k", i, block=True, timeout=5)
            except mpbatch.Closed:
                return
            accepted.append(i)
            i += 1
            if i == 1000:
                thousand.set()

    t = threading.Thread(target=producer)
    t.start()
    assert thousand.wait(20)
    b.close()
    stop.set()
    t.join(10)
    s = b.stats()
    assert s.pending == 0 and s.accepted == s.succeeded == len(accepted)


def test_segments_of_dead_callers_are_swept_at_start(batcher_factory):
    """A caller SIGKILLed with its whole process group (its zygote and workers too) leaves
    its counters behind; the next Batcher on the machine removes them."""
    import subprocess
    import sys

    code = ("import os, signal, mpbatch\n"
            "b = mpbatch.Batcher(lambda batch: None, workers=1).start()\n"
            "print(b._counters.name, flush=True)\n"
            "os.killpg(0, signal.SIGKILL)\n")
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           start_new_session=True, check=False)
    name = child.stdout.strip()
    assert child.returncode == -9 and name.startswith("mpbatch_")
    assert os.path.exists(f"/dev/shm/{name}")  # nobody was left to unlink it
    batcher_factory(fns.double, workers=1).start()
    assert not os.path.exists(f"/dev/shm/{name}")


@pytest.mark.timeout(60)
def test_a_forked_child_that_exits_leaves_the_parents_batcher_alone(batcher_factory,
                                                                    start_method):
    """A child the program forks (os.fork, as a pre-fork server does) inherits the Batcher
    but none of its threads: neither mpbatch's exit hook nor a close() (a with block the
    fork happened in) may close it there, and adding to it says why it cannot. Closing it
    would stop the parent's workers and zygote and remove the parent's shared memory."""
    from mpbatch import batcher as batcher_module

    b = batcher_factory(fns.double, workers=2, start_method=start_method)
    assert b.submit("k", 1).result(timeout=30) == 2
    pid = os.fork()
    if pid == 0:  # the child: close(), add(), then what its interpreter's exit would run
        code = 1
        try:
            b.close()
            try:
                b.add("k", 2)
            except mpbatch.Closed as exc:
                if f"started by process {os.getppid()}" in str(exc) and "a fork" in str(exc):
                    code = 0
            batcher_module._close_all()
        except BaseException:
            code = 2
        os._exit(code)
    pidfd = os.pidfd_open(pid)
    try:
        from multiprocessing.connection import wait

        assert wait([pidfd], 20), "the forked child's exit hook hung"
    finally:
        if not wait([pidfd], 0):
            os.kill(pid, signal.SIGKILL)
        os.close(pidfd)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert [f.result(timeout=30) for f in [b.submit("k", i) for i in range(50)]] == [
        2 * i for i in range(50)]
    s = b.stats()
    assert s.worker_restarts == 0 and s.dead_lettered == 0
    assert os.path.exists(f"/dev/shm/{b._counters.name}")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("start_method", ["zygote", "fork"])
def test_a_batcher_starts_no_resource_tracker(start_method):
    """Its segments are not registered with multiprocessing's resource tracker (shm.py):
    a program that starts a Batcher runs no tracker interpreter next to its workers, only
    forks of itself (spawn and forkserver start one for themselves). In a fresh process:
    this one has one from other tests."""
    import subprocess
    import sys

    code = (
        "import psutil, mpbatch\n"
        "from multiprocessing import resource_tracker\n"
        "def do(batch):\n"
        "    return {k: [v * 2 for v in vs] for k, vs in batch.items()}\n"
        "if __name__ == '__main__':\n"
        f"    with mpbatch.Batcher(do, workers=2, start_method={start_method!r}) as b:\n"
        "        b.add_many(('k', i) for i in range(100))\n"
        "        b.flush()\n"
        "        me = psutil.Process()\n"
        "        lines = [p.cmdline() for p in me.children(recursive=True)]\n"
        "    assert b.stats().succeeded == 100\n"
        "    assert lines == [me.cmdline()] * (3 if b._pool.zygote else 2), lines\n"
        "    assert resource_tracker._resource_tracker._pid is None\n")
    root = os.path.dirname(os.path.dirname(__file__))
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=root), timeout=50, check=False)
    assert child.returncode == 0, child.stderr


def test_an_add_waiting_for_room_when_close_begins_is_refused(batcher_factory, tmp_path):
    """It used to get in once room freed, after close() had flushed, and then be
    dead-lettered by a clean close(): accepted, yet never run."""
    gate = tmp_path / "gate"
    b = batcher_factory(fns.wait_for_file(str(gate)), size=1, buffer=1, workers=1)
    b.add("k", 1)  # held in do() until the gate opens: the buffer is full
    outcome = []

    def late_add():
        try:
            b.add("late", 2, block=True)
            outcome.append("accepted")
        except mpbatch.Closed:
            outcome.append("refused")

    adder = threading.Thread(target=late_add)
    adder.start()
    closer = threading.Thread(target=b.close)
    closer.start()
    _closing(b)
    gate.touch()
    closer.join(30)
    adder.join(30)
    assert outcome == ["refused"]
    s = b.stats()
    assert (s.accepted, s.succeeded, s.dead_lettered, s.pending) == (1, 1, 0, 0)


def _closing(b):
    """Return once close() has begun in another thread: add() then raises Closed."""
    probe = threading.Event()
    while True:
        try:
            b.add("probe", 0)
        except mpbatch.Full:
            probe.wait(0.01)
        except mpbatch.Closed:
            return


def test_a_second_close_waits_for_the_first(batcher_factory, tmp_path):
    """It used to return at once, with items unfinished, and mark the Batcher closed
    under the first close(), which then failed."""
    gate = tmp_path / "gate"
    b = batcher_factory(fns.wait_for_file(str(gate)), size=1, buffer=1, workers=1)
    fut = b.submit("k", 1)  # held in do() until the gate opens
    errors, seen = [], []

    def close(then=None):
        try:
            b.close()
        except BaseException as exc:
            errors.append(exc)
        if then is not None:
            then.append(b.stats())

    first = threading.Thread(target=close)
    first.start()
    _closing(b)
    second = threading.Thread(target=close, args=(seen,))
    second.start()
    second.join(0.5)  # it must still be waiting: the item is in do()
    gate.touch()
    first.join(30)
    second.join(30)
    assert errors == [] and fut.result(timeout=0) == 2
    [at_return] = seen
    assert (at_return.succeeded, at_return.pending) == (1, 0)


def test_a_second_close_with_a_timeout_ends_the_first(batcher_factory):
    b = batcher_factory(fns.sleep_forever, size=1, buffer=1, workers=1)
    fut = b.submit("k", 1)
    first = threading.Thread(target=b.close)
    first.start()
    _closing(b)
    b.close(timeout=0.2)  # returns once both are done: the item is dead-lettered
    first.join(30)
    assert not first.is_alive()
    with pytest.raises(mpbatch.Closed, match=r"close\(timeout=0.2\) ran out"):
        fut.result(timeout=0)
    assert b.stats().pending == 0


def _line_of(function, text):
    """The line number of the first line of ``function`` that contains ``text``."""
    import inspect

    lines, first = inspect.getsourcelines(function)
    return first + next(n for n, line in enumerate(lines) if text in line)


@pytest.mark.parametrize(("paused_at", "until", "outcome", "counts"), [
    # paused before its append: close() has taken the last items when it lands; refused
    ("entries.append(pair)", "closed", "refused", (0, 0, 0)),
    # the same, landing after close() flushed and before it takes the leftovers: refused
    ("entries.append(pair)", "flushed", "refused", (0, 0, 0)),
    # paused after it: close() flushes it like any other item
    ("if not self._fast and self._closing.withdrawn", "closed", "accepted", (1, 1, 0)),
])
def test_a_lock_free_add_that_races_close_is_refused_or_finished(
        batcher_factory, paused_at, until, outcome, counts):
    """add() checks that the Batcher runs, then appends without a lock. Paused in between
    while close() ran, its item used to land in a chunk nobody would send (accepted, never
    run, pending forever), or one close() would dead-letter (accepted, never run)."""
    import sys

    b = batcher_factory(fns.double, workers=1).start()
    if until == "flushed":  # resume the adder once close() has flushed, and wait for it
        shutdown = b._shutdown

        def resume_then_shutdown(error):
            resume.set()
            thread.join(30)
            shutdown(error)

        b._shutdown = resume_then_shutdown
    line = _line_of(mpbatch.Batcher.add, paused_at)
    paused, resume = threading.Event(), threading.Event()

    def tracer(frame, event, arg):  # holds the adder thread at ``line`` of Batcher.add
        if frame.f_code is not mpbatch.Batcher.add.__code__:
            return None
        if event == "line" and frame.f_lineno == line:
            paused.set()
            resume.wait(30)
        return tracer

    seen = []

    def adder():
        sys.settrace(tracer)
        try:
            b.add("late", 1)
            seen.append("accepted")
        except mpbatch.Closed:
            seen.append("refused")
        finally:
            sys.settrace(None)

    thread = threading.Thread(target=adder)
    thread.start()
    assert paused.wait(30)
    b.close()
    resume.set()
    thread.join(30)
    assert seen == [outcome]
    s = b.stats()
    assert (s.accepted, s.succeeded, s.pending) == counts and s.dead_lettered == 0


def test_close_inside_a_callback_that_close_runs_returns(batcher_factory):
    """close() gives up on the items (timeout) and runs on_dead_letter in its own thread:
    a close() there ("stop at the first failure") used to wait for itself forever."""
    calls = []

    def on_dead_letter(letter):
        calls.append(letter)
        b.close()

    b = batcher_factory(fns.raise_value_error, size=1, workers=1, max_attempts=3,
                        retry_backoff=60, on_dead_letter=on_dead_letter)
    for i in range(3):
        b.add("k", i)
    closer = threading.Thread(target=b.close, kwargs={"timeout": 0.3})
    closer.start()
    closer.join(20)
    assert not closer.is_alive()
    assert calls and b.stats().pending == 0


def test_a_flush_in_another_thread_waits_while_close_gives_up(batcher_factory, tmp_path):
    """close(timeout) dead-letters what is unfinished; a flush() waiting meanwhile used to
    return before those items had their outcomes."""
    gate = tmp_path / "gate"  # never opened: the items stay in do()
    b = batcher_factory(fns.wait_for_file(str(gate)), size=1, workers=2)
    futs = [b.submit(f"k{i}", i) for i in range(4)]
    seen = []
    flusher = threading.Thread(target=lambda: (b.flush(), seen.append(
        (b.stats().pending, sum(f.done() for f in futs)))))
    flusher.start()
    flusher.join(0.3)  # it waits: nothing can finish
    b.close(timeout=0.2)
    flusher.join(20)
    assert seen == [(0, 4)]


def test_close_inside_a_collector_callback_is_refused_and_the_batcher_goes_on(
        batcher_factory):
    """"Stop at the first failure" from on_dead_letter: close() there used to mark the
    Batcher closing, fail joining its own thread, and leave items pending for good."""
    refused = []

    def on_dead_letter(letter):
        try:
            b.close()
        except RuntimeError as exc:
            refused.append(exc)

    b = batcher_factory(fns.kill_on(-1), size=1, workers=1, on_dead_letter=on_dead_letter)
    bad = b.submit("k", -1)
    assert isinstance(bad.exception(timeout=30), mpbatch.WorkerDied)
    assert len(refused) == 1 and "close() cannot run inside" in str(refused[0])
    assert b.submit("k", 2).result(timeout=30) == 4  # still running
    b.close()
    s = b.stats()
    assert (s.accepted, s.succeeded, s.dead_lettered, s.pending) == (2, 1, 1, 0)


def test_a_flush_during_close_waits_for_it(batcher_factory, tmp_path):
    """It used to raise Closed("close() already flushed everything") with items pending."""
    gate = tmp_path / "gate"
    b = batcher_factory(fns.wait_for_file(str(gate)), size=1, workers=1)
    fut = b.submit("k", 1)
    closer = threading.Thread(target=b.close)
    closer.start()
    _closing(b)
    threading.Timer(0.3, gate.touch).start()  # opens the gate while flush() waits
    b.flush()
    assert fut.done() and b.stats().pending == 0
    closer.join(30)


def test_close_or_flush_in_on_dead_letter_for_an_item_rejected_at_sending(batcher_factory):
    """A value changed after add() so that it no longer pickles is dead-lettered when its
    chunk is sent, by the thread sending it (here flush()'s, holding the Batcher's lock).
    on_dead_letter ran there, so a close() or flush() in it waited for itself forever; now
    it runs in the collector thread, where both are refused, and the Batcher goes on."""
    seen = []

    def on_dead_letter(letter):
        seen.append((threading.current_thread().name, list(letter.batch)))
        for stop in (b.flush, b.close):
            try:
                stop()
            except RuntimeError as exc:
                seen.append(str(exc).split(" inside")[0])

    b = batcher_factory(fns.double, size=100, interval=30, workers=1,
                        on_dead_letter=on_dead_letter)
    box = [1]
    b.add("good", 1)
    b.add("changed", box)
    box.append(threading.Lock())  # after add(): it no longer pickles
    flusher = threading.Thread(target=b.flush)
    flusher.start()
    flusher.join(20)
    assert not flusher.is_alive(), "flush() waited for its own on_dead_letter"
    assert seen == [("mpbatch-collector", ["changed"]), "flush() and close() cannot run",
                    "close() cannot run"]
    fut = b.submit("k", 2)  # still running
    b.flush()
    assert fut.result(timeout=0) == 4
    b.close()
    s = b.stats()
    assert (s.accepted, s.succeeded, s.dead_lettered, s.pending) == (3, 2, 1, 0)


@pytest.mark.timeout(60)
def test_closed_batchers_hold_no_descriptors(start_method):
    """A program may keep closed Batchers (in a list, a traceback): their workers'
    sentinels, pidfds and pipes must not stay open, or a few hundred exhaust the fds."""
    first = mpbatch.Batcher(fns.double, workers=2, start_method=start_method)
    first.submit("k", 1).result(timeout=30)
    first.close()  # a fork server or resource tracker starts once per process: not counted
    before = _open_fds()
    kept = []
    for i in range(3):
        b = mpbatch.Batcher(fns.double, workers=2, start_method=start_method)
        assert b.submit("k", i).result(timeout=30) == 2 * i
        b.close()
        kept.append(b)
    new = set(_open_fds().items()) - set(before.items())
    assert not new, f"closed Batchers still hold {sorted(new)}"


def _open_fds():
    """fd -> what it is, after a collection (earlier tests' garbage may close some)."""
    gc.collect()
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the directory's own fd, closed by now
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return fds
