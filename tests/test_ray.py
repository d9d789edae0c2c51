"""backend="ray": workers as Ray actors, with mpbatch's own accounting.

Tests marked ``ray`` run only under scripts/offline-ray (a loopback-only network namespace,
see rayenv.py); test_ray_suite_runs_offline, in the ordinary run, starts that run. Tests
of the API that hold on both backends are parametrised with the ``backend`` fixture in
their own files; here are the Ray-only ones: deaths, timeouts, the Ray start-up rules.
"""

import contextlib
import faulthandler
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import psutil
import pytest

import mpbatch
from tests import fns, rayenv

RAY_SUITE_SECONDS = 420


@pytest.mark.timeout(RAY_SUITE_SECONDS + 60)
def test_ray_suite_runs_offline():
    """Every test marked ``ray``, in a pytest of its own under scripts/offline-ray."""
    if not rayenv.installed():
        pytest.skip('Ray is not installed: pip install -e ".[ray]" runs the Ray tests')
    if not rayenv.can_isolate():
        pytest.skip("Ray runs here only in a loopback-only network namespace, and this user "
                    "cannot make one (unshare -n needs root or CAP_SYS_ADMIN)")
    # It runs for minutes by design: no "Timeout" traceback dump at faulthandler_timeout
    # (pytest-timeout still bounds it).
    faulthandler.cancel_dump_traceback_later()
    run = subprocess.run(
        [str(rayenv.SCRIPT), sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "-o", "addopts=-ra --strict-markers", str(rayenv.ROOT / "tests")],
        cwd=rayenv.ROOT, capture_output=True, text=True, timeout=RAY_SUITE_SECONDS)
    tail = (run.stdout + run.stderr)[-6000:]
    assert run.returncode == 0, tail
    summary = run.stdout.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary) and "skipped" not in summary, tail


