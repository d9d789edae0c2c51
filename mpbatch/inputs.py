"""What ``mpbatch run`` reads (caller process): JSON Lines, CSV or text, from a file or stdin,
as ``(line, payload)`` pairs for a Job (job.py), where the payload is decoded.

The caller does as little as it can per line: JSON Lines and text lines go as raw bytes and
are decoded in the workers; CSV is split into fields here (csv's C reader: a quoted field
may hold a newline, so rows are not lines) and made into dicts there.
"""

from __future__ import annotations

import csv
import io
import os
import sys
from collections.abc import Callable, Iterator
from typing import IO, Any

from .job import FORMATS

EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}


def format_of(path: str, fmt: str | None) -> str:
    """The input's format: ``fmt`` if given, else by extension (stdin: JSON Lines)."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise ValueError(f"--format must be one of {', '.join(FORMATS)} (got {fmt!r})")
        return fmt
    if path == "-":
        return "jsonl"
    return EXTENSIONS.get(os.path.splitext(path)[1].lower(), "text")


class Input:
    """One input, opened at construction (so a missing file is an error before any work)."""

    def __init__(self, path: str, fmt: str | None = None) -> None:
        self.path = path
        self.fmt = format_of(path, fmt)
        self.blank = 0  # blank JSON Lines lines, skipped
        self.header: list[str] | None = None
        self._file: IO[Any] = self._open()
        if self.fmt == "csv":
            self._rows = csv.reader(self._file)
            try:
                self.header = next(self._rows)
            except StopIteration:
                self.header = []
            except csv.Error as exc:
                raise ValueError(f"{path}: the CSV header cannot be read ({exc})") from exc

    def _open(self) -> IO[Any]:
        if self.fmt == "csv":
            if self.path == "-":
                return io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", newline="")
            return open(self.path, encoding="utf-8", newline="")
        if self.path == "-":
            return sys.stdin.buffer
        return open(self.path, "rb")

    def lines_total(self) -> int | None:
        """How many lines the file has (for an ETA); None for stdin."""
        if self.path == "-":
            return None
        count = 0
        with open(self.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                count += block.count(b"\n")
        return count

    def pairs(self, done: Callable[[int], bool] | None = None) -> Iterator[tuple[int, Any]]:
        """(line, payload) per item, the items ``done`` says are done left out."""
        if self.fmt == "csv":
            yield from self._csv_pairs(done)
            return
        blank_ok = self.fmt == "jsonl"
        for line, raw in enumerate(self._file, 1):
            if blank_ok and not raw.strip():
                self.blank += 1
                continue
            if done is None or not done(line):
                yield line, raw

    def _csv_pairs(self, done: Callable[[int], bool] | None) -> Iterator[tuple[int, Any]]:
        rows = self._rows
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except csv.Error as exc:  # a malformed row: it fails alone, with its text
                line = rows.line_num
                if done is None or not done(line):
                    yield line, [f"<unreadable CSV: {exc}>"]
                continue
            line = rows.line_num
            if done is None or not done(line):
                yield line, row

    def close(self) -> None:
        if self._file not in (sys.stdin, sys.stdin.buffer):
            self._file.close()
