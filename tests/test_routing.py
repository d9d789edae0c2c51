"""Routing: key affinity keeps per-key order; least-loaded and round-robin spread the load."""

import os
import subprocess
import sys
import threading
import time

import pytest

import mpbatch
from mpbatch.costs import Costs
from mpbatch.counters import (
    B_END,
    B_START,
    BUSY_NS,
    DONE,
    GIVEN,
    HELD,
    SENT,
    WORK_NS,
    LoadCounters,
)
from mpbatch.dispatch import SPREAD_PACED_BATCHES, Pacer, Router, key_hash
from tests import fns, fns_catalogue


def pids_and_values(b, items):
    futs = [(k, b.submit(k, v)) for k, v in items]
    b.flush()
    return [(k, *f.result()) for k, f in futs]


def test_key_routing_pins_each_key_to_one_worker_in_order(batcher_factory, backend):
    b = batcher_factory(fns.with_pid, routing="key", size=7, workers=2)
    rows = pids_and_values(b, [(f"user:{i % 11}", i) for i in range(500)])
    by_key = {}
    for key, pid, value in rows:
        by_key.setdefault(key, []).append((pid, value))
    for key, seen in by_key.items():
        assert len({pid for pid, _ in seen}) == 1, key
        assert [v for _, v in seen] == sorted(v for _, v in seen), key
    assert len({pid for _, pid, _ in rows}) == 2  # both workers got keys


def test_key_routing_order_holds_across_many_batches_with_add_many(batcher_factory, backend):
    order = {}
    b = batcher_factory(fns.double, routing="key", size=5, workers=2,
                        on_result=lambda k, vs, rs: order.setdefault(k, []).extend(vs))
    b.add_many((f"k{i % 3}", i) for i in range(3000))
    b.flush()
    for k, vs in order.items():
        assert vs == sorted(vs), k
    assert sum(map(len, order.values())) == 3000


def test_key_hash_is_stable_across_processes_and_hash_seeds():
    keys = ["user:1", b"raw", 12345, ("tuple", 1)]
    code = ("from mpbatch.dispatch import key_hash;"
            f"print([key_hash(k) for k in {keys!r}])")
    outs = set()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        outs.add(subprocess.run([sys.executable, "-c", code], env=env, check=True,
                                capture_output=True, text=True).stdout)
    assert outs == {f"{[key_hash(k) for k in keys]}\n"}


def test_least_loaded_uses_every_worker(batcher_factory, backend):
    b = batcher_factory(fns.with_pid, routing="least-loaded", size=10, workers=2)
    rows = pids_and_values(b, [("same-key", i) for i in range(2000)])
    assert len({pid for _, pid, _ in rows}) == 2


def test_least_loaded_fills_one_batch_at_a_time(batcher_factory, backend):
    """Items sent one chunk at a time, each held by its worker before the next goes, join
    the batch being filled until it is full and runs, interval (60 s) or no interval.
    Were the held items counted as work queued ahead, the chunks would alternate between
    the two workers, each would hold half a batch, and neither would run for a minute."""
    got = []
    twenty = threading.Event()

    def on_result(key, values, results):
        got.extend(results)
        if len(got) == 20:
            twenty.set()

    b = batcher_factory(fns.with_pid, size=20, interval=60, workers=2, on_result=on_result)
    deadline = time.monotonic() + 30  # for the whole test, inside pytest's 60 s
    for i in range(20):
        assert b.add_many([("k", i)]) == 1  # one chunk
        if i < 19:  # the last one fills the batch: it runs, and HELD drops to 0
            _until(lambda n=i + 1: _held(b) == [n, 0], f"worker 0 to hold {i + 1} items",
                   deadline)
    assert twenty.wait(timeout=max(0.0, deadline - time.monotonic())), \
        f"{len(got)} results of 20"
    assert len({pid for pid, _ in got}) == 1  # one batch: all on worker 0
    assert sorted(v for _, v in got) == list(range(20))
    _until(lambda: _held(b) == [0, 0], "the batch, once run, to be held no more", deadline)


