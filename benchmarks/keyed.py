"""The keyed-state workload: per-key state that is costly to warm and kept for a few keys only.

    python benchmarks/keyed.py                 # 2 workers, medians of 3, interleaved
    python benchmarks/keyed.py --smoke         # tiny, 1 repeat

The work (issue 19, item 3). Item i is (key, (i, rounds, warm_rounds)), its key drawn from a
fixed, skewed distribution by a hash of i (the same stream in every run and contender):
HOT keys carry all but TAIL_SHARE of the items, Zipf-weighted among themselves (the hottest
alone more than half), and TAIL_KEYS rare keys share the rest. The first time a process
meets a key, or meets it again after it was evicted, it warms it up: WARM_MS of sha256
rounds (a model loaded, a connection opened). It keeps the LRU most recent keys warm in
module-level state (an OrderedDict of at most LRU entries, as the README's per-key cache
does with init): fewer than the hot keys, more than half of them, so one process cannot
keep every hot key warm but two that split them can. Then each item costs ITEM_US of
sha256 rounds chained from the key's warm state. Both costs are calibrated once, here.

Every per-item result is 2 * (2*i + 0) + warmed, where the 0 is a byte of the last digest
shifted out (the work cannot be skipped) and `warmed` is 1 when this item's call warmed its
key: the caller checks the count and that sum(result >> 1) == n(n-1), and counts warm-ups as
sum(result & 1): exact, and the same whatever the timing. mpbatch's do() gets {key:
[values]} and warms a key once per batch at most (its first item carries the flag); the
peers call the per-item function, which checks the LRU on every item.

Contenders, each a fresh process tree timed with start-up and shutdown, interleaved:
  serial                  the per-item function in a loop (one process, one LRU)
  pool imap c=C           multiprocessing.Pool.imap_unordered, chunksize C swept
  pool map                Pool.map with its default chunksize: n / 8 items, static slices
  ppe map c=C             ProcessPoolExecutor.map, chunksize C swept
  mpire c=C, joblib       when installed (mpire imap_unordered; joblib's batch_size='auto')
  mpbatch <call> <routing>  Batcher(do, routing=..., size=SIZE): add_many with
                          "least-loaded", "key", "affinity" (default spill_after); add
                          with "affinity" and "least-loaded"; --spill-after adds
                          add_many "affinity" rows with other bounds
W2 and W3 of workloads.py, the same items and do(), go through the mpbatch rows too (serial
for the ideal), so that "affinity is no worse than least-loaded there" is measured here.
Scores: items/s (median), affinity add_many's speed over each row's, efficiency
(serial wall / 2 / wall; on the keyed stream above 1 is possible: two workers hold twice
the warm keys of one process), warm-ups per run, key moves (affinity), peak PSS of the tree.
"""

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from bisect import bisect_right
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor
from itertools import accumulate
from pathlib import Path

import psutil
import workloads
from run import TreeSampler, _cpu_now, busy, communicate_sampled, foreign_cpu, wait_until_idle

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
TAG = "RESULT "
MB = 2**20
WORKERS = 2
ITEM_US = 100.0  # CPU work per item
WARM_MS = 5.0  # CPU work to warm a key up
HOT = 6  # hot keys, Zipf-weighted (exponent HOT_ZIPF) among themselves
HOT_ZIPF = 2.0
TAIL_KEYS = 400  # rare keys, Zipf-weighted (exponent 1) among themselves
TAIL_SHARE = 0.005  # of the items
SEED = 19
LRU = int(os.environ.get("KEYED_LRU", "4"))  # keys a process keeps warm
SIZE = int(os.environ.get("KEYED_SIZE", "100"))  # mpbatch size= on the keyed stream
W_SIZES = {"add_many": 50, "add": 200}  # mpbatch size= on W2/W3 (run.py's sweep's choices)
INTERVAL = 0.05  # mpbatch interval= (contenders.py's)


# -- the stream ---------------------------------------------------------------------------------

def _keys() -> tuple[list[str], list[float]]:
    """Key names and their cumulative probabilities."""
    hot = [r ** -HOT_ZIPF for r in range(1, HOT + 1)]
    tail = [1 / r for r in range(1, TAIL_KEYS + 1)]
    weights = ([(1 - TAIL_SHARE) * w / sum(hot) for w in hot]
               + [TAIL_SHARE * w / sum(tail) for w in tail])
    names = [f"hot{r}" for r in range(HOT)] + [f"tail{r}" for r in range(TAIL_KEYS)]
    return names, list(accumulate(weights))


