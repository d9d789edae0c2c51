"""Routing: key affinity keeps per-key order; least-loaded and round-robin spread the load."""

import os
import subprocess
import sys

from mpbatch.dispatch import key_hash
from tests import fns


def pids_and_values(b, items):
    futs = [(k, b.submit(k, v)) for k, v in items]
    b.flush()
    return [(k, *f.result()) for k, f in futs]


def test_key_routing_pins_each_key_to_one_worker_in_order(batcher_factory):
    b = batcher_factory(fns.with_pid, routing="key", size=7, workers=2)
    rows = pids_and_values(b, [(f"user:{i % 11}", i) for i in range(500)])
    by_key = {}
    for key, pid, value in rows:
        by_key.setdefault(key, []).append((pid, value))
    for key, seen in by_key.items():
        assert len({pid for pid, _ in seen}) == 1, key
        assert [v for _, v in seen] == sorted(v for _, v in seen), key
    assert len({pid for _, pid, _ in rows}) == 2  # both workers got keys


def test_key_routing_order_holds_across_many_batches_with_add_many(batcher_factory):
    order = {}
    b = batcher_factory(fns.double, routing="key", size=5, workers=2,
                        on_result=lambda k, vs, rs: order.setdefault(k, []).extend(vs))
    b.add_many((f"k{i % 3}", i) for i in range(3000))
    b.flush()
    for k, vs in order.items():
        assert vs == sorted(vs), k
    assert sum(map(len, order.values())) == 3000


def test_key_hash_is_stable_across_processes_and_hash_seeds():
    keys = ["user:1", b"raw", 12345, ("tuple", 1)]
    code = ("from mpbatch.dispatch import key_hash;"
            f"print([key_hash(k) for k in {keys!r}])")
    outs = set()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        outs.add(subprocess.run([sys.executable, "-c", code], env=env, check=True,
                                capture_output=True, text=True).stdout)
    assert outs == {f"{[key_hash(k) for k in keys]}\n"}


def test_least_loaded_uses_every_worker(batcher_factory):
    b = batcher_factory(fns.with_pid, routing="least-loaded", size=10, workers=2)
    rows = pids_and_values(b, [("same-key", i) for i in range(2000)])
    assert len({pid for _, pid, _ in rows}) == 2


def test_least_loaded_avoids_a_busy_worker(batcher_factory, tmp_path):
    gate = tmp_path / "open"
    # Worker A holds one slow item (load 1). Each later item, sent when B is idle (load 0),
    # must go to B: were one routed to A, its result would wait for the gate and time out.
    b = batcher_factory(fns.wait_for_file(str(gate), "slow"), size=1, workers=2)
    first = b.submit("slow", 0)
    for i in range(1, 30):
        assert b.submit("k", i).result(timeout=10) == 2 * i
    assert not first.done()
    gate.touch()
    assert first.result(timeout=20) == 0


def test_round_robin_alternates_workers(batcher_factory):
    b = batcher_factory(fns.with_pid, routing="round-robin", size=10, workers=2)
    rows = pids_and_values(b, [("k", i) for i in range(200)])
    pids = [pid for _, pid, _ in rows]
    assert len(set(pids)) == 2
    assert abs(pids.count(pids[0]) - 100) <= 10
