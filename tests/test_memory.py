"""Memory: the OOM killer and address-space limits end clearly; a long stream stays bounded."""

import os

import psutil
import pytest

import mpbatch
from tests import fns


def memory_cgroup_root():
    """This process's cgroup-v1 memory directory, if it exists and we may write there."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = [line.strip().split(":", 2) for line in f]
    except OSError:
        return None
    for _, controllers, path in lines:
        if "memory" in controllers.split(","):
            root = f"/sys/fs/cgroup/memory{path}"
            return root if os.access(root, os.W_OK) else None
    return None


@pytest.fixture
def oom_cgroup():
    root = memory_cgroup_root()
    if root is None:
        pytest.skip("no writable cgroup-v1 memory controller on this machine")
    path = os.path.join(root, f"mpbatch-oom-{os.getpid()}")
    os.mkdir(path)
    with open(os.path.join(path, "memory.limit_in_bytes"), "w") as f:
        f.write(str(300 * 1024 * 1024))
    yield path
    os.rmdir(path)  # empty by now: the no_orphans fixture waited for every worker


@pytest.mark.timeout(120)
def test_real_oom_killer_ends_as_worker_died_and_nothing_is_lost(batcher_factory, oom_cgroup):
    b = batcher_factory(fns.hog_on("hog"), init=fns.join_cgroup(oom_cgroup), size=4, workers=2)
    hog = b.submit("hog", 0)
    others = [b.submit(f"k{i % 3}", i) for i in range(1, 40)]
    b.flush()
    err = hog.exception()
    assert isinstance(err, mpbatch.WorkerDied)
    assert err.exitcode == -9 and "SIGKILL" in str(err) and "OOM killer" in str(err)
    assert [f.result() for f in others] == [2 * i for i in range(1, 40)]
    with open(os.path.join(oom_cgroup, "memory.oom_control")) as f:
        assert "oom_kill 0" not in f.read()  # it really was the kernel's OOM killer
    s = b.stats()
    assert (s.succeeded, s.dead_lettered, s.pending) == (39, 1, 0)
    b.close()


def test_address_space_limit_fails_the_batch_with_memory_error(batcher_factory):
    b = batcher_factory(fns.hog_on("hog"), init=fns.limit_address_space(1 << 30), size=1,
                        workers=1)
    hog = b.submit("hog", 0)
    after = b.submit("k", 1)
    b.flush()
    with pytest.raises(mpbatch.BatchFailed, match="MemoryError"):
        hog.result()
    assert after.result() == 2
    assert b.stats().pending == 0


@pytest.mark.timeout(120)
def test_a_long_stream_runs_in_bounded_memory(batcher_factory):
    """Guarantee 6: the caller's memory is set by buffer, not by the stream's length."""
    b = batcher_factory(fns.nothing, size=500, workers=2, buffer=5_000)
    me = psutil.Process()
    b.add_many((f"k{i % 1000}", i) for i in range(300_000))
    first = me.memory_info().rss
    b.add_many((f"k{i % 1000}", i) for i in range(1_500_000))
    b.flush()
    grown = me.memory_info().rss - first
    assert grown < 20 * 1024 * 1024, f"caller grew {grown / 1e6:.1f} MB over 1.5 M more items"
    assert b.stats().succeeded == 1_800_000
