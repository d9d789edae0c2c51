"""mpbatch: keyed batch processing across worker processes.

Modules form a straight pipeline with no import cycles:
batcher -> dispatch -> transport -> worker -> collector, with counters, errors, stats,
ledger, deadletters and lifecycle beside them. See batcher.py for the data flow.

The public names load on first use (PEP 562): a worker process imports ``mpbatch.worker``
and, through this file, would otherwise import the whole caller side (the Batcher, its
collector, concurrent.futures, logging) before it can serve its first batch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .batcher import Batcher
    from .deadletters import DeadLetter
    from .errors import (
        BatchFailed,
        BatchTimeout,
        Closed,
        Full,
        ItemTooLarge,
        MpbatchError,
        SerializationError,
        WorkerDied,
    )
    from .stats import Stats

# public name -> the module that defines it
_HOMES = {
    "BatchFailed": "errors",
    "BatchTimeout": "errors",
    "Batcher": "batcher",
    "Closed": "errors",
    "DeadLetter": "deadletters",
    "Full": "errors",
    "ItemTooLarge": "errors",
    "MpbatchError": "errors",
    "SerializationError": "errors",
    "Stats": "stats",
    "WorkerDied": "errors",
}

__all__ = [
    "BatchFailed",
    "BatchTimeout",
    "Batcher",
    "Closed",
    "DeadLetter",
    "Full",
    "ItemTooLarge",
    "MpbatchError",
    "SerializationError",
    "Stats",
    "WorkerDied",
]
__version__ = "0.1.0"


_MODULES = frozenset({"batcher", "bulk", "closing", "collector", "counters", "deadletters",
                      "dispatch", "engine", "errors", "inlet", "intake", "interrupts", "ledger",
                      "lifecycle", "options", "outcomes", "recovery", "results", "stats",
                      "transport", "worker", "zygote"})


def __getattr__(name: str) -> Any:
    if name in _MODULES:  # ``mpbatch.dispatch`` worked when this file imported everything
        return importlib.import_module(f".{name}", __name__)
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'mpbatch' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
