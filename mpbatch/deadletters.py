"""Dead letters (caller process): items that ran out of attempts and why, in memory
(DeadLetter, per batch) and on disk (DeadLetterStore, a SQLite file, one row per item)."""

from __future__ import annotations

import json
import os
import pickle
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any


class UncomparableKey:
    """Stands for a key in DeadLetter.batch when hashing or comparing the key raised."""

    __slots__ = ("key",)

    def __init__(self, key: Any) -> None:
        self.key = key

    def __repr__(self) -> str:
        return f"UncomparableKey(<{type(self.key).__name__}>)"


@dataclass(frozen=True)
class DeadLetter:
    """Items that will not be tried again.

    The items of one failed batch that ran out of attempts together form one DeadLetter.
    """

    batch: dict[Any, list[Any]]
    """key -> values, in add() order, as do() would have received them. A key whose hash()
    or == raised while the items were grouped here stands as an UncomparableKey (the key
    is its ``.key``), one per key object."""
    error: BaseException
    """The last attempt's error: BatchFailed, WorkerDied, BatchTimeout, SerializationError,
    or Closed (close(timeout=) ran out before the items finished)."""
    attempts: int
    """How many times do() was tried on these items (0: never handed to do)."""
    worker: int | None
    """Index of the worker that held them at the last attempt; None if no worker was at fault
    (a result that could not be unpickled in the caller, a close() that ran out)."""


@dataclass(frozen=True)
class StoredDeadLetter:
    """One dead-lettered item as a DeadLetterStore keeps it (one row per item)."""

    id: int
    """Row id in the store: what delete() takes."""
    key: Any
    value: Any
    error: BaseException | None
    """The error itself, when it could be kept (pickled); else None: see error_type."""
    error_type: str
    """The error's type name (for BatchFailed, the type do() raised, when known)."""
    message: str
    traceback: str
    """The remote traceback text, if any."""
    attempts: int
    worker: int | None
    time: float
    """When it was dead-lettered (seconds since the epoch)."""
    run_id: str | None
    """The run that dead-lettered it (a Batcher, or one mpbatch run / replay)."""
    line: int | None
    """Its line in the input file, for items read by ``mpbatch run``."""
    format: str | None = None
    """"jsonl": ``value`` is the item's input line as text, still to be parsed (it may not
    parse); None: ``value`` is the item itself."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY,
    run_id TEXT, time REAL NOT NULL, line INTEGER,
    key_json TEXT, key_pickle BLOB, value_json TEXT, value_pickle BLOB,
    error_type TEXT NOT NULL, message TEXT NOT NULL, traceback TEXT NOT NULL,
    error_pickle BLOB, attempts INTEGER NOT NULL, worker INTEGER, format TEXT
)"""


def _encoded(obj: Any) -> tuple[str | None, bytes | None]:
    """JSON when it gives back an equal object of the same type, else a pickle."""
    try:
        text = json.dumps(obj, allow_nan=False)
        if type(back := json.loads(text)) is type(obj) and back == obj:
            return text, None
    except (TypeError, ValueError, RecursionError):
        pass
    return None, pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)


def _decoded(text: str | None, blob: bytes | None) -> Any:
    return json.loads(text) if text is not None else pickle.loads(blob)  # type: ignore


def _error_fields(error: BaseException) -> tuple[str, str, str, bytes | None]:
    kind = getattr(error, "exc_type", "") or type(error).__name__
    try:
        message = str(error)
    except Exception:
        message = f"<str() of {type(error).__name__} raised>"
    tb = getattr(error, "traceback", "") or ""
    try:
        blob: bytes | None = pickle.dumps(error, pickle.HIGHEST_PROTOCOL)
    except Exception:
        blob = None
    return kind, message, tb, blob


