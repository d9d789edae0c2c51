"""The rings that carry large values through shared memory (ring.py): placement, wrap,
refusal and reset on a real segment, a chunk's round trip through its frame, and end to
end: a ring that fills sends the rest by pipe, and a worker that dies with chunks in its
ring leaves nothing behind."""

import os
import secrets
import zlib
from multiprocessing import Pipe

import pytest

from mpbatch import lifecycle, ring
from mpbatch import transport as tp
from mpbatch.inlet import Inlet
from tests import fns

MiB = 1 << 20


@pytest.fixture
def rings():
    """Rings of two workers on a real segment, and each worker's reader of it."""
    name = f"mpbatch_{os.getpid()}_{secrets.token_hex(4)}_ring"
    made = ring.Rings(name, 2, ring.MIN_REGION)
    readers = [ring.RingReader(name, i, 2) for i in range(2)]
    yield made, readers
    for reader in readers:
        reader.close()
    made.unlink()


def _tail(rings, i):
    return rings.cells[i * rings.stride]


def _place_and_take(rings, reader, i, values):
    placed = rings.place(i, [memoryview(v) for v in values])
    assert placed is not None
    assert reader.take(tuple(map(len, values)), *placed) == values
    return placed


def test_values_come_out_as_they_went_in_and_their_space_comes_back(rings):
    made, readers = rings
    values = [os.urandom(n) for n in (10_000, 50_000, 3)]
    assert _place_and_take(made, readers[1], 1, values) == (0, 60_003)
    assert made.head[1] == _tail(made, 1) == 60_003
    assert made.head[0] == _tail(made, 0) == 0  # the other worker's ring is untouched


def test_a_chunk_that_would_cross_the_end_starts_over_at_zero(rings):
    made, readers = rings
    cap = made.capacity
    _place_and_take(made, readers[0], 0, [os.urandom(cap - 1000)])
    other = [os.urandom(20_000)]
    _place_and_take(made, readers[1], 1, other)  # a neighbour's data stays its own
    values = [os.urandom(3000), os.urandom(2000)]
    assert _place_and_take(made, readers[0], 0, values) == (0, 1000 + 5000)
    assert made.head[0] == _tail(made, 0) == cap + 5000
    assert bytes(readers[1].data[:20_000]) == other[0]


def test_no_room_until_the_worker_reads_and_a_chunk_larger_than_the_ring_never(rings):
    made, readers = rings
    half = made.capacity // 2 + 1
    first, second = os.urandom(half), os.urandom(half)
    placed = made.place(0, [first])
    assert made.place(0, [second]) is None  # the worker has not read the first yet
    assert readers[0].take((half,), *placed) == [first]
    _place_and_take(made, readers[0], 0, [second])
    assert made.place(1, [os.urandom(made.capacity + 1)]) is None


def test_reset_empties_a_ring_whose_reader_died_holding_data(rings):
    made, readers = rings
    made.place(0, [os.urandom(made.capacity - 10)])  # never read: its worker "died"
    assert made.place(0, [os.urandom(100)]) is None
    made.reset(0)
    assert made.head[0] == _tail(made, 0) == 0
    assert _place_and_take(made, readers[0], 0, [os.urandom(made.capacity)]) == (
        0, made.capacity)


def test_a_closed_ring_takes_nothing(rings):
    """close() unlinks the rings under their lock: a sender racing it writes nothing."""
    made, _ = rings
    made.unlink()
    assert made.place(0, [memoryview(os.urandom(100))]) is None


def test_a_small_dev_shm_gets_smaller_rings_or_none(monkeypatch):
    class Stat:
        f_frsize = 4096
        f_bavail = (64 * MiB) // 4096  # a container's default /dev/shm

    monkeypatch.setattr(os, "statvfs", lambda path: Stat)
    assert ring.region_bytes(2) == ring.REGION  # 8 MiB of 64: an eighth
    assert ring.region_bytes(16) == 512 << 10
    assert ring.region_bytes(64) == 0  # 128 KiB each: not worth a ring