def test_a_part_batch_that_fails_to_group_is_held_no_more(batcher_factory):
    """Keys whose == raises in a worker fail the batch being filled with them: the worker
    holds nothing after, and routing must not see a part batch there to fill."""
    dead = []
    b = batcher_factory(fns.with_pid, size=100, interval=60, workers=2,
                        on_dead_letter=dead.append)
    deadline = time.monotonic() + 30
    items = [("k", i) for i in range(5)] + [(fns_catalogue.ComparesBadlyInWorkers("x"), 5)]
    for i, item in enumerate(items):  # one chunk each, each held before the next goes
        assert b.add_many([item]) == 1
        _until(lambda n=i + 1: _held(b) == [n, 0], f"worker 0 to hold {i + 1}", deadline)
    # An equal key joins them: the two meet, and compare, as it is grouped.
    assert b.add_many([(fns_catalogue.ComparesBadlyInWorkers("x"), 6)]) == 1
    _until(lambda: b.stats().dead_lettered == 7, "the 7 items held with it to fail",
           deadline)
    assert [sorted(map(len, d.batch.values())) for d in dead] == [[2, 5]]  # one batch
    _until(lambda: _held(b) == [0, 0], "nothing to be held", deadline)


def _held(b):
    return [b._counters.get(i, HELD) for i in range(2)]


def _until(check, what, deadline):
    """Wait for ``check()``, a state of another process read from shared memory, which
    signals no event: polled, failing the test at ``deadline`` (monotonic s)."""
    while not check():
        assert time.monotonic() < deadline, f"still waiting for {what}"
        time.sleep(0.002)


def test_least_loaded_avoids_a_busy_worker(batcher_factory, tmp_path):
    gate = tmp_path / "open"
    # Worker A holds one slow item (load 1). Each later item, sent when B is idle (load 0),
    # must go to B: were one routed to A, its result would wait for the gate and time out.
    b = batcher_factory(fns.wait_for_file(str(gate), "slow"), size=1, workers=2)
    first = b.submit("slow", 0)
    for i in range(1, 30):
        assert b.submit("k", i).result(timeout=10) == 2 * i
    assert not first.done()
    gate.touch()
    assert first.result(timeout=20) == 0


def test_round_robin_alternates_workers(batcher_factory):
    b = batcher_factory(fns.with_pid, routing="round-robin", size=10, workers=2)
    rows = pids_and_values(b, [("k", i) for i in range(200)])
    pids = [pid for _, pid, _ in rows]
    assert len(set(pids)) == 2
    assert abs(pids.count(pids[0]) - 100) <= 10


def test_add_many_queues_about_20ms_of_work_per_worker_not_buffer_items(batcher_factory,
                                                                        start_method):
    # Sending further ahead would pin items to a worker by count: a late run of costly
    # items could then not go to whichever worker frees up first (benchmarks' W3).
    b = batcher_factory(fns.sleep_per_item, size=5, workers=2, buffer=10_000,
                        start_method=start_method)
    accepted = b.add_many((f"k{i % 3}", i) for i in range(1000))  # ~1 s of work
    queued = b.stats().pending  # unpaced, nearly all 1000 would still be queued here
    b.flush()
    assert accepted == 1000 and b.stats().succeeded == 1000
    assert queued <= 100, queued  # 2 workers x (two batches, or 20 ms) + one block


@pytest.mark.parametrize("routing", ["affinity", "least-loaded"])
def test_paced_add_many_sends_blocks_of_half_a_batch_or_more(batcher_factory, monkeypatch,
                                                             routing):
    """A paced add_many waits for half a batch of allowance before it pulls a block: under
    "affinity" a block spreads over keys' homes, and sending whatever was allowed made ever
    smaller blocks (1-4 items here), each a pickle, a frame and a write of its own."""
    from mpbatch.bulk import Bulk
    sizes = []
    send = Bulk._send

    def recording(self, keys, values, *args, **kwargs):
        sizes.append(len(keys))
        return send(self, keys, values, *args, **kwargs)

    monkeypatch.setattr(Bulk, "_send", recording)
    b = batcher_factory(fns.sleep_per_item, size=10, workers=2, routing=routing)
    assert b.add_many((f"k{i % 20}", i) for i in range(600)) == 600  # ~0.6 s of work
    b.flush()
    assert b.stats().succeeded == 600 and sum(sizes) == 600
    # Blocks grow from one item (1, 2, 4: a slow stream's first item does not wait for a
    # block to fill); the last is what the stream had left.
    assert sizes[:3] == [1, 2, 4] and min(sizes[3:-1]) >= 5, sizes


def test_round_robin_add_many_is_not_paced(batcher_factory):
    b = batcher_factory(fns.sleep_per_item, size=5, workers=2, routing="round-robin")
    b.add_many((f"k{i % 3}", i) for i in range(400))  # ~0.4 s of work
    queued = b.stats().pending
    b.flush()
    assert queued > 300, queued  # round-robin promises an even count, not paced work


