"""mpbatch.Executor: ProcessPoolExecutor's semantics, and every call failing alone.

Adapted from CPython's Lib/test/test_concurrent_futures (the CPython test each one follows is
named in its docstring); written anew as plain pytest functions. Calls run in batches, so a
call that must still be running when the test goes on waits on a gate: it says on a FIFO that
it started (Gate.started) and returns once the test opens the gate (Gate.open).
"""

import gc
import itertools
import multiprocessing
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from collections import Counter
from concurrent import futures
from concurrent.futures import CancelledError
from concurrent.futures.process import BrokenProcessPool
from operator import add

import psutil
import pytest

import mpbatch
from mpbatch.errors import RemoteTraceback
from mpbatch.executor import CallTimeout, Executor, WorkerCrashed
from tests import fns_executor as fx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Gate:
    """Calls that say on a FIFO when they start, then wait until the test opens the gate."""

    def __init__(self, tmp_path):
        self.fifo = str(tmp_path / "started")
        self.path = str(tmp_path / "gate")
        os.mkfifo(self.fifo)
        self._fd = os.open(self.fifo, os.O_RDWR | os.O_NONBLOCK)  # never EOF (Linux)
        self._read = b""

    def submit(self, ex, value=None):
        """Submit a call that waits at the gate, then returns ``value``."""
        return ex.submit(fx.announce_then_wait, self.fifo, self.path, value)

    def started(self, timeout=30):
        """The pid of the worker running the next gated call (waits until one starts)."""
        while b"\n" not in self._read:
            ready, _, _ = select.select([self._fd], [], [], timeout)
            assert ready, f"no gated call started within {timeout} s"
            self._read += os.read(self._fd, 4096)
        line, _, self._read = self._read.partition(b"\n")
        return int(line)

    def open(self):
        with open(self.path, "w"):
            pass

    def close(self):
        os.close(self._fd)


def finished_future(result=None, exception=None, state="finished"):
    """A plain Future done in a given way, made through its public API (CPython's util.py:
    SUCCESSFUL_FUTURE, EXCEPTION_FUTURE, CANCELLED_FUTURE, CANCELLED_AND_NOTIFIED_FUTURE)."""
    f = futures.Future()
    if state in ("cancelled", "cancelled-and-notified"):
        f.cancel()
        if state == "cancelled-and-notified":
            f.set_running_or_notify_cancel()
    elif state == "finished":
        if exception is not None:
            f.set_exception(exception)
        else:
            f.set_result(result)
    return f


@pytest.fixture
def gate(tmp_path):
    g = Gate(tmp_path)
    yield g
    g.open()
    g.close()


@pytest.fixture
def make(gate):
    """make(*args, **kwargs) -> Executor, shut down at the end of the test even if it fails
    (the gate is opened first, so no gated call holds the shutdown)."""
    made = []

    def make(*args, **kwargs):
        ex = Executor(*args, **kwargs)
        made.append(ex)
        return ex

    yield make
    gate.open()
    for ex in made:
        ex.shutdown(wait=False, cancel_futures=True)
        ex._batcher.close(timeout=10)  # a bound on the wait: the workers are killed past it


@pytest.fixture
def ex(make):
    return make(2)


# -- submit -----------------------------------------------------------------------------------

def test_submit_returns_the_result(ex):
    """test_submit"""
    assert ex.submit(pow, 2, 8).result(timeout=30) == 256


def test_submit_passes_keyword_arguments(ex):
    """test_submit_keyword: fn is positional-only, so ``fn=`` and ``self=`` are the call's."""
    assert ex.submit(fx.mul, 2, y=8).result(timeout=30) == 16
    assert ex.submit(fx.capture, 1, self=2, fn=3).result(timeout=30) == (
        (1,), {"self": 2, "fn": 3})
    with pytest.raises(TypeError):
        ex.submit(fn=fx.capture, arg=1)
    with pytest.raises(TypeError):
        ex.submit(arg=1)


def test_submit_after_shutdown_raises_runtime_error(ex):
    """test_run_after_shutdown"""
    ex.shutdown()
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        ex.submit(pow, 2, 5)
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        ex.map(abs, [1])


def test_max_workers_must_be_positive():
    """test_max_workers_negative"""
    for number in (0, -1):
        with pytest.raises(ValueError, match="max_workers must be greater than 0"):
            Executor(max_workers=number)
    with pytest.raises(TypeError, match="initializer must be a callable"):
        Executor(1, initializer=42)


def test_mp_context_chooses_the_start_method(make, monkeypatch):
    """A forked worker sees what the caller set before it started; a spawned one starts
    afresh."""
    monkeypatch.setattr(fx, "INITIALIZER_STATUS", "set in the caller")
    for method, seen in (("fork", "set in the caller"), ("spawn", "uninitialized")):
        ex = make(1, mp_context=multiprocessing.get_context(method))
        assert ex.submit(fx.get_init_status).result(timeout=30) == seen
    with pytest.raises(ValueError, match="mp_context is 'spawn' but start_method='fork'"):
        Executor(1, mp_context=multiprocessing.get_context("spawn"), start_method="fork")


