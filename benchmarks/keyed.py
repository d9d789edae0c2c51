"""The keyed-state workload: per-key state that is costly to warm, kept warm for a few keys.

    python benchmarks/keyed.py                 # 2 workers, medians of 3, interleaved (~5 min)
    python benchmarks/keyed.py --smoke         # tiny, 1 repeat

The stream. Item i is (key, (i, rounds, warm_rounds)); its key is drawn by a hash of i from
a fixed skewed distribution, so every run and contender gets the same stream: five hot keys
(HOT_NAMES) carry all but TAIL_SHARE of the items, Zipf-weighted among themselves (the
hottest alone 68 %: no worker can run it alone in time), and TAIL_KEYS rare keys share the
rest, Zipf-weighted too.

The work. A process that meets a key it does not hold warm warms it up: WARM_MS of sha256
rounds (a model loaded, a connection opened). It holds the LRU most recent keys warm, in
module-level state (an OrderedDict of at most LRU keys, the per-key cache of the README's
"Choices worth knowing"; module-level so that the peers' per-item function shares it).
LRU = 5, as many as the hot keys: a process that meets every key (least-loaded, every peer,
the serial loop) holds all the hot keys only until a tail key comes through and evicts one,
which it warms again; a process that holds a share of the keys has room to spare. Then each
item costs ITEM_US of sha256 rounds chained from its key's warm state. Both costs are
calibrated once, here, and travel with the items.

The check. Each per-item result is 2 * (2*i + 0) + warmed: the 0 is a byte of the last
digest shifted out (the work cannot be skipped) and `warmed` is 1 when this item's call
warmed its key. The caller checks the count and sum(result >> 1) == n(n-1), and counts
warm-ups as sum(result & 1): exact, whatever the timing. mpbatch's do() gets {key: [values]}
and warms a key at most once per batch (the key's first item carries the flag); the peers
call the per-item function, which looks its key up on every item.

Contenders, each a fresh process tree timed with start-up and shutdown, interleaved and
the order turned by one each repeat (A B C, B C A, C A B ...):
  serial                    the per-item function in a loop (one process, one LRU)
  pool imap c=C             multiprocessing.Pool.imap_unordered, chunksize C swept
  pool map                  Pool.map with its default chunksize (n / 8: static slices)
  ppe map c=C               ProcessPoolExecutor.map, chunksize C swept
  mpire c=C, joblib         when installed: mpire imap_unordered, joblib batch_size='auto'
  mpbatch <call> <routing>  Batcher(do, size=100, routing=...): add_many with
                            "least-loaded", "key", "affinity"; add with "least-loaded"
                            and "affinity"; add_many "affinity" with each --spill-after
W2 and W3 (workloads.py: their items, spin and do_spin) go through the mpbatch rows and the
serial loop too, so that "affinity is no worse than least-loaded there" is measured here.
Scores: items/s (median), each row's wall over affinity add_many's, efficiency (serial wall
/ 2 / wall; on the keyed stream it can pass 1: two workers hold twice the warm keys of one
process) or W3's wall/ideal, warm-ups per run, key moves (affinity; read from the Batcher's
private state), peak PSS of the process tree.
"""

import argparse
import compileall
import datetime
import functools
import hashlib
import importlib.metadata
import importlib.util
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
from run import (
    HERE,
    MB,
    RESULT_TAG,
    RESULTS,
    ROOT,
    TreeSampler,
    _cpu_now,
    busy,
    communicate_sampled,
    foreign_cpu,
    mpbatch_digest,
    rotated,
    wait_until_idle,
)

WORKERS = 2
ITEM_US = 100.0  # CPU work per item
WARM_MS = 5.0  # CPU work to warm a key up
# The hot keys, hottest first. Named so that routing="key" (mpbatch.dispatch.key_hash(key)
# % 2) gives the hottest a worker of its own and the other four the other worker: the best
# split any static partition can make of these weights. (key_hash spreads crc32 since
# 67189bb; before, names that differ only in a last digit 0-3 shared crc32 % 2.)
HOT_NAMES = ("alpha", "bravo", "charlie", "golf", "hotel")
HOT_ZIPF = 2.0  # weights 1/r**2: 68.3 %, 17.1 %, 7.6 %, 4.3 %, 2.7 % of the hot items
TAIL_KEYS = 400
TAIL_SHARE = 0.005  # of the items (153 of the first 30,000, over 75 distinct tail keys)
SEED = 19
LRU = 5  # keys a process keeps warm
SIZE = 100  # mpbatch size= on the keyed stream (Batcher's default)
W_SIZES = {"add_many": 50, "add": 200}  # mpbatch size= on W2/W3: run.py's latest sweep
INTERVAL = 0.05  # mpbatch interval= (contenders.py's)
AFFINITY = "mpbatch add_many affinity"  # the row every other is compared with


