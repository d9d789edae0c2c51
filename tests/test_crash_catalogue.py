"""The crash catalogue: every way an item, do(), a result or an exception can misbehave.

In the spirit of ``crash_cases`` in loky's ``tests/test_reusable_executor.py``: one row per
misbehaviour, each run the same way. The culprit item shares its batch with innocent
"mates", two full batches are in flight ahead of it and two behind it (round-robin routing,
so one of them is queued on the culprit's worker), and more items come after the crash.
For each row: the culprit's future fails with the row's error and text; a mate either
succeeds or fails with the same error (poison-item isolation may save it); every item of
every other batch succeeds; the counters add up; the Batcher goes on working.

Items are chunked at ``size`` items (SIZE here) and every group below is a whole number of
chunks, so a chunk is exactly one batch and "the culprit's batch" is well defined; interval
(INTERVAL) is long next to the microseconds a group of submits takes, so no timer seals a
chunk early; flush() (never a sleep) ends each phase.
"""

import contextlib
import re
import threading

import pytest

import mpbatch
from tests import fns_catalogue as fc

SIZE = 4
MAX_ATTEMPTS = 2
INTERVAL = 2  # seconds; see the docstring, and the flush() test at the end
WAIT = 15  # seconds flush() may take before the test fails; a row passes in under 3
DEATHS = (mpbatch.WorkerDied, mpbatch.BatchTimeout)  # errors that cost a worker its life
CALLER_SIDE = {"result-unpickle-raises", "result-unpickle-sys-exit",
               "result-unpickle-interrupts"}  # no worker was at fault: DeadLetter.worker is None
EXIT = f"exited (exit code {fc.EXIT_CODE})"
C_EXIT = f"exited (exit code {fc.C_EXIT_CODE})"

ROWS = [  # (id, do, culprit value, error its future raises, text its message must contain,
    #      extra Batcher options)
    # An item whose unpickling in the worker misbehaves (do never sees it).
    ("item-unpickle-raises", fc.double_all, fc.poison_item("raise"), mpbatch.BatchFailed,
     "unpickling items in the worker raised RuntimeError: poison: item unpickled in a worker",
     {}),
    ("item-unpickle-exits", fc.double_all, fc.poison_item("exit"), mpbatch.WorkerDied, EXIT,
     {}),
    ("item-unpickle-segfault", fc.double_all, fc.poison_item("segv"), mpbatch.WorkerDied,
     "was killed by SIGSEGV", {}),
    # do() misbehaves on the batch that holds the culprit.
    ("do-raises", fc.CrashingDo("raise"), fc.BAD, mpbatch.BatchFailed,
     "do() raised RuntimeError: poison: do() got BAD", {}),
    ("do-exits", fc.CrashingDo("exit"), fc.BAD, mpbatch.WorkerDied, EXIT, {}),
    ("do-c-exit", fc.CrashingDo("c-exit"), fc.BAD, mpbatch.WorkerDied, C_EXIT, {}),
    ("do-segfault", fc.CrashingDo("segv"), fc.BAD, mpbatch.WorkerDied, "was killed by SIGSEGV",
     {}),
    ("do-hangs", fc.CrashingDo("hang"), fc.BAD, mpbatch.BatchTimeout, "timeout=0.5",
     {"timeout": 0.5}),
    # The culprit's result misbehaves when the worker pickles it.
    ("result-pickle-raises", fc.BadResultDo(fc.PicklesBadly, "raise"), fc.BAD,
     mpbatch.SerializationError,
     "a result of do() cannot be pickled, key 'bad': PicklesBadly (RuntimeError: poison: "
     "result pickled in the worker)", {}),
    ("result-pickle-exits", fc.BadResultDo(fc.PicklesBadly, "exit"), fc.BAD, mpbatch.WorkerDied,
     EXIT, {}),
    ("result-pickle-segfault", fc.BadResultDo(fc.PicklesBadly, "segv"), fc.BAD,
     mpbatch.WorkerDied, "was killed by SIGSEGV", {}),
    # The culprit's result pickles, and fails to unpickle in the caller.
    ("result-unpickle-raises", fc.BadResultDo(fc.poison_result, "raise"), fc.BAD,
     mpbatch.SerializationError,
     "cannot be unpickled in the caller (RuntimeError: poison: result unpickled in the caller)",
     {}),
    # Unpickling the result in the caller ends the thread that does it (the collector).
    ("result-unpickle-sys-exit", fc.BadResultDo(fc.poison_result, "sys-exit"), fc.BAD,
     mpbatch.SerializationError,
     "cannot be unpickled in the caller (SystemExit: poison: result unpickled in the caller)",
     {}),
    ("result-unpickle-interrupts", fc.BadResultDo(fc.poison_result, "interrupt"), fc.BAD,
     mpbatch.SerializationError, "cannot be unpickled in the caller (KeyboardInterrupt: "
     "poison: result unpickled in the caller)", {}),
    # do() raises an exception that cannot cross the pipe as itself.
    ("exception-unpicklable", fc.RaisingDo(fc.Unpicklable), fc.BAD, mpbatch.BatchFailed,
     "fns_catalogue.Unpicklable: holds a lock", {}),
    ("exception-str-raises", fc.RaisingDo(fc.BadStr), fc.BAD, mpbatch.BatchFailed,
     "fns_catalogue.BadStr", {}),
]
ROW_IDS = [row[0] for row in ROWS]
BY_ID = {row[0]: row for row in ROWS}


