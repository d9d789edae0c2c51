"""Several caller threads at once: add()'s lock-free fast path loses and repeats nothing."""

import threading

import pytest

pytestmark = pytest.mark.timeout(60)


def double(batch):
    return {k: [v * 2 for v in vs] for k, vs in batch.items()}


def test_threads_adding_at_once_lose_and_repeat_nothing(batcher_factory):
    """Four threads add() while a fifth submits and a sixth flushes, with a timer that
    seals the open chunk every few ms: every item gets exactly one result."""
    seen, lock = [], threading.Lock()

    def on_result(key, values, results):
        with lock:
            seen.extend(values)

    b = batcher_factory(double, size=50, interval=0.004, on_result=on_result, buffer=500)
    per_thread, adders = 5000, 4
    futures, done = [], threading.Event()

    def add(t):
        for i in range(per_thread):
            b.add(f"k{i % 7}", t * per_thread + i, block=True)

    def submit():
        base = adders * per_thread
        futures.extend(b.submit("s", base + i, block=True) for i in range(500))

    def flush():
        while not done.is_set():
            b.flush()

    threads = [threading.Thread(target=add, args=(t,)) for t in range(adders)]
    threads.append(threading.Thread(target=submit))
    flusher = threading.Thread(target=flush)
    for t in [*threads, flusher]:
        t.start()
    for t in threads:
        t.join(40)
    done.set()
    flusher.join(40)
    b.flush()
    total = adders * per_thread + 500
    assert sorted(seen) == list(range(total))  # each item exactly once
    assert [f.result() for f in futures] == [2 * (adders * per_thread + i) for i in range(500)]
    s = b.stats()
    assert s.accepted == s.succeeded == total and s.pending == 0


def test_add_and_submit_from_one_thread_keep_their_order(batcher_factory):
    """add() takes the lock-free path, submit() the locked one; a key's values still reach
    do() in the order they were given."""
    batches = []
    b = batcher_factory(double, size=40, workers=1, interval=60,
                        on_result=lambda key, values, results: batches.append(values))
    futures = []
    for i in range(40):
        if i % 3 == 1:
            futures.append(b.submit("k", i))
        else:
            b.add("k", i)
    b.flush()
    assert batches == [list(range(40))]
    assert [f.result() for f in futures] == [2 * i for i in range(40) if i % 3 == 1]
