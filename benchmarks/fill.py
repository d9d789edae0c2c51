"""How long items wait for their batch: latency of a steady keyed stream batched by size.

    python benchmarks/fill.py                                  # this checkout and Pool
    python benchmarks/fill.py --run /tmp/before --run .        # an A/B of checkouts
    python benchmarks/fill.py --smoke                          # tiny, 1 repeat (CI)

A producer offers items at a fixed rate (open loop: a late item is not skipped, as in
W4) over KEYS keys, each value the monotonic time it was due; do() returns 0 for each item,
so the work is nothing and the time is batching's. On each result the caller takes its
latency, now minus the value: an item offered late (the caller busy elsewhere) counts its
lateness too, and each run also reports the latest an item was offered. mpbatch runs
``Batcher(do, size=S, interval=INTERVAL, workers=2)`` fed by one add_many(); its batches
run by size when a worker's batch fills before interval. Pool (``imap_unordered(fn,
stream, chunksize=S)``) is the peer: its task handler also waits for S items of the stream
before it sends a chunk.

Each scenario is a (rate, size) pair: SCENARIOS, or ``--scenario RATE:SIZE``. With two
workers a batch of S items fills in S / rate when one worker takes every chunk until its
batch runs, and in twice that when both fill batches at once. Every (run, scenario) is a
fresh child process; the runs of a repeat go in an order turned by one each repeat.
Reported per scenario and run: medians over repeats of each run's p50, p99 and max latency
and of its latest offer, and each run's p50 over the first run's in the same repeat (median
and range). Writes results/<date>-fill.json (``--smoke``: <date>-smoke-fill.json).
"""

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ab import at_least_one, checkout_facts
from run import RESULTS, ROOT, _git, rotated

KEYS = 100
INTERVAL = 0.05  # s, the README's example and W1's
SCENARIOS = ((20_000, 500), (100_000, 2000), (400_000, 5000), (100_000, 200))
SECONDS = 2.0  # of stream per run (SMOKE_SECONDS under --smoke)
SMOKE_SECONDS = 0.2
RESULT_TAG = "FILL-RESULT "


# --- the child: one run -------------------------------------------------------------------


def offered(rate, n, late):
    """(key, due time) pairs at ``rate`` per second, on schedule (busy-waited: sleeping to
    the next 10-50 us would overshoot it on most kernels); ``late[0]``: the most any item
    was offered after its due time, in seconds."""
    start = time.monotonic()
    for i in range(n):
        due = start + i / rate
        now = time.monotonic()
        while now < due:
            now = time.monotonic()
        late[0] = max(late[0], now - due)
        yield f"k{i % KEYS}", due


def zeros(batch):
    return {key: [0] * len(values) for key, values in batch.items()}


def stamp(value):
    return value  # Pool's fn: the offer time comes back as the result


def child(spec):
    rate, size = spec["rate"], spec["size"]
    n = int(rate * spec["seconds"])
    waits, late = [], [0.0]
    if spec["run"] == "pool":
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(2) as pool:
            values = (value for _, value in offered(rate, n, late))
            for offered_at in pool.imap_unordered(stamp, values, chunksize=size):
                waits.append(time.monotonic() - offered_at)
    else:
        import mpbatch

        def on_result(key, values, results):
            now = time.monotonic()
            waits.extend(now - value for value in values)

        with mpbatch.Batcher(zeros, size=size, interval=INTERVAL, workers=2,
                             on_result=on_result) as b:
            b.add_many(offered(rate, n, late))
    waits.sort()
    if len(waits) != n:
        raise SystemExit(f"{len(waits)} results of {n}")

    def at(q):
        return waits[min(n - 1, int(q * n))] * 1e3

    return {"n": n, "p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": waits[-1] * 1e3,
            "late_ms": late[0] * 1e3}


# --- the parent -----------------------------------------------------------------------------


def measure(spec, timeout):
    """One run in a fresh process, importing mpbatch from the run's checkout."""
    env = dict(os.environ, PYTHONPATH=spec.get("checkout") or str(ROOT))
    try:
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                              env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"run {spec} took more than --timeout {timeout} s") from None
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    raise SystemExit(f"run {spec} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")


def runs_of(args):
    """{label: spec fields}: each --run checkout (mpbatch), then Pool unless --no-pool."""
    runs = {}
    for where in args.run or [str(ROOT)]:
        checkout = Path(where).resolve()
        if not (checkout / "mpbatch").is_dir():
            sys.exit(f"--run {where}: no mpbatch/ in {checkout}")
        facts = checkout_facts(checkout)
        label = f"mpbatch@{facts['commit'] or 'unknown'}{'+' if facts['dirty'] else ''}"
        if label in runs:
            label = f"{label}:{checkout}"
        if label in runs:
            sys.exit(f"--run {where}: given twice")
        runs[label] = {"run": "mpbatch", "checkout": str(checkout)} | facts
    if not args.no_pool:
        runs["pool"] = {"run": "pool"}
    return runs


