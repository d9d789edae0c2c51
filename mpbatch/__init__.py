"""mpbatch: keyed batch processing across worker processes.

Imports run one way, from the scripts layer down to the worker, with no cycle:

    cli -> run, replay -> job, inputs, journal, progress, report -> batcher
    executor -> maps, calls, futures -> batcher
    batcher -> options, intake, bulk, closing, engine -> collector -> outcomes, recovery, steal
      -> dispatch, ledger, lifecycle, zygote, counters, transport -> worker -> inlet, results
    engine -> raypool (backend="ray" only; it alone imports Ray) -> rayworker -> worker

with errors, stats, deadletters, interrupts and shm beside them (imported by many, importing
none of the above). bulk and closing name the Batcher in type hints only. See batcher.py
for the data flow, and run.py for a job's.

The public names load on first use (PEP 562): a worker process imports ``mpbatch.worker``
and, through this file, would otherwise import the whole caller side (the Batcher, its
collector, concurrent.futures, logging) before it can serve its first batch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .batcher import Batcher
    from .deadletters import DeadLetter, DeadLetterStore
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
    from .executor import Executor
    from .report import Report
    from .run import run
    from .stats import Stats

# public name -> the module that defines it
_HOMES = {
    "BatchFailed": "errors",
    "BatchTimeout": "errors",
    "Batcher": "batcher",
    "Closed": "errors",
    "DeadLetter": "deadletters",
    "DeadLetterStore": "deadletters",
    "Executor": "executor",
    "Full": "errors",
    "ItemTooLarge": "errors",
    "MpbatchError": "errors",
    "Report": "report",
    "SerializationError": "errors",
    "Stats": "stats",
    "WorkerDied": "errors",
    "run": "run",
}

__all__ = [
    "BatchFailed",
    "BatchTimeout",
    "Batcher",
    "Closed",
    "DeadLetter",
    "DeadLetterStore",
    "Executor",
    "Full",
    "ItemTooLarge",
    "MpbatchError",
    "Report",
    "SerializationError",
    "Stats",
    "WorkerDied",
    "run",
]
__version__ = "0.1.0"


_MODULES = frozenset({"affinity", "batcher", "bulk", "calls", "cli", "closing", "collector",
                      "costs", "counters", "deadletters", "dispatch", "engine", "errors",
                      "executor", "futures", "inlet", "inputs", "intake", "interrupts", "job",
                      "journal", "ledger", "lifecycle", "maps", "options", "outcomes",
                      "peritem", "progress", "raypool", "rayworker", "recovery", "replay",
                      "report", "results", "ring", "shm", "stats", "steal", "transport",
                      "worker", "zygote"})


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