def test_an_exception_carries_the_worker_traceback(ex, capsys):
    """test_traceback: the call's own exception, its worker traceback as __cause__."""
    with pytest.raises(RuntimeError) as info:
        ex.submit(fx.raise_runtime_error).result(timeout=30)
    exc = info.value
    assert type(exc) is RuntimeError and exc.args == (123,)
    assert type(exc.__cause__) is RemoteTraceback
    assert "raise RuntimeError(123)  # a comment the remote traceback must show" in (
        exc.__cause__.tb)
    sys.excepthook(type(exc), exc, exc.__traceback__)
    assert "# a comment the remote traceback must show" in capsys.readouterr().err


def test_a_call_that_raises_system_exit_fails_with_it(ex):
    """test_exit_during_func_exec_on_worker: the call fails, its worker goes on."""
    with pytest.raises(SystemExit):
        ex.submit(fx.sys_exit).result(timeout=30)
    assert ex.submit(pow, 2, 3).result(timeout=30) == 8


def test_an_argument_that_does_not_pickle_fails_its_future(ex):
    """test_error_at_task_pickle: submit() does not raise; the future does."""
    fut = ex.submit(fx.identity, threading.Lock())
    with pytest.raises(TypeError, match=r"cannot pickle '_thread\.lock' object") as info:
        fut.result(timeout=30)
    assert isinstance(info.value, mpbatch.SerializationError)
    with pytest.raises(mpbatch.SerializationError, match="error at pickling"):
        ex.submit(fx.identity, fx.ErrorAtPickle()).result(timeout=30)
    assert ex.submit(pow, 2, 3).result(timeout=30) == 8


def test_a_function_that_does_not_pickle_fails_its_future(ex):
    lock = threading.Lock()
    fut = ex.submit(lambda: lock)
    with pytest.raises(mpbatch.SerializationError, match="cannot be pickled"):
        fut.result(timeout=30)
    assert ex.submit(lambda x: x + 1, 41).result(timeout=30) == 42  # cloudpickle: lambdas go


def test_a_result_that_does_not_pickle_fails_its_future(ex):
    """test_error_during_result_pickle_on_worker"""
    fut = ex.submit(fx.unpicklable_result)
    with pytest.raises(mpbatch.SerializationError, match=r"cannot pickle '_thread\.lock'"):
        fut.result(timeout=30)
    assert ex.submit(pow, 2, 3).result(timeout=30) == 8


PICKLING_TROUBLE = [  # (id, fn, args, error the call's future raises)
    # test_error_at_task_unpickle, test_exit_at_task_unpickle, test_crash_at_task_unpickle:
    # ProcessPoolExecutor breaks; here only that call fails.
    ("argument-raises-at-unpickling", id, (fx.ErrorAtUnpickle(),), fx.pickle.UnpicklingError),
    ("argument-exits-at-unpickling", id, (fx.ExitAtUnpickle(),), SystemExit),
    ("argument-segfaults-at-unpickling", id, (fx.CrashAtUnpickle(),), WorkerCrashed),
    # test_exit_during_result_pickle_on_worker, test_crash_during_result_pickle_on_worker
    ("result-exits-at-pickling", fx.return_instance, (fx.ExitAtPickle,),
     mpbatch.SerializationError),
    ("result-segfaults-at-pickling", fx.return_instance, (fx.CrashAtPickle,), WorkerCrashed),
    # test_error_during_result_unpickle_in_result_handler,
    # test_exit_during_result_unpickle_in_result_handler: the whole pool breaks in CPython
    ("result-raises-at-unpickling", fx.return_instance, (fx.ErrorAtUnpickle,),
     mpbatch.SerializationError),
    ("result-exits-at-unpickling", fx.return_instance, (fx.ExitAtUnpickle,),
     mpbatch.SerializationError),
    # test_crash_during_func_exec_on_worker
    ("call-segfaults", fx.segfault, (), WorkerCrashed),
]


@pytest.mark.parametrize(("fn", "args", "error"), [c[1:] for c in PICKLING_TROUBLE],
                         ids=[c[0] for c in PICKLING_TROUBLE])
def test_a_call_whose_pickling_fails_fails_alone(make, fn, args, error):
    """test_deadlock.py's cases: the call fails, its batch-mates succeed, no deadlock."""
    ex = make(2)
    before = [ex.submit(fx.mul, i, 2) for i in range(20)]
    bad = ex.submit(fn, *args)
    after = [ex.submit(fx.mul, i, 3) for i in range(20)]
    with pytest.raises(error):
        bad.result(timeout=30)
    assert [f.result(timeout=30) for f in before] == [2 * i for i in range(20)]
    assert [f.result(timeout=30) for f in after] == [3 * i for i in range(20)]
    assert ex.submit(pow, 2, 3).result(timeout=30) == 8


