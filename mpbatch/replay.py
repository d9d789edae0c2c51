"""Replay a dead-letter store (caller process): run its items again; those that succeed
leave the store, those that fail again stay with their new error and attempts added up."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from .batcher import Batcher
from .deadletters import DeadLetter, DeadLetterStore
from .errors import Closed
from .job import Job
from .progress import Monitor, wants_bar
from .report import Report
from .run import drive, finished


def replay(path: str | os.PathLike[str], fn: Callable[..., Any], *, per_item: bool = False,
           progress: bool | None = None, **options: Any) -> Report:
    """Run every item kept in the store at ``path`` through ``fn`` (a ``do``, or with
    ``per_item`` a function of one item) and update the store; returns the Report.

    Items kept as input lines (``format == "jsonl"``) are parsed again first, so a line
    that did not parse fails again with its reason.
    """
    with DeadLetterStore(path) as store:
        rows = {row.id: row for row in store}
        report = Report(dead_letters=os.fspath(path))
        for fmt in sorted({row.format or "" for row in rows.values()}):
            part = {i: r for i, r in rows.items() if (r.format or "") == fmt}
            _merge(report, _replay_part(store, part, fn, fmt or None, per_item, progress,
                                        options))
        return report


def _replay_part(store: DeadLetterStore, rows: dict, fn: Callable[..., Any],
                 fmt: str | None, per_item: bool, progress: bool | None,
                 options: dict[str, Any]) -> Report:
    name = getattr(fn, "__name__", "do")
    job = Job(fn, name=name, per_item=per_item, fmt=fmt, keep_values=False)
    done: list[int] = []

    def on_result(key: Any, row_ids: list, results: list) -> None:
        done.extend(row_ids)

    def on_dead_letter(letter: DeadLetter) -> None:
        if isinstance(letter.error, Closed):
            return  # interrupted: the item stays as it was
        for pairs in letter.batch.values():
            for row_id, _ in pairs:
                row = rows[row_id]
                store.update(row_id, letter.error, row.attempts + letter.attempts,
                             letter.worker, row.run_id)

    b = Batcher(job, on_result=on_result, on_dead_letter=on_dead_letter, **options)
    monitor = Monitor(b, None, len(rows), wants_bar(progress))
    started = time.monotonic()
    try:
        interrupted = drive(b, monitor, _pairs(rows, fmt))
    finally:
        store.delete(done)
    s = b.stats()
    wall = time.monotonic() - started
    return finished(Report(
        accepted=s.accepted, succeeded=s.succeeded, dead_lettered=s.dead_lettered,
        cancelled=s.cancelled, pending=s.pending, wall_s=wall,
        items_per_s=(s.succeeded + s.dead_lettered) / wall, batches=s.batches,
        retries=s.retries, failed_attempts=s.failed_attempts,
        worker_restarts=s.worker_restarts, splits=s.splits, interrupted=interrupted,
        timeline=monitor.timeline))


def _pairs(rows: dict, fmt: str | None) -> Iterator[tuple]:
    for row_id, row in rows.items():
        yield row.key, (row_id, row.value.encode() if fmt == "jsonl" else row.value)


def _merge(total: Report, part: Report) -> None:
    for name in ("accepted", "succeeded", "dead_lettered", "cancelled", "pending", "batches",
                 "retries", "failed_attempts", "worker_restarts", "splits"):
        setattr(total, name, getattr(total, name) + getattr(part, name))
    total.wall_s += part.wall_s
    total.items_per_s = (total.succeeded + total.dead_lettered) / max(total.wall_s, 1e-9)
    total.timeline += part.timeline
