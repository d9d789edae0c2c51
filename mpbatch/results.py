"""What a worker reports of a batch (worker process): do()'s return value checked, results
in stream order, failures as BatchFailed made of strings (they always pickle and unpickle).
"""

from __future__ import annotations

import pickle
import traceback
from collections.abc import Mapping
from itertools import islice
from operator import itemgetter
from typing import Any

from . import transport as tp
from .errors import BatchFailed, MpbatchError, SerializationError


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
    if _well_formed(batch, result):
        return result, None
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


def _well_formed(batch: dict, result: Any) -> bool:
    """The common case, checked in C: a dict with the batch's keys in the batch's order and
    a list of the right length for each. (With many keys of one item each, the loop below
    cost a fifth of a worker's time.) Anything else takes the loop, which names the fault."""
    return (type(result) is dict and len(result) == len(batch)
            and list(result) == list(batch)
            and set(map(type, result.values())) == {list}  # plain lists: sent as they are
            and list(map(len, result.values())) == list(map(len, batch.values())))


def in_stream_order(parts: list, results: dict) -> list:
    """One result per item, in the order the items arrived.

    Looks each item's own key object up, the object _hold grouped it by: a dict finds an
    object by identity first, so even a nan key (never equal to itself) finds its group.
    """
    if len(results) == 1:  # one key: the order it was grouped in is the order it came in
        return next(iter(results.values()))
    taken: dict = {}
    out = []
    for keys, lo, hi in parts:
        for key in islice(keys, lo, hi):
            j = taken.get(key, 0)
            taken[key] = j + 1
            out.append(results[key][j])
    return out


def one_each(parts: list, batch: dict, n: int, given: list) -> bool:
    """True if ``batch`` is one item per key, the items' own keys and values in the order
    they came (``given``: (values, lo, hi) alongside ``parts``): as _hold grouped a run of
    distinct keys, and do() left it so. Checked in C, identity first: nan matches itself."""
    if len(batch) != n or set(map(len, batch.values())) != {1}:
        return False
    return list(batch) == _stream(parts) and \
        list(map(itemgetter(0), batch.values())) == _stream(given)


def _stream(parts: list) -> list:
    """The items of ``parts`` ((items, lo, hi) each), in order, as one list."""
    if len(parts) == 1:
        items, lo, hi = parts[0]
        return items[lo:hi] if lo or hi != len(items) else items
    return [x for items, lo, hi in parts for x in islice(items, lo, hi)]


def layout_of(parts: list, batch: dict) -> list[list[int]] | None:
    """Where each of ``batch``'s keys has its items, in batch's key order: their offsets in
    the batch's run of the stream. The caller rebuilds the batch from its own ledger with
    them (large values: sending them back doubled what crossed the pipes). None if do()
    changed the batch's keys or the lengths of its lists: then the batch itself is sent.

    Groups by each item's own key object, as _hold did (identity first: nan keys too)."""
    where: dict = {}
    offset = 0
    for keys, lo, hi in parts:
        for key in islice(keys, lo, hi):
            group = where.get(key)
            if group is None:
                group = where[key] = []
            group.append(offset)
            offset += 1
    if len(where) != len(batch):
        return None
    out = []
    for key, values in batch.items():
        group = where.get(key)
        if group is None or len(group) != len(values):
            return None
        out.append(group)
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


class ItemFailed:
    """An item's result that is an error: ``error`` (BatchFailed, or SerializationError for a
    result that would not pickle; strings only: it always crosses), and ``original``, the
    exception itself pickled, when it pickles."""

    __slots__ = ("error", "original")

    def __init__(self, error: MpbatchError, original: bytes | None = None) -> None:
        self.error = error
        self.original = original

    def __reduce__(self) -> tuple:
        return (ItemFailed, (self.error, self.original))

    @classmethod
    def of(cls, exc: BaseException, where: str, keep: bool) -> ItemFailed:
        """The failure of one call; ``keep``: also carry ``exc`` itself, pickled."""
        original = None
        if keep:
            try:
                original = pickle.dumps(exc, tp.PROTOCOL)
            except BaseException:  # a user exception that does not pickle: its text will do
                original = None
        return cls(failure(exc, where), original)

    def exception(self) -> BaseException:
        """The error to give the caller: the original exception, with the worker's traceback
        as its __cause__ (as ProcessPoolExecutor gives it), when it came and unpickles;
        else the BatchFailed that describes it."""
        if self.original is not None:
            try:
                exc = pickle.loads(self.original)
            except BaseException:  # user code (__reduce__, __init__) in the caller
                return self.error
            if isinstance(exc, BaseException):
                exc.__cause__ = self.error.__cause__
                return exc
        return self.error


def item_failures(batch: dict, results: dict,
                  parts: list) -> tuple[dict, dict, list[tuple[int, ItemFailed]] | None]:
    """Split off the items whose result is an ItemFailed (a do() with per-item outcomes):
    (batch and results without them, [(offset in the batch's stream order, ItemFailed)]),
    or the batch and results as they are and None when none failed."""
    if not any(ItemFailed in map(type, rs) for rs in results.values()):  # per item: in C
        return batch, results, None
    failed = []
    taken: dict = {}
    offset = 0
    for keys, lo, hi in parts:
        for key in islice(keys, lo, hi):
            j = taken.get(key, 0)
            taken[key] = j + 1
            result = results[key][j]
            if type(result) is ItemFailed:
                failed.append((offset, result))
            offset += 1
    kept_batch, kept_results = {}, {}
    for key, rs in results.items():
        keep = [j for j, result in enumerate(rs) if type(result) is not ItemFailed]
        if keep:
            values = batch[key]
            kept_batch[key] = [values[j] for j in keep]
            kept_results[key] = [rs[j] for j in keep]
    return kept_batch, kept_results, failed


def fail_unpicklable(results: dict, where: str) -> dict:
    """Per-item outcomes: each result that will not pickle becomes that item's failure,
    instead of failing its whole batch."""
    out = {}
    for key, rs in results.items():
        kept = []
        for result in rs:
            try:
                pickle.dumps(result, tp.PROTOCOL)
                kept.append(result)
            except BaseException as exc:  # a result's __reduce__ is user code
                error = SerializationError(
                    f"the result of {where} for key {key!r:.80} cannot be pickled "
                    f"({type(exc).__name__}: {exc}); return picklable results (plain data)")
                kept.append(ItemFailed(error))
        out[key] = kept
    return out
