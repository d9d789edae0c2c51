"""routing="affinity": a key stays on its worker while that worker is under its bound of
queued work, and moves to the least-loaded worker past it. Checked through which worker
ran each item, not through timing."""

import os
import time

import pytest

import mpbatch
from mpbatch.affinity import FIRST_WINDOW, SPILL_AFTER, WINDOW, Affinity
from mpbatch.costs import Costs
from mpbatch.counters import (
    B_END,
    B_START,
    BATCHES,
    BUSY_NS,
    DONE,
    SENT,
    WORK_NS,
    LoadCounters,
)
from tests import fns
from tests.test_cli import mpbatch_cmd, outputs, write_jsonl


class Waiting:
    """An open chunk as Affinity sees it: items waiting in the caller."""

    def __init__(self, n=0):
        self.entries = [None] * n


@pytest.fixture
def counters():
    """Two workers' load counters in real shared memory, unlinked after the test."""
    counters = LoadCounters(2)
    yield counters
    counters.unlink()


def make_affinity(counters, batch_items, spill_after=SPILL_AFTER):
    """Affinity as the engine makes it: on the cost estimates routing and pacing share."""
    affinity = Affinity(counters, Costs(counters), batch_items, spill_after)
    affinity.waiting = [Waiting() for _ in range(counters.workers)]
    return affinity


def where_each_ran(b, items):
    futs = [b.submit(k, v) for k, v in items]
    b.flush()
    return [(k, *f.result()) for (k, _), f in zip(items, futs, strict=True)]


def test_a_key_stays_on_its_worker_while_that_worker_keeps_up(batcher_factory, start_method):
    b = batcher_factory(fns.with_pid, routing="affinity", size=4, workers=2,
                        start_method=start_method)
    rows = []
    for round_ in range(5):  # each round drains: no worker is ever over its bound
        rows += where_each_ran(b, [(f"k{i}", (round_, i)) for i in range(8)])
    homes = {}
    for key, pid, _ in rows:
        homes.setdefault(key, set()).add(pid)
    assert all(len(pids) == 1 for pids in homes.values()), homes
    assert len({pid for pids in homes.values() for pid in pids}) == 2  # new keys spread


def test_a_key_moves_when_its_worker_is_past_the_bound(batcher_factory, tmp_path):
    # The gate holds every batch of "hot", so no worker finishes anything: the bound is
    # four batches (4 x size = 20 items) while the cost per item is unknown.
    gate = tmp_path / "gate"
    b = batcher_factory(fns.with_pid_gated(str(gate), "hot"), routing="affinity", size=5,
                        workers=2, steal=False)  # a stolen item would run off its home
    futs = [b.submit("hot", i) for i in range(55)]
    gate.touch()
    b.flush()
    pids = [f.result()[0] for f in futs]
    first, second = pids[0], pids[20]
    assert first != second
    # 20 items at home; home moves to the idle worker; with both past the bound, it moves
    # back only once the other holds half a bound (10 items) less
    assert pids == [first] * 20 + [second] * 30 + [first] * 5


def test_add_many_under_affinity_places_a_block_as_items_one_by_one(batcher_factory,
                                                                   tmp_path):
    gate = tmp_path / "gate"
    got = []
    b = batcher_factory(fns.with_pid_gated(str(gate), "hot"), routing="affinity", size=5,
                        workers=2, steal=False, on_result=lambda k, vs, rs: got.extend(rs))
    assert b.add_many(("hot", i) for i in range(55)) == 55
    gate.touch()
    b.flush()
    pid_of = {v: pid for pid, v in got}
    pids = [pid_of[i] for i in range(55)]
    first, second = pids[0], pids[20]
    assert first != second
    assert pids == [first] * 20 + [second] * 30 + [first] * 5  # as test above, by submit()
    assert b.stats().succeeded == 55


