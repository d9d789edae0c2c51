"""What crosses the pipes between the caller and a worker, and how it is framed.

Every message is one frame: a fixed struct header, then a pickle, framed on the wire as
``Connection.send_bytes`` frames it (a big-endian int32 length) but written with a single
``os.write`` and read in bulk (``split_frames``): each syscall releases the GIL, and in a
process whose other thread runs Python, taking it back can cost a whole switch interval
(5 ms). One syscall per hand-over, not two or three, is what keeps the pipes full. The
header travels unpickled so that a payload which fails to unpickle still says which
items it was about.

caller -> worker (item pipe i)
    CHUNK  flags, n, deadline_ns | pickle((keys, values, sizes))  n items, as columns;
                                                            sizes None unless max_bytes;
                                                            flags SOLO, ITEM_RESULTS, FULL,
                                                            ONE_KEY (keys is [key]),
                                                            OUT_OF_BAND (after the pickle,
                                                            large bytes values raw),
                                                            IN_RING (those values are in
                                                            the worker's ring, ring.py)
           OUT_OF_BAND: count, each value's length | pickle | the values, raw
           IN_RING too: count, each value's length, offset in the ring, span | pickle
    FLUSH  -                                                run what you hold now
    STOP   -                                                run what you hold, then exit
    DEFINE n=token | cloudpickle(object)                    keep it as definitions[token]
                                                            (mpbatch.Executor's functions:
                                                            each sent once per worker)
worker -> caller (result pipe i)
    READY        pid                                        init() done, taking items
    FINISHED     start, n, ns | pickle((batch, grouped, items, failed, layout))
                                                            stream items [start, start+n) done,
                                                            ns nanoseconds inside do()
    FAILED       start, n, ns | pickle(error)               that attempt failed
    INIT_FAILED  pid      | pickle(error)                   init() raised; the worker exits
    CANCELLED    start, n                                   not run: the caller cancelled
    RETURNED     start, n                                   not run: handed back on the
                                                            caller's request (steal.py), to
                                                            run on another worker

FINISHED carries ``batch`` and ``grouped`` (a list of result lists, in the order of batch's
keys) when on_result needs them, and ``items`` (one result per item, in stream order) when a
chunk asked for ITEM_RESULTS. ``failed`` is None, or, from a do() with per-item outcomes
(peritem.py), [(offset, ItemFailed)] for the items that failed alone: they are left out of
``batch`` and ``grouped`` and are None in ``items``. After an OUT_OF_BAND chunk ``batch``
is None and ``layout`` says where each key's items sit in [start, start+n) instead
(results.layout_of): the caller rebuilds the batch from its own ledger rather than have
large values cross back. When every key of a batch held one item (a stream of distinct
keys), ``layout`` is ONE_EACH, ``batch`` and ``grouped`` are None and ``items`` holds the
results: the caller rebuilds both from its ledger, one key per item (five objects a key
crossed the pipe otherwise, and unpickling them was the caller's largest cost). The caller
matches results by position, never by looking a key up: a key that is not equal to itself
(nan) would not be found again after pickling.

``start`` is a position in the worker's item stream: the items of its chunks, in the order
they were sent. A batch is always a contiguous run of that stream, so two integers name
every item of it, and the caller maps them back to its ledger.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
from typing import Any

PROTOCOL = pickle.HIGHEST_PROTOCOL
SMALL_FRAME_ITEMS = 16  # frames of up to this many items pickle the plain way

# caller -> worker
CHUNK, FLUSH, STOP, DEFINE = 1, 2, 3, 4
SOLO = 1  # flag: run this chunk as a batch of its own (a retry), not merged with others
ITEM_RESULTS = 2  # flag: some item has a Future: report results item by item, in order
FULL = 4  # flag: no more items can join this chunk's batch (max_bytes, a full buffer): run it
ONE_KEY = 8  # flag: every item has the same key, sent once: keys is [key]
OUT_OF_BAND = 16  # flag: large bytes values follow the pickle raw (see chunk_frame)
IN_RING = 32  # flag, with OUT_OF_BAND: those values are in the worker's ring (ring_frame)
ONE_EACH = 1  # FINISHED's layout: every key of the batch held one item (see above)
_TO_WORKER = struct.Struct("<BBqq")  # kind, flags, n, deadline_ns

# worker -> caller
READY, FINISHED, FAILED, INIT_FAILED, CANCELLED, RETURNED = 1, 2, 3, 4, 5, 6
_TO_CALLER = struct.Struct("<Bqqq")  # kind, start (or pid), n, ns inside do()

TO_WORKER_SIZE = _TO_WORKER.size
TO_CALLER_SIZE = _TO_CALLER.size
FLUSH_FRAME = _TO_WORKER.pack(FLUSH, 0, 0, 0)
STOP_FRAME = _TO_WORKER.pack(STOP, 0, 0, 0)

_LENGTH = struct.Struct("!i")
_COUNT = struct.Struct("<I")
OOB_MIN = 8 << 10  # a bytes value this large travels out of band (OUT_OF_BAND)
IOV_MAX = 1024  # buffers per os.writev() (Linux's UIO_MAXIOV)
_LENGTH64 = struct.Struct("!Q")  # after a length of -1, for frames of 2 GiB and over
_PLACE = struct.Struct("<QQ")  # an IN_RING chunk's values: offset in the ring, span


def wire(frame: bytes | bytearray) -> bytes:
    """``frame`` as it crosses a pipe, length first."""
    n = len(frame)
    if n > 0x7FFFFFFF:
        return _LENGTH.pack(-1) + _LENGTH64.pack(n) + bytes(frame)
    return _LENGTH.pack(n) + bytes(frame)


FLUSH_WIRE = wire(FLUSH_FRAME)
STOP_WIRE = wire(STOP_FRAME)


def write_all(fd: int, data: bytes) -> None:
    """Write a whole wire frame (raises OSError, e.g. EPIPE once the reader is gone)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def drop_written(parts: list[memoryview], n: int) -> None:
    """Drop the ``n`` bytes written (os.writev, os.pwritev) from the head of ``parts``."""
    k = 0
    while k < len(parts) and n >= len(parts[k]):
        n -= len(parts[k])
        k += 1
    del parts[:k]
    if n:
        parts[0] = parts[0][n:]


