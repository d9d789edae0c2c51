"""Benchmark workloads: deterministic items, per-item functions and mpbatch `do` functions.

Everything a worker process runs is a top-level function here, so it pickles by reference
under fork, spawn and forkserver alike. Items are regenerated from their index in every run:
no contender gets a pre-built list the others do not.

Items are `(key, value)` pairs. mpbatch receives both; the peers, which have no notion of a
key, receive the values only. W2-W4 values are `(i, rounds)` tuples: the hashing cost travels
with the item, so the same `spin` does identical work in every contender. L16K, L64K and L1M
values are `bytes` of that size, and each result is the value's crc32. DK is W1 with a key of
its own for every item.
"""

import functools
import hashlib
import random
import statistics
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

UNIT_SECONDS = 100e-6  # the cost of one "unit" of CPU work in W2-W4: ~100 us
KEYS = 100  # distinct keys in W1, W2, W4 and MEM
RUN = 50  # W3: items per same-key run
HOT_KEYS = 10  # W3: keys whose items cost HOT_COST units each
HOT_COST = 20
HOT_TAIL = 0.3  # W3: hot runs appear only in this last fraction of the stream
RATE = 1000.0  # W4: items offered per second, on a fixed schedule
NOISY_MIN_REPEATS = 11  # W1, W2, W3: measured runs at least (Workload.min_repeats)
LARGE = {"L16K": 16 << 10, "L64K": 64 << 10, "L1M": 1 << 20}  # workload -> bytes per value
LARGE_TOTAL = 2 << 30  # bytes of values in a measured run of each (L16K: 131,072 items)
LARGE_SMOKE_TOTAL = 8 << 20  # ... and in a --smoke run (L1M: 8 items)
VARIANTS = 61  # distinct large values: value i is the window of the random pool at (i % 61)
SHIFT = 4093  # * SHIFT bytes


# --- per-item work (peers call these directly; the do functions below wrap them) -------------


def double(v):
    """W1 / MEM: the cheapest possible item, so the harness measures per-item overhead."""
    return v * 2


def spin(v):
    """W2-W4: `rounds` chained sha256 digests of the item's index (v = (i, rounds, ...)).

    The result is 2*i plus a term that is always 0 (a byte shifted right by 8) yet depends on
    the last digest: the work cannot be skipped, and the sum of results is still known in
    closed form, so every run is checked without a serial reference run.
    """
    i, rounds = v[0], v[1]
    h = i.to_bytes(8, "little", signed=True)
    for _ in range(rounds):
        h = hashlib.sha256(h).digest()
    return 2 * i + (h[0] >> 8)


def digest(v):
    """L16K-L1M: a 32-bit digest of a large value, reading every byte (~3.5 GB/s here)."""
    return zlib.crc32(v)


def do_double(batch):
    """mpbatch `do` for W1 / MEM: one result per value, same order, as the spec requires."""
    return {k: [v * 2 for v in vs] for k, vs in batch.items()}


def do_spin(batch):
    """mpbatch `do` for W2-W4."""
    return {k: [spin(v) for v in vs] for k, vs in batch.items()}


def do_digest(batch):
    """mpbatch `do` for L16K-L1M."""
    return {k: [zlib.crc32(v) for v in vs] for k, vs in batch.items()}


# --- item streams -------------------------------------------------------------------------------


def overhead_items(n, rounds, keys=KEYS):
    """W1 / MEM: key f"k{i % keys}", value i. `rounds` is unused (the signature is shared).

    `keys` (100 by default) is varied only by scaling.py, to show what distinct keys cost.
    """
    del rounds
    for i in range(n):
        yield f"k{i % keys}", i


def distinct_items(n, rounds):
    """DK: key f"k{i}", value i: every key distinct, so every batch is one item per key.

    W1's values and work; only the keys differ (a name of its own also keeps the sweep from
    reusing W1's choices).
    """
    del rounds
    for i in range(n):
        yield f"k{i}", i


def cpu_items(n, rounds):
    """W2 / W4: n items over 100 keys, each one unit of hashing."""
    for i in range(n):
        yield f"k{i % KEYS}", (i, rounds)


