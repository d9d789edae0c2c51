"""Job functions for the mpbatch command, run on examples/data/requests.jsonl.

    mpbatch run examples/jobs.py:fingerprint examples/data/requests.jsonl --key service \
        --output fingerprints.jsonl --dead-letters failed.sqlite

Each line of the input is one request of a web service's log, as JSON. ``fingerprint``
gets a batch grouped by service and returns one digest per request (PBKDF2: the cost of
a real hashing or signing step); ``fingerprint_one`` does the same per request, for
``--per-item``. A request without a "path" raises: with ``--per-item`` that request alone
is dead-lettered, and the rest go on.
"""

import hashlib


def fingerprint_one(request: dict) -> str:
    """One request's digest (with --per-item: a raise fails this request alone)."""
    salt = request["service"].encode()
    return hashlib.pbkdf2_hmac("sha256", request["path"].encode(), salt, 200).hex()[:16]


def fingerprint(batch: dict[str, list[dict]]) -> dict[str, list[str]]:
    """A batch of requests grouped by service: one digest each, in order."""
    return {service: [fingerprint_one(request) for request in requests]
            for service, requests in batch.items()}


def make(path: str, n: int = 20_000) -> None:
    """Write the example input: ``python examples/jobs.py``."""
    import json
    import random

    rng = random.Random(7)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            service = f"svc-{rng.randrange(20):02d}"
            path = f"/api/v1/items/{rng.randrange(10**6)}"
            request = {"id": i, "service": service, "path": path,
                       "status": rng.choice([200, 200, 404])}
            f.write(json.dumps(request) + "\n")


if __name__ == "__main__":
    make("examples/data/requests.jsonl")
