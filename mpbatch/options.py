"""The Batcher's options, checked (caller process).

A wrong type raises TypeError and a value out of range ValueError, each naming the argument
and the value given, before anything starts.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .affinity import SPILL_AFTER
from .deadletters import DeadLetter
from .dispatch import ROUTINGS
from .errors import shown
from .lifecycle import START_METHODS

MAX_SECONDS = 1e9  # about 31 years: past that a duration is a mistake, and ns overflow int64


@dataclass(frozen=True)
class Options:
    """The Batcher's knobs, checked; see Batcher for units and defaults."""

    size: int
    max_bytes: int | None
    interval: float
    workers: int | None
    buffer: int
    routing: str
    spill_after: float | None
    max_attempts: int
    retry_backoff: float
    timeout: float | None
    on_result: Callable[[Any, list, list | None], None] | None
    on_batch: Callable[[dict, dict | None], None] | None
    on_dead_letter: Callable[[DeadLetter], None] | None
    init: Callable[[], Any] | None
    start_method: str | None
    isolate_poison: bool
    max_batches_per_worker: int | None
    max_rss: int | None
    dead_letters: str | None
    backend: str = "process"
    address: str | None = None
    ray_options: dict | None = None
    steal: bool = False  # resolved: None became what the routing and backend allow

    @property
    def want_values(self) -> bool:
        """Someone receives each batch's values and results: workers send them back."""
        return self.on_result is not None or self.on_batch is not None

    @property
    def batch_items(self) -> int:
        """Items a worker runs as a full batch: ``size``, or ``buffer`` if that is smaller,
        since a worker holds at most ``buffer`` items and a larger batch would never fill."""
        return min(self.size, self.buffer)


def checked(**given: Any) -> Options:
    """Options from the Batcher's keyword arguments; raises for the first bad one."""
    return Options(
        size=check_int("size", given["size"], 1),
        max_bytes=check_int("max_bytes", given["max_bytes"], 1, optional=True),
        interval=check_number("interval", given["interval"], positive=True),
        workers=check_int("workers", given["workers"], 1, optional=True),
        buffer=check_int("buffer", given["buffer"], 1),
        routing=check_choice("routing", given["routing"], ROUTINGS),
        spill_after=check_spill_after(given["spill_after"], given["routing"]),
        max_attempts=check_int("max_attempts", given["max_attempts"], 1),
        retry_backoff=check_number("retry_backoff", given["retry_backoff"], positive=False),
        timeout=check_number("timeout", given["timeout"], positive=True, optional=True),
        on_result=check_callable("on_result", given["on_result"]),
        on_batch=check_callable("on_batch", given["on_batch"]),
        on_dead_letter=check_callable("on_dead_letter", given["on_dead_letter"]),
        init=check_callable("init", given["init"]),
        start_method=check_start_method(given["start_method"]),
        isolate_poison=check_bool("isolate_poison", given["isolate_poison"]),
        max_batches_per_worker=check_int("max_batches_per_worker",
                                         given["max_batches_per_worker"], 1, optional=True),
        max_rss=check_int("max_rss", given["max_rss"], 1, optional=True),
        dead_letters=check_path("dead_letters", given["dead_letters"]),
        **check_backend(given.get("backend", "process"), given.get("address"),
                        given.get("ray_options"), given["start_method"]),
        steal=check_steal(given.get("steal"), given["routing"], given.get("backend", "process")),
    )


def check_int(name: str, value: Any, low: int, optional: bool = False) -> Any:
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        none = " or None" if optional else ""
        raise TypeError(f"{name} must be an int{none} (got {type(value).__name__}: "
                        f"{shown(value, None)})")
    if value < low:
        raise ValueError(f"{name} must be >= {low} (got {shown(value, None)})")
    return value


