"""fork, spawn and forkserver all run lambdas, closures, init state and SIGKILL recovery."""

import pytest

import mpbatch
from tests import fns


def test_lambda_and_closure(start_method):
    factor = 3
    got = {}
    with mpbatch.Batcher(lambda batch: {k: [v * factor for v in vs] for k, vs in batch.items()},
                         workers=2, size=10, start_method=start_method,
                         on_result=lambda k, vs, rs: got.update(zip(vs, rs, strict=True))) as b:
        futs = [b.submit(f"k{i % 4}", i) for i in range(40)]
    assert [f.result() for f in futs] == [3 * i for i in range(40)]
    assert got == {i: 3 * i for i in range(40)}


def test_init_state(start_method):
    with mpbatch.Batcher(fns.use_state, init=fns.init_state, workers=2, start_method=start_method,
                         size=5) as b:
        futs = [b.submit("k", i) for i in range(20)]
    assert [f.result() for f in futs] == [10 * i for i in range(20)]


def test_sigkill_is_recovered(start_method):
    with mpbatch.Batcher(fns.kill_on(13), workers=2, size=4, start_method=start_method,
                         max_attempts=2, retry_backoff=0) as b:
        futs = [b.submit(f"k{i % 3}", i) for i in range(30)]
    s = b.stats()
    assert s.worker_restarts >= 1
    assert s.accepted == s.succeeded + s.dead_lettered and s.pending == 0
    bad = futs[13]
    with pytest.raises(mpbatch.WorkerDied, match="SIGKILL"):
        bad.result()
