"""backend="ray" against the local backend (backend="process"), interleaved in one run.

    scripts/offline-ray python benchmarks/ray_backend.py --mpbatch /tmp/snapR   # ~3 min
    scripts/offline-ray python benchmarks/ray_backend.py --quick                # smoke, 1 repeat
    scripts/offline-ray python benchmarks/ray_backend.py --mpbatch /tmp/snapR \\
        --profile "W1 ray add_many,W1 ray add" --profile-dir /tmp/rayprof      # py-spy, pushes

Only under scripts/offline-ray (a loopback-only network namespace, no usage stats, a private
HOME and RAY_TMPDIR): without MPBATCH_OFFLINE_RAY=1, or with any network interface but lo,
this refuses to run (exit 2). It never calls `ray stop` and never joins address="auto".

Workloads (workloads.py, 2 workers):
  W2  CPU-bound: 20,000 items over 100 keys, ~100 us of chained sha256 each (calibrated once,
      here); score items/s and efficiency = (serial wall / 2) / wall, the serial loop
      measured in the same run. Target: Ray >= 0.8 x local.
  W1  tiny items: 1,000,000 keyed items (key f"k{i % 100}", value i, do returns v * 2);
      score items/s. Target: Ray add_many >= 0.5 x local add_many.
Contenders: local (backend="process") add_many and add, Ray add_many and add, and on W2 the
serial loop; each Batcher is the one contenders.py makes (size=, interval=0.05,
buffer=max(10_000, size), on_result), with the size= run.py's latest sweep chose.

How it runs. Two long-lived session processes (this file with --session): "local", which
starts no Ray and keeps one thread between runs, so its Batchers resolve to the zygote as in
run.py's children; and "ray", which calls ray.init(address="local", num_cpus=2, ...) once
(timed: that is the start-up figure, with the first Batcher's cold start, both outside every
throughput figure); its Batchers reuse that Ray (address=None). For each repeat every
contender runs once, in an order rotated by one each repeat. A run: Batcher(...), start(),
wait until every worker reported ready, one warm batch per worker through and back (not
timed); then the timed region: the items (generated inside it, as in run.py) through
add_many or add(block=True), then flush(); then close() (timed apart).

This process drives the sessions over a pipe and samples the running session's process
tree: PSS of the caller and its workers (local) or its actors (ray::RayWorker) every
--sample-period s, and of Ray's other processes (gcs_server, raylet, agents, idle workers)
every --cold-period s (reading a Ray process's PSS costs ~1.4 ms of CPU: the whole Ray tree
every 20 ms would take ~70 % of a vCPU). Memory is the peak from Batcher() to the end of
flush(): of the caller's tree (the Ray session's includes every Ray process) and, for Ray,
of the Ray processes alone. CPU seconds per process class over the timed region come from
/proc at its two ends (the session waits for the driver's word before it starts the clock
and before it closes the Batcher, so both readings see every worker alive); a run where
other work took > 10 % of the machine (and 0.3 CPU s) is flagged BUSY and measured again
once the machine is idle (--retry-busy), as in run.py.

Writes results/<date>-RAY.json and results/<date>-RAY.md (--quick: <date>-smoke-RAY.*,
which results/.gitignore keeps out of git; --tag T: <date>-RAY-T.*) and prints the table.
--profile runs the named contenders once each instead, with py-spy recording the caller and
each worker over the timed region, CPU per thread, and push/pull counts taken from the Ray
pool (wrapped instance methods), and writes the profiles and a summary to --profile-dir.
"""

import argparse
import collections
import compileall
import contextlib
import datetime
import gc
import importlib
import importlib.metadata
import json
import os
import platform
import queue
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import workloads
from contenders import MPBATCH_INTERVAL as INTERVAL
from contenders import Tally
from run import (
    BUSY,
    BUSY_SECONDS,
    HERE,
    MB,
    RESULTS,
    ROOT,
    frame_label,
    mpbatch_digest,
    or_dash,
    py_spy,
    wait_until_idle,
)

WORKERS = 2
# size= per (workload, call): the sizes run.py's sweep chose on 2026-12-06 (README)
SIZES = {("W1", "add_many"): 5000, ("W1", "add"): 2000,
         ("W2", "add_many"): 50, ("W2", "add"): 200}
N = {"W1": 1_000_000, "W2": 20_000}
QUICK_N = {"W1": 50_000, "W2": 2000}
# Ray / local, the backend's targets: W2 both calls against local's same call; W1 Ray add_many
# against local add_many
GOALS = {("W2", "ray add_many / local add_many"): 0.8, ("W2", "ray add / local add"): 0.8,
         ("W1", "ray add_many / local add_many"): 0.5}
RAY_INIT = {"address": "local", "num_cpus": WORKERS, "include_dashboard": False,
            "object_store_memory": 256 << 20, "_node_ip_address": "127.0.0.1"}
READY_WAIT = 120.0  # s a run waits for its workers' first reports
TAG = "RB "  # the sessions' messages on their protocol pipe
ACTOR_TITLE = "ray::RayWorker"  # an mpbatch actor's process title


def contenders(workload):
    """(name, backend, how) in the order of the first repeat."""
    rows = [("local add_many", "process", "add_many"), ("local add", "process", "add"),
            ("ray add_many", "ray", "add_many"), ("ray add", "ray", "add")]
    if workload == "W2":
        rows.insert(0, ("serial", "process", "serial"))
    return rows


def refuse_unless_offline():
    """Exit 2 unless this runs under scripts/offline-ray, in its loopback-only namespace."""
    why = None
    if os.environ.get("MPBATCH_OFFLINE_RAY") != "1":
        why = "MPBATCH_OFFLINE_RAY=1 is not set"
    else:
        names = {name for _, name in socket.if_nameindex()}
        if names != {"lo"}:
            why = f"network interfaces other than lo are up ({sorted(names)})"
    if why:
        print(f"ray_backend.py starts Ray and must run under scripts/offline-ray ({why}):\n"
              f"  cd {ROOT} && scripts/offline-ray python benchmarks/ray_backend.py "
              f"[--mpbatch DIR]", file=sys.stderr)
        sys.exit(2)


# === the session: one long-lived process per backend ========================================


