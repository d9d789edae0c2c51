"""Ctrl-C held back while accepted items move between the caller's structures.

Python runs a SIGINT handler in the main thread between two bytecodes, so the default one
can raise KeyboardInterrupt anywhere: between popping items from an open chunk and recording
them in a worker's ledger (the items would be counted by no one and close() would wait for
them forever), or halfway through writing a frame to a worker's pipe (the rest of that
worker's stream would be misread). Inside ``held_interrupt()`` a SIGINT is noted instead,
and its handler runs when the block ends, once the items are where they belong.

Only the main thread runs signal handlers, so elsewhere (the collector thread, the user's own
threads) the block costs one comparison. Nothing is held while the caller waits for room or
for outcomes: those waits stay interruptible.
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
_MAIN = threading.main_thread().ident


class held_interrupt:  # lower case: read as a function, ``with held_interrupt():``
    """Hold a SIGINT that arrives inside the block; run its handler at the end of it."""

    __slots__ = ("got", "old")

    def __enter__(self) -> held_interrupt:
        self.old: Any = None
        if threading.get_ident() != _MAIN:
            return self
        old = _sig.getsignal(SIGINT)
        # SIG_DFL / SIG_IGN / a C handler raise nothing in Python; an outer block holds it.
        if not callable(old) or isinstance(getattr(old, "__self__", None), held_interrupt):
            return self
        self.got: tuple[int, FrameType | None] | None = None
        self.old = old
        _sig.signal(SIGINT, self._note)
        return self

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.got = (signum, frame)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        old = self.old
        if old is None:
            return
        _sig.signal(SIGINT, old)
        if self.got is not None:
            old(*self.got)  # the default handler raises KeyboardInterrupt here