def test_many_keys_through_add_many_lose_nothing(batcher_factory):
    got = {}
    b = batcher_factory(fns.double, routing="affinity", size=50, workers=2,
                        on_result=lambda k, vs, rs: got.update(zip(vs, rs, strict=True)))
    assert b.add_many((f"k{i % 97}", i) for i in range(20_000)) == 20_000
    b.flush()
    assert got == {i: 2 * i for i in range(20_000)}
    s = b.stats()
    assert (s.succeeded, s.pending, s.dead_lettered) == (20_000, 0, 0)


@pytest.mark.timeout(30)
def test_keys_leave_a_worker_stuck_in_do_and_no_item_is_lost(batcher_factory, tmp_path,
                                                               start_method):
    """A batch held in do() overruns its worker's measured cost by more than spill_after:
    the keys homed there run on the other worker while it is still held, and once it is let
    go every item has its result, the held one too."""
    fifo, gate = tmp_path / "started", tmp_path / "gate"
    os.mkfifo(fifo)
    # size=1: each item is a batch of its own, sent as it is added, so each is placed by
    # the loads left by the items before it. steal=False: a stolen item runs away from its
    # key's home, which stays; here where a key ran last is its home.
    b = batcher_factory(fns.with_pid_held_on("hold", str(fifo), str(gate)),
                        routing="affinity", spill_after=0.05, size=1, workers=2,
                        steal=False, start_method=start_method)
    keys = [f"k{i}" for i in range(8)]
    rows = []
    for round_ in range(5):  # each round drains; the workers' costs get measured
        rows += where_each_ran(b, [(k, round_) for k in keys])
    assert [v for _, _, v in rows] == [r for r in range(5) for _ in keys]
    homes = {key: pid for key, pid, _ in rows}  # where each key ran last: its home
    held_pid = max(homes.values(), key=list(homes.values()).count)
    held, *followers = [k for k in keys if homes[k] == held_pid]  # 4 keys or more there
    affinity = b._router.affinity  # the running Batcher's
    moves = affinity.moves

    try:
        with fns.fifo_reader(fifo) as started:
            stuck = b.submit(held, "hold")
            assert int(started.readline()) == held_pid  # the held batch is in do(), at home
        i = affinity.homes[held]
        deadline = time.monotonic() + 10
        while affinity.limits()[i] > 0:  # until it has overrun its estimate by spill_after
            assert time.monotonic() < deadline, f"never past its bound: {affinity.limits()}"
            time.sleep(0.01)
        ran = {}
        for round_ in (5, 6):
            for key in (k for k in keys if k != held):
                pid, value = b.submit(key, round_).result(timeout=10)
                assert value == round_
                ran.setdefault(key, []).append(pid)
        assert not stuck.done()
    finally:
        gate.touch()  # a failure above must not leave the worker held till close() kills it
    # every key but the held one ran on the other worker: its followers moved there, once
    # each, and stayed
    elsewhere = {pid for pids in ran.values() for pid in pids}
    assert len(elsewhere) == 1 and held_pid not in elsewhere, (held_pid, ran)
    assert affinity.moves - moves == len(followers)
    b.flush()
    assert stuck.result() == (held_pid, "hold")
    n = len(rows) + 1 + sum(len(pids) for pids in ran.values())
    s = b.stats()
    assert (s.accepted, s.succeeded, s.pending, s.dead_lettered) == (n, n, 0, 0)


def test_the_bound_in_seconds_follows_each_workers_measured_cost(counters):
    # worker 0: 1 ms per item measured; worker 1: nothing finished yet (unknown cost)
    counters.set(0, DONE, 100)
    counters.set(0, SENT, 100)
    counters.set(0, WORK_NS, 100 * 1_000_000)
    affinity = make_affinity(counters, batch_items=1, spill_after=0.005)
    # 5 ms / 1 ms; worker 1 has run nothing yet and takes the cost measured so far
    assert affinity.limits() == [5.0, 5.0]
    affinity.homes["a"] = 0
    owners = affinity.owners(["a"] * 12)
    assert owners == [0] * 5 + [1] * 7  # moved at 5 items queued, to the idle worker
    assert affinity.homes["a"] == 1 and affinity.moves == 1
    # Items waiting in the caller's open chunk count as queued work too.
    affinity.homes["b"] = 0
    affinity.waiting = [Waiting(5), Waiting()]
    assert affinity.for_key("b") == 1


