"""Benchmark driver: mpbatch against the serial loop and its peers, on W1-W4, MEM, DK and L16K-L1M.

    python benchmarks/run.py                        # every workload, 3 repeats (W1-W3: 11)
    python benchmarks/run.py --smoke                # every workload and contender, tiny (CI)
    python benchmarks/run.py --workloads W1,W2 --repeats 5 --only pool,mpbatch-add_many
    python benchmarks/run.py --workloads MEM --big  # adds MEM10M: 10M items through add_many
    python benchmarks/run.py --workloads L16K,L64K,L1M  # large bytes values, MB/s
    python benchmarks/run.py --workloads DK         # 1M items, each with a key of its own

Every measured run is a fresh child process (this file with --child): no run inherits a warm
pool, a grown heap or imports from the one before. The child times the contender, cold start
and teardown included, and checks nothing itself; this process samples the PSS of the child's
whole process tree (every 20 ms; W2 and W3 100 ms, W4 250 ms: sample_period), checks count
and checksum, and writes the results.
"""

import argparse
import compileall
import contextlib
import datetime
import gc
import hashlib
import importlib
import importlib.metadata
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import contenders
import psutil
import workloads

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
SAMPLE_PERIOD = 0.02  # s between PSS samples of the measured process tree
# W4 (latency) needs no memory samples, only the tree's processes and CPU times; each sample
# costs ~1-3 ms of this process's CPU, which at 20 ms took ~10 % of a vCPU from the run and
# showed up in every contender's p99.
PACED_SAMPLE_PERIOD = float(os.environ.get("MPBATCH_BENCH_PACED_PERIOD", "0.25"))
# W4 scores latency, not memory, and its PSS is not sampled: reading the smaps of the whole
# tree (~1 ms per process) took the CPU from under the contenders and set everyone's p99 at
# ~5 ms every 20 ms, and at 3-9 ms for mpbatch's 5-process tree still every 0.5 s.
# W2 and W3 score CPU time: their PSS stays flat (20,000 small items), and reading it costs
# per process (~250 us each), so a 20 ms period took ~6 % of a vCPU from a 3-process pool and
# ~11 % from mpbatch's 5 (caller, zygote, 2 workers, and a resource tracker before the
# segments left it): sampled every 100 ms.
CPU_SAMPLE_PERIOD = 0.1
# The kernel lists each task's children in /proc (CONFIG_PROC_CHILDREN): TreeSampler.tree
# reads those; without them it falls back to psutil, which reads every process on the machine.
_TASK_CHILDREN = os.path.exists(f"/proc/{os.getpid()}/task/{threading.get_native_id()}/children")
GC_MODES = ("on", "freeze", "off")  # ab.py --gc: see gc_mode
RESULT_TAG = "RESULT "  # prefixes the child's one line of JSON on stdout
MB = 2**20  # in PSS and in MB/s alike
BUSY = 0.10  # flag a run when this share of the machine's CPU did work not of the run,
BUSY_SECONDS = 0.3  # and that work took this many CPU seconds

# MEM measures the bulk path: mpbatch through add_many, and each peer fed the same generator.
MEM_CONTENDERS = ("serial", "pool", "ppe", "joblib", "mpire", "bare", "bare-keyed",
                  "mpbatch-add_many")
# PPE.map turns the whole stream into futures up front: 10M of them would need gigabytes.
MEM10M_CONTENDERS = ("serial", "pool", "joblib", "mpire", "bare", "bare-keyed",
                     "mpbatch-add_many")
# DK: W1's items with a key each. joblib sits out: its W1 (~0.1x Pool, loky's fresh
# interpreters) says nothing new here, since the peers never see keys. add_many delivers
# through on_batch, and routing="key" is measured here only.
DK_CONTENDERS = ("serial", "pool", "ppe", "mpire", "bare", "bare-keyed", "bare-keyed-key",
                 "mpbatch-add", "mpbatch-add_many", "mpbatch-add_many-key")
# Everywhere else: every contender but those meant for DK or W1 alone (--only still runs them).
OTHER_CONTENDERS = tuple(n for n in contenders.CONTENDERS
                         if n not in ("bare-keyed-key", "mpbatch-add_many-key", "bare-keyed-2t"))
# W1 adds the keyed floor with a second caller thread: on the cheapest items, what a caller
# of two threads (one GIL) costs apart from any library.
W1_CONTENDERS = (*OTHER_CONTENDERS, "bare-keyed-2t")

# workload -> [(metric, label, higher is better)]; the first one is the headline score.
SCORES = {
    "W1": [("items_per_s", "items/s", True)],
    "W2": [("efficiency", "efficiency", True)],
    "W3": [("wall_over_ideal", "wall/ideal", False)],
    "W4": [("p99_ms", "p99 ms", False), ("p50_ms", "p50 ms", False)],
    "MEM": [("peak_pss_mb", "peak PSS MB", False)],
    "MEM10M": [("peak_pss_mb", "peak PSS MB", False)],
    "DK": [("items_per_s", "items/s", True)],
    **{name: [("mb_per_s", "MB/s", True)] for name in workloads.LARGE},
}
DEFAULT_WORKLOADS = ["W1", "W2", "W3", "W4", "MEM", "DK", *workloads.LARGE]
# workload -> the contender its targets are stated against: its table also divides each
# row's headline score by that contender's (next to the ratio to the best peer)
AGAINST = {"DK": "pool"}
# workloads whose table also shows how much the caller's own RSS grew during the run
CALLER_RSS = ("DK",)


