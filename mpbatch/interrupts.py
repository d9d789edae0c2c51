"""Ctrl-C held back while accepted items move between the caller's structures.

Python runs a SIGINT handler in the main thread between two bytecodes, so the default one
can raise KeyboardInterrupt anywhere: between popping items from an open chunk and recording
them in a worker's ledger (the items would be counted by no one and close() would wait for
them forever), or halfway through writing a frame to a worker's pipe (the rest of that
worker's stream would be misread). Inside ``held_interrupt()`` a SIGINT is noted instead,
and its handler runs when the block ends, once the items are where they belong.

Only the main thread runs signal handlers, so elsewhere (the collector thread, the user's own
threads) the block costs one comparison. Nothing is held while the caller waits for room or
for outcomes: those waits stay interruptible. A write that waits for room in a worker's pipe
asks ``pending()`` and gives that worker up a second after a Ctrl-C (lifecycle._write).
"""

from __future__ import annotations

import threading
from types import FrameType, TracebackType
from typing import Any

try:  # the C module under `signal`: its calls skip the enum wrapping, ~10x cheaper each
    import _signal as _sig
except ImportError:  # pragma: no cover - other interpreters
    import signal as _sig  # type: ignore[no-redef]

SIGINT = 2


class held_interrupt:  # lower case: read as a function, ``with held_interrupt():``
    """Hold a SIGINT that arrives inside the block; run its handler at the end of it.

    ``pending()`` tells a block that waits (a write to a full pipe) that a Ctrl-C came, so
    it can give up instead of holding the interrupt for as long as the wait lasts.
    """

    __slots__ = ("got", "old", "outer")

    def __enter__(self) -> held_interrupt:
        self.old: Any = None
        self.got: tuple[int, FrameType | None] | None = None
        self.outer: held_interrupt | None = None
        if threading.get_ident() != threading.main_thread().ident:
            return self
        old = _sig.getsignal(SIGINT)
        if isinstance(getattr(old, "__self__", None), held_interrupt):
            self.outer = old.__self__  # an outer block holds it, and will run the handler
            return self
        if not callable(old):  # SIG_DFL / SIG_IGN / a C handler: nothing raised in Python
            return self
        self.old = old
        _sig.signal(SIGINT, self._note)
        return self

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.got = (signum, frame)

    def pending(self) -> bool:
        """A Ctrl-C arrived inside this block (or the block that holds it)."""
        return self.got is not None or (self.outer is not None and self.outer.got is not None)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        old = self.old
        if old is None:
            return
        if _sig.getsignal(SIGINT) == self._note:  # else the block installed its own: keep it
            try:
                _sig.signal(SIGINT, old)
            except BaseException:
                # signal() first runs other pending handlers (SIGALRM, SIGTERM), which may
                # raise: restore anyway, or every later Ctrl-C would be swallowed.
                _sig.signal(SIGINT, old)
                raise
        if self.got is not None:
            old(*self.got)  # the default handler raises KeyboardInterrupt here


def wait(cond: threading.Condition, timeout: float | None = None) -> bool:
    """``cond.wait(timeout)``, the lock held again if a Ctrl-C ends it (hold the lock once).

    Condition.wait lets go of its lock before the ``try`` whose ``finally`` takes it back,
    and takes it back with an acquire that a signal's handler may end: a KeyboardInterrupt
    raised in either gap left the lock let go, and the caller's ``with lock:`` then failed
    with "RuntimeError: cannot release un-acquired lock" in place of the KeyboardInterrupt
    (seen once in CI, the second Ctrl-C of close()), which no longer reached close()'s
    handling. Every wait here holds its lock once, so one acquire restores it."""
    try:
        return cond.wait(timeout)
    except BaseException:
        if not cond._is_owned():  # type: ignore[attr-defined]
            cond.acquire()
        raise
