"""How the caller's cost grows with the number of workers and with the number of distinct keys.

    python benchmarks/scaling.py                 # W1's stream, 1M items, 3 repeats (~3 min)
    python benchmarks/scaling.py --smoke         # 20,000 items, 1 repeat (seconds)

Two sweeps of W1's stream (value i, do returns v * 2) through `Pool.imap_unordered` (the
reference, chunksize 10,000), mpbatch `add_many` and mpbatch `add` (size 2,000):

- workers 1, 2, 4, 8 with 100 distinct keys;
- 100, 10,000 and 1,000,000 distinct keys (key f"k{i % keys}") with 2 workers.

Each cell is measured the way run.py measures (a fresh child per run, interleaved repeats,
count and checksum checked, peak PSS of the whole tree) and reports the median items/s, the
caller's own CPU per item (every thread of the caller process, none of its workers') and the
peak PSS. This machine has 2 cores: with more workers than cores the wall time says little,
and the caller's CPU per item is the number to read.
"""

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import run
import workloads

CONTENDERS = {"pool": 10_000, "mpbatch-add_many": 2000, "mpbatch-add": 2000}  # -> chunk/size
WORKERS = (1, 2, 4, 8)
KEYS = (100, 10_000, 1_000_000)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="20,000 items, 1 repeat")
    p.add_argument("--n", type=int, help="items per run (default 1,000,000)")
    p.add_argument("--repeats", type=int, help="runs per cell (default 3)")
    p.add_argument("--mpbatch", type=Path, default=run.ROOT, metavar="DIR",
                   help="import mpbatch from DIR/mpbatch (see run.py)")
    p.add_argument("--timeout", type=float, default=600, help="s per run before it is killed")
    args = p.parse_args(argv)
    args.n = args.n or (20_000 if args.smoke else 1_000_000)
    args.repeats = args.repeats or (1 if args.smoke else 3)
    # measure_quietly() retries a run that shared the machine with other work, as run.py does.
    args.retry_busy, args.idle_wait = (0 if args.smoke else 2), 60
    return args


def spec(args, name, workers, keys):
    return {"workload": "W1", "contender": name, "n": args.n, "chunk": CONTENDERS[name],
            "rounds": 1, "workers": workers, "start_method": None, "smoke": False,
            "big": False, "keys": keys, "mpbatch_from": str(args.mpbatch)}


def cells():
    """(sweep, workers, keys) for every cell; the two sweeps share (2 workers, 100 keys)."""
    out = [("workers", w, 100) for w in WORKERS]
    out += [("keys", 2, k) for k in KEYS if k != 100]
    return out


def measure_cell(args, workers, keys, log):
    """Every contender `repeats` times on one cell, interleaved; the medians per contender."""
    runs = {name: [] for name in CONTENDERS}
    for rep in range(args.repeats):
        for name in CONTENDERS:
            rec = run.measure_quietly(args, spec(args, name, workers, keys))
            runs[name].append(rec)
            log(f"workers={workers} keys={keys:>9,} {rep + 1}/{args.repeats} {name:17} "
                f"{run.fmt_run(rec, args.n)}  caller CPU {rec.get('caller_cpu', 0):.2f} s")
    return {name: summarize(args, recs) for name, recs in runs.items()}, runs


def summarize(args, recs):
    good = [r for r in recs if r["ok"]]
    if not good:
        return {"failed": len(recs), "error": recs[-1].get("error")}
    return {"items_per_s": statistics.median(args.n / r["wall"] for r in good),
            "caller_ns_per_item": statistics.median(r["caller_cpu"] / args.n * 1e9 for r in good),
            "peak_pss_mb": statistics.median(r["peak_pss"] / run.MB for r in good),
            "ok": len(good), "failed": len(recs) - len(good)}


def table(results, sweep):
    """Markdown: one row per cell of `sweep`, three columns per contender."""
    head = "| workers | keys | " + " | ".join(
        f"{n} items/s | {n} caller ns/item | {n} PSS MB" for n in CONTENDERS) + " |"
    lines = [head, "|" + "---|" * (2 + 3 * len(CONTENDERS))]
    for cell in results:
        if cell["sweep"] != sweep and not (cell["workers"] == 2 and cell["keys"] == 100):
            continue
        row = [f"{cell['workers']}", f"{cell['keys']:,}"]
        for name in CONTENDERS:
            m = cell["medians"][name]
            if "items_per_s" not in m:
                row += ["FAILED"] * 3
                continue
            row += [f"{m['items_per_s']:,.0f}", f"{m['caller_ns_per_item']:.0f}",
                    f"{m['peak_pss_mb']:.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    broken = run.mpbatch_importable(args)
    if broken:
        sys.exit(f"mpbatch is not importable from {args.mpbatch}: {broken}")
    log = print
    results = []
    for sweep, workers, keys in cells():
        medians, runs = measure_cell(args, workers, keys, log)
        results.append({"sweep": sweep, "workers": workers, "keys": keys, "medians": medians,
                        "runs": runs})
    text = (f"Caller cost vs workers (100 keys)\n{table(results, 'workers')}\n\n"
            f"Caller cost vs distinct keys (2 workers)\n{table(results, 'keys')}")
    print("\n" + text)
    run.RESULTS.mkdir(parents=True, exist_ok=True)
    day = datetime.date.today().isoformat()
    path = run.RESULTS / f"{day}{'-smoke' if args.smoke else ''}-scaling.json"
    env = run.environment(argparse.Namespace(mpbatch=args.mpbatch, start_method=None,
                                             workers=list(WORKERS)), rounds=None)
    doc = {"n": args.n, "repeats": args.repeats, "contenders": CONTENDERS,
           "environment": env, "table_md": text, "cells": results,
           "expected": workloads.expected(args.n)}
    path.write_text(json.dumps(doc, indent=1, default=repr))
    print(f"(wrote {path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
