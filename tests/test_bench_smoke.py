"""CI keeps the benchmark harness working: a tiny run of it, no speed asserted."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The peers (and the floors) that need no extra install; joblib and mpire come with the bench
# extra. The pipe floor runs in the large-value workloads only.
CONTENDERS = ("serial,pool,ppe,bare,bare-keyed,bare-keyed-key,pipe-floor,mpbatch-add,"
              "mpbatch-add_many,mpbatch-submit")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_benchmark_harness_smoke_run():
    run = subprocess.run(
        [sys.executable, "benchmarks/run.py", "--smoke", "--only", CONTENDERS],
        cwd=ROOT, capture_output=True, text=True, timeout=230, check=False)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    assert "Overview" in run.stdout
    for workload in ("W1", "W2", "W3", "W4", "MEM", "L16K", "L64K", "L1M"):
        assert f"\n{workload}:" in run.stdout, out[-3000:]
    assert "| pipe-floor | " in run.stdout.split("\nL16K:")[1], out[-3000:]
    assert "FAILED" not in run.stdout, out[-3000:]  # a lost or wrong result fails a run
    assert "LEFTOVER" not in run.stdout, out[-3000:]  # a process outlived its run
    assert "failed" not in run.stdout, out[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_scaling_harness_smoke_run():
    run = subprocess.run(
        [sys.executable, "benchmarks/scaling.py", "--smoke", "--n", "2000"],
        cwd=ROOT, capture_output=True, text=True, timeout=110, check=False)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    assert "Caller cost vs workers" in run.stdout and "Caller cost vs distinct keys" in run.stdout
    assert "| 8 | 100 |" in run.stdout and "| 2 | 1,000,000 |" in run.stdout, out[-3000:]
    assert "FAILED" not in run.stdout, out[-3000:]  # a lost or wrong result fails a run
    assert "LEFTOVER" not in run.stdout, out[-3000:]  # a process outlived its run


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ab_harness_smoke_run():
    run = subprocess.run(
        [sys.executable, "benchmarks/ab.py", "--smoke", "--workload", "W2", "--repeats", "2",
         "--run", "pool:10", "--run", "mpbatch-add_many", "--run", f"mpbatch-add:20@{ROOT}"],
        cwd=ROOT, capture_output=True, text=True, timeout=110, check=False)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    assert "| pool:10 | " in run.stdout and "| 1.000 (1.000-1.000) |" in run.stdout, out
    assert f"| mpbatch-add:20@{ROOT} | " in run.stdout, out[-3000:]
    assert run.stdout.count("[1] ") == 3, out[-3000:]  # every run, each repeat


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ab_harness_reports_latency_on_the_paced_workload():
    # W4's wall is its schedule's: the table shows p50, p99 and p99 over the first run's.
    run = subprocess.run(
        [sys.executable, "benchmarks/ab.py", "--smoke", "--workload", "W4", "--repeats", "2",
         "--run", "ppe:1", "--run", "mpbatch-add:1"],
        cwd=ROOT, capture_output=True, text=True, timeout=110, check=False)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    assert "| p50 ms | p99 ms | p99 ÷ first, run by run |" in run.stdout, out[-3000:]
    assert "| 1.00 (1.00-1.00) |" in run.stdout.split("| ppe:1 |")[1], out[-3000:]
    assert run.stdout.count("[1] ") == 2 and "p99 " in run.stdout, out[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ab_harness_reports_the_callers_gc():
    """--gc: the caller's CPU, its workers' and its collections of each generation."""
    run = subprocess.run(
        [sys.executable, "benchmarks/ab.py", "--smoke", "--workload", "DK", "--repeats", "1",
         "--gc", "freeze", "--run", "bare-keyed:100", "--run", "mpbatch-add_many:100"],
        cwd=ROOT, capture_output=True, text=True, timeout=110, check=False)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    assert "| caller CPU s | reaped CPU s | GC CPU s, gen 0 / 1 / 2 (collections) |" in out
    rows = [line for line in run.stdout.splitlines() if line.startswith("| bare-keyed:100 |")
            or line.startswith("| mpbatch-add_many:100 |")]
    assert len(rows) == 2, out[-3000:]
    for row in rows:
        cells = row.strip("| ").split(" | ")
        assert float(cells[4]) > 0 and float(cells[5]) > 0, row  # the caller's, the workers'
        gens = cells[6].split(" / ")
        assert len(gens) == 3 and all(g.endswith(")") for g in gens), row


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_profiles_harness_smoke_run(tmp_path):
    """profiles.py: py-spy over a contender's runs, a row per process role and thread."""
    spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
    probe = subprocess.run([spy, "record", "--format", "raw", "--output", str(tmp_path / "p"),
                            "--", sys.executable, "-c", "import time; time.sleep(0.2)"],
                           capture_output=True, text=True, timeout=60, check=False)
    if probe.returncode != 0 and "ermission" in probe.stderr + probe.stdout:
        pytest.skip("py-spy may not trace its child here (ptrace denied: in a container it "
                    f"needs CAP_SYS_PTRACE): {probe.stderr.strip()[-200:]}")
    assert probe.returncode == 0, probe.stderr[-2000:]
    run = subprocess.run(
        [sys.executable, "benchmarks/profiles.py", "--smoke", "--gil", "--workload", "W1",
         "--repeats", "5", "--run", "bare-keyed:100", "--run", "mpbatch-add_many:100"],
        cwd=ROOT, capture_output=True, text=True, timeout=110, check=False)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    assert "| run | process, thread | s on the stack per run |" in run.stdout, out[-3000:]
    for name in ("bare-keyed:100", "mpbatch-add_many:100"):
        assert f"| {name} | caller, main thread | " in run.stdout, out[-3000:]
        wall, caller_cpu, reaped_cpu = run.stdout.split(f"\n| {name} | ")[-1].split(" |")[:3]
        assert float(wall) > 0 and float(caller_cpu) > 0 and float(reaped_cpu) > 0, out