def skew_items(n, rounds):
    """W3: same-key runs of RUN items; hot runs only in the last HOT_TAIL of the stream.

    The head is cold runs cycling over 100 keys. In the tail, runs alternate hot and cold, so
    ten hot keys (HOT_COST units per item) carry most of the work and all of it comes late:
    a scheduler that committed work to workers early cannot rebalance it.
    """
    runs = n // RUN
    head = runs - round(runs * HOT_TAIL)
    i = 0
    for r in range(runs):
        hot = r >= head and (r - head) % 2 == 0
        key = f"hot{(r - head) // 2 % HOT_KEYS}" if hot else f"k{r % KEYS}"
        cost = rounds * HOT_COST if hot else rounds
        for _ in range(RUN):
            yield key, (i, cost)
            i += 1


def skew_units(n):
    """W3: total work in units, for the ideal wall time when no serial run is available."""
    runs = n // RUN
    head = runs - round(runs * HOT_TAIL)
    hot = (runs - head + 1) // 2
    return RUN * ((runs - hot) + hot * HOT_COST)


def _random_pool(size):
    """The bytes every large value is cut from: the same in every process (a fixed seed)."""
    return random.Random(size).randbytes(size + VARIANTS * SHIFT)


def large_items(size):
    """L16K-L1M: a stream of n items over 100 keys, each value `size` bytes.

    Value i is a fresh `bytes` (one copy, as a user's own value would be) of the window at
    (i % VARIANTS) * SHIFT of a random pool made once per stream (~1 ms): the values differ,
    and making them costs a memcpy each (~30 GB/s here), not the random generator.
    """

    def items(n, rounds):
        del rounds
        pool = _random_pool(size)
        for i in range(n):
            at = i % VARIANTS * SHIFT
            yield f"k{i % KEYS}", pool[at:at + size]

    items.__name__ = f"large_items_{size}"  # the sweep caches its choices by this name
    return items


def expected(n):
    """(count, checksum) every run must deliver: each result is 2*i, so the sum is n*(n-1)."""
    return n, n * (n - 1)


@functools.cache
def _large_digests(size):
    pool = _random_pool(size)
    return [zlib.crc32(pool[v * SHIFT:v * SHIFT + size]) for v in range(VARIANTS)]


def large_expected(size):
    """(count, checksum) of L16K-L1M: the sum of every value's crc32, from the VARIANTS
    distinct values' digests (computed once, in the checking process)."""

    def check(n):
        digests = _large_digests(size)
        whole, rest = divmod(n, VARIANTS)
        return n, whole * sum(digests) + sum(digests[:rest])

    return check


# --- calibration --------------------------------------------------------------------------------


def calibrate(target=UNIT_SECONDS, duration=1.0):
    """Hash rounds that take about `target` seconds here; run once, in the parent.

    The median of short trials spread over `duration` seconds: this VM's CPU flips between
    two speeds, 2x apart, in phases of 0.3-1 s, so a burst of trials would catch one phase.
    """
    probe = 5000
    times = []
    end = time.perf_counter() + duration
    while time.perf_counter() < end:
        start = time.perf_counter()
        spin((1, probe))
        times.append(time.perf_counter() - start)
    return max(1, round(probe * target / statistics.median(times)))


# --- the workloads ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """One benchmark: its items, its work, its size and how its result is scored."""

    name: str  # "W1" .. "W4", "MEM", "MEM10M", "DK", "L16K", "L64K", "L1M"
    title: str
    n: int  # items in a measured run
    items: Callable[[int, int], Iterator[tuple[str, object]]]  # (n, rounds) -> pairs
    fn: Callable  # per-item function, for the peers and the serial loop
    do: Callable  # mpbatch do(batch)
    units_per_item: float  # mean cost in units; 0 for W1 / MEM (no hashing)
    chunks: tuple = ()  # peers' chunk sizes to sweep (chunksize=, batch_size=, chunk_size=)
    sizes: tuple = ()  # mpbatch size= values to sweep (buffer= is raised to match)
    paced: bool = False  # W4: items are offered on a schedule, latency is the score
    sweep_n: int = 0  # items in a sweep run (0: no sweep)
    sweep_rounds: int = 2  # runs of each candidate in the sweep; the fastest counts
    value_bytes: int = 0  # L16K-L1M: bytes per value (the score is MB/s of values)
    check: Callable[[int], tuple[int, int]] = expected  # n -> (count, checksum) expected
    # mpbatch's add_many contenders (and the keyed floor) take results through on_batch, one
    # call per batch, instead of on_result, one call per key (DK: a million keys)
    on_batch: bool = False
    distinct_keys: bool = False  # every key of the stream is distinct (DK): the keyed floor
    # builds its batches in C then, and sends only the results back
    # Measured runs at least, whatever --repeats says (not in --smoke). W1-W3 score short runs
    # (W1 ~0.3 s, W2 ~1 s) whose spread, run to run, is wider than the margins between the
    # contenders: on W2, mpbatch `add` against ProcessPoolExecutor (by median wall) came out
    # at 0.93x, 0.94x, 0.98x, 1.00x and 1.05x in five interleaved sets of 6-8 runs within 15
    # minutes; on W1, `add_many` at 0.74x Pool in a full run's 5 repeats (its runs 0.29-0.47
    # s, Pool's 0.25-0.26) and 0.93x in 12 repeats right after. Six more repeats than
    # --repeats 5 cost a full run ~1.5 min on W1, ~1.5 on W2 and ~5 on W3.
    min_repeats: int = 0


