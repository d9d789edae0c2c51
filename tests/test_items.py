"""Bad input gets a clear error at the call; the Batcher and its counters stay as they were."""

import threading

import pytest

import mpbatch
from tests import fns


def counters(b):
    s = b.stats()
    return (s.accepted, s.succeeded, s.dead_lettered, s.pending)


def test_unpicklable_item_names_key_and_type(batcher_factory):
    b = batcher_factory(fns.double)
    b.add("ok", 1)
    before = counters(b)
    with pytest.raises(mpbatch.SerializationError) as info:
        b.add("user:7", threading.Lock())
    assert "'user:7'" in str(info.value) and "lock" in str(info.value)
    assert counters(b) == before
    with pytest.raises(mpbatch.SerializationError, match="'user:8'"):
        b.submit("user:8", lambda: 1)
    assert counters(b) == before
    b.add("ok", 2)
    b.flush()
    assert counters(b) == (2, 2, 0, 0)


def test_unhashable_key_is_a_type_error(batcher_factory):
    b = batcher_factory(fns.double)
    with pytest.raises(TypeError, match=r"key must be hashable \(got list"):
        b.add(["a"], 1)
    assert b.stats().accepted == 0


def test_flat_tuples_of_plain_things_go_in_and_bad_tuples_are_refused(batcher_factory,
                                                                      monkeypatch):
    """add() takes a flat tuple of int, str, bytes, float, bool and None, as key or value,
    on its inlined path, unpickled (it always pickles); any other tuple is checked as
    before."""
    got = {}
    b = batcher_factory(fns.double,
                        on_result=lambda k, vs, rs: got.update(zip(vs, rs, strict=True)))
    b.add("k", 1)
    b.flush()  # running: add() may take its inlined path from here
    good = [(("user", 7), (1, "a", b"b", 2.5, None, True)), ("k", ("x",)), ("k", ())]

    def checked_path(*args):
        raise AssertionError(f"add{args[:2]} took the checked path")

    with monkeypatch.context() as patch:
        patch.setattr(b, "_accept", checked_path)
        for key, value in good:
            b.add(key, value)
    good.append(("k", (1, (2, 3))))  # nested: checked (pickled), and fine
    b.add(*good[-1])
    before = counters(b)
    with pytest.raises(mpbatch.SerializationError, match="'k'"):
        b.add("k", (1, threading.Lock()))
    with pytest.raises(mpbatch.SerializationError, match="'k'"):
        b.add("k", (1, (2, threading.Lock())))
    with pytest.raises(TypeError, match=r"key must be hashable \(got tuple"):
        b.add(("a", ["b"]), 1)
    assert counters(b) == before
    b.flush()
    assert got == {1: 2} | {value: value * 2 for _, value in good}
    assert counters(b) == (5, 5, 0, 0)


def test_checking_a_flat_tuple_of_plain_things_pickles_nothing(monkeypatch):
    """submit() and add()'s checked path size such an item without pickling it."""
    from mpbatch import intake

    class NoPickle:
        @staticmethod
        def dumps(*args):
            raise AssertionError("pickled")

    monkeypatch.setattr(intake, "pickle", NoPickle)
    assert intake.check_item(("a", 1), (1, 2.5, "xy"), None) == 16 + 3 * 9 + 2
    assert intake.check_item("a", "xyz", None) == 3
    with pytest.raises(mpbatch.SerializationError):  # a list is pickled to be checked
        intake.check_item("a", [1], None)


def test_an_add_chunk_of_tuples_is_sealed_by_the_bytes_they_hold(batcher_factory):
    """A chunk of add()'s is written to a worker once its values hold ~1 MiB (CHUNK_BYTES):
    a tuple counts its elements and the str and bytes inside, as a str or bytes value
    counts its length."""
    b = batcher_factory(fns.nothing, size=4, interval=60)
    b.add("k", 1)
    b.flush()  # running: add() takes its inlined path from here
    text, numbers = b"x" * (600 << 10), tuple(float(i) for i in range(70_000))  # ~600 KiB
    for first, second in (((1, text), (2, text)), (numbers, numbers)):
        b.add("k", first)
        assert len(b._open[0].entries) == 1
        b.add("k", second)  # ~1.2 MiB: sealed and written, 2 items short of a batch
        assert len(b._open[0].entries) == 0
        b.flush()
    assert counters(b) == (5, 5, 0, 0)