class Session:
    """The session process's side: messages to the driver, commands from stdin."""

    def __init__(self, kind, fd):
        self.kind, self.fd = kind, fd

    def say(self, tag, **payload):
        os.write(self.fd, (TAG + json.dumps({"tag": tag, **payload}, default=repr)
                           + "\n").encode())

    def main(self):
        import mpbatch
        import mpbatch.batcher  # its names load lazily (PEP 562): imported before timing

        info = {"pid": os.getpid(), "mpbatch_file": mpbatch.__file__}
        if self.kind == "ray":
            import ray

            started = time.perf_counter()
            ray.init(**RAY_INIT)
            info["ray_init_s"] = time.perf_counter() - started
            info["ray_version"] = ray.__version__
            where = ray.remote(_where).options(num_cpus=1)
            info["actor_side"] = ray.get(where.remote())
        info["first"] = self.first_batcher()
        self.say("READY", **info)
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["op"] == "quit":
                break
            try:
                self.say("RESULT", **self.run(cmd))
            except BaseException as exc:  # reported, and the session goes on
                import traceback

                traceback.print_exc()
                self.say("RESULT", error=f"{type(exc).__name__}: {exc}")
        if self.kind == "ray":
            import ray

            ray.shutdown()
        self.say("BYE")

    def batcher(self, do, size, on_result):
        import mpbatch

        backend = "ray" if self.kind == "ray" else "process"
        return mpbatch.Batcher(do, size=size, interval=INTERVAL, workers=WORKERS,
                               buffer=max(10_000, size), on_result=on_result,
                               backend=backend)

    def first_batcher(self):
        """The session's first Batcher: cold start (Ray: actors from nothing), timed apart."""
        tally = Tally()
        started = time.perf_counter()
        b = self.batcher(workloads.do_double, 100, tally.on_result).start()
        wait_ready(b)
        ready = time.perf_counter() - started
        b.add_many((f"k{i}", i) for i in range(2 * 100))
        b.flush()
        through = time.perf_counter() - started
        b.close()
        return {"start_to_ready_s": ready, "start_to_first_batches_s": through,
                "close_s": time.perf_counter() - started - through,
                "ok": tally.count == 200}

    def run(self, cmd):
        w, how, n, rounds = cmd["workload"], cmd["how"], cmd["n"], cmd["rounds"]
        items = workloads.overhead_items if w == "W1" else workloads.cpu_items
        tally = Tally()
        if how == "serial":
            self.say("PHASE", phase="warm")
            gc.collect()
            self.timed_start(cmd, [])
            cpu, started = time.process_time(), time.perf_counter()
            for _, value in items(n, rounds):
                tally.add(workloads.spin(value))
            wall, cpu = time.perf_counter() - started, time.process_time() - cpu
            self.timed_end()
            return {"wall_s": wall, "caller_cpu_s": cpu, "count": tally.count,
                    "total": tally.total, "caller_threads_cpu_s": self.threads_cpu}
        do = workloads.do_double if w == "W1" else workloads.do_spin
        size = cmd["size"]
        self.say("PHASE", phase="warm")
        started = time.perf_counter()
        b = self.batcher(do, size, tally.on_result).start()
        wait_ready(b)
        ready = time.perf_counter() - started
        # One batch per worker (least-loaded routing sends the second to the idle one),
        # through and back: the first push to each actor is not timed. Index -1-j, no work.
        warm = [(f"k{j % workloads.KEYS}", -1 - j if w == "W1" else (-1 - j, 0))
                for j in range(WORKERS * size)]
        b.add_many(warm)
        b.flush()
        warm_s = time.perf_counter() - started
        tally.count = tally.total = 0
        counts = count_pushes(b) if cmd.get("count_pushes") else None
        gc.collect()
        self.timed_start(cmd, worker_pids(b))
        cpu, started = time.process_time(), time.perf_counter()
        if how == "add_many":
            b.add_many(items(n, rounds))
        else:
            add = b.add
            for key, value in items(n, rounds):
                add(key, value, block=True)
        b.flush()
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
        self.timed_end()
        stats = b.stats()
        closing = time.perf_counter()
        b.close()
        out = {"wall_s": wall, "caller_cpu_s": cpu, "count": tally.count,
               "total": tally.total, "start_to_ready_s": ready, "warm_s": warm_s,
               "close_s": time.perf_counter() - closing,
               "batches": stats.batches, "worker_restarts": stats.worker_restarts,
               "caller_threads_cpu_s": self.threads_cpu,
               "start_method": getattr(getattr(b, "_pool", None), "start_method", None)}
        if counts is not None:
            out["pushes"] = dict(counts)
        return out

    def timed_start(self, cmd, pids):
        """Say the timed region is about to start, and wait for the driver's go: it reads
        the CPU times of every process first (and in a profile run, its py-spy attaches)."""
        del cmd
        self.say("PHASE", phase="timed", workers=pids)
        self.expect("go")
        self.threads_before = thread_cpu(os.getpid(), own=True)

    def timed_end(self):
        """Say the timed region ended, and wait until the driver has read the CPU times
        again: close() would end the local workers before it could."""
        self.threads_cpu = cpu_by_name(self.threads_before,
                                       thread_cpu(os.getpid(), own=True))
        self.say("PHASE", phase="flushed")
        self.expect("close")

    def expect(self, op):
        line = sys.stdin.readline()
        if json.loads(line)["op"] != op:
            raise RuntimeError(f"expected {op!r} from the driver, got {line!r}")


def thread_cpu(pid, own=False):
    """{thread id: (name, CPU s)} of a process, from /proc: the Python name of each thread
    when `own` (this process), else the OS name (Ray's C++ threads name themselves; a
    Python thread carries the process's)."""
    names = {t.native_id: t.name for t in threading.enumerate()} if own else {}
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        out[int(tid)] = (names.get(int(tid), comm), (int(fields[11]) + int(fields[12])) / tick)
    return out


def cpu_by_name(before, after):
    """CPU s per thread name between two thread_cpu() readings (a thread born between them
    counts from 0), largest first; names that differ only in a worker's index are kept
    apart."""
    total = collections.Counter()
    for tid, (name, cpu) in after.items():
        total[name] += cpu - before.get(tid, (name, 0.0))[1]
    return {name: round(cpu, 3) for name, cpu in total.most_common() if cpu > 0}


