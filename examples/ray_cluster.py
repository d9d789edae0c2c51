"""The same Batcher on Ray: fingerprint the requests of examples/data/requests.jsonl on Ray
actors, one per worker, each holding a per-actor salt made by init().

Locally, on a Ray this script starts and stops (in a loopback-only network namespace,
with Ray's usage reports, token auth and cloud probe off):

    scripts/offline-ray python examples/ray_cluster.py

On a cluster you started (`ray start --head` on one node, `ray start --address=HEAD:6379`
on the others; mpbatch installed on every node):

    python examples/ray_cluster.py --address HEAD:6379 --workers 8

``fingerprint`` and ``make_salt`` are defined in this script, so cloudpickle ships them by
value to every node. Functions of a module of yours travel by name instead: the module
must be importable on the nodes (install it there, or pass
``ray_options={"runtime_env": {"py_modules": [your_module]}}``).
"""

import argparse
import hashlib
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import mpbatch

DATA = Path(__file__).with_name("data") / "requests.jsonl"


def make_salt() -> dict:
    """init(): runs once in each actor, before its first batch (load a model here)."""
    return {"salt": hashlib.sha256(b"mpbatch").digest(), "pid": os.getpid()}


def fingerprint(batch: dict[str, list[dict]], state: dict) -> dict[str, list[tuple]]:
    """A batch of requests grouped by service: (digest, actor pid) for each, in order."""
    return {service: [(hashlib.pbkdf2_hmac("sha256", r["path"].encode(), state["salt"],
                                           200).hex()[:16], state["pid"])
                       for r in requests]
            for service, requests in batch.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", help="host:port of a running Ray cluster (default: "
                                          "start a local Ray and stop it at the end)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    if args.address is None and os.environ.get("MPBATCH_OFFLINE_RAY") != "1":
        print("a local Ray contacts addresses beyond this machine unless it starts offline: "
              "run this as `scripts/offline-ray python examples/ray_cluster.py`, or pass "
              "--address of your cluster", file=sys.stderr)
        return 2
    with DATA.open(encoding="utf-8") as f:
        requests = [json.loads(line) for line in f]
    pids: Counter[int] = Counter()

    def on_result(service: str, values: list, results: list | None) -> None:
        pids.update(pid for _, pid in results or ())

    began = time.perf_counter()
    with mpbatch.Batcher(fingerprint, init=make_salt, backend="ray", address=args.address,
                         workers=args.workers, size=500, on_result=on_result) as b:
        first = b.submit(requests[0]["service"], requests[0])
        b.start()
        started = time.perf_counter() - began
        b.add_many((r["service"], r) for r in requests[1:])
    wall = time.perf_counter() - began
    stats = b.stats()
    print(f"{stats.succeeded:,} requests fingerprinted on {stats.workers} Ray actors in "
          f"{wall:.1f} s ({started:.1f} s of it starting Ray and the actors)")
    print(f"first request: {first.result()[0]}; requests per actor pid: {dict(pids)}")
    print(stats)
    return 0 if stats.succeeded == len(requests) and stats.pending == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
