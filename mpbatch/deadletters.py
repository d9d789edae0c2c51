"""DeadLetter: an item group that ran out of attempts, and why (caller process)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class UncomparableKey:
    """Stands for a key in DeadLetter.batch when hashing or comparing the key raised."""

    __slots__ = ("key",)

    def __init__(self, key: Any) -> None:
        self.key = key

    def __repr__(self) -> str:
        return f"UncomparableKey(<{type(self.key).__name__}>)"


@dataclass(frozen=True)
class DeadLetter:
    """Items that will not be tried again.

    The items of one failed batch that ran out of attempts together form one DeadLetter.
    """

    batch: dict[Any, list[Any]]
    """key -> values, in add() order, as do() would have received them. A key whose hash()
    or == raised while the items were grouped here stands as an UncomparableKey (the key
    is its ``.key``), one per key object."""
    error: BaseException
    """The last attempt's error: BatchFailed, WorkerDied, BatchTimeout, SerializationError,
    or Closed (close(timeout=) ran out before the items finished)."""
    attempts: int
    """How many times do() was tried on these items (0: never handed to do)."""
    worker: int | None
    """Index of the worker that held them at the last attempt; None if no worker was at fault
    (a result that could not be unpickled in the caller, a close() that ran out)."""