NAMES, CUMULATIVE = _keys()


def key_of(i: int) -> str:
    """Item i's key: a splitmix64 hash of i (and SEED) as a uniform draw, stateless."""
    z = (i + SEED * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    u = (z ^ (z >> 31)) / 2.0**64
    return NAMES[min(bisect_right(CUMULATIVE, u), len(NAMES) - 1)]


def keyed_items(n: int, rounds: int, warm_rounds: int):
    for i in range(n):
        yield key_of(i), (i, rounds, warm_rounds)


# -- the work, in the workers ---------------------------------------------------------------------

_WARM: OrderedDict = OrderedDict()  # this process's warm keys, least recent first


def _state(key: str, warm_rounds: int) -> tuple[bytes, int]:
    """The key's warm state, and 1 if it had to be warmed up (0 if it was warm)."""
    state = _WARM.pop(key, None)
    warmed = state is None
    if warmed:
        state = key.encode()
        for _ in range(warm_rounds):
            state = hashlib.sha256(state).digest()
    _WARM[key] = state  # now the most recent
    if len(_WARM) > LRU:
        _WARM.popitem(last=False)
    return state, int(warmed)


def _work(state: bytes, i: int, rounds: int) -> int:
    h = state + i.to_bytes(8, "little")
    for _ in range(rounds):
        h = hashlib.sha256(h).digest()
    return 2 * i + (h[0] >> 8)


def touch(pair: tuple) -> int:
    """The per-item function (serial loop and peers): one item, its key warmed if need be."""
    key, (i, rounds, warm_rounds) = pair
    state, warmed = _state(key, warm_rounds)
    return 2 * _work(state, i, rounds) + warmed


def do_keyed(batch: dict) -> dict:
    """mpbatch's do(): each key warmed once per batch at most; its first item says so."""
    out = {}
    for key, values in batch.items():
        state, warmed = _state(key, values[0][2])
        out[key] = [2 * _work(state, i, rounds) for i, rounds, _ in values]
        out[key][0] += warmed
    return out


# -- the child: one measured run ------------------------------------------------------------------

class Tally:
    """Count, checksum and warm-ups of the per-item results that reached the caller."""

    def __init__(self, keyed: bool) -> None:
        self.keyed = keyed
        self.count = self.total = self.warm = 0

    def add(self, result: int) -> None:
        self.count += 1
        if self.keyed:
            self.total += result >> 1
            self.warm += result & 1
        else:
            self.total += result

    def on_result(self, key: object, values: list, results: list | None) -> None:
        del key, values
        for result in results or ():
            self.add(result)


def child(spec: dict) -> dict:
    import keyed  # by its module name: the peers' workers pickle and find its functions

    return keyed.run_one(spec)


def run_one(spec: dict) -> dict:
    name, n = spec["name"], spec["n"]
    keyed = spec["workload"] == "keyed"
    if keyed:
        pairs = keyed_items(n, spec["rounds"], spec["warm_rounds"])
        fn, do = touch, do_keyed
    else:
        make = workloads.cpu_items if spec["workload"] == "W2" else workloads.skew_items
        pairs = make(n, spec["rounds"])
        fn, do = (lambda pair: workloads.spin(pair[1])), workloads.do_spin
    tally, extra = Tally(keyed), {}
    _preload(spec["who"])
    started = time.perf_counter()
    if spec["who"] == "mpbatch":
        extra = run_mpbatch(spec, do, pairs, tally)
    else:
        for result in run_peer(spec, fn, pairs):
            tally.add(result)
    wall = time.perf_counter() - started
    return {"name": name, "wall_s": wall, "count": tally.count, "total": tally.total,
            "warmups": tally.warm if keyed else None, **extra}


def _preload(who: str) -> None:
    """Import the contender's library before the clock starts (a program imports it once)."""
    modules = {"pool": ("multiprocessing.pool",), "ppe": ("concurrent.futures.process",),
               "mpire": ("mpire",), "joblib": ("joblib", "joblib.externals.loky"),
               "mpbatch": ("mpbatch", "mpbatch.batcher")}
    for module in modules.get(who, ()):
        __import__(module)


def run_peer(spec: dict, fn, pairs):
    who, chunk = spec["who"], spec.get("chunk")
    if who == "serial":
        yield from map(fn, pairs)
    elif who == "pool":
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(WORKERS) as pool:
            if spec["how"] == "map":
                yield from pool.map(fn, pairs)  # default chunksize: len / (4 * workers)
            else:
                yield from pool.imap_unordered(fn, pairs, chunksize=chunk)
    elif who == "ppe":
        with ProcessPoolExecutor(WORKERS) as ex:
            yield from ex.map(fn, pairs, chunksize=chunk)
    elif who == "mpire":
        from mpire import WorkerPool

        # mpire unpacks a tuple into arguments: each pair goes in a 1-tuple (its docs' advice)
        with WorkerPool(n_jobs=WORKERS, start_method="fork") as pool:
            yield from pool.imap_unordered(fn, ((p,) for p in pairs), iterable_len=spec["n"],
                                           chunk_size=chunk)
    elif who == "joblib":
        from contenders import _joblib_return_as, _stop_loky
        from joblib import Parallel, delayed

        run = Parallel(n_jobs=WORKERS, batch_size="auto", return_as=_joblib_return_as())
        yield from run(delayed(fn)(p) for p in pairs)
        _stop_loky()  # its reusable workers would otherwise outlive the run
    else:
        raise ValueError(f"unknown contender {who!r}")


def run_mpbatch(spec: dict, do, pairs, tally: Tally) -> dict:
    import mpbatch

    extra = {} if spec.get("spill_after") is None else {"spill_after": spec["spill_after"]}
    with mpbatch.Batcher(do, size=spec["size"], interval=INTERVAL, workers=WORKERS,
                         routing=spec["routing"], on_result=tally.on_result, **extra) as b:
        if spec["how"] == "add_many":
            b.add_many(pairs)
        else:
            for key, value in pairs:
                b.add(key, value, block=True)
    # Diagnostics from private state (not API): how often a key left its worker.
    affinity = getattr(getattr(getattr(b, "_engine", None), "router", None), "affinity", None)
    stats = b.stats()
    return {"moves": getattr(affinity, "moves", None), "batches": stats.batches,
            "start_method": getattr(b._pool, "start_method", None)}


# -- the parent: contenders, runs, interleaved ----------------------------------------------------

def contenders(args: argparse.Namespace) -> dict[str, dict]:
    """name -> spec (without n and workload) of every row of the keyed stream."""
    rows: dict[str, dict] = {"serial": {"who": "serial"}}
    for c in args.pool_chunks:
        rows[f"pool imap c={c}"] = {"who": "pool", "how": "imap", "chunk": c}
    rows["pool map"] = {"who": "pool", "how": "map"}
    for c in args.ppe_chunks:
        rows[f"ppe map c={c}"] = {"who": "ppe", "how": "map", "chunk": c}
    if _installed("mpire"):
        rows[f"mpire c={args.mpire_chunk}"] = {"who": "mpire", "chunk": args.mpire_chunk}
    if _installed("joblib"):
        rows["joblib"] = {"who": "joblib"}
    rows |= mpbatch_rows(args, SIZE, SIZE)
    for bound in args.spill_after:
        rows[f"mpbatch add_many affinity spill_after={bound:g}"] = {
            "who": "mpbatch", "how": "add_many", "routing": "affinity", "size": SIZE,
            "spill_after": bound}
    return rows


def mpbatch_rows(args: argparse.Namespace, size_many: int, size_add: int) -> dict[str, dict]:
    rows = {}
    for how, routing in (("add_many", "least-loaded"), ("add_many", "key"),
                         ("add_many", "affinity"), ("add", "least-loaded"),
                         ("add", "affinity")):
        rows[f"mpbatch {how} {routing}"] = {"who": "mpbatch", "how": how, "routing": routing,
                                            "size": size_many if how == "add_many" else size_add}
    return rows


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def plan(args: argparse.Namespace) -> dict[str, dict[str, dict]]:
    """workload -> {row name: full spec}."""
    out = {}
    keyed = contenders(args)
    out["keyed"] = {name: spec | {"workload": "keyed", "n": args.n} for name, spec in
                    keyed.items() if _wanted(args, name)}
    for w, n in (("W2", args.w2), ("W3", args.w3)):
        if not n:
            continue
        rows = {"serial": {"who": "serial"},
                **mpbatch_rows(args, W_SIZES["add_many"], W_SIZES["add"])}
        out[w] = {name: spec | {"workload": w, "n": n} for name, spec in rows.items()
                  if _wanted(args, name)}
    return {w: rows for w, rows in out.items() if rows}


def _wanted(args: argparse.Namespace, name: str) -> bool:
    return not args.only or any(part in name for part in args.only)


def measure(spec: dict, args: argparse.Namespace) -> dict:
    """One run in a fresh child process: outcome, check, warm-ups, peak PSS, foreign CPU."""
    before = _cpu_now()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)]),
                        "KEYED_LRU": str(LRU), "KEYED_SIZE": str(SIZE)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env=env)
    sampler = TreeSampler(proc.pid)
    out, err, timed_out, _ = communicate_sampled(proc, sampler, args.timeout)
    foreign, foreign_s = foreign_cpu(before, _cpu_now(), sampler.cpu_seconds())
    lines = [x for x in out.splitlines() if x.startswith(TAG)]
    rec = json.loads(lines[-1][len(TAG):]) if lines else {
        "error": f"timeout after {args.timeout} s" if timed_out else err[-1500:]}
    rec |= {"peak_pss_mb": sampler.peak / MB, "foreign_cpu": foreign,
            "foreign_cpu_s": foreign_s, "leftovers": sampler.leftovers()}
    n = spec["n"]
    rec["ok"] = ("error" not in rec and rec["count"] == n and rec["total"] == n * (n - 1)
                 and not rec["leftovers"])
    if spec["workload"] == "keyed" and rec["ok"]:
        # Every process that met a key warmed it at least once: a floor no run can go under.
        rec["ok"] = rec["warmups"] >= distinct_keys(n)
    if "error" not in rec and not rec["ok"]:
        rec["error"] = (f"check failed: {rec.get('count')} results summing to "
                        f"{rec.get('total')} ({n} summing to {n * (n - 1)} expected), "
                        f"{rec.get('warmups')} warm-ups, leftovers {rec['leftovers']}")
    return rec