def _length_at(buf: bytearray, pos: int) -> tuple[int, int] | None:
    """(frame length, header bytes) of the frame at ``pos``, or None if its header is cut."""
    size = len(buf) - pos
    if size < 4:
        return None
    (n,) = _LENGTH.unpack_from(buf, pos)
    if n != -1:
        return n, 4
    if size < 12:
        return None
    return _LENGTH64.unpack_from(buf, pos + 4)[0], 12


def split_frames(pending: bytearray) -> list[bytes]:
    """The complete frames at the head of ``pending``, removed from it; a partial one stays."""
    frames = []
    pos, size = 0, len(pending)
    with memoryview(pending) as view:  # one copy per frame (a bytearray slice makes two)
        while (found := _length_at(pending, pos)) is not None:
            n, head = found
            if size - pos - head < n:
                break
            frames.append(view[pos + head:pos + head + n].tobytes())
            pos += head + n
    del pending[:pos]
    return frames


READ_SIZE = 1 << 20  # a pipe widened by lifecycle holds this much
BIG_FRAME = 1 << 16  # a frame this large gets a buffer of its own (FrameReader)
SPARES = 4  # buffers of big frames kept for reuse, at most, each of at most SPARE_BYTES
SPARE_BYTES = 8 << 20


class FrameReader:
    """The frames of one non-blocking pipe, read with one copy where the bytes are many.

    Small frames come many to a read: they are read in bulk (one syscall per READ_SIZE)
    and cut out of ``pending``. A frame of BIG_FRAME bytes or more (a chunk of large
    values) is read straight into a buffer of its own as soon as its length is known, and
    handed out as a memoryview of it: copying megabytes through ``pending`` cost more
    than the pipe itself. A reader whose consumer says when it is done with such a frame
    (``recycle``) reuses its buffer: a fresh one costs a page fault per 4 KiB, which was
    a fifth of a worker's time with 16 KiB values.
    """

    __slots__ = ("big", "buf", "got", "pending", "short", "spare")

    def __init__(self) -> None:
        self.buf = bytearray(READ_SIZE >> 4)  # grows to READ_SIZE while reads fill it
        self.pending = bytearray()
        self.big: memoryview | None = None  # the big frame being filled
        self.got = 0  # bytes of it read so far
        self.short = False  # the last read took less than it asked for: the pipe is empty
        self.spare: list[bytearray] = []  # buffers of recycled big frames

    def read(self, fd: int) -> list[bytes | memoryview] | None:
        """One read from ``fd``: the frames it completed, None at EOF (a partial frame is
        dropped). Raises BlockingIOError when the pipe is empty, OSError as os.read."""
        big = self.big
        if big is not None:
            got = os.readv(fd, [big[self.got:self.got + READ_SIZE]])
            if not got:
                return None
            self.short = got < min(READ_SIZE, len(big) - self.got)
            self.got += got
            if self.got < len(big):
                return []
            self.big = None
            return [big]
        buf = self.buf
        got = os.readv(fd, [buf])  # into a buffer kept: os.read(fd, 1 MiB) allocates 1 MiB
        if not got:
            return None
        self.short = got < len(buf)
        pending = self.pending
        with memoryview(buf) as view:
            pending += view[:got]
        if not self.short and len(buf) < READ_SIZE:
            self.buf = bytearray(2 * len(buf))  # reads fill it: read more at a time
        frames: list[bytes | memoryview] = split_frames(pending)  # type: ignore[assignment]
        found = _length_at(pending, 0)
        if found is not None and found[0] >= BIG_FRAME:
            n, head = found
            big = self.big = memoryview(self._buffer(n))[:n]
            self.got = len(pending) - head
            with memoryview(pending) as view:
                big[:self.got] = view[head:]
            pending.clear()
        return frames

    def _buffer(self, n: int) -> bytearray:
        spare = self.spare
        for j, buf in enumerate(spare):
            if len(buf) >= n:
                del spare[j]
                return buf
        return bytearray(n)

    def recycle(self, frame: Any) -> None:
        """The consumer is done with ``frame`` (nothing refers to its bytes any more)."""
        if type(frame) is not memoryview:
            return
        buf = frame.obj
        try:
            frame.release()
        except BufferError:  # this very view is exported (views derived from it are not
            return  # seen here: the consumer's word that it is done is what counts)
        if len(self.spare) < SPARES and len(buf) <= SPARE_BYTES:
            self.spare.append(buf)


