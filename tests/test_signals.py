"""Ctrl-C (SIGINT to the whole process group) and SIGTERM, on a real caller process."""

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from mpbatch import interrupts
from mpbatch.interrupts import held_interrupt

SCRIPT = os.path.join(os.path.dirname(__file__), "caller_script.py")


def _ignore_sigint():
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def start_caller(mode, sigint_ignored=False, **env):
    """``sigint_ignored``: start it as a background job of a non-interactive shell would be
    started, with SIGINT ignored (the script must take the default handler back)."""
    root = os.path.dirname(os.path.dirname(__file__))
    return subprocess.Popen(
        [sys.executable, SCRIPT, mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,  # its own process group, like a terminal job
        preexec_fn=_ignore_sigint if sigint_ignored else None,
        env=dict(os.environ, PYTHONPATH=root, **{k: str(v) for k, v in env.items()}))


def read_until(proc, prefix):
    seen = []
    for line in proc.stdout:
        if line.startswith(prefix):
            return line.split()
        seen.append(line)
    raise AssertionError(f"caller ended (exit code {proc.wait(10)}) before printing "
                         f"{prefix!r} (after {seen}): {proc.stderr.read()}")


def _zombie(p):
    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def assert_gone_within(pids, seconds):
    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):  # already gone: fine
            procs.append(psutil.Process(pid))
    _, alive = psutil.wait_procs(procs, timeout=seconds)
    alive = [p for p in alive if not _zombie(p)]  # dead, waiting for a parent to reap it
    for p in alive:
        p.kill()
    assert not alive, f"workers outlived the caller by over {seconds}s: {alive}"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("to", ["process-group", "caller-alone"])
def test_ctrl_c_still_flushes_every_item(to, start_method):
    caller = start_caller("wait", ITEMS=40, BATCH_SECONDS=0.2, START_METHOD=start_method)
    workers = [int(p) for p in read_until(caller, "pids")[1:]]
    read_until(caller, "added")
    read_until(caller, "batch")  # a worker is inside do()
    if to == "process-group":
        os.killpg(caller.pid, signal.SIGINT)  # what a terminal sends: caller, workers, helpers
    else:
        caller.send_signal(signal.SIGINT)  # e.g. kill -INT <pid>
    closed = read_until(caller, "closed")
    caller.wait(20)
    assert closed[1] == "40", closed  # every item finished: no worker died mid-batch
    assert "dead_lettered=0" in " ".join(closed)
    assert "KeyboardInterrupt" in caller.stderr.read()
    assert_gone_within(workers, 1)


@pytest.mark.timeout(60)
def test_ctrl_c_reaches_a_caller_started_with_sigint_ignored():
    """A runner started in the background by a non-interactive shell passes SIGINT on as
    ignored; the caller script must still take Ctrl-C, or every test here hangs."""
    caller = start_caller("wait", sigint_ignored=True, ITEMS=10, BATCH_SECONDS=0)
    try:
        workers = [int(p) for p in read_until(caller, "pids")[1:]]
        read_until(caller, "added")
        os.killpg(caller.pid, signal.SIGINT)
        out, err = caller.communicate(timeout=20)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(caller.pid, signal.SIGKILL)
        raise
    assert "KeyboardInterrupt" in err, (out, err[-2000:])
    assert "closed 10 " in out, out  # it flushed on the way out
    assert_gone_within(workers, 1)


def read_err_until(proc, text):
    """Read the caller's stderr up to the line that holds ``text``."""
    seen = []
    for line in proc.stderr:
        if text in line:
            return line
        seen.append(line)
    raise AssertionError(f"caller ended (exit code {proc.wait(10)}) before saying {text!r} "
                         f"on stderr (after {seen})")


def interrupt_inside_close(caller):
    """Ctrl-C once the caller is inside close(): close() has begun ("inside close") and a
    batch began after that (the batches before it take 0.5 s), so close() is waiting."""
    read_until(caller, "inside")
    read_until(caller, "batch")
    os.killpg(caller.pid, signal.SIGINT)


