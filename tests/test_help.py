"""add_many() reads the results itself while its items come quickly (Collector.help).

Whichever thread reads them, every item gets one outcome; callbacks keep their rules (no
wait for room, no flush() inside one); a producer that stalls after a quick burst does not
hold the outcomes back; a slow one leaves them to the collector thread.
"""

import signal
import threading
import time

import pytest

from mpbatch import Closed
from tests import fns

pytestmark = pytest.mark.timeout(60)  # by a thread (pyproject.toml): no SIGALRM handler


def recorder():
    """on_result that keeps every value and the name of the thread that got it."""
    seen, threads, lock = [], [], threading.Lock()

    def on_result(key, values, results):
        assert results == [2 * v for v in values]
        with lock:
            seen.extend(values)
            threads.append(threading.current_thread().name)

    return seen, threads, on_result


def test_a_quick_add_many_records_outcomes_in_its_own_thread(batcher_factory, start_method):
    seen, threads, on_result = recorder()
    b = batcher_factory(fns.double, size=500, on_result=on_result, start_method=start_method)
    n = 200_000
    assert b.add_many((f"k{i % 7}", i) for i in range(n)) == n
    b.flush()
    assert sorted(seen) == list(range(n))  # each item exactly once
    assert threading.main_thread().name in threads  # read by add_many itself
    s = b.stats()
    assert s.accepted == s.succeeded == n and s.pending == 0


def test_a_slow_iterator_leaves_the_results_to_the_collector(batcher_factory):
    seen, threads, on_result = recorder()
    b = batcher_factory(fns.double, size=1, on_result=on_result)

    def trickle():  # items arriving at ~500/s, as from a queue
        for i in range(60):
            time.sleep(0.002)  # the producer's pace, not a wait for something
            yield "k", i

    b.add_many(trickle())
    b.flush()
    assert sorted(seen) == list(range(60))
    assert set(threads) == {"mpbatch-collector"}


def test_a_stalled_producer_does_not_hold_outcomes_back(batcher_factory, start_method):
    """After a quick burst the iterator waits for the outcomes of every item sent so far
    (the block it is pulling is not sent yet): add_many is stuck in the iterator, and only
    the collector can record them."""
    burst = 20_000
    seen, threads, record = recorder()

    # Nothing may make add_many wait (and hand the pipes back) just before the stall: no
    # pacer (round-robin), room for the whole burst (spawn workers start slowly)
    b = batcher_factory(fns.double, size=500, interval=0.05, on_result=record,
                        routing="round-robin", buffer=burst, start_method=start_method)

    def items():
        yield from ((f"k{i % 7}", i) for i in range(burst))
        sent = b.stats().accepted
        assert sent > burst // 2
        assert len(b._collector._helpers) == 1  # add_many reads them itself: it is away now
        deadline = time.monotonic() + 1  # the collector drains them within 20 ms
        while len(seen) < sent:  # a state to watch: no event to wait on in a generator
            assert time.monotonic() < deadline, f"{len(seen)} of {sent} outcomes came"
            time.sleep(0.001)
        yield "k0", burst

    assert b.add_many(items()) == burst + 1
    b.flush()
    assert sorted(seen) == list(range(burst + 1))
    assert "mpbatch-collector" in threads


def test_a_helper_that_never_leaves_is_forgotten(batcher_factory):
    """A second Ctrl-C in add_many()'s last bytecodes can skip its leave_helpers(): the
    collector forgets a helper it has not heard from for HELP_STALE_NS, and watches the
    result pipes again; the late or repeated leave that may follow changes nothing."""
    from mpbatch.collector import HELP_STALE_NS

    seen, threads, record = recorder()
    b = batcher_factory(fns.double, size=10, interval=0.01, on_result=record)
    b.start()
    c = b._collector
    c.join_helpers(1)  # a call that will never leave
    c.leave_helpers(2)  # nor does a call that never joined count
    assert c._helpers == {1}
    deadline = time.monotonic() + HELP_STALE_NS / 1e9 + 2
    while c._helpers or not c._watching:  # a state to watch: the collector sets no event
        assert time.monotonic() < deadline, "the helper that never left is still counted"
        time.sleep(0.01)
    c.leave_helpers(1)
    c.leave_helpers(1)
    assert not c._helpers
    for i in range(100):
        b.add(f"k{i % 3}", i)
    b.flush()
    assert sorted(seen) == list(range(100))
    assert set(threads) == {"mpbatch-collector"}


def test_add_many_stops_helping_once_reports_come_one_item_per_key(batcher_factory):
    """Rebuilding large batches of one item per key on the feeding thread cost DK 5-7 %:
    once such a report comes, this add_many() leaves the rest to the collector; a stream of
    few keys (whose last batch may hold one item per key, but few) helps throughout."""
    from mpbatch.bulk import Bulk

    results = []
    b = batcher_factory(fns.double, size=500, on_batch=lambda batch, res: results.append(
        len(res)))
    b.start()
    calls = {}
    for stream, pairs in (("distinct", ((f"k{i}", i) for i in range(50_000))),
                          ("few", ((f"k{i % 7}", i) for i in range(50_000)))):
        calls[stream] = bulk = Bulk(b, pairs, None)
        assert bulk.run() == 50_000
        b.flush()
    assert b._collector.one_each > 0
    assert calls["distinct"].collector is None  # it stopped helping for the rest of the call
    assert calls["few"].collector is b._collector
    assert b.stats().succeeded == 100_000