def test_pacer_learns_the_cost_per_item_from_the_workers_counters():
    counters = LoadCounters(2)
    try:
        pacer = Pacer(Costs(counters), size=8, first=64)
        assert pacer.allowance() == 64  # nothing finished yet: the first allowance
        counters.set(0, SENT, 30)
        counters.set(1, SENT, 20)
        assert pacer.allowance() == 64 - 20  # measured from the least-loaded worker
        counters.set(1, WORK_NS, 20 * 1_000_000)  # worker 1: 20 items in 20 ms
        counters.set(1, DONE, 20)
        assert pacer.cost == 0 and pacer.allowance() == 20  # 20 ms / 1 ms, worker 1 idle
        assert pacer.cost == 1_000_000
        counters.set(0, WORK_NS, 30 * 3_000_000)  # worker 0: 3 ms per item
        counters.set(0, DONE, 30)
        assert pacer.allowance() == 16  # cost 2 ms (smoothed): 10 items, but two batches
        counters.reset(1)  # a respawned worker starts from zero: not a sample
        assert pacer.allowance() == 16 and pacer.cost == 2_000_000
        for batch in range(1, 17):  # cheap items now, 1 us each: the estimate follows
            counters.set(0, WORK_NS, 30 * 3_000_000 + batch * 10 * 1_000)
            counters.set(0, DONE, 30 + batch * 10)
            if pacer.allowance() > 10_000:  # far beyond any buffer: not held back
                break
        else:
            pytest.fail(f"still held back after 16 cheap batches (cost {pacer.cost:.0f} ns)")
    finally:
        counters.unlink()


def test_pacer_under_affinity_keeps_a_third_batch_queued(batcher_factory):
    """A block reckoned for the least-loaded worker spreads over keys' homes under
    "affinity": that worker gets part of it, so the floor holds one batch more there."""
    counters = LoadCounters(2)
    try:
        pacer = Pacer(Costs(counters), size=8, first=64, batches=SPREAD_PACED_BATCHES)
        counters.set(1, WORK_NS, 20 * 3_000_000)  # 3 ms an item: 20 ms is under a batch
        counters.set(1, DONE, 20)
        counters.set(1, SENT, 20)
        assert pacer.allowance() == 3 * 8
    finally:
        counters.unlink()
    for routing, batches in (("affinity", 3), ("least-loaded", 2)):
        b = batcher_factory(fns.double, routing=routing, size=8, workers=2)
        b.add("k", 1)
        b.flush()  # started: the engine made its pacer
        assert b._pacer.floor == batches * 8, routing


@pytest.fixture
def shared_counters():
    """Load counters in real shared memory, unlinked after the test: shared_counters(n)."""
    made = []

    def make(workers):
        made.append(LoadCounters(workers))
        return made[-1]

    yield make
    for counters in made:
        counters.unlink()


def test_least_loaded_weighs_queued_items_by_each_workers_measured_cost(shared_counters):
    counters = shared_counters(2)
    router = Router("least-loaded", counters)
    counters.set(0, SENT, 10)
    counters.set(1, SENT, 30)
    assert router.least_loaded() == 0  # no cost known yet: fewest items
    counters.set(0, WORK_NS, 5 * 2_000_000)  # worker 0: 5 items run at 2 ms each,
    counters.set(0, DONE, 5)  # 5 queued: 10 ms of work
    counters.set(1, WORK_NS, 5 * 100_000)  # worker 1: 100 us each, 25 queued: 2.5 ms
    counters.set(1, DONE, 5)
    assert router.least_loaded() == 1  # more items, less work
    counters.set(1, SENT, 5 + 120)  # 120 queued: 12 ms against 10
    assert router.least_loaded() == 0
    counters.reset(0)  # a respawned worker: its cost is unknown, the pooled one stands in
    counters.set(0, SENT, 100)
    assert router.least_loaded() == 1  # 100 items at the pooled ~1 ms against 12 ms
    assert router.costs.per_worker[0] == 0 and router.costs.of(0) == router.costs.pooled


