"""DeadLetter: an item group that ran out of attempts, and why (caller process)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DeadLetter:
    """Items that will not be tried again.

    The items of one failed batch that ran out of attempts together form one DeadLetter.
    """

    batch: dict[Any, list[Any]]
    """key -> values, in add() order, as do() would have received them."""
    error: BaseException
    """The last attempt's error: BatchFailed, WorkerDied, BatchTimeout, SerializationError,
    or Closed (close(timeout=) ran out before the items finished)."""
    attempts: int
    """How many times do() was tried on these items (0: never handed to do)."""
    worker: int | None
    """Index of the worker that held them at the last attempt; None if no worker was at fault
    (a result that could not be unpickled in the caller, a close() that ran out)."""
