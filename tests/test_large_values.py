"""Large values: frames read straight into buffers of their own (transport.FrameReader),
bytes values sent out of band after the pickle (transport.OUT_OF_BAND), and the values a
do() gets back intact, whatever the start method, path or recovery."""

import os
import random
import select
import threading
import zlib

import pytest

from mpbatch import transport as tp
from tests import fns


def _bytes_of(frame):
    return bytes(frame) if isinstance(frame, memoryview) else frame


def read_all(wire, recycle):
    """Every frame of ``wire`` as FrameReader reads it from a real pipe, written by a thread
    in pieces of random sizes; each frame is copied out before it is recycled."""
    r, w = os.pipe()
    os.set_blocking(r, False)
    rng = random.Random(5)

    def write():
        pos = 0
        while pos < len(wire):
            step = rng.randint(1, 300_000)
            pos += os.write(w, wire[pos:pos + step])
        os.close(w)

    writer = threading.Thread(target=write)
    writer.start()
    reader, got = tp.FrameReader(), []
    try:
        while True:
            try:
                frames = reader.read(r)
            except BlockingIOError:
                select.select([r], [], [], 5)  # wait for the writer
                continue
            if frames is None:
                break
            for frame in frames:
                got.append(bytes(_bytes_of(frame)))
                if recycle:
                    reader.recycle(frame)
    finally:
        writer.join()
        os.close(r)
    return got, reader


@pytest.mark.timeout(60)
@pytest.mark.parametrize("recycle", [False, True])
def test_frame_reader_reads_small_and_big_frames_from_a_real_pipe(recycle):
    rng = random.Random(11)
    sizes = [0, 3, 100, tp.BIG_FRAME - 1, tp.BIG_FRAME, 200_000, 5, 1_500_000, 70_000] * 3
    sent = [rng.randbytes(n) for n in sizes]
    got, reader = read_all(b"".join(tp.wire(f) for f in sent), recycle)
    assert got == sent
    assert not reader.pending and reader.big is None
    if recycle:  # buffers came back for reuse, no more than SPARES of them
        assert 0 < len(reader.spare) <= tp.SPARES