def test_the_executor_keeps_no_reference_to_a_submitted_callable(ex):
    """test_no_stale_references (CPython issue #16284)"""
    thing = fx.Thing()
    ref = weakref.ref(thing)
    ex.submit(thing.method).result(timeout=30)
    del thing
    gc.collect()
    assert ref() is None, "the object of a bound method submitted is kept alive"
    again = fx.Thing()
    before = len(ex._batcher._dispatcher.definitions)
    for _ in range(5):  # a new bound method each time, pickling the same: one definition
        ex.submit(again.method).result(timeout=30)
    assert len(ex._batcher._dispatcher.definitions) <= before + 1


def test_a_function_first_submitted_while_another_is_being_defined_reaches_the_worker(
        make, monkeypatch):
    """The first call of a function sends it to each worker ahead of its chunk (a DEFINE
    frame). One submitted while such a send is under way must get there too; here the
    collector's send of mul's definition is held up until identity's is in."""
    ex = make(1)
    assert ex.submit(pow, 2, 2).result(timeout=30) == 4
    dispatcher = ex._batcher._dispatcher
    send, define = dispatcher.pool.send, dispatcher.define
    sending, defined, go_on = threading.Event(), threading.Event(), threading.Event()

    def held_up_send(i, frame):
        if not sending.is_set():  # the first frame: mul's DEFINE, ahead of its chunk
            sending.set()
            go_on.wait(30)
        return send(i, frame)

    def define_and_tell(token, blob):
        define(token, blob)
        defined.set()

    monkeypatch.setattr(dispatcher.pool, "send", held_up_send)
    first = ex.submit(fx.mul, 6, 7)
    assert sending.wait(30)
    monkeypatch.setattr(dispatcher, "define", define_and_tell)
    second = []  # submitted in a thread: it waits for the Batcher's lock, which that send holds
    submitter = threading.Thread(target=lambda: second.append(ex.submit(fx.identity, 5)))
    submitter.start()
    assert defined.wait(30)
    go_on.set()
    submitter.join(30)
    assert first.result(timeout=30) == 42
    assert second[0].result(timeout=30) == 5  # KeyError in the worker: never defined there


# -- map --------------------------------------------------------------------------------------

def test_map_yields_results_in_input_order(ex):
    """test_map, test_map_chunksize: chunksize is accepted (calls are batched anyway)."""
    expected = list(map(pow, range(40), range(40)))
    for chunksize in (1, 3, 6, 40, 50):
        assert list(ex.map(pow, range(40), range(40), chunksize=chunksize)) == expected
    assert list(ex.map(abs, range(-5000, 5000))) == [abs(i) for i in range(-5000, 5000)]


def test_map_rejects_a_chunksize_below_one(ex):
    """test_map_chunksize"""
    for chunksize in (0, -1):
        with pytest.raises(ValueError, match="chunksize must be >= 1"):
            ex.map(pow, range(40), range(40), chunksize=chunksize)


def test_map_stops_at_the_shortest_iterable(ex):
    assert list(ex.map(fx.mul, range(10), range(3))) == [0, 1, 4]
    assert list(ex.map(fx.mul, range(3), itertools.count())) == [0, 1, 4]
    assert list(ex.map(str, [])) == []
    assert list(ex.map(str)) == []


def test_map_raises_the_first_failing_calls_exception_when_reached(ex):
    """test_map_exception (the CPython 3.11-3.14 behaviour: the iterator ends there)."""
    results = ex.map(divmod, [5, 5, 5, 5], [2, 3, 0, 5])
    assert next(results) == (2, 1)
    assert next(results) == (1, 2)
    with pytest.raises(ZeroDivisionError) as info:
        next(results)
    assert type(info.value.__cause__) is RemoteTraceback
    with pytest.raises(StopIteration):
        next(results)


def test_map_timeout_raises_timeout_error(ex, gate):
    """test_map_timeout: the timeout counts from the map() call; the iterator then ends.
    Calls return with their batch, so the two quick calls may come back late or not at all."""
    results = ex.map(fx.gated, [0, 1, 2], [None, None, gate.path], timeout=0.5)
    got = []
    start = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        got.extend(results)
    assert time.monotonic() - start >= 0.45
    assert info.value.__cause__ is None  # map()'s own, not a call's
    assert got in ([0, 1], [0], [])
    with pytest.raises(StopIteration):
        next(results)


def test_a_timeout_error_raised_by_a_call_is_not_the_maps_timeout(ex):
    """test_map_timeout_from_callable"""
    for timeout in (None, 30):
        results = ex.map(fx.timeout_on_one, [0, 1, 2, 3], timeout=timeout)
        assert next(results) == 0
        with pytest.raises(TimeoutError, match="the call's own") as info:
            next(results)
        assert type(info.value.__cause__) is RemoteTraceback


def test_map_closed_by_the_consumer_ends(ex):
    """test_map_close"""
    results = ex.map(divmod, [5, 5, 5, 5], [2, 0, 3, 5])
    assert next(results) == (2, 1)
    results.close()
    with pytest.raises(StopIteration):
        next(results)


def test_map_keeps_no_reference_to_a_result_it_yielded(ex):
    """test_free_reference (CPython issue #14406)"""
    for obj in ex.map(fx.make_thing, range(10)):
        ref = weakref.ref(obj)
        del obj
        gc.collect()
        assert ref() is None


