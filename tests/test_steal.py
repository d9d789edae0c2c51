"""Work stealing: a worker running dry takes items another has queued but not started."""

import os
import random
import signal
import threading
import time
from multiprocessing.connection import wait

import pytest

import mpbatch
from mpbatch import transport as tp
from mpbatch.costs import Costs
from mpbatch.counters import (
    ASK,
    ASK_ITEMS,
    B_END,
    B_START,
    BUSY_NS,
    DONE,
    SENT,
    WORK_NS,
    LoadCounters,
)
from mpbatch.ledger import Segment, WorkerLedger, batch_cuts, cut, halves
from mpbatch.steal import ITEM_MIN_NS, Stealer, batches_per_chunk
from tests import fns

N = 200  # items; chunks of 5 (size=5), round-robin: the even chunks, all slow, on worker 0
SLOW = 0.02  # s per item of an even chunk: 2 s of work queued on one worker


def skewed():
    """(key, (index, seconds)): under round-robin every slow chunk lands on one worker."""
    return [(f"k{i % 7}", (i, SLOW if (i // 5) % 2 == 0 else 0.0)) for i in range(N)]


def run_skewed(b):
    futures = [b.submit(k, v, block=True) for k, v in skewed()]
    b.flush()
    return [f.result(timeout=30) for f in futures]


def check_invariant(b):
    s = b.stats()
    assert s.accepted == s.succeeded + s.dead_lettered + s.cancelled + s.pending, s


@pytest.mark.timeout(60)
def test_a_worker_running_dry_takes_queued_work(batcher_factory, start_method):
    b = batcher_factory(fns.sleep_then_pid, routing="round-robin", size=5, interval=1.0,
                        start_method=start_method)
    results = run_skewed(b)
    assert sorted(i for _, i in results) == list(range(N))  # each item once, none lost
    slow_pids = {pid for pid, i in results if (i // 5) % 2 == 0}
    assert len(slow_pids) == 2  # slow items ran on both workers: some were handed over
    s = b.stats()
    assert s.stolen > 0
    assert (s.succeeded, s.dead_lettered, s.pending, s.failed_attempts) == (N, 0, 0, 0)


@pytest.mark.timeout(60)
def test_steal_false_leaves_queued_work_where_it_was_routed(batcher_factory):
    b = batcher_factory(fns.sleep_then_pid, routing="round-robin", size=5, interval=1.0,
                        steal=False)
    results = run_skewed(b)
    assert len({pid for pid, i in results if (i // 5) % 2 == 0}) == 1
    assert b.stats().stolen == 0


def waiting_items(marker):
    """(key, (index, action, marker)) for fns.wait_or_mark, 120 items in chunks of 5 that
    round-robin sends to worker c % 2: worker 1 gets 12 chunks of 25 ms; worker 0 one (its
    cost per item), then a batch that waits for the marker, then ten chunks that make it,
    queued behind that batch."""
    items = []
    for c in range(24):
        action = "work" if c % 2 or c == 0 else "wait" if c == 2 else "mark"
        items += [(f"k{c}", (5 * c + j, action, marker)) for j in range(5)]
    return items


def _kill_at(b, hook):
    """SIGKILL a worker from inside the collector, once: at ``hook`` "ask" the victim, right
    after it was asked (its batch still runs: it has not answered); at "answered" the
    victim, right after its answer was read (its reader answers while do() runs: the batch
    in there dies with it); at "handed_back" the thief, right after the items handed back
    were written to it. Returns an Event set when the kill was made."""
    collector = b._collector
    killed = threading.Event()
    if hook in ("ask", "answered"):
        owner, name = collector.stealer, "_" + hook if hook == "ask" else hook
    else:
        owner, name = collector.recovery, "handed_back"
    original = getattr(owner, name)

    def wrapped(*args):
        # The thief is where send_routed() puts the items: the least-loaded worker, read
        # before the send (on this thread, as send_routed reads it).
        target = args[0] if hook != "handed_back" \
            else collector.dispatcher.router.least_loaded()
        original(*args)
        # "answered": an answer of the reader's, the batch before those items still in do()
        during = hook != "answered" or collector.dispatcher.ledgers[target]._ahead
        if during and not killed.is_set():
            os.kill(b._pool.procs[target].pid, signal.SIGKILL)
            killed.set()

    setattr(owner, name, wrapped)
    return killed


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("hook", "who"), [("ask", "victim"), ("answered", "victim"),
                                           ("handed_back", "thief")])
def test_sigkill_in_the_middle_of_a_steal_loses_nothing(batcher_factory, hook, who,
                                                        tmp_path):
    if hook == "answered":  # the victim's batch waits in do() until the items it handed
        # back have run elsewhere: the answer is its reader's, and the kill hits that batch
        fn, items = fns.wait_or_mark, waiting_items(str(tmp_path / "marker"))
    else:
        fn, items = fns.sleep_then_pid, skewed()
    b = batcher_factory(fn, routing="round-robin", size=5, interval=1.0, max_attempts=3)
    b.start()
    killed = _kill_at(b, hook)
    done = threading.Event()
    seen = []

    def watch():  # the invariant holds at every moment, not only at the end
        while not done.is_set():
            s = b.stats()
            seen.append(s.accepted == s.succeeded + s.dead_lettered + s.cancelled + s.pending)
            done.wait(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        futures = [b.submit(key, value, block=True) for key, value in items]
        b.flush()
        results = [f.result(timeout=30) for f in futures]
    finally:
        done.set()
        watcher.join()
    assert killed.is_set()
    assert seen and all(seen)
    n = len(items)
    assert sorted(r[1] for r in results) == list(range(n))
    s = b.stats()
    assert (s.accepted, s.succeeded, s.dead_lettered, s.pending) == (n, n, 0, 0)
    assert s.worker_restarts >= 1
    check_invariant(b)


@pytest.mark.timeout(60)
def test_a_steal_is_answered_while_the_victim_runs_a_batch(batcher_factory, start_method,
                                                           tmp_path):
    """Worker 0 runs a batch that ends only once an item queued behind it has run, so on
    the other worker: its reader hands the queued chunks back while its do() runs.
    Answered only between two batches, that batch would wait out its 20 s."""
    b = batcher_factory(fns.wait_or_mark, routing="round-robin", size=5, interval=1.0,
                        start_method=start_method)
    futures = [b.submit(key, value, block=True)
               for key, value in waiting_items(str(tmp_path / "marker"))]
    b.flush()
    results = [f.result(timeout=30) for f in futures]
    assert sorted(i for _, i, _ in results) == list(range(120))  # each item once
    waiter = {pid for pid, i, _ in results if 10 <= i < 15}
    assert [what for _, i, what in results if 10 <= i < 15] == ["released"] * 5
    assert {pid for pid, i, _ in results if i >= 20 and (i // 5) % 2 == 0} - waiter
    s = b.stats()
    assert s.stolen > 0
    assert (s.succeeded, s.dead_lettered, s.pending, s.failed_attempts) == (120, 0, 0, 0)


def restolen_items(first, second):
    """(key, (index, action, marker)) for fns.wait_or_mark: 18 chunks of 5 that round-robin
    sends to worker c % 2. Worker 1 gets nine chunks of work. Worker 0 gets one of work
    (its cost per item), then a batch that waits for ``first``, then queued behind it: W (a
    batch that makes ``first``, then waits for ``second``), M1 (makes ``second``), M2 and
    four more chunks of work. Worker 1, dry, takes W, M1 and M2 from worker 0 while it
    waits; W starts there and lets worker 0 go, which runs its four chunks and runs dry in
    turn while W waits: only taking M1 from behind W lets W go."""
    chunks = {2: [("wait", first)] * 5,
              4: [("mark", first), ("wait", second)] + [("work", "")] * 3,
              6: [("mark", second)] + [("work", "")] * 4}
    items = []
    for c in range(18):
        actions = chunks.get(c, [("work", "")] * 5)
        items += [(f"k{c}", (5 * c + j, action, path))
                  for j, (action, path) in enumerate(actions)]
    return items


@pytest.mark.timeout(60)
def test_items_taken_by_a_thief_can_be_taken_from_it_while_it_runs_a_batch(
        batcher_factory, start_method, tmp_path):
    """Items a thief took arrive one chunk per batch, so its reader can hand back those
    queued behind the batch it runs. Sent as one chunk, the rest of it after the first
    batch (W) was the thief's main thread's to give, once W ended: W waits out its 20 s."""
    b = batcher_factory(fns.wait_or_mark, routing="round-robin", size=5, interval=1.0,
                        start_method=start_method)
    items = restolen_items(str(tmp_path / "first"), str(tmp_path / "second"))
    futures = [b.submit(key, value, block=True) for key, value in items]
    b.flush()
    results = [f.result(timeout=30) for f in futures]
    assert sorted(i for _, i, _ in results) == list(range(len(items)))  # each item once
    waits = [what for (_, (_, action, _)), (_, _, what) in zip(items, results, strict=True)
             if action == "wait"]
    assert waits == ["released"] * 6
    by_index = {i: pid for pid, i, _ in results}
    assert by_index[21] != by_index[10] and by_index[30] != by_index[21]  # W, M1 moved
    s = b.stats()
    assert s.stolen >= 5 + 5  # W, then M1 (W, M1 and M2 first, when all is queued in time)
    assert (s.succeeded, s.dead_lettered, s.pending, s.failed_attempts) == (90, 0, 0, 0)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("routing", "steal", "seconds", "capped"), [
    ("least-loaded", True, 0.002, True), ("round-robin", True, 0.002, True),
    ("least-loaded", False, 0.002, False), ("least-loaded", True, 0.0, False)])
def test_add_many_sends_costly_items_one_batch_a_chunk_when_stealing(
        batcher_factory, routing, steal, seconds, capped):
    """With stealing on and items worth moving (batches of 10 ms here), a block of
    add_many is one batch: the rest of a larger chunk would be the main thread's to give,
    only when its batch ends. Cheap items, or no stealing, keep growing blocks."""
    b = batcher_factory(fns.sleep_then_pid, size=5, interval=1.0, steal=steal,
                        routing=routing)
    b.add("k", (-1, seconds))
    b.flush()  # its batch reported: the cost per item is known
    b._router.costs.update()  # (the collector may not have read it yet)
    chunks = []
    send = b._dispatcher.send
    adder = threading.get_ident()

    def recorded(i, segments, *args, **kwargs):
        if threading.get_ident() == adder:  # add_many's blocks, not items a steal re-sends
            chunks.append(sum(len(seg) for seg in segments))
        return send(i, segments, *args, **kwargs)

    b._dispatcher.send = recorded
    assert b.add_many((f"k{i % 3}", (i, seconds)) for i in range(200)) == 200
    b.flush()
    assert sum(chunks) == 200
    if capped:
        assert max(chunks) == 5
    else:
        assert max(chunks) > 5  # blocks grow (1, 2, 4, 8 items...) while pulls are quick


def test_a_chunk_of_items_worth_stealing_is_a_batch_or_a_few_short_ones():
    assert batches_per_chunk(2_000_000, 50) == 1  # W3's hot items: 100 ms a batch
    assert batches_per_chunk(100_000, 50) == 1  # 5 ms a batch
    assert batches_per_chunk(100_000, 10) == 5  # 1 ms a batch: five make 5 ms
    assert batches_per_chunk(20_000, 1) == 250
    assert batches_per_chunk(0, 1) == batches_per_chunk(ITEM_MIN_NS, 1) == 250  # not known


@pytest.mark.timeout(60)
def test_items_a_steal_moves_go_a_few_short_batches_a_chunk(batcher_factory):
    """Stolen items whose batches are short (one 2 ms item here) go in chunks of ~5 ms of
    work, three batches: one chunk per batch would cost the caller more than it moves."""
    b = batcher_factory(fns.sleep_then_pid, routing="round-robin", size=1, interval=1.0)
    b.add("k", (-1, 0.0))  # (starts it)
    b.flush()
    chunks = []
    send = b._dispatcher.send
    adder = threading.get_ident()

    def recorded(i, segments, *args, **kwargs):
        if threading.get_ident() != adder:  # the collector's: items a steal re-sends
            chunks.append(sum(len(seg) for seg in segments))
        return send(i, segments, *args, **kwargs)

    b._dispatcher.send = recorded
    # Round-robin, one item a chunk: one worker gets the even items, 2 ms each; the other
    # the odd ones, which cost nothing, and runs dry at once.
    futures = [b.submit(f"k{i % 7}", (i, 0.002 if i % 2 == 0 else 0.0), block=True)
               for i in range(200)]
    b.flush()
    assert sorted(f.result(timeout=30)[1] for f in futures) == list(range(200))
    assert b.stats().stolen > 0
    assert 1 < max(chunks) <= 3 and all(n <= 3 for n in chunks)  # ceil(5 / 2.x ms)


@pytest.mark.timeout(60)
def test_a_thief_killed_between_two_pieces_of_a_resend_loses_nothing(batcher_factory,
                                                                     start_method):
    """Stolen items go to the thief a few batches a chunk: a thief that dies after the first
    piece reached it, before the second is written, has both in its ledger, whatever
    became of the second's write, and both run again elsewhere (guarantee 1)."""
    b = batcher_factory(fns.sleep_then_pid, routing="round-robin", size=1, interval=1.0,
                        max_attempts=3, start_method=start_method)
    b.add("k", (-1, 0.0))  # (starts it)
    b.flush()
    recovery, send = b._collector.recovery, b._dispatcher.send
    handed_back = recovery.handed_back
    during, pieces, killed = [], [], []  # during: a re-send of stolen items runs

    def resend(segments, cost_ns):
        during.append(True)
        pieces.clear()
        try:
            return handed_back(segments, cost_ns)
        finally:
            during.clear()

    def kill_before_the_second_piece(i, segments, *args, **kwargs):
        # the collector's sends inside handed_back (not add()'s, on the test's thread)
        if during and not killed and threading.get_ident() == b._collector.ident:
            pieces.append(segments)
            if len(pieces) == 2:  # the first piece is in the thief's pipe: kill it first
                proc = b._pool.procs[i]
                os.kill(proc.pid, signal.SIGKILL)
                # dead before the write (its sentinel: nothing reaped behind the pool's back)
                killed.append(bool(wait([proc.sentinel], 10)))
        return send(i, segments, *args, **kwargs)

    recovery.handed_back = resend
    b._dispatcher.send = kill_before_the_second_piece
    futures = [b.submit(f"k{i % 7}", (i, 0.002 if i % 2 == 0 else 0.0), block=True)
               for i in range(200)]
    b.flush()
    assert killed == [True], "no re-send came in two pieces or more: nothing was tested"
    assert sorted(f.result(timeout=30)[1] for f in futures) == list(range(200))
    s = b.stats()
    assert s.worker_restarts >= 1 and s.dead_lettered == 0 and s.stolen > 0
    check_invariant(b)


@pytest.mark.timeout(30)
def test_stealing_keeps_counts_right_with_add_many_and_on_result(batcher_factory):
    got = []
    b = batcher_factory(fns.sleep_then_pid, routing="round-robin", size=5, interval=1.0,
                        on_result=lambda k, vs, rs: got.extend(v[0] for v in vs))
    for key, value in skewed():  # add(): round-robin puts every slow chunk on one worker
        b.add(key, value, block=True)
    b.flush()
    assert sorted(got) == list(range(N))
    assert b.stats().stolen > 0
    check_invariant(b)


def test_steal_option_is_checked():
    with pytest.raises(TypeError, match=r"steal must be True or False \(got str: 'yes'\)"):
        mpbatch.Batcher(fns.double, steal="yes")
    with pytest.raises(ValueError, match=r"steal=True .* routing='key'"):
        mpbatch.Batcher(fns.double, steal=True, routing="key")
    with pytest.raises(ValueError, match="steal=True needs backend='process'"):
        mpbatch.Batcher(fns.double, steal=True, backend="ray")
    # The default: on where items may move, off under "key" and on Ray.
    assert mpbatch.Batcher(fns.double)._options.steal is True
    assert mpbatch.Batcher(fns.double, routing="affinity")._options.steal is True
    assert mpbatch.Batcher(fns.double, routing="key")._options.steal is False
    assert mpbatch.Batcher(fns.double, routing="key", steal=False)._options.steal is False


def _line(counters, i, sent, done, work_ns, inside=0):
    counters.set(i, SENT, sent)
    counters.set(i, DONE, done)
    counters.set(i, WORK_NS, work_ns)
    counters.set(i, B_START, 0)
    counters.set(i, B_END, inside)
    counters.set(i, BUSY_NS, 1 if inside else 0)


def test_stealer_asks_the_busiest_worker_for_half_its_queue_once():
    counters = LoadCounters(3)
    try:
        stealer = Stealer(Costs(counters), [True, True, True])
        _line(counters, 0, 10, 10, 10 * 1_000_000)  # dry
        _line(counters, 1, 100, 5, 5 * 1_000_000, inside=5)  # 90 queued at 1 ms
        _line(counters, 2, 60, 10, 10 * 1_000_000)  # 50 queued at 1 ms
        stealer.consider()
        ask = counters.get(1, ASK)
        assert ask & ASK_ITEMS == 45 and ask >> 32 == 1
        assert counters.get(2, ASK) == 0 and counters.get(0, ASK) == 0
        stealer.consider()  # worker 1 has not answered: the next busiest is asked
        assert counters.get(1, ASK) == ask and counters.get(2, ASK) & ASK_ITEMS == 25
        stealer.answered(1)
        stealer.consider()
        assert counters.get(1, ASK) >> 32 == 2  # a new request, numbered anew
    finally:
        counters.unlink()


def test_stealer_leaves_cheap_items_and_short_queues_alone():
    counters = LoadCounters(2)
    try:
        stealer = Stealer(Costs(counters), [True, True])
        cheap = ITEM_MIN_NS // 2
        _line(counters, 0, 10, 10, 10 * cheap)
        _line(counters, 1, 100_010, 10, 10 * cheap)  # a long queue of cheap items
        stealer.consider()
        assert counters.get(1, ASK) == 0
        _line(counters, 1, 20, 10, 10 * 1_000_000)  # 10 items at 1 ms: 10 ms, too little
        stealer.consider()
        assert counters.get(1, ASK) == 0
        stealer = Stealer(Costs(counters), [False, True])  # the dry worker is still starting
        _line(counters, 1, 1010, 10, 10 * 1_000_000)
        stealer.consider()
        assert counters.get(1, ASK) == 0
    finally:
        counters.unlink()


class InProcessLoop:
    """A worker loop (worker._Loop) in this process, on real pipes and real shared memory;
    its inlet's reader thread is not started (no drains)."""

    def __init__(self, **config):
        from multiprocessing import Pipe

        from mpbatch.inlet import Inlet
        from mpbatch.worker import WorkerConfig, _Loop

        self.counters = LoadCounters(1)
        items_r, self.items_w = Pipe(duplex=False)
        drain_r, drain_w = Pipe(duplex=False)
        self.results_r, self.results_w = Pipe(duplex=False)
        self.conns = (items_r, self.items_w, drain_r, drain_w, self.results_r, self.results_w)
        self.inlet = Inlet(items_r, drain_r)
        self.loop = _Loop(0, self.inlet, self.results_w, self.counters,
                          WorkerConfig(fns.double, None, max_bytes=None, want_values=True,
                                       **config), None)

    def write(self, wire):
        tp.write_all(self.items_w.fileno(), wire)

    def chunk(self, keys, values):
        self.write(tp.chunk_frame(keys, values, None, 1 << 62))

    def reports(self):
        """Every frame the loop reported (closes the loop's end of the result pipe)."""
        self.results_w.close()
        reader, reports = tp.FrameReader(), []
        while (frames := reader.read(self.results_r.fileno())) is not None:
            reports += frames
        return reports

    def close(self):
        for conn in self.conns:
            conn.close()
        self.counters.unlink()


@pytest.fixture
def in_process():
    made = []

    def make(**config):
        made.append(InProcessLoop(**config))
        return made[-1]

    yield make
    for w in made:
        w.close()


@pytest.mark.timeout(30)
def test_worker_hands_back_the_next_items_in_stream_order(in_process):
    """The worker's side, in this process: what is held, whole queued chunks, then the front
    of the next chunk; a FLUSH stops the hand-back; one RETURNED report per request."""
    w = in_process(size=10)
    loop, counters = w.loop, w.counters
    chunks = [[("a", 0), ("b", 1), ("a", 2)], [("c", i) for i in range(3, 7)],
              [("d", i) for i in range(7, 13)]]
    for chunk in chunks:
        w.chunk([k for k, _ in chunk], [v for _, v in chunk])
    w.write(tp.FLUSH_WIRE)
    frame = w.inlet.next(5)
    loop._take_chunk(frame, *tp.read_to_worker(frame)[1:])  # chunk 0 held: 3 < size
    assert loop.held_n == 3

    counters.set(0, ASK, 1 << 32 | 9)
    loop._hand_back()  # held 3 + chunk 1 (4) + the first 2 of chunk 2
    assert (loop.pos, loop.held_n) == (13, 4)
    assert counters.get(0, DONE) == 9
    loop._flush()  # the 4 kept: items 9-12 of the stream
    counters.set(0, ASK, 2 << 32 | 100)
    loop._hand_back()  # the FLUSH comes next: nothing goes past it
    reports = w.reports()
    heads = [tp.read_to_caller(f)[:3] for f in reports]
    assert heads == [(tp.RETURNED, 0, 9), (tp.FINISHED, 9, 4), (tp.RETURNED, 13, 0)]
    batch = tp.payload_of(reports[1], tp.TO_CALLER_SIZE)[0]
    assert batch == {"d": [9, 10, 11, 12]}
    assert tp.read_to_worker(w.inlet.next(5))[0] == tp.FLUSH


@pytest.mark.timeout(30)
def test_worker_hands_back_part_of_the_chunk_it_is_running(in_process):
    """Asked between two batches of one chunk, the worker gives the chunk's next items."""
    w = in_process(size=10)
    w.chunk(["k"] * 25, list(range(25)))
    frame = w.inlet.next(5)
    w.counters.set(0, ASK, 1 << 32 | 7)  # seen once the first batch of 10 has run
    w.loop._take_chunk(frame, *tp.read_to_worker(frame)[1:])
    assert (w.loop.pos, w.loop.held_n) == (25, 8)
    w.loop._flush()
    reports = w.reports()
    heads = [tp.read_to_caller(f)[:3] for f in reports]
    assert heads == [(tp.FINISHED, 0, 10), (tp.RETURNED, 10, 7), (tp.FINISHED, 17, 8)]
    assert tp.payload_of(reports[2], tp.TO_CALLER_SIZE)[0] == {"k": list(range(17, 25))}


@pytest.mark.timeout(30)
def test_a_hand_back_that_wears_the_worker_out_ends_it_before_the_next_chunk(in_process):
    """run() answers an ask by holding the rest of a split chunk; a batch in there reaches
    max_batches, and the rest is dropped for the caller to re-send. The worker must end
    then: taking the next chunk would report it under the dropped items' positions."""
    w = in_process(size=2, max_batches=2)
    w.chunk(list("abcdef"), list(range(6)))
    w.chunk(["g", "h"], [6, 7])
    w.write(tp.STOP_WIRE)
    w.counters.set(0, ASK, 1 << 32 | 1)  # asked for one item before the first frame
    assert w.loop.run() is True  # worn out: due for recycling
    reports = w.reports()
    heads = [tp.read_to_caller(f)[:3] for f in reports]
    # item 0 handed back, two batches of the rest, and nothing after: items 5-7 are
    # unreported, for the caller to re-send
    assert heads == [(tp.RETURNED, 0, 1), (tp.FINISHED, 1, 2), (tp.FINISHED, 3, 2)]
    assert [tp.payload_of(f, tp.TO_CALLER_SIZE)[2] for f in reports[1:]] == [[2, 4], [6, 8]]


def test_a_worker_that_has_run_nothing_is_not_asked_on_the_pooled_cost():
    # Its own cost is unknown: its queue may be cheap or not. The pooled cost (here 1 ms
    # an item, from the dry worker) would make 1,000 queued items look like 1 s of work.
    counters = LoadCounters(2)
    try:
        stealer = Stealer(Costs(counters), [True, True])
        _line(counters, 0, 10, 10, 10 * 1_000_000)  # dry, 1 ms an item
        _line(counters, 1, 1000, 0, 0)  # a long queue, nothing run yet
        stealer.consider()
        assert counters.get(1, ASK) == 0
    finally:
        counters.unlink()


def _heads(w):
    return [tp.read_to_caller(f)[:3] for f in w.reports()]


def _take_next(w):
    frame = w.inlet.next(5)
    w.loop._take_chunk(frame, *tp.read_to_worker(frame)[1:])


def _four_chunks(w):
    """Chunks of 3, 4, 6 and 2 items (stream positions 0-2, 3-6, 7-12, 13-14)."""
    for key, lo, hi in (("a", 0, 3), ("b", 3, 7), ("c", 7, 13), ("d", 13, 15)):
        w.chunk([key] * (hi - lo), list(range(lo, hi)))
    _take_next(w)  # the first held: 3 < size
    w.inlet.take_all()  # as the reader does when the caller wakes it


@pytest.mark.timeout(30)
def test_the_reader_hands_back_whole_chunks_while_a_batch_runs(in_process):
    """The reader's answer (here from this thread): whole chunks queued behind what the
    main thread has, up to the number asked. The main thread then runs what it held as a
    batch of its own (a batch is one run of stream positions), and goes on after the gap."""
    w = in_process(size=10)
    _four_chunks(w)
    w.counters.set(0, ASK, 1 << 32 | 9)
    w.loop._answer_while_busy()  # chunk 1 (4 items) fits in 9; with chunk 2 (6) it would not
    assert w.loop.ask_seen == 1 << 32 | 9
    assert w.counters.get(0, DONE) == 4
    w.loop._hand_back()  # answered already: the main thread gives nothing more
    _take_next(w)  # chunk 2, after the gap: the held chunk 0 runs first
    _take_next(w)
    w.loop._flush()
    reports = w.reports()
    heads = [tp.read_to_caller(f)[:3] for f in reports]
    assert heads == [(tp.RETURNED, 3, 4), (tp.FINISHED, 0, 3), (tp.FINISHED, 7, 8)]
    assert tp.payload_of(reports[2], tp.TO_CALLER_SIZE)[0] == {"c": list(range(7, 13)),
                                                               "d": [13, 14]}


@pytest.mark.timeout(30)
def test_the_reader_leaves_a_request_no_whole_chunk_fits_to_the_main_thread(in_process):
    w = in_process(size=10)
    _four_chunks(w)
    w.counters.set(0, ASK, 1 << 32 | 2)
    w.loop._answer_while_busy()  # chunk 1 has 4 items: more than asked
    assert w.loop.ask_seen == 0
    w.loop._hand_back()  # between batches: the items held, all of them
    assert _heads(w) == [(tp.RETURNED, 0, 3)]


@pytest.mark.timeout(30)
def test_after_the_readers_answer_the_main_thread_gives_only_what_it_holds(in_process):
    """Asked again, the main thread gives what it holds, and not the chunks after the gap
    the reader made: they would take a second report, and the caller reads one per
    request. It takes up the stream after the gap."""
    w = in_process(size=10)
    _four_chunks(w)
    w.counters.set(0, ASK, 1 << 32 | 4)
    w.loop._answer_while_busy()
    w.counters.set(0, ASK, 2 << 32 | 20)
    w.loop._hand_back()
    assert (w.loop.pos, w.loop.held_n, w.inlet.front) == (3, 0, 7)
    _take_next(w)
    w.loop._flush()
    assert _heads(w) == [(tp.RETURNED, 3, 4), (tp.RETURNED, 0, 3), (tp.FINISHED, 7, 6)]


@pytest.mark.timeout(30)
def test_with_nothing_held_before_the_readers_gap_the_main_thread_gives_what_follows(
        in_process):
    """Asked again once what it held has run, the main thread has nothing before the gap:
    its one report starts after it."""
    w = in_process(size=10)
    _four_chunks(w)
    w.counters.set(0, ASK, 1 << 32 | 4)
    w.loop._answer_while_busy()  # chunk 1
    w.loop._flush()  # chunk 0, held: positions 0-2
    w.counters.set(0, ASK, 2 << 32 | 5)
    w.loop._answer_while_busy()  # chunk 2 has 6 items: more than asked
    w.loop._hand_back()  # between batches: 5 items of chunk 2, after the gap
    assert (w.loop.pos, w.loop.held_n, w.inlet.front) == (13, 1, 13)
    w.loop._flush()
    assert _heads(w) == [(tp.RETURNED, 3, 4), (tp.FINISHED, 0, 3), (tp.RETURNED, 7, 5),
                         (tp.FINISHED, 12, 1)]


@pytest.mark.timeout(30)
def test_the_reader_never_waits_to_write_its_answer(in_process):
    """While the reader waits it drains nothing, and a caller waiting for room in the item
    pipe may not be reading reports: so it answers only when no report is being written
    and the result pipe has room, and leaves the request (and the chunks) as they were."""
    w = in_process(size=10)
    _four_chunks(w)
    ask = 1 << 32 | 9
    w.counters.set(0, ASK, ask)
    with w.loop.sending:  # the main thread writes a report
        w.loop._answer_while_busy()
    assert (w.loop.ask_seen, w.inlet.front) == (0, 3)
    fd = w.results_w.fileno()
    os.set_blocking(fd, False)
    filled = 0
    try:
        while True:
            filled += os.write(fd, b"x" * 4096)
    except BlockingIOError:
        pass
    os.set_blocking(fd, True)
    answering = threading.Thread(target=w.loop._answer_while_busy)
    answering.start()
    answering.join(5)
    waited = answering.is_alive()
    os.read(w.results_r.fileno(), filled)  # the caller reads: room again
    answering.join(5)  # (a reader that waited ends now, before the pipe is closed)
    assert not waited, "the reader waited on a full result pipe"
    assert (w.loop.ask_seen, w.inlet.front) == (0, 3)
    w.loop._answer_while_busy()
    assert (w.loop.ask_seen, w.inlet.front) == (ask, 7)
    assert _heads(w) == [(tp.RETURNED, 3, 4)]


def _segment(lo, hi):
    keys = list(range(lo, hi))
    return Segment(keys, keys, None, None, 0, 0, 0)


def test_the_ledger_takes_a_range_reported_ahead_of_a_running_batch():
    ledger = WorkerLedger()
    for lo in (0, 10, 20):
        ledger.append(_segment(lo, lo + 10))
    ahead = ledger.take(15, 10)  # handed back while items 0-14 were queued or in do()
    assert [s.keys for s in ahead] == [list(range(15, 20)), list(range(20, 25))]
    assert (ledger.reported, ledger.held) == (0, 20)
    assert [s.keys for s in ledger.take(0, 15)] == [list(range(10)), list(range(10, 15))]
    assert (ledger.reported, ledger.held) == (25, 5)  # the range ahead is behind it now
    assert [(at, s.keys) for at, s in ledger.take_all()] == [(25, list(range(25, 30)))]


def test_a_ledger_with_a_range_taken_ahead_gives_the_rest_after_a_death():
    ledger = WorkerLedger()
    for lo in (0, 10, 20):
        ledger.append(_segment(lo, lo + 10))
    ledger.take(0, 4)
    ledger.take(12, 10)
    left = [(at, s.keys) for at, s in ledger.take_all()]
    assert left == [(4, list(range(4, 10))), (10, [10, 11]), (22, list(range(22, 30)))]
    assert ledger.held == 0


def _sized(lo, hi, sizes):
    keys = list(range(lo, hi))
    return Segment(keys, keys, sizes, None, 0, 0, 0)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("max_bytes", [None, 2500], ids=["by-count", "by-bytes"])
def test_a_worker_cuts_its_batches_where_batch_cuts_says(batcher_factory, max_bytes):
    """ledger.batch_cuts repeats the worker's rules (_Loop._hold_by_count, _hold_by_bytes)
    so that stolen items travel a batch a chunk: a change to either alone fails here. The
    items go as one chunk, not flagged FULL, as a re-send's piece does: add() would seal
    its chunks where max_bytes cuts (intake.py), and the worker would not have to."""
    got = {}
    b = batcher_factory(fns.batch_start_and_size, workers=1, size=7, interval=60,
                        steal=False, max_bytes=max_bytes,
                        on_result=lambda k, vs, rs: got.update(
                            (v[0], r) for v, r in zip(vs, rs, strict=True))).start()
    rng = random.Random(7)
    values = [(i, bytes(rng.randrange(10, 1200))) for i in range(300)]
    sizes = None if max_bytes is None else [len(v[1]) + 20 for v in values]
    segment = Segment([f"k{i % 3}" for i in range(300)], values, sizes, None, 0,
                      b._intake.epoch, time.monotonic_ns() + 60 * 10**9)
    with b._lock:  # as add_many's blocks are accounted for (bulk.Bulk._post)
        b._accounts.seal(300, segment.epoch)
    b._dispatcher.send(0, [segment])
    b.flush()
    cuts = batch_cuts([segment], 7, max_bytes)
    expected = [hi - lo for lo, hi in zip([0, *cuts], [*cuts, 300], strict=True)]
    assert [n for _, n in sorted(set(got.values()))] == expected
    assert b.stats().succeeded == 300
    if max_bytes is not None:
        assert min(expected[:-1]) < 7  # some batches were cut by bytes, not count


def test_segments_cut_where_a_worker_runs_each_batch():
    segments = [_segment(0, 7), _segment(7, 9), _segment(9, 20)]
    assert batch_cuts(segments, 5, None) == [5, 10, 15]
    pieces = cut(segments, [5, 10, 15])
    assert [[s.keys for s in piece] for piece in pieces] == [
        [list(range(5))], [[5, 6], [7, 8], [9]], [list(range(10, 15))],
        [list(range(15, 20))]]
    assert [[s.keys for s in side] for side in halves(segments)] == [
        [list(range(7)), [7, 8], [9]], [list(range(10, 20))]]
    assert halves([]) == ([], []) and halves([_segment(0, 1)]) == ([], [_segment(0, 1)])
    assert cut(segments, [7]) == [segments[:1], segments[1:]]  # whole segments kept
    # By bytes as the worker holds them: a batch ends before an item that would pass
    # max_bytes, and once it reaches max_bytes or size.
    sized = [_sized(0, 3, [40, 40, 30]), _sized(3, 7, [100, 10, 10, 10])]
    assert batch_cuts(sized, 5, 100) == [2, 3, 4]
    assert batch_cuts(sized, 3, 1000) == [3, 6]