def test_a_frame_cut_at_eof_is_dropped_not_returned():
    r, w = os.pipe()
    os.write(w, tp.wire(b"whole") + tp.wire(bytes(tp.BIG_FRAME))[:tp.BIG_FRAME // 2])
    os.close(w)
    reader, frames = tp.FrameReader(), []
    while (got := reader.read(r)) is not None:
        frames += got
    os.close(r)
    assert frames == [b"whole"]


VALUES = [b"a" * tp.OOB_MIN, b"tiny", "text", bytearray(b"b" * 20_000),
          b"c" * (tp.OOB_MIN - 1), b"d" * 300_000, 7]


class Sub(bytes):
    pass


def test_an_out_of_band_chunk_round_trips():
    """Bytes values of OOB_MIN and more leave the pickle; everything else stays in it, and
    every value comes back equal and of its own type."""
    values = [*VALUES, Sub(b"e" * 50_000)]
    keys = [f"k{i}" for i in range(len(values))]
    parts = tp.chunk_frame(keys, values, None, 123)
    assert isinstance(parts, list)
    raws = [bytes(p) for p in parts[2:]]
    assert raws == [b"a" * tp.OOB_MIN, b"d" * 300_000]  # exactly the large bytes values
    wire = b"".join(bytes(p) for p in parts)
    assert tp.frame_size(parts) == len(wire)
    got, _ = read_all(wire, recycle=False)
    kind, flags, n, deadline = tp.read_to_worker(got[0])
    assert (kind, n, deadline) == (tp.CHUNK, len(values), 123) and flags & tp.OUT_OF_BAND
    k, v, sizes = tp.chunk_payload(got[0], flags)
    assert k == keys and v == values and sizes is None
    assert [type(x) for x in v] == [type(x) for x in values]


def test_a_chunk_of_small_values_stays_in_band():
    frame = tp.chunk_frame(["k"] * 3, [b"x" * (tp.OOB_MIN - 1), b"y" * tp.OOB_MIN, b"z"],
                           None, 0)
    assert isinstance(frame, bytes)  # chosen by the first value


def test_written_drops_what_writev_took():
    parts = [memoryview(b"abc"), memoryview(b"de"), memoryview(b"fghi")]
    tp.drop_written(parts, 4)
    assert [bytes(p) for p in parts] == [b"e", b"fghi"]
    tp.drop_written(parts, 5)
    assert parts == []


def _expected(values):
    return [(len(v), zlib.crc32(v), "bytes") for v in values]


def _large(n, seed):
    rng = random.Random(seed)
    return [rng.randbytes(rng.choice([tp.OOB_MIN, 40_000, 3 << 20, 17])) for _ in range(n)]


@pytest.mark.timeout(120)
def test_large_values_arrive_intact_by_every_path(batcher_factory, start_method):
    values = _large(40, 1)
    b = batcher_factory(fns.digest, size=4, start_method=start_method)
    futures = [b.submit(f"s{i % 3}", v) for i, v in enumerate(values)]
    got = {}

    def on_result(key, values, results):
        got.setdefault(key, []).extend(zip(values, results, strict=True))

    b2 = batcher_factory(fns.digest, size=4, start_method=start_method, on_result=on_result)
    for i, v in enumerate(values):
        b2.add(f"a{i % 3}", v, block=True)
    b2.add_many((f"m{i % 3}", v) for i, v in enumerate(values))
    b2.flush()
    assert [f.result(timeout=60) for f in futures] == _expected(values)
    pairs = [pair for k in sorted(got) for pair in got[k]]
    assert len(pairs) == 2 * len(values)
    assert all(r == (len(v), zlib.crc32(v), "bytes") for v, r in pairs)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("routing", ["least-loaded", "key"])
def test_large_values_survive_a_killed_worker(batcher_factory, tmp_path, routing):
    """The first batch kills its worker: its items (large, out of band) are sent again
    from the caller's ledger and come back intact."""
    values = _large(30, 2)
    b = batcher_factory(fns.once_then(str(tmp_path), fns.kill_self, fns.digest), size=3,
                        routing=routing, max_attempts=2)
    futures = [b.submit(f"k{i % 4}", v) for i, v in enumerate(values)]
    assert [f.result(timeout=60) for f in futures] == _expected(values)
    s = b.stats()
    assert s.worker_restarts >= 1 and s.redelivered + s.splits >= 1  # re-sent or re-run


@pytest.mark.timeout(120)
def test_on_result_and_on_batch_get_large_values_from_the_callers_ledger(batcher_factory):
    """After out-of-band chunks the worker reports where each key's items sit, not their
    values: the caller rebuilds the batch from its own items, nan keys included (two nan
    objects are two keys; no key is looked up)."""
    nan_a, nan_b = float("nan"), float("nan")
    keys = ["a", nan_a, 3, nan_b, ("t", 1)]
    rng = random.Random(3)  # every value large: every chunk goes out of band
    values = [rng.randbytes(rng.choice([tp.OOB_MIN, 40_000, 1 << 20])) for _ in range(60)]
    sent = [(keys[i % len(keys)], v) for i, v in enumerate(values)]
    per_key, batches = {}, []

    def on_result(key, vs, rs):
        per_key.setdefault(id(key) if key != key else key, []).extend(zip(vs, rs, strict=True))

    def on_batch(batch, results):
        batches.append(sum(map(len, batch.values())))
        assert list(batch) == list(results)

    b = batcher_factory(fns.digest, size=8, workers=2, on_result=on_result, on_batch=on_batch)
    b.add_many(sent)
    b.flush()
    want = {}
    for key, v in sent:
        want.setdefault(id(key) if key != key else key, []).append(v)
    assert sorted(per_key, key=repr) == sorted(want, key=repr)
    for key, pairs in per_key.items():
        assert sorted(v for v, _ in pairs) == sorted(want[key])
        assert all(r == (len(v), zlib.crc32(v), "bytes") for v, r in pairs)
    assert sum(batches) == len(sent)


@pytest.mark.timeout(60)
def test_a_do_that_changes_its_batch_gets_the_batch_it_made_reported(batcher_factory):
    """The layout report describes the items as they came; a do() that adds a key to its
    batch has the batch itself sent back instead, as with small values."""
    got = []
    b = batcher_factory(fns.digest_and_add_a_key, size=2, workers=1,
                        on_result=lambda key, vs, rs: got.append((key, len(vs), rs[0][0])))
    b.add_many([("k", b"a" * tp.OOB_MIN), ("k", b"b" * tp.OOB_MIN)])
    b.flush()
    assert sorted(got) == [("added", 1, 1), ("k", 2, tp.OOB_MIN)]
    assert b.stats().succeeded == 2
