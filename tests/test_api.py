"""The public surface: exports, constructor checks, lifecycle basics."""

import dataclasses
import pickle
import subprocess
import sys
from concurrent.futures import Future

import pytest

import mpbatch
from tests import fns

SPEC_NAMES = {"Batcher", "MpbatchError", "Full", "Closed", "ItemTooLarge", "SerializationError",
              "BatchFailed", "WorkerDied", "BatchTimeout", "DeadLetter"}
AROUND_THE_CORE = {"run", "Report", "DeadLetterStore", "Executor"}  # SPEC: the next layer


def test_exports_every_spec_name():
    assert set(mpbatch.__all__) >= SPEC_NAMES | AROUND_THE_CORE
    assert mpbatch.__all__ == sorted(mpbatch.__all__)
    for name in mpbatch.__all__:
        assert getattr(mpbatch, name)


def test_errors_form_one_tree_and_resemble_builtins():
    for name in SPEC_NAMES - {"Batcher", "DeadLetter", "MpbatchError"}:
        assert issubclass(getattr(mpbatch, name), mpbatch.MpbatchError)
    assert issubclass(mpbatch.ItemTooLarge, ValueError)
    assert issubclass(mpbatch.BatchTimeout, TimeoutError)
    assert issubclass(mpbatch.Closed, RuntimeError)


@pytest.mark.parametrize("error", [
    mpbatch.Full("no room", 7),
    mpbatch.Closed("closed"),
    mpbatch.ItemTooLarge("too big"),
    mpbatch.SerializationError("no pickle", 3),
    mpbatch.BatchFailed("do() raised ValueError: x", "ValueError", "Traceback ...\nValueError: x"),
    mpbatch.WorkerDied("worker 1 (pid 5) was killed by SIGKILL", 5, -9),
    mpbatch.BatchTimeout("do() ran longer than timeout=1s"),
])
def test_errors_pickle_with_their_attributes(error):
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert vars(copy) == vars(error) or type(error) is mpbatch.BatchFailed
    if isinstance(error, mpbatch.BatchFailed):
        assert copy.traceback == error.traceback and copy.exc_type == "ValueError"
        assert "ValueError: x" in str(copy.__cause__)
    if isinstance(error, mpbatch.WorkerDied):
        assert (copy.pid, copy.exitcode) == (5, -9)
    if isinstance(error, mpbatch.Full | mpbatch.SerializationError):
        assert copy.accepted == error.accepted


@pytest.mark.parametrize(("kwargs", "error", "text"), [
    ({"size": 0}, ValueError, "size must be >= 1 (got 0)"),
    ({"size": "10"}, TypeError, "size must be an int (got str: '10')"),
    ({"size": True}, TypeError, "size must be an int"),
    ({"max_bytes": 0}, ValueError, "max_bytes must be >= 1"),
    ({"max_bytes": 1.5}, TypeError, "max_bytes must be an int or None"),
    ({"interval": 0}, ValueError, "interval must be finite and > 0 (got 0)"),
    ({"interval": float("inf")}, ValueError, "interval must be finite"),
    ({"interval": "1"}, TypeError, "interval must be a number"),
    ({"workers": 0}, ValueError, "workers must be >= 1"),
    ({"workers": 2.0}, TypeError, "workers must be an int or None"),
    ({"buffer": -1}, ValueError, "buffer must be >= 1 (got -1)"),
    ({"routing": "fastest"}, ValueError, "routing must be one of"),
    ({"routing": 1}, TypeError, "routing must be a str"),
    ({"max_attempts": 0}, ValueError, "max_attempts must be >= 1"),
    ({"retry_backoff": -0.1}, ValueError, "retry_backoff must be finite and >= 0"),
    ({"timeout": 0}, ValueError, "timeout must be finite and > 0"),
    ({"timeout": "5"}, TypeError, "timeout must be a number of seconds or None"),
    ({"on_result": 3}, TypeError, "on_result must be callable"),
    ({"on_dead_letter": "x"}, TypeError, "on_dead_letter must be callable"),
    ({"init": 1}, TypeError, "init must be callable"),
    ({"start_method": "thread"}, ValueError, "start_method must be one of"),
])
def test_bad_constructor_arguments_name_the_argument(kwargs, error, text):
    with pytest.raises(error, match=None) as info:
        mpbatch.Batcher(fns.double, **kwargs)
    assert text in str(info.value)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("routing", ["least-loaded", "round-robin", "key"])