def test_an_in_ring_chunk_round_trips_through_its_frame(rings):
    made, readers = rings
    keys = ["a", 2, ("t", 3), "a"]
    values = [os.urandom(tp.OOB_MIN), 7, os.urandom(100_000), b"small"]
    frame = tp.chunk_frame(keys, values, None, 123)
    assert type(frame) is tp.OutOfBand
    wire = tp.ring_frame(frame, *made.place(1, frame.raws))
    assert len(wire) < 200  # the values are not in it
    got = tp.split_frames(bytearray(wire))[0]
    place = tp.ring_place(got)
    assert place is not None and tp.ring_place(tp.FLUSH_FRAME) is None
    taken = tp.RingFrame(got)
    taken.values = readers[1].take(*place)
    kind, flags, n, deadline = tp.read_to_worker(taken)
    assert (kind, n, deadline) == (tp.CHUNK, 4, 123)
    assert flags & tp.OUT_OF_BAND and flags & tp.IN_RING
    assert tp.chunk_payload(taken, flags) == (keys, values, None)
    assert made.head[1] == _tail(made, 1)


def _expected(values):
    return [(len(v), zlib.crc32(v), "bytes") for v in values]


@pytest.mark.timeout(120)
def test_a_full_ring_sends_the_rest_by_pipe_and_loses_nothing(gated, start_method):
    """While the worker's first batch waits, the chunks behind it fill its ring: the rest
    cross the pipe (which the worker's reader drains). Every value comes back intact."""
    b, pids = gated(then=fns.digest, workers=1, size=1, buffer=64, start_method=start_method)
    values = [os.urandom(MiB + j) for j in range(12)]
    futures = [b.submit("k", values[0])]
    pids.readline()  # the first batch is in do(), and stays there until gate()
    rings = b._engine.pool.rings
    first = rings.head[0]
    futures += [b.submit("k", v) for v in values[1:]]
    placed = rings.head[0] - first
    assert 0 < placed < sum(map(len, values[1:])), "some chunks went by ring, some by pipe"
    gated.gate()
    assert [f.result(timeout=60) for f in futures] == _expected(values)
    assert rings.head[0] == _tail(rings, 0)  # everything placed was read


