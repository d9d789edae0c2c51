"""An executor's calls in a worker (worker process): ``do(batch)`` for mpbatch.Executor.

A batch is ``{token: [call, ...]}``. The function a token stands for was sent to this
worker once, ahead of its first call, as a DEFINE frame (transport.py), and waits here in
DEFINITIONS, unpickled on first use. Each call runs on its own, and a raise gives that call
an ItemFailed (per-item outcomes, peritem.py) carrying the exception itself.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable
from typing import Any

import cloudpickle

from .errors import SerializationError
from .results import ItemFailed
from .transport import PROTOCOL

# token -> what the caller defined for this worker (DEFINE frames), pickled until first use.
DEFINITIONS: dict[int, Any] = {}


def defined(token: int) -> Any:
    """The object the caller defined as ``token``, unpickled on first use (raises what
    unpickling raises: a function whose module this worker cannot import, say)."""
    value = DEFINITIONS[token]
    if type(value) is bytes:
        value = DEFINITIONS[token] = cloudpickle.loads(value)
    return value


class Calls:
    """do(batch) in the workers: ``{token: [call, ...]}``, one call at a time.

    A call is ``pickle((args, kwargs))`` (submit: pickled on its own, and its result too,
    so that an argument or a result that will not unpickle fails that call alone, not its
    batch) or ``args`` (map: the bulk path, pickled by the block). Results travel back one
    per call, in stream order (Dispatcher.item_results): the caller matches them to its own
    calls, so no argument travels twice.
    """

    per_item_outcomes = True  # the worker looks for ItemFailed among the results
    where = "the call"

    def __call__(self, batch: dict, *state: Any) -> dict:
        out = {}
        for token, calls in batch.items():
            try:
                fn = defined(token)
            except BaseException as exc:  # the function cannot be unpickled here
                failed = ItemFailed.of(exc, "unpickling the function", keep=True)
                out[token] = [failed] * len(calls)
                continue
            if bytes not in map(type, calls):  # map()'s calls only: the loop inline
                out[token] = _map_calls(fn, calls)
            else:
                out[token] = [run_call(fn, call) for call in calls]
        return out


def _map_calls(fn: Callable[..., Any], calls: list) -> list:
    results = []
    append = results.append
    for args in calls:
        try:
            append(fn(*args))
        except BaseException as exc:  # SystemExit too: this call failed, not the worker
            append(ItemFailed.of(exc, call_name(fn), keep=True))
    return results


def run_call(fn: Callable[..., Any], call: Any) -> Any:
    if type(call) is not bytes:  # map()'s args
        try:
            return fn(*call)
        except BaseException as exc:  # SystemExit too: this call failed, not the worker
            return ItemFailed.of(exc, call_name(fn), keep=True)
    try:
        args, kwargs = pickle.loads(call)
    except BaseException as exc:
        return ItemFailed.of(exc, f"unpickling the arguments of {call_name(fn)}", keep=True)
    try:
        result = fn(*args, **kwargs)
    except BaseException as exc:
        return ItemFailed.of(exc, call_name(fn), keep=True)
    try:
        return pickle.dumps(result, PROTOCOL)
    except BaseException as exc:  # a result's __reduce__ is user code
        return ItemFailed(SerializationError(
            f"the result of {call_name(fn)} cannot be pickled ({type(exc).__name__}: {exc}); "
            f"return picklable results (plain data)"))



def call_name(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__name__', 'the call')}()"


class Initializer:
    """init() in each worker: the executor's initializer; a failure is logged on the
    concurrent.futures logger (as ProcessPoolExecutor does) and breaks the executor."""

    def __init__(self, initializer: Callable[..., Any], initargs: tuple) -> None:
        self.initializer = initializer
        self.initargs = initargs

    def __call__(self) -> None:
        try:
            self.initializer(*self.initargs)
        except BaseException:
            logging.getLogger("concurrent.futures").critical("Exception in initializer:",
                                                             exc_info=True)
            raise