def distinct_keys(n: int) -> int:
    return len({key_of(i) for i in range(n)})


def measure_quietly(spec: dict, args: argparse.Namespace) -> dict:
    """measure(), again (up to --retry-busy times) when other work shared the machine; the
    discarded attempts stay in the record (run.py's measure_quietly)."""
    discarded = []
    while True:
        rec = measure(spec, args)
        if not busy(rec) or len(discarded) >= args.retry_busy:
            return rec | {"discarded_busy": discarded}
        discarded.append({k: rec.get(k) for k in ("wall_s", "foreign_cpu", "ok")})
        wait_until_idle(args.idle_wait)


def fmt_run(rec: dict, n: int) -> str:
    if "wall_s" not in rec:
        return f"FAILED {rec.get('error')}"
    text = f"{rec['wall_s']:6.2f} s {n / rec['wall_s']:>8,.0f} items/s"
    if rec.get("warmups") is not None:
        text += f" {rec['warmups']:>6,} warm-ups"
    if rec.get("moves") is not None:
        text += f" {rec['moves']:>5,} moves"
    text += f" {rec['peak_pss_mb']:6.1f} MB"
    if busy(rec):
        text += f"  BUSY {rec['foreign_cpu']:.0%}"
    return text + ("  ok" if rec["ok"] else f"  FAILED {rec.get('error')}")