# -- the stream -------------------------------------------------------------------------------

def _keys() -> tuple[list[str], list[float]]:
    """Key names and their cumulative probabilities."""
    hot = [r ** -HOT_ZIPF for r in range(1, len(HOT_NAMES) + 1)]
    tail = [1 / r for r in range(1, TAIL_KEYS + 1)]
    weights = ([(1 - TAIL_SHARE) * w / sum(hot) for w in hot]
               + [TAIL_SHARE * w / sum(tail) for w in tail])
    return [*HOT_NAMES, *(f"tail{r}" for r in range(TAIL_KEYS))], list(accumulate(weights))


NAMES, CUMULATIVE = _keys()


def key_of(i: int) -> str:
    """Item i's key: splitmix64 of i (and SEED) as a uniform draw; stateless."""
    z = (i + SEED * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    u = (z ^ (z >> 31)) / 2.0**64
    return NAMES[min(bisect_right(CUMULATIVE, u), len(NAMES) - 1)]


def keyed_items(n: int, rounds: int, warm_rounds: int):
    for i in range(n):
        yield key_of(i), (i, rounds, warm_rounds)


@functools.cache
def distinct_keys(n: int) -> int:
    """Keys in the first n items: each is warmed at least once in any run."""
    return len({key_of(i) for i in range(n)})


# -- the work (worker processes, and the serial loop) ----------------------------------------

_WARM: OrderedDict = OrderedDict()  # this process's warm keys, least recent first


def _state(key: str, warm_rounds: int) -> tuple[bytes, int]:
    """The key's warm state, and 1 if it had to be warmed up now (else 0)."""
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
    """The per-item function (serial loop and peers)."""
    key, (i, rounds, warm_rounds) = pair
    state, warmed = _state(key, warm_rounds)
    return 2 * _work(state, i, rounds) + warmed


def do_keyed(batch: dict) -> dict:
    """mpbatch's do(): keys in the batch's order, each warmed once at most."""
    out = {}
    for key, values in batch.items():
        state, warmed = _state(key, values[0][2])
        out[key] = [2 * _work(state, i, rounds) for i, rounds, _ in values]
        out[key][0] += warmed
    return out


def spin_pair(pair: tuple) -> int:
    """W2/W3's per-item function for the serial loop."""
    return workloads.spin(pair[1])


# -- the child: one measured run --------------------------------------------------------------

class Tally:
    """Count, checksum and warm-ups of the per-item results that reached the caller."""

    def __init__(self, keyed: bool) -> None:
        self.keyed = keyed
        self.count = self.total = self.warm = 0
        self.by_key: dict[str, int] = {}  # mpbatch: warm-ups per hot key, "tail" the rest

    def add(self, result: int) -> None:
        self.count += 1
        if self.keyed:
            self.total += result >> 1
            self.warm += result & 1
        else:
            self.total += result

    def on_result(self, key: str, values: list, results: list | None) -> None:
        """mpbatch on_result (collector thread). A None `results` leaves the count short."""
        del values
        warm = self.warm
        for result in results or ():
            self.add(result)
        if self.warm > warm:
            name = key if key in HOT_NAMES else "tail"
            self.by_key[name] = self.by_key.get(name, 0) + self.warm - warm


def child(spec: dict) -> dict:
    import keyed  # this file by its module name: workers find its functions by reference

    return keyed.run_one(spec)


def run_one(spec: dict) -> dict:
    n, keyed = spec["n"], spec["workload"] == "keyed"
    if keyed:
        pairs, fn, do = keyed_items(n, spec["rounds"], spec["warm_rounds"]), touch, do_keyed
    else:
        make = workloads.cpu_items if spec["workload"] == "W2" else workloads.skew_items
        pairs, fn, do = make(n, spec["rounds"]), spin_pair, workloads.do_spin
    tally, extra = Tally(keyed), {}
    _preload(spec["who"])  # a program imports its library once: not timed
    started = time.perf_counter()
    if spec["who"] == "mpbatch":
        extra = run_mpbatch(spec, do, pairs, tally)
    else:
        for result in run_peer(spec, fn, pairs):
            tally.add(result)
    wall = time.perf_counter() - started
    if tally.by_key:
        extra["warmups_by_key"] = tally.by_key
    return {"wall_s": wall, "count": tally.count, "total": tally.total,
            "warmups": tally.warm if keyed else None, **extra}


def _preload(who: str) -> None:
    modules = {"pool": ("multiprocessing.pool",), "ppe": ("concurrent.futures.process",),
               "mpire": ("mpire",), "joblib": ("joblib", "joblib.externals.loky"),
               "mpbatch": ("mpbatch", "mpbatch.batcher")}
    for module in modules.get(who, ()):
        importlib.import_module(module)


def run_peer(spec: dict, fn, pairs):
    """The results of the serial loop or of one peer, in the order they arrive."""
    who, chunk = spec["who"], spec.get("chunk")
    if who == "serial":
        yield from map(fn, pairs)
    elif who == "pool":
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(WORKERS) as pool:
            if spec["how"] == "map":
                yield from pool.map(fn, pairs)  # chunksize: len / (4 * workers)
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
        _stop_loky()  # its reusable workers would outlive the run, and serve the next warm
    else:
        raise ValueError(f"unknown contender {who!r}")


def run_mpbatch(spec: dict, do, pairs, tally: Tally) -> dict:
    import mpbatch

    with mpbatch.Batcher(do, size=spec["size"], interval=INTERVAL, workers=WORKERS,
                         routing=spec["routing"], on_result=tally.on_result,
                         **spec.get("options", {})) as b:
        if spec["how"] == "add_many":
            b.add_many(pairs)
        else:
            for key, value in pairs:
                b.add(key, value, block=True)
    # Diagnostics from the Batcher's private state (no API has them): how often a key left
    # its worker under "affinity", and where each hot key lived at the end.
    affinity = getattr(getattr(getattr(b, "_engine", None), "router", None), "affinity", None)
    homes = getattr(affinity, "homes", {})
    return {"moves": getattr(affinity, "moves", None), "batches": b.stats().batches,
            "homes": {k: homes[k] for k in HOT_NAMES if k in homes},
            "start_method": getattr(b._pool, "start_method", None),
            "mpbatch_file": mpbatch.__file__}


# -- the parent: rows, runs, interleaved ------------------------------------------------------

def keyed_rows(args: argparse.Namespace) -> dict[str, dict]:
    rows: dict[str, dict] = {"serial": {"who": "serial"}}
    for c in args.pool_chunks:
        rows[f"pool imap c={c}"] = {"who": "pool", "how": "imap", "chunk": c}
    rows["pool map"] = {"who": "pool", "how": "map"}
    for c in args.ppe_chunks:
        rows[f"ppe map c={c}"] = {"who": "ppe", "how": "map", "chunk": c}
    if importlib.util.find_spec("mpire"):
        rows[f"mpire c={args.mpire_chunk}"] = {"who": "mpire", "chunk": args.mpire_chunk}
    if importlib.util.find_spec("joblib"):
        rows["joblib"] = {"who": "joblib"}
    rows |= mpbatch_rows(args.size, args.size)
    for bound in args.spill_after:
        rows[f"{AFFINITY} spill_after={bound:g}"] = {
            "who": "mpbatch", "how": "add_many", "routing": "affinity", "size": args.size,
            "options": {"spill_after": bound}}
    return rows


def mpbatch_rows(size_many: int, size_add: int) -> dict[str, dict]:
    calls = (("add_many", "least-loaded"), ("add_many", "key"), ("add_many", "affinity"),
             ("add", "least-loaded"), ("add", "affinity"))
    return {f"mpbatch {how} {routing}": {"who": "mpbatch", "how": how, "routing": routing,
                                         "size": size_many if how == "add_many" else size_add}
            for how, routing in calls}


def plan(args: argparse.Namespace) -> dict[str, dict[str, dict]]:
    """workload -> {row name: spec}, rows left out by --only dropped."""
    table = {"keyed": (args.n, keyed_rows(args))}
    for w, n in (("W2", args.w2), ("W3", args.w3)):
        table[w] = (n, {"serial": {"who": "serial"},
                        **mpbatch_rows(W_SIZES["add_many"], W_SIZES["add"])})
    out = {}
    for w, (n, rows) in table.items():
        wanted = {name: spec | {"workload": w, "n": n} for name, spec in rows.items()
                  if not args.only or any(part in name for part in args.only)}
        if n and wanted:
            out[w] = wanted
    return out


def measure(spec: dict, args: argparse.Namespace) -> dict:
    """One run in a fresh child process: its outcome checked, peak PSS, foreign CPU."""
    before = _cpu_now()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    # mpbatch from --mpbatch DIR (default: this checkout), in the child and its workers alike
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(args.mpbatch), str(HERE)])}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=args.mpbatch, env=env)
    sampler = TreeSampler(proc.pid)
    out, err, timed_out, _ = communicate_sampled(proc, sampler, args.timeout)
    foreign, foreign_s = foreign_cpu(before, _cpu_now(), sampler.cpu_seconds())
    lines = [x for x in out.splitlines() if x.startswith(RESULT_TAG)]
    rec = json.loads(lines[-1][len(RESULT_TAG):]) if lines else {
        "error": f"timeout after {args.timeout} s" if timed_out else err[-1500:]}
    rec |= {"peak_pss_mb": sampler.peak / MB, "foreign_cpu": foreign,
            "foreign_cpu_s": foreign_s, "leftovers": sampler.leftovers()}
    n = spec["n"]
    rec["ok"] = ("error" not in rec and rec["count"] == n and rec["total"] == n * (n - 1)
                 and not rec["leftovers"]
                 and (spec["workload"] != "keyed" or rec["warmups"] >= distinct_keys(n)))
    if "error" not in rec and not rec["ok"]:
        rec["error"] = (f"check failed: {rec['count']} results summing to {rec['total']} "
                        f"({n} summing to {n * (n - 1)} expected), {rec['warmups']} warm-ups "
                        f"(at least {distinct_keys(n)}), leftovers {rec['leftovers']}")
    return rec