def test_map_buffersize_is_checked(ex):
    """test_map_buffersize_type_validation, test_map_buffersize_value_validation"""
    for buffersize in ("foo", 2.0):
        with pytest.raises(TypeError, match="buffersize must be an integer or None"):
            ex.map(str, range(4), buffersize=buffersize)
    for buffersize in (0, -1):
        with pytest.raises(ValueError, match="buffersize must be None or > 0"):
            ex.map(str, range(4), buffersize=buffersize)


@pytest.mark.parametrize("buffersize", [1, 2, 4, 8])
def test_map_with_buffersize_yields_every_result(ex, buffersize):
    """test_map_buffersize, test_map_buffersize_on_multiple_iterables,
    test_map_buffersize_on_empty_iterable, test_map_buffersize_without_iterable"""
    assert list(ex.map(str, range(4), buffersize=buffersize)) == ["0", "1", "2", "3"]
    assert list(ex.map(add, range(4), range(4), buffersize=buffersize)) == [0, 2, 4, 6]
    assert list(ex.map(str, range(100), buffersize=buffersize)) == [
        str(i) for i in range(100)]
    assert list(ex.map(str, [], buffersize=buffersize)) == []
    assert list(ex.map(str, buffersize=buffersize)) == []


class Counted:
    """An endless iterable that counts the items taken from it."""

    def __init__(self):
        self.taken = 0

    def __iter__(self):
        while True:
            self.taken += 1
            yield self.taken - 1


@pytest.mark.parametrize("buffersize", [1, 8])
def test_map_buffersize_keeps_an_endless_iterable_bounded(ex, buffersize):
    """test_map_buffersize_on_infinite_iterable, ..._on_multiple_infinite_iterables: at most
    buffersize calls scheduled whose results were not yet yielded."""
    counted = Counted()
    results = ex.map(str, counted, buffersize=buffersize)
    n = 50
    assert [next(results) for _ in range(n)] == [str(i) for i in range(n)]
    assert counted.taken <= n + buffersize
    ex.shutdown()  # joins the feeder: it takes no more once the executor is shut down
    assert counted.taken <= n + buffersize


def test_map_buffersize_takes_no_more_than_the_buffer_from_the_input(ex):
    """test_map_buffersize_when_buffer_is_full"""
    ints = iter(range(4))
    ex.map(str, ints, buffersize=2)
    ex.shutdown(wait=True)
    assert next(ints) == 2


def test_a_buffersize_map_cut_short_by_shutdown_raises_runtime_error(ex):
    """ProcessPoolExecutor's buffersize map() submits its next call as a result is taken, and
    raises RuntimeError once the executor is shut down; so does this one."""
    results = ex.map(str, range(100), buffersize=2)
    assert next(results) == "0"
    ex.shutdown()
    assert list(itertools.islice(results, 2)) == ["1", "2"]
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        next(results)


def test_map_raises_what_the_input_raises_after_the_calls_before_it(ex):
    def numbers():
        yield from range(5)
        raise LookupError("the input broke")

    results = ex.map(fx.identity, numbers())
    assert [next(results) for _ in range(5)] == [0, 1, 2, 3, 4]
    with pytest.raises(LookupError, match="the input broke"):
        next(results)


def test_map_fails_at_an_argument_that_does_not_pickle(ex):
    results = ex.map(fx.identity, [1, 2, threading.Lock(), 4])
    assert [next(results), next(results)] == [1, 2]
    with pytest.raises(mpbatch.SerializationError):
        next(results)


def test_map_results_outlive_the_with_block(make):
    """test_context_manager_shutdown, test_shutdown_race_issue12456: shutdown() waits for
    every call of a map (ProcessPoolExecutor's map() submits them all before it returns)."""
    with make(2) as ex:
        results = ex.map(abs, range(-50_000, 50_000))
        ex.map(str, [2] * 3)  # dropped unread: its calls still run
    assert list(results) == [abs(i) for i in range(-50_000, 50_000)]
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(pow, 2, 2)


# -- as_completed and wait -------------------------------------------------------------------

def test_as_completed_yields_every_future(ex):
    """test_no_timeout"""
    done = [finished_future(state="cancelled-and-notified"),
            finished_future(exception=OSError()), finished_future(42)]
    calls = [ex.submit(fx.mul, 2, 21), ex.submit(fx.mul, 7, 6)]
    assert set(futures.as_completed(done + calls, timeout=30)) == set(done + calls)
    assert [f.result() for f in calls] == [42, 42]


def test_as_completed_times_out_on_a_running_call(ex, gate):
    """test_future_times_out, test_correct_timeout_exception_msg"""
    done = {finished_future(state="cancelled-and-notified"),
            finished_future(exception=OSError()), finished_future(42)}
    running = gate.submit(ex)
    gate.started()
    for timeout in (0, 0.1):
        seen = set()
        with pytest.raises(TimeoutError, match=r"1 \(of 4\) futures unfinished"):
            seen.update(futures.as_completed(done | {running}, timeout))
        assert seen == done


def test_as_completed_yields_a_duplicate_future_once(ex):
    """test_duplicate_futures (CPython issue 20367)"""
    fut = ex.submit(pow, 2, 2)
    assert list(futures.as_completed(itertools.repeat(fut, 3), timeout=30)) == [fut]