def make_batcher(factory, do, options, **more):
    settings = {"size": SIZE, "workers": 2, "routing": "round-robin", "interval": INTERVAL,
                "max_attempts": MAX_ATTEMPTS, "retry_backoff": 0}
    return factory(do, **{**settings, **options, **more})


def submit_good(b, first, batches):
    """``batches`` full batches of good items, values first, first+1, ...; (value, future)."""
    return [(v, b.submit(f"k{v % 3}", v)) for v in range(first, first + batches * SIZE)]


def flush_within(b, limit=WAIT):
    """b.flush(), but a hang fails the test with the counters instead of blocking the run."""

    def flush():
        with contextlib.suppress(mpbatch.Closed):  # the fixture closed b after a failure
            b.flush()

    thread = threading.Thread(target=flush, name="test-flush", daemon=True)
    thread.start()
    thread.join(limit)
    assert not thread.is_alive(), f"flush() had not returned after {limit}s: {b.stats()}"


def assert_all_succeed(pairs, label):
    failed = {v: repr(f.exception()) for v, f in pairs if f.exception() is not None}
    assert not failed, f"items {label} the culprit's batch failed: {failed}"
    assert [f.result() for _, f in pairs] == [2 * v for v, _ in pairs]


def run_row(b, row_id, bad, error, text):
    """Culprit among mates, good batches in flight around it, more after; check everything."""
    ahead = submit_good(b, 0, 2)
    mates = [(100, b.submit("mate", 100)), (101, b.submit("mate", 101))]
    culprit = b.submit("bad", bad)
    mates.append((103, b.submit("mate", 103)))
    behind = submit_good(b, 200, 2)
    flush_within(b)

    # The culprit fails with the row's error.
    with pytest.raises(error) as info:
        culprit.result()
    err = info.value
    assert text in str(err), f"{row_id}: {err!r}"
    # Its mates succeed (isolated) or share its fate; every other batch succeeds.
    failed_mates = []
    for v, fut in mates:
        exc = fut.exception()
        if exc is None:
            assert fut.result() == 2 * v
        else:
            assert type(exc) is type(err) and text in str(exc), f"mate {v}: {exc!r}"
            failed_mates.append(v)
    assert_all_succeed(ahead, "ahead of")
    assert_all_succeed(behind, "behind")

    # The Batcher is still usable: later items succeed.
    later = submit_good(b, 300, 2)
    flush_within(b)
    assert_all_succeed(later, "after")

    # Dead letters: exactly the failed items; the culprit's letter carries the same error.
    letters = b.dead_letters()
    lettered = [(k, v) for letter in letters for k, vs in letter.batch.items() for v in vs]
    assert sorted(lettered, key=repr) == sorted(
        [("bad", bad)] + [("mate", v) for v in failed_mates], key=repr)
    (home,) = [letter for letter in letters if bad in letter.batch.get("bad", [])]
    assert type(home.error) is type(err) and str(home.error) == str(err)
    assert home.attempts == MAX_ATTEMPTS  # it fails every time: tried until the last one
    for letter in letters:
        assert isinstance(letter.error, error)
        assert (letter.worker is None) == (row_id in CALLER_SIDE)

    # Guarantee 1: nothing lost, nothing pending.
    n = len(ahead) + len(mates) + 1 + len(behind) + len(later)
    b.close()
    s = b.stats()
    assert s.accepted == n == s.succeeded + s.dead_lettered + s.pending
    assert s.pending == 0
    assert s.dead_lettered == 1 + len(failed_mates)
    assert s.failed_attempts >= 1
    if issubclass(error, DEATHS):
        assert s.worker_restarts >= 1
    else:
        assert s.worker_restarts == 0  # a failure the worker survives keeps the worker


