"""start_method="zygote": a fork of the caller, made before its threads, forks the workers."""

import os
import signal
import subprocess
import sys
import textwrap

import psutil
import pytest

import mpbatch
from tests import fns

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code):
    script = "import mpbatch, threading\nif __name__ == '__main__':\n" + textwrap.indent(
        textwrap.dedent(code), "    ")
    run = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, PYTHONPATH=ROOT),
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    return run.stdout.split()


def test_the_default_is_a_zygote_while_the_caller_has_one_thread():
    """pytest runs a watchdog thread (faulthandler_timeout): a fresh interpreter is needed."""
    code = """
    b = mpbatch.Batcher(lambda batch: {k: [v + 1 for v in vs] for k, vs in batch.items()},
                        workers=2)
    f = b.submit("k", 1)
    b.close()
    print(b._pool.start_method, f.result())
    threading.Thread(target=threading.Event().wait, daemon=True).start()
    b = mpbatch.Batcher(lambda batch: None, workers=1)
    b.start()
    print(b._pool.start_method)
    b.close()
    """
    assert _run(code) == ["zygote", "2", "forkserver"]


def test_the_callers_signal_handlers_do_not_run_in_the_zygote():
    """A server's SIGCHLD handler that reaps every child would take the zygote's workers
    from it, and its SIGTERM handler would keep the zygote alive."""
    code = """
    import os, signal
    import psutil
    from tests import fns

    def reap_every_child(signum, frame):
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass

    signal.signal(signal.SIGCHLD, reap_every_child)
    signal.signal(signal.SIGTERM, lambda *_: print("handler-ran-in", os.getpid(), flush=True))
    b = mpbatch.Batcher(fns.kill_on(-1), workers=1, size=1)
    b.start()
    died = b.submit("k", -1).exception(timeout=30)
    print(b._pool.start_method, type(died).__name__, "SIGKILL" in str(died))
    print(b.submit("k", 2).result(timeout=30))  # a replacement the zygote forked
    zygote = psutil.Process(b._pool.zygote.pid)
    zygote.terminate()
    print("zygote-ended", not psutil.wait_procs([zygote], timeout=10)[1])
    b.close()
    """
    assert _run(code) == ["zygote", "WorkerDied", "True", "4", "zygote-ended", "True"]


def test_the_zygote_forks_replacements_and_ends_with_close(batcher_factory):
    b = batcher_factory(fns.kill_on(-1), workers=1, size=1, start_method="zygote").start()
    zygote = psutil.Process(b._pool.zygote.pid)
    first = b._pool.procs[0].pid
    bad = b.submit("k", -1)
    assert isinstance(bad.exception(timeout=30), mpbatch.WorkerDied)
    assert "killed by SIGKILL" in str(bad.exception())  # its exit code, read by the zygote
    assert b.submit("k", 2).result(timeout=30) == 4
    replacement = b._pool.procs[0].pid
    assert replacement != first
    assert {p.pid for p in zygote.children()} == {replacement}  # the zygote forked both
    b.close()
    assert not zygote.is_running() or zygote.status() == psutil.STATUS_ZOMBIE


def test_a_killed_zygote_stops_the_batcher_at_the_next_replacement(batcher_factory):
    """Nothing is lost: the next death finds no zygote to fork a replacement; the Batcher
    stops and dead-letters what it held, naming the cause."""
    b = batcher_factory(fns.kill_on(-1), workers=1, size=1, start_method="zygote").start()
    assert b.submit("k", 1).result(timeout=30) == 2
    os.kill(b._pool.zygote.pid, signal.SIGKILL)
    bad = b.submit("k", -1)
    error = bad.exception(timeout=30)
    assert isinstance(error, mpbatch.WorkerDied), error
    with pytest.raises(mpbatch.Closed, match="could not be started"):
        b.submit("k", 3)
    b.close()
    s = b.stats()
    assert (s.accepted, s.succeeded, s.dead_lettered, s.pending) == (2, 1, 1, 0)


@pytest.mark.timeout(60)
def test_a_zygote_ends_while_later_forks_of_the_caller_hold_its_socket(batcher_factory):
    """A second Batcher's zygote (and a fork of the user's own) inherit the first zygote's
    socket: close() of the first asks its zygote to exit instead of waiting for an end of
    file those forks would hold back for as long as they live."""
    first = batcher_factory(fns.double, workers=1, start_method="zygote").start()
    second = batcher_factory(fns.double, workers=1, start_method="zygote").start()
    r, w = os.pipe()
    pid = os.fork()  # the user's own fork: it lives until we close w
    if pid == 0:
        os.close(w)
        os.read(r, 1)
        os._exit(0)
    os.close(r)
    try:
        zygote = psutil.Process(first._pool.zygote.pid)
        assert first.submit("k", 1).result(timeout=30) == 2
        first.close(timeout=20)
        zygote.wait(timeout=5)  # reaped by close(): gone, not a zombie
        assert second.submit("k", 2).result(timeout=30) == 4
    finally:
        os.close(w)
        os.waitpid(pid, 0)


def test_a_zygote_ends_when_its_caller_dies_though_a_fork_holds_its_socket():
    """Killed caller: the zygote watches the caller's pidfd, not only the socket (which the
    caller's own fork child keeps open here until the test lets it go)."""
    r, w = os.pipe()
    code = f"""
    import os
    b = mpbatch.Batcher(lambda batch: {{k: [v + 1 for v in vs] for k, vs in batch.items()}},
                        workers=1, start_method="zygote").start()
    if os.fork() == 0:  # holds the zygote's socket until the test closes its pipe
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)  # not the test's stdout: run() would wait for it
        os.dup2(null, 2)
        os.read({r}, 1)
        os._exit(0)
    print(b._pool.zygote.pid, b._pool.procs[0].pid, flush=True)
    os.kill(os.getpid(), 9)
    """
    script = "import mpbatch\nif __name__ == '__main__':\n" + textwrap.indent(
        textwrap.dedent(code), "    ")
    # Not run(): it would wait for the end of stdout, which every process forked from the
    # caller holds (the zygote, its workers) until it exits: the pids are read first.
    caller = subprocess.Popen([sys.executable, "-c", script], pass_fds=(r,), text=True,
                              env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.PIPE)
    try:
        procs = [psutil.Process(int(pid)) for pid in caller.stdout.readline().split()]
        assert caller.wait(timeout=30) == -signal.SIGKILL
        _, alive = psutil.wait_procs(procs, timeout=10)
        for p in alive:
            p.kill()
        assert not alive, f"outlived their caller: {alive}"
    finally:
        os.close(w)  # the fork child reads end of file and exits
        os.close(r)
        caller.kill()
        caller.wait()
        caller.stdout.close()


def test_the_caller_looks_up_mallopt_once_for_the_workers_it_forks():
    """mallopt is looked up (ctypes imported) in the caller before the zygote forks, and the
    worker finds it already there: each worker would otherwise import ctypes itself at start
    (2.5-7 ms of it on two vCPUs). Every lookup records whether its process had it already."""
    code = """
    from mpbatch import worker
    look_up = worker.glibc_mallopt
    worker.found = []

    def recorded():
        worker.found.append(look_up.cache_info().currsize > 0)
        return look_up()

    worker.glibc_mallopt = recorded
    b = mpbatch.Batcher(lambda batch: {k: [worker.found[-1] for v in vs]
                                       for k, vs in batch.items()}, workers=1)
    f = b.submit("k", 1)
    b.close()
    print(b._pool.start_method, worker.found, f.result())
    """
    # The caller looked it up once, not having it; the worker's own look found it there.
    assert _run(code) == ["zygote", "[False]", "True"]