# py-spy's raw output for one contender, written by hand: the child (pid 10) and a worker it
# started (pid 11) under spawn, whose command line holds a ';' as spawn's does.
_CHILD = 'process 10:"python profiles.py --child"'
_WORKER = 'process 11:"python -c from multiprocessing.spawn import spawn_main; spawn_main(5)"'
_STACKS = [
    ([_CHILD, "thread (10): MainThread", "<module> (profiles.py:1)", "child_main (profiles.py:2)",
      "run (contenders.py:3)", "stream (contenders.py:4)", "pull (bulk.py:5)"], 30),
    ([_CHILD, "thread (10): MainThread", "<module> (profiles.py:1)",
      "_find_and_load (<frozen importlib._bootstrap>:6)"], 50),  # an import: left out
    ([_CHILD, "thread (10): MainThread", "_shutdown (threading.py:7)"], 5),  # the exit: out
    ([_CHILD, "thread (12): Thread-3 (_handle_results)", "Thread._bootstrap (threading.py:8)",
      "Thread._bootstrap_inner (threading.py:9)", "Thread.run (threading.py:10)",
      "Pool._handle_tasks (pool.py:11)", "send (connection.py:12)"], 10),
    ([_CHILD, _WORKER, "thread (11): MainThread", "<module> (<string>:1)",
      "spawn_main (spawn.py:13)", "serve (bare.py:14)"], 40),
    ([_CHILD, _WORKER, "thread (13)", "watch (worker.py:15)"], 20),
]
_SPY = "".join(f"{';'.join(frames)} {n}\n" for frames, n in _STACKS)


def test_profiles_counts_each_thread_of_the_runs_only():
    """profiles.summarize on py-spy's format: roles, thread names, what is left out, the
    seconds per run (no py-spy needed)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import profiles
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))
    got = profiles.summarize(_SPY, 0.0, per_s=10)  # e.g. a rate of 5 Hz, 2 repeats
    caller, under = got["caller"]["threads"], got["under the caller"]["threads"]
    # the imports (50) and the exit (5) are left out: 30 + 10 + 40 + 20 samples counted
    assert caller["main thread"]["s"] == 3.0
    assert caller["main thread"]["self"] == [["pull (bulk.py)", 1.0]]
    assert caller["Pool._handle_tasks (pool.py)"]["s"] == 1.0  # not py-spy's stale name
    assert under["main thread"]["s"] == 4.0 and under["main thread"]["share"] == 0.4
    assert under["watch (worker.py)"]["s"] == 2.0  # a thread started by _thread
    assert set(caller) == {"main thread", "Pool._handle_tasks (pool.py)"}
    assert set(under) == {"main thread", "watch (worker.py)"}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["on", "freeze", "off"])
def test_gc_mode_counts_the_callers_collections_and_leaves_forked_workers_alone(mode):
    code = f"""
import gc, os, sys
sys.path.insert(0, "benchmarks")
import run
clock = run.gc_mode({mode!r})
gc.collect()
r, w = os.pipe()
pid = os.fork()
if pid == 0:  # a worker forked by the caller; it freezes, as mpbatch's zygote does
    os.write(w, f"{{gc.isenabled()}} {{gc.get_freeze_count()}} {{len(gc.callbacks)}}".encode())
    gc.freeze()
    grandchild = os.fork()
    if grandchild == 0:  # the zygote's worker keeps what the zygote chose
        os.write(w, f" {{gc.get_freeze_count() > 0}}".encode())
        os._exit(0)
    os.waitpid(grandchild, 0)
    os._exit(0)
os.waitpid(pid, 0)
print(clock.report()["collections"][2], gc.isenabled(), os.read(r, 100).decode())
"""
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=50, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    full, enabled, *child = run.stdout.split()
    assert full == "1"  # the gc.collect() above, seen by the clock
    assert enabled == str(mode != "off")
    # a forked worker: the GC as it was, no clock; its own fork keeps the freeze it made
    assert child == ["True", "0", "0", "True"], child


def _runs_all_ok(stdout: str) -> list[str]:
    """The per-run lines ('  [1/1] name  rate ... ok') that did not end in ok."""
    runs = [line for line in stdout.splitlines() if line.lstrip().startswith("[")]
    assert runs, stdout[-3000:]
    return [line for line in runs if not line.rstrip().endswith("ok")]



@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize(("script", "rows"), [
    ("files.py", ["| trivial | per-item |", "| trivial | batch |", "| work | halves |"]),
    ("executor.py", ["| map_vs_ppe_best |", "| submit_vs_ppe |",
                     "| submit_bytes_per_pending_call |"]),
    ("keyed.py", ["| mpbatch add_many affinity |", "| pool map |",
                  "| affinity / the better of least-loaded and key", "W3 (1,000 items)"]),
    ("fill.py", ["| 20,000 : 500 | mpbatch@", "| 400,000 : 5000 | pool |"]),
])
def test_files_and_executor_harness_smoke_run(script, rows):
    run = subprocess.run(
        [sys.executable, f"benchmarks/{script}", "--smoke"],
        cwd=ROOT, capture_output=True, text=True, timeout=110, check=False)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    # a lost, doubled or failed record, a wrong total or a failed call
    assert _runs_all_ok(run.stdout) == [], out[-3000:]
    for row in rows:
        assert row in run.stdout, out[-3000:]
