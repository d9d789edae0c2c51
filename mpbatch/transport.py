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
                                                            ONE_KEY (keys is [key])
    FLUSH  -                                                run what you hold now
    STOP   -                                                run what you hold, then exit
    DEFINE n=token | cloudpickle(object)                    keep it as definitions[token]
                                                            (mpbatch.Executor's functions:
                                                            each sent once per worker)
worker -> caller (result pipe i)
    READY        pid                                        init() done, taking items
    FINISHED     start, n, ns | pickle((batch, grouped, items, failed))
                                                            stream items [start, start+n) done,
                                                            ns nanoseconds inside do()
    FAILED       start, n, ns | pickle(error)               that attempt failed
    INIT_FAILED  pid      | pickle(error)                   init() raised; the worker exits
    CANCELLED    start, n                                   not run: the caller cancelled

FINISHED carries ``batch`` and ``grouped`` (a list of result lists, in the order of batch's
keys) when on_result needs them, and ``items`` (one result per item, in stream order) when a
chunk asked for ITEM_RESULTS. ``failed`` is None, or, from a do() with per-item outcomes
(peritem.py), [(offset, ItemFailed)] for the items that failed alone: they are left out of
``batch`` and ``grouped`` and are None in ``items``. The caller matches results by
position, never by looking a key up: a key that is not equal to itself (nan) would not be
found again after pickling.

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
_TO_WORKER = struct.Struct("<BBqq")  # kind, flags, n, deadline_ns

# worker -> caller
READY, FINISHED, FAILED, INIT_FAILED, CANCELLED = 1, 2, 3, 4, 5
_TO_CALLER = struct.Struct("<Bqqq")  # kind, start (or pid), n, ns inside do()

TO_WORKER_SIZE = _TO_WORKER.size
TO_CALLER_SIZE = _TO_CALLER.size
FLUSH_FRAME = _TO_WORKER.pack(FLUSH, 0, 0, 0)
STOP_FRAME = _TO_WORKER.pack(STOP, 0, 0, 0)

_LENGTH = struct.Struct("!i")
_LENGTH64 = struct.Struct("!Q")  # after a length of -1, for frames of 2 GiB and over


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


def split_frames(pending: bytearray) -> list[bytes]:
    """The complete frames at the head of ``pending``, removed from it; a partial one stays."""
    frames = []
    pos, size = 0, len(pending)
    while size - pos >= 4:
        (n,) = _LENGTH.unpack_from(pending, pos)
        head = 4
        if n == -1:
            if size - pos < 12:
                break
            (n,) = _LENGTH64.unpack_from(pending, pos + 4)
            head = 12
        if size - pos - head < n:
            break
        frames.append(bytes(pending[pos + head:pos + head + n]))
        pos += head + n
    del pending[:pos]
    return frames


def chunk_frame(keys: list, values: list, sizes: list | None, deadline_ns: int,
                solo: bool = False, item_results: bool = False, full: bool = False) -> bytes:
    """A CHUNK frame for items given as columns, on the wire; raises if one does not pickle.

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
    head = _TO_WORKER.pack(CHUNK, flags, n, deadline_ns)
    return _dumps_after(head, (keys, values, sizes), n)


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
