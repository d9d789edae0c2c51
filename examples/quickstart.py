"""Quickstart: fingerprint 40,000 log lines, batched per service, on every core.

A real CPU-bound keyed job: each worker receives a batch grouped by service, runs
PBKDF2 over each line (the cost of a real hashing/signing step), and returns one
digest per line. The caller counts results per service as they arrive and prints
the Batcher's stats at the end.

    python examples/quickstart.py
"""

import hashlib
import random
import time
from collections import Counter

import mpbatch

SERVICES = [f"svc-{i:02d}" for i in range(20)]


def fingerprint(batch: dict[str, list[str]]) -> dict[str, list[str]]:
    """Runs in a worker: one digest per line, in the order the lines were added."""
    return {
        service: [hashlib.pbkdf2_hmac("sha256", line.encode(), service.encode(), 200).hex()[:16]
                  for line in lines]
        for service, lines in batch.items()
    }


def log_lines(n: int):
    rng = random.Random(7)
    for i in range(n):
        service = rng.choice(SERVICES)
        yield service, f"{i} {service} GET /api/v1/items/{rng.randrange(10**6)} 200"


def main() -> None:
    per_service: Counter[str] = Counter()

    def on_result(service: str, lines: list[str], digests: list[str] | None) -> None:
        per_service[service] += len(digests or ())

    started = time.perf_counter()
    with mpbatch.Batcher(fingerprint, size=500, interval=0.05, on_result=on_result) as b:
        first = b.submit("svc-00", "hello")  # one item with its own future
        accepted = b.add_many(log_lines(40_000))
    wall = time.perf_counter() - started

    stats = b.stats()
    print(f"accepted {accepted + 1} items in {wall:.2f}s ({(accepted + 1) / wall:,.0f} items/s) "
          f"on {stats.workers} workers")
    print(f"first item's fingerprint: {first.result()}")
    print(f"busiest services: {per_service.most_common(3)}")
    print(stats)
    assert stats.succeeded == accepted + 1 and stats.pending == 0


if __name__ == "__main__":
    main()