def summarize(labels, records):
    """Per scenario and run: medians of p50/p99/max, and p50 over the first run's, pairwise."""
    out = {}
    for scenario in dict.fromkeys(r["scenario"] for r in records):  # in the order run
        mine = [r for r in records if r["scenario"] == scenario]
        base = {r["repeat"]: r["p50_ms"] for r in mine if r["label"] == labels[0]}
        rows = {}
        for label in labels:
            got = [r for r in mine if r["label"] == label]
            ratios = [r["p50_ms"] / base[r["repeat"]] for r in got if base.get(r["repeat"])]
            rows[label] = {field: statistics.median(r[field] for r in got)
                           for field in ("p50_ms", "p99_ms", "max_ms", "late_ms")}
            rows[label]["p50_ratio"] = ((statistics.median(ratios), min(ratios), max(ratios))
                                        if ratios else (math.nan,) * 3)
        out[scenario] = rows
    return out


def table(summary, labels):
    lines = ["| items/s : size | run | p50 ms | p99 ms | max ms | latest offer ms "
             "| p50 ÷ first, run by run |", "|---|---|---|---|---|---|---|"]
    for scenario, rows in summary.items():
        for label in labels:
            row = rows[label]
            mid, low, high = row["p50_ratio"]
            lines.append(f"| {scenario} | {label} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} "
                         f"| {row['max_ms']:.1f} | {row['late_ms']:.1f} "
                         f"| {mid:.2f} ({low:.2f}-{high:.2f}) |")
    return "\n".join(lines)


def scenario(text):
    rate, _, size = text.partition(":")
    try:
        rate, size = int(rate), int(size)
    except ValueError:
        raise argparse.ArgumentTypeError(f"RATE:SIZE, two whole numbers, e.g. 20000:500, not "
                                         f"{text!r}") from None
    if rate < 1 or size < 1:
        raise argparse.ArgumentTypeError(f"RATE:SIZE, both 1 or more, not {text!r}")
    return rate, size


def positive(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return value


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", action="append", metavar="DIR",
                   help="an mpbatch checkout (repeat for an A/B; the first is the base)")
    p.add_argument("--no-pool", action="store_true", help="leave Pool out")
    p.add_argument("--scenario", action="append", type=scenario, metavar="RATE:SIZE")
    p.add_argument("--repeats", type=at_least_one, default=5, metavar="N")
    p.add_argument("--seconds", type=positive, help=f"of stream per run (default {SECONDS})")
    p.add_argument("--timeout", type=float, default=120, help="s per run")
    p.add_argument("--smoke", action="store_true", help="1 repeat of short streams")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    if args.child:
        print(RESULT_TAG + json.dumps(child(json.loads(args.child))), flush=True)
        return
    runs = runs_of(args)
    labels = list(runs)
    scenarios = args.scenario or SCENARIOS
    if len(set(scenarios)) < len(scenarios):
        sys.exit("each --scenario once: a repeated one would be measured twice under one name")
    repeats = 1 if args.smoke else args.repeats
    seconds = args.seconds or (SMOKE_SECONDS if args.smoke else SECONDS)
    if any(int(rate * seconds) < 1 for rate, _ in scenarios):
        sys.exit(f"--seconds {seconds}: too short for an item at every --scenario's rate")
    records = []
    for repeat in range(repeats):
        for rate, size in scenarios:
            for label in rotated(labels, repeat):
                spec = {"run": runs[label]["run"], "checkout": runs[label].get("checkout"),
                        "rate": rate, "size": size, "seconds": seconds}
                rec = measure(spec, args.timeout)
                records.append(rec | {"label": label, "repeat": repeat,
                                      "scenario": f"{rate:,} : {size}"})
                print(f"[{repeat}] {rate:,}/s size={size} {label}: p50 "
                      f"{rec['p50_ms']:.1f} ms, p99 {rec['p99_ms']:.1f} ms  ok", flush=True)
    summary = summarize(labels, records)
    env = {"python": sys.version.split()[0], "cpus": os.cpu_count(),
           "commit": _git("rev-parse", "--short", "HEAD"),
           "argv": sys.argv[1:] if argv is None else argv, "runs": runs, "keys": KEYS,
           "interval": INTERVAL, "seconds": seconds}
    stem = f"{datetime.date.today()}-{'smoke-' if args.smoke else ''}fill"
    path = RESULTS / f"{stem}.json"
    path.write_text(json.dumps({"environment": env, "summary": summary,
                                "table_md": table(summary, labels), "runs": records},
                               indent=1))
    print(table(summary, labels))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