@pytest.mark.timeout(120)
def test_as_completed_over_100000_futures(ex):
    fs = [ex.submit(abs, -i) for i in range(100_000)]
    seen = 0
    total = 0
    for f in futures.as_completed(fs, timeout=110):
        seen += 1
        total += f.result()
    assert (seen, total) == (100_000, sum(range(100_000)))


def test_wait_first_completed(ex, gate):
    """test_first_completed, test_first_completed_some_already_completed"""
    cancelled = finished_future(state="cancelled")
    running = gate.submit(ex)
    gate.started()  # its batch runs: a call submitted now goes to the other worker
    quick = ex.submit(fx.mul, 21, 2)
    done, not_done = futures.wait([cancelled, quick, running], timeout=30,
                                  return_when=futures.FIRST_COMPLETED)
    assert (done, not_done) == ({quick}, {cancelled, running})
    notified, succeeded = finished_future(state="cancelled-and-notified"), finished_future(42)
    done, not_done = futures.wait([notified, succeeded, running], timeout=30,
                                  return_when=futures.FIRST_COMPLETED)
    assert (done, not_done) == ({notified, succeeded}, {running})


def test_wait_first_exception(ex, gate):
    """test_first_exception_some_already_complete, test_first_exception_one_already_failed"""
    succeeded, failed = finished_future(42), finished_future(exception=OSError())
    cancelled = finished_future(state="cancelled")
    notified = finished_future(state="cancelled-and-notified")
    running = gate.submit(ex)
    gate.started()
    raising = ex.submit(divmod, 21, 0)
    done, not_done = futures.wait([succeeded, cancelled, notified, raising, running],
                                  timeout=30, return_when=futures.FIRST_EXCEPTION)
    assert (done, not_done) == ({succeeded, notified, raising}, {cancelled, running})
    done, not_done = futures.wait([failed, running], timeout=30,
                                  return_when=futures.FIRST_EXCEPTION)
    assert (done, not_done) == ({failed}, {running})


def test_wait_all_completed(ex):
    """test_all_completed, test_20369 (a future given twice)"""
    given = [finished_future(42), finished_future(state="cancelled-and-notified"),
             finished_future(exception=OSError())]
    raising, quick = ex.submit(divmod, 2, 0), ex.submit(fx.mul, 2, 21)
    done, not_done = futures.wait([*given, raising, quick, quick], timeout=30,
                                  return_when=futures.ALL_COMPLETED)
    assert (done, not_done) == ({*given, raising, quick}, set())


def test_wait_times_out_on_a_running_call(ex, gate):
    """test_timeout"""
    given = {finished_future(42), finished_future(state="cancelled-and-notified"),
             finished_future(exception=OSError())}
    running = gate.submit(ex)
    gate.started()
    done, not_done = futures.wait(given | {running}, timeout=0.05,
                                  return_when=futures.ALL_COMPLETED)
    assert (done, not_done) == (given, {running})


# -- cancel and callbacks ----------------------------------------------------------------------

def test_cancel_a_call_not_started(make, gate):
    """test_cancel for a pending future, on the executor's own futures: cancelled, done,
    its callbacks run, and wait() and as_completed() see it."""
    ex = make(1)
    running = gate.submit(ex, "ran")
    gate.started()  # the only worker is busy
    fut = ex.submit(pow, 2, 5)
    seen = []
    fut.add_done_callback(seen.append)
    assert fut.cancel()
    assert fut.cancel()  # again: still True
    assert fut.cancelled() and fut.done() and not fut.running()
    assert seen == [fut]
    with pytest.raises(CancelledError):
        fut.result(timeout=0)
    with pytest.raises(CancelledError):
        fut.exception(timeout=0)
    assert futures.wait([fut], timeout=10) == ({fut}, set())
    assert list(futures.as_completed([fut], timeout=10)) == [fut]
    gate.open()
    assert running.result(timeout=30) == "ran"
    assert ex.submit(pow, 2, 3).result(timeout=30) == 8
    assert fut.cancelled()  # its result, if the call ran, did not change that


def test_wait_returns_for_a_call_cancelled_while_it_waits(make, gate):
    """A cancel() in another thread wakes wait() and as_completed() (they are told by the
    executor in ProcessPoolExecutor). size=2 and interval=60, as below: the call stays in
    the caller until cancel(), however long the two threads take to start (with the
    default 2 ms interval, a loaded machine let it leave first, and cancel() failed)."""
    ex = make(1, interval=60, size=2)
    gate.submit(ex)
    mate = ex.submit(pow, 2, 3)
    gate.started()
    fut = ex.submit(pow, 2, 5)
    waited = []
    waiter = threading.Thread(target=lambda: waited.append(futures.wait([fut], timeout=30)))
    completed = []
    as_completed = threading.Thread(
        target=lambda: completed.extend(futures.as_completed([fut], timeout=30)))
    waiter.start()
    as_completed.start()
    assert fut.cancel()  # before or after they begin to wait: either way they must return
    waiter.join(30)
    as_completed.join(30)
    assert waited == [({fut}, set())] and completed == [fut]
    gate.open()
    assert mate.result(timeout=30) == 8


