"""The executor workload: mpbatch.Executor against concurrent.futures.ProcessPoolExecutor.

    python benchmarks/executor.py              # 2 workers, medians of 3, interleaved
    python benchmarks/executor.py --smoke      # tiny, 1 repeat

Scenarios (each run a fresh process tree, timed with start-up and shutdown):
  map-trivial   1,000,000 calls of a trivial function through map(): PPE with chunksize=1,
                PPE with the best chunksize of a sweep, mpbatch.Executor with its defaults
  submit        submit() calls of that function, then every result: PPE (50,000 calls:
                at its rate a million take minutes) and mpbatch (1,000,000); peak PSS per
                pending call above an empty pool's
  map-work      20,000 calls of ~100 us (sha256 rounds): efficiency = serial / 2 / wall
Scores are calls/s; ratios are taken within the run.
"""

import argparse
import datetime
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import psutil
from run import HERE, MB, RESULT_TAG, RESULTS, ROOT, TreeSampler, communicate_sampled

WORKERS = 2
ROUNDS = int(os.environ.get("EXECUTOR_ROUNDS", "300"))


def trivial(x):
    return x + 1


def work(x):
    digest = x.to_bytes(8, "little")
    for _ in range(ROUNDS):
        digest = hashlib.sha256(digest).digest()
    return digest[0]


# -- the child: one measured run ------------------------------------------------------------

def child(spec: dict) -> dict:
    fn = trivial if spec["fn"] == "trivial" else work
    n, how = spec["n"], spec["how"]
    started = time.perf_counter()
    if spec["who"] == "serial":
        total = sum(map(fn, range(n)))
    else:
        with _executor(spec["who"]) as ex:
            if how == "map":
                kwargs = {"chunksize": spec["chunk"]} if spec.get("chunk") else {}
                total = sum(ex.map(fn, range(n), **kwargs))
            elif how == "empty":
                total = sum(ex.map(fn, range(WORKERS)))  # an empty pool, warmed up
                mark = time.perf_counter()
                while time.perf_counter() - mark < 0.5:
                    pass
            else:
                futs = [ex.submit(fn, i) for i in range(n)]
                total = sum(f.result() for f in futs)
    wall = time.perf_counter() - started
    return {"wall_s": wall, "total": total}


def _executor(who: str):
    if who == "ppe":
        return ProcessPoolExecutor(max_workers=WORKERS)
    import mpbatch

    return mpbatch.Executor(max_workers=WORKERS)


def expected(fn: str, n: int) -> int | None:
    return n * (n + 1) // 2 if fn == "trivial" else None


# -- the parent: runs, interleaved ------------------------------------------------------------

def measure(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)]),
                        "EXECUTOR_ROUNDS": str(ROUNDS)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env=env)
    sampler = TreeSampler(proc.pid)
    out, err, _, _ = communicate_sampled(proc, sampler, timeout)
    lines = [x for x in out.splitlines() if x.startswith(RESULT_TAG)]
    rec = json.loads(lines[-1][len(RESULT_TAG):]) if lines else {"error": err[-1500:]}
    rec["peak_pss_mb"] = sampler.peak / MB
    rec["calls_per_s"] = spec["n"] / rec["wall_s"] if "wall_s" in rec else 0.0
    want = expected(spec["fn"], spec["n"])
    rec["ok"] = "error" not in rec and (want is None or rec["total"] == want)
    return rec


def scenarios(args: argparse.Namespace, best_chunk: int) -> dict[str, dict]:
    n, nw, ns = args.calls, args.work_calls, args.ppe_submits
    return {
        "map-trivial/ppe chunksize=1": {"who": "ppe", "how": "map", "fn": "trivial",
                                        "n": args.chunk1_calls, "chunk": 1},
        f"map-trivial/ppe chunksize={best_chunk}": {"who": "ppe", "how": "map",
                                                    "fn": "trivial", "n": n,
                                                    "chunk": best_chunk},
        "map-trivial/mpbatch": {"who": "mpbatch", "how": "map", "fn": "trivial", "n": n},
        "submit/ppe": {"who": "ppe", "how": "submit", "fn": "trivial", "n": ns},
        "submit/mpbatch": {"who": "mpbatch", "how": "submit", "fn": "trivial", "n": n},
        "submit/mpbatch empty": {"who": "mpbatch", "how": "empty", "fn": "trivial", "n": 2},
        "map-work/serial": {"who": "serial", "how": "map", "fn": "work", "n": nw},
        f"map-work/ppe chunksize={args.work_chunk}": {"who": "ppe", "how": "map", "fn": "work",
                                                      "n": nw, "chunk": args.work_chunk},
        "map-work/mpbatch": {"who": "mpbatch", "how": "map", "fn": "work", "n": nw},
    }