def chunk_frame(keys: list, values: list, sizes: list | None, deadline_ns: int,
                solo: bool = False, item_results: bool = False,
                full: bool = False) -> bytes | list:
    """A CHUNK frame for items given as columns, on the wire (one buffer, or a list of them
    for os.writev: see _out_of_band); raises if one does not pickle.

    Columns, not a list of pairs: the worker then unpickles two lists instead of a tuple
    per item (3x faster, and no tuple for its cyclic GC to track).
    """
    flags = (SOLO if solo else 0) | (ITEM_RESULTS if item_results else 0) | (FULL if full else 0)
    n = len(keys)
    if n > 1 and keys[0] is keys[-1] and keys.count(keys[0]) == n:
        # One key (an Executor's function, mpbatch run's null): sent once, not n times.
        # Keys that are equal but not the same object would be grouped together anyway.
        flags |= ONE_KEY
        keys = keys[:1]
    if values and type(values[0]) is bytes and len(values[0]) >= OOB_MIN:
        return _out_of_band(flags | OUT_OF_BAND, n, deadline_ns, keys, values, sizes)
    head = _TO_WORKER.pack(CHUNK, flags, n, deadline_ns)
    return _dumps_after(head, (keys, values, sizes), n)


class OutOfBand(list):
    """An OUT_OF_BAND chunk on the wire: the buffers for os.writev (length and header, the
    pickle, each large value), and those parts by name, for ring_frame."""

    __slots__ = ("head", "raws", "stream")