def test_one_costly_batch_barely_moves_a_homes_bound(counters):
    """Routing reads a worker's recent cost; a home's bound reads its cost over all it ran,
    so a batch that warmed keys up does not shrink every bound on that worker at once."""
    affinity = make_affinity(counters, batch_items=100, spill_after=0.05)
    for i in (0, 1):
        counters.set(i, DONE, 1000)
        counters.set(i, SENT, 1000)
        counters.set(i, WORK_NS, 1000 * 100_000)  # 100 us an item
    assert affinity.limits() == [500.0, 500.0]
    counters.set(0, DONE, 1100)  # then a batch of 100 at 300 us an item (warm-ups)
    counters.set(0, SENT, 1100)
    counters.set(0, WORK_NS, 1000 * 100_000 + 100 * 300_000)
    limits = affinity.limits()
    assert 0.05e9 / limits[0] == pytest.approx(1.3e8 / 1100)  # all it ran: ~118 us
    # What routing reads instead: the earlier batches halved, the costly one whole
    assert affinity.costs.of(0) == pytest.approx((1e8 / 2 + 3e7) / (1000 / 2 + 100))


def test_before_any_batch_ends_the_bound_is_four_batches_of_items(counters):
    affinity = make_affinity(counters, batch_items=50)
    assert affinity.limits() == [200, 200]
    counters.set(0, SENT, 200)  # worker 0 has its bound queued: "a" goes to worker 1
    affinity.homes["a"] = 0
    assert affinity.for_key("a") == 1 and affinity.moves == 1


def test_keys_leave_a_worker_whose_batch_overran_its_estimate_by_the_bound(counters):
    """A batch of 10 at 10 ms an item, 300 ms in: 200 ms over its estimate, as one that
    warmed a key up may be; its worker keeps its keys. 700 ms in, 600 ms over, past the
    bound of 500 ms: its queue waits that long at least, and they move."""
    for i in (0, 1):
        counters.set(i, DONE, 100)
        counters.set(i, SENT, 100)
        counters.set(i, WORK_NS, 100 * 10_000_000)  # 10 ms an item
    affinity = make_affinity(counters, batch_items=10, spill_after=0.5)
    affinity.homes["a"] = 0
    counters.set(0, SENT, 110)  # a batch of 10 in do() on worker 0
    counters.set(0, B_START, 100)
    counters.set(0, B_END, 110)
    counters.set(0, BUSY_NS, time.monotonic_ns() - 300_000_000)
    assert affinity.limits() == [50.0, 50.0]
    assert affinity.for_key("a") == 0
    counters.set(0, BUSY_NS, time.monotonic_ns() - 700_000_000)
    assert affinity.limits() == [0.0, 50.0]
    # Stuck, it loses the key even to a worker holding more items: nothing runs on it
    # until its batch ends.
    counters.set(1, SENT, 130)
    assert affinity.for_key("a") == 1 and affinity.homes["a"] == 1 and affinity.moves == 1
    # The batch ended and the next began between the reads (B_START == B_END): no
    # estimate to set its time against, so no overrun either.
    counters.set(0, B_START, 110)
    assert affinity.limits() == [50.0, 50.0]