def test_size_above_buffer_runs_batches_at_the_buffer_bound(batcher_factory, routing):
    # A worker holds at most buffer=150 items, so a batch of size=200 could never fill:
    # what a worker may hold is a full batch, and runs at once (interval=30 would show).
    b = batcher_factory(fns.batch_shape, size=200, buffer=150, workers=2, routing=routing,
                        interval=30)
    futs = [b.submit(f"k{i % 3}", i, block=True) for i in range(900)]
    shapes = [f.result(timeout=20)[1] for f in futs]
    assert max(shapes) <= 150
    assert shapes.count(150) >= 600, shapes  # full batches, not partial ones on a timer


@pytest.mark.timeout(30)
def test_a_small_buffer_bounds_items_not_the_batch_size(gated):
    """Batcher(do, buffer=3) with the default size=100: accepted; the three items it may
    hold run at once as a full batch (not after interval=60), and a fourth add() finds the
    buffer full."""
    b, started = gated(workers=1, buffer=3, interval=60)
    futs = [b.submit("k", i) for i in range(3)]
    started.readline()  # do() began: the batch did not wait for interval
    with pytest.raises(mpbatch.Full, match="buffer=3 x 1 workers"):
        b.add("k", 3)
    gated.gate()
    assert [f.result(timeout=10) for f in futs] == [0, 2, 4]
    b.add("k", 3, block=True, timeout=10)
    b.flush()
    assert b.stats().succeeded == 4


def test_do_must_be_callable():
    with pytest.raises(TypeError, match="do must be callable"):
        mpbatch.Batcher(42)


def test_unpicklable_do_is_refused_at_start():
    import threading
    lock = threading.Lock()
    b = mpbatch.Batcher(lambda batch: lock, workers=1)
    with pytest.raises(mpbatch.SerializationError, match="do= or init= cannot be pickled"):
        b.add("k", 1)
    b.close()


def test_lazy_start_context_manager_and_stats_before_start():
    b = mpbatch.Batcher(fns.double, workers=2, size=4)
    s = b.stats()
    assert (s.accepted, s.pending, s.workers) == (0, 0, 0)
    assert b.dead_letters() == []
    with b:
        assert b.stats().workers == 0  # nothing started yet
        fut = b.submit("k", 21)
        assert isinstance(fut, Future)
        assert b.stats().workers == 2
    assert fut.result(timeout=5) == 42
    s = b.stats()
    assert dataclasses.is_dataclass(s)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.accepted = 5
    assert (s.accepted, s.succeeded, s.dead_lettered, s.pending) == (1, 1, 0, 0)


def test_start_is_explicit_optional_and_returns_self():
    b = mpbatch.Batcher(fns.double, workers=1)
    assert b.start() is b
    b.start()  # twice is fine
    assert b.stats().workers == 1
    b.close()
    with pytest.raises(mpbatch.Closed):
        b.start()


def test_close_without_start_is_fine_and_idempotent():
    b = mpbatch.Batcher(fns.double)
    b.close()
    b.close()
    with pytest.raises(mpbatch.Closed, match="create a new one"):
        b.add("k", 1)


def test_add_many_add_submit_results_in_one_batcher(batcher_factory, backend):
    seen = []
    b = batcher_factory(fns.double, size=50, on_result=lambda k, vs, rs: seen.extend(rs))
    b.add("a", 1)
    fut = b.submit("b", 2)
    assert b.add_many((f"k{i % 5}", i) for i in range(1000)) == 1000
    b.flush()
    assert fut.result() == 4
    assert sorted(seen) == sorted([2, 4] + [2 * i for i in range(1000)])
    s = b.stats()
    assert (s.accepted, s.succeeded, s.pending) == (1002, 1002, 0)


def test_public_names_load_on_first_use_and_a_worker_imports_no_caller_side():
    code = ("import sys, mpbatch.worker; "
            "print(*(m in sys.modules for m in ('mpbatch.batcher', 'mpbatch.collector', "
            "'mpbatch.dispatch', 'mpbatch.ledger', 'psutil'))); "
            "from mpbatch import *; print(sorted(n for n in dir() if not n.startswith('_') "
            "and n not in ('sys', 'mpbatch')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    # A worker's start pays neither for the Batcher nor for the routing or psutil.
    assert out[0] == "False False False False False"
    assert out[1] == str(sorted(mpbatch.__all__))