@pytest.mark.parametrize(("row_id", "do", "bad", "error", "text", "options"), ROWS,
                         ids=ROW_IDS)
def test_crash_catalogue(batcher_factory, row_id, do, bad, error, text, options):
    b = make_batcher(batcher_factory, do, options)
    run_row(b, row_id, bad, error, text)


@pytest.mark.parametrize("row_id", ["item-unpickle-raises", "do-segfault", "result-pickle-exits"])
def test_crash_catalogue_start_methods(batcher_factory, start_method, row_id):
    _, do, bad, error, text, options = BY_ID[row_id]
    b = make_batcher(batcher_factory, do, options, start_method=start_method)
    run_row(b, row_id, bad, error, text)


@pytest.mark.parametrize("row_id", ["do-segfault", "result-unpickle-raises",
                                    "item-unpickle-raises"])
def test_crash_without_futures_is_still_accounted(batcher_factory, row_id):
    """add() items (no futures): the outcome is still in dead_letters() and stats()."""
    _, do, bad, error, text, options = BY_ID[row_id]
    letters = []
    b = make_batcher(batcher_factory, do, options, on_dead_letter=letters.append)
    pairs = [(f"k{v % 3}", v) for v in range(8)]
    pairs += [("mate", 100), ("mate", 101), ("bad", bad), ("mate", 103)]
    pairs += [(f"k{v % 3}", v) for v in range(200, 208)]
    for key, value in pairs:
        b.add(key, value)
    flush_within(b)
    if row_id in CALLER_SIDE:
        # No future and no on_result: nobody receives results, so none cross the pipe and
        # one that could not be unpickled in the caller harms nothing.
        assert letters == [] and b.stats().succeeded == 20
        return
    assert letters == b.dead_letters()
    assert any(bad in letter.batch.get("bad", []) for letter in letters)
    for letter in letters:
        assert isinstance(letter.error, error) and text in str(letter.error)
        assert set(letter.batch) <= {"bad", "mate"}  # no item of another batch
    s = b.stats()
    assert s.accepted == 20 == s.succeeded + s.dead_lettered and s.pending == 0
    assert 1 <= s.dead_lettered <= SIZE


# -- user code the collector thread runs besides unpickling: each may raise SystemExit or
# KeyboardInterrupt there, and must cost only its own items, never the thread -------------

BASE_EXCEPTIONS = [("sys-exit", "SystemExit"), ("interrupt", "KeyboardInterrupt")]


@pytest.mark.parametrize(("how", "name"), BASE_EXCEPTIONS)
def test_a_retry_whose_value_fails_to_pickle_in_the_collector(batcher_factory, how, name):
    """The first attempt fails; the collector pickles the batch again for the retry, and
    the culprit's pickling raises there: it alone is dead-lettered, its mates retried."""
    b = make_batcher(batcher_factory, fc.CrashOnKey("raise", "bad"), {})
    ahead = submit_good(b, 0, 2)
    culprit = b.submit("bad", fc.PicklesOnTheMainThread(how))
    mates = [(v, b.submit("mate", v)) for v in (100, 101, 103)]
    flush_within(b)
    with pytest.raises(mpbatch.SerializationError,
                       match=f"no longer pickles.*{name}: poison: value pickled by the collector"):
        culprit.result()
    assert_all_succeed(ahead, "ahead of")
    assert_all_succeed(mates, "sharing")  # their retry went without the culprit
    later = submit_good(b, 300, 2)
    flush_within(b)
    assert_all_succeed(later, "after")
    b.close()
    s = b.stats()
    assert (s.accepted, s.succeeded, s.dead_lettered, s.pending) == (20, 19, 1, 0)


@pytest.mark.parametrize(("how", "name"), BASE_EXCEPTIONS)
def test_a_key_whose_repr_raises_in_a_death_message(batcher_factory, how, name):
    """A worker dies on a batch: the collector names its keys in WorkerDied; a repr() that
    raises there is named instead of ending the collector."""
    key = fc.TouchyKey("bad", how)
    b = make_batcher(batcher_factory, fc.CrashOnKey("exit", key), {}, isolate_poison=False)
    ahead = submit_good(b, 0, 2)
    culprit = b.submit(key, 1)
    mates = [(v, b.submit("mate", v)) for v in (100, 101, 103)]
    flush_within(b)
    with pytest.raises(mpbatch.WorkerDied, match=re.escape(EXIT)) as info:
        culprit.result()
    assert f"repr() raised {name}" in str(info.value)
    assert_all_succeed(ahead, "ahead of")
    assert all(isinstance(f.exception(), mpbatch.WorkerDied) for _, f in mates)
    b.close()
    s = b.stats()
    assert (s.accepted, s.dead_lettered, s.pending) == (12, 4, 0)


