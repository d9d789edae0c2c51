"""Worker recycling: max_batches_per_worker and max_rss replace a worker between batches."""

from tests import fns


def test_max_batches_per_worker_recycles_and_loses_nothing(batcher_factory):
    b = batcher_factory(fns.with_pid, size=10, workers=2, max_batches_per_worker=3)
    futs = [b.submit(f"k{i % 4}", i) for i in range(300)]
    b.flush()
    results = [f.result() for f in futs]
    assert [v for _, v in results] == list(range(300))
    pids = {pid for pid, _ in results}
    assert len(pids) >= 300 // 10 // 3  # no worker ran more than 3 batches
    s = b.stats()
    assert s.recycled >= 8 and s.worker_restarts == s.recycled
    assert (s.succeeded, s.dead_lettered, s.pending, s.failed_attempts) == (300, 0, 0, 0)


def test_max_rss_recycles_a_leaking_worker(batcher_factory):
    # Each batch leaks 20 MB; a cap of 150 MB forces a replacement every few batches.
    b = batcher_factory(fns.grow_memory, size=5, workers=1, max_rss=150 * 1024 * 1024)
    futs = [b.submit("k", i) for i in range(100)]
    b.flush()
    results = [f.result() for f in futs]
    assert [v for _, v in results] == list(range(100))
    s = b.stats()
    assert s.recycled >= 2 and len({pid for pid, _ in results}) == s.recycled + 1
    assert (s.succeeded, s.pending, s.failed_attempts) == (100, 0, 0)


def test_recycling_keeps_each_keys_order_under_key_routing(batcher_factory, start_method):
    """Items queued in a recycled worker go to its replacement before any item added after
    they were sent: routing="key" promises per-key order across batches."""
    seen = {}

    def on_result(key, values, results):  # the collector thread: one writer
        seen.setdefault(key, []).extend(values)

    # A small buffer keeps add() waiting for room, so items are added while workers recycle.
    b = batcher_factory(fns.slow_double, size=5, workers=2, routing="key", interval=0.005,
                        buffer=30, max_batches_per_worker=3, on_result=on_result,
                        start_method=start_method)
    for i in range(1500):
        b.add(f"k{i % 5}", i, block=True)
    b.flush()
    s = b.stats()
    assert s.recycled >= 20 and s.redelivered > 0  # items were queued at every recycle
    assert sorted(v for vs in seen.values() for v in vs) == list(range(1500))
    for key, values in seen.items():
        assert values == sorted(values), f"key {key!r} came back out of order"