def workloads(smoke=False, big=False):
    """All workloads by name; `smoke` shrinks every one to seconds and skips the sweep."""
    overhead = {"items": overhead_items, "fn": double, "do": do_double, "units_per_item": 0,
                "chunks": (1000, 10_000, 50_000), "sizes": (500, 2000, 5000), "sweep_n": 200_000,
                # a sweep run is ~0.1 s here, so a slow moment of this VM weighs more: two
                # runs each picked mpbatch's size=2000 or 5000 from run to run, 5 % apart
                "sweep_rounds": 5}
    # W2/W3's sweep runs half the stream: on a quarter, the last chunk's tail weighed twice
    # what it does in the full run, and small chunks looked better than they are.
    cpu = {"fn": spin, "do": do_spin, "chunks": (10, 50, 200), "sizes": (10, 50, 200),
           "sweep_n": 10_000, "min_repeats": NOISY_MIN_REPEATS}
    table = [
        Workload("W1", "overhead: 1M trivial items", 1_000_000, **overhead,
                 min_repeats=NOISY_MIN_REPEATS),
        Workload("W2", "CPU-bound: 20k items x 100 us", 20_000, items=cpu_items,
                 units_per_item=1, **cpu),
        Workload("W3", "skew: hot keys late in the stream", 20_000, items=skew_items,
                 units_per_item=skew_units(20_000) / 20_000, **cpu),
        # Latency is measured one item at a time (chunk 1, size=1): nothing to sweep.
        Workload("W4", "latency: 1000 items/s, 100 us each", 2000, cpu_items, spin, do_spin,
                 units_per_item=1, paced=True),
        Workload("MEM", "memory: a 1M-item generator", 1_000_000, **overhead),
        Workload("DK", "distinct keys: 1M trivial items, 1M keys", 1_000_000,
                 **{**overhead, "items": distinct_items, "sizes": (1000, 2000, 5000)},
                 on_batch=True, distinct_keys=True),
    ]
    for name, size in LARGE.items():
        n = LARGE_TOTAL // size
        title = f"large values: bytes of {name[1:-1]} {name[-1]}iB, 2 GiB in all"
        table.append(Workload(
            name, title, n, large_items(size),
            digest, do_digest, units_per_item=0, chunks=(1, 8, 64), sizes=(1, 8, 64),
            sweep_n=n // 4, value_bytes=size, check=large_expected(size)))
    if big:
        table.append(Workload("MEM10M", "memory: a 10M-item generator", 10_000_000,
                              **{**overhead, "chunks": (10_000,), "sizes": (2000,)}))
    if smoke:
        table = [_shrink(w, _smoke_n(w)) for w in table]
    return {w.name: w for w in table}


def _smoke_n(w):
    if w.value_bytes:
        return max(8, LARGE_SMOKE_TOTAL // w.value_bytes)
    return 300 if w.paced else 2000


def _shrink(w, n):
    """A smoke-sized copy of `w`: n items, one chunk size, no sweep."""
    units = skew_units(n) / n if w.items is skew_items else w.units_per_item
    return replace(w, n=n, units_per_item=units, chunks=w.chunks[:1], sizes=w.sizes[:1],
                   sweep_n=0)