def _where():
    """In a Ray worker process: where it imports mpbatch and the workloads from."""
    import mpbatch

    return {"mpbatch_file": mpbatch.__file__, "workloads_file": workloads.__file__,
            "pid": os.getpid()}


def wait_ready(b):
    """Until every worker sent its first report (READY); the pool's flags are private, so
    they are read defensively."""
    deadline = time.monotonic() + READY_WAIT
    while not all(getattr(getattr(b, "_pool", None), "ready", [True])):
        if time.monotonic() > deadline:
            raise TimeoutError(f"workers not ready after {READY_WAIT:.0f} s")
        time.sleep(0.005)


def worker_pids(b):
    pool = getattr(b, "_pool", None)
    return [getattr(p, "pid", None) for p in getattr(pool, "procs", ())]


def count_pushes(b):
    """--profile: count what the Ray pool does, by wrapping four of its methods on this
    instance (its threads look them up on every call): frames queued (send), ray.get calls
    (_get: one per push and one per pull), pulls (_pull) and the bytes pulls brought back
    (_forward). Pushes = gets - pulls; bytes pushed = bytes queued."""
    pool = getattr(b, "_pool", None)
    counts = collections.Counter()
    if not all(hasattr(pool, name) for name in ("send", "_get", "_pull", "_forward")):
        return counts
    send, get, pull, forward = pool.send, pool._get, pool._pull, pool._forward
    lock = threading.Lock()

    def sending(i, frame):
        size = sum(map(len, frame)) if isinstance(frame, list) else len(frame)
        with lock:
            counts["frames_queued"] += 1
            counts["bytes_queued"] += size
        return send(i, frame)

    def getting(ref, *rest):
        with lock:
            counts["gets"] += 1
        return get(ref, *rest)

    def pulling(slot, proc):
        with lock:
            counts["pulls"] += 1
        return pull(slot, proc)

    def forwarding(slot, proc, data, snapshot):
        with lock:
            counts["pulled_bytes"] += len(data)
            counts["pulls_with_data"] += bool(data)
        return forward(slot, proc, data, snapshot)

    pool.send, pool._get, pool._pull, pool._forward = sending, getting, pulling, forwarding
    return counts


# === the driver ================================================================================


