"""CI keeps the benchmark harness working: a tiny run of it, no speed asserted."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The peers that need no extra install; joblib and mpire come with the bench extra.
CONTENDERS = "serial,pool,ppe,mpbatch-add,mpbatch-add_many,mpbatch-submit"


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_benchmark_harness_smoke_run():
    run = subprocess.run(
        [sys.executable, "benchmarks/run.py", "--smoke", "--only", CONTENDERS],
        cwd=ROOT, capture_output=True, text=True, timeout=230, check=False)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    assert "Overview" in run.stdout
    for workload in ("W1", "W2", "W3", "W4", "MEM"):
        assert f"\n{workload}:" in run.stdout, out[-3000:]
    assert "FAILED" not in run.stdout, out[-3000:]  # a lost or wrong result fails a run
    assert "failed" not in run.stdout, out[-3000:]
