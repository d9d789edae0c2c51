"""Outcomes (caller process): futures, on_result and on_dead_letter, dead letters, counts.

An item's outcome is recorded in one order: its callback (on_result, or the DeadLetter in
dead_letters() and on_dead_letter), then its future, then the counters that stats() and
flush() read. So once fut.result() returns, its batch's on_result has run, and once flush()
returns, every future of the items it waited for is done. Callbacks are user code: whatever
they raise (even SystemExit) is logged, never passed on to the thread that runs them.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, InvalidStateError
from typing import TYPE_CHECKING, Any

from .deadletters import DeadLetter, DeadLetterStore
from .errors import reraise_copy, shown
from .ledger import Segment, merged_batch
from .stats import Accounts

if TYPE_CHECKING:
    from .options import Options

log = logging.getLogger("mpbatch")


class Outcomes:
    """Records outcomes: the collector's (its thread, or an add_many() recording reports
    itself under its role lock), and those of any thread once it has stopped."""

    def __init__(self, accounts: Accounts, options: Options,
                 store: DeadLetterStore | None = None, run_id: str | None = None) -> None:
        self.accounts = accounts
        self.options = options
        self.letters: list[DeadLetter] = []  # every DeadLetter so far, oldest first
        self.keep_letters = True  # False: the Executor, whose futures hold every outcome
        # Executor.map: each batch's segments (the caller's own values) and one result per
        # item, in stream order (with Dispatcher.item_results).
        self.on_items: Callable[[list[Segment], list], None] | None = None
        self.on_dead_segments: Callable[[list[Segment], BaseException], None] | None = None
        self.store = store  # dead_letters=path: each letter is committed before it counts
        self.run_id = run_id

    def succeeded(self, segments: list[Segment], batch: dict | None, grouped: list | None,
                  items: list | None) -> None:
        """A batch returned: on_batch, on_result per key, each future its own result, the
        counts."""
        if self.options.on_batch is not None and batch is not None:
            self._call_on_batch(batch, grouped)
        if self.options.on_result is not None and batch is not None:
            self._call_on_result(batch, grouped)
        if self.on_items is not None and items:
            self.on_items(segments, items)  # not user code: the Executor's delivery
        _resolve_futures(segments, items)
        self.accounts.settle([(s.epoch, len(s)) for s in segments], ok=True, batches=1)

    def _call_on_batch(self, batch: dict, grouped: list | None) -> None:
        on_batch = self.options.on_batch
        assert on_batch is not None
        results = None if grouped is None else dict(zip(batch, grouped, strict=True))
        try:
            on_batch(batch, results)
        except BaseException:  # sys.exit() too: it would end this thread, and every outcome
            log.exception("mpbatch: on_batch raised; its items still count as succeeded")

    def _call_on_result(self, batch: dict, grouped: list | None) -> None:
        on_result = self.options.on_result
        assert on_result is not None
        results = grouped if grouped is not None else itertools.repeat(None, len(batch))
        for (key, values), got in zip(batch.items(), results, strict=True):
            try:
                on_result(key, values, got)
            except BaseException:  # sys.exit() too: it would end this thread, and every outcome
                log.exception("mpbatch: on_result raised for key %s; the item still "
                              "counts as succeeded", shown(key))

    def dead_letter(self, segments: list[Segment], error: BaseException,
                    worker: int | None) -> None:
        """Record items that will not be tried again; any thread once the collector stopped
        (on_dead_letter and done-callbacks then run in that thread: close()'s)."""
        if not segments:
            return
        letter = DeadLetter(merged_batch(segments), error,
                            max(s.attempts for s in segments), worker)
        # In the order of succeeded(): a future that raised has its letter in dead_letters()
        # and its on_dead_letter run.
        if self.keep_letters:
            self.letters.append(letter)
        if self.on_dead_segments is not None:
            self.on_dead_segments(segments, error)  # not user code: the Executor's
        if self.store is not None:
            _keep_failed(self.store, letter, self.run_id)
        if self.options.on_dead_letter is not None:
            try:
                self.options.on_dead_letter(letter)
            except BaseException:  # sys.exit() too (see _call_on_result)
                log.exception("mpbatch: on_dead_letter raised; the dead letter is kept")
        for seg in segments:
            for fut in seg.futures or ():
                if fut is not None:
                    _set(fut, exception=reraise_copy(error))
        self.accounts.settle([(s.epoch, len(s)) for s in segments], ok=False)


    def cancelled(self, segments: list[Segment]) -> None:
        """Items that will not run, and are not failures: run()'s first Ctrl-C."""
        if not segments:
            return
        for seg in segments:
            for fut in seg.futures or ():
                if fut is not None and not fut.cancel():  # running: sent to a worker
                    _set(fut, exception=CancelledError())
        self.accounts.settle([(s.epoch, len(s)) for s in segments], ok=False,
                             cancelled=True)


def _keep_failed(store: DeadLetterStore, letter: DeadLetter, run_id: str | None) -> None:
    try:
        store.add(letter, run_id)
    except Exception:  # a full disk must not stop the collector: the letter stays in memory
        log.exception("mpbatch: could not write a dead letter to %s; it is kept in memory "
                      "only (dead_letters())", store.path)


def _set(fut: Future, result: Any = None, exception: BaseException | None = None) -> None:
    try:
        if exception is not None:
            fut.set_exception(exception)
        else:
            fut.set_result(result)
    except InvalidStateError:
        pass  # the user cancelled it
    except BaseException:  # concurrent.futures lets a done-callback's SystemExit through
        log.exception("mpbatch: a done-callback of a Future raised; its result is set")


def _resolve_futures(segments: list[Segment], items: list | None) -> None:
    """Give each submit() future its own result, by position in the batch (see transport)."""
    if all(seg.futures is None for seg in segments):
        return
    pos = 0
    for seg in segments:
        if seg.futures is not None:
            for j, fut in enumerate(seg.futures):
                if fut is not None:
                    _set(fut, None if items is None else items[pos + j])
        pos += len(seg)
