"""mpbatch.run(): a whole job in one call (caller process): items in, outcomes out, a Report.

It wraps the user's function in a Job (job.py), feeds a Batcher through add_many, writes
output lines and journal records as outcomes arrive (journal.py), keeps dead letters in a
SQLite store one row per item (deadletters.py), and watches the run (progress.py).

Ctrl-C: the first stops taking items; batches inside do() finish and are written, and every
other accepted item is cancelled (not run, not dead-lettered: a resumed job runs it); then
KeyboardInterrupt is raised, with the Report as its ``report`` attribute. A second Ctrl-C
gives up at once: what was inside do() is cancelled too.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .batcher import Batcher
from .deadletters import DeadLetter, DeadLetterStore
from .errors import Closed
from .job import Job
from .journal import Output
from .progress import Monitor, wants_bar
from .report import Report


def run(do: Callable[..., Any], items: Iterable[Any], *, key: Callable[[Any], Any] | None = None,
        output: str | os.PathLike[str] | None = None,
        dead_letters: str | os.PathLike[str] | None = None,
        journal: str | os.PathLike[str] | None = None, progress: bool | None = None,
        per_item: bool = False, **options: Any) -> Report:
    """Run ``do`` over ``items`` and return when every item has its outcome.

    items: any iterable, read as it goes (memory stays bounded): (key, value) pairs, or
        items whose key ``key(item)`` gives.
    do: as for Batcher (a dict of key -> list of values in); with ``per_item=True``,
        ``do(value)`` per item, and a raise fails that item alone.
    output: a JSON Lines file, one line per item that succeeded, in the order they finish:
        ``{"key": ..., "input": ..., "result": ...}``.
    dead_letters: a SQLite file that keeps every dead-lettered item (DeadLetterStore).
    journal: resume a killed job: a SQLite file beside ``output`` (needed) that records what
        is done; run again with the same arguments, only what had no outcome runs.
    progress: a bar on stderr (None: when stderr is a terminal).
    options: every Batcher option (size, workers, max_attempts, on_result, ...).
    """
    name = getattr(do, "__name__", "do")
    pairs = _pairs(items, key)
    total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
    return run_job(do, pairs, name=name, per_item=per_item, output=output,
                   dead_letters=dead_letters, journal=journal, progress=progress,
                   total=total, **options)


def _pairs(items: Iterable[Any], key: Callable[[Any], Any] | None) -> Iterator[tuple]:
    """(key, (line, item)) for add_many; ``line`` numbers items from 1 (for the journal)."""
    if key is None:
        for line, item in enumerate(items, 1):
            try:
                k, value = item
            except (TypeError, ValueError):
                raise TypeError(f"run() takes (key, value) pairs unless key= is given; item "
                                f"{line} is {type(item).__name__}: {item!r:.80}") from None
            yield k, (line, value)
    else:
        for line, item in enumerate(items, 1):
            yield key(item), (line, item)


def run_job(fn: Callable[..., Any], pairs: Iterable[tuple], *, name: str,
            per_item: bool = False, fmt: str | None = None, header: list[str] | None = None,
            field_key: Any = None, output: Any = None, dead_letters: Any = None,
            journal: Any = None, progress: bool | None = None, total: int | None = None,
            job_id: str = "", blank: Callable[[], int] | None = None,
            **options: Any) -> Report:
    """run() and ``mpbatch run``: ``pairs`` are (caller key, (line, payload))."""
    out_path = None if output is None else os.fspath(output)
    if journal is not None and out_path in (None, "-"):
        raise ValueError("journal= (--resume) needs an output file: its journal records "
                         "which lines of it are done")
    sink = Output(out_path, None if journal is None else os.fspath(journal), job_id or name)
    store = None if dead_letters is None else DeadLetterStore(dead_letters)
    try:
        tally = _Tally()
        job = Job(fn, name=name, per_item=per_item, fmt=fmt, header=header, key=field_key)
        batcher = _batcher(job, sink, _Keeper(store, f"run-{uuid.uuid4().hex[:12]}", fmt,
                                              header), tally, options)
        monitor = Monitor(batcher, sink if journal is not None else None, total,
                          wants_bar(progress))
        started = time.monotonic()
        interrupted = drive(batcher, monitor, _skipping(pairs, sink))
    finally:
        sink.close()
        if store is not None:
            store.close()
    report = _report(batcher, monitor, time.monotonic() - started, tally, sink, store,
                     out_path, interrupted)
    report.blank_lines = blank() if blank is not None else 0
    if monitor.error is not None:
        raise OSError(f"the journal could not be written: {monitor.error}") from monitor.error
    return finished(report)


def _batcher(job: Job, sink: Output, keeper: _Keeper, tally: _Tally,
             options: dict[str, Any]) -> Batcher:
    """The job's Batcher: outcomes to the output, the journal, the store and the user's
    callbacks (on_result gets the items and their results, as from a Batcher of its own)."""
    user_on_result = options.pop("on_result", None)
    user_on_dead_letter = options.pop("on_dead_letter", None)
    writes = sink.path is not None
    job.lines = writes
    job.keep_values = user_on_result is not None
    job.results_too = writes and user_on_result is not None
    wanted = writes or user_on_result is not None or sink.journal is not None
    return Batcher(job, on_result=_on_result(sink, user_on_result, writes) if wanted else None,
                   on_dead_letter=_on_dead_letter(sink, keeper, tally, user_on_dead_letter),
                   **options)


def drive(batcher: Batcher, monitor: Monitor, items: Iterable[tuple]) -> bool:
    """Feed ``items`` and wait for every outcome; True if a Ctrl-C stopped it: the batches
    inside do() finished, and what had not started was cancelled (a second Ctrl-C, in the
    close() that follows, gives up at once). Stops the monitor, closes the Batcher."""
    interrupted = False
    try:
        batcher.start()
        monitor.start()
        batcher.add_many(items)
        batcher.flush()
    except KeyboardInterrupt:
        interrupted = True
        batcher._closing.cancel()
    finally:
        monitor.stop()
        batcher.close()
    return interrupted


def finished(report: Report) -> Report:
    """The report, or KeyboardInterrupt carrying it (``.report``) if the run was stopped."""
    if report.interrupted:
        exc = KeyboardInterrupt()
        exc.report = report  # type: ignore[attr-defined]
        raise exc
    return report


def _skipping(pairs: Iterable[tuple], sink: Output) -> Iterator[tuple]:
    """Leave out what an earlier run of a resumed job finished."""
    if sink.journal is None or not sink.done_before:
        yield from pairs
        return
    done = sink.done
    for pair in pairs:
        if not done(pair[1][0]):
            yield pair


class _Tally:
    """Outcomes run() counts itself (on the collector thread)."""

    def __init__(self) -> None:
        self.interrupted = 0  # dead-lettered by a second Ctrl-C: counted as cancelled


def _on_result(sink: Output, user: Callable | None, both: bool) -> Callable:
    def on_result(key: Any, values: list, results: list) -> None:
        if user is None:  # values are the items' lines, results their output lines
            sink.write(values, results)
            return
        if both:  # results are (result, output line) pairs
            sink.write([line for line, _ in values], [text for _, text in results])
            results = [result for result, _ in results]
        user(key, [item for _, item in values], results)

    return on_result


class _Keeper:
    """Writes a job's dead-lettered items to its store: what a replay needs to run them."""

    def __init__(self, store: DeadLetterStore | None, run_id: str, fmt: str | None,
                 header: list[str] | None) -> None:
        self.store, self.run_id, self.fmt, self.header = store, run_id, fmt, header

    def keep(self, key: Any, line: int, payload: Any, letter: DeadLetter) -> None:
        if self.store is None:
            return
        value, fmt = payload, None
        if isinstance(payload, bytes):  # a raw JSON Lines or text line
            value = payload.decode("utf-8", "replace").rstrip("\r\n")
            fmt = "jsonl" if self.fmt == "jsonl" else None
        elif self.fmt == "csv" and self.header and len(payload) == len(self.header):
            value = dict(zip(self.header, payload, strict=True))
        self.store.add_item(key, value, letter.error, attempts=letter.attempts,
                            worker=letter.worker, run_id=self.run_id, line=line, fmt=fmt)