def test_least_loaded_counts_no_part_batch_as_work_ahead(shared_counters):
    # Items in the batch a worker is filling run with the next chunk, not before it: they
    # are no work ahead of it. Of equals, the chunk goes to the fuller batch.
    counters = shared_counters(2)
    router = Router("least-loaded", counters)
    counters.set(0, SENT, 50)
    counters.set(0, HELD, 50)
    assert router.least_loaded() == 0  # neither has work ahead: worker 0's batch is fuller
    counters.set(1, SENT, 10)
    counters.set(1, HELD, 10)
    assert router.least_loaded() == 0
    counters.set(1, HELD, 0)  # worker 1 has not taken its 10 yet: they are ahead
    assert router.least_loaded() == 0
    counters.set(0, SENT, 50 + 20)  # 20 sent to worker 0 behind its 50 held
    assert router.least_loaded() == 1
    # Known costs weigh the work ahead, never the part batch: worker 0 has 10 items ahead
    # and 60 held, worker 1 has 20 ahead, all at 100 us (1 ms against 2 ms; counted, the
    # held ones would make worker 0's 7 ms).
    for i, ahead, held in ((0, 10, 60), (1, 20, 0)):
        counters.set(i, WORK_NS, 10 * 100_000)
        counters.set(i, DONE, 10)
        counters.set(i, SENT, 10 + ahead + held)
        counters.set(i, HELD, held)
    assert router.least_loaded() == 0
    # A solo chunk (a retry) runs after what its worker holds, alone: held items count.
    assert router.least_loaded(fill=False) == 1


def test_costs_take_no_sample_while_given_and_done_disagree(shared_counters):
    # A worker that hands items back adds GIVEN, then DONE: a look between the two sees
    # fewer items run than before. That is no sample and no new baseline (a new baseline
    # there made the next sample count the handed-back items as run, at no cost).
    counters = shared_counters(1)
    costs = Costs(counters)
    counters.set(0, DONE, 10)
    counters.set(0, WORK_NS, 10 * 1_000_000)
    costs.update()
    assert costs.of(0) == 1_000_000
    counters.set(0, GIVEN, 50)  # the hand-back, DONE not yet raised
    costs.update()
    counters.set(0, DONE, 60)
    costs.update()
    assert costs.of(0) == 1_000_000
    counters.set(0, DONE, 70)  # 10 more run, at 3 ms each
    counters.set(0, WORK_NS, 10 * 1_000_000 + 10 * 3_000_000)
    costs.update()
    # the earlier 10 items count half: (10 ms / 2 + 30 ms) / (10 / 2 + 10)
    assert costs.of(0) == pytest.approx(35_000_000 / 15)


def test_a_small_batch_barely_moves_a_workers_cost(shared_counters):
    # A batch of a few items (a flush, a stream's tail) carries a whole batch's fixed cost:
    # weighed by its items, it must not make the worker look many times as costly.
    counters = shared_counters(1)
    costs = Costs(counters)
    counters.set(0, WORK_NS, 5000 * 1_000)  # 5,000 items at 1 us
    counters.set(0, DONE, 5000)
    costs.update()
    counters.set(0, WORK_NS, 5000 * 1_000 + 200_000)  # then 2 items in 200 us
    counters.set(0, DONE, 5002)
    costs.update()
    assert costs.of(0) < 1_100


def test_a_worker_stuck_in_a_long_batch_stops_looking_cheap(shared_counters):
    # Worker 1 measured 10 us per item, then began a batch of 100 items 1 s ago: they cost
    # at least 10 ms each, so its 100 queued items outweigh worker 0's 500 at 1 ms.
    counters = shared_counters(2)
    router = Router("least-loaded", counters)
    for i, cost in ((0, 1_000_000), (1, 10_000)):
        counters.set(i, WORK_NS, 10 * cost)
        counters.set(i, DONE, 10)
    counters.set(0, SENT, 10 + 500)
    counters.set(1, SENT, 10 + 100)
    assert router.least_loaded() == 1  # 1 ms of work against 500 ms
    counters.set(1, B_START, 10)
    counters.set(1, B_END, 110)
    counters.set(1, BUSY_NS, time.monotonic_ns() - 1_000_000_000)
    assert router.least_loaded() == 0


def test_before_any_cost_is_known_a_busy_worker_is_judged_by_its_items(shared_counters):
    # No batch has ended yet: a time in do() cannot be weighed against a count of items.
    # Worker 0 is 1 s into its first batch of 5 with 5 queued; worker 1 has 400 queued.
    counters = shared_counters(2)
    router = Router("least-loaded", counters)
    counters.set(0, SENT, 5)
    counters.set(0, B_END, 5)
    counters.set(0, BUSY_NS, time.monotonic_ns() - 1_000_000_000)
    counters.set(1, SENT, 400)
    assert router.least_loaded() == 0