# --- the child: one measured run ----------------------------------------------------------------


def child_main(spec):
    """Run one contender once and print its outcome as one line of JSON."""
    w = workloads.workloads(spec["smoke"], spec["big"])[spec["workload"]]
    job = contenders.Job(w, spec["n"], spec["chunk"], spec["rounds"], spec["workers"],
                         spec["start_method"], spec.get("keys"), spec.get("max_bytes"))
    out = {}
    contenders.preload(spec["contender"])
    clock = gc_mode(spec.get("gc"))
    rss = psutil.Process().memory_info().rss
    timer = RunClock()
    try:
        count, checksum, extra = contenders.run(spec["contender"], job)
        out = {"count": count, "checksum": checksum, "extra": extra}
    except BaseException as exc:  # reported as the run's error, not raised
        traceback.print_exc()
        out = {"error": f"{type(exc).__name__}: {exc}"}
    out |= timer.read()
    if clock is not None:
        out["gc"] = clock.report()
    # The caller's own memory, apart from its workers': RSS when the clock started and the
    # peak RSS of its life (Linux: ru_maxrss in KiB). Their difference is what the run added
    # to the caller, at most (a peak reached before the clock, while importing, counts too).
    out["caller_rss_start"] = rss
    out["caller_rss_peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(RESULT_TAG + json.dumps(out, default=repr), flush=True)


class RunClock:
    """One run's wall time, the caller's own CPU (all its threads, not its workers: what the
    stream costs the program that feeds it, whatever the number of workers) and the CPU of
    every descendant reaped meanwhile: the workers, under fork and the zygote (whose workers
    it reaps before it is reaped); not under forkserver, whose server outlives the run."""

    def __init__(self):
        self.start, self.cpu = time.perf_counter(), time.process_time()
        self.reaped = _reaped_cpu()

    def read(self):
        return {"wall": time.perf_counter() - self.start,
                "caller_cpu": time.process_time() - self.cpu,
                "reaped_cpu": _reaped_cpu() - self.reaped}


def _reaped_cpu():
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return kids.ru_utime + kids.ru_stime


class GcClock:
    """Collections of each generation and the CPU they took, in whichever thread ran them
    (a callback at the start and the end of each: ~1 us a collection, so only on demand)."""

    def __init__(self):
        self.count = [0, 0, 0]
        self.cpu = [0.0, 0.0, 0.0]
        self.started = {}
        self.forgotten = False  # in this process: a fork of the measured caller
        gc.callbacks.append(self._note)

    def _note(self, phase, info):
        now = time.thread_time()
        if phase == "start":
            self.started[threading.get_ident()] = now
            return
        began = self.started.pop(threading.get_ident(), None)
        if began is not None:
            generation = info["generation"]
            self.count[generation] += 1
            self.cpu[generation] += now - began

    def report(self):
        return {"collections": self.count, "cpu_s": self.cpu}

    def forget(self, enabled, frozen):
        """In a child forked from the measured caller: no clock, and the GC as it was
        before gc_mode (``enabled``: on then; ``frozen``: gc_mode froze it). Once: a fork
        of that child (a worker of mpbatch's zygote, which froze its own objects) runs
        the handler again, and must keep what its parent chose."""
        if self.forgotten:
            return
        self.forgotten = True
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._note)
        if frozen:
            gc.unfreeze()
        if enabled:
            gc.enable()


def gc_mode(mode):
    """The caller's cyclic GC for one run (``--gc`` of ab.py): None, as it is, nothing
    measured; "on", as it is, measured; "freeze", every object alive now left out of all
    later collections (gc.freeze()), measured; "off", no collections (gc.disable())."""
    if mode is None:
        return None
    if mode not in GC_MODES:
        raise ValueError(f"gc mode {mode!r}: one of {GC_MODES}")
    clock = GcClock()
    # The caller's alone: a worker forked from it (Pool, ProcessPoolExecutor and the floors
    # under fork, mpbatch's zygote) collects as it would have.
    enabled = gc.isenabled()
    os.register_at_fork(after_in_child=lambda: clock.forget(enabled, mode == "freeze"))
    if mode == "freeze":
        gc.freeze()
    elif mode == "off":
        gc.disable()
    return clock


# --- the parent: sampling, one run, a sweep -----------------------------------------------------


