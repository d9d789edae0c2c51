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


PRELOAD_SCRIPT = """
import multiprocessing, sys
import mpbatch

def do(batch):
    return {k: ["colorsys" in sys.modules] * len(v) for k, v in batch.items()}

if __name__ == "__main__":
    multiprocessing.set_forkserver_preload(["__main__", "colorsys"])
    with mpbatch.Batcher(do, workers=1, start_method="forkserver") as b:
        print("preloaded in the worker:", b.submit("k", 1).result(timeout=60))
    from multiprocessing import forkserver
    print("preload list:", forkserver._forkserver._preload_modules)
"""


def test_the_fork_servers_preload_list_keeps_what_the_caller_put_there(tmp_path):
    """mpbatch adds its worker module to the fork server's preload list; it keeps what the
    caller put there (and multiprocessing's default, "__main__", which spares each worker
    an import of the main script on Pythons where that preload works)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "caller.py"
    script.write_text(PRELOAD_SCRIPT)
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, timeout=90,
                         env=dict(os.environ, PYTHONPATH=root), capture_output=True, text=True,
                         check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "preloaded in the worker: True" in run.stdout
    assert "preload list: ['__main__', 'colorsys', 'mpbatch.worker']" in run.stdout
