"""What do() returns: per-item results, None, or a bad shape that fails the batch."""

import pytest

import mpbatch
from tests import fns


def test_futures_get_their_own_results_across_keys(batcher_factory, backend):
    b = batcher_factory(fns.double, size=7)
    futs = {(f"k{i % 4}", i): b.submit(f"k{i % 4}", i) for i in range(100)}
    b.flush()
    assert all(f.result() == 2 * v for (_, v), f in futs.items())


def test_on_result_gets_key_values_and_results_in_order(batcher_factory, backend):
    calls = []
    b = batcher_factory(fns.double, size=10, workers=1,
                        on_result=lambda k, vs, rs: calls.append((k, vs, rs)))
    for i in range(20):
        b.add("a" if i % 2 else "b", i)
    b.flush()
    by_key = {}
    for k, vs, rs in calls:
        assert rs == [2 * v for v in vs]
        by_key.setdefault(k, []).extend(vs)
    assert by_key == {"a": list(range(1, 20, 2)), "b": list(range(0, 20, 2))}


def test_a_future_is_done_only_after_its_callback_ran(batcher_factory):
    """A slow callback (0.2 s) makes the order visible: the future used to be done first,
    so fut.exception() returned while dead_letters() did not have its letter yet."""
    import time

    results, letters = [], []

    def slow(record):
        def callback(*args):
            time.sleep(0.2)
            record.append(args)
        return callback

    b = batcher_factory(fns.kill_on(-1), size=1, workers=1, on_result=slow(results),
                        on_dead_letter=slow(letters))
    assert b.submit("ok", 1).result(timeout=30) == 2
    assert results == [("ok", [1], [2])]
    assert isinstance(b.submit("bad", -1).exception(timeout=30), mpbatch.WorkerDied)
    assert len(letters) == 1 and len(b.dead_letters()) == 1


def test_groups_keep_each_keys_order_with_few_keys_and_with_new_keys(batcher_factory):
    """The worker groups items two ways (in C when the last batch had few keys for its
    items, a loop when most keys were new) and chooses again after each batch: here both,
    in one stream."""
    calls = []
    b = batcher_factory(fns.double, size=3000, workers=1,
                        on_result=lambda k, vs, rs: calls.append((k, vs, rs)))
    items = [(f"k{i % 20}", i) for i in range(10_000)]  # few keys
    items += [(f"new{i}", i) for i in range(10_000, 14_000)]  # every key new
    items += [(f"k{i % 20}", i) for i in range(14_000, 20_000)]  # few again
    b.add_many(items)
    futs = [b.submit(f"k{i % 3}", i) for i in range(20_000, 20_100)]
    b.flush()
    by_key = {}
    for k, vs, rs in calls:
        assert rs == [2 * v for v in vs]
        by_key.setdefault(k, []).extend(vs)
    expected = {}
    for k, v in items + [(f"k{i % 3}", i) for i in range(20_000, 20_100)]:
        expected.setdefault(k, []).append(v)
    assert by_key == expected
    assert [f.result() for f in futs] == [2 * i for i in range(20_000, 20_100)]


def test_none_means_every_item_succeeded_with_none(batcher_factory, backend):
    calls = []
    b = batcher_factory(fns.nothing, on_result=lambda k, vs, rs: calls.append(rs))
    fut = b.submit("k", 1)
    b.flush()
    assert fut.result() is None
    assert calls == [None]
    assert b.stats().succeeded == 1


@pytest.mark.parametrize(("do", "text"), [
    (fns.returns_list, "must return None or a mapping key -> list of results; it returned list"),
    (fns.returns_missing_key, "returned no results for key 'k' (2 items in the batch)"),
    (fns.returns_short, "returned 1 results for key 'k'; expected 2, one per item"),
    (fns.returns_extra_key, "returned results for keys not in the batch: ['not-a-key']"),
])
def test_a_bad_shape_fails_the_batch_and_is_dead_lettered(batcher_factory, do, text):
    letters = []
    b = batcher_factory(do, size=2, workers=1, on_dead_letter=letters.append)
    f1, f2 = b.submit("k", 1), b.submit("k", 2)
    b.flush()
    for fut in (f1, f2):
        with pytest.raises(mpbatch.BatchFailed) as info:
            fut.result()
        assert text in str(info.value)
    assert len(letters) == 1 and letters[0].batch == {"k": [1, 2]}
    assert letters[0].attempts == 1 and letters[0].worker == 0
    assert type(letters[0].error) is mpbatch.BatchFailed and text in str(letters[0].error)
    s = b.stats()
    assert (s.succeeded, s.dead_lettered, s.pending) == (0, 2, 0)
    b.add("k", 3)  # still usable


def test_a_bad_shape_fails_even_without_futures(batcher_factory):
    b = batcher_factory(fns.returns_short, size=3, workers=1)
    b.add_many([("k", 1), ("k", 2), ("k", 3)])
    b.flush()
    assert b.stats().dead_lettered == 3
    assert "expected 3" in str(b.dead_letters()[0].error)


