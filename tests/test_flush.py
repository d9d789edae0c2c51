"""A batch starts on size, on max_bytes, on interval, and at once on flush()."""

import threading
import time

import pytest

import mpbatch
from tests import fns


def shapes(b, items):
    futs = [b.submit(k, v) for k, v in items]
    b.flush()
    return [f.result() for f in futs]


def test_size_flushes_full_batches_of_all_keys_together(batcher_factory, backend):
    b = batcher_factory(fns.batch_shape, size=10, interval=60, workers=1)
    futs = [b.submit(f"k{i % 3}", i) for i in range(30)]
    # Three full batches ran without flush() and without waiting out the 60 s interval.
    assert [f.result(timeout=10) for f in futs] == [(3, 10)] * 30


def test_values_of_a_key_arrive_in_add_order(batcher_factory, backend):
    b = batcher_factory(fns.with_pid, size=100, workers=1)
    futs = [b.submit(f"k{i % 3}", i) for i in range(300)]
    b.flush()
    assert [f.result()[1] for f in futs] == list(range(300))


def test_max_bytes_flushes_before_the_limit(batcher_factory, backend):
    b = batcher_factory(fns.batch_shape, size=1000, max_bytes=300, interval=60, workers=1)
    # Each value pickles to ~105 bytes: two fit under 300, a third would not.
    result = shapes(b, [("k", "x" * 100) for _ in range(6)])
    assert {n for _, n in result} == {2}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["add", "submit", "add_many"])
def test_a_batch_full_by_max_bytes_starts_at_once(batcher_factory, how):
    """Three 300-byte values fill max_bytes=1000 (a fourth would not fit): each such batch
    must reach its worker and start at once, not wait out interval=60 in the caller."""
    value = bytes(300)
    done = []
    three = threading.Event()

    def on_result(key, values, results):
        done.append(len(values))
        if len(done) == 6:
            three.set()

    b = batcher_factory(fns.nothing, size=1000, max_bytes=1000, interval=60, workers=1,
                        on_result=on_result)
    items = [("k", value) for _ in range(20)]
    if how == "add":
        for key, v in items:
            b.add(key, v)
    elif how == "submit":
        futs = [b.submit(key, v) for key, v in items]
    else:
        b.add_many(items)
    # 6 full batches of 3 items ran without flush(); 2 items wait for more (or interval).
    assert three.wait(15), f"full batches waited in the caller: {done}, {b.stats()}"
    assert done == [3] * 6
    assert b.stats().succeeded == 18
    b.flush()
    assert done == [3] * 6 + [2]
    if how == "submit":
        assert [f.result() for f in futs] == [None] * 20


def test_item_larger_than_max_bytes_is_refused(batcher_factory):
    b = batcher_factory(fns.double, max_bytes=100, workers=1)
    with pytest.raises(mpbatch.ItemTooLarge) as info:
        b.add("big", "x" * 500)
    assert "'big'" in str(info.value) and "max_bytes=100" in str(info.value)
    assert b.stats().accepted == 0
    b.add("small", "x")
    b.flush()
    assert b.stats().succeeded == 1


def test_interval_bounds_the_wait_of_a_lone_item(batcher_factory, backend):
    b = batcher_factory(fns.double, size=1000, interval=0.2, workers=2)
    b.submit("warm", 1).result(timeout=10)  # workers started
    started = time.monotonic()
    fut = b.submit("k", 1)
    assert fut.result(timeout=10) == 2
    waited = time.monotonic() - started
    assert waited < 0.2 + 0.3, waited  # the bound, plus scheduling slack on a loaded CI box


def test_flush_does_not_wait_out_the_interval(batcher_factory):
    b = batcher_factory(fns.double, size=1000, interval=60, workers=2)
    futs = [b.submit(f"k{i}", i) for i in range(5)]
    b.flush()  # would take 60 s if it waited for the interval
    assert all(f.done() for f in futs)
    assert [f.result() for f in futs] == [0, 2, 4, 6, 8]


def test_flush_waits_for_callbacks(batcher_factory, backend):
    done = []
    b = batcher_factory(fns.double, size=1000, interval=60,
                        on_result=lambda k, vs, rs: done.extend(vs))
    b.add_many((f"k{i % 7}", i) for i in range(500))
    b.flush()
    assert sorted(done) == list(range(500))


def test_flush_before_start_is_a_no_op():
    b = mpbatch.Batcher(fns.double)
    b.flush()
    assert b.stats().workers == 0
    b.close()


def test_add_many_from_a_slow_iterator_does_not_hold_items_back(batcher_factory):
    """Items that trickle in (one per 20 ms) are not held back past interval waiting for
    a block to fill (a 256-item first block once held them for 5 s)."""
    import threading

    got = {}
    done = threading.Event()

    def on_result(key, values, results):
        for v in values:
            got[v] = time.monotonic()
        if len(got) == 20:
            done.set()

    b = batcher_factory(fns.double, size=1, interval=0.2, on_result=on_result)
    offered = {}

    def trickle():
        for i in range(20):
            offered[i] = time.monotonic()
            yield ("k", i)
            threading.Event().wait(0.02)  # the producer's pace, not a synchronisation

    b.add_many(trickle())
    assert done.wait(20)
    lags = sorted(got[i] - offered[i] for i in range(20))
    assert lags[-1] < 0.2 + 0.15, lags  # interval, plus slack for a loaded machine


def test_one_item_already_due_does_not_make_the_next_block_wait():
    """A producer an item a millisecond, behind its own schedule once: that one quick pull
    must not double the block, or the next block's first item waits for the one after it.
    A run of quick pulls (a backlog) does grow it, and a fast iterator's ramps as before."""
    from mpbatch.bulk import Bulk

    budget, limit = 0.00025, 64  # interval=0.001, as W4 runs
    slow = Bulk(None, iter(()), None)
    slow._resize(0.001, 1, budget, limit)
    slow._resize(0.000005, 1, budget, limit)
    assert slow.block == 1
    for _ in range(5):
        slow._resize(0.000005, 1, budget, limit)
    assert 1 < slow.block < limit
    fast = Bulk(None, iter(()), None)
    sizes = []
    for _ in range(8):
        fast._resize(fast.block * 1e-6, fast.block, 0.0125, 4096)
        sizes.append(fast.block)
    assert sizes == [2, 4, 8, 16, 32, 64, 128, 256]


def test_an_interval_longer_than_epoll_can_wait(batcher_factory):
    """interval=60 days: the collector's wait for the open chunk's timer is over epoll's limit
    (2**31 - 1 ms); it must wait (in steps), not fail in a loop (no_collector_errors)."""
    b = batcher_factory(fns.double, size=10, workers=1, interval=60 * 86400)
    fut = b.submit("k", 1)
    assert b._collector._wait_seconds() <= 86_400
    b.flush()
    assert fut.result(timeout=10) == 2