def check_number(name: str, value: Any, positive: bool, optional: bool = False) -> Any:
    if value is None and optional:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        none = " or None" if optional else ""
        raise TypeError(f"{name} must be a number of seconds{none} "
                        f"(got {type(value).__name__}: {shown(value, None)})")
    try:
        seconds = float(value)
    except OverflowError:  # an int too large for a float
        seconds = math.inf
    if not math.isfinite(seconds) or seconds < 0 or (positive and seconds == 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be finite and {bound} (got {shown(value, None)})")
    if seconds > MAX_SECONDS:
        raise ValueError(f"{name} must be at most {MAX_SECONDS:g} seconds "
                         f"(got {shown(value, None)})")
    return seconds


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False (got {type(value).__name__}: {value!r})")
    return value


def check_callable(name: str, value: Any, optional: bool = True) -> Any:
    if value is None and optional:
        return None
    if not callable(value):
        raise TypeError(f"{name} must be callable (got {type(value).__name__}: {value!r:.80})")
    return value


def check_spill_after(value: Any, routing: Any) -> float | None:
    """spill_after= belongs to routing="affinity"; given with another routing, it would
    silently do nothing."""
    if value is None:
        return SPILL_AFTER if routing == "affinity" else None
    if routing != "affinity":
        raise ValueError(f"spill_after={shown(value)} applies to routing='affinity' only "
                         f"(routing={shown(routing)}); drop it or pass routing='affinity'")
    return check_number("spill_after", value, positive=True)


def check_steal(value: Any, routing: Any, backend: Any) -> bool:
    """steal= (None: on wherever it may be). Stealing moves queued items to another worker,
    which routing="key" promises never happens; Ray actors do not answer a hand-back
    request (their counters are not shared with the caller)."""
    if value is None:
        return routing != "key" and backend == "process"
    check_bool("steal", value)
    if value and routing == "key":
        raise ValueError("steal=True moves queued items between workers, which routing='key' "
                         "forbids (one key, one worker: per-key order); drop steal= or use "
                         "routing='least-loaded' or 'affinity'")
    if value and backend != "process":
        raise ValueError(f"steal=True needs backend='process' (got backend={shown(backend)}): "
                         f"Ray actors do not hand queued items back; drop steal=")
    return value


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {choices} (got {type(value).__name__})")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices} (got {value!r})")
    return value


def check_path(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path (str or os.PathLike) or None "
                        f"(got {type(value).__name__}: {value!r:.80})")
    path = os.fspath(value)
    if not isinstance(path, str) or not path:
        raise ValueError(f"{name} must be a file path (got {value!r:.80})")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"{name}={path!r}: the folder {folder!r} does not exist; create it "
                         f"or give another path")
    return path


BACKENDS = ("process", "ray")


def check_backend(backend: Any, address: Any, ray_options: Any,
                  start_method: Any) -> dict[str, Any]:
    """backend=, with address= and ray_options=, which belong to backend="ray" only."""
    backend = check_choice("backend", backend, BACKENDS)
    if backend != "ray":
        for name, value in (("address", address), ("ray_options", ray_options)):
            if value is not None:
                raise ValueError(f"{name}={shown(value)} applies to backend='ray' only; drop "
                                 f"it or pass backend='ray'")
        return {"backend": backend}
    if start_method is not None:
        raise ValueError(f"start_method={shown(start_method)} applies to backend='process' "
                         f"only: Ray starts the actors' processes itself")
    if address is not None and not isinstance(address, str):
        raise TypeError(f"address must be a str ('host:port' or 'auto') or None "
                        f"(got {type(address).__name__}: {shown(address)})")
    if address is not None and not address:
        raise ValueError("address must be 'host:port', 'auto', or None (got '')")
    if ray_options is not None and not isinstance(ray_options, dict):
        raise TypeError(f"ray_options must be a dict of Ray actor options or None (got "
                        f"{type(ray_options).__name__}: {shown(ray_options)})")
    fixed = {"max_restarts", "max_task_retries", "max_concurrency", "lifetime"}
    taken = sorted(fixed & set(ray_options or ()))
    if taken:
        raise ValueError(f"ray_options may not set {', '.join(taken)}: mpbatch sets them to keep "
                         f"its own accounting of attempts (and never detaches its actors)")
    return {"backend": backend, "address": address, "ray_options": ray_options}


def check_start_method(value: Any) -> str | None:
    if value is None:
        return None  # chosen when the workers start (default_start_method)
    return check_choice("start_method", value, START_METHODS)
