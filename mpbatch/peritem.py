"""Per-item outcomes inside a batch (worker process): one call per item, each failing alone.

``PerItem(fn)`` is a ``do`` that calls ``fn(value)`` for every item of the batch it gets. An
item whose call raises gets an ``ItemFailed`` in place of its result; the worker reports
those items as failed attempts of their own (results.item_failures), and the caller retries
or dead-letters them alone while their batch-mates succeed. ``mpbatch run --per-item`` and
``mpbatch.Executor`` are built on it. A call that kills its worker is found by poison-item
isolation, as for any batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .results import ItemFailed


class PerItem:
    """do(batch) that calls ``fn(value)`` (with ``init``: ``fn(value, state)``) per item."""

    per_item_outcomes = True  # the worker looks for ItemFailed among the results

    def __init__(self, fn: Callable[..., Any], name: str | None = None,
                 keep_exceptions: bool = False) -> None:
        self.fn = fn
        self.where = f"{name or getattr(fn, '__name__', 'the function')}()"
        self.keep = keep_exceptions  # the Executor hands callers their own exceptions

    def __call__(self, batch: dict, *state: Any) -> dict:
        fn, where, keep = self.fn, self.where, self.keep
        out = {}
        for key, values in batch.items():
            results = []
            for value in values:
                try:
                    results.append(fn(value, *state))
                except BaseException as exc:  # SystemExit too: one call failed, not the worker
                    results.append(ItemFailed.of(exc, where, keep))
            out[key] = results
        return out