def sweep(args: argparse.Namespace) -> int:
    """PPE.map's best chunksize for the trivial calls (one run each)."""
    rates = {}
    for chunk in args.chunks:
        rec = measure({"who": "ppe", "how": "map", "fn": "trivial", "n": args.calls,
                       "chunk": chunk}, args.timeout)
        rates[chunk] = rec["calls_per_s"] if rec["ok"] else 0.0
        print(f"  sweep: PPE.map chunksize={chunk}: {rates[chunk]:,.0f} calls/s", flush=True)
    return max(rates, key=rates.get)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calls", type=int, default=1_000_000)
    parser.add_argument("--chunk1-calls", type=int, default=100_000,
                        help="calls for PPE.map with chunksize=1 (~13k calls/s)")
    parser.add_argument("--ppe-submits", type=int, default=50_000)
    parser.add_argument("--work-calls", type=int, default=20_000)
    parser.add_argument("--work-chunk", type=int, default=100)
    parser.add_argument("--chunks", default="100,1000,10000")
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    if args.child:
        print(RESULT_TAG + json.dumps(child(json.loads(args.child))), flush=True)
        return
    args.chunks = [int(c) for c in args.chunks.split(",")]
    if args.smoke:
        args.repeats, args.calls, args.chunk1_calls, args.ppe_submits = 1, 20_000, 2_000, 2_000
        args.work_calls, args.chunks = 400, [1000]
    best = sweep(args)
    runs: dict[str, list[dict]] = {}
    for repeat in range(args.repeats):
        for name, spec in scenarios(args, best).items():
            rec = measure(spec, args.timeout)
            runs.setdefault(name, []).append(rec | {"n": spec["n"]})
            print(f"  [{repeat + 1}/{args.repeats}] {name:32s} {rec['calls_per_s']:>11,.0f} "
                  f"calls/s {rec['peak_pss_mb']:7.1f} MB {'ok' if rec['ok'] else rec}",
                  flush=True)
    summary = summarize(runs, args, best)
    print(summary["table_md"])
    stamp = datetime.date.today().isoformat() + ("-smoke" if args.smoke else "")
    env = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                    capture_output=True, text=True).stdout.strip(),
           "python": platform.python_version(), "platform": platform.platform(),
           "cpus": psutil.cpu_count(), "workers": WORKERS, "rounds": ROUNDS,
           "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    path = RESULTS / f"{stamp}-EXECUTOR.json"
    path.write_text(json.dumps({"environment": env, "runs": runs, **summary}, indent=1))
    print(f"wrote {path}")


def summarize(runs: dict, args: argparse.Namespace, best: int) -> dict:
    med = {name: statistics.median(r["calls_per_s"] for r in recs)
           for name, recs in runs.items() if all(r["ok"] for r in recs)}
    wall = {name: statistics.median(r["wall_s"] for r in recs) for name, recs in runs.items()}
    peak = {name: max(r["peak_pss_mb"] for r in recs) for name, recs in runs.items()}
    ratios = {
        "map_vs_ppe_best": med.get("map-trivial/mpbatch", 0) / med.get(
            f"map-trivial/ppe chunksize={best}", float("inf")),
        "map_vs_ppe_chunksize_1": med.get("map-trivial/mpbatch", 0) / med.get(
            "map-trivial/ppe chunksize=1", float("inf")),
        "submit_vs_ppe": med.get("submit/mpbatch", 0) / med.get("submit/ppe", float("inf")),
        "submit_bytes_per_pending_call": (peak.get("submit/mpbatch", 0) - peak.get(
            "submit/mpbatch empty", 0)) * MB / args.calls,
    }
    serial = wall.get("map-work/serial")
    for name in (f"map-work/ppe chunksize={args.work_chunk}", "map-work/mpbatch"):
        if serial and name in wall:
            ratios[f"efficiency {name}"] = serial / WORKERS / wall[name]
    rows = ["| scenario | calls/s (median) | peak MB |", "|---|---|---|"]
    rows += [f"| {name} | {med.get(name, 0):,.0f} | {peak[name]:.1f} |" for name in runs]
    rows += ["", "| ratio | value |", "|---|---|"]
    rows += [f"| {k} | {v:,.2f} |" for k, v in ratios.items()]
    return {"medians": med, "ratios": ratios, "best_chunksize": best,
            "table_md": "\n".join(rows)}


if __name__ == "__main__":
    main()