def test_a_cancelled_call_never_runs(make, gate, tmp_path):
    """ProcessPoolExecutor never runs a call whose future cancel() returned True for: here a
    call is running (cancel() fails) once it leaves the caller, as a ProcessPoolExecutor call
    is once it reaches the call queue. size=2 and interval=60: the gated call and its mate
    leave as a full batch; the next call stays in the caller until the end."""
    ex = make(1, interval=60, size=2)
    running = gate.submit(ex)
    mate = ex.submit(pow, 2, 3)
    gate.started()
    marker = tmp_path / "ran"
    fut = ex.submit(fx.touch, str(marker))
    assert not fut.running()
    assert fut.cancel() and fut.cancelled()
    gate.open()
    running.result(timeout=30)
    assert mate.result(timeout=30) == 8
    ex.shutdown()
    assert not marker.exists()
    assert ex._batcher.stats().cancelled == 1


def test_a_running_call_cannot_be_cancelled(make, gate):
    """test_cancel for a running future: cancel() returns False, the result arrives."""
    ex = make(1)
    fut = gate.submit(ex, "ran")
    gate.started()
    assert fut.running()
    assert not fut.cancel()
    gate.open()
    assert fut.result(timeout=30) == "ran"


def test_done_callbacks_get_the_outcome(ex):
    """test_done_callback_with_result, _with_exception, _already_successful,
    _already_failed"""
    got = []
    ok, failing = ex.submit(pow, 2, 5), ex.submit(divmod, 1, 0)
    ok.add_done_callback(lambda f: got.append(("ok", f.result())))
    failing.add_done_callback(lambda f: got.append(("failed", type(f.exception()))))
    futures.wait([ok, failing], timeout=30)
    ok.add_done_callback(lambda f: got.append(("late", f.result())))  # runs at once
    assert sorted(got) == [("failed", ZeroDivisionError), ("late", 32), ("ok", 32)]


def test_a_done_callback_that_raises_is_logged_and_the_next_runs(ex, caplog):
    """test_done_callback_raises"""
    ran = threading.Event()

    def raising(f):
        raise Exception("doh!")

    fut = ex.submit(pow, 2, 5)
    fut.add_done_callback(raising)
    fut.add_done_callback(lambda f: ran.set())
    assert fut.result(timeout=30) == 32
    assert ran.wait(30)  # callbacks run in turn, after the result is set
    assert any("exception calling callback for" in r.getMessage()
               and str(r.exc_info[1]) == "doh!"
               for r in caplog.records if r.name == "concurrent.futures")


# -- shutdown ------------------------------------------------------------------------------

def test_the_context_manager_shuts_down(make):
    """test_context_manager_shutdown"""
    with make(2) as ex:
        assert list(ex.map(abs, range(-5, 5))) == [5, 4, 3, 2, 1, 0, 1, 2, 3, 4]
        pid = ex.submit(fx.pid).result(timeout=30)
        worker = psutil.Process(pid)
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(pow, 2, 2)
    assert not worker.is_running()  # shutdown() returned after the workers exited


def test_shutdown_waits_for_every_call(make):
    """test_hang_issue12364, test_max_tasks_early_shutdown"""
    ex = make(2)
    fs = [ex.submit(fx.mul, i, i) for i in range(50)]
    ex.shutdown()
    assert [f.result(timeout=0) for f in fs] == [i * i for i in range(50)]


def test_shutdown_without_wait_returns_at_once(make, gate):
    """test_shutdown_no_wait: shutdown(wait=False) returns while a call runs; the call
    finishes and the workers exit on their own."""
    ex = make(2)
    fut = gate.submit(ex, "finished")
    worker = psutil.Process(gate.started())
    ex.shutdown(wait=False)
    assert not fut.done()  # shutdown() did not wait for it
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(pow, 2, 2)
    gate.open()
    assert fut.result(timeout=30) == "finished"
    worker.wait(timeout=30)


def test_shutdown_cancel_futures_cancels_calls_not_started(make, gate):
    """test_cancel_futures: with one worker busy, every queued call is cancelled."""
    ex = make(1)
    running = gate.submit(ex, "ran")
    gate.started()
    queued = [ex.submit(fx.mul, i, 2) for i in range(50)]
    ex.shutdown(wait=False, cancel_futures=True)
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(pow, 2, 2)
    gate.open()
    assert not futures.wait([*queued, running], timeout=30).not_done
    assert running.result() == "ran"
    assert all(f.cancelled() for f in queued)


def test_shutdown_cancel_futures_cancels_a_maps_calls(make, gate):
    ex = make(1)
    gate.submit(ex)
    gate.started()
    results = ex.map(fx.mul, range(50), range(50))
    ex.shutdown(wait=False, cancel_futures=True)
    gate.open()
    with pytest.raises(CancelledError):
        list(results)


def test_shutdown_after_a_cancelled_call_does_not_hang(make):
    """test_hang_gh94440"""
    ex = make(1)
    assert ex.submit(int).result(timeout=30) == 0
    ex.submit(int).cancel()
    ex.shutdown(wait=True)


