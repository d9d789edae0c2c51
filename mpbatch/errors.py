"""Every error mpbatch raises (caller side) or records in a DeadLetter.

    MpbatchError
     ├── Full                 (also queue.Full)      add() found no room; caller's pace
     ├── Closed               (also RuntimeError)    used after close(); caller's bug
     ├── ItemTooLarge         (also ValueError)      one value exceeds max_bytes; caller's data
     ├── SerializationError   (also TypeError)       an item, result or error did not pickle
     ├── BatchFailed                                 do() raised or returned a bad shape
     ├── WorkerDied                                  the worker holding the batch exited
     └── BatchTimeout         (also TimeoutError)    do() ran past timeout=

All of them pickle: they cross pipes from workers and are stored with dead letters, so
every attribute is rebuilt from ``args`` (see ``__reduce__``).
"""

from __future__ import annotations

import queue
import signal
from typing import Any


class MpbatchError(Exception):
    """Base of every mpbatch error."""


class Full(MpbatchError, queue.Full):
    """Raised by add()/add_many() when the buffer of accepted-but-unfinished items is full.

    The caller is ahead of the workers: retry later, pass ``block=True``, or raise
    ``buffer=``. ``accepted`` says how many items of an add_many() call went in first.
    """

    def __init__(self, message: str, accepted: int = 0) -> None:
        super().__init__(message, accepted)
        self.accepted = accepted

    def __str__(self) -> str:
        return self.args[0]


class Closed(MpbatchError, RuntimeError):
    """Raised by add()/submit()/flush() after close() began; the caller's bug.

    Also the error of items dead-lettered because close(timeout=) ran out.
    """


class ItemTooLarge(MpbatchError, ValueError):
    """Raised by add() when one value, pickled, is larger than ``max_bytes``.

    Such an item could never fit a batch; split the value or raise ``max_bytes``.
    """


class SerializationError(MpbatchError, TypeError):
    """An item (at add()), a result or an error from do() could not be pickled or unpickled.

    ``accepted`` says how many items of an add_many() call went in before the bad one.
    """

    def __init__(self, message: str, accepted: int = 0) -> None:
        super().__init__(message, accepted)
        self.accepted = accepted

    def __str__(self) -> str:
        return self.args[0]


class RemoteTraceback(Exception):
    """The worker's traceback text, chained as ``__cause__`` of BatchFailed."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


class BatchFailed(MpbatchError):
    """do() raised, or returned something other than None or one result per item.

    ``exc_type`` names the original exception type, ``traceback`` holds the worker's
    traceback text (also attached as ``__cause__``). The fault is in do() or its data.
    """

    def __init__(self, message: str, exc_type: str = "", traceback: str = "") -> None:
        super().__init__(message, exc_type, traceback)
        self.exc_type = exc_type
        self.traceback = traceback
        if traceback:
            self.__cause__ = RemoteTraceback(traceback)

    def __str__(self) -> str:
        return self.args[0]


def signal_name(exitcode: int | None) -> str:
    """'SIGKILL' for exitcode -9, 'exit code 3' for 3, as multiprocessing reports them."""
    if exitcode is None:
        return "no exit code"
    if exitcode < 0:
        try:
            return signal.Signals(-exitcode).name
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


class WorkerDied(MpbatchError):
    """The worker process holding the batch exited (a signal, os._exit, a crash, the OOM killer).

    ``pid`` and ``exitcode`` (negative for a signal, as in multiprocessing) say which.
    """

    def __init__(self, message: str, pid: int | None = None, exitcode: int | None = None) -> None:
        super().__init__(message, pid, exitcode)
        self.pid = pid
        self.exitcode = exitcode

    def __str__(self) -> str:
        return self.args[0]


class BatchTimeout(MpbatchError, TimeoutError):
    """do() ran longer than ``timeout=`` seconds; its worker was killed and replaced."""


def shown(obj: Any, limit: int | None = 80) -> str:
    """repr(obj) for a message, cut at ``limit``; never raises. User objects reach messages
    made on the collector thread, where a repr() that raises (even SystemExit) must not end
    the thread, and an int too long to print becomes its size."""
    try:
        text = repr(obj)
    except ValueError:  # an int over sys.get_int_max_str_digits()
        return f"<int of {obj.bit_length()} bits>" if isinstance(obj, int) else "<unprintable>"
    except BaseException as exc:
        return f"<{type(obj).__name__} whose repr() raised {type(exc).__name__}>"
    return text if limit is None or len(text) <= limit else text[:limit] + "..."


def described(exc: BaseException) -> str:
    """'Type: message' for an exception raised by user code; never raises."""
    try:
        text = str(exc)
    except BaseException:
        text = "<str() of it raised>"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def reraise_copy(error: BaseException) -> BaseException:
    """A fresh error of the same type and message, for each future of a dead-lettered item.

    Futures raise their own copy so that tracebacks do not pile up on one shared object.
    """
    try:
        copy: Any = type(error)(*error.args)
    except Exception:
        return error
    copy.__cause__ = error.__cause__
    return copy