def test_no_worker_is_stuck_before_it_has_run_four_batches(counters):
    """A worker's first batches warm its keys up and share the CPUs with a caller filling
    every queue: on benchmarks/keyed.py one of 100 items took 93 ms against an estimate of
    12, and its keys moved away and back. Its overrun counts once it has ended four
    batches or run four batches' worth of items (the bound's floor too)."""
    affinity = make_affinity(counters, batch_items=10, spill_after=0.05)
    for i in (0, 1):
        counters.set(i, DONE, 39)
        counters.set(i, SENT, 39)
        counters.set(i, WORK_NS, 39 * 1_000_000)  # 1 ms an item
    affinity.homes["a"] = 0
    counters.set(0, SENT, 49)  # a batch of 10 in do() on worker 0, 1 s in: 990 ms over
    counters.set(0, B_START, 39)
    counters.set(0, B_END, 49)
    counters.set(0, BUSY_NS, time.monotonic_ns() - 1_000_000_000)
    assert affinity.limits() == [50.0, 50.0]
    assert affinity.for_key("a") == 0 and affinity.moves == 0
    counters.set(0, BATCHES, 4)  # four batches ended (of 39 items in all): now it counts
    assert affinity.limits() == [0.0, 50.0]
    counters.set(0, BATCHES, 3)
    assert affinity.limits() == [50.0, 50.0]
    counters.set(0, DONE, 40)  # or one item more run, a batch of 1 between
    counters.set(0, SENT, 50)
    counters.set(0, B_START, 40)
    counters.set(0, B_END, 50)
    counters.set(0, WORK_NS, 40 * 1_000_000)
    assert affinity.limits() == [0.0, 50.0]
    assert affinity.for_key("a") == 1 and affinity.moves == 1
    counters.reset(0)  # a replacement starts over: not stuck in its first batch
    affinity.costs.forget(0)
    counters.set(0, SENT, 10)
    counters.set(0, B_END, 10)
    counters.set(0, BUSY_NS, time.monotonic_ns() - 1_000_000_000)
    assert affinity.limits()[0] > 0


def slow_down(counters, affinity, workers, ms):
    """Five batches of 10 items at ``ms`` an item on ``workers``, each one a sample."""
    for done in range(110, 160, 10):
        for i in workers:
            counters.set(i, DONE, done)
            counters.set(i, SENT, done)
            counters.set(i, WORK_NS, 100 * 10_000_000 + (done - 100) * ms * 1_000_000)
        affinity.limits()


def held_in_do(counters, i, ms):
    """A batch of 10 in do() on worker i for ``ms`` so far."""
    counters.set(i, SENT, 160)
    counters.set(i, B_START, 150)
    counters.set(i, B_END, 160)
    counters.set(i, BUSY_NS, time.monotonic_ns() - ms * 1_000_000)


@pytest.mark.parametrize("slowed", [(0, 1), (0,)])
def test_a_batch_is_stuck_at_the_machines_recent_pace(counters, slowed):
    """Other work on the machine stretched every worker's last batches to 110 ms an item
    from 10: a batch in do() 1.1 s in is set against that pace (~96 ms an item, recent
    batches weighing most), not its worker's cost over all it ran (~43 ms), and is not
    stuck; its keys do not move to a worker no faster, each move a warm-up more. Were
    worker 0 slowed alone (its keys grown costly), worker 1 sets the pace and they move."""
    affinity = make_affinity(counters, batch_items=1, spill_after=0.5)
    for i in (0, 1):
        counters.set(i, DONE, 100)
        counters.set(i, SENT, 100)
        counters.set(i, WORK_NS, 100 * 10_000_000)
    affinity.limits()  # the first sample: 10 ms an item
    slow_down(counters, affinity, slowed, 110)
    steady = affinity.costs.steady()[0]
    assert steady == pytest.approx(6.5e9 / 150) and affinity.costs.of(0) > 2 * steady
    held_in_do(counters, 0, 1100)  # 667 ms over 10 x 43 ms; 361 short of 10 x 96 + 500
    affinity.homes["a"] = 0
    if slowed == (0,):
        assert affinity.limits()[0] == 0.0
        assert affinity.for_key("a") == 1 and affinity.moves == 1
        return
    assert affinity.limits()[0] == pytest.approx(0.5e9 / steady)
    assert affinity.for_key("a") == 0 and affinity.moves == 0
    held_in_do(counters, 0, 1700)  # stuck, though: past the bound at that pace too
    assert affinity.limits()[0] == 0.0