def test_shutdown_waits_for_a_call_that_crashes_after_it_began(make):
    """test_shutdown_deadlock: a worker dying during shutdown() fails its call, no hang."""
    ex = make(2)
    fut = ex.submit(fx.square_unless, 3, exit_on=3)
    ex.shutdown(wait=True)
    with pytest.raises(BrokenProcessPool):
        fut.result(timeout=0)


def test_an_executor_dropped_without_shutdown_stops_its_workers():
    """test_del_shutdown: its map's results are all there, and its workers exit once the
    executor is garbage collected (the map's iterator keeps it alive until then)."""
    ex = Executor(2)
    worker = psutil.Process(ex.submit(fx.pid).result(timeout=30))
    results = ex.map(abs, range(-5, 5))
    del ex
    assert list(results) == [5, 4, 3, 2, 1, 0, 1, 2, 3, 4]
    del results
    gc.collect()
    worker.wait(timeout=30)
    # the close runs in a thread of its own, and frees shared memory after the joins
    for thread in threading.enumerate():
        if thread.name == "mpbatch-executor-shutdown":
            thread.join(timeout=30)
            assert not thread.is_alive(), "the dropped executor's close did not end"


@pytest.mark.timeout(60)
def test_a_forked_child_dropping_its_copy_leaves_the_parents_executor_alone():
    """A child made by os.fork() that lets go of its copy of an executor (garbage
    collected there) must not close it: it would stop the parent's workers."""
    ex = Executor(2)
    try:
        workers = {ex.submit(fx.pid).result(timeout=30) for _ in range(4)}
        pid = os.fork()
        if pid == 0:  # the child: drop it, and wait for any close that starts
            code = 0
            try:
                del ex
                gc.collect()
                for thread in threading.enumerate():
                    if thread.name == "mpbatch-executor-shutdown":
                        code = 1
                        thread.join(timeout=20)
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "the child closed the executor"
        assert list(ex.map(abs, range(-5, 5))) == [5, 4, 3, 2, 1, 0, 1, 2, 3, 4]
        assert all(psutil.pid_exists(w) for w in workers)
        assert ex._batcher.stats().worker_restarts == 0
    finally:
        ex.shutdown()


SCRIPT_ENDINGS = {  # test_interpreter_shutdown, test_hang_gh83386
    "no-shutdown": "",
    "shutdown-without-wait": "t.shutdown(wait=False)",
}


@pytest.mark.parametrize("ending", SCRIPT_ENDINGS.values(), ids=SCRIPT_ENDINGS.keys())
def test_calls_still_running_at_interpreter_exit_finish(ending):
    """The atexit hook waits for them (ProcessPoolExecutor hangs in the second case,
    CPython issue gh-83386)."""
    script = textwrap.dedent(f"""
        from mpbatch import Executor
        from tests.fns_executor import sleep_and_print
        if __name__ == "__main__":
            t = Executor(3)
            t.submit(sleep_and_print, 0.2, "apple")
            {ending}
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, timeout=50)
    assert (out.returncode, out.stdout.strip(), out.stderr) == (0, "apple", "")


def test_submit_after_interpreter_exit_raises_runtime_error():
    """test_submit_after_interpreter_shutdown"""
    script = textwrap.dedent("""
        import atexit
        @atexit.register
        def run_last():
            try:
                t.submit(id, None)
            except RuntimeError:
                print("runtime-error")
                raise
        from mpbatch import Executor
        if __name__ == "__main__":
            t = Executor(2)
            t.submit(id, 42).result()
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, timeout=50)
    assert "RuntimeError: cannot schedule new futures" in out.stderr
    assert out.stdout.strip() == "runtime-error"


# -- initializer, max_tasks_per_child ------------------------------------------------------------

def test_initializer_state_is_visible_to_calls(make, start_method):
    """test_initializer"""
    ex = make(2, initializer=fx.init, initargs=("initialized",), start_method=start_method)
    assert [f.result(timeout=30) for f in [ex.submit(fx.get_init_status)
                                            for _ in range(10)]] == ["initialized"] * 10
    assert list(ex.map(fx.identity, range(5))) == list(range(5))


def test_a_failing_initializer_is_logged_and_breaks_the_executor(make, tmp_path):
    """FailingInitializerMixin.test_initializer: logged on the concurrent.futures logger
    in the worker; the pending calls fail and later ones are refused, BrokenProcessPool."""
    log = tmp_path / "worker.log"
    ex = make(2, initializer=fx.init_fail, initargs=(str(log),))
    try:
        fut = ex.submit(fx.get_init_status)
    except BrokenProcessPool:
        pass  # broken already
    else:
        with pytest.raises(BrokenProcessPool) as info:
            fut.result(timeout=30)
        assert isinstance(info.value, mpbatch.WorkerDied)
        assert "init() raised ValueError: error in initializer" in str(info.value)
    with pytest.raises(BrokenProcessPool):
        ex.submit(fx.get_init_status)
    with pytest.raises(BrokenProcessPool):
        ex.map(fx.identity, [1])
    text = log.read_text()
    assert "Exception in initializer:" in text and "ValueError: error in initializer" in text


