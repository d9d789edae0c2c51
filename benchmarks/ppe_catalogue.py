"""The crash catalogue, run against ProcessPoolExecutor and against mpbatch, side by side.

    python benchmarks/ppe_catalogue.py                  # every row of the catalogue
    python benchmarks/ppe_catalogue.py do-segfault      # some rows
    python benchmarks/ppe_catalogue.py --limit 10       # per-run wall-clock limit (s)

The rows are those of ``tests/test_crash_catalogue.py`` (imported from it), so this script
and the test run the same cases. Each row runs twice, each time in a fresh child process
(this file with --child) that is killed once ``--limit`` seconds pass, so a hang costs one
line, not the run:

    ppe      ProcessPoolExecutor(2), as its users write it: one submit() per item
    mpbatch  mpbatch.Batcher with the test's options (size=4, 2 workers, max_attempts=2)

Both get the same 21 items: 8 good ones, then the culprit among 3 "mates", then 8 more good
ones, all in flight together; once those have an outcome (or --phase seconds pass), 4 "later"
items, to see whether the pool still works. The child prints one JSON line per outcome as it
lands; this process turns them into one line per row: what each one did.
"""

import argparse
import concurrent.futures as cf
import contextlib
import importlib
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LIMIT = 20.0  # s a child may run before it is killed
PHASE = 6.0  # s a child waits for the outcomes of one phase before it moves on
CLOSE = 3.0  # s mpbatch's close(timeout=) gets at the end
PID = re.compile(r" \(pid \d+\)")


def catalogue() -> Any:
    """The test module with the rows (tests/ is a package under the repository root)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module("tests.test_crash_catalogue")


# -- the child: run one row with one contender, print outcomes as JSON lines -----------------

def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def describe(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:
        text = "<str() failed>"
    return f"{type(exc).__name__}: {text}"[:160]


class Items:
    """The items of one run: (label, value) in submission order, and their futures."""

    def __init__(self, bad: Any) -> None:
        self.bad = bad
        good = [("ahead", v) for v in range(8)]
        mates = [("mate", 100), ("mate", 101), ("culprit", bad), ("mate", 103)]
        self.first = good + mates + [("behind", v) for v in range(200, 208)]
        self.later = [("later", v) for v in range(300, 304)]

    @staticmethod
    def key(label: str, value: Any) -> str:
        if label in ("culprit", "mate"):
            return "bad" if label == "culprit" else "mate"
        return f"k{value % 3}"


def report(futures: dict[cf.Future, tuple[str, Any]], phase: float) -> None:
    """Print each future's outcome as it lands; after ``phase`` seconds, the missing ones."""
    try:
        for fut in cf.as_completed(futures, timeout=phase):
            label, value = futures[fut]
            exc = fut.exception()
            if exc is None:
                ok = fut.result() == 2 * value
                emit(event="outcome", label=label, ok=ok, error=None if ok else "wrong result")
            else:
                emit(event="outcome", label=label, ok=False, error=describe(exc))
    except cf.TimeoutError:
        left = [label for fut, (label, _) in futures.items() if not fut.done()]
        emit(event="unfinished", labels=left)


def run_ppe(row: tuple, fns: Any) -> None:
    _, do, bad, *_ = row
    items = Items(bad)
    ex = cf.ProcessPoolExecutor(2)
    futures = {ex.submit(fns.one_item, do, Items.key(lbl, v), v): (lbl, v)
               for lbl, v in items.first}
    report(futures, PHASE)
    try:
        later = {ex.submit(fns.one_item, do, Items.key(lbl, v), v): (lbl, v)
                 for lbl, v in items.later}
    except Exception as exc:
        emit(event="later-refused", error=describe(exc))
    else:
        report(later, PHASE)
    emit(event="closing")
    ex.shutdown(wait=True)
    emit(event="closed")


def run_mpbatch(row: tuple, module: Any) -> None:
    import mpbatch

    _, do, bad, _, _, options = row
    items = Items(bad)
    b = module.make_batcher(mpbatch.Batcher, do, options)
    for phase in (items.first, items.later):
        try:
            futures = {b.submit(Items.key(lbl, v), v): (lbl, v) for lbl, v in phase}
        except Exception as exc:
            emit(event="later-refused", error=describe(exc))
            break
        threading.Thread(target=b.flush, daemon=True).start()  # partial batches go now
        report(futures, PHASE)
    emit(event="closing")
    b.close(timeout=CLOSE)
    s = b.stats()
    emit(event="closed", stats={"dead_lettered": s.dead_lettered, "pending": s.pending,
                                "worker_restarts": s.worker_restarts,
                                "splits": getattr(s, "splits", 0)})