def test_unpicklable_result_fails_only_that_batch(batcher_factory, backend):
    b = batcher_factory(fns.returns_unpicklable, size=1, workers=1)
    fut = b.submit("locks", 1)
    b.flush()
    with pytest.raises(mpbatch.SerializationError, match="cannot be pickled, key 'locks': lock"):
        fut.result()


def test_unpicklable_exception_still_reports(batcher_factory):
    b = batcher_factory(fns.raise_unpicklable, size=1, workers=1)
    fut = b.submit("k", 1)
    b.flush()
    with pytest.raises(mpbatch.BatchFailed, match="Unpicklable: holds a lock") as info:
        fut.result()
    assert "raise Unpicklable()" in info.value.traceback


def test_result_that_cannot_be_unpickled_in_the_caller(batcher_factory):
    b = batcher_factory(fns.returns_breaks_on_load, size=1, workers=1)
    fut = b.submit("k", 1)
    b.flush()
    with pytest.raises(mpbatch.SerializationError, match="cannot be unpickled in the caller"):
        fut.result()
    letter = b.dead_letters()[0]
    assert letter.worker is None  # no worker was at fault


def test_a_callback_that_raises_is_logged_and_the_collector_goes_on(batcher_factory, caplog):
    def boom(key, values, results):
        raise RuntimeError("callback bug")

    b = batcher_factory(fns.double, size=1, on_result=boom)
    futs = [b.submit("k", i) for i in range(5)]
    b.flush()
    assert [f.result() for f in futs] == [0, 2, 4, 6, 8]
    assert b.stats().succeeded == 5
    assert "on_result raised" in caplog.text



def test_sys_exit_in_a_callback_does_not_stop_the_collector(batcher_factory, caplog):
    """sys.exit() in on_result, on_dead_letter or a Future's done-callback raises SystemExit
    in the collector thread; it used to end that thread, and flush() then waited forever."""
    import sys

    def exits(*args):
        sys.exit("stop the job")

    b = batcher_factory(fns.once_then_bad(fns.raise_value_error), size=1, on_result=exits,
                        on_dead_letter=exits)
    b.add("bad", 1)
    first = b.submit("k", 1)
    first.add_done_callback(exits)
    b.flush()
    later = [b.submit("k", i) for i in range(2, 5)]
    b.flush()
    assert first.result() == 2 and [f.result() for f in later] == [4, 6, 8]
    s = b.stats()
    assert (s.succeeded, s.dead_lettered, s.pending) == (4, 1, 0)
    assert "on_result raised" in caplog.text and "on_dead_letter raised" in caplog.text
    assert "done-callback of a Future raised" in caplog.text


def test_a_blocking_add_inside_a_callback_is_refused_not_deadlocked(batcher_factory, caplog):
    """Only the collector thread frees room, and it is the one running on_result: a wait for
    room there waited forever (and flush() and close() with it)."""
    b = batcher_factory(fns.double, size=2, buffer=2, workers=1,
                        on_result=lambda k, vs, rs: b.add("next", 0, block=True))
    b.add("k", 1)
    b.add("k", 2)
    b.flush()
    assert b.stats().succeeded == 2
    assert "cannot wait for room inside on_result" in caplog.text

def test_init_state_is_passed_and_kept(batcher_factory, backend):
    b = batcher_factory(fns.use_state, init=fns.init_state, size=3)
    futs = [b.submit("k", i) for i in range(9)]
    b.flush()
    assert [f.result() for f in futs] == [10 * i for i in range(9)]


def test_flush_inside_a_callback_is_refused_not_deadlocked(batcher_factory, caplog):
    b = batcher_factory(fns.double, size=1, on_result=lambda k, vs, rs: b.flush())
    fut = b.submit("k", 1)
    b.flush()
    assert fut.result() == 2
    assert "cannot run inside on_result" in caplog.text


def test_on_batch_gets_each_batch_as_do_got_and_returned_it(batcher_factory, backend):
    batches = []
    b = batcher_factory(fns.double, size=10, workers=2, interval=60,
                        on_batch=lambda batch, results: batches.append((batch, results)))
    b.add_many((f"k{i}", i) for i in range(1000))  # every key distinct
    b.flush()
    assert sum(len(batch) for batch, _ in batches) == 1000
    assert len(batches) == b.stats().batches <= 110  # one call per batch, not per key
    for batch, results in batches:
        assert results == {k: [2 * v for v in vs] for k, vs in batch.items()}