def test_backend_ray_without_ray_names_the_extra(tmp_path):
    code = textwrap.dedent("""
        import sys
        sys.modules["ray"] = None  # as if Ray were not installed
        import mpbatch
        from tests import fns
        b = mpbatch.Batcher(fns.double, backend="ray", workers=1)
        try:
            b.start()
        except ImportError as exc:
            print("ImportError:", exc)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=rayenv.ROOT, capture_output=True,
                         text=True, timeout=60)
    assert 'pip install "mpbatch[ray]"' in out.stdout, out.stdout + out.stderr


def test_import_mpbatch_does_not_import_ray():
    code = "import sys, mpbatch; mpbatch.Batcher; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


@pytest.mark.parametrize(("kwargs", "error", "text"), [
    ({"address": "127.0.0.1:6379"}, ValueError, "address='127.0.0.1:6379' applies to "
                                                "backend='ray' only"),
    ({"ray_options": {"num_cpus": 1}}, ValueError, "applies to backend='ray' only"),
    ({"backend": "dask"}, ValueError, "backend must be one of"),
    ({"backend": "ray", "start_method": "fork"}, ValueError, "start_method='fork' applies"),
    ({"backend": "ray", "address": 6379}, TypeError, "address must be a str"),
    ({"backend": "ray", "ray_options": {"max_restarts": 0}}, ValueError,
     "ray_options may not set max_restarts"),
])
def test_backend_options_are_checked(kwargs, error, text):
    with pytest.raises(error, match=re.escape(text)):
        mpbatch.Batcher(fns.double, **kwargs)


# -- under scripts/offline-ray ----------------------------------------------------------

def ray_batcher(batcher_factory, do, **kwargs):
    return batcher_factory(do, backend="ray", **kwargs)


@pytest.mark.ray
def test_the_ray_tests_run_in_a_loopback_only_namespace():
    assert rayenv.inside()
    with pytest.raises(OSError, match="unreachable"):  # no route beyond this machine
        socket.create_connection(("1.1.1.1", 53), timeout=2)


@pytest.mark.ray
@pytest.mark.timeout(120)
@pytest.mark.usefixtures("ray_local")
def test_each_worker_is_an_actor_whose_constructor_ran_init(batcher_factory):
    b = ray_batcher(batcher_factory, fns.use_state, init=fns.init_state, workers=2)
    futs = [b.submit(i % 3, i) for i in range(200)]
    assert [f.result(timeout=60) for f in futs] == [10 * i for i in range(200)]
    pids = {p.pid for p in rayenv.actors()}
    assert len(pids) == 2 and os.getpid() not in pids


@pytest.mark.ray
@pytest.mark.timeout(120)
@pytest.mark.usefixtures("ray_local")
def test_sigkill_of_an_actor_mid_batch_loses_nothing(gated):
    b, started = gated(backend="ray", workers=2, size=10, max_attempts=1)
    futs = [b.submit(f"k{i % 4}", i) for i in range(40)]
    pid = int(started.readline())
    os.kill(pid, signal.SIGKILL)
    gated.gate()
    assert [f.result(timeout=60) for f in futs] == [2 * i for i in range(40)]
    s = b.stats()
    assert (s.accepted, s.succeeded, s.dead_lettered, s.pending) == (40, 40, 0, 0)
    assert s.worker_restarts >= 1


@pytest.mark.ray
@pytest.mark.timeout(120)
@pytest.mark.usefixtures("ray_local")
def test_a_poison_item_is_isolated_and_dead_lettered_with_worker_died(batcher_factory):
    letters = []
    b = ray_batcher(batcher_factory, fns.kill_on(13), size=8, workers=2,
                    on_dead_letter=letters.append)
    futs = [b.submit(f"k{i % 3}", i) for i in range(32)]
    b.flush()
    for i, fut in enumerate(futs):
        if i == 13:
            with pytest.raises(mpbatch.WorkerDied, match="Ray does not report"):
                fut.result()
        else:
            assert fut.result() == 2 * i
    assert [v for letter in letters for vs in letter.batch.values() for v in vs] == [13]
    s = b.stats()
    assert (s.accepted, s.succeeded, s.dead_lettered, s.pending) == (32, 31, 1, 0)
    assert s.splits >= 1


@pytest.mark.ray
@pytest.mark.timeout(120)
@pytest.mark.usefixtures("ray_local")
def test_a_do_past_timeout_is_killed_and_becomes_batch_timeout(batcher_factory):
    b = ray_batcher(batcher_factory, fns.hang_on(7), size=4, workers=2, timeout=1.0)
    began = time.monotonic()
    futs = [b.submit("k", i) for i in range(8)]
    with pytest.raises(mpbatch.BatchTimeout, match="timeout=1s"):
        futs[7].result(timeout=60)
    took = time.monotonic() - began
    assert [f.result() for f in futs[:7]] == [2 * i for i in range(7)]
    # timeout= plus Ray's ~1.7 s to report the kill, per isolation step (4 items: 2 steps)
    assert took < 20, took


@pytest.mark.ray
@pytest.mark.timeout(120)
@pytest.mark.usefixtures("ray_local")
def test_exceptions_from_do_carry_the_remote_traceback(batcher_factory):
    letters = []
    b = ray_batcher(batcher_factory, fns.raise_value_error, max_attempts=2, retry_backoff=0.01,
                    on_dead_letter=letters.append)
    fut = b.submit("k", 1)
    with pytest.raises(mpbatch.BatchFailed, match="ValueError: bad batch") as info:
        fut.result(timeout=60)
    assert "raise_value_error" in info.value.traceback
    assert letters[0].attempts == 2


@pytest.mark.ray
@pytest.mark.timeout(120)
@pytest.mark.usefixtures("ray_local")
def test_too_few_free_cpus_is_a_clear_error_at_start(batcher_factory):
    b = ray_batcher(batcher_factory, fns.double, workers=rayenv.CPUS + 1)
    with pytest.raises(mpbatch.MpbatchError, match=r"needs \{'CPU': 1\} for each of "
                       r"workers=5 actors, and the Ray cluster cannot hold them all "
                       r"\(free now: CPU=4\)"):
        b.start()


@pytest.mark.ray
@pytest.mark.timeout(120)
@pytest.mark.usefixtures("ray_local")
def test_recycled_actors_are_restarted_with_nothing_lost(batcher_factory):
    b = ray_batcher(batcher_factory, fns.with_pid, size=10, workers=2,
                    max_batches_per_worker=2)
    futs = [b.submit(i % 5, i) for i in range(100)]
    results = [f.result(timeout=60) for f in futs]
    assert [v for _, v in results] == list(range(100))
    assert len({pid for pid, _ in results}) >= 3
    assert b.stats().recycled >= 1


# -- Ray started by mpbatch, and a cluster joined by address ------------------------------

SCRIPT = textwrap.dedent("""
    import os, sys, time
    import mpbatch
    from tests import fns
    from tests.rayenv import actors
    done = []
    if MODE == "noclose":  # registered first, so it runs last: after mpbatch's hook
        import atexit
        atexit.register(lambda: print("at exit", len(done), b.stats(), flush=True))
    # Half a CPU an actor: "two" fits a second Batcher beside this one.
    b = mpbatch.Batcher(fns.double, backend="ray", workers=2, address=ADDRESS,
                        on_result=lambda k, vs, rs: done.extend(rs),
                        ray_options={"num_cpus": 0.5})
    futs = [b.submit(i % 3, i) for i in range(300)]
    assert [f.result(timeout=60) for f in futs] == [2 * i for i in range(300)]
    print("actors", *[p.pid for p in actors()], flush=True)
    if MODE == "hang":
        time.sleep(600)
    if MODE == "two":  # a second Batcher on the Ray the first one started
        other = mpbatch.Batcher(fns.double, backend="ray", workers=2, address=ADDRESS,
                                ray_options={"num_cpus": 0.5})
        assert other.submit("k", 1).result(timeout=60) == 2
        b.close()  # leaves the Ray, and other's actors, running
        assert other.submit("k", 2).result(timeout=60) == 4
        other.close()
    if MODE == "noclose":  # atexit closes it: every item added still gets its result
        b.add_many(("k", i) for i in range(1000))
        sys.exit(0)
    b.close()
    print("closed", b.stats(), flush=True)
""")


def run_script(address, mode, **popen):
    code = SCRIPT.replace("ADDRESS", repr(address)).replace("MODE", repr(mode))
    return subprocess.Popen([sys.executable, "-c", code], cwd=rayenv.ROOT, text=True,
                            stdout=subprocess.PIPE, **popen)


@pytest.mark.ray
@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["close", "two"])
def test_a_ray_started_by_mpbatch_is_shut_down_by_the_last_batcher_on_it(mode):
    """"close": one Batcher; "two": a second one runs on the first one's Ray and is
    unharmed by the first one's close()."""
    proc = run_script(None, mode)
    out, _ = proc.communicate(timeout=150)
    assert proc.returncode == 0, out
    assert "pending=0" in out
    assert rayenv.actors() == []


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_the_callers_death_leaves_no_actor_behind():
    folder = tempfile.mkdtemp(prefix="mpbatch-", dir="/tmp")  # Ray's sockets: <= 107 bytes
    env = {**os.environ, "RAY_TMPDIR": folder}
    proc = run_script(None, "hang", env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("actors"), line
        pids = [int(x) for x in line.split()[1:]]
        proc.kill()
        proc.wait()
        began = time.monotonic()
        _, alive = psutil.wait_procs([psutil.Process(p) for p in pids], timeout=10)
        assert not alive, f"actors alive 10 s after their caller died: {alive}"
        assert time.monotonic() - began < 5
    finally:
        rayenv.kill_ray_under(folder)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_a_batcher_left_open_at_exit_is_flushed_before_ray_shuts_down():
    proc = run_script(None, "noclose")
    out, _ = proc.communicate(timeout=150)
    assert proc.returncode == 0, out
    # mpbatch's exit hook runs before Ray's: all 1,300 results, none dead-lettered
    assert "at exit 1300 Stats(accepted=1300, succeeded=1300, dead_lettered=0" in out, out


@pytest.mark.ray
@pytest.mark.timeout(120)
@pytest.mark.usefixtures("ray_local")
def test_timeout_ends_a_do_that_holds_the_gil(batcher_factory, tmp_path):
    fifo = tmp_path / "started"
    os.mkfifo(fifo)
    reader = fns.fifo_reader(fifo)
    b = ray_batcher(batcher_factory, fns.hold_gil_on("stuck", str(fifo)), size=1,
                    timeout=1.0, isolate_poison=False)
    fut = b.submit("stuck", "x")
    reader.readline()  # inside do(): from now on the actor answers no pull
    with pytest.raises(mpbatch.BatchTimeout, match="timeout=1s"):
        fut.result(timeout=60)
    assert b.submit("ok", "abc").result(timeout=60) == 3
    reader.close()


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_joins_a_cluster_started_with_ray_start_by_address():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    head = rayenv.Head(port)
    try:
        proc = run_script(head.address, "close")
        out, _ = proc.communicate(timeout=150)
        assert proc.returncode == 0, out
        assert "pending=0" in out
        # close() released its actors and left the cluster running
        assert rayenv.actors() == []
        assert any("gcs_server" in " ".join(p.cmdline()) for p in
                   rayenv.processes_under(head.folder))
    finally:
        head.stop()


# -- Ctrl-C (guarantee 5) on a caller that started its own Ray ----------------------------

def ray_caller(mode, **env):
    """caller_script.py MODE with BACKEND=ray in a Ray temp folder of its own; its actors'
    pids once they are up."""
    from tests.test_signals import read_until, start_caller

    folder = tempfile.mkdtemp(prefix="mpbatch-", dir="/tmp")  # Ray's sockets: <= 107 bytes
    caller = start_caller(mode, BACKEND="ray", RAY_TMPDIR=folder, **env)
    try:
        return caller, [int(p) for p in read_until(caller, "pids")[1:]], folder
    except BaseException:  # it never came up: end it and its Ray here
        caller.kill()
        gone_after_exit(caller, [], folder)
        raise


def gone_after_exit(caller, actors, folder):
    """The caller exited: its actors are gone with its Ray, which it shut down."""
    try:
        caller.wait(30)
        procs = []
        for pid in actors:
            with contextlib.suppress(psutil.NoSuchProcess):  # gone already: fine
                procs.append(psutil.Process(pid))
        _, alive = psutil.wait_procs(procs, timeout=5)
        assert not alive, f"actors alive 5 s after their caller exited: {alive}"
    finally:
        rayenv.kill_ray_under(folder)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.ray
@pytest.mark.timeout(180)
@pytest.mark.parametrize("to", ["process-group", "caller-alone"])
def test_ctrl_c_still_flushes_every_item_on_ray(to):
    """A terminal's Ctrl-C reaches the caller and every process of its group, the Ray it
    started included: no actor dies mid-batch, and close() still flushes."""
    from tests.test_signals import read_until

    caller, actors, folder = ray_caller("wait", ITEMS=40, BATCH_SECONDS=0.2)
    try:
        read_until(caller, "added")
        read_until(caller, "batch")  # an actor is inside do()
        if to == "process-group":
            os.killpg(caller.pid, signal.SIGINT)
        else:
            caller.send_signal(signal.SIGINT)
        closed = read_until(caller, "closed")
        assert closed[1] == "40", closed  # every item finished: no actor died mid-batch
        assert "dead_lettered=0" in " ".join(closed) and "worker_restarts=0" in " ".join(
            closed), closed
        assert "KeyboardInterrupt" in caller.stderr.read()
    finally:
        gone_after_exit(caller, actors, folder)


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_ctrl_c_inside_close_flushes_and_a_second_one_gives_up_on_ray():
    """One Ctrl-C inside close() (which flushes 200 items, ~10 s of work) lets it go on
    flushing; a second one ends it at once and says what was left."""
    from tests.test_signals import read_err_until, read_until

    caller, actors, folder = ray_caller("closing", ITEMS=200, BATCH_SECONDS=0.5)
    try:
        read_until(caller, "inside")  # close() has begun
        os.killpg(caller.pid, signal.SIGINT)  # first: close() goes on flushing
        said = read_err_until(caller, "Ctrl-C again")
        assert re.search(r"finishing \d+ items", said), said
        started = time.monotonic()
        os.killpg(caller.pid, signal.SIGINT)  # second: give up now
        closed = read_until(caller, "closed")
        # Well under the ~9 s of work left (a bound, not a speed: the VM is shared)
        assert time.monotonic() - started < 5.0
        stderr = caller.stderr.read()
        stats = " ".join(closed)
        assert "pending=0" in stats and "dead_lettered=0" not in stats
        left = re.search(r"(\d+) unfinished items were dead-lettered", stderr)
        assert left and f"dead_lettered={left.group(1)}," in stats, (stderr, stats)
    finally:
        gone_after_exit(caller, actors, folder)