def measure_quietly(spec: dict, args: argparse.Namespace) -> dict:
    """measure(), again (up to --retry-busy times) when other work shared the CPUs; the
    discarded attempts stay in the record (as in run.py)."""
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
    text = f"{rec['wall_s']:6.2f} s {n / rec['wall_s']:>7,.0f} items/s"
    if rec.get("warmups") is not None:
        text += f" {rec['warmups']:>5,} warm-ups"
    if rec.get("moves") is not None:
        text += f" {rec['moves']:>4,} moves"
    text += f" {rec['peak_pss_mb']:6.1f} MB"
    if busy(rec):
        text += f"  BUSY: {rec['foreign_cpu']:.0%} of the CPUs ran other work"
    return text + ("  ok" if rec["ok"] else f"  FAILED {rec.get('error')}")


# -- scoring ----------------------------------------------------------------------------------

def summarize(workload: str, runs: dict[str, list[dict]]) -> dict:
    """Medians per row, then ratios within this run."""
    rows = {}
    for name, recs in runs.items():
        if not all(r["ok"] for r in recs):
            rows[name] = {"error": next(r.get("error") for r in recs if not r["ok"])}
            continue
        wall = statistics.median(r["wall_s"] for r in recs)
        row = {"wall_s": wall, "walls": [r["wall_s"] for r in recs],
               "items_per_s": recs[0]["n"] / wall,
               "peak_pss_mb": statistics.median(r["peak_pss_mb"] for r in recs),
               "runs_busy": sum(busy(r) for r in recs)}
        for key in ("warmups", "moves"):
            if recs[0].get(key) is not None:
                row[key] = statistics.median(r[key] for r in recs)
                row[key + "_all"] = [r[key] for r in recs]
        rows[name] = row
    serial = rows.get("serial", {}).get("wall_s")
    mine = rows.get(AFFINITY, {}).get("wall_s")
    for row in rows.values():
        if "wall_s" in row and serial:
            row["efficiency"] = serial / WORKERS / row["wall_s"]
            row["wall_over_ideal"] = 1 / row["efficiency"]
        if "wall_s" in row and mine:
            row["over_affinity"] = row["wall_s"] / mine  # > 1: affinity add_many is faster
    pairs = ratio_pairs(workload, rows)
    return {"rows": rows,
            "ratios": {label: rows[b]["wall_s"] / rows[a]["wall_s"]
                       for label, (a, b) in pairs.items()},
            "paired": {label: paired(rows[a]["walls"], rows[b]["walls"])
                       for label, (a, b) in pairs.items()}}