def test_full_raises_and_block_waits(batcher_factory, tmp_path, backend):
    gate = tmp_path / "gate"
    b = batcher_factory(fns.wait_for_file(str(gate)), workers=1, buffer=3, size=1)
    for i in range(3):
        b.add("k", i)
    before = counters(b)
    with pytest.raises(mpbatch.Full, match="buffer=3 x 1 workers"):
        b.add("k", 3)
    with pytest.raises(mpbatch.Full, match=r"after waiting 0\.1s"):
        b.add("k", 3, block=True, timeout=0.1)
    assert counters(b) == before
    gate.touch()  # the worker finishes, room appears, the blocked add goes in
    b.add("k", 3, block=True, timeout=20)
    b.flush()
    assert counters(b) == (4, 4, 0, 0)


def test_full_with_key_routing_is_per_worker(batcher_factory, tmp_path):
    gate = tmp_path / "gate"
    b = batcher_factory(fns.wait_for_file(str(gate), "held"), workers=2, buffer=2, size=1,
                        routing="key")
    b.add("held", 1)
    b.add("held", 2)
    with pytest.raises(mpbatch.Full, match="routing='key'"):
        b.add("held", 3)
    # Other keys that hash to the other worker still go in.
    other = next(f"k{i}" for i in range(100)
                 if b._router.for_key(f"k{i}") != b._router.for_key("held"))
    assert b.submit(other, 5).result(timeout=10) == 10
    gate.touch()
    b.flush()


def test_add_many_waits_for_room_and_times_out_with_accepted(batcher_factory, tmp_path):
    gate = tmp_path / "gate"
    b = batcher_factory(fns.wait_for_file(str(gate)), workers=1, buffer=10, size=5)
    with pytest.raises(mpbatch.Full) as info:
        b.add_many((("k", i) for i in range(100)), timeout=0.3)
    assert info.value.accepted == 10
    assert b.stats().accepted == 10
    gate.touch()
    assert b.add_many(("k", i) for i in range(100)) == 100  # waits for room instead
    b.flush()
    assert counters(b) == (110, 110, 0, 0)


def test_add_many_bad_item_keeps_the_items_before_it(batcher_factory, backend):
    b = batcher_factory(fns.double)
    items = [("k", 1), ("k", 2), ("bad", threading.Lock()), ("k", 4)]
    with pytest.raises(mpbatch.SerializationError, match="'bad'") as info:
        b.add_many(items)
    assert info.value.accepted == 2
    with pytest.raises(TypeError, match="item 1 is int"):
        b.add_many([("k", 5), 7])
    with pytest.raises(TypeError, match="key must be hashable"):
        b.add_many([(["x"], 1)])
    b.flush()
    assert counters(b) == (3, 3, 0, 0)


def test_add_many_with_max_bytes_and_key_routing(batcher_factory):
    b = batcher_factory(fns.double, max_bytes=64, routing="key")
    assert b.add_many((f"k{i % 5}", i) for i in range(500)) == 500
    with pytest.raises(mpbatch.ItemTooLarge) as info:
        b.add_many([("k", 1), ("big", "x" * 100)])
    b.flush()
    assert counters(b) == (501, 501, 0, 0)
    assert "'big'" in str(info.value)


def test_closed_after_close(batcher_factory):
    b = batcher_factory(fns.double)
    b.add("k", 1)
    b.close()
    for call in (lambda: b.add("k", 2), lambda: b.submit("k", 2),
                 lambda: b.add_many([("k", 2)]), b.flush):
        with pytest.raises(mpbatch.Closed):
            call()
    assert counters(b) == (1, 1, 0, 0)
    assert b.dead_letters() == []
