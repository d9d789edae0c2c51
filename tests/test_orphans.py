"""No orphans: when the caller dies however it dies, its workers follow within a second,
and take its shared memory along."""

import os
import signal

import pytest

from tests.test_signals import assert_gone_within, read_until, start_caller


def _ours(caller, start_method):
    """The caller's workers, and its zygote under that start method."""
    workers = [int(p) for p in read_until(caller, "pids")[1:]]
    _, method, zygote = read_until(caller, "method")
    assert method == start_method
    return [*workers, int(zygote)] if method == "zygote" else workers


def _segments(caller):
    names = read_until(caller, "segments")[1:]
    assert names and all(os.path.exists(f"/dev/shm/{name}") for name in names)
    return names


def assert_removed(segments):
    """No resource tracker follows them (mpbatch/shm.py): the workers and the zygote remove
    them before they exit."""
    left = [name for name in segments if os.path.exists(f"/dev/shm/{name}")]
    assert not left, f"the dead caller's shared memory is still there: {left}"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("busy", [True, False], ids=["busy-workers", "idle-workers"])
def test_caller_sigkill_takes_the_workers_along(busy, start_method):
    caller = start_caller("wait", ITEMS=200 if busy else 0, BATCH_SECONDS=30,
                          START_METHOD=start_method)
    ours = _ours(caller, start_method)
    segments = _segments(caller)
    read_until(caller, "added")
    if busy:
        read_until(caller, "batch")  # a worker is 30 s into a do() call
    caller.send_signal(signal.SIGKILL)
    assert caller.wait(10) == -signal.SIGKILL
    assert_gone_within(ours, 1)
    assert_removed(segments)


@pytest.mark.timeout(60)
def test_the_zygote_alone_removes_a_dead_callers_shared_memory():
    """The workers are stopped (SIGSTOP): only the zygote can remove the segments."""
    caller = start_caller("wait", ITEMS=0, START_METHOD="zygote")
    ours = _ours(caller, "zygote")
    workers, zygote = ours[:-1], ours[-1]
    segments = _segments(caller)
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    try:
        caller.send_signal(signal.SIGKILL)
        assert caller.wait(10) == -signal.SIGKILL
        assert_gone_within([zygote], 5)
        assert_removed(segments)
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
    assert_gone_within(workers, 5)


@pytest.mark.timeout(60)
def test_a_caller_holding_many_descriptors_still_takes_busy_workers_along(start_method):
    """A fork or zygote worker inherits the caller's descriptors: with ~1,100 of them its
    pidfd of the caller is past select()'s limit of 1,024, and the watchdog must still see
    the caller die (a busy worker reads no pipe that could tell it)."""
    caller = start_caller("wait", ITEMS=200, BATCH_SECONDS=30, START_METHOD=start_method,
                          HIGH_FDS=1100)
    ours = _ours(caller, start_method)
    read_until(caller, "added")
    read_until(caller, "batch")  # a worker is 30 s into a do() call
    caller.send_signal(signal.SIGKILL)
    assert caller.wait(10) == -signal.SIGKILL
    assert_gone_within(ours, 1)


@pytest.mark.timeout(60)
def test_caller_os_exit_takes_the_workers_along(start_method):
    caller = start_caller("exit", ITEMS=200, BATCH_SECONDS=30, START_METHOD=start_method)
    ours = _ours(caller, start_method)
    segments = _segments(caller)
    assert caller.wait(10) == 0
    assert_gone_within(ours, 1)
    assert_removed(segments)


@pytest.mark.timeout(60)
def test_a_batcher_never_closed_is_flushed_and_joined_at_exit():
    caller = start_caller("noclose", ITEMS=30, BATCH_SECONDS=0.05)
    workers = [int(p) for p in read_until(caller, "pids")[1:]]
    read_until(caller, "leaving")
    closed = read_until(caller, "closed")  # printed by an atexit hook that runs after ours
    assert caller.wait(20) == 0
    assert closed[1] == "30" and "pending=0" in " ".join(closed)
    assert_gone_within(workers, 1)