def ratio_pairs(workload: str, rows: dict) -> dict[str, tuple[str, str]]:
    """The ratios the targets are stated in: label -> (row a, row b), a's items/s over b's."""
    def rate(name: str) -> float:
        return rows.get(name, {}).get("items_per_s", 0.0)

    out = {}
    if workload == "keyed":
        other = max(("least-loaded", "key"), key=lambda r: rate(f"mpbatch add_many {r}"))
        peers = [n for n, r in rows.items()
                 if "items_per_s" in r and not n.startswith(("mpbatch", "serial"))]
        if rate(AFFINITY) and rate(f"mpbatch add_many {other}"):
            out[f"affinity / the better of least-loaded and key ({other})"] = (
                AFFINITY, f"mpbatch add_many {other}")
        if rate(AFFINITY) and peers:
            best = max(peers, key=rate)
            out[f"affinity / the best peer ({best})"] = (AFFINITY, best)
    for how in ("add_many", "add"):
        if rate(f"mpbatch {how} affinity") and rate(f"mpbatch {how} least-loaded"):
            out[f"{how}: affinity / least-loaded"] = (f"mpbatch {how} affinity",
                                                      f"mpbatch {how} least-loaded")
    return out


def paired(walls_a: list[float], walls_b: list[float]) -> list[float]:
    """a's items/s over b's, repeat by repeat (the two runs of a repeat are interleaved, so
    they met the same phase of the machine): [median, min, max]."""
    ratios = [b / a for a, b in zip(walls_a, walls_b, strict=True)]
    return [statistics.median(ratios), min(ratios), max(ratios)]