def _on_dead_letter(sink: Output, keeper: _Keeper, tally: _Tally,
                    user: Callable | None) -> Callable:
    def on_dead_letter(letter: DeadLetter) -> None:
        if isinstance(letter.error, Closed):  # a second Ctrl-C: not a failure of the items
            tally.interrupted += sum(len(vs) for vs in letter.batch.values())
            return
        lines = []
        for key, pairs in letter.batch.items():
            for line, payload in pairs:
                lines.append(line)
                keeper.keep(key, line, payload, letter)
        sink.dead(lines)
        if user is not None:
            user(DeadLetter({k: [p for _, p in ps] for k, ps in letter.batch.items()},
                            letter.error, letter.attempts, letter.worker))

    return on_dead_letter


def _report(b: Batcher, monitor: Monitor, wall: float, tally: _Tally, sink: Output,
            store: DeadLetterStore | None, out_path: str | None,
            interrupted: bool) -> Report:
    s = b.stats()
    log = b._accounts.batch_log
    times = sorted(log.times_ns)

    def ms(q: float) -> float:
        return times[min(len(times) - 1, int(q * len(times)))] / 1e6 if times else 0.0

    done = s.succeeded + s.dead_lettered
    return Report(
        accepted=s.accepted, succeeded=s.succeeded,
        dead_lettered=s.dead_lettered - tally.interrupted,
        cancelled=s.cancelled + tally.interrupted, pending=s.pending,
        skipped=sink.done_before, dead_before=sink.dead_before,
        wall_s=wall, items_per_s=done / wall if wall > 0 else 0.0,
        busy=[ns / 1e9 / wall if wall > 0 else 0.0 for ns in monitor.busy_ns],
        batches=log.count, batch_sizes=dict(log.sizes), do_ms_p50=ms(0.5),
        do_ms_p99=ms(0.99), do_ms_max=log.max_ns / 1e6, retries=s.retries,
        failed_attempts=s.failed_attempts, redelivered=s.redelivered,
        worker_restarts=s.worker_restarts, splits=s.splits, recycled=s.recycled,
        dead_letters=None if store is None else store.path, output=out_path,
        interrupted=interrupted, timeline=monitor.timeline)
