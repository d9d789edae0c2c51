"""The monitor of a running job (caller process, a thread of its own): a few looks a second
at the counters feed the progress bar, the report's timeline and the journal's commits.

Nothing here runs per item: a job at millions of items a second pays for four looks a
second, whatever its pace.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from .counters import WORK_NS
from .report import Sample

if TYPE_CHECKING:
    from .batcher import Batcher
    from .journal import Output

TICK = 0.25  # seconds between looks
MAX_SAMPLES = 2400  # the timeline keeps at most this many; older ones are merged in pairs


def wants_bar(progress: bool | None) -> bool:
    """progress=None: a bar only when stderr is a terminal."""
    if progress is None:
        return sys.stderr.isatty()
    return bool(progress)


class Monitor(threading.Thread):
    """Looks at a Batcher every TICK seconds until stop()."""

    def __init__(self, batcher: Batcher, output: Output | None, total: int | None,
                 bar: bool) -> None:
        super().__init__(name="mpbatch-monitor", daemon=True)
        self.batcher = batcher
        self.output = output
        self.total = total
        self.started = time.monotonic()
        self.timeline: list[Sample] = []
        self.busy_ns: list[int] = []  # per worker, all incarnations
        self._seen: list[int] = []  # per worker: WORK_NS at the last look
        self._stop_event = threading.Event()
        self._bar = _bar(total) if bar else None
        self._step = 1  # looks per sample kept (doubles when the timeline is merged)
        self._looks = 0
        self.error: BaseException | None = None  # a failed journal commit, for run()

    def run(self) -> None:
        while not self._stop_event.wait(TICK):
            self.look()

    def stop(self) -> None:
        """Stop looking; one last look, and the bar closed."""
        self._stop_event.set()
        if self.is_alive():
            self.join()
        self.look(final=True)
        if self._bar is not None:
            self._bar.close()

    def look(self, final: bool = False) -> None:
        b = self.batcher
        stats = b.stats()
        busy = self._busy_since(b)
        now = time.monotonic() - self.started
        self._looks += 1
        if final or self._looks % self._step == 0:
            self._keep(Sample(now, stats.succeeded + stats.dead_lettered, busy))
        if self._bar is not None:
            self._bar.n = stats.succeeded + stats.dead_lettered
            self._bar.set_postfix(failed=stats.dead_lettered, refresh=False)
            self._bar.refresh()
        if self.output is not None:
            try:
                self.output.commit()
            except Exception as exc:  # a full disk: run() says so at the end
                self.error = exc

    def _busy_since(self, b: Batcher) -> list[float]:
        """Each worker's share of the time since the last look spent running batches."""
        counters = getattr(b, "_counters", None)
        if counters is None or b._state == "closed":  # not started, or freed already
            return []
        if not self._seen:
            self._seen = [0] * counters.workers
            self.busy_ns = [0] * counters.workers
            self._last_t = time.monotonic_ns()
        now = time.monotonic_ns()
        span = max(now - self._last_t, 1)
        self._last_t = now
        shares = []
        for i in range(counters.workers):
            value = counters.get(i, WORK_NS)
            # A replacement's counter starts again at 0.
            delta = value - self._seen[i] if value >= self._seen[i] else value
            self._seen[i] = value
            self.busy_ns[i] += delta
            shares.append(min(1.0, delta / span))
        return shares

    def _keep(self, sample: Sample) -> None:
        self.timeline.append(sample)
        if len(self.timeline) > MAX_SAMPLES:  # bounded: keep every other sample
            self.timeline = self.timeline[::2]
            self._step *= 2


def _bar(total: int | None) -> Any:
    from tqdm import tqdm

    # A terminal that reports no size (a fresh pty: 0 x 0) would get no bar at all.
    size = shutil.get_terminal_size((80, 24))
    return tqdm(total=total, unit="items", file=sys.stderr, ncols=size.columns or 80,
                nrows=max(size.lines, 2), mininterval=TICK, smoothing=0.1)