def _out_of_band(flags: int, n: int, deadline_ns: int, keys: list, values: list,
                 sizes: list | None) -> OutOfBand:
    """A CHUNK frame whose large ``bytes`` values are not copied into the pickle: they are
    written from the caller's own objects after it (os.writev), as pickle protocol 5's
    out-of-band buffers, or copied into the worker's ring (ring_frame). The payload is:
    buffer count, each buffer's length, the pickle, the buffers. Pickling 1 GiB of 64 KiB
    values into frames cost the caller a copy of each and a page fault per 4 KiB of the
    frames it allocated.

    Chosen by the first value (a chunk of large values is told from its first without a
    pass over all of them); any value below OOB_MIN, or not exactly bytes, stays in band.
    """
    wrapped = [pickle.PickleBuffer(v) if type(v) is bytes and len(v) >= OOB_MIN else v
               for v in values]
    buffers: list = []
    stream = pickle.dumps((keys, wrapped, sizes), PROTOCOL, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    table = _COUNT.pack(len(raws)) + struct.pack(f"<{len(raws)}Q", *map(len, raws))
    head = _TO_WORKER.pack(CHUNK, flags, n, deadline_ns) + table
    size = len(head) + len(stream) + sum(map(len, raws))
    length = _LENGTH.pack(size) if size <= 0x7FFFFFFF else _LENGTH.pack(-1) + _LENGTH64.pack(size)
    frame = OutOfBand([length + head, stream, *raws])
    frame.head, frame.stream, frame.raws = head, stream, raws
    return frame


def ring_frame(frame: OutOfBand, offset: int, span: int) -> bytes:
    """``frame`` once its values are in the worker's ring at ``offset``, taking ``span``
    bytes of it (ring.Rings.place): the header, where they are, and the pickle."""
    head = bytearray(frame.head)
    head[1] |= IN_RING  # the flags byte of _TO_WORKER
    return wire(bytes(head) + _PLACE.pack(offset, span) + frame.stream)


def ring_place(frame: bytes | memoryview) -> tuple[tuple[int, ...], int, int] | None:
    """(each value's length, offset, span) of an IN_RING chunk, for the worker's
    ring.RingReader.take; None for any other frame."""
    kind, flags = frame[0], frame[1]
    if kind != CHUNK or not flags & IN_RING:
        return None
    (count,) = _COUNT.unpack_from(frame, TO_WORKER_SIZE)
    at = TO_WORKER_SIZE + _COUNT.size
    lengths = struct.unpack_from(f"<{count}Q", frame, at)
    return (lengths, *_PLACE.unpack_from(frame, at + 8 * count))


class RingFrame(bytes):
    """An IN_RING chunk as the worker holds it: the frame, and its values, already copied
    out of the ring (``values``)."""

    values: list[bytes]


def frame_size(frame: bytes | list) -> int:
    """Bytes of a wire frame: one buffer, or a list of them (an out-of-band chunk)."""
    return len(frame) if not isinstance(frame, list) else sum(map(len, frame))


def chunk_payload(frame: Any, flags: int) -> Any:
    """(keys, values, sizes) of a CHUNK frame (may raise: the receiver decides what fails).
    Out-of-band values become bytes again, each copied out of the frame once (as an
    in-band pickle would), or out of the ring as the frame was read (RingFrame)."""
    if not flags & OUT_OF_BAND:
        return payload_of(frame, TO_WORKER_SIZE)
    view = memoryview(frame)
    (count,) = _COUNT.unpack_from(view, TO_WORKER_SIZE)
    at = TO_WORKER_SIZE + _COUNT.size
    if flags & IN_RING:
        return pickle.loads(view[at + 8 * count + _PLACE.size:], buffers=frame.values)
    lengths = struct.unpack_from(f"<{count}Q", view, at)
    end = len(view)
    buffers = []
    for length in reversed(lengths):
        buffers.append(view[end - length:end].tobytes())
        end -= length
    buffers.reverse()
    return pickle.loads(view[at + 8 * count:end], buffers=buffers)


def _dumps_after(head: bytes, obj: Any, items: int) -> bytes:
    """``wire(head + pickle.dumps(obj))`` in one buffer, without the pickler's memo if it can.

    Items are independent values, so the memo (which makes every tuple cost a dict
    insert) buys nothing here: without it a chunk pickles about 2.5x faster. Fast mode
    cannot handle a self-referencing value; such a chunk takes the ordinary path. So does
    a frame of a few ``items``: setting up a Pickler and a buffer costs more than the memo
    saves (a one-item frame: ~10 us instead of ~19 us when the code is cold, as it is
    for every item that reaches an idle worker).
    """
    if items <= SMALL_FRAME_ITEMS:
        return wire(head + pickle.dumps(obj, PROTOCOL))
    buf = io.BytesIO()
    buf.write(b"\0\0\0\0")  # the length, filled in below
    buf.write(head)
    pickler = pickle.Pickler(buf, PROTOCOL)
    pickler.fast = True
    try:
        pickler.dump(obj)
    except (RecursionError, ValueError):
        return wire(head + pickle.dumps(obj, PROTOCOL))
    n = buf.tell() - 4
    if n > 0x7FFFFFFF:
        return wire(buf.getvalue()[4:])
    with buf.getbuffer() as view:
        _LENGTH.pack_into(view, 0, n)
    return buf.getvalue()


def define_frame(token: int, blob: bytes) -> bytes:
    """A DEFINE frame, on the wire: ``blob`` is an object pickled with cloudpickle."""
    return wire(_TO_WORKER.pack(DEFINE, 0, token, 0) + blob)


def read_to_worker(frame: bytes) -> tuple[int, int, int, int]:
    """(kind, flags, n, deadline_ns) of a caller -> worker frame."""
    return _TO_WORKER.unpack_from(frame)


def caller_frame(kind: int, start: int, n: int, payload: Any = None, ns: int = 0) -> bytes:
    """A worker -> caller frame, on the wire; pickling ``payload`` may raise."""
    head = _TO_CALLER.pack(kind, start, n, ns)
    if payload is None:
        return wire(head)
    return _dumps_after(head, payload, n)


def read_to_caller(frame: bytes) -> tuple[int, int, int, int]:
    """(kind, start, n, ns) of a worker -> caller frame."""
    return _TO_CALLER.unpack_from(frame)


def payload_of(frame: bytes, header_size: int) -> Any:
    """Unpickle what follows the header (may raise: the receiver decides what fails)."""
    return pickle.loads(memoryview(frame)[header_size:])
