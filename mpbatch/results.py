"""What a worker reports of a batch (worker process): do()'s return value checked, results
in stream order, failures as BatchFailed made of strings (they always pickle and unpickle).
"""

from __future__ import annotations

import traceback
from collections.abc import Mapping
from itertools import islice
from typing import Any

from . import transport as tp
from .errors import BatchFailed


def qualname(exc: BaseException) -> str:
    kind = type(exc)
    if kind.__module__ == "builtins":
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"


def failure(exc: BaseException, where: str = "do()") -> BatchFailed:
    """BatchFailed for ``exc``: strings only, so it always pickles and always unpickles."""
    try:
        text = str(exc)
    except Exception:
        text = "<str() of the exception failed>"
    name = qualname(exc)
    tb = "".join(traceback.format_exception(exc))
    message = f"{where} raised {name}: {text}" if text else f"{where} raised {name}"
    return BatchFailed(message, name, tb)


def checked_results(batch: dict, result: Any) -> tuple[dict | None, BatchFailed | None]:
    """Check what do() returned: None, or key -> one result per value of that key."""
    if result is None:
        return None, None
    if not isinstance(result, Mapping):
        return None, BatchFailed(
            f"do() must return None or a mapping key -> list of results; it returned "
            f"{type(result).__name__}", "TypeError")
    out = {}
    for key, values in batch.items():
        if key not in result:
            return None, BatchFailed(
                f"do() returned no results for key {key!r} ({len(values)} items in the batch)",
                "KeyError")
        got = result[key]
        try:
            got = list(got)
        except TypeError:
            return None, BatchFailed(
                f"do() returned {type(got).__name__} for key {key!r}; expected a list of "
                f"{len(values)} results", "TypeError")
        if len(got) != len(values):
            return None, BatchFailed(
                f"do() returned {len(got)} results for key {key!r}; expected {len(values)}, "
                f"one per item", "ValueError")
        out[key] = got
    if len(result) != len(batch):
        extra = [k for k in result if k not in batch][:3]
        return None, BatchFailed(f"do() returned results for keys not in the batch: {extra!r}",
                                 "KeyError")
    return out, None


def in_stream_order(parts: list, results: dict) -> list:
    """One result per item, in the order the items arrived.

    Looks each item's own key object up, the object _hold grouped it by: a dict finds an
    object by identity first, so even a nan key (never equal to itself) finds its group.
    """
    taken: dict = {}
    out = []
    for keys, lo, hi in parts:
        for key in islice(keys, lo, hi):
            j = taken.get(key, 0)
            taken[key] = j + 1
            out.append(results[key][j])
    return out


def unpicklable(results: dict | None, batch: dict) -> str:
    """Name the key whose result (or value) will not pickle; the slow path after a failure."""
    for part in (results or {}, batch):
        for key, values in part.items():
            for value in values:
                try:
                    tp.pickle.dumps(value, tp.PROTOCOL)
                except Exception as exc:
                    return f"key {key!r}: {type(value).__name__} ({type(exc).__name__}: {exc})"
    return "unknown item"