@pytest.mark.parametrize(("how", "name"), BASE_EXCEPTIONS)
def test_a_key_whose_repr_raises_while_on_result_fails(batcher_factory, how, name):
    """on_result raises for a key whose repr() raises too: the log line that names the key
    must not end the collector; the items still succeed."""
    key = fc.TouchyKey("k", how)

    def on_result(k, values, results):
        raise ValueError("on_result failed")

    b = make_batcher(batcher_factory, fc.double_all, {}, on_result=on_result)
    futs = [b.submit(key, v) for v in range(SIZE)]
    flush_within(b)
    assert [f.result() for f in futs] == [0, 2, 4, 6]
    assert b.stats().succeeded == SIZE


@pytest.mark.parametrize(("how", "name"), BASE_EXCEPTIONS)
def test_equal_keys_whose_comparison_raises_in_a_dead_letter(batcher_factory, how, name):
    """Two equal keys (distinct objects) meet when the collector groups a dead letter's
    items by key; an == that raises there must not lose them."""
    first, second = fc.TouchyKey("bad", how), fc.TouchyKey("bad", how)
    b = make_batcher(batcher_factory, fc.CrashOnKey("raise", first), {}, max_attempts=1)
    futs = [b.submit(first, 1), b.submit(second, 2), b.submit("mate", 3),
            b.submit("mate", 4)]
    flush_within(b)
    for fut in futs:
        assert isinstance(fut.exception(), mpbatch.BatchFailed)
    (letter,) = b.dead_letters()
    values = sorted(v for vs in letter.batch.values() for v in vs)
    assert values == [1, 2, 3, 4]
    b.close()
    s = b.stats()
    assert (s.accepted, s.dead_lettered, s.pending) == (4, 4, 0)


def test_keys_whose_comparison_raises_in_the_worker(batcher_factory):
    """Grouping by key runs the key's == in the worker: when it raises, the items held and
    the chunk fail like a batch whose do() raised, instead of ending the worker (which
    would re-send them, as only queued, to the next worker without end)."""
    b = make_batcher(batcher_factory, fc.double_all, {})
    ahead = submit_good(b, 0, 2)
    culprits = [b.submit(fc.ComparesBadlyInWorkers("bad"), v) for v in (1, 2)]
    for v in (100, 101):
        b.submit("mate", v)
    flush_within(b)
    for fut in culprits:
        with pytest.raises(mpbatch.BatchFailed, match="grouping items by key in the worker "
                           "raised RuntimeError: poison: key compared in a worker"):
            fut.result()
    assert_all_succeed(ahead, "ahead of")
    later = submit_good(b, 300, 2)
    flush_within(b)
    assert_all_succeed(later, "after")
    b.close()
    s = b.stats()
    assert s.accepted == 20 and s.pending == 0 and s.worker_restarts == 0
    assert s.succeeded + s.dead_lettered == 20 and 2 <= s.dead_lettered <= 4


def test_flush_does_not_wait_out_interval_for_items_queued_behind_a_crash(batcher_factory):
    """flush() sends every partial batch at once, also the one whose worker died under it.

    One chunk, [bad, mate, queued], sealed by flush(): the worker runs {bad, mate} (a full
    batch, size=2), and ``bad`` kills it; ``queued`` was only queued, so it is re-sent to
    the replacement, where it is a partial batch. flush() must not then wait out
    interval=30 for it.
    """
    b = batcher_factory(fc.CrashOnKey("exit", "bad"), size=2, workers=1, interval=30)
    culprit = b.submit("bad", 1)
    mate = b.submit("mate", 2)
    queued = b.submit("k", 5)
    flush_within(b, limit=5)
    with pytest.raises(mpbatch.WorkerDied, match=re.escape(EXIT)):
        culprit.result()
    assert mate.result() == 4 and queued.result() == 10
    s = b.stats()
    assert (s.succeeded, s.dead_lettered, s.pending) == (2, 1, 0)
    # ``queued`` at least; more when isolation's halves, sent to the one worker with it,
    # leave items queued behind ``bad`` again
    assert s.redelivered >= 1