class DeadLetterStore:
    """Dead-lettered items kept in a SQLite file, one row per item: read, count, iterate and
    delete them. A Batcher with ``dead_letters=path`` commits each dead letter here before
    it counts it, so a caller that dies right after loses none. Safe from several threads
    of one process (one connection, under a lock); WAL lets other processes read it.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # committed means on disk
            self._db.execute(_SCHEMA)
        except sqlite3.Error:
            self._db.close()
            raise

    def add(self, letter: DeadLetter, run_id: str | None = None) -> None:
        """Commit one row per item of ``letter``."""
        rows = [(*_row(key, value, letter, run_id, None), None)
                for key, values in letter.batch.items() for value in values]
        self._insert(rows)

    def add_item(self, key: Any, value: Any, error: BaseException, *, attempts: int = 0,
                 worker: int | None = None, run_id: str | None = None,
                 line: int | None = None, fmt: str | None = None) -> None:
        """Commit one item (an input line that did not parse, say)."""
        letter = DeadLetter({key: [value]}, error, attempts, worker)
        self._insert([(*_row(key, value, letter, run_id, line), fmt)])

    def update(self, row_id: int, error: BaseException, attempts: int,
               worker: int | None = None, run_id: str | None = None) -> None:
        """A replay failed again: keep the item with its new error and attempt count."""
        kind, message, tb, blob = _error_fields(error)
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "UPDATE dead_letters SET error_type = ?, message = ?, traceback = ?, "
                "error_pickle = ?, attempts = ?, worker = ?, run_id = ?, time = ? WHERE id = ?",
                (kind, message, tb, blob, attempts, worker, run_id, time.time(), row_id))

    def _insert(self, rows: list[tuple]) -> None:
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                "INSERT INTO dead_letters (run_id, time, line, key_json, key_pickle, "
                "value_json, value_pickle, error_type, message, traceback, error_pickle, "
                "attempts, worker, format) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows)

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]

    def count(self) -> int:
        """Items kept (the same as len())."""
        return len(self)

    def __iter__(self) -> Iterator[StoredDeadLetter]:
        """Every item kept, oldest first."""
        last = 0
        while True:  # in pages: a large store is not read into memory at once
            with self._lock:
                rows = self._db.execute(
                    "SELECT id, key_json, key_pickle, value_json, value_pickle, error_pickle, "
                    "error_type, message, traceback, attempts, worker, time, run_id, line, "
                    "format FROM dead_letters WHERE id > ? ORDER BY id LIMIT 500",
                    (last,)).fetchall()
            if not rows:
                return
            for row in rows:
                yield _stored(row)
            last = rows[-1][0]

    def delete(self, ids: Iterable[int]) -> int:
        """Delete these rows; returns how many there were."""
        ids = [(i,) for i in ids]
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            before = self._db.total_changes
            self._db.executemany("DELETE FROM dead_letters WHERE id = ?", ids)
            return self._db.total_changes - before

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> DeadLetterStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<mpbatch.DeadLetterStore {self.path!r}>"


def _row(key: Any, value: Any, letter: DeadLetter, run_id: str | None,
         line: int | None) -> tuple:
    if isinstance(key, UncomparableKey):
        key = key.key
    kind, message, tb, blob = _error_fields(letter.error)
    return (run_id, time.time(), line, *_encoded(key), *_encoded(value), kind, message, tb,
            blob, letter.attempts, letter.worker)


def open_store(path: str | None) -> DeadLetterStore | None:
    """The Batcher's dead_letters=path, opened now: a path that cannot hold a SQLite file
    is an error at construction, naming it."""
    if path is None:
        return None
    try:
        return DeadLetterStore(path)
    except (sqlite3.Error, OSError) as exc:
        raise ValueError(f"dead_letters={path!r} cannot be opened as a SQLite file "
                         f"({type(exc).__name__}: {exc}); give a path in a writable folder"
                         ) from exc


def _stored(row: tuple) -> StoredDeadLetter:
    (rowid, key_json, key_pickle, value_json, value_pickle, error_pickle, kind, message, tb,
     attempts, worker, when, run_id, line, fmt) = row
    error = None
    if error_pickle is not None:
        try:
            error = pickle.loads(error_pickle)
        except Exception:  # a class that is gone, or changed: the text fields remain
            error = None
    return StoredDeadLetter(rowid, _decoded(key_json, key_pickle),
                            _decoded(value_json, value_pickle), error, kind, message, tb,
                            attempts, worker, when, run_id, line, fmt)
