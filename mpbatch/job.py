"""A job's do() (worker process): decode the input, key and group it, call the user's
function, encode the output, so that the caller only moves bytes.

``run()`` and ``mpbatch run`` hand the Batcher a Job in place of the user's function. Its
items are ``(line, payload)`` pairs, ``line`` the item's place in the input (what the
journal and the dead-letter store name it by), ``payload`` a raw JSON Lines line, a CSV row
(a list of fields) or an item as it is. A line that does not decode fails alone (per-item
outcomes, peritem.py), as does, with ``per_item``, a call that raises. With ``lines``, each
result is the item's output line, JSON: ``{"key": ..., "input": ..., "result": ...}``.
"""

from __future__ import annotations

import json
import json.encoder
import json.scanner
from collections.abc import Callable
from typing import Any

from .results import ItemFailed, checked_results

FORMATS = ("jsonl", "csv", "text")
_scan = json.scanner.make_scanner(json.JSONDecoder())  # C: json.loads without its wrappers
_json_encode_any = json.JSONEncoder(allow_nan=False).encode
_json_str = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]


def _json_decode(text: str) -> Any:
    """json.loads(text) for a stripped line: the C scanner alone, ~3x faster on a short
    record than loads(), whose Python layers cost more than the parse."""
    try:
        obj, end = _scan(text, 0)
    except StopIteration as exc:
        raise json.JSONDecodeError("Expecting value", text, exc.value) from None
    if end != len(text):
        raise json.JSONDecodeError("Extra data", text, end)
    return obj


def _json_encode(value: Any) -> str:
    """json.dumps(value, allow_nan=False), scalars without the encoder (~8x faster)."""
    kind = type(value)
    if kind is int:
        return int.__repr__(value)
    if kind is str:
        return _json_str(value)
    if value is None:
        return "null"
    if kind is bool:
        return "true" if value else "false"
    return _json_encode_any(value)


class Job:
    """do(batch) for run(): ``{key: [(line, payload), ...]}`` -> ``{key: [result, ...]}``."""

    per_item_outcomes = True  # the worker looks for ItemFailed among the results

    def __init__(self, fn: Callable[..., Any], *, name: str, per_item: bool = False,
                 fmt: str | None = None, header: list[str] | None = None,
                 key: Callable[[Any], Any] | str | None = None, lines: bool = False,
                 keep_values: bool = True, results_too: bool = False) -> None:
        self.fn = fn
        self.where = f"{name}()"
        self.per_item = per_item
        self.fmt = fmt  # None: payloads are items already
        self.header = header  # csv: the field names
        self.key = key  # a field name, a callable, or None: the key the caller gave
        self.lines = lines  # results are output lines
        self.results_too = results_too  # with lines: (result, line) pairs
        # Without it, the values a worker sends back (for on_result) are the lines alone.
        self.keep_values = keep_values

    def __call__(self, batch: dict, *state: Any) -> dict:
        out: dict = {}
        for caller_key, pairs in batch.items():
            texts, items, failed = self._decoded(pairs)
            keys = self._keyed(caller_key, items, failed)
            results = self._called(keys, items, failed, state)
            out[caller_key] = self._outputs(keys, items, texts, results, failed)
            if not self.keep_values:
                pairs[:] = [line for line, _ in pairs]  # sent back instead of the payloads
        return out

    def _decoded(self, pairs: list) -> tuple[list | None, list, dict[int, ItemFailed]]:
        """(each JSON line's text, for the output to echo; the items; the failed ones)."""
        items: list = []
        failed: dict[int, ItemFailed] = {}
        texts: list | None = [] if self.fmt == "jsonl" else None
        for j, (line, payload) in enumerate(pairs):
            try:
                if texts is not None:  # the common case, inline: ~1 us a line matters here
                    text = payload.decode().strip() if type(payload) is bytes else payload
                    texts.append(text)
                    items.append(_json_decode(text))
                else:
                    items.append(self._decode(payload, line))
            except Exception as exc:
                items.append(None)
                failed[j] = ItemFailed.of(exc, f"reading line {line}", keep=False)
        return texts, items, failed

    def _decode(self, payload: Any, line: int) -> Any:
        if self.fmt == "jsonl":
            text = payload.decode() if type(payload) is bytes else payload
            return _json_decode(text.strip())
        if self.fmt == "csv":
            if len(payload) != len(self.header):  # type: ignore[arg-type]
                raise ValueError(f"line {line} has {len(payload)} fields; the header has "
                                 f"{len(self.header)}")  # type: ignore[arg-type]
            return dict(zip(self.header, payload, strict=True))  # type: ignore[arg-type]
        if self.fmt == "text":
            text = payload.decode() if isinstance(payload, bytes) else payload
            return text.rstrip("\r\n")
        return payload

    def _keyed(self, caller_key: Any, items: list, failed: dict[int, ItemFailed]) -> list:
        """Each item's key (None for the failed ones)."""
        key = self.key
        if key is None:
            return [caller_key] * len(items)
        keys = []
        for j, item in enumerate(items):
            if j in failed:
                keys.append(None)
                continue
            try:
                keys.append(item.get(key) if isinstance(key, str) else key(item))
            except Exception as exc:
                keys.append(None)
                failed[j] = ItemFailed.of(exc, "the key of an item", keep=False)
        return keys

    def _called(self, keys: list, items: list, failed: dict[int, ItemFailed],
                state: tuple) -> list:
        """One result per item (None where it failed already): fn per item with
        ``per_item`` (a raise fails that item alone), else fn once on the batch grouped by
        key (a raise, or a bad shape, fails the whole batch)."""
        fn = self.fn
        results: list = [None] * len(items)
        if self.per_item:
            for j, item in enumerate(items):
                if j not in failed:
                    try:
                        results[j] = fn(item, *state)
                    except BaseException as exc:  # SystemExit too: this item failed
                        failed[j] = ItemFailed.of(exc, self.where, keep=False)
            return results
        grouped: dict = {}
        places: dict = {}
        for j, key in enumerate(keys):
            if j in failed:
                continue
            try:
                grouped.setdefault(key, []).append(items[j])
            except TypeError as exc:  # an unhashable key field (a list, a dict)
                failed[j] = ItemFailed.of(exc, "grouping by key", keep=False)
                continue
            places.setdefault(key, []).append(j)
        returned, error = checked_results(grouped, fn(grouped, *state))
        if error is not None:
            raise error
        if returned is not None:
            for key, js in places.items():
                for j, result in zip(js, returned[key], strict=True):
                    results[j] = result
        return results

    def _outputs(self, keys: list, items: list, texts: list | None, results: list,
                 failed: dict[int, ItemFailed]) -> list:
        """Each item's result, its output line, or its ItemFailed."""
        if not self.lines:
            return [failed.get(j, r) for j, r in enumerate(results)]
        out = []
        for j, result in enumerate(results):
            if j in failed:
                out.append(failed[j])
                continue
            try:
                # A JSON line's own text is the input's JSON: no need to encode it again.
                given = texts[j] if texts is not None else _json_encode(items[j])
                line = (f'{{"key": {_json_encode(keys[j])}, "input": {given}, '
                        f'"result": {_json_encode(result)}}}\n')
            except (TypeError, ValueError, RecursionError) as exc:
                out.append(ItemFailed.of(exc, "writing the output line as JSON", keep=False))
                continue
            out.append((result, line) if self.results_too else line)
        return out
