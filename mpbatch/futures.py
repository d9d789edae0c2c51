"""Futures that cost little (caller process): a concurrent.futures.Future whose lock and
lists exist only once someone waits on it, adds a callback or cancels it.

A plain Future makes a Condition (an RLock and a deque) and two lists up front: ~15 us and
~2 KB per call, most of what a million submit() calls cost. Most futures of a batch job are
finished by the collector before anyone looks at them, and then none of that is needed.
Everything concurrent.futures does with a Future still works: ``_condition``,
``_waiters`` and ``_done_callbacks`` appear on first use (wait(), as_completed() and
result() reach them), and a future finished while it has no condition yet is finished
under one process-wide lock that also guards the making of conditions, so a waiter that
arrives at the same moment either sees it finished or is woken.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, InvalidStateError
from concurrent.futures._base import (
    CANCELLED,
    CANCELLED_AND_NOTIFIED,
    FINISHED,
    PENDING,
    RUNNING,
    CancelledError,
)
from typing import Any

_LAZY = threading.Lock()  # makes a future's condition, or finishes a future that has none
_DONE = frozenset({CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED})
_CANCELLED = frozenset({CANCELLED, CANCELLED_AND_NOTIFIED})


class LightFuture(Future):
    """A Future with no lock and no lists until it needs them (see the module)."""

    __slots__ = ("_callbacks", "_cond", "_exception", "_result", "_state", "_waiting")

    def __init__(self) -> None:  # no super().__init__(): that is what this class saves
        self._state = PENDING
        self._result: Any = None
        self._exception: BaseException | None = None
        self._cond: threading.Condition | None = None
        self._waiting: list | None = None
        self._callbacks: list | None = None

    @property
    def _condition(self) -> threading.Condition:  # type: ignore[override]
        cond = self._cond
        if cond is None:
            with _LAZY:
                cond = self._cond
                if cond is None:
                    cond = self._cond = threading.Condition()
        return cond

    @property
    def _waiters(self) -> list:  # type: ignore[override]
        if self._waiting is None:  # (reached under _condition, as set_result reads it)
            self._waiting = []
        return self._waiting

    @property
    def _done_callbacks(self) -> list:  # type: ignore[override]
        if self._callbacks is None:
            self._callbacks = []
        return self._callbacks

    def _finish(self, result: Any, exception: BaseException | None) -> bool:
        """Finish a future that has no condition (so no waiter and no callback); False if
        it has one: the caller then takes Future's own way."""
        with _LAZY:
            if self._cond is not None:
                return False
            if self._state in _DONE:
                raise InvalidStateError(f"{self._state}: {self!r}")
            self._result, self._exception = result, exception
            self._state = FINISHED
        return True

    def set_result(self, result: Any) -> None:
        if not self._finish(result, None):
            super().set_result(result)

    def set_exception(self, exception: BaseException | None) -> None:
        if not self._finish(None, exception):
            super().set_exception(exception)

    def cancel(self) -> bool:
        """Future.cancel(), telling the waiters of wait() and as_completed() at once.

        Future.cancel() leaves them to set_running_or_notify_cancel(), which an executor
        calls when it takes the call off its queue; nothing in mpbatch does, so they would
        wait for a cancelled future forever. Nothing runs here before they are told, not
        even a done-callback (one that waits on this future would wait forever too).
        """
        with self._condition:
            if self._state in (RUNNING, FINISHED):
                return False
            if self._state == PENDING:
                self._state = CANCELLED_AND_NOTIFIED
                for waiter in self._waiters:
                    waiter.add_cancelled(self)
                self._condition.notify_all()
            else:
                return True  # cancelled before: its callbacks have run
        self._invoke_callbacks()
        return True

    def set_running_or_notify_cancel(self) -> bool:
        """The call is on its way to a worker: True, and cancel() fails from now on; False
        if it was cancelled (its waiters are told), and it must not run."""
        with _LAZY:
            if self._cond is None and self._state == PENDING:  # (cancel() makes the cond)
                self._state = RUNNING
                return True
        with self._condition:
            if self._state == PENDING:
                self._state = RUNNING
                return True
            if self._state == CANCELLED:
                self._state = CANCELLED_AND_NOTIFIED
                for waiter in self._waiters:
                    waiter.add_cancelled(self)
                return False
            if self._state == CANCELLED_AND_NOTIFIED:
                return False
        raise RuntimeError(f"Future in unexpected state: {self._state}")

    # Reads of the state need no lock: it is one attribute, written once it is final.
    def done(self) -> bool:
        return self._state in _DONE

    def cancelled(self) -> bool:
        return self._state in _CANCELLED

    def running(self) -> bool:
        return self._state == RUNNING

    def result(self, timeout: float | None = None) -> Any:
        if self._state == FINISHED:
            if self._exception is not None:
                raise self._exception
            return self._result
        if self._state in _CANCELLED:
            raise CancelledError()
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._state == FINISHED:
            return self._exception
        return super().exception(timeout)
