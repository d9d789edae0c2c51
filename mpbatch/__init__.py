"""mpbatch: keyed batch processing across worker processes.

Modules form a straight pipeline with no import cycles:
batcher -> dispatch -> transport -> worker -> collector, with errors, stats, ledger,
deadletters and lifecycle beside them. See batcher.py for the data flow.
"""

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