def test_add_many_does_not_help_right_after_the_pacer_held_it_back(batcher_factory):
    """While the pacer holds add_many back, the workers set the pace: reports are read as
    they come by the collector, and add_many reads none for PACED_BLOCKS blocks after."""
    from mpbatch.bulk import PACED_BLOCKS, Bulk

    b = batcher_factory(fns.sleep_per_item, size=2, on_result=lambda *_: None)
    b.start()
    c = b._collector
    bulk = Bulk(b, ((f"k{i % 5}", i) for i in range(300)), None)
    since_paced = []  # at each help(): blocks sent since the pacer last held add_many back
    help_for_real = c.help

    def help(token):
        since_paced.append(bulk.sent_blocks - bulk.paced_at)
        help_for_real(token)

    c.help = help
    assert bulk.run() == 300
    b.flush()
    assert bulk.paced_at >= 0  # the pacer did hold it back (at 2 ms an item, ~10 a worker)
    assert since_paced  # it helped before that
    assert min(since_paced) > PACED_BLOCKS, since_paced
    assert b.stats().succeeded == 300


def test_callbacks_run_by_add_many_cannot_wait_for_themselves(batcher_factory):
    """Inside add_many's own reading, flush() and a wait for room would wait for the
    outcomes that this very thread is recording: they raise, as in the collector thread."""
    refused = []

    def on_result(key, values, results):
        if threading.current_thread() is not threading.main_thread() or refused:
            return
        for call in (b.flush, lambda: b.add_many(("x", i) for i in range(100_000))):
            try:
                call()
            except RuntimeError as exc:
                refused.append(str(exc))

    b = batcher_factory(fns.double, size=500, buffer=2000, on_result=on_result)
    n = 100_000
    b.add_many((f"k{i % 7}", i) for i in range(n))
    b.flush()
    assert len(refused) == 2, refused
    assert "flush() and close() cannot run inside on_result" in refused[0]
    assert "add_many() cannot wait for room" in refused[1]
    s = b.stats()
    assert s.accepted == s.succeeded and s.pending == 0


def test_close_from_another_thread_while_add_many_reads_results(batcher_factory):
    """close() retires the result pipes while add_many may be reading them: add_many ends
    with Closed, every accepted item has its outcome, and nothing is read after."""
    seen, _threads, record = recorder()
    helped = threading.Event()

    def on_result(key, values, results):
        record(key, values, results)
        if threading.current_thread().name == "adder":
            helped.set()

    b = batcher_factory(fns.double, size=500, on_result=on_result)

    def items():
        for i in range(10**9):
            yield f"k{i % 7}", i

    ended = []

    def add():
        try:
            b.add_many(items())
        except Closed as exc:
            ended.append(exc)

    adder = threading.Thread(target=add, name="adder")
    adder.start()
    assert helped.wait(30)  # add_many is recording outcomes itself
    b.close(timeout=20)
    recorded = len(seen)
    adder.join(30)
    assert not adder.is_alive() and ended
    assert len(seen) == recorded  # no outcome recorded after close() returned
    s = b.stats()
    assert s.pending == 0 and s.accepted == s.succeeded + s.dead_lettered
    assert len(seen) == s.succeeded  # one outcome each, whoever recorded it


def test_a_worker_killed_while_add_many_reads_results_loses_nothing(batcher_factory,
                                                                    start_method):
    """A SIGKILL inside do() while add_many records outcomes itself: the collector handles
    the death (after the dead worker's last reports), the batch runs again, and every item
    ends with exactly one result."""
    seen, threads, on_result = recorder()
    n, bad = 100_000, 61_234
    b = batcher_factory(fns.kill_on(bad), size=500, max_attempts=2, on_result=on_result,
                        start_method=start_method)
    # (kill_on kills on every attempt: the culprit is isolated and dead-lettered alone)
    assert b.add_many((f"k{i % 7}", i) for i in range(n)) == n
    b.flush()
    s = b.stats()
    assert s.worker_restarts >= 1 and s.dead_lettered == 1 and s.pending == 0
    assert sorted(seen) == [i for i in range(n) if i != bad]
    assert threading.main_thread().name in threads
    [letter] = b.dead_letters()
    assert letter.batch == {f"k{bad % 7}": [bad]}


def test_no_help_in_a_main_thread_with_python_signal_handlers(batcher_factory):
    """A SIGTERM handler in Python could raise between taking reports and recording them:
    add_many leaves the results to the collector then."""
    seen, threads, on_result = recorder()
    old = signal.signal(signal.SIGTERM, lambda *args: None)
    try:
        b = batcher_factory(fns.double, size=500, on_result=on_result)
        assert b.add_many((f"k{i % 7}", i) for i in range(100_000)) == 100_000
        b.flush()
    finally:
        signal.signal(signal.SIGTERM, old)
    assert sorted(seen) == list(range(100_000))
    assert set(threads) == {"mpbatch-collector"}
