"""Report: what a run() or ``mpbatch run`` did, as numbers, a short summary, JSON and a
picture (caller process).

The counts keep the Batcher's invariant: ``accepted == succeeded + dead_lettered +
cancelled + pending`` (cancelled: items a Ctrl-C left unstarted; they run on --resume).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Sample:
    """One look at a running job."""

    t: float
    """Seconds since the run started."""
    done: int
    """Items with an outcome so far (succeeded + dead-lettered)."""
    busy: list[float]
    """Each worker's share of the time since the previous sample spent running batches."""


@dataclass
class Report:
    """What a run did. ``print(report)`` for a summary, ``save(path)`` for JSON,
    ``plot(path)`` for a PNG (``pip install mpbatch[plot]``)."""

    accepted: int = 0
    succeeded: int = 0
    dead_lettered: int = 0
    cancelled: int = 0
    """Accepted but never started: a Ctrl-C stopped the run first."""
    pending: int = 0
    skipped: int = 0
    """Items an earlier run of a resumed job had done already (not run again)."""
    dead_before: int = 0
    """Of those, the ones that earlier run dead-lettered."""
    blank_lines: int = 0
    wall_s: float = 0.0
    items_per_s: float = 0.0
    """Items with an outcome per second of wall time."""
    busy: list[float] = field(default_factory=list)
    """Per worker: share of the wall time spent running batches (do() and its results)."""
    batches: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)
    """Items in a batch -> how many batches had that many."""
    do_ms_p50: float = 0.0
    do_ms_p99: float = 0.0
    do_ms_max: float = 0.0
    retries: int = 0
    failed_attempts: int = 0
    redelivered: int = 0
    worker_restarts: int = 0
    splits: int = 0
    recycled: int = 0
    dead_letters: str | None = None
    """Where the dead letters were kept: a SQLite file, or None (in memory)."""
    output: str | None = None
    interrupted: bool = False
    timeline: list[Sample] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every item of the whole job succeeded (a resumed job's earlier runs included)."""
        return (self.dead_lettered == 0 and self.dead_before == 0 and self.cancelled == 0
                and self.pending == 0 and not self.interrupted)

    def __str__(self) -> str:
        busy = ", ".join(f"{b:.0%}" for b in self.busy) or "-"
        sizes = sum(n * k for n, k in self.batch_sizes.items())
        mean = sizes / self.batches if self.batches else 0
        lines = [
            f"mpbatch: {self.succeeded:,} succeeded, {self.dead_lettered:,} dead-lettered"
            + (f", {self.cancelled:,} cancelled" if self.cancelled else "")
            + (f", {self.pending:,} pending" if self.pending else "")
            + f" of {self.accepted:,} in {self.wall_s:.2f} s ({self.items_per_s:,.0f} items/s)",
            f"  workers busy: {busy}; {self.batches:,} batches of {mean:,.1f} items on "
            f"average, do() p50 {self.do_ms_p50:.2f} ms, p99 {self.do_ms_p99:.2f} ms, "
            f"max {self.do_ms_max:.2f} ms",
        ]
        if self.retries or self.worker_restarts or self.splits or self.failed_attempts:
            lines.append(f"  failed attempts {self.failed_attempts:,}, retries "
                         f"{self.retries:,}, worker restarts {self.worker_restarts}, "
                         f"splits {self.splits}")
        if self.skipped:
            lines.append(f"  resumed: {self.skipped:,} items were done by earlier runs "
                         f"({self.dead_before:,} of them dead-lettered)")
        if self.blank_lines:
            lines.append(f"  {self.blank_lines:,} blank lines skipped")
        if self.dead_lettered or self.dead_before:
            where = self.dead_letters or "memory only (pass --dead-letters to keep them)"
            lines.append(f"  dead letters: {where}")
        if self.interrupted:
            lines.append("  interrupted: the items not started were cancelled")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["batch_sizes"] = {str(k): v for k, v in sorted(self.batch_sizes.items())}
        data["ok"] = self.ok
        return data

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the report as JSON."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.write("\n")

    def plot(self, path: str | os.PathLike[str]) -> None:
        """Draw items/s over the run and each worker's busy share over time, as a PNG."""
        plt = pyplot()
        fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(9, 6))
        times = [s.t for s in self.timeline]
        starts = [Sample(0.0, 0, []), *self.timeline]  # the rate up to each look
        rates = [(b.done - a.done) / max(b.t - a.t, 1e-9)
                 for a, b in zip(starts, self.timeline, strict=False)]
        top.plot(times, rates, color="tab:blue")
        top.set_ylabel("items/s")
        top.set_title(f"{self.succeeded:,} succeeded, {self.dead_lettered:,} dead-lettered "
                      f"in {self.wall_s:.1f} s")
        workers = max((len(s.busy) for s in self.timeline), default=0)
        for i in range(workers):
            bottom.plot(times, [100 * s.busy[i] if i < len(s.busy) else 0
                                for s in self.timeline], label=f"worker {i}")
        bottom.set_ylabel("busy (% of the time)")
        bottom.set_ylim(0, 105)
        bottom.set_xlabel("seconds since the start")
        if workers:
            bottom.legend(loc="lower right", fontsize="small")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def pyplot() -> Any:
    """matplotlib.pyplot, headless; ImportError naming the extra when it is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("plotting needs matplotlib: pip install 'mpbatch[plot]'") from exc
    return plt
