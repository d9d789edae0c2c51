"""The output of a job and its journal (caller process): what is written, and what is done,
so that a job killed any way resumes with no item skipped and no line written twice.

Output lines are appended as outcomes arrive. Every ``commit()`` (a few times a second,
and at the end) flushes and fsyncs the output, then records in one SQLite transaction the
lines of the items that now have an outcome (``done``: succeeded or dead-lettered) and the
output's length at that point. A resumed job truncates the output to the recorded length
and skips the recorded items: a line written after the last commit is cut, and its item
runs again (at most the items in flight at the kill), so no line is ever doubled.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import threading
from typing import IO

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS done (line INTEGER PRIMARY KEY, dead INTEGER NOT NULL)",
)


class JobMismatch(ValueError):
    """--resume was given for an output whose journal belongs to another job."""


class Output:
    """The output: a file (with a journal when resuming), stdout, or nothing."""

    def __init__(self, path: str | None, journal: str | None = None,
                 job: str = "") -> None:
        self.path = path
        self._lock = threading.Lock()
        self._pending: list[int] = []  # lines with an outcome since the last commit
        self._pending_dead: list[int] = []
        self.journal: sqlite3.Connection | None = None
        self.done_before = 0  # items done by earlier runs of a resumed job
        self.dead_before = 0
        self._done: bytearray = bytearray()  # bit per input line: done by an earlier run
        if journal is not None:
            self._open_journal(journal, job)
        self._file = self._open_output()

    def _open_output(self) -> IO[bytes] | None:
        if self.path is None:
            return None
        if self.path == "-":
            sys.stdout.flush()
            return sys.stdout.buffer
        if self.journal is None:
            return open(self.path, "wb")
        f = open(self.path, "ab")  # noqa: SIM115 - kept open; close() closes it
        f.truncate(self._offset)  # lines written after the last commit: their items rerun
        return f

    def _open_journal(self, path: str, job: str) -> None:
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        for statement in _SCHEMA:
            db.execute(statement)
        known = dict(db.execute("SELECT name, value FROM meta").fetchall())
        if known.get("job", job) != job:
            db.close()
            raise JobMismatch(
                f"{path} is the journal of another job ({known['job']}); run this one "
                f"without --resume, or with another --output")
        db.execute("INSERT OR IGNORE INTO meta VALUES ('job', ?)", (job,))
        self._offset = int(known.get("offset", "0"))
        if self.path not in (None, "-") and not os.path.exists(self.path):
            self._offset = 0  # the output is gone: what it held must be written again
            db.execute("DELETE FROM done")
        for line, dead in db.execute("SELECT line, dead FROM done"):
            self._mark(line)
            self.done_before += 1
            self.dead_before += dead
        self.journal = db

    def _mark(self, line: int) -> None:
        byte = line >> 3
        if byte >= len(self._done):
            self._done.extend(bytes(byte + 1 - len(self._done) + 4096))
        self._done[byte] |= 1 << (line & 7)

    def done(self, line: int) -> bool:
        """An earlier run of this job gave ``line``'s item its outcome."""
        byte = line >> 3
        return byte < len(self._done) and bool(self._done[byte] & (1 << (line & 7)))

    def write(self, lines: list[int], text: list[str]) -> None:
        """Items at these input lines succeeded; ``text`` is their output (collector)."""
        with self._lock:
            if self._file is not None:
                self._file.write("".join(text).encode())
            if self.journal is not None:
                self._pending += lines

    def dead(self, lines: list[int]) -> None:
        """Items at these input lines were dead-lettered (after the store committed them)."""
        if self.journal is not None:
            with self._lock:
                self._pending_dead += lines

    def commit(self) -> None:
        """Make what was written durable, then record it as done."""
        with self._lock:
            if self._file is not None:
                self._file.flush()
            pending, self._pending = self._pending, []
            dead, self._pending_dead = self._pending_dead, []
            offset = self._file.tell() if self.journal is not None and self._file else 0
        if self.journal is None:
            return
        if self._file is not None:
            os.fsync(self._file.fileno())
        with self.journal:
            self.journal.execute("BEGIN IMMEDIATE")
            self.journal.executemany("INSERT OR REPLACE INTO done VALUES (?, 0)",
                                     [(line,) for line in pending])
            self.journal.executemany("INSERT OR REPLACE INTO done VALUES (?, 1)",
                                     [(line,) for line in dead])
            self.journal.execute("INSERT OR REPLACE INTO meta VALUES ('offset', ?)",
                                 (str(offset),))

    def close(self) -> None:
        self.commit()
        if self._file is not None and self.path != "-":
            self._file.close()
        elif self._file is not None:
            self._file.flush()
        if self.journal is not None:
            self.journal.close()
