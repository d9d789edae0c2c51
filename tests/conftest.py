"""Fixtures every test gets: no child process and no shared-memory segment outlives a test."""

import os

import psutil
import pytest

import mpbatch
from tests import rayenv

# Helpers multiprocessing starts once per test session; they are not our workers.
HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")
START_METHODS = ("fork", "spawn", "forkserver", "zygote")


def cmdline(p):
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def shm_segments():
    """Segments this test process created (other runs on the machine are not ours)."""
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith(f"mpbatch_{os.getpid()}_")}
    except FileNotFoundError:
        return set()


def pytest_collection_modifyitems(config, items):
    """Tests marked ``ray`` run only under scripts/offline-ray (test_ray.py's
    test_ray_suite_runs_offline starts that run), and there nothing else runs."""
    inside = rayenv.inside()
    keep, drop = [], []
    for item in items:
        (keep if (item.get_closest_marker("ray") is not None) == inside else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def ray_running():
    import sys

    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


@pytest.fixture(autouse=True)
def no_orphans():
    before = shm_segments()
    yield
    me = psutil.Process()
    if ray_running():  # the module's Ray stays up: its processes are not ours, actors are
        _, alive = psutil.wait_procs(rayenv.actors(), timeout=5)
        assert not alive, f"actors outlived the test: {[p.pid for p in alive]}"
        return
    helpers = {p.pid for p in me.children() if any(h in cmdline(p) for h in HELPERS)}
    kids = [p for p in me.children(recursive=True) if p.pid not in helpers]
    _, alive = psutil.wait_procs(kids, timeout=2)
    for p in alive:
        p.kill()
    assert not alive, f"outlived the test: {[(p.pid, cmdline(p)) for p in alive]}"
    leaked = shm_segments() - before
    assert not leaked, f"shared memory left in /dev/shm: {leaked}"


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray for the tests of a module that need it; every process of it is gone
    once the module's tests end."""
    import ray

    rayenv.start_local()
    yield
    ray.shutdown()
    lines = {p.pid: cmdline(p) for p in psutil.Process().children(recursive=True)}
    kids = [p for p in psutil.Process().children(recursive=True)
            if not any(h in lines.get(p.pid, "") for h in HELPERS)]
    _, alive = psutil.wait_procs(kids, timeout=10)
    for p in alive:
        p.kill()
    assert not alive, f"Ray processes outlived ray.shutdown(): {[lines[p.pid] for p in alive]}"


@pytest.fixture(params=["process", pytest.param("ray", marks=pytest.mark.ray)])
def backend(request):
    """Run the test on each backend: worker processes, and Ray actors (see rayenv.py)."""
    if request.param == "ray":
        request.getfixturevalue("ray_local")
    return request.param


@pytest.fixture(params=START_METHODS)
def start_method(request):
    """Run the test once per start method."""
    return request.param


@pytest.fixture
def batcher_factory(request):
    """Make Batchers that are closed at the end of the test even if it fails; on the
    test's ``backend`` when it asks for that fixture."""
    made = []
    backend = request.getfixturevalue("backend") if "backend" in request.fixturenames \
        else "process"

    def make(do, **kwargs):
        kwargs.setdefault("workers", 2)
        kwargs.setdefault("backend", backend)
        b = mpbatch.Batcher(do, **kwargs)
        made.append(b)
        return b

    yield make
    for b in made:
        b.close(timeout=10)


@pytest.fixture(autouse=True)
def no_collector_errors(caplog):
    """The collector logs a bug of ours and carries on; a test must not pass over one."""
    yield
    bugs = [r for r in caplog.records if "unexpected error" in r.getMessage()]
    assert not bugs, f"the collector hit an unexpected error: {bugs[0].exc_text or bugs[0]}"


@pytest.fixture
def gated(batcher_factory, tmp_path):
    """make(**options) -> (Batcher, pids): each batch writes its worker's pid to ``pids``
    (a FIFO, read with readline) when it starts, then waits until ``gate()`` is called
    (and then doubles its values, or runs ``make(then=...)``)."""
    from tests import fns

    fifo, gate = tmp_path / "started", tmp_path / "gate"
    os.mkfifo(fifo)
    reader = fns.fifo_reader(fifo)

    def make(then=fns.double, **options):  # then: what each batch does once let through
        b = batcher_factory(fns.announce_then_wait(str(fifo), str(gate), then), **options)
        return b, reader

    make.gate = gate.touch
    yield make
    reader.close()