@pytest.mark.timeout(60)
def test_first_ctrl_c_inside_close_still_flushes_every_item(start_method):
    """with Batcher(...) as b: b.add_many(items) spends most of its run in close(): one
    Ctrl-C there means what it means anywhere else: finish the work, then stop."""
    caller = start_caller("closing", ITEMS=40, BATCH_SECONDS=0.5, START_METHOD=start_method)
    workers = [int(p) for p in read_until(caller, "pids")[1:]]
    interrupt_inside_close(caller)
    said = read_err_until(caller, "Ctrl-C again")
    closed = read_until(caller, "closed")
    assert caller.wait(20) != 0
    assert closed[1] == "40", (closed, said)  # every item finished
    assert "dead_lettered=0" in " ".join(closed)
    assert re.search(r"finishing \d+ items", said), said
    assert "KeyboardInterrupt" in caller.stderr.read()  # the program still stops
    assert_gone_within(workers, 1)


@pytest.mark.timeout(60)
def test_second_ctrl_c_inside_close_gives_up(start_method):
    caller = start_caller("closing", ITEMS=200, BATCH_SECONDS=0.5,  # ~10 s of work
                          START_METHOD=start_method)
    workers = [int(p) for p in read_until(caller, "pids")[1:]]
    interrupt_inside_close(caller)
    read_err_until(caller, "Ctrl-C again")
    started = time.monotonic()
    os.killpg(caller.pid, signal.SIGINT)  # second: give up now
    closed = read_until(caller, "closed")
    assert time.monotonic() - started < 3.0  # well under the ~9 s of work left
    caller.wait(10)
    stderr = caller.stderr.read()
    left = re.search(r"(\d+) unfinished items were dead-lettered", stderr)
    stats = " ".join(closed)
    assert left and f"dead_lettered={left.group(1)}," in stats, (stderr, stats)
    assert "pending=0" in stats and "dead_lettered=0" not in stats
    assert_gone_within(workers, 1)


@pytest.mark.timeout(60)
def test_second_ctrl_c_terminates_fast_and_says_what_was_left(start_method):
    caller = start_caller("wait", ITEMS=200, BATCH_SECONDS=0.5,  # ~10 s of work
                          START_METHOD=start_method)
    workers = [int(p) for p in read_until(caller, "pids")[1:]]
    read_until(caller, "added")
    read_until(caller, "batch")
    os.killpg(caller.pid, signal.SIGINT)  # first: close() starts flushing 200 items
    read_until(caller, "interrupted")
    # Two batches begun after the caller took the first Ctrl-C: close() now waits on the
    # workers. A "batch" line read before "interrupted" may predate the signal (two SIGINTs
    # a millisecond apart are one), and the first after it may come a moment after, from
    # the other worker (they start batches together), while the caller is still on its way
    # into close(): a Ctrl-C there is not one during close()'s wait.
    read_until(caller, "batch")
    read_until(caller, "batch")
    started = time.monotonic()
    os.killpg(caller.pid, signal.SIGINT)  # second: give up now
    closed = read_until(caller, "closed")
    # Well under the ~9 s of work left: it gave up (a bound, not a speed: the VM is shared)
    assert time.monotonic() - started < 3.0
    caller.wait(10)
    stderr = caller.stderr.read()
    assert "interrupted during close()" in stderr and "dead-lettered" in stderr
    stats = " ".join(closed)
    assert "pending=0" in stats and "dead_lettered=0" not in stats
    # It says how many were left: here every dead letter is one of them.
    left = re.search(r"(\d+) unfinished items were dead-lettered", stderr)
    assert left and f"dead_lettered={left.group(1)}," in stats, (stderr, stats)
    assert_gone_within(workers, 1)


@pytest.mark.timeout(60)
def test_sigterm_ends_the_caller_and_its_workers_follow():
    caller = start_caller("wait", ITEMS=200, BATCH_SECONDS=0.5)
    workers = [int(p) for p in read_until(caller, "pids")[1:]]
    read_until(caller, "batch")
    caller.send_signal(signal.SIGTERM)  # Python's default: end at once, no cleanup
    assert caller.wait(10) == -signal.SIGTERM
    assert_gone_within(workers, 1)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["add", "add_many"])