# -- scoring --------------------------------------------------------------------------------------

AFFINITY = "mpbatch add_many affinity"


def summarize(workload: str, runs: dict[str, list[dict]]) -> dict:
    rows = {}
    for name, recs in runs.items():
        ok = [r for r in recs if r["ok"]]
        if not ok or len(ok) < len(recs):
            rows[name] = {"failed": len(recs) - len(ok), "error": next(
                (r.get("error") for r in recs if not r["ok"]), None)}
            continue
        n = ok[0]["n"]
        wall = statistics.median(r["wall_s"] for r in ok)
        row = {"wall_s": wall, "walls": [r["wall_s"] for r in ok], "items_per_s": n / wall,
               "peak_pss_mb": max(r["peak_pss_mb"] for r in ok),
               "runs_busy": sum(busy(r) for r in ok)}
        if ok[0].get("warmups") is not None:
            row["warmups"] = statistics.median(r["warmups"] for r in ok)
            row["warmups_all"] = [r["warmups"] for r in ok]
        if ok[0].get("moves") is not None:
            row["moves"] = statistics.median(r["moves"] for r in ok)
        rows[name] = row
    serial = rows.get("serial", {}).get("wall_s")
    ref = rows.get(AFFINITY, {}).get("wall_s")
    for row in rows.values():
        if "wall_s" in row:
            if serial:
                row["efficiency"] = serial / WORKERS / row["wall_s"]
                row["wall_over_ideal"] = row["wall_s"] / (serial / WORKERS)
            if ref:
                row["affinity_speedup"] = row["wall_s"] / ref  # > 1: affinity is faster
    return {"rows": rows, "ratios": ratios(workload, rows)}


