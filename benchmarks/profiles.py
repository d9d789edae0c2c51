"""Where a contender's time goes: py-spy samples of the caller and its workers, by thread.

    python benchmarks/profiles.py --gil --workload W1 --run mpbatch-add_many:5000 \\
        --run bare-keyed:10000 --run pool:10000
    python benchmarks/profiles.py --gil --workload DK --run mpbatch-add_many:1000 \\
        --run bare-keyed:1000

Each --run is one contender of run.py at one chunk size. It runs ``--repeats`` times in one
child process (the workload at run.py's size, after the contender's imports, with this
checkout's mpbatch, as run.py's child does), and ``py-spy record --subprocesses --threads``
samples that process and every process under it (workers, zygote) at ``--rate`` Hz
(pip install -e ".[bench]"; py-spy needs ptrace rights over the child it starts: in a
container, CAP_SYS_PTRACE). The child also records each run's wall time, its own CPU and the CPU of
the processes it reaped (its workers, except under forkserver), under py-spy.

With ``--gil`` only the thread holding each process's GIL is sampled: where Python code
runs, and what to compare across contenders. Without it py-spy also samples threads waiting
for the GIL, and threads in some waits (``select``, a pipe's ``read``) that it does not see
as idle.

What is counted: in the caller, its main thread inside ``contenders.run`` (the call run.py
times: not the child's imports, nor its exit) and the threads the runs start; every sample
of the processes under it. For each process role (the caller; the processes under it,
summed) and thread, the table gives its seconds on the stack per run (samples / rate /
repeats), its share of the run's samples, and the functions on top of the stack in at
least ``--min-share`` of that thread's samples, lines merged per function. A thread is
named by the function it runs. Read the seconds as shares of one profile, not as times:

- py-spy pauses a process for each sample, so the profiled runs are slower than run.py's;
- py-spy finds new processes by polling (every 100 ms in py-spy 0.4) and attaches after,
  so a worker's first moments go unsampled: workers that live for a fraction of a second
  (W1, DK) show less than their CPU. The child's reaped CPU, in the JSON, is the check.

Writes results/<date>-profile-<workload>.json (--tag T: ...-<workload>-T.json; --smoke:
<date>-smoke-profile-..., which results/.gitignore keeps out of git) and prints markdown.
"""

import argparse
import collections
import datetime
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import workloads
from ab import checkout_facts, contender
from run import RESULTS, ROOT, RunClock, frame_label, py_spy

THREADING = ("Thread._bootstrap", "Thread._bootstrap_inner", "Thread.run")
# py-spy's folded frames: a command line may hold ';' (spawn's `-c ...; spawn_main(...)`),
# so a stack is split at its thread frame, and processes are counted by their own pattern.
_THREAD = re.compile(r";thread \((\d+|0x[0-9a-fA-F]+)\)(?::[^;]*)?(?=;|$)")
_PROCESS = re.compile(r'(?:^|;)process (\d+):"')


def child_main(workload, name, chunk, repeats, rounds, smoke, done):
    """The profiled process: contender ``name`` over the workload, ``repeats`` times; each
    run's wall, own CPU and reaped CPU go to ``done`` (JSON) once all have succeeded."""
    import contenders

    w = workloads.workloads(smoke)[workload]
    contenders.preload(name)
    runs = []
    for _ in range(repeats):
        timer = RunClock()
        count, _, _ = contenders.run(name, contenders.Job(w, w.n, chunk, rounds))
        runs.append(timer.read())
        if count != w.n:
            sys.exit(f"{name}: {count} results of {w.n}")
    Path(done).write_text(json.dumps(runs))