def test_ctrl_c_while_adding_loses_nothing(how):
    # The interrupt lands wherever the adding thread is: inside add(), while it seals a
    # chunk, picks a worker, writes to a pipe. Whatever it hits, every accepted item must
    # still end with an outcome, and close() must not wait for an item nobody holds.
    for at in (3_000, 9_999, 20_011, 35_000, 50_000, 77_777, 98_765, 120_000, 160_001,
               200_003):
        caller = start_caller("stream", ITEMS=0, BATCH_SECONDS=0, QUIET=1, SIZE=500, AT=at,
                              ADD=how)
        workers = [int(p) for p in read_until(caller, "pids")[1:]]
        read_until(caller, "streaming")
        caller.send_signal(signal.SIGINT)
        try:
            out, err = caller.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(caller.pid, signal.SIGKILL)
            caller.communicate()
            pytest.fail(f"close() hung after a Ctrl-C at item ~{at}: it waits for items "
                        f"that nothing holds any more")
        closed = next(line.split() for line in out.splitlines() if line.startswith("closed"))
        stats = dict(re.findall(r"(\w+)=(\d+)", " ".join(closed)))
        accepted, ok, dead = (int(stats[k]) for k in ("accepted", "succeeded", "dead_lettered"))
        assert stats["pending"] == "0" and accepted == ok + dead, (at, closed)
        assert int(closed[1]) == ok, (at, closed)  # one result per success
        # add_many() pulls a block before it accepts it: the items of a block being pulled
        # when the interrupt came were never accepted (they are not counted either).
        assert accepted >= (at if how == "add" else max(1, at - 4096)), (at, closed)
        assert "KeyboardInterrupt" in err
        assert_gone_within(workers, 1)


def test_held_interrupt_runs_the_handler_after_the_block():
    moved = []

    def move():
        with held_interrupt():
            os.kill(os.getpid(), signal.SIGINT)
            for i in range(100_000):  # many chances for the handler to run: it must not
                moved.append(i)

    with pytest.raises(KeyboardInterrupt):
        move()
    assert len(moved) == 100_000
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_held_interrupt_nests_and_calls_a_custom_handler_once():
    seen = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    try:
        with held_interrupt():
            with held_interrupt() as inner:
                os.kill(os.getpid(), signal.SIGINT)
                sum(range(100_000))
                assert inner.pending()  # a wait inside can see it and give up
            assert seen == []  # the outer block still holds it
        assert seen == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, previous)


def test_held_interrupt_is_a_no_op_off_the_main_thread():
    handlers = []

    def inside():
        with held_interrupt():
            handlers.append(signal.getsignal(signal.SIGINT))

    t = threading.Thread(target=inside)
    t.start()
    t.join(10)
    assert handlers == [signal.default_int_handler]


@pytest.mark.timeout(60)
def test_ctrl_c_ends_a_write_to_a_worker_that_reads_nothing():
    # init() never returns and holds the GIL, so nothing drains the item pipes (not even the
    # worker's reader thread) and add_many waits for room in a full pipe. A Ctrl-C held
    # until the frame is written would be held forever: after a second of no progress the
    # worker is given up and the interrupt goes through.
    caller = start_caller("stuck")
    try:
        workers = [int(p) for p in read_until(caller, "pids")[1:]]
        read_until(caller, "adding")
        os.killpg(caller.pid, signal.SIGINT)
        try:
            out, err = caller.communicate(timeout=8)
        except subprocess.TimeoutExpired:  # close() waits for items no worker can take
            os.killpg(caller.pid, signal.SIGINT)
            out, err = caller.communicate(timeout=15)
    except BaseException:  # not on success: the workers must go away by themselves
        with contextlib.suppress(ProcessLookupError):
            os.killpg(caller.pid, signal.SIGKILL)
        raise
    assert "KeyboardInterrupt" in err, err[-2000:]
    closed = next(line for line in out.splitlines() if line.startswith("closed"))
    stats = dict(re.findall(r"(\w+)=(\d+)", closed))
    assert stats["pending"] == "0", closed
    assert int(stats["accepted"]) == int(stats["dead_lettered"]) >= 15, closed  # none ran
    assert_gone_within(workers, 1)


class InterruptedInTheGap(threading.Condition):
    """Condition.wait as a Ctrl-C leaves it when its handler runs right after the wait let
    go of the lock, before the ``try`` that takes it back."""

    def wait(self, timeout=None):
        self._release_save()
        raise KeyboardInterrupt


def test_a_ctrl_c_that_ends_a_wait_leaves_its_lock_held():
    """The caller's ``with lock:`` around a wait then lets go of the lock once, and the
    KeyboardInterrupt goes on: close()'s handling of a second Ctrl-C depends on it. A bare
    Condition.wait lost it to "RuntimeError: cannot release un-acquired lock"."""
    lock = threading.RLock()
    cond = InterruptedInTheGap(lock)
    with pytest.raises(KeyboardInterrupt), lock:
        interrupts.wait(cond, 1)
    assert not lock._is_owned()
    with pytest.raises(RuntimeError, match="un-acquired"), lock:
        cond.wait(1)