def ratios(workload: str, rows: dict) -> dict:
    def rate(name: str) -> float:
        return rows.get(name, {}).get("items_per_s", 0.0)

    out = {}
    aff = rate(AFFINITY)
    if workload == "keyed":
        others = {"least-loaded": rate("mpbatch add_many least-loaded"),
                  "key": rate("mpbatch add_many key")}
        best_other = max(others, key=others.get)
        peers = {n: r["items_per_s"] for n, r in rows.items()
                 if "items_per_s" in r and not n.startswith(("mpbatch", "serial"))}
        if others[best_other] and aff:
            out[f"affinity / best of least-loaded and key ({best_other})"] = (
                aff / others[best_other])
        if peers and aff:
            best_peer = max(peers, key=peers.get)
            out[f"affinity / best peer ({best_peer})"] = aff / peers[best_peer]
        if rate("mpbatch add affinity") and rate("mpbatch add least-loaded"):
            out["add: affinity / least-loaded"] = (rate("mpbatch add affinity")
                                                   / rate("mpbatch add least-loaded"))
    else:
        for how in ("add_many", "add"):
            ll = rate(f"mpbatch {how} least-loaded")
            mine = rate(f"mpbatch {how} affinity")
            if ll and mine:
                out[f"{how}: affinity / least-loaded"] = mine / ll
    return out


def table(workload: str, n: int, summary: dict) -> str:
    score = {"keyed": "efficiency", "W2": "efficiency", "W3": "wall/ideal"}[workload]
    head = ["contender", "wall s", "items/s", "x affinity (its wall / affinity's)", score]
    if workload == "keyed":
        head += ["warm-ups", "moves"]
    lines = [f"{workload} ({n:,} items)", "", "| " + " | ".join(head + ["peak MB"]) + " |",
             "|" + "---|" * (len(head) + 1)]
    for name, row in summary["rows"].items():
        if "wall_s" not in row:
            cells = [name, f"failed: {row['error']}"] + [""] * (len(head) - 1)
            lines.append("| " + " | ".join(cells) + " |")
            continue
        fig = row.get("efficiency") if score == "efficiency" else row.get("wall_over_ideal")
        cells = [name, f"{row['wall_s']:.2f}", f"{row['items_per_s']:,.0f}",
                 _fmt(row.get("affinity_speedup")), _fmt(fig)]
        if workload == "keyed":
            cells += [f"{row['warmups']:,.0f}", "" if row.get("moves") is None
                      else f"{row['moves']:,.0f}"]
        lines.append("| " + " | ".join(cells + [f"{row['peak_pss_mb']:.1f}"]) + " |")
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in summary["ratios"].items()]
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}"