def table(workload: str, n: int, summary: dict) -> str:
    score = "wall/ideal" if workload == "W3" else "efficiency"
    head = ["contender", "wall s", "items/s", "÷ affinity add_many", score]
    head += ["warm-ups", "moves"] if workload == "keyed" else ["moves"]
    lines = [f"{workload} ({n:,} items), medians", "",
             "| " + " | ".join([*head, "peak MB"]) + " |", "|" + "---|" * (len(head) + 1)]
    for name, row in summary["rows"].items():
        if "wall_s" not in row:
            lines.append(f"| {name} | failed: {row['error']} |" + " |" * (len(head) - 1))
            continue
        cells = [name, f"{row['wall_s']:.2f}", f"{row['items_per_s']:,.0f}",
                 f"{row.get('over_affinity', 0):.2f}",
                 f"{row.get('wall_over_ideal' if workload == 'W3' else 'efficiency', 0):.2f}"]
        if workload == "keyed":
            cells.append(f"{row['warmups']:,.0f}")
        cells += [f"{row['moves']:,.0f}" if "moves" in row else "",
                  f"{row['peak_pss_mb']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| ratio (items/s over items/s) | of the medians | per repeat: median (range) |",
              "|---|---|---|"]
    for label, value in summary["ratios"].items():
        med, low, high = summary["paired"][label]
        lines.append(f"| {label} | {value:.2f} | {med:.2f} ({low:.2f}-{high:.2f}) |")
    return "\n".join(lines)


# -- command line -----------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    def ints(s: str) -> list[int]:
        return [int(x) for x in s.split(",") if x]

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="tiny streams, 1 repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n", type=int, default=30_000, help="items of the keyed stream")
    parser.add_argument("--w2", type=int, default=20_000, help="W2 items (0: no W2)")
    parser.add_argument("--w3", type=int, default=20_000, help="W3 items (0: no W3)")
    parser.add_argument("--size", type=int, default=SIZE, help="mpbatch size= (keyed stream)")
    parser.add_argument("--pool-chunks", type=ints, default=[10, 100, 1000])
    parser.add_argument("--ppe-chunks", type=ints, default=[10, 100, 1000])
    parser.add_argument("--mpire-chunk", type=int, default=100)
    parser.add_argument("--spill-after", type=lambda s: [float(x) for x in s.split(",") if x],
                        default=[0.2], help="extra affinity add_many rows with these bounds")
    parser.add_argument("--only", type=lambda s: s.split(","),
                        help="rows whose name contains one of these, e.g. mpbatch,serial")
    parser.add_argument("--rounds", type=int, help="sha256 rounds per item, not calibrated")
    parser.add_argument("--retry-busy", type=int, default=2, metavar="N",
                        help="measure a run again, up to N times, when other work shared "
                             "the CPUs (0 with --smoke)")
    parser.add_argument("--idle-wait", type=float, default=60, metavar="S")
    parser.add_argument("--timeout", type=float, default=300, help="s per run")
    parser.add_argument("--mpbatch", type=Path, default=ROOT, metavar="DIR",
                        help="import mpbatch from DIR/mpbatch (default: this checkout), e.g. "
                             "a snapshot of one commit while the checkout is being edited")
    args = parser.parse_args()
    if args.smoke:
        args.repeats, args.n, args.w2, args.w3 = 1, 1500, 400, 1000
        args.pool_chunks, args.ppe_chunks, args.retry_busy, args.timeout = [10], [10], 0, 60
    return args