def test_pacer_paces_at_the_pooled_cost_not_a_workers_stale_own(shared_counters):
    counters = shared_counters(2)
    pacer = Pacer(Costs(counters), size=10, first=64)
    for i, cost in ((0, 4_000_000), (1, 100_000)):  # 4 ms and 100 us per item
        counters.set(i, WORK_NS, 10 * cost)
        counters.set(i, DONE, 10)
        counters.set(i, SENT, 10)
    # pooled: 2.05 ms per item, 20 ms of it is 9 items: two batches instead
    assert pacer.allowance() == 20 and pacer.cost == pytest.approx(2_050_000)
    counters.set(0, SENT, 10 + 5)  # worker 1 is the least loaded now: at its own
    assert pacer.allowance() == 20  # 100 us, 20 ms would be 200 items for everyone


def test_add_many_under_key_routing_pins_each_of_many_distinct_keys(
        batcher_factory, start_method):
    # Every key distinct: each block is split by owner, each part goes to its owner.
    seen = {}
    b = batcher_factory(fns.with_pid, routing="key", size=200, workers=2,
                        start_method=start_method,
                        on_result=lambda k, vs, rs: seen.setdefault(k, set()).update(
                            pid for pid, _ in rs))
    assert b.add_many((f"user:{i}", i) for i in range(20_000)) == 20_000
    b.flush()
    assert len(seen) == 20_000 and all(len(pids) == 1 for pids in seen.values())
    by_worker = {}
    for key, pids in seen.items():
        by_worker.setdefault(pids.pop(), set()).add(key_hash(key) % 2)
    assert len(by_worker) == 2 and all(len(owners) == 1 for owners in by_worker.values())
    assert b.stats().succeeded == 20_000


def test_add_many_under_key_routing_keeps_order_after_earlier_adds(batcher_factory):
    order = {}
    b = batcher_factory(fns.double, routing="key", size=50, workers=2,
                        on_result=lambda k, vs, rs: order.setdefault(k, []).extend(vs))
    for i in range(5):
        b.add(f"k{i}", -1)  # waits in its worker's open chunk when add_many starts
    b.add_many((f"k{i % 5}", i) for i in range(2000))
    b.flush()
    for key, values in order.items():
        assert values[0] == -1 and values[1:] == sorted(values[1:]), key


def test_add_many_under_key_routing_a_bad_item_keeps_the_items_before_it(batcher_factory):
    got = {}
    b = batcher_factory(fns.double, routing="key", workers=2,
                        on_result=lambda k, vs, rs: got.update(zip(vs, rs, strict=True)))
    items = [(f"k{i}", i) for i in range(10)] + [("bad", threading.Lock()), ("k0", 11)]
    with pytest.raises(mpbatch.SerializationError, match="'bad'") as info:
        b.add_many(items)
    assert info.value.accepted == 10
    b.flush()
    assert got == {i: 2 * i for i in range(10)}  # every key's owner got its part, no more


def test_add_many_under_key_routing_times_out_with_a_prefix_accepted(batcher_factory,
                                                                     tmp_path):
    # One worker holds its batches until the gate opens; the other runs freely. add_many
    # stops at its timeout, and what went in is exactly the stream's first `accepted` items.
    gate = tmp_path / "gate"
    got = {}
    b = batcher_factory(fns.wait_for_file(str(gate), key="held"), routing="key", workers=2,
                        buffer=10, size=5,
                        on_result=lambda k, vs, rs: got.update(zip(vs, rs, strict=True)))
    other = next(f"k{i}" for i in range(100) if key_hash(f"k{i}") % 2 != key_hash("held") % 2)
    items = [("held" if i % 2 == 0 else other, i) for i in range(100)]
    with pytest.raises(mpbatch.Full, match="routing='key'") as info:
        b.add_many(iter(items), timeout=0.5)
    accepted = info.value.accepted
    assert 10 <= accepted < 30 and b.stats().accepted == accepted
    gate.touch()
    b.flush()
    assert got == {i: 2 * i for i in range(accepted)}


@pytest.mark.parametrize("keys", [
    [f"user:{i}" for i in range(500)] + ["é", "\udcff"],  # str, a lone surrogate too
    [*range(-250, 250), 2**70, -(2**70)],  # int, beyond 64 bits too
    [b"raw", "text", 7, b"", ""],  # a mix of the plain kinds
    [("tuple", 1), 2.5, True, None, frozenset({1}), "s"],  # kinds the cache serves
])
@pytest.mark.parametrize("workers", [1, 2, 3, 8])
def test_bulk_owners_agree_with_one_key_at_a_time(keys, workers):
    counters = LoadCounters(workers)
    try:
        router = Router("key", counters)
        assert router.owners(keys) == [router.for_key(k) for k in keys]
        assert router.owners(keys) == [key_hash(k) % workers for k in keys]
    finally:
        counters.unlink()