# -- command line ---------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child")
    parser.add_argument("--smoke", action="store_true", help="tiny streams, 1 repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n", type=int, default=30_000, help="items of the keyed stream")
    parser.add_argument("--w2", type=int, default=20_000, help="W2 items (0: skip W2)")
    parser.add_argument("--w3", type=int, default=20_000, help="W3 items (0: skip W3)")
    parser.add_argument("--pool-chunks", default="1,10,100")
    parser.add_argument("--ppe-chunks", default="10,100")
    parser.add_argument("--mpire-chunk", type=int, default=10)
    parser.add_argument("--spill-after", default="", help="extra affinity rows, e.g. 0.2,1")
    parser.add_argument("--only", type=lambda s: s.split(","),
                        help="rows whose name contains one of these, e.g. mpbatch,serial")
    parser.add_argument("--rounds", type=int, help="sha256 rounds per ~100 us (no calibration)")
    parser.add_argument("--retry-busy", type=int, default=2, metavar="N")
    parser.add_argument("--idle-wait", type=float, default=60, metavar="S")
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()
    args.pool_chunks = [int(c) for c in args.pool_chunks.split(",") if c]
    args.ppe_chunks = [int(c) for c in args.ppe_chunks.split(",") if c]
    args.spill_after = [float(s) for s in args.spill_after.split(",") if s]
    if args.smoke:
        args.repeats, args.n, args.w2, args.w3 = 1, 1500, 400, 1000
        args.pool_chunks, args.ppe_chunks, args.retry_busy, args.timeout = [10], [10], 0, 60
    return args


def main() -> None:
    args = parse_args()
    if args.child:
        print(TAG + json.dumps(child(json.loads(args.child))), flush=True)
        return
    started = time.monotonic()
    rounds = args.rounds or workloads.calibrate(ITEM_US * 1e-6)
    warm_rounds = round(rounds * WARM_MS * 1e3 / ITEM_US)
    print(f"{rounds} sha256 rounds per item (~{ITEM_US:.0f} us), {warm_rounds} per warm-up "
          f"(~{WARM_MS:g} ms); {HOT} hot keys, {TAIL_KEYS} tail keys ({TAIL_SHARE:.1%} of "
          f"items), LRU of {LRU} keys per process, mpbatch size={SIZE}", flush=True)
    todo = plan(args)
    results = {}
    for workload, rows in todo.items():
        n = next(iter(rows.values()))["n"]
        print(f"== {workload}: {n:,} items; {len(rows)} contenders", flush=True)
        runs: dict[str, list[dict]] = {name: [] for name in rows}
        for repeat in range(args.repeats):  # interleaved: a slow phase hits every contender
            for name, spec in rows.items():
                spec = spec | {"name": name, "rounds": rounds, "warm_rounds": warm_rounds}
                rec = measure_quietly(spec, args) | {"n": n, "repeat": repeat}
                runs[name].append(rec)
                print(f"  [{repeat + 1}/{args.repeats}] {workload} {name:44s} "
                      f"{fmt_run(rec, n)}", flush=True)
        summary = summarize(workload, runs)
        results[workload] = {"n": n, "runs": runs, **summary,
                             "table_md": table(workload, n, summary)}
        print("\n" + results[workload]["table_md"] + "\n", flush=True)
    write(args, results, rounds, warm_rounds, time.monotonic() - started)


def write(args: argparse.Namespace, results: dict, rounds: int, warm_rounds: int,
          took: float) -> None:
    stamp = datetime.date.today().isoformat() + ("-smoke" if args.smoke else "")
    git = ["git", "-C", str(ROOT)]
    env = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
           "commit": subprocess.run([*git, "rev-parse", "--short", "HEAD"],
                                    capture_output=True, text=True).stdout.strip(),
           "mpbatch_dirty": bool(subprocess.run(
               [*git, "status", "--porcelain", "--", "mpbatch"], capture_output=True,
               text=True).stdout.strip()),
           "python": platform.python_version(), "platform": platform.platform(),
           "cpus": psutil.cpu_count(), "workers": WORKERS, "rounds_per_item": rounds,
           "warm_rounds": warm_rounds, "item_us": ITEM_US, "warm_ms": WARM_MS, "hot": HOT,
           "hot_zipf": HOT_ZIPF, "tail_keys": TAIL_KEYS, "tail_share": TAIL_SHARE,
           "lru": LRU, "size": SIZE, "seconds": round(took),
           "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{stamp}-keyed.json"
    with contextlib.suppress(Exception):
        env["versions"] = {m: __import__("importlib.metadata").metadata.version(m)
                           for m in ("joblib", "mpire", "psutil", "cloudpickle")}
    path.write_text(json.dumps({"environment": env, "results": results}, indent=1,
                               default=repr))
    print(f"wrote {path} ({took:.0f} s)")


if __name__ == "__main__":
    main()
