"""Retries: attempts are counted, backoff applied, dead letters carry the last error."""

import time

import pytest

import mpbatch
from tests import fns


def test_raising_do_is_tried_max_attempts_times(batcher_factory, backend):
    letters = []
    b = batcher_factory(fns.raise_value_error, size=5, workers=2, max_attempts=3,
                        retry_backoff=0.01, on_dead_letter=letters.append)
    futs = [b.submit("k", i) for i in range(5)]
    b.flush()
    for f in futs:
        with pytest.raises(mpbatch.BatchFailed, match="do\\(\\) raised ValueError: bad batch of 5"):
            f.result()
    s = b.stats()
    assert s.retries == 2 * 5 and s.failed_attempts == 3 * 5
    assert (s.dead_lettered, s.pending, s.batches) == (5, 0, 3)
    (letter,) = letters
    assert letter.attempts == 3 and letter.batch == {"k": [0, 1, 2, 3, 4]}
    assert "Traceback" in letter.error.traceback and "ValueError" in letter.error.traceback
    assert isinstance(letter.error.__cause__, Exception)


def test_a_flaky_failure_succeeds_on_retry(batcher_factory, tmp_path, backend):
    b = batcher_factory(fns.once_then(str(tmp_path), fns.raise_value_error), size=4,
                        max_attempts=2, retry_backoff=0)
    futs = [b.submit("k", i) for i in range(8)]
    b.flush()
    assert [f.result() for f in futs] == [2 * i for i in range(8)]
    s = b.stats()
    assert s.retries == 4 and s.dead_lettered == 0 and s.succeeded == 8


def test_backoff_grows_between_attempts(batcher_factory):
    b = batcher_factory(fns.raise_value_error, size=1, workers=1, max_attempts=3,
                        retry_backoff=0.2)
    started = time.monotonic()
    fut = b.submit("k", 1)
    with pytest.raises(mpbatch.BatchFailed):
        fut.result(timeout=20)
    # Waits of 0.2 and 0.4 s, each jittered by x0.5-1.5: at least 0.3 s in all.
    assert time.monotonic() - started >= 0.3
