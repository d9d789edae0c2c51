"""What crosses the item pipes: frames split as Connection.send_bytes writes them, and a
busy worker's pipe is emptied for the caller."""

import os
import random
import struct
import threading
import time
from multiprocessing import Pipe

import pytest

from mpbatch import transport as tp
from mpbatch.inlet import TICK, Inlet
from mpbatch.transport import split_frames as _split_frames
from mpbatch.transport import wire
from tests import fns


def wire_of(frames):
    """The bytes a Connection writes for ``frames``, read back from a real pipe."""
    r, w = Pipe(duplex=False)
    writer = threading.Thread(target=lambda: [w.send_bytes(f) for f in frames] and w.close())
    writer.start()
    wire = bytearray()
    with open(r.fileno(), "rb", closefd=False) as raw:
        for _ in frames:  # a thread writes: a 64 KiB pipe must not block the test
            head = raw.read(4)
            (n,) = struct.unpack("!i", head)
            wire += head + raw.read(n)
    writer.join()
    return wire


def test_frames_split_at_any_read_boundary():
    rng = random.Random(3)
    sent = [rng.randbytes(rng.choice([0, 1, 5, 300, 20_000, 70_000])) for _ in range(40)]
    wire = wire_of(sent)
    got, pending, pos = [], bytearray(), 0
    while pos < len(wire):  # feed it in reads of random sizes, as os.read returns them
        step = rng.randint(1, 50_000)
        pending += wire[pos:pos + step]
        pos += step
        got += _split_frames(pending)
    assert got == sent
    assert not pending


def test_the_64_bit_length_form():
    payload = b"x" * 10
    wire = bytearray(struct.pack("!i", -1) + struct.pack("!Q", len(payload)) + payload)
    assert _split_frames(bytearray(wire[:8])) == []
    assert _split_frames(wire) == [payload]
    assert not wire


def test_wire_is_what_connection_send_bytes_writes():
    frames = [b"", b"abc", bytes(range(256)) * 100]
    assert wire_of(frames) == b"".join(wire(f) for f in frames)


def assert_adds_return_while_held(b, open_gate, held_in, succeeded):
    """Add 30 items of 100 kB (3 MB: three times a 1 MiB pipe) from a thread: they must all
    be in within 20 s while the worker is held in ``held_in``; ``open_gate`` then lets it
    go on, and every item succeeds."""
    def adds():
        for _ in range(30):
            b.add("big", b"x" * 100_000)

    adder = threading.Thread(target=adds)
    adder.start()
    adder.join(20)
    held = adder.is_alive()
    open_gate()
    adder.join()
    assert not held, f"add() waited for {held_in} to end: nobody emptied the worker's item pipe"
    b.flush()
    s = b.stats()
    assert s.succeeded == succeeded and s.pending == 0 and s.dead_lettered == 0


@pytest.mark.timeout(60)
def test_a_worker_busy_in_do_does_not_hold_up_add_on_a_full_pipe(gated, start_method):
    """Its main thread is inside do(); its reader thread empties the 1 MiB item pipe when
    the caller finds it full, so 3 MB of adds return before the batch ends."""
    b, started = gated(workers=1, size=1, buffer=100, start_method=start_method)
    b.add("first", b"")
    started.readline()  # the worker is inside do() until the gate opens
    assert_adds_return_while_held(b, gated.gate, "do()", succeeded=31)


@pytest.fixture
def inlet():
    """A worker's _Inlet on real pipes, and the caller's end of its item pipe."""
    items_r, items_w = Pipe(duplex=False)
    drain_r, drain_w = Pipe(duplex=False)
    yield Inlet(items_r, drain_r), items_w
    for conn in (items_r, items_w, drain_r, drain_w):
        conn.close()


@pytest.mark.timeout(20)
def test_inlet_waits_longer_than_poll_can(inlet):
    """interval may exceed poll()'s limit (2**31 - 1 ms, ~24.8 days): a held batch must
    wait, not crash its worker (which then restarted over and over)."""
    inlet, items_w = inlet
    got = []
    waiter = threading.Thread(target=lambda: got.append(inlet.next(30 * 86400)))
    waiter.start()
    items_w.send_bytes(tp.FLUSH_FRAME)
    waiter.join(10)
    assert got == [tp.FLUSH_FRAME]


def test_inlet_does_not_tick_early(inlet):
    """poll() counts whole milliseconds: the wait for a deadline 1.5 ms away is split into
    poll(1) and a sleep, never cut short."""
    inlet, _ = inlet
    for wait in (0.0005, 0.0015, 0.0101):
        start = time.monotonic()
        assert inlet.next(wait) is TICK
        assert time.monotonic() - start >= wait


@pytest.mark.timeout(60)
def test_a_worker_still_in_init_does_not_hold_up_add_on_a_full_pipe(batcher_factory, tmp_path,
                                                                      start_method):
    """init() may take seconds (a model loads): the worker's reader drains its item pipe from
    the start, so 3 MB of adds return while init() still runs."""
    fifo, gate = tmp_path / "init", tmp_path / "gate"
    os.mkfifo(fifo)
    b = batcher_factory(fns.use_state, init=fns.init_announce_then_wait(str(fifo), str(gate)),
                        workers=1, size=1, buffer=100, start_method=start_method).start()
    with fns.fifo_reader(fifo) as inits:
        inits.readline()  # the worker is inside init() until the gate opens
        assert_adds_return_while_held(b, gate.touch, "init()", succeeded=30)