class TreeSampler(threading.Thread):
    """Peak PSS of a process and all its descendants, sampled every ``period`` seconds.

    PSS (not RSS) because forked workers share pages with their parent: RSS counts a shared
    page once per process, PSS splits it between them, so the sum is the tree's real memory.
    """

    def __init__(self, pid, memory=True, period=SAMPLE_PERIOD):
        super().__init__(daemon=True)
        self.period = period
        self.memory = memory  # False: only list the tree and its CPU times (cheap)
        self.root = psutil.Process(pid)
        self.seen = {}  # pid -> psutil.Process: every process seen in the tree
        self.cpu = {}  # pid -> its user + system CPU s when last sampled
        self.peak = 0 if memory else None
        self.most_procs = 0
        self.own_cpu = 0.0  # CPU s this thread spent sampling: taken from the run it measures
        self.halt = threading.Event()

    def run(self):
        while True:
            self.sample()
            if self.halt.wait(self.period):
                return

    def sample(self):
        started = time.thread_time()
        try:
            self._read(self.tree())
        except psutil.Error:
            pass
        finally:
            self.own_cpu += time.thread_time() - started

    def tree(self):
        """The root and its descendants. Read from each task's ``children`` file where the
        kernel has them: psutil's ``children(recursive=True)`` reads every process's stat
        on the machine (~1 ms a sample here, 5 % of a vCPU at 20 ms, taken from the run)."""
        if not _TASK_CHILDREN:
            return [self.root, *self.root.children(recursive=True)]
        pids, todo = [self.root.pid], [self.root.pid]
        while todo:
            pid = todo.pop()
            try:
                tasks = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            for tid in tasks:
                try:
                    with open(f"/proc/{pid}/task/{tid}/children") as f:
                        kids = [int(x) for x in f.read().split()]
                except OSError:
                    continue
                # A child moving to another thread of its parent between two reads (its
                # thread exited) shows in both: counted twice, it would stay in the peak.
                kids = [k for k in kids if k not in pids]
                pids += kids
                todo += kids
        procs = []
        for pid in pids:
            proc = self.seen.get(pid)
            if proc is None:
                with contextlib.suppress(psutil.Error):
                    proc = psutil.Process(pid)
            if proc is not None:
                procs.append(proc)
        return procs

    def _read(self, procs):
        total = 0
        for p in procs:
            try:
                if self.memory:
                    total += p.memory_full_info().pss
                self.seen.setdefault(p.pid, p)
                self.cpu[p.pid] = sum(p.cpu_times()[:2])
            except psutil.Error:
                pass  # exited between the listing and the read
        if self.memory:
            self.peak = max(self.peak, total)
        self.most_procs = max(self.most_procs, len(procs))

    def cpu_seconds(self):
        """CPU used by the tree, up to each process's last sample (at most a period short)."""
        return sum(self.cpu.values())

    def stop(self):
        self.halt.set()
        self.join()

    def leftovers(self, grace=3.0):
        """Processes of this tree still alive after its root exited; killed after `grace` s.

        They are reported with the run: a pool that leaves workers behind would also have
        them competing with the next run.
        """
        others = [p for pid, p in self.seen.items() if pid != self.root.pid]
        deadline = time.monotonic() + grace
        while (alive := [p for p in others if _alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.05)
        found = []
        for p in alive:
            with contextlib.suppress(psutil.Error):
                found.append(f"{p.pid} {' '.join(p.cmdline())[:80]}")
                p.kill()
        return found


def _alive(p):
    """Running and not a zombie: an orphan's zombie waits for init to reap it, which here
    (a VM whose init reaps lazily) takes up to 1.5 s after the process really ended."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def communicate_sampled(proc: subprocess.Popen, sampler: "TreeSampler",
                        timeout: float) -> tuple[str, str, bool, float]:
    """Wait for a run while its tree is sampled; past timeout, kill the tree.

    Returns its stdout, its stderr, whether it timed out and when (perf_counter) it ended,
    taken before the sampler is stopped so that stopping it is not timed."""
    sampler.start()
    try:
        out, err = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        timed_out = True
    ended = time.perf_counter()
    sampler.stop()
    return out, err, timed_out, ended


def kill_tree(pid):
    """Kill a timed-out child and everything it started (only processes this run started)."""
    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.Error:
        return
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()


def _cpu_now():
    """(wall, busy CPU s of the machine, CPU s of this process, of its waited children).

    Busy includes steal (time the hypervisor gave to other guests): both slow a run down.
    """
    t = psutil.cpu_times()
    busy = sum(t) - t.idle - getattr(t, "iowait", 0.0)
    own, kids = (sum(resource.getrusage(who)[:2])
                 for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return time.monotonic(), busy, own, kids


def foreign_cpu(before, after, sampled):
    """(share of the machine's CPUs, CPU s) spent on work not of this run: other jobs, steal.

    The run's own CPU is this process's (the sampler) plus its tree's, counted two ways that
    each fall short: RUSAGE_CHILDREN misses processes nobody here waits for (a forkserver and
    the workers it forks), the samples miss each process's last period. The larger is
    taken, so a short run still reads a few % of foreign work it did not have.
    """
    wall = after[0] - before[0]
    ours = (after[2] - before[2]) + max(after[3] - before[3], sampled)
    foreign = max(0.0, (after[1] - before[1]) - ours)
    return (foreign / (wall * (os.cpu_count() or 1)) if wall > 0 else 0.0), foreign


def sample_period(w, start_method=None):
    """Seconds between samples of the tree while workload ``w`` runs. Under forkserver the
    workers' CPU is seen only in samples (RUSAGE_CHILDREN misses them, see foreign_cpu), so
    a CPU-bound workload keeps the short period there: a worker's last 100 ms unseen would
    count as foreign work, and flag the run busy."""
    if w.paced:
        return PACED_SAMPLE_PERIOD
    if w.units_per_item and start_method != "forkserver":
        return CPU_SAMPLE_PERIOD
    return SAMPLE_PERIOD


def busy(rec):
    """Whether other work took enough of the machine, in share and in seconds, to matter."""
    return rec["foreign_cpu"] > BUSY and rec["foreign_cpu_s"] > BUSY_SECONDS


def measure(spec, timeout):
    """One run in a fresh child process: its outcome, wall time, peak tree PSS and leftovers."""
    before = _cpu_now()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    # mpbatch comes from this checkout (or --mpbatch) whether installed or not, in the caller
    # and in its workers alike. A 3.11 forkserver ignores the sys.path it is sent (its main()
    # drops the sys_path argument) and preloads mpbatch from its own: the current directory
    # first (it runs `python -c`), then PYTHONPATH, then an installed copy. So both are set.
    here = spec["mpbatch_from"]
    path = os.pathsep.join(x for x in (here, os.environ.get("PYTHONPATH")) if x)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=here, env=os.environ | {"PYTHONPATH": path})
    w = workloads.workloads(spec["smoke"], spec["big"])[spec["workload"]]
    paced = w.paced
    sampler = TreeSampler(proc.pid, memory=not paced,
                          period=sample_period(w, spec.get("start_method")))
    stdout, stderr, timed_out, _ = communicate_sampled(proc, sampler, timeout)
    if timed_out:
        stdout += RESULT_TAG + json.dumps({"error": f"timeout after {timeout} s"}) + "\n"
    foreign, foreign_s = foreign_cpu(before, _cpu_now(), sampler.cpu_seconds())
    lines = [x for x in stdout.splitlines() if x.startswith(RESULT_TAG)]
    out = json.loads(lines[-1][len(RESULT_TAG):]) if lines else {
        "error": f"child exited {proc.returncode} with no result"}
    if "error" in out:
        out["stderr_tail"] = stderr[-2000:]
    out |= {"peak_pss": sampler.peak, "most_procs": sampler.most_procs, "foreign_cpu": foreign,
            "foreign_cpu_s": foreign_s, "sampler_cpu_s": sampler.own_cpu,
            "leftovers": sampler.leftovers()}
    count, checksum = w.check(spec["n"])
    out["ok"] = out.get("count") == count and out.get("checksum") == checksum
    if "error" not in out and not out["ok"]:
        out["error"] = (f"delivery check failed: got {out.get('count')} results summing to "
                        f"{out.get('checksum')}, expected {count} summing to {checksum}")
    return out


def measure_quietly(args, spec):
    """measure(), retried up to --retry-busy times when other work shared the machine.

    This machine may be shared (a test suite running next to the benchmark); a run that had
    to share the CPUs is measured again once the machine looks idle. The busy attempts are
    kept in the record, so nothing is hidden.
    """
    discarded = []
    while True:
        rec = measure(spec, args.timeout)
        if not busy(rec) or len(discarded) >= args.retry_busy:
            return rec | {"discarded_busy": discarded}
        discarded.append({k: rec.get(k) for k in ("wall", "peak_pss", "foreign_cpu", "ok")})
        wait_until_idle(args.idle_wait)


def wait_until_idle(limit):
    """Wait up to `limit` s for a 0.5 s window with the machine's CPUs under BUSY use."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if psutil.cpu_percent(interval=0.5) < BUSY * 100:
            return


def make_spec(args, w, name, n, chunk, rounds):
    return {"workload": w.name, "contender": name, "n": n, "chunk": chunk, "rounds": rounds,
            "workers": args.workers, "start_method": args.start_method, "smoke": args.smoke,
            "big": args.big, "mpbatch_from": str(args.mpbatch), "max_bytes": args.max_bytes}


def candidates(args, w, name):
    """Chunk sizes to try for `name` on `w`; the first is used when there is no sweep."""
    kind = contenders.kind(name)
    if kind == "serial":
        return [None]
    if w.paced:
        return [1]  # latency: one item per task (peers) and size=1 (mpbatch)
    if args.chunksize:
        return list(args.chunksize)
    listed = list(w.sizes if kind == "mpbatch" else w.chunks)
    middle = listed.pop(len(listed) // 2)  # the no-sweep default: the middle of the list
    extra = ["auto"] if name == "joblib" else []  # joblib's default is what most users keep
    return [middle, *listed, *extra]


def sweep(args, w, names, rounds, log, cache):
    """Quick pre-pass: each contender's best chunk size on a smaller stream of the same kind.

    Every candidate runs w.sweep_rounds times, the rounds interleaved (A B C A B C), and keeps
    its fastest run: one run each picked W2's size from candidates that a slow second of this
    VM put within a few percent of each other, and the pick cost 10 % on the full stream.
    `cache` keeps the choices per (items, function): MEM streams W1's items through W1's
    function, so it reuses W1's choices instead of sweeping again.
    """
    chosen, trials = {}, {}
    known = cache.setdefault((w.items.__name__, w.fn.__name__, w.paced), {})
    for name in names:
        options = candidates(args, w, name)
        if len(options) == 1 or not w.sweep_n or args.no_sweep:
            chosen[name] = options[0]
            continue
        if name in known:
            chosen[name] = known[name]
            continue
        walls = {chunk: [] for chunk in options}
        for _ in range(w.sweep_rounds):
            for chunk in options:
                rec = measure_quietly(args, make_spec(args, w, name, w.sweep_n, chunk, rounds))
                walls[chunk].append(rec["wall"] if rec["ok"] else float("inf"))
                log(f"  sweep {w.name} {name:17} chunk={chunk!s:>6}: "
                    f"{fmt_run(rec, w.sweep_n, w.value_bytes)}")
        best = {chunk: min(times) for chunk, times in walls.items()}
        chosen[name] = known[name] = min(best, key=best.get)
        trials[name] = {str(k): v for k, v in walls.items()}
    return chosen, trials


def or_dash(value, spec):
    """``value`` formatted by ``spec``, or "-" where it was not measured (a table cell)."""
    return "-" if value is None else format(value, spec)


def fmt_run(rec, n, value_bytes=0):
    if not rec["ok"]:
        return f"FAILED {rec.get('error')}"
    text = f"{rec['wall']:7.2f} s {n / rec['wall']:>10,.0f} items/s"
    if value_bytes:
        text += f" {n * value_bytes / MB / rec['wall']:7,.0f} MB/s"
    if rec["peak_pss"] is not None:
        text += f"  PSS {rec['peak_pss'] / MB:6.0f} MB"
    extra = rec.get("extra", {})
    if "p99_ms" in extra:
        text += f"  p50 {extra['p50_ms']:.2f} ms  p99 {extra['p99_ms']:.2f} ms"
    if busy(rec):
        text += f"  BUSY: {rec['foreign_cpu']:.0%} of the CPUs ran other work"
    if rec.get("discarded_busy"):
        text += f"  ({len(rec['discarded_busy'])} busy attempts discarded)"
    if rec["leftovers"]:
        text += f"  LEFTOVER {rec['leftovers']}"
    return text


def rotated(names, rep):
    """Repeat ``rep``'s order: ``names`` turned by ``rep`` places. With one fixed order a
    contender always ran after the same ones, at the same point of minutes of full load:
    whatever that costs on a shared VM went to the same contender every repeat."""
    k = rep % len(names) if names else 0
    return names[k:] + names[:k]


def repeats_of(args, w):
    """Measured runs of each contender on ``w``: --repeats, or the workload's least."""
    return args.repeats if args.smoke else max(args.repeats, w.min_repeats)


def run_workload(args, w, names, rounds, log, cache):
    """Sweep, then the measured repeats, interleaved and turned: A B C, B C A, C A B ..."""
    chosen, trials = sweep(args, w, names, rounds, log, cache)
    records = []
    repeats = repeats_of(args, w)
    for rep in range(repeats):
        for name in rotated(names, rep):
            rec = measure_quietly(args, make_spec(args, w, name, w.n, chosen[name], rounds))
            rec |= {"contender": name, "repeat": rep, "chunk": chosen[name]}
            records.append(rec)
            log(f"{w.name} {rep + 1}/{repeats} {name:17} chunk={chosen[name]!s:>6}: "
                f"{fmt_run(rec, w.n, w.value_bytes)}")
    return chosen, trials, records


# --- scoring ------------------------------------------------------------------------------------


def summarize(args, w, names, records):
    """Medians per contender, the workload's scores, and ratios to the best peer's median."""
    rows = {}
    for name in names:
        runs = [r for r in records if r["contender"] == name]
        ok = [r for r in runs if r["ok"]]
        row = {"kind": contenders.kind(name), "chunk": runs[0]["chunk"], "runs": len(runs),
               "runs_ok": len(ok), "runs_busy": sum(busy(r) for r in runs)}
        if not ok:
            rows[name] = row | {"error": runs[0].get("error")}
            continue
        walls = [r["wall"] for r in ok]
        row |= {"wall_s": statistics.median(walls), "walls": walls,
                "items_per_s": w.n / statistics.median(walls)}
        if w.value_bytes:  # values moved end to end, MB = 2**20 bytes
            row["mb_per_s"] = w.n * w.value_bytes / MB / statistics.median(walls)
        if ok[0]["peak_pss"] is not None:  # W4 does not sample memory
            row["peak_pss_mb"] = statistics.median(r["peak_pss"] for r in ok) / MB
        if "caller_rss_peak" in ok[0]:
            row["caller_rss_growth_mb"] = statistics.median(
                r["caller_rss_peak"] - r["caller_rss_start"] for r in ok) / MB
        for key in ("p50_ms", "p99_ms"):
            if key in ok[0].get("extra", {}):
                row[key] = statistics.median(r["extra"][key] for r in ok)
        rows[name] = row
    serial = rows.get("serial", {}).get("wall_s")
    estimated = serial is None
    if estimated:  # no serial run: the calibrated cost of the work instead
        serial = w.n * w.units_per_item * workloads.UNIT_SECONDS
    ideal = serial / args.workers
    for row in rows.values():
        if "wall_s" in row and ideal > 0:
            row["efficiency"] = ideal / row["wall_s"]
            row["wall_over_ideal"] = row["wall_s"] / ideal
    add_ratios(rows, SCORES[w.name] + [("peak_pss_mb", "peak PSS MB", False)])
    add_paired(rows, records, SCORES[w.name][0], lambda metric, rec: run_score(
        metric, rec, w, ideal))
    against_ratio(rows, SCORES[w.name][0][0], AGAINST.get(w.name))
    return {"serial_compute_s": serial, "serial_estimated": estimated, "ideal_s": ideal,
            "rows": rows}


def add_ratios(rows, metrics):
    """row[metric + '_ratio'] = the row's median over the best peer's median."""
    for metric, _, higher in metrics:
        peers = [r[metric] for r in rows.values() if r["kind"] == "peer" and metric in r]
        if not peers:
            continue
        best = max(peers) if higher else min(peers)
        for row in rows.values():
            if metric in row and best:
                row[metric + "_ratio"] = row[metric] / best


def run_score(metric, rec, w, ideal):
    """One run's value of ``metric``, the per-run counterpart of a row's median; None for
    a failed run."""
    if not rec["ok"]:
        return None
    per_wall = {"items_per_s": w.n, "mb_per_s": w.n * w.value_bytes / MB, "efficiency": ideal}
    if metric in per_wall:
        return per_wall[metric] / rec["wall"]
    if metric == "wall_over_ideal":
        return rec["wall"] / ideal
    if metric == "peak_pss_mb":
        return None if rec["peak_pss"] is None else rec["peak_pss"] / MB
    return rec.get("extra", {}).get(metric)


def add_paired(rows, records, score, value):
    """row[metric + '_paired'] = [median, min, max] over the repeats of the row's run
    divided by the best peer's run of the same repeat (``value(metric, record)``).

    The repeats are interleaved, so the two runs of a pair met the same phase of the
    machine: this VM's speed drifts by 10 % and more within minutes, which the ratio of
    two medians carries whole, and the range shows how far a single pair strays."""
    metric, _, higher = score
    peers = [name for name, r in rows.items() if r["kind"] == "peer" and metric in r]
    if not peers:
        return
    pick = max if higher else min
    best = pick(peers, key=lambda name: rows[name][metric])
    runs = {(rec["contender"], rec["repeat"]): value(metric, rec) for rec in records}
    repeats = sorted({rec["repeat"] for rec in records})
    for name, row in rows.items():
        ratios = [runs[name, rep] / runs[best, rep] for rep in repeats
                  if runs.get((name, rep)) is not None and runs.get((best, rep))]
        if ratios:
            row[metric + "_paired"] = [statistics.median(ratios), min(ratios), max(ratios)]


def against_ratio(rows, metric, name):
    """row[metric + '_vs_' + name] = the row's median over contender `name`'s."""
    bar = rows.get(name, {}).get(metric)
    if not bar:
        return
    for row in rows.values():
        if metric in row:
            row[f"{metric}_vs_{name}"] = row[metric] / bar


def fmt_value(metric, value):
    if metric in ("items_per_s", "mb_per_s"):
        return f"{value:,.0f}"
    return f"{value:.2f}" if metric in ("efficiency", "wall_over_ideal") else f"{value:.1f}"


def workload_table(w, summary):
    """Markdown: one row per contender, every score with its ratio to the best peer."""
    metrics = SCORES[w.name] + ([] if w.name.startswith("MEM") else
                                [("peak_pss_mb", "peak PSS MB", False)])
    against = AGAINST.get(w.name)
    head = ["contender", "chunk", "wall s"]
    for i, (_, label, higher) in enumerate(metrics):
        head += [label, f"÷ best peer ({'higher' if higher else 'lower'} is better)"]
        if i == 0:
            head.append("÷ best peer, per repeat: median (range)")
        if i == 0 and against:
            head.append(f"÷ {against}")
    if w.name in CALLER_RSS:
        head.append("caller RSS growth MB")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in summary["rows"].items():
        if "wall_s" not in row:
            cells = [name, str(row["chunk"] or "-"), f"failed: {row.get('error')}"]
            lines.append("| " + " | ".join(cells + [""] * (len(head) - 3)) + " |")
            continue
        cells = [name, str(row["chunk"] or "-"), f"{row['wall_s']:.2f}"]
        for i, (metric, _, _) in enumerate(metrics):
            cells.append(fmt_value(metric, row[metric]) if metric in row else "-")
            ratio = row.get(metric + "_ratio")
            cells.append(f"{ratio:.2f}" if ratio is not None else "-")
            if i == 0:
                paired = row.get(metric + "_paired")
                cells.append(f"{paired[0]:.2f} ({paired[1]:.2f}-{paired[2]:.2f})"
                             if paired else "-")
            if i == 0 and against:
                ratio = row.get(f"{metric}_vs_{against}")
                cells.append(f"{ratio:.2f}" if ratio is not None else "-")
        if w.name in CALLER_RSS:
            growth = row.get("caller_rss_growth_mb")
            cells.append(f"{growth:.1f}" if growth is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def overview_table(done):
    """Markdown: contenders by workload, each cell the headline score (ratio to best peer)."""
    names = list(dict.fromkeys(n for _, s in done for n in s["rows"]))
    head = ["contender"] + [f"{w.name} {SCORES[w.name][0][1]}" for w, _ in done]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        cells = [name]
        for w, s in done:
            metric = SCORES[w.name][0][0]
            row = s["rows"].get(name, {})
            if metric not in row:
                cells.append("failed" if name in s["rows"] else "")
                continue
            ratio = row.get(metric + "_ratio")
            cells.append(fmt_value(metric, row[metric])
                         + (f" ({ratio:.2f}x)" if ratio is not None else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- output -------------------------------------------------------------------------------------


def environment(args, rounds):
    versions = {}
    for module in ("joblib", "mpire", "psutil", "cloudpickle", "mpbatch"):
        try:
            versions[module] = importlib.metadata.version(module)
        except importlib.metadata.PackageNotFoundError:  # mpbatch run from the checkout
            versions[module] = "checkout" if module == "mpbatch" else "not installed"
    return {"python": sys.version.split()[0], "platform": platform.platform(),
            "commit": _git("rev-parse", "--short", "HEAD"),
            # the checkout measured (--mpbatch), which need not be this one
            "mpbatch_commit": _git("rev-parse", "--short", "HEAD", cwd=args.mpbatch),
            "mpbatch_dirty": bool(_git("status", "--porcelain", "--", "mpbatch",
                                       cwd=args.mpbatch)),
            "mpbatch_from": str(args.mpbatch), "mpbatch_digest": mpbatch_digest(args),
            "cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
            "versions": versions, "rounds_per_unit": rounds,
            "unit_seconds": workloads.UNIT_SECONDS, "argv": sys.argv[1:],
            "start_method": args.start_method, "workers": args.workers}


def mpbatch_digest(args):
    """A hash of mpbatch's sources: a run that straddles an edit of the library shows it."""
    digest = hashlib.sha256()
    for path in sorted((args.mpbatch / "mpbatch").rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def py_spy():
    """The py-spy executable, or None: the running venv's own first (a venv's python run by
    its path puts nothing of the venv on PATH), then PATH."""
    return shutil.which("py-spy", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                        os.environ.get("PATH", "")]))


def frame_label(frame):
    """A py-spy frame, 'func (path/to/file.py:12)', as 'func (file.py)': lines merged per
    function (ray_backend.py's and profiles.py's profiles)."""
    name, _, where = frame.partition(" (")
    return f"{name} ({os.path.basename(where.split(':')[0])})" if where else name


def _git(*argv, cwd=ROOT):
    """Read-only git facts for the record (the commit measured); '' outside a checkout."""
    try:
        done = subprocess.run(["git", *argv], cwd=cwd, capture_output=True, text=True,
                              timeout=10, check=False)
    except OSError:
        return ""
    return done.stdout.strip()


def stem(args):
    day = datetime.date.today().isoformat()
    return f"{day}-smoke" if args.smoke else day


def write_json(args, w, env, chosen, trials, records, summary):
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{stem(args)}-{w.name}.json"
    doc = {"workload": w.name, "title": w.title, "n": w.n, "repeats": repeats_of(args, w),
           "environment": env, "chunks": chosen, "sweep": trials, "summary": summary,
           "table_md": workload_table(w, summary), "runs": records}
    path.write_text(json.dumps(doc, indent=1, default=repr))
    return path


def chart(args, done):
    """One bar chart per workload: each contender's median headline score, labelled."""
    import matplotlib

    matplotlib.use("Agg")  # no display on CI or this machine
    import matplotlib.pyplot as plt

    colors = {"serial": "#999999", "peer": "#4c78a8", "reference": "#54a24b",
              "mpbatch": "#f58518"}
    cols = min(3, len(done))
    rows = -(-len(done) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(done):]:
        ax.set_visible(False)
    for ax, (w, s) in zip(axes.flat, done, strict=False):
        metric, label, higher = SCORES[w.name][0]
        bars = [(n, r) for n, r in s["rows"].items() if metric in r]
        values = [r[metric] for _, r in bars]
        ax.barh([n for n, _ in bars], values, color=[colors[r["kind"]] for _, r in bars])
        for y, value in enumerate(values):
            ax.text(value, y, " " + fmt_value(metric, value), va="center", fontsize=7)
        if max(values, default=0) > 20 * min(values, default=1):
            ax.set_xscale("log")  # W4's and W1's spreads hide the small bars on a linear axis
        ax.invert_yaxis()
        ax.set_title(f"{w.name} {label} ({'higher' if higher else 'lower'} is better)",
                     fontsize=9)
        ax.tick_params(labelsize=8)
    fig.suptitle(f"mpbatch benchmarks, {args.workers} workers, {stem(args)} (medians)",
                 fontsize=10)
    fig.tight_layout()
    names = [w.name for w, _ in done]
    partial = "" if names == DEFAULT_WORKLOADS else "-" + "-".join(names)
    path = RESULTS / f"{stem(args)}{partial}.png"  # a partial run keeps the full run's chart
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- command line -------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny run of everything, 1 repeat")
    p.add_argument("--workloads", type=lambda s: s.split(","), help="e.g. W1,W2 (default all)")
    p.add_argument("--only", type=lambda s: s.split(","), help="contenders, e.g. pool,serial")
    p.add_argument("--repeats", type=int,
                   help="measured runs per contender (default 3; W1-W3: at least 11)")
    p.add_argument("--chunksize", type=lambda s: [int(x) for x in s.split(",")],
                   help="chunk sizes to sweep instead of each workload's list; one: no sweep")
    p.add_argument("--no-sweep", action="store_true", help="use each list's middle value")
    p.add_argument("--big", action="store_true", help="also MEM10M: 10M items")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--start-method", choices=["fork", "spawn", "forkserver"],
                   help="for Pool, ProcessPoolExecutor, mpire and mpbatch (joblib: loky)")
    p.add_argument("--timeout", type=float, help="s per run before it is killed")
    p.add_argument("--retry-busy", type=int, metavar="N",
                   help="measure a run again, up to N times, when other work shared the CPUs"
                        " (default 2; 0 with --smoke)")
    p.add_argument("--idle-wait", type=float, default=60, metavar="S",
                   help="before such a retry, wait up to S s for the machine to go idle")
    p.add_argument("--rounds", type=int,
                   help="sha256 rounds per ~100 us unit, instead of calibrating (to repeat a run)")
    p.add_argument("--max-bytes", type=int, metavar="BYTES",
                   help="pass max_bytes=BYTES to every mpbatch Batcher (default: not passed)")
    p.add_argument("--mpbatch", type=Path, default=ROOT, metavar="DIR",
                   help="import mpbatch from DIR/mpbatch (default: this checkout), e.g. a"
                        " snapshot of one commit while the checkout is being edited")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.repeats = args.repeats or (1 if args.smoke else 3)
    args.timeout = args.timeout or (60 if args.smoke else 1200)
    if args.retry_busy is None:
        args.retry_busy = 0 if args.smoke else 2
    return args


def mpbatch_importable(args):
    # Bytecode, as an installed package has it: where PYTHONDONTWRITEBYTECODE is set, every
    # run (its caller, a fork server, each spawned worker) would otherwise compile mpbatch
    # from source, ~0.1 s apiece, while the peers load their bytecode.
    compileall.compile_dir(str(Path(args.mpbatch) / "mpbatch"), quiet=1)
    sys.path.insert(0, str(args.mpbatch))
    try:
        importlib.import_module("mpbatch").Batcher  # noqa: B018 - the check is the lookup
    except Exception as exc:  # any failure means: not ready yet
        return f"{type(exc).__name__}: {exc}"
    return None


def plan(args, table, log):
    """[(workload, contender names)] for this invocation."""
    chosen = args.workloads or list(table)
    unknown = [n for n in chosen if n not in table]
    if unknown:
        sys.exit(f"unknown workload(s) {unknown}; known: {list(table)}")
    if args.big and "MEM10M" not in chosen:
        chosen.append("MEM10M")
    strangers = [n for n in args.only or () if n not in contenders.CONTENDERS]
    if strangers:
        sys.exit(f"unknown contender(s) {strangers}; known: {list(contenders.CONTENDERS)}")
    defaults = {"MEM": MEM_CONTENDERS, "MEM10M": MEM10M_CONTENDERS, "DK": DK_CONTENDERS,
                "W1": W1_CONTENDERS}
    broken = mpbatch_importable(args)
    if broken and not args.only:
        log(f"mpbatch is not importable ({broken}); running without it")
    out = []
    for name in chosen:
        names = args.only or [n for n in defaults.get(name, OTHER_CONTENDERS)
                              if not (broken and contenders.kind(n) == "mpbatch")]
        # The pipe floor moves bytes values only: it sits out W1-W4, MEM and DK; a contender
        # with no paced form sits out W4.
        out.append((table[name], [n for n in names if contenders.applies(n, table[name])]))
    return out


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return child_main(json.loads(args.child))
    started = time.monotonic()

    def log(text):
        print(f"[{time.monotonic() - started:6.0f}s] {text}", flush=True)

    table = workloads.workloads(args.smoke, args.big)
    todo = plan(args, table, log)
    rounds = args.rounds or workloads.calibrate()
    env = environment(args, rounds)
    log(f"{rounds} sha256 rounds = {workloads.UNIT_SECONDS * 1e6:.0f} us; "
        f"versions {env['versions']}")
    done, cache = [], {}
    for w, names in todo:
        log(f"== {w.name}: {w.title} ({w.n:,} items) — {', '.join(names)}")
        chosen, trials, records = run_workload(args, w, names, rounds, log, cache)
        summary = summarize(args, w, names, records)
        path = write_json(args, w, env, chosen, trials, records, summary)
        done.append((w, summary))
        print(f"\n{w.name}: {w.title}\n{workload_table(w, summary)}\n(wrote {path})\n")
    print("Overview: headline score (ratio to the best peer)\n" + overview_table(done))
    crowded = sum(r["runs_busy"] for _, s in done for r in s["rows"].values())
    if crowded:
        log(f"WARNING: {crowded} runs shared the machine with other work (BUSY above); rerun "
            "on a quiet machine before trusting small differences")
    if mpbatch_digest(args) != env["mpbatch_digest"]:
        log("WARNING: mpbatch's sources changed during this run; its numbers mix two versions")
    try:
        log(f"chart: {chart(args, done)}")
    except ImportError:  # CI's smoke run installs only the test extra
        log("chart: skipped, matplotlib is not installed (pip install -e '.[bench]')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