@pytest.mark.timeout(120)
def test_a_worker_killed_with_chunks_in_its_ring_loses_nothing(batcher_factory, tmp_path,
                                                                 start_method):
    """The first batch holds its worker until the ring behind it has chunks, then the
    worker exits: those chunks are re-sent from the caller's ledger to its replacement,
    whose ring starts empty (none of the dead worker's unread bytes are counted)."""
    fifo, gate = tmp_path / "started", tmp_path / "gate"
    os.mkfifo(fifo)
    do = fns.crash_first_when_gated(str(fifo), str(gate), str(tmp_path), fns.digest)
    values = [os.urandom(MiB // 2 + j) for j in range(8)]
    with fns.fifo_reader(fifo) as started:
        b = batcher_factory(do, workers=1, size=1, buffer=64, start_method=start_method,
                            max_attempts=2)
        futures = [b.submit("k", values[0])]
        started.readline()
        futures += [b.submit("k", v) for v in values[1:]]
        rings = b._engine.pool.rings
        assert rings.head[0] > _tail(rings, 0), "chunks wait in the ring"
        gate.touch()
        results = [f.result(timeout=60) for f in futures]
    assert results == _expected(values)
    assert b.stats().worker_restarts == 1
    assert rings.head[0] == _tail(rings, 0)


@pytest.mark.timeout(120)
def test_without_rings_the_pipes_carry_every_value(batcher_factory, start_method,
                                                   monkeypatch):
    """No room for the rings at start (/dev/shm full): no worker is told of them (the
    zygote is given their name before it forks any), and values go by pipe."""
    def no_room(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lifecycle, "Rings", no_room)
    values = [os.urandom(100_000 + j) for j in range(20)]
    b = batcher_factory(fns.digest, size=4, workers=2, start_method=start_method)
    futures = [b.submit(f"k{j % 3}", v) for j, v in enumerate(values)]
    assert [f.result(timeout=60) for f in futures] == _expected(values)
    assert b._engine.pool.rings is None


@pytest.mark.timeout(120)
def test_a_write_that_finds_dev_shm_full_sends_by_pipe(batcher_factory, monkeypatch):
    """os.pwritev fails (ENOSPC): that chunk and the rest of that worker's go by pipe."""
    def full(*args):
        raise OSError(28, "No space left on device")

    values = [os.urandom(100_000 + j) for j in range(20)]
    b = batcher_factory(fns.digest, size=4, workers=2).start()
    monkeypatch.setattr(os, "pwritev", full)  # the caller's: workers never call it
    futures = [b.submit(f"k{j % 3}", v) for j, v in enumerate(values)]
    assert [f.result(timeout=60) for f in futures] == _expected(values)
    rings = b._engine.pool.rings
    assert rings.head == [0, 0] and not all(rings.usable)


@pytest.mark.timeout(20)
def test_an_inlet_whose_ring_is_closed_reads_on_without_it(rings):
    """A worker lets go of its ring as it exits, while its reader thread may still drain
    the pipe: close_ring() waits for a read in progress, and later reads pass frames on
    without touching the released ring (they raised ValueError in the reader thread)."""
    made, _ = rings
    items_r, items_w = Pipe(duplex=False)
    drain_r, drain_w = Pipe(duplex=False)
    inlet = Inlet(items_r, drain_r, ring.RingReader(made.name, 0, 2))
    try:
        frame = tp.chunk_frame(["k"], [os.urandom(tp.OOB_MIN)], None, 0)
        wire = tp.ring_frame(frame, *made.place(0, frame.raws))
        os.write(items_w.fileno(), wire)
        inlet.take_all()
        assert inlet.frames[0].values == [bytes(frame.raws[0])]
        inlet.close_ring()
        second = tp.ring_frame(frame, *made.place(0, frame.raws))
        os.write(items_w.fileno(), second)
        inlet.take_all()
        after = inlet.frames[1]
        assert type(after) is bytes and after == second[4:]  # as read: its values stay put
    finally:
        for conn in (items_r, items_w, drain_r, drain_w):
            conn.close()


@pytest.mark.timeout(120)
def test_workers_recycled_with_chunks_in_their_rings_lose_nothing(batcher_factory, capfd):
    """Workers recycled every two batches while chunks wait in their rings (each
    replacement's ring starts empty): every value comes back intact, and no worker prints
    an error on its way out."""
    values = [os.urandom(200_000 + j) for j in range(40)]
    b = batcher_factory(fns.digest, size=2, workers=2, max_batches_per_worker=2)
    futures = [b.submit(f"k{j % 5}", v) for j, v in enumerate(values)]
    assert [f.result(timeout=60) for f in futures] == _expected(values)
    assert b.stats().worker_restarts >= 5
    b.close()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception ignored" not in err, err


@pytest.mark.timeout(30)
def test_a_worker_hands_back_part_of_a_chunk_whose_values_came_by_ring():
    """Asked for items between two batches of a chunk read from the ring (work stealing):
    its values were copied out as the frame was read, so the items kept run on their own
    values, and the ring is empty whatever is handed back."""
    from mpbatch.counters import ASK
    from tests.test_steal import InProcessLoop

    w = InProcessLoop(size=10)
    w.loop.do = fns.digest  # small results: nobody drains the result pipe until the end
    name = f"mpbatch_{os.getpid()}_{secrets.token_hex(4)}_ring"
    made = ring.Rings(name, 1, ring.MIN_REGION)
    w.inlet.ring = ring.RingReader(name, 0, 1)
    try:
        values = [os.urandom(tp.OOB_MIN + j) for j in range(25)]
        frame = tp.chunk_frame(["k"] * 25, values, None, 1 << 62)
        w.write(tp.ring_frame(frame, *made.place(0, frame.raws)))
        got = w.inlet.next(5)
        assert type(got) is tp.RingFrame
        w.counters.set(0, ASK, 1 << 32 | 7)  # seen once the first batch of 10 has run
        w.loop._take_chunk(got, *tp.read_to_worker(got)[1:])
        w.loop._flush()
        reports = w.reports()
        heads = [tp.read_to_caller(f)[:3] for f in reports]
        assert heads == [(tp.FINISHED, 0, 10), (tp.RETURNED, 10, 7), (tp.FINISHED, 17, 8)]
        grouped = [tp.payload_of(reports[j], tp.TO_CALLER_SIZE)[1] for j in (0, 2)]
        assert grouped == [[_expected(values[:10])], [_expected(values[17:])]]
        assert made.head[0] == _tail(made, 0)
    finally:
        w.inlet.close_ring()
        w.close()
        made.unlink()