def child(row_id: str, contender: str) -> None:
    module = catalogue()
    row = module.BY_ID[row_id]
    if contender == "ppe":
        run_ppe(row, module.fc)
    else:
        run_mpbatch(row, module)


# -- the parent: run every row twice, summarise each run in a phrase --------------------------

def run_child(row_id: str, contender: str, limit: float) -> tuple[list[dict], bool, float]:
    """The child's events, whether it was killed at the limit, and how long it ran."""
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, __file__, "--child", row_id, contender],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its workers die with its group
    try:
        out, err = proc.communicate(timeout=limit)
        killed = False
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        killed = True
    events = []
    for line in out.splitlines():
        with contextlib.suppress(ValueError):
            events.append(json.loads(line))
    if proc.returncode and not killed:  # the child itself failed: say why, in its words
        last = err.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        events.append({"event": "child-failed", "error": last[0][:120]})
    return events, killed, time.monotonic() - started


def outcomes(events: list[dict], labels: set[str]) -> tuple[int, int, list[str]]:
    """(ok, total, distinct errors) of the outcomes whose label is in ``labels``."""
    mine = [e for e in events if e["event"] == "outcome" and e["label"] in labels]
    errors = sorted({e["error"].split(":")[0] for e in mine if not e["ok"]})
    return sum(e["ok"] for e in mine), len(mine), errors


def summarise(events: list[dict], killed: bool, seconds: float, limit: float) -> str:
    culprit = [e for e in events if e.get("label") == "culprit"]
    if culprit and not culprit[0]["ok"]:
        error = PID.sub("", culprit[0]["error"])  # pids differ run to run: noise here
        what = f"culprit {error[:110]!r}"
    elif culprit:
        what = "culprit SUCCEEDED"
    else:
        what = "culprit never finished"
    parts = [what]
    refused = [e for e in events if e["event"] == "later-refused"]
    groups = [("mates", {"mate"}, 3), ("others", {"ahead", "behind"}, 16)]
    if not refused:
        groups.append(("later", {"later"}, 4))
    for name, labels, n in groups:
        ok, total, errors = outcomes(events, labels)
        text = f"{name} {ok}/{n} ok"
        if errors:
            text += f" ({total - ok} {'/'.join(errors)})"
        if total < n:
            text += f" ({n - total} never finished)"
        parts.append(text)
    if refused:
        parts.append(f"later submit() raised {refused[0]['error'].split(':')[0]}: pool "
                     "unusable after")
    closed = [e for e in events if e["event"] == "closed"]
    failed = [e for e in events if e["event"] == "child-failed"]
    if failed:
        parts.append(f"the run itself failed: {failed[0]['error']}")
    if killed:
        stage = "in shutdown()" if any(e["event"] == "closing" for e in events) else "waiting"
        parts.append(f"HUNG {stage}, killed after {limit:g} s")
    elif closed and closed[0].get("stats"):
        s = closed[0]["stats"]
        parts.append(f"restarts {s['worker_restarts']}, splits {s['splits']}, "
                     f"dead letters {s['dead_lettered']}, pending {s['pending']}")
    if not killed:
        parts.append(f"{seconds:.1f} s")
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", nargs="*", help="row ids (default: every row)")
    parser.add_argument("--limit", type=float, default=LIMIT, help="s per child run")
    parser.add_argument("--child", nargs=2, metavar=("ROW", "CONTENDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    module = catalogue()
    rows = args.rows or [row[0] for row in module.ROWS]
    print(f"# Python {sys.version.split()[0]}; ProcessPoolExecutor(2), start method "
          f"{multiprocessing.get_start_method()!r} (its default); mpbatch size=4 workers=2 "
          f"max_attempts=2 (its default start method); {args.limit:g} s per run")
    print("# 21 items in flight: 8 'others', the culprit with 3 'mates', 8 more 'others'; "
          "then 4 'later'")
    started = time.monotonic()
    for row_id in rows:
        ppe = summarise(*run_child(row_id, "ppe", args.limit), args.limit)
        mp = summarise(*run_child(row_id, "mpbatch", args.limit), args.limit)
        print(f"{row_id} | PPE: {ppe} | mpbatch: {mp}", flush=True)
    print(f"# total {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
