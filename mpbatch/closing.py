"""close(): stop taking items, flush, stop the workers, free the memory (caller process).

One close() runs; a close() in another thread waits for it (with ``timeout``, cutting it
short). A first Ctrl-C while it waits changes only how it ends (KeyboardInterrupt once every
item has its outcome); a second gives up at once: the workers are killed and what is left
is dead-lettered with Closed.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TYPE_CHECKING

from .counters import CANCEL
from .errors import Closed
from .interrupts import held_interrupt
from .options import check_number

if TYPE_CHECKING:
    from .batcher import Batcher
    from .intake import OpenChunk

NEW, RUNNING, CLOSING, CLOSED = "new", "running", "closing", "closed"  # Batcher._state
# ... and a started Batcher's copy in a child forked from the process that started it: its
# workers, pipes and shared memory are that process's, its threads are not in the child
INHERITED = "inherited"


class Closing:
    """The close() of one Batcher, and what other threads need to know of it."""

    def __init__(self, batcher: Batcher) -> None:
        self.b = batcher
        self.closed = threading.Event()  # close() has ended (in whichever thread ran it)
        self.closer: int | None = None  # the thread running close()
        self.cut_short: Closed | None = None  # a second close(timeout) ran out

    def close(self, timeout: float | None) -> None:
        """Batcher.close()."""
        b = self.b
        check_number("timeout", timeout, positive=False, optional=True)
        # A fork's copy is the parent's to close. Before any lock: one may have been held
        # at the fork.
        if b._state is INHERITED:
            return
        if b._state is RUNNING:  # refused before anything changes: the Batcher goes on
            b._refuse_in_a_callback("close() cannot run", "it would wait for its own "
                                    "callback; call it from the thread that adds items")
        deadline = None if timeout is None else time.monotonic() + timeout
        if deadline is not None and b._pool is not None:
            # An add() writing to the full pipe of a worker stuck in C (holding the GIL)
            # holds the lock below: it gives that worker up at the deadline.
            b._pool.give_up_by(deadline)
        with b._start_lock, b._lock:  # add() checks the state under _lock
            b._fast = False
            state = b._state
            if state is RUNNING or state is NEW:
                b._state = CLOSING if state is RUNNING else CLOSED
                self.closer = threading.get_ident()
        if state is NEW:
            self.closed.set()
        elif state is not RUNNING:
            self.await_close(timeout)
        else:
            try:
                self._close(timeout, deadline)
            finally:
                self.closed.set()

    def _close(self, timeout: float | None, deadline: float | None) -> None:
        b = self.b
        error: BaseException | None = None
        first: list[KeyboardInterrupt] = []
        try:
            flushed = self._flush_through_first_interrupt(deadline, first)
        except BaseException:  # a second Ctrl-C, wherever it lands in there, or an error
            self._give_up()
            raise
        # A stopped Batcher's workers hold nothing it waits for: they are killed.
        if not flushed or b._collector.broken:  # type: ignore[union-attr]
            error = b._collector.broken or self.cut_short or Closed(  # type: ignore
                f"close(timeout={timeout:g}) ran out before these items finished")
        b._shutdown(error)
        if first:
            raise first[0]  # everything has its outcome: the program stops, as asked

    def _flush_through_first_interrupt(self, deadline: float | None,
                                       first: list[KeyboardInterrupt]) -> bool:
        """close()'s flush. A first Ctrl-C means "finish, then stop" wherever it lands: also
        here, where a `with` block that only adds spends most of its run. It is noted in
        ``first`` and the flush goes on; the next one is raised. If close() runs because of
        a Ctrl-C (a `with` block or a `finally` that it passes through), any is the second.
        """
        b = self.b
        if isinstance(sys.exc_info()[1], KeyboardInterrupt):
            return b._flush(deadline, closing=True)
        while True:
            try:
                if first:
                    print(f"mpbatch: Ctrl-C: close() is finishing {b.stats().pending} "
                          f"items; press Ctrl-C again to give up and dead-letter them",
                          file=sys.stderr)
                return b._flush(deadline, closing=True)
            except KeyboardInterrupt as exc:
                if first:
                    raise
                first.append(exc)

    def _give_up(self) -> None:
        """A second Ctrl-C (or an error) in close()'s wait: stop now, dead-letter the rest.
        A Ctrl-C during this waits for its end: half a shutdown would leave workers that
        the interpreter's exit then waits for."""
        b = self.b
        with held_interrupt():
            before = b.stats().dead_lettered  # counted after: some finish while we stop
            b._shutdown(Closed("close() was interrupted before these items finished"))
            left = b.stats().dead_lettered - before
            print(f"mpbatch: interrupted during close(); {left} unfinished items were "
                  f"dead-lettered (see dead_letters())", file=sys.stderr)

    def await_close(self, timeout: float | None) -> None:
        """Another thread's close() runs: wait for it; at ``timeout``, have it give up.

        In the closing thread itself (a callback that close() runs: on_dead_letter for the
        items it gives up, a Future's done-callback) there is nothing to wait for."""
        b = self.b
        if self.closed.is_set() or self.closer == threading.get_ident():
            return
        b._refuse_in_a_callback("close() cannot wait for another thread's close()",
                                "it waits for this callback; call close() from the thread "
                                "that adds items")
        try:
            if self.closed.wait(timeout):
                return
        except KeyboardInterrupt:  # a Ctrl-C here, as in close()'s own wait: give up now
            self._cut_close_short(Closed("close() was interrupted before these items "
                                         "finished"))
            raise
        self._cut_close_short(Closed(
            f"close(timeout={timeout:g}) ran out before these items finished"))
        self.closed.wait()

    def _cut_close_short(self, error: Closed) -> None:
        b = self.b
        with b._lock:
            self.cut_short = error
            b._accounts.changed.notify_all()  # the first close() waits on it

    def cancel(self) -> None:
        """Stop starting batches: those inside do() finish; every other accepted item is
        cancelled (stats().cancelled: neither run nor dead-lettered). run()'s first Ctrl-C;
        close() follows, and returns once the workers have reported what they held."""
        b = self.b
        if b._state is not RUNNING:
            return
        with held_interrupt():
            with b._lock:
                b._fast = False
                unsent = b._intake.take_all()  # nothing is sealed after this either
            collector = b._collector
            collector.outcomes.cancelled(unsent)  # type: ignore[union-attr]
            for i in range(b._workers):
                b._counters.set(i, CANCEL, 1)  # a replacement keeps it (counters.reset)
            collector.recovery.cancelling = True  # type: ignore[union-attr]
            collector.poke()  # type: ignore[union-attr]  # its timer cancels the retries

    def withdrawn(self, chunk: OpenChunk, pair: tuple) -> bool:
        """add()'s lock-free append may land after close() began (or after the Batcher
        stopped: then it goes on as usual). If close() has not sent the item yet, it never
        will run it (close() has flushed, or will dead-letter it): it is taken back, and
        the add is refused (True). If close()'s flush took it, it runs (False)."""
        with self.b._lock, held_interrupt():  # the rotation below must not drop an entry
            if self.b._state is RUNNING:
                return False
            entries = chunk.entries
            found = False
            for _ in range(len(entries)):  # other late adders may append meanwhile
                entry = entries.popleft()
                if entry is pair:
                    found = True
                else:
                    entries.append(entry)  # theirs: each late adder takes back its own
            return found
