"""Ctrl-C (SIGINT to the whole process group) and SIGTERM, on a real caller process."""

import contextlib
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "caller_script.py")


def start_caller(mode, **env):
    root = os.path.dirname(os.path.dirname(__file__))
    return subprocess.Popen(
        [sys.executable, SCRIPT, mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,  # its own process group, like a terminal job
        env=dict(os.environ, PYTHONPATH=root, **{k: str(v) for k, v in env.items()}))


def read_until(proc, prefix):
    for line in proc.stdout:
        if line.startswith(prefix):
            return line.split()
    raise AssertionError(f"caller ended before printing {prefix!r}: {proc.stderr.read()}")


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
def test_ctrl_c_still_flushes_every_item(to):
    caller = start_caller("wait", ITEMS=40, BATCH_SECONDS=0.2)
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
def test_second_ctrl_c_terminates_fast_and_says_what_was_left():
    caller = start_caller("wait", ITEMS=200, BATCH_SECONDS=0.5)  # ~10 s of work
    workers = [int(p) for p in read_until(caller, "pids")[1:]]
    read_until(caller, "added")
    read_until(caller, "batch")
    os.killpg(caller.pid, signal.SIGINT)  # first: close() starts flushing 200 items
    read_until(caller, "batch")  # close() is now waiting on the workers
    started = time.monotonic()
    os.killpg(caller.pid, signal.SIGINT)  # second: give up now
    closed = read_until(caller, "closed")
    caller.wait(10)
    assert time.monotonic() - started < 1.0
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
