"""The file workload's functions, and the serial loop a shell user would write.

    python benchmarks/file_jobs.py serial trivial INPUT OUTPUT   # '-' for stdin / stdout
    python benchmarks/file_jobs.py make N PATH                   # N short JSON Lines records

``trivial`` doubles a field; ``work`` spends ~100 us per record hashing it (ROUNDS rounds of
sha256, set by $FILE_JOBS_ROUNDS, calibrated by files.py). Each has a per-record form
(``*_one``, for ``mpbatch run --per-item``) and a batch form (``*_batch``, for a batch
``do``); the serial loop and GNU parallel's blocks run the per-record form. Every contender
writes the same line per record: {"key": null, "input": record, "result": result}.
"""

import hashlib
import json
import os
import sys

ROUNDS = int(os.environ.get("FILE_JOBS_ROUNDS", "300"))


def trivial_one(record):
    return record["n"] * 2


def work_one(record):
    digest = record["name"].encode()
    for _ in range(ROUNDS):
        digest = hashlib.sha256(digest).digest()
    return digest[:4].hex()


def trivial_batch(batch):
    return {key: [trivial_one(r) for r in records] for key, records in batch.items()}


def work_batch(batch):
    return {key: [work_one(r) for r in records] for key, records in batch.items()}


def serial(fn_name, src, dst):
    """json.loads -> fn -> json.dumps, one line at a time: the loop a user writes."""
    fn = globals()[f"{fn_name}_one"]
    fin = sys.stdin if src == "-" else open(src, encoding="utf-8")  # noqa: SIM115
    fout = sys.stdout if dst == "-" else open(dst, "w", encoding="utf-8")  # noqa: SIM115
    dumps, loads, write = json.dumps, json.loads, fout.write
    for line in fin:
        record = loads(line)
        write(dumps({"key": None, "input": record, "result": fn(record)}) + "\n")
    fout.flush()


def make(n, path):
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"id": i, "name": f"user-{i % 9973}", "n": i}) + "\n")


if __name__ == "__main__":
    if sys.argv[1] == "serial":
        serial(*sys.argv[2:5])
    elif sys.argv[1] == "make":
        make(int(sys.argv[2]), sys.argv[3])
    else:
        raise SystemExit(f"unknown command {sys.argv[1]!r}")