def test_max_tasks_per_child_replaces_workers(make):
    """test_max_tasks_per_child, test_max_tasks_per_child_pending_tasks_gh115634. No
    worker runs more than max_tasks_per_child calls; here a worker is replaced after
    each batch, so calls submitted one at a time each get a new one (in CPython a worker
    runs up to max_tasks_per_child of them)."""
    ex = make(1, max_tasks_per_child=2)
    pids = [ex.submit(fx.pid).result(timeout=30) for _ in range(4)]
    assert max(Counter(pids).values()) <= 2 and len(set(pids)) >= 2
    pids = list(ex.map(fx.pid, range(20)))
    assert max(Counter(pids).values()) <= 2 and len(set(pids)) >= 10
    futs = [ex.submit(fx.mul, i, 2) for i in range(6)]
    assert [f.result(timeout=30) for f in futs] == [i * 2 for i in range(6)]


def test_max_tasks_per_child_is_refused_with_fork():
    """test_max_tasks_per_child with the fork context"""
    with pytest.raises(ValueError, match="incompatible with the 'fork' start method"):
        Executor(1, max_tasks_per_child=3, start_method="fork")
    with pytest.raises(ValueError, match="incompatible with the 'fork' start method"):
        Executor(1, mp_context=multiprocessing.get_context("fork"), max_tasks_per_child=3)


# -- every call fails alone, under every start method -------------------------------------------

def test_a_call_that_raises_fails_alone(make, start_method):
    ex = make(2, start_method=start_method)
    fs = [ex.submit(fx.square_unless, i, raise_on=37) for i in range(100)]
    with pytest.raises(ValueError, match="bad value 37") as info:
        fs[37].result(timeout=60)
    assert "square_unless" in info.value.__cause__.tb
    assert [f.result(timeout=60) for i, f in enumerate(fs) if i != 37] == [
        i * i for i in range(100) if i != 37]


DEATHS = {  # way to die -> (square_unless option, text of the error)
    "os-exit": ("exit_on", r"exited \(exit code 7\)"),
    "sigkill": ("kill_on", "was killed by SIGKILL"),
    "segfault": ("segv_on", "was killed by SIGSEGV"),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("death", DEATHS.keys())
def test_a_call_that_kills_its_worker_fails_alone(make, start_method, death):
    """test_killed_child, test_crash_during_func_exec_on_worker, done the mpbatch way: only
    the call that killed its worker fails (found by poison isolation among 200 in flight);
    the executor goes on."""
    option, text = DEATHS[death]
    ex = make(2, start_method=start_method)
    fs = [ex.submit(fx.square_unless, i, **{option: 57}) for i in range(200)]
    with pytest.raises(BrokenProcessPool, match=text) as info:
        fs[57].result(timeout=60)
    assert isinstance(info.value, mpbatch.WorkerDied) and type(info.value) is WorkerCrashed
    assert [f.result(timeout=60) for i, f in enumerate(fs) if i != 57] == [
        i * i for i in range(200) if i != 57]
    assert ex.submit(pow, 2, 3).result(timeout=60) == 8
    assert list(ex.map(fx.square_unless, range(5))) == [0, 1, 4, 9, 16]


def test_a_map_call_that_kills_its_worker_fails_alone(make):
    """test_crash_big_data, by map(): the map raises at the call that killed its worker."""
    ex = make(2)
    data = "a" * (1 << 20)
    results = ex.map(fx.square_unless, [1, 2, data, 3], [None, None, data, None])
    assert [next(results), next(results)] == [1, 4]
    with pytest.raises(WorkerCrashed, match="exit code 7"):
        next(results)
    assert list(ex.map(abs, range(-2, 3))) == [2, 1, 0, 1, 2]


def test_a_worker_killed_from_outside_fails_only_its_call(make, gate):
    """test_killed_child: ProcessPoolExecutor breaks; here the call that was running fails
    with WorkerCrashed and the executor goes on."""
    ex = make(2)
    fut = gate.submit(ex)
    os.kill(gate.started(), signal.SIGKILL)
    with pytest.raises(WorkerCrashed, match="SIGKILL"):
        fut.result(timeout=30)
    assert ex.submit(pow, 2, 8).result(timeout=30) == 256


@pytest.mark.timeout(120)
def test_a_call_that_hangs_fails_alone_with_call_timeout(make, start_method):
    ex = make(2, start_method=start_method, timeout=0.5)
    fs = [ex.submit(fx.square_unless, i, hang_on=2) for i in range(4)]
    with pytest.raises(CallTimeout, match=r"timeout=0\.5") as info:
        fs[2].result(timeout=60)
    assert isinstance(info.value, BrokenProcessPool) and isinstance(info.value, TimeoutError)
    assert isinstance(info.value, mpbatch.BatchTimeout)
    assert [fs[i].result(timeout=60) for i in (0, 1, 3)] == [0, 1, 9]
    assert ex.submit(pow, 2, 3).result(timeout=60) == 8

