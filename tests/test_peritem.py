"""Per-item outcomes inside a batch: one call per item, and a failure costs only its item."""

import pytest

import mpbatch
from mpbatch.peritem import PerItem
from tests import fns


def test_a_raise_fails_only_its_item(batcher_factory, backend):
    seen = []
    b = batcher_factory(PerItem(fns.square_unless_bad), size=10, workers=2,
                        on_result=lambda k, vs, rs: seen.extend(zip(vs, rs, strict=True)))
    futs = {v: b.submit(f"k{v % 3}", v) for v in range(20)}
    b.flush()
    with pytest.raises(mpbatch.BatchFailed, match="square_unless_bad\\(\\) raised ValueError: "
                                                  "unlucky 13") as info:
        futs[13].result()
    assert "unlucky 13" in info.value.traceback  # the worker's traceback, as text
    assert {v: f.result() for v, f in futs.items() if v != 13} == {
        v: v * v for v in range(20) if v != 13}
    assert sorted(seen) == [(v, v * v) for v in range(20) if v != 13]  # on_result: the rest
    s = b.stats()
    assert (s.succeeded, s.dead_lettered, s.failed_attempts, s.pending) == (19, 1, 1, 0)
    (letter,) = b.dead_letters()
    assert letter.batch == {"k1": [13]} and letter.worker in (0, 1)


def test_a_failed_item_is_retried_alone(batcher_factory, tmp_path):
    b = batcher_factory(PerItem(fns.square_unless_bad), size=5, workers=1, max_attempts=3,
                        retry_backoff=0)
    futs = [b.submit("k", v) for v in (11, 12, 13, 14, 15)]
    b.flush()
    assert [f.exception() is None for f in futs] == [True, True, False, True, True]
    s = b.stats()
    assert (s.succeeded, s.dead_lettered, s.retries, s.failed_attempts) == (4, 1, 2, 3)
    assert b.dead_letters()[0].attempts == 3


def test_an_unpicklable_result_fails_only_its_item(batcher_factory):
    b = batcher_factory(PerItem(fns.square_unless_bad), size=4, workers=1)
    futs = [b.submit("k", v) for v in (2, "lock", 3, 4)]
    b.flush()
    assert [futs[i].result() for i in (0, 2, 3)] == [4, 9, 16]
    with pytest.raises(mpbatch.SerializationError, match="cannot be pickled"):
        futs[1].result()


def test_an_item_that_kills_its_worker_is_isolated(batcher_factory, start_method):
    b = batcher_factory(PerItem(fns.square_unless_bad), size=8, workers=2,
                        start_method=start_method, max_attempts=1)
    futs = {v: b.submit("k", v) for v in [1, 2, 3, -1, 4, 5, 6, 7]}
    b.flush()
    with pytest.raises(mpbatch.WorkerDied, match="exit code 9"):
        futs[-1].result()
    assert {v: f.result() for v, f in futs.items() if v != -1} == {
        v: v * v for v in [1, 2, 3, 4, 5, 6, 7]}
    s = b.stats()
    assert s.succeeded == 7 and s.dead_lettered == 1 and s.splits >= 1


def test_plain_add_reports_item_failures_too(batcher_factory):
    """No future and no on_result: results do not travel, but failures still do."""
    letters = []
    b = batcher_factory(PerItem(fns.square_unless_bad), size=10, workers=2,
                        on_dead_letter=letters.append)
    for v in range(30):
        b.add("k", v)
    b.flush()
    assert [letter.batch for letter in letters] == [{"k": [13]}]
    assert b.stats().succeeded == 29


def test_init_state_reaches_each_call(batcher_factory):
    b = batcher_factory(PerItem(fns.scaled), init=fns.init_state, size=3, workers=1)
    assert [b.submit("k", v).result(timeout=30) for v in (1, 2)] == [10, 20]