def test_no_key_goes_to_a_stuck_worker_while_another_is_free(counters):
    """A worker whose batch overran by the bound takes no new key, no item of a key too hot
    for one worker and no key that moves, even holding the fewest items; were every worker
    stuck, keys stay home and nothing counts as a move."""
    for i in (0, 1):
        counters.set(i, DONE, 100)
        counters.set(i, SENT, 100)
        counters.set(i, WORK_NS, 100 * 10_000_000)  # 10 ms an item
    affinity = make_affinity(counters, batch_items=1, spill_after=0.5)
    affinity.homes.update({"a": 0, "b": 1})
    affinity.hot = frozenset({"hot"})
    counters.set(1, SENT, 140)  # worker 1: 40 items queued; worker 0 ...
    held_in_do(counters, 0, 2000)  # ... 10 items, stuck in do()
    assert affinity.limits()[0] == 0.0
    assert affinity.owners(["new", "hot", "hot", "a"]) == [1, 1, 1, 1]
    assert affinity.homes["new"] == 1 and affinity.moves == 1  # "a" moved
    held_in_do(counters, 1, 2000)  # both stuck: keys stay where they are, even on the
    counters.set(0, SENT, 170)  # one holding more items (70 against 60)
    affinity.homes["a"] = 0
    assert affinity.owners(["a", "b", "a"]) == [0, 1, 0] and affinity.moves == 1


def test_a_home_is_never_bounded_under_four_batches(counters):
    """add_many's pacing keeps three batches queued on a worker under affinity: a home
    holding that is not past its bound, however few items spill_after's seconds come to (a
    slow item, or a machine that other work slows down)."""
    for i in (0, 1):
        counters.set(i, DONE, 100)
        counters.set(i, SENT, 100)
        counters.set(i, WORK_NS, 100 * 10_000_000)  # 10 ms an item: 5 items in 50 ms
    affinity = make_affinity(counters, batch_items=20, spill_after=0.05)
    assert affinity.limits() == [80, 80]
    affinity.homes["a"] = 0
    counters.set(0, SENT, 100 + 79)
    assert affinity.for_key("a") == 0 and affinity.moves == 0
    counters.set(0, SENT, 100 + 80)
    assert affinity.for_key("a") == 1 and affinity.moves == 1


def test_a_key_too_hot_for_one_worker_is_spread_and_the_others_stay_home(counters):
    """Past 1/workers of a window's items, a key has no home: each of its items goes to the
    least-loaded worker, and the keys homed around it do not move."""
    affinity = make_affinity(counters, batch_items=10_000)
    affinity.window = WINDOW  # past the first, shorter windows
    affinity.homes.update({"hot": 0, "a": 0, "b": 1})
    window = ["hot"] * 1400 + ["a"] * 300 + ["b"] * 348  # hot: 68 %
    assert len(window) == WINDOW
    affinity.owners(window)
    assert affinity.hot == {"hot"}
    owners = affinity.owners(["hot"] * 10 + ["a", "b"])
    assert owners[:10] == [0, 1] * 5 or owners[:10] == [1, 0] * 5  # shared, item by item
    assert owners[10:] == [0, 1] and affinity.homes == {"hot": 0, "a": 0, "b": 1}


def test_the_first_windows_are_short_so_a_hot_key_is_found_early(counters):
    """The first window counts FIRST_WINDOW items, each next one twice the last, up to
    WINDOW: until a key is found too hot for one worker it has a home, drags it past its
    bound and moves with the keys around it (on benchmarks/keyed.py, 11-21 moves in the
    first 0.4 s of a run, against 1-8 in the whole run with it)."""
    affinity = make_affinity(counters, batch_items=10_000)
    affinity.homes.update({"hot": 0, "a": 1})
    sizes = []
    for _ in range(8):  # more than enough to reach WINDOW, were the windows doubling
        if affinity.window == WINDOW:
            break
        sizes.append(affinity.window)
        affinity.owners(["hot"] * (affinity.window - 10) + ["a"] * 10)
        assert affinity.hot == {"hot"}
    assert sizes == [FIRST_WINDOW * 2**i for i in range(len(sizes))] and sizes[-1] * 2 == WINDOW
    affinity.owners(["a"] * (WINDOW - 1))  # the full-length windows from now on
    assert affinity.hot == {"hot"}
    affinity.owners(["a"])
    assert affinity.hot == {"a"} and affinity.window == WINDOW