class Child:
    """The driver's handle on one session process."""

    def __init__(self, kind, args, log_dir):
        self.kind = kind
        self.args = args
        read_fd, write_fd = os.pipe()
        env = os.environ | {"PYTHONPATH": os.pathsep.join(
            x for x in (str(args.mpbatch), str(HERE), os.environ.get("PYTHONPATH")) if x)}
        self.log_path = Path(log_dir) / f"session-{kind}.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in end()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--session", kind,
               "--session-fd", str(write_fd), "--mpbatch", str(args.mpbatch)]
        # cwd: DIR, as run.py does (a forkserver would find mpbatch there first)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=self.log,
                                     stderr=subprocess.STDOUT, text=True, cwd=args.mpbatch,
                                     env=env, pass_fds=(write_fd,))
        os.close(write_fd)
        self.root = psutil.Process(self.proc.pid)
        self.seen = {self.proc.pid: self.root}  # every process ever seen in its tree
        self.inbox = queue.Queue()
        threading.Thread(target=self._read, args=(read_fd,), daemon=True).start()

    def _read(self, fd):
        with open(fd, encoding="utf-8") as lines:
            for line in lines:
                if line.startswith(TAG):
                    self.inbox.put(json.loads(line[len(TAG):]))
        self.inbox.put({"tag": "EOF"})

    def send(self, **cmd):
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def next(self, deadline):
        """The session's next message; a TIMEOUT or EXIT message when there is none."""
        while True:
            try:
                return self.inbox.get(timeout=max(0.05, min(1.0, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() > deadline:
                    return {"tag": "TIMEOUT"}
                if self.proc.poll() is not None and self.inbox.empty():
                    return {"tag": "EXIT", "code": self.proc.returncode}

    def tree(self):
        """[(process, class)]: "caller", "workers" (local workers and the zygote; Ray's
        mpbatch actors), "ray" (Ray's other processes) or "other" (the resource tracker)."""
        try:
            procs = self.root.children(recursive=True)
        except psutil.Error:
            return []
        out = [(self.root, "caller")]
        for p in procs:
            self.seen.setdefault(p.pid, p)
            try:
                line = " ".join(p.cmdline())
            except psutil.Error:
                continue
            if self.kind == "local":
                out.append((p, "other" if "resource_tracker" in line else "workers"))
            elif line.startswith(ACTOR_TITLE):
                out.append((p, "workers"))
            else:
                out.append((p, "ray" if "ray" in line else "other"))
        return out

    def log_tail(self, chars=3000):
        with contextlib.suppress(OSError):
            return self.log_path.read_text()[-chars:]
        return ""

    def end(self, timeout):
        """Ask the session to quit (Ray: ray.shutdown()), then kill what is left of its
        tree, and only of its tree; the leftovers are returned."""
        bye = None
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                self.send(op="quit")
                self.proc.stdin.close()
            deadline = time.monotonic() + timeout
            while (msg := self.next(deadline))["tag"] not in ("BYE", "EOF", "EXIT", "TIMEOUT"):
                pass
            bye = msg["tag"]
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        leftovers = []
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            alive = [p for p in self.seen.values() if _alive(p)]
            if not alive:
                break
            time.sleep(0.1)
        for p in self.seen.values():
            if _alive(p):
                with contextlib.suppress(psutil.Error):
                    leftovers.append(f"{p.pid} {' '.join(p.cmdline())[:80]}")
                    p.kill()
        self.log.close()
        return {"bye": bye, "leftovers": leftovers}


def _alive(p):
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _pss(p):
    try:
        return p.memory_full_info().pss
    except psutil.Error:
        return None


class Sampler(threading.Thread):
    """PSS of the watched session's tree: hot processes (the caller, mpbatch's workers or
    actors, the resource tracker) every `period` s, Ray's other processes every `cold` s
    (their last value stands in between); the tree is listed again every `cold` s and at
    each phase change. Peaks are kept for the phases warm and timed (Batcher() to the end
    of flush()), as sums over one sample each: total, caller, workers, Ray processes."""

    RECORDED = ("warm", "timed")

    def __init__(self, period, cold):
        super().__init__(daemon=True)
        self.period, self.cold = period, cold
        self.lock = threading.Lock()
        self.child = None
        self.phase = None
        self.listing, self.listed_at = [], 0.0
        self.cold_values = {}  # pid -> last PSS of a Ray process sampled cold
        self.cold_at = 0.0
        self.peaks = {}
        self.halt = threading.Event()

    def watch(self, child):
        with self.lock:
            self.child, self.phase, self.peaks = child, "setup", {}
            self.listing, self.cold_values, self.cold_at = [], {}, 0.0

    def set_phase(self, phase, sample=False):
        """Enter `phase`; with `sample`, take a sample now (a run shorter than the period
        still gets its start and its end sampled)."""
        with self.lock:
            if sample and self.child is not None and self.phase in self.RECORDED:
                self.listed_at = 0.0
                self.sample()  # the end of the phase before
            self.phase, self.listed_at = phase, 0.0  # list the tree again now
            if sample and self.child is not None and phase in self.RECORDED:
                self.sample()

    def unwatch(self):
        with self.lock:
            self.child = None
            return dict(self.peaks)

    def run(self):
        while not self.halt.wait(self.period):
            with self.lock:
                if self.child is not None and self.phase in self.RECORDED:
                    self.sample()

    def sample(self):
        now = time.monotonic()
        if now - self.listed_at >= self.cold:
            self.listing, self.listed_at = self.child.tree(), now
        cold = now - self.cold_at >= self.cold
        if cold:
            self.cold_at = now
        sums = collections.Counter()
        for p, cls in self.listing:
            if cls == "ray":
                if cold or p.pid not in self.cold_values:
                    self.cold_values[p.pid] = _pss(p)
                value = self.cold_values[p.pid]
            else:
                value = _pss(p)
            if value is None:
                continue
            sums["total"] += value
            sums[cls] += value
            if cls in ("ray", "workers") and self.child.kind == "ray":
                sums["ray_all"] += value  # every Ray process, the actors included
        for key, value in sums.items():
            self.peaks[key] = max(self.peaks.get(key, 0), value)

    def stop(self):
        self.halt.set()
        self.join()


def cpu_snapshot(children):
    """(wall, the machine's busy CPU s, this process's CPU s, {pid: (session kind, class,
    CPU s)}) for both sessions' trees."""
    t = psutil.cpu_times()
    busy = sum(t) - t.idle - getattr(t, "iowait", 0.0)
    own = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
    procs, threads = {}, {}
    for child in children:
        for p, cls in child.tree():
            with contextlib.suppress(psutil.Error):
                procs[p.pid] = (child.kind, cls, sum(p.cpu_times()[:2]))
            if cls == "workers" and child.kind == "ray":
                threads[p.pid] = thread_cpu(p.pid)
    return time.monotonic(), busy, own, procs, threads


def cpu_between(before, after, active):
    """CPU s per class over the timed region, and the share of the machine that went to
    work of no process of this run (other jobs, steal): run.py's BUSY measure."""
    wall = after[0] - before[0]
    split = collections.Counter()
    for pid, (kind, cls, cpu) in after[3].items():
        if pid in before[3]:
            used = cpu - before[3][pid][2]
            # the active session's classes by name; the idle session's, apart
            split[cls if kind == active else f"idle {kind} session"] += used
    split["driver"] = after[2] - before[2]
    ours = sum(split.values())
    foreign = max(0.0, (after[1] - before[1]) - ours)
    share = foreign / (wall * (os.cpu_count() or 1)) if wall > 0 else 0.0
    threads = collections.Counter()  # the Ray actors' threads, by OS name, summed
    for pid, now in after[4].items():
        for name, cpu in cpu_by_name(before[4].get(pid, {}), now).items():
            threads[name] += cpu
    return dict(split), share, foreign, {k: round(v, 3) for k, v in threads.most_common()}


class Driver:
    def __init__(self, args, log):
        self.args, self.log = args, log
        self.log_dir = tempfile.mkdtemp(prefix="ray_backend-")
        self.children = {}
        self.ready = {}
        self.sampler = Sampler(args.sample_period, args.cold_period)
        self.sampler.start()
        self.ended = {}

    def start(self, kind):
        child = Child(kind, self.args, self.log_dir)
        msg = child.next(time.monotonic() + self.args.timeout)
        if msg["tag"] != "READY":
            self.log(f"session {kind} did not start ({msg}); its log:\n{child.log_tail()}")
            self.ended[kind] = child.end(10)
            raise SystemExit(1)
        self.children[kind] = child
        msg["ray_idle"] = self.idle_ray(child) if kind == "ray" else None
        self.ready.setdefault(kind, []).append(msg)
        return msg

    def idle_ray(self, child):
        """PSS and processes of a Ray with no Batcher running (the background every run
        has)."""
        time.sleep(1.0)  # the first Batcher's actors are being released
        tree = child.tree()
        pss = {cls: 0 for cls in ("caller", "ray", "workers", "other")}
        for p, cls in tree:
            pss[cls] += _pss(p) or 0
        titles = collections.Counter()
        for p, cls in tree:
            if cls != "caller":
                with contextlib.suppress(psutil.Error, IndexError):
                    titles[os.path.basename(p.cmdline()[0])[:40]] += 1
        return {"pss_mb": {k: v / MB for k, v in pss.items()}, "processes": dict(titles)}

    def measure(self, spec, profile_dir=None):
        """One run of one contender in its session; retried when the machine was busy."""
        discarded = []
        while True:
            rec = self.measure_once(spec, profile_dir)
            if rec.get("error") or not rec["busy"] or len(discarded) >= self.args.retry_busy:
                return rec | {"discarded_busy": discarded}
            discarded.append({k: rec.get(k) for k in ("wall_s", "foreign_cpu")})
            wait_until_idle(self.args.idle_wait)

    def measure_once(self, spec, profile_dir):
        kind = "ray" if spec["backend"] == "ray" else "local"
        child = self.children[kind]
        cmd = {"op": "run", **{k: spec[k] for k in ("workload", "how", "n", "size", "rounds")},
               "count_pushes": profile_dir is not None}
        self.sampler.watch(child)
        child.send(**cmd)
        deadline = time.monotonic() + self.args.timeout
        before = after = None
        spies, pids = [], []
        while True:
            msg = child.next(deadline)
            tag = msg["tag"]
            if tag == "PHASE" and msg["phase"] == "warm":
                self.sampler.set_phase("warm")
            elif tag == "PHASE" and msg["phase"] == "timed":
                pids = [p for p in msg.get("workers", []) if p]
                if profile_dir is not None:
                    spies = start_spies(profile_dir, spec, child.proc.pid, pids)
                self.sampler.set_phase("timed", sample=True)
                before = cpu_snapshot(self.children.values())
                child.send(op="go")
            elif tag == "PHASE" and msg["phase"] == "flushed":
                after = cpu_snapshot(self.children.values())
                self.sampler.set_phase("close", sample=True)
                stop_spies(spies)
                child.send(op="close")
            elif tag == "RESULT":
                break
            else:  # TIMEOUT, EXIT, EOF: the session is lost; start it again
                stop_spies(spies)
                self.sampler.unwatch()
                tail = child.log_tail()
                self.ended.setdefault(f"lost {kind}", []).append(child.end(10))
                self.start(kind)
                return {"error": f"session {kind}: {tag} {msg}", "log_tail": tail,
                        "busy": False, "ok": False}
        peaks = self.sampler.unwatch()
        rec = dict(msg)
        rec.pop("tag")
        rec["worker_pids"] = pids
        rec["peak_pss_mb"] = {k: v / MB for k, v in peaks.items()}
        if before and after:
            (rec["cpu_s"], rec["foreign_cpu"], rec["foreign_cpu_s"],
             rec["actor_threads_cpu_s"]) = cpu_between(before, after, kind)
        else:
            rec["cpu_s"], rec["foreign_cpu"], rec["foreign_cpu_s"] = {}, 0.0, 0.0
        rec["busy"] = rec["foreign_cpu"] > BUSY and rec["foreign_cpu_s"] > BUSY_SECONDS
        n = spec["n"]
        rec["ok"] = ("error" not in rec and rec.get("count") == n
                     and rec.get("total") == n * (n - 1))
        if "error" not in rec and not rec["ok"]:
            rec["error"] = (f"delivery check failed: {rec.get('count')} results summing to "
                            f"{rec.get('total')}, expected {n} summing to {n * (n - 1)}")
        if "error" in rec:
            rec["log_tail"] = child.log_tail()
        return rec

    def finish(self):
        self.sampler.stop()
        for kind, child in self.children.items():
            self.ended[kind] = child.end(60)
        shutil.rmtree(self.log_dir, ignore_errors=True)
        return self.ended


# --- profiling (--profile) --------------------------------------------------------------------


def start_spies(folder, spec, caller, workers):
    """py-spy record of the caller and of each worker over the timed region: folded
    stacks per thread, of the thread holding the GIL only (--gil: where Python code runs;
    py-spy's idle detection counts waiting threads here), pausing the process for each
    sample; returns once each has had time to attach. CPU per thread, from /proc, is in
    the run's record."""
    exe = py_spy()
    if exe is None:
        return []
    stem = f"{spec['workload']}-{spec['name'].replace(' ', '-')}"
    spies = []
    for who, pid in [("caller", caller), *((f"worker{i}", p) for i, p in enumerate(workers))]:
        out = Path(folder) / f"{stem}-{who}.txt"
        spies.append((subprocess.Popen(
            [exe, "record", "--pid", str(pid), "--rate", "200", "--format", "raw",
             "--threads", "--gil", "--output", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), out))
    time.sleep(1.5)  # attach
    return spies


def stop_spies(spies):
    for proc, _ in spies:
        with contextlib.suppress(OSError):
            proc.send_signal(signal.SIGINT)
    for proc, _ in spies:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def summarize_folded(path, top=12):
    """From py-spy's raw (folded) output: samples per thread, and per thread the functions
    with the most samples on top of the stack (self) and anywhere in it (inclusive)."""
    threads = collections.Counter()
    own = collections.defaultdict(collections.Counter)
    inclusive = collections.defaultdict(collections.Counter)
    for line in Path(path).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        thread, frames = frames[0], frames[1:]
        n = int(count)
        threads[thread] += n
        if frames:
            own[thread][frame_label(frames[-1])] += n
        for frame in set(map(frame_label, frames)):
            inclusive[thread][frame] += n
    total = sum(threads.values()) or 1
    return {thread: {"samples": count, "share": count / total,
                     "self": own[thread].most_common(top),
                     "inclusive": inclusive[thread].most_common(top)}
            for thread, count in threads.most_common()}


def run_profile(args, driver, rounds, log):
    folder = Path(args.profile_dir)
    folder.mkdir(parents=True, exist_ok=True)
    wanted = [x.strip() for x in args.profile.split(",") if x.strip()]
    report = {}
    for item in wanted:
        workload, _, name = item.partition(" ")
        rows = {r[0]: r for r in contenders(workload)} if workload in N else {}
        if name not in rows or rows[name][2] == "serial":
            sys.exit(f"--profile: unknown contender {item!r}; e.g. 'W1 ray add_many'")
        spec = make_spec(args, workload, rows[name], rounds)
        rec = driver.measure_once(spec, folder)
        summaries = {}
        for path in sorted(folder.glob(f"{workload}-{name.replace(' ', '-')}-*.txt")):
            summaries[path.stem] = summarize_folded(path)
        report[item] = {"run": rec, "profiles": summaries}
        log(f"profile {item}: {fmt_run(rec, spec['n'])}")
        pushes = rec.get("pushes")
        if pushes:
            log("  " + describe_pushes(pushes, spec["n"]))
        log(f"  CPU s over the timed region, by process class: {rec.get('cpu_s')} (py-spy's"
            " own CPU counts as other work: BUSY is expected here)")
        log(f"  caller's threads, CPU s: {rec.get('caller_threads_cpu_s')}")
        if rec.get("actor_threads_cpu_s"):
            log(f"  actors' threads (OS names, both actors), CPU s: "
                f"{rec['actor_threads_cpu_s']}")
        for stem, threads in summaries.items():
            log(f"  {stem}:")
            for thread, s in list(threads.items())[:4]:
                log(f"    {thread}: {s['samples']} samples ({s['share']:.0%})")
                log("      self: " + "; ".join(f"{f} {c}" for f, c in s["self"][:6]))
                log("      incl: " + "; ".join(f"{f} {c}" for f, c in s["inclusive"][:8]))
    path = folder / "profile.json"
    path.write_text(json.dumps(report, indent=1, default=repr))
    log(f"wrote {path} and the py-spy files (folded stacks) next to it")


def describe_pushes(p, n):
    pushes = p.get("gets", 0) - p.get("pulls", 0)
    per = p.get("bytes_queued", 0) / pushes if pushes > 0 else 0
    return (f"{p.get('frames_queued', 0):,} frames queued ({p.get('bytes_queued', 0) / MB:.1f}"
            f" MB, {p.get('bytes_queued', 0) / n:.1f} B/item) in {pushes:,} pushes "
            f"({per / 1024:.1f} KiB/push, {n / pushes if pushes > 0 else 0:,.0f} items/push); "
            f"{p.get('pulls', 0):,} pulls, {p.get('pulls_with_data', 0):,} with data, "
            f"{p.get('pulled_bytes', 0) / MB:.1f} MB back")


# --- the measured run -------------------------------------------------------------------------


def make_spec(args, workload, row, rounds):
    name, backend, how = row
    return {"workload": workload, "name": name, "backend": backend, "how": how,
            "n": args.n[workload], "rounds": rounds,
            "size": None if how == "serial" else args.sizes[(workload, how)]}


def fmt_run(rec, n):
    if "wall_s" not in rec:
        return f"FAILED {rec.get('error')}"
    text = f"{rec['wall_s']:7.3f} s {n / rec['wall_s']:>11,.0f} items/s"
    peak = rec.get("peak_pss_mb", {})
    if peak:
        text += f"  PSS {peak.get('total', 0):6.0f} MB"
        if peak.get("ray_all"):
            text += f" (Ray {peak['ray_all']:.0f})"
    if "start_to_ready_s" in rec:
        text += f"  ready {rec['start_to_ready_s']:.2f} s"
    if rec.get("busy"):
        text += f"  BUSY: {rec['foreign_cpu']:.0%} of the CPUs ran other work"
    if rec.get("discarded_busy"):
        text += f"  ({len(rec['discarded_busy'])} busy attempts discarded)"
    return text + ("" if rec.get("ok") else f"  FAILED {rec.get('error')}")


def summarize(workload, n, runs):
    """Medians per contender over its ok runs; ratios Ray / local."""
    rows = {}
    for name, recs in runs.items():
        ok = [r for r in recs if r.get("ok")]
        row = {"runs": len(recs), "runs_ok": len(ok), "runs_busy": sum(r["busy"] for r in recs),
               "size": recs[0].get("size") if recs else None}
        if not ok:
            rows[name] = row | {"error": next((r.get("error") for r in recs), None)}
            continue

        def med(get, ok=ok):
            values = [v for r in ok if (v := get(r)) is not None]
            return statistics.median(values) if values else None

        wall = med(lambda r: r["wall_s"])
        row |= {"wall_s": wall, "walls": [r["wall_s"] for r in ok], "items_per_s": n / wall,
                "caller_cpu_us_per_item": med(lambda r: r["caller_cpu_s"]) * 1e6 / n,
                "start_to_ready_s": med(lambda r: r.get("start_to_ready_s")),
                "close_s": med(lambda r: r.get("close_s")),
                "batches": med(lambda r: r.get("batches"))}
        for key in ("total", "caller", "workers", "ray_all", "ray"):
            row[f"peak_{key}_mb"] = med(lambda r, k=key: r["peak_pss_mb"].get(k))
        classes = {k for r in ok for k in r.get("cpu_s", {})}
        row["cpu_s"] = {k: med(lambda r, k=k: r["cpu_s"].get(k)) for k in sorted(classes)}
        rows[name] = row
    serial = rows.get("serial", {}).get("wall_s")
    if serial:
        for row in rows.values():
            if "wall_s" in row:
                row["efficiency"] = serial / WORKERS / row["wall_s"]
    ratios = {}

    def rate(name):
        return rows.get(name, {}).get("items_per_s")

    for ray_name, local_name in (("ray add_many", "local add_many"), ("ray add", "local add"),
                                 ("ray add", "local add_many")):
        if rate(ray_name) and rate(local_name):
            ratios[f"{ray_name} / {local_name}"] = rate(ray_name) / rate(local_name)
    return {"n": n, "rows": rows, "ratios": ratios}


def table(workload, summary, title):
    rows, n = summary["rows"], summary["n"]
    head = ["contender", "size", "items/s", "÷ local same call", "÷ local add_many"]
    head += ["efficiency"] if workload == "W2" else []
    head += ["wall s", "caller CPU µs/item", "workers CPU s", "Ray other CPU s",
             "start→ready s", "peak PSS tree MB", "of which Ray MB", "caller MB", "runs ok"]
    lines = [f"**{workload}: {title}** ({n:,} items, {WORKERS} workers, medians)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in rows.items():
        if "wall_s" not in row:
            lines.append(f"| {name} | failed: {row.get('error')} |" + " |" * (len(head) - 2))
            continue
        call = name.split()[-1]
        same = rows.get(f"local {call}", {}).get("items_per_s")
        many = rows.get("local add_many", {}).get("items_per_s")
        ray = name.startswith("ray")
        cells = [name, str(row["size"] or "-"), f"{row['items_per_s']:,.0f}",
                 or_dash(row["items_per_s"] / same if same else None, ".2f"),
                 or_dash(row["items_per_s"] / many if many else None, ".2f")]
        if workload == "W2":
            cells.append(or_dash(row.get("efficiency"), ".2f"))
        cpu = row["cpu_s"]
        cells += [f"{row['wall_s']:.2f}", or_dash(row["caller_cpu_us_per_item"], ".2f"),
                  or_dash(cpu.get("workers"), ".2f"),
                  or_dash(cpu.get("ray") if ray else None, ".2f"),
                  or_dash(row.get("start_to_ready_s"), ".2f"),
                  or_dash(row.get("peak_total_mb"), ".0f"),
                  or_dash(row.get("peak_ray_all_mb") if ray else None, ".0f"),
                  or_dash(row.get("peak_caller_mb"), ".0f"),
                  f"{row['runs_ok']}/{row['runs']}"
                  + (f" ({row['runs_busy']} busy)" if row["runs_busy"] else "")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets_md(results):
    lines = ["| ratio (items/s over items/s) | value | target |", "|---|---|---|"]
    for workload, s in results.items():
        for name, value in s["ratios"].items():
            goal = GOALS.get((workload, name))
            verdict = "" if goal is None else f"≥ {goal}: {'met' if value >= goal else 'NOT met'}"
            lines.append(f"| {workload} {name} | {value:.2f} | {verdict} |")
    return "\n".join(lines)


def startup_md(ready, idle):
    lines = []
    for kind, msgs in ready.items():
        for msg in msgs:
            first = msg.get("first", {})
            text = f"- {kind} session:"
            if "ray_init_s" in msg:
                text += f" ray.init {msg['ray_init_s']:.2f} s;"
            text += (f" first Batcher start→ready {first.get('start_to_ready_s', 0):.2f} s, "
                     f"→ first batches back {first.get('start_to_first_batches_s', 0):.2f} s, "
                     f"close {first.get('close_s', 0):.2f} s")
            lines.append(text)
    if idle:
        pss = idle["pss_mb"]
        lines.append(f"- Ray with no Batcher running: {pss['ray']:.0f} MB PSS in its "
                     f"processes ({', '.join(f'{k} x{v}' for k, v in idle['processes'].items())})"
                     f", the caller {pss['caller']:.0f} MB")
    return "\n".join(lines)


def mpbatch_commit(digest, depth=30):
    """The newest of the last `depth` commits that changed mpbatch/ whose mpbatch sources
    hash to `digest` (run.py's mpbatch_digest), or None: the commit a --mpbatch snapshot
    was made from, whatever the checkout's HEAD is by the end of the run."""
    import hashlib
    import io
    import tarfile

    log = subprocess.run(["git", "-C", str(ROOT), "log", f"-{depth}", "--format=%h", "--",
                          "mpbatch"], capture_output=True, text=True, check=False).stdout
    for commit in log.split():
        tar = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "mpbatch"],
                             capture_output=True, check=False).stdout
        if not tar:
            continue
        with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
            members = sorted((m for m in archive.getmembers()
                              if m.isfile() and m.name.endswith(".py")),
                             key=lambda m: Path(m.name).parts)
            h = hashlib.sha256()
            for m in members:
                h.update(archive.extractfile(m).read())
        if h.hexdigest()[:12] == digest:
            return commit
    return None


def environment(args, rounds, ready, digest):
    def git(*argv, at=ROOT):
        return subprocess.run(["git", "-C", str(at), *argv], capture_output=True,
                              text=True, check=False).stdout.strip()

    versions = {}
    for module in ("ray", "psutil", "cloudpickle"):
        try:
            versions[module] = importlib.metadata.version(module)
        except importlib.metadata.PackageNotFoundError:
            versions[module] = "not installed"
    ray_msg = (ready.get("ray") or [{}])[0]
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "commit": git("rev-parse", "--short", "HEAD"),
            # of the checkout measured (--mpbatch)
            "mpbatch_dirty": bool(git("status", "--porcelain", "--", "mpbatch", at=args.mpbatch)),
            "mpbatch_from": str(args.mpbatch), "mpbatch_digest": digest,
            "mpbatch_commit": mpbatch_commit(digest),
            "mpbatch_file_caller": ray_msg.get("mpbatch_file"),
            "actor_side": ray_msg.get("actor_side"),
            "python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "workers": WORKERS, "versions": versions,
            "rounds_per_unit": rounds, "unit_seconds": workloads.UNIT_SECONDS,
            "ray_init": {k: v for k, v in RAY_INIT.items()}, "interval": INTERVAL,
            "sizes": {f"{w} {c}": s for (w, c), s in args.sizes.items()},
            "sample_period": args.sample_period, "cold_period": args.cold_period,
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}


def parse_args(argv=None):
    def sizes(text):
        out = dict(SIZES)
        for part in text.split(","):
            key, _, value = part.partition("=")
            workload, _, call = key.strip().partition(" ")
            if (workload, call) not in SIZES:
                raise argparse.ArgumentTypeError(f"unknown {key!r}; e.g. 'W1 add_many=5000'")
            out[(workload, call)] = int(value)
        return out

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: W1 {QUICK_N['W1']:,} items, W2 {QUICK_N['W2']:,}, 1 repeat")
    p.add_argument("--repeats", type=int, help="runs per contender (default 5; --quick 1)")
    p.add_argument("--w1", type=int, help=f"W1 items (default {N['W1']:,}; 0: no W1)")
    p.add_argument("--w2", type=int, help=f"W2 items (default {N['W2']:,}; 0: no W2)")
    p.add_argument("--sizes", type=sizes, default=dict(SIZES),
                   help="size= per workload and call, e.g. 'W1 add_many=5000,W2 add=200' "
                        f"(default {', '.join(f'{w} {c}={s}' for (w, c), s in SIZES.items())})")
    p.add_argument("--rounds", type=int, help="sha256 rounds per ~100 us, not calibrated")
    p.add_argument("--retry-busy", type=int, metavar="N",
                   help="measure a BUSY run again up to N times (default 2; --quick 0)")
    p.add_argument("--idle-wait", type=float, default=60, metavar="S")
    p.add_argument("--timeout", type=float, help="s per run (default 300; --quick 120)")
    p.add_argument("--sample-period", type=float, default=0.1, metavar="S",
                   help="s between PSS samples of the caller and its workers/actors")
    p.add_argument("--cold-period", type=float, default=1.0, metavar="S",
                   help="s between PSS samples of Ray's other processes")
    p.add_argument("--tag", help="add -TAG to the result files' names (a side run that "
                   "should not overwrite the day's RAY files)")
    p.add_argument("--profile", metavar="ROWS",
                   help="instead of measuring: run these once each under py-spy, e.g. "
                        "'W1 ray add_many,W1 local add_many'")
    p.add_argument("--profile-dir", default="/tmp/ray_backend-profile", metavar="DIR")
    p.add_argument("--mpbatch", type=Path, default=ROOT, metavar="DIR",
                   help="import mpbatch from DIR/mpbatch (default: this checkout), e.g. a"
                        " snapshot of one commit while the checkout is being edited")
    p.add_argument("--session", choices=["local", "ray"], help=argparse.SUPPRESS)
    p.add_argument("--session-fd", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.mpbatch = args.mpbatch.resolve()
    args.repeats = args.repeats or (1 if args.quick else 5)
    args.timeout = args.timeout or (120 if args.quick else 300)
    if args.retry_busy is None:
        args.retry_busy = 0 if args.quick else 2
    base = QUICK_N if args.quick else N
    args.n = {"W1": base["W1"] if args.w1 is None else args.w1,
              "W2": base["W2"] if args.w2 is None else args.w2}
    return args


def main(argv=None):
    args = parse_args(argv)
    refuse_unless_offline()  # before anything that could start Ray
    sys.path.insert(0, str(args.mpbatch))  # as run.py does: DIR first
    if args.session:
        Session(args.session, args.session_fd).main()
        return 0
    started = time.monotonic()

    def log(text):
        print(f"[{time.monotonic() - started:6.0f}s] {text}", flush=True)

    # Bytecode, as an installed package has it (run.py does the same)
    compileall.compile_dir(str(args.mpbatch / "mpbatch"), quiet=1)
    importlib.import_module("mpbatch").Batcher  # noqa: B018 - importable from DIR, or fail
    digest = mpbatch_digest(args)
    rounds = args.rounds or workloads.calibrate()
    log(f"{rounds} sha256 rounds = {workloads.UNIT_SECONDS * 1e6:.0f} us; mpbatch from "
        f"{args.mpbatch} (digest {digest})")
    driver = Driver(args, log)
    try:
        for kind in ("local", "ray"):
            msg = driver.start(kind)
            shown = {k: v for k, v in msg.items() if k != "tag"}
            log(f"session {kind} ready: {json.dumps(shown, default=repr)}")
        actor_file = (driver.ready["ray"][0].get("actor_side") or {}).get("mpbatch_file", "")
        if not actor_file.startswith(str(args.mpbatch)):
            log(f"WARNING: Ray's workers import mpbatch from {actor_file}, not {args.mpbatch}")
        if args.profile:
            run_profile(args, driver, rounds, log)
            return 0
        results = measure_all(args, driver, rounds, log)
    finally:
        ended = driver.finish()
        for kind, end in ended.items():
            for e in end if isinstance(end, list) else [end]:
                if e.get("leftovers"):
                    log(f"LEFTOVER processes of session {kind} (killed): {e['leftovers']}")
        log(f"sessions ended: {json.dumps(ended)}")
    env = environment(args, rounds, driver.ready, digest)
    write(args, env, results, driver, ended, time.monotonic() - started, log)
    if mpbatch_digest(args) != digest:
        log("WARNING: mpbatch's sources changed during this run; its numbers mix two versions")
    return 0


def measure_all(args, driver, rounds, log):
    plan = {w: contenders(w) for w in ("W2", "W1") if args.n[w]}
    runs = {w: {row[0]: [] for row in rows} for w, rows in plan.items()}
    for rep in range(args.repeats):  # interleaved, each repeat in an order rotated by one
        for w, rows in plan.items():
            shift = rep % len(rows)
            for row in rows[shift:] + rows[:shift]:
                spec = make_spec(args, w, row, rounds)
                rec = driver.measure(spec) | {"repeat": rep, "size": spec["size"]}
                runs[w][row[0]].append(rec)
                log(f"{w} {rep + 1}/{args.repeats} {row[0]:15} {fmt_run(rec, spec['n'])}")
    return {w: summarize(w, args.n[w], r) | {"runs": r} for w, r in runs.items()}


TITLES = {"W2": "CPU-bound, ~100 µs of sha256 per item", "W1": "tiny keyed items (v * 2)"}


def write(args, env, results, driver, ended, took, log):
    idle = (driver.ready.get("ray") or [{}])[0].get("ray_idle")
    parts = [f"# backend=\"ray\" vs the local backend — {env['date']}", "",
             f"mpbatch from `{env['mpbatch_from']}`, its sources those of commit "
             f"`{env['mpbatch_commit'] or 'unknown (not among the last 30 that changed it)'}`"
             f" (digest `{env['mpbatch_digest']}`; the checkout was at `{env['commit']}`), "
             f"Python {env['python']}, Ray "
             f"{env['versions']['ray']}, {env['cpus']} CPUs, {WORKERS} workers; "
             f"{args.repeats} repeats, interleaved; {env['rounds_per_unit']} sha256 rounds per "
             f"unit. Command: `scripts/offline-ray python benchmarks/{env['command']}` "
             f"({took:.0f} s).", "", "Start-up (outside every timed region):", "",
             startup_md(driver.ready, idle), ""]
    for w, s in results.items():
        parts += [table(w, s, TITLES[w]), ""]
    parts += ["Ray / local:", "", targets_md(results), "",
              "Timed: from the end of the warm-up (Batcher started, every worker ready, one "
              "batch per worker through and back) to the end of flush(). caller CPU: every "
              "thread of the caller process. workers CPU: the local workers and zygote, or "
              "the Ray actors. Ray other CPU: gcs_server, raylet, agents, idle workers. Peak "
              "PSS: from Batcher() to the end of flush(), of the caller's process tree (for "
              "Ray: the caller and every Ray process); of which Ray: the Ray processes, "
              "actors included."]
    md = "\n".join(parts) + "\n"
    busy = sum(r["runs_busy"] for s in results.values() for r in s["rows"].values())
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = datetime.date.today().isoformat() + ("-smoke" if args.quick else "")
    doc = {"environment": env, "startup": driver.ready, "sessions_ended": ended,
           "seconds": round(took), "results": results, "table_md": md}
    stem += "-RAY" + (f"-{args.tag}" if args.tag else "")
    json_path, md_path = RESULTS / f"{stem}.json", RESULTS / f"{stem}.md"
    json_path.write_text(json.dumps(doc, indent=1, default=repr))
    md_path.write_text(md)
    print("\n" + md)
    if busy:
        log(f"WARNING: {busy} runs shared the machine with other work (BUSY); rerun on a "
            "quiet machine before trusting small differences")
    log(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    sys.exit(main())