def record(args, name, chunk, rounds, folder):
    """py-spy's raw (folded) output of one contender's child, and the child's runs."""
    exe = py_spy()
    if exe is None:
        sys.exit('py-spy is not installed: pip install -e ".[bench]"')
    out, done = Path(folder) / f"{name}-{chunk}.txt", Path(folder) / f"{name}-{chunk}.json"
    child = [sys.executable, str(Path(__file__).resolve()), "--child", args.workload, name,
             str(chunk), str(args.repeats), str(rounds), str(done), *(["--smoke"] * args.smoke)]
    gil = ["--gil"] if args.gil else []
    path = os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH")) if x)
    # A session of its own: on a timeout, py-spy and every process under it go together.
    spy = subprocess.Popen([exe, "record", "--subprocesses", "--threads", *gil, "--rate",
                            str(args.rate), "--format", "raw", "--output", str(out), "--",
                            *child], stdout=subprocess.DEVNULL, cwd=ROOT,
                           env=os.environ | {"PYTHONPATH": path}, start_new_session=True)
    try:
        spy.wait(args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(spy.pid, signal.SIGKILL)
        spy.wait()
        sys.exit(f"--run {name}:{chunk}: not done in {args.timeout} s")
    if not done.exists():  # py-spy's own status does not say how the child ended
        sys.exit(f"--run {name}:{chunk}: the profiled child failed (its error is above)")
    return out, json.loads(done.read_text())


def split(stack):
    """(pids of the processes, from the child down; the thread's id or None; code frames)
    of one folded stack."""
    m = _THREAD.search(stack)
    head, code = (stack, "") if m is None else (stack[:m.start()], stack[m.end() + 1:])
    tid = m.group(1) if m is not None and m.group(1).isdigit() else None
    return _PROCESS.findall(head), tid, code.split(";") if code else []


def _thread_of(pids, tid, code):
    """'main thread' (a thread whose id is its process's: Linux's main thread), or the
    function the thread runs: threading's own frames skipped (a Thread subclass's run, or
    Thread.run's target), or a thread's first frame (one started by _thread)."""
    if tid is not None and pids and tid == pids[-1]:
        return "main thread"
    names = [f.partition(" (")[0] for f in code]
    skip = 0
    while skip < len(names) - 1 and names[skip] in THREADING:
        skip += 1
    return frame_label(code[skip]) if code else "a thread"


def _timed(frame):
    """Whether a frame is contenders.run, the call run.py's child times."""
    return frame.startswith("run (") and "contenders.py:" in frame


def summarize(raw, min_share, per_s):
    """{role: {"share": s, "threads": {thread: {"share": s, "s": t, "self": [[fn, share]]}}}}
    from py-spy's raw output (text), t the thread's seconds on the stack per run (``per_s``:
    samples per second of one run)."""
    samples = collections.Counter()
    own = collections.defaultdict(collections.Counter)
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        pids, tid, code = split(stack)
        role = "caller" if len(pids) <= 1 else "under the caller"
        thread = _thread_of(pids, tid, code)
        if role == "caller" and thread == "main thread" and not any(map(_timed, code)):
            continue  # the child's imports, its start and its exit
        samples[(role, thread)] += int(count)
        if code:
            own[(role, thread)][frame_label(code[-1])] += int(count)
    total = sum(samples.values()) or 1
    out = {}
    for (role, thread), n in samples.most_common():
        entry = out.setdefault(role, {"share": 0.0, "threads": {}})
        entry["share"] += n / total
        entry["threads"][thread] = {
            "share": n / total,
            "s": n / per_s,
            "self": [[fn, m / n] for fn, m in own[(role, thread)].most_common()
                     if m / n >= min_share]}
    return out


def table(runs):
    """Markdown: a row per (run, role, thread) and its top functions, then each run's
    measured walls and CPU."""
    lines = ["| run | process, thread | s on the stack per run | share of samples | on top of "
             "the stack (share of the thread's samples) |", "|---|---|---|---|---|"]
    for run, entry in runs.items():
        for role, part in entry["profile"].items():
            for thread, t in part["threads"].items():
                if t["share"] < 0.01:
                    continue
                top = ", ".join(f"{fn} {share:.0%}" for fn, share in t["self"])
                lines.append(f"| {run} | {role}, {thread} | {t['s']:.3f} | {t['share']:.0%} "
                             f"| {top} |")
    lines += ["", "Each run as the child measured it under py-spy (medians):", "",
              "| run | wall s | caller CPU s | reaped CPU s |", "|---|---|---|---|"]
    for run, entry in runs.items():
        m = entry["medians"]
        lines.append(f"| {run} | {m['wall']:.3f} | {m['caller_cpu']:.3f} | "
                     f"{m['reaped_cpu']:.3f} |")
    return "\n".join(lines)


def _checked(spec):
    """(name, chunk) of one --run; exits naming what is wrong."""
    import contenders

    name, chunk, checkout = contender(spec, None)
    if chunk is None:
        sys.exit(f"--run {spec}: give its chunk size, NAME:CHUNK")
    if checkout != ROOT:
        sys.exit(f"--run {spec}: profiles.py runs this checkout's mpbatch only")
    return name, chunk, contenders


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", default="W1", help="a workload of run.py (default W1)")
    p.add_argument("--run", action="append", metavar="NAME:CHUNK",
                   help="a contender of run.py and its chunk size")
    p.add_argument("--repeats", type=int, default=20, help="runs in the profiled child")
    p.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    p.add_argument("--rounds", type=int, help="sha256 rounds per unit (default: calibrate)")
    p.add_argument("--min-share", type=float, default=0.03,
                   help="list a function on top of a thread's stack this often or more")
    p.add_argument("--gil", action="store_true",
                   help="sample only the thread holding each process's GIL (py-spy --gil): "
                        "where Python code runs, without threads waiting for the GIL")
    p.add_argument("--timeout", type=float, default=900, help="s per --run (default 900)")
    p.add_argument("--smoke", action="store_true", help="run.py's tiny workloads (CI)")
    p.add_argument("--tag", help="appended to the output file's name")
    p.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        workload, name, chunk, repeats, rounds, done = args.child
        chunk = int(chunk) if chunk.isdigit() else chunk
        return child_main(workload, name, chunk, int(repeats), int(rounds), args.smoke, done)
    if not args.run:
        p.error("give at least one --run NAME:CHUNK")
    w = workloads.workloads(args.smoke).get(args.workload)
    if w is None:
        sys.exit(f"unknown workload {args.workload!r}")
    specs = []
    for text in args.run:
        name, chunk, contenders = _checked(text)
        if not contenders.applies(name, w):
            sys.exit(f"--run {text}: {name} does not run {args.workload}")
        specs.append((name, chunk))
    rounds = args.rounds or workloads.calibrate()
    runs = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, chunk in specs:
            raw, measured = record(args, name, chunk, rounds, folder)
            runs[f"{name}:{chunk}"] = {
                "profile": summarize(raw.read_text(), args.min_share, args.rate * args.repeats),
                "runs": measured,
                "medians": {k: statistics.median(r[k] for r in measured) for k in measured[0]}}
    md = table(runs)
    print(md)
    smoke = "-smoke" if args.smoke else ""
    stem = f"{datetime.date.today()}{smoke}-profile-{args.workload}" + (
        f"-{args.tag}" if args.tag else "")
    out = RESULTS / f"{stem}.json"
    env = {"python": sys.version.split()[0], "rounds_per_unit": rounds, "argv": sys.argv[1:],
           "mpbatch": checkout_facts(ROOT), "py-spy": _version("py-spy")}
    out.write_text(json.dumps({"workload": args.workload, "repeats": args.repeats,
                               "rate": args.rate, "gil": args.gil, "environment": env,
                               "runs": runs, "table_md": md}, indent=1))
    print(f"wrote {out}")
    return None


def _version(dist):
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