def test_a_window_that_ends_inside_a_block_judges_the_rest_of_it(counters):
    """add_many's first blocks are large (no cost is known yet to pace them): the first
    window ends inside one, and the rest of the block is placed with what it found."""
    affinity = make_affinity(counters, batch_items=10_000)
    affinity.homes["hot"] = 0
    owners = affinity.owners(["hot"] * (FIRST_WINDOW + 44))
    assert affinity.hot == {"hot"} and affinity.seen == 44
    assert owners == [0] * FIRST_WINDOW + [1] * 44  # then item by item, least-loaded first
    # add_many places its blocks outside the Batcher's lock: another thread's block, sized
    # by an earlier look at the window, may take the count past the window's end just after
    # this call closed one. No item is placed twice, nor left out.
    close = affinity._new_window

    def and_another_block_counted():
        close()
        affinity.seen = affinity.window + 5
        affinity._new_window = close

    affinity._new_window = and_another_block_counted
    affinity.seen = affinity.window - 100
    assert len(affinity.owners(["a"] * 300)) == 300 and affinity.seen == 200


def test_a_new_key_goes_where_fewer_busy_keys_live(counters):
    """Both workers near the least load: the new key goes to the worker home to fewer busy
    keys (a share of BUSY or more of the last window), not to the one with the hot keys."""
    affinity = make_affinity(counters, batch_items=10_000)
    affinity.window = WINDOW  # past the first, shorter windows
    affinity.homes.update({"x": 1, "y": 1, "z": 0})
    window = ["x"] * 600 + ["y"] * 600 + ["z"] * 848
    affinity.owners(window)
    assert affinity.busy == [1, 2] and affinity.hot == frozenset()
    counters.set(0, SENT, 3)  # worker 0 a little busier, within half a bound
    assert affinity.for_key("new") == 0


def test_homes_stay_bounded_with_a_stream_of_distinct_keys(counters):
    affinity = make_affinity(counters, batch_items=100)
    for start in range(0, 3 * Affinity.HOMES_MAX, 10_000):
        affinity.owners(list(range(start, start + 10_000)))
    assert len(affinity.homes) <= Affinity.HOMES_MAX


@pytest.mark.parametrize(("kwargs", "error", "text"), [
    ({"spill_after": 0.1}, ValueError,
     "spill_after=0.1 applies to routing='affinity' only (routing='least-loaded')"),
    ({"routing": "key", "spill_after": 1}, ValueError, "applies to routing='affinity' only"),
    ({"routing": "affinity", "spill_after": 0}, ValueError, "spill_after must be"),
    ({"routing": "affinity", "spill_after": "1"}, TypeError, "spill_after must be a number"),
    ({"routing": "afinity"}, ValueError, "routing must be one of"),
])
def test_routing_options_are_checked_with_clear_errors(kwargs, error, text):
    with pytest.raises(error, match=text.replace("(", r"\(").replace(")", r"\)")):
        mpbatch.Batcher(fns.double, **kwargs)


def test_the_command_takes_affinity_and_its_bound(tmp_path):
    ns = [n for n in range(300) if n != 13]  # double_n fails 13
    src = write_jsonl(tmp_path / "in.jsonl", [{"n": n, "g": n % 7} for n in ns])
    proc = mpbatch_cmd("run", "tests.fns:double_n", src, "--per-item", "--key", "g",
                       "--routing", "affinity", "--spill-after", "0.2", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert sorted(x["input"]["n"] for x in outputs(proc.stdout)) == ns
    bad = mpbatch_cmd("run", "tests.fns:double_n", src, "--spill-after", "0.2")
    assert bad.returncode == 2 and "applies to routing='affinity' only" in bad.stderr