def main() -> None:
    args = parse_args()
    if args.child:
        print(RESULT_TAG + json.dumps(child(json.loads(args.child))), flush=True)
        return
    started = time.monotonic()
    # Bytecode, as an installed package has it (run.py does the same): with
    # PYTHONDONTWRITEBYTECODE set, every run would otherwise compile mpbatch from source.
    compileall.compile_dir(str(args.mpbatch / "mpbatch"), quiet=1)
    digest = mpbatch_digest(args)
    rounds = args.rounds or workloads.calibrate(ITEM_US * 1e-6)
    warm_rounds = round(rounds * WARM_MS * 1e3 / ITEM_US)
    print(f"{rounds} sha256 rounds per item (~{ITEM_US:.0f} us), {warm_rounds} per warm-up "
          f"(~{WARM_MS:g} ms); LRU of {LRU} keys per process; mpbatch size={args.size}",
          flush=True)
    results = {}
    for workload, rows in plan(args).items():
        n = next(iter(rows.values()))["n"]
        print(f"== {workload}: {n:,} items, {len(rows)} contenders", flush=True)
        runs: dict[str, list[dict]] = {name: [] for name in rows}
        for repeat in range(args.repeats):  # interleaved: a slow phase hits every row
            for name in rotated(list(rows), repeat):
                spec = rows[name] | {"rounds": rounds, "warm_rounds": warm_rounds}
                rec = measure_quietly(spec, args) | {"n": n, "repeat": repeat}
                runs[name].append(rec)
                print(f"  [{repeat + 1}/{args.repeats}] {workload} {name:42s} "
                      f"{fmt_run(rec, n)}", flush=True)
        summary = summarize(workload, runs)
        results[workload] = {"n": n, **summary, "table_md": table(workload, n, summary),
                             "runs": runs}
        print("\n" + results[workload]["table_md"] + "\n", flush=True)
    write(args, results, rounds, warm_rounds, time.monotonic() - started, digest)
    if mpbatch_digest(args) != digest:
        print("WARNING: mpbatch's sources changed during this run; its rows mix two versions")


def write(args: argparse.Namespace, results: dict, rounds: int, warm_rounds: int,
          took: float, digest: str) -> None:
    def git(*argv: str, at: Path = ROOT) -> str:
        return subprocess.run(["git", "-C", str(at), *argv], capture_output=True,
                              text=True, check=False).stdout.strip()

    versions = {}
    for module in ("joblib", "mpire", "psutil", "cloudpickle"):
        try:
            versions[module] = importlib.metadata.version(module)
        except importlib.metadata.PackageNotFoundError:
            versions[module] = "not installed"
    env = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
           "commit": git("rev-parse", "--short", "HEAD"),
           # the checkout measured (--mpbatch): its commit, and whether its mpbatch differs
           "mpbatch_commit": git("rev-parse", "--short", "HEAD", at=args.mpbatch),
           "mpbatch_dirty": bool(git("status", "--porcelain", "--", "mpbatch",
                                     at=args.mpbatch)),
           "mpbatch_from": str(args.mpbatch), "mpbatch_digest": digest,
           "python": platform.python_version(), "platform": platform.platform(),
           "cpus": psutil.cpu_count(), "workers": WORKERS, "versions": versions,
           "rounds_per_item": rounds, "warm_rounds": warm_rounds, "item_us": ITEM_US,
           "warm_ms": WARM_MS, "hot_names": HOT_NAMES, "hot_zipf": HOT_ZIPF,
           "tail_keys": TAIL_KEYS, "tail_share": TAIL_SHARE, "lru": LRU, "size": args.size,
           "w_sizes": W_SIZES, "interval": INTERVAL, "seconds": round(took),
           "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    stamp = datetime.date.today().isoformat() + ("-smoke" if args.smoke else "")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{stamp}-keyed.json"
    path.write_text(json.dumps({"environment": env, "results": results}, indent=1,
                               default=repr))
    print(f"wrote {path} ({took:.0f} s)")


if __name__ == "__main__":
    main()