def test_distinct_keys_get_their_results_in_callbacks_and_futures(batcher_factory, backend):
    """A batch of distinct keys comes back as one result per item, rebuilt in the caller
    from its own items: on_result, on_batch and futures see what they always saw."""
    seen, batches = [], []
    b = batcher_factory(fns.double, size=50, workers=2, interval=60,
                        on_result=lambda key, vs, rs: seen.append((key, vs, rs)),
                        on_batch=lambda batch, results: batches.append((batch, results)))
    futs = {}
    for i in range(600):
        if i % 3 == 0:
            futs[i] = b.submit(f"k{i}", i)
        else:
            b.add(f"k{i}", i)
    b.add_many((f"m{i}", i) for i in range(600))
    b.flush()
    assert sorted(seen) == sorted([(f"k{i}", [i], [2 * i]) for i in range(600)]
                                  + [(f"m{i}", [i], [2 * i]) for i in range(600)])
    assert {i: f.result() for i, f in futs.items()} == {i: 2 * i for i in futs}
    for batch, results in batches:
        assert results == {k: [2 * v for v in vs] for k, vs in batch.items()}
    assert sum(map(len, (batch for batch, _ in batches))) == 1200


def test_distinct_keys_report_the_batch_do_made_of_them(batcher_factory):
    got = []
    b = batcher_factory(fns.rename_keys, size=10, workers=1,
                        on_result=lambda key, vs, rs: got.append((key, vs, rs)))
    b.add_many((f"k{i}", i) for i in range(10))
    b.flush()
    assert sorted(got) == sorted((f"new-k{i}", [i], [2 * i]) for i in range(10))


@pytest.mark.parametrize("keys", [list("abcd"), list("aabb")])
def test_values_do_changed_in_place_are_what_callbacks_get(batcher_factory, keys):
    """Distinct keys or not, on_result sees the batch as do() left it."""
    got = []
    b = batcher_factory(fns.change_values, size=4, workers=1, interval=60,
                        on_result=lambda key, vs, rs: got.append((key, vs, rs)))
    b.add_many(zip(keys, range(4), strict=True))
    b.flush()
    assert sorted(v for _, vs, _ in got for v in vs) == [f"changed-{i}" for i in range(4)]
    assert sorted(r for _, _, rs in got for r in rs) == [0, 1, 2, 3]


def test_a_nan_key_object_sent_in_two_chunks_keeps_every_item(batcher_factory):
    """The worker holds two nan objects (one from each chunk's pickle), each with one item;
    the caller has one object for both: its items and results are joined, none lost."""
    nan = float("nan")
    got = []
    b = batcher_factory(fns.double, size=4, workers=1, interval=60,
                        on_result=lambda key, vs, rs: got.append((key, vs, rs)))
    b.add_many([(nan, 1), ("a", 2)])
    b.add_many([(nan, 3), ("b", 4)])
    b.flush()
    assert b.stats().batches == 1
    nans = [(vs, rs) for key, vs, rs in got if key != key]
    pairs = sorted((v, r) for vs, rs in nans for v, r in zip(vs, rs, strict=True))
    assert pairs == [(1, 2), (3, 6)]
    assert sorted((k, vs, rs) for k, vs, rs in got if k == k) == [
        ("a", [2], [4]), ("b", [4], [8])]


def test_on_batch_gets_none_when_do_returns_none_and_leaves_failed_items_out(batcher_factory):
    from mpbatch.peritem import PerItem

    seen = []
    b = batcher_factory(fns.nothing, size=5, workers=1, on_batch=lambda b, r: seen.append(r))
    b.add_many(("k", i) for i in range(5))
    b.flush()
    assert seen == [None]
    got = []
    c = batcher_factory(PerItem(fns.square_unless_bad), size=4, workers=1,
                        on_batch=lambda batch, results: got.append((batch, results)))
    c.add_many(("k", v) for v in (12, 13, 14, 15))
    c.flush()
    assert got == [({"k": [12, 14, 15]}, {"k": [144, 196, 225]})]


def test_an_on_batch_that_raises_is_logged_and_its_items_succeed(batcher_factory, caplog):
    def on_batch(batch, results):
        raise SystemExit("from on_batch")

    b = batcher_factory(fns.double, size=5, workers=1, on_batch=on_batch)
    futs = [b.submit("k", i) for i in range(5)]
    b.flush()
    assert [f.result() for f in futs] == [0, 2, 4, 6, 8]
    assert "on_batch raised" in caplog.text
    assert b.stats().succeeded == 5


def test_results_checked_in_c_and_by_the_loop_agree():
    from mpbatch.results import checked_results

    batch = {"a": [1, 2], "b": [3], float("nan"): [4]}
    plain = {k: [v * 2 for v in vs] for k, vs in batch.items()}
    assert checked_results(batch, plain) == (plain, None)  # the common case, as it is
    # reordered keys, tuples, a list subclass: the loop makes plain lists in the batch's order
    other = {"b": (6,), "a": type("L", (list,), {})([2, 4])}
    other.update({k: [8] for k in batch if k not in ("a", "b")})
    out, error = checked_results(batch, other)
    assert error is None
    assert list(out) == list(batch) and [type(v) for v in out.values()] == [list] * 3
    assert list(out.values())[:2] == [[2, 4], [6]]
    _, short = checked_results(batch, {**plain, "a": [2]})
    assert "returned 1 results for key 'a'; expected 2" in str(short)
