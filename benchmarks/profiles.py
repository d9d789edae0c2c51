"""Where a contender's time goes: py-spy samples of the caller and its workers, by thread.

    python benchmarks/profiles.py --gil --workload W1 --run mpbatch-add_many:5000 \\
        --run bare-keyed:10000 --run pool:10000
    python benchmarks/profiles.py --gil --workload DK --run mpbatch-add_many:1000 \\
        --run bare-keyed:1000

Each --run is one contender of run.py at one chunk size. It runs ``--repeats`` times in one
child process (the workload at run.py's size, after the contender's imports, as run.py's
child does), and ``py-spy record --subprocesses --threads`` samples that process and every
process it starts (workers, zygote) at ``--rate`` Hz (pip install -e ".[bench]"; py-spy
needs ptrace rights over the child: root, or kernel.yama.ptrace_scope 0).

With ``--gil`` only the thread holding each process's GIL is sampled: where Python code
runs, which is the CPU a contender's own code costs, and what to compare across
contenders. Without it py-spy also samples threads waiting for the GIL, and threads in
some waits (``select``, a pipe's ``read``) that it does not see as idle.

Only the contender's runs are counted (stacks through ``contenders.run``, as run.py's child
times it, and the threads those runs start), not the child's imports. For each process
role (the caller; every process under it, summed) and thread, the table
gives its seconds on the stack per run (samples / rate / repeats), its share of all the
run's samples, and the functions on top of the stack in at least ``--min-share`` of that
thread's samples, lines merged per function. A thread is named by the function it runs.
py-spy pauses a process for each sample, so the runs are slower than run.py's: compare
contenders within one profile, not with run.py's times.

Writes results/<date>-profile-<workload>.json (--tag T: ...-<workload>-T.json; --smoke:
<date>-smoke-profile-..., which results/.gitignore keeps out of git) and prints a markdown
table.
"""

import argparse
import collections
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import workloads
from ab import contender
from ray_backend import _frame
from run import RESULTS, ROOT

HERE = Path(__file__).resolve().parent
THREADING = ("Thread._bootstrap", "Thread._bootstrap_inner", "Thread.run")


def child_main(workload, name, chunk, repeats, rounds, smoke):
    """The profiled process: contender ``name`` over the workload, ``repeats`` times."""
    import contenders

    w = workloads.workloads(smoke)[workload]
    contenders.preload(name)
    for _ in range(repeats):
        count, _, _ = contenders.run(name, contenders.Job(w, w.n, chunk, rounds))
        if count != w.n:
            sys.exit(f"{name}: {count} results of {w.n}")


def record(args, name, chunk, rounds, folder):
    """py-spy's raw (folded) output of one contender's child."""
    # The venv's own bin first: a venv's python run by its path has no PATH entry there.
    exe = shutil.which("py-spy", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                       os.environ.get("PATH", "")]))
    if exe is None:
        sys.exit('py-spy is not installed: pip install -e ".[bench]"')
    out, done = Path(folder) / f"{name}-{chunk}.txt", Path(folder) / f"{name}-{chunk}.done"
    child = [sys.executable, str(Path(__file__).resolve()), "--child", args.workload, name,
             str(chunk), str(args.repeats), str(rounds), str(done), *(["--smoke"] * args.smoke)]
    gil = ["--gil"] if args.gil else []
    subprocess.run([exe, "record", "--subprocesses", "--threads", *gil, "--rate", str(args.rate),
                    "--format", "raw", "--output", str(out), "--", *child],
                   check=True, stdout=subprocess.DEVNULL, cwd=HERE)
    if not done.exists():  # py-spy's own status does not say how the child ended
        sys.exit(f"--run {name}:{chunk}: the profiled child failed (its error is above)")
    return out


def _role_and_thread(frames, code):
    """('caller' or 'under the caller', thread) of one folded stack: with --subprocesses
    each stack starts with the processes from the child down. A thread is named by the
    function it was started with: py-spy's thread names go stale when a later thread reuses
    an earlier one's pthread id (a Pool made per repeat)."""
    processes = [f for f in frames if f.startswith("process ")]
    role = "caller" if len(processes) == 1 else "under the caller"
    names = [f.partition(" (")[0] for f in code]
    if not names or names[0] == "<module>":
        return role, "main thread"
    # threading's frames, down to the function the thread runs (a Thread subclass's run,
    # or Thread.run's target); a thread started by _thread is named by its first frame.
    skip = 0
    while skip < len(names) - 1 and names[skip] in THREADING:
        skip += 1
    return role, _frame(code[skip])


def _timed(frame):
    """Whether a frame is contenders.run, the call run.py's child times."""
    return frame.startswith("run (") and "contenders.py:" in frame


def summarize(path, min_share, per_s):
    """{role: {"share": s, "threads": {thread: {"share": s, "s": t, "self": [[fn, share]]}}}},
    t the thread's seconds on the stack per run (``per_s``: samples per second of one run)."""
    samples = collections.Counter()
    own = collections.defaultdict(collections.Counter)
    for line in Path(path).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        code = [f for f in frames if not f.startswith(("process ", "thread "))]
        if code and code[0].startswith("<module> ") and not any(map(_timed, code)):
            continue  # a main thread outside the contender's run: imports, start, exit
        where = _role_and_thread(frames, code)
        samples[where] += int(count)
        if code:
            own[where][_frame(code[-1])] += int(count)
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
    """One markdown table: a row per (run, role, thread) and its top functions."""
    lines = ["| run | process, thread | s on the stack per run | share of samples | on top of "
             "the stack (share of the thread's samples) |", "|---|---|---|---|---|"]
    for run, summary in runs.items():
        for role, entry in summary.items():
            for thread, t in entry["threads"].items():
                if t["share"] < 0.01:
                    continue
                top = ", ".join(f"{fn} {share:.0%}" for fn, share in t["self"])
                lines.append(f"| {run} | {role}, {thread} | {t['s']:.3f} | {t['share']:.0%} "
                             f"| {top} |")
    return "\n".join(lines)


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
    p.add_argument("--smoke", action="store_true", help="run.py's tiny workloads (CI)")
    p.add_argument("--tag", help="appended to the output file's name")
    p.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        workload, name, chunk, repeats, rounds, done = args.child
        chunk = int(chunk) if chunk.isdigit() else chunk
        child_main(workload, name, chunk, int(repeats), int(rounds), args.smoke)
        Path(done).touch()
        return None
    if not args.run:
        p.error("give at least one --run NAME:CHUNK")
    if args.workload not in workloads.workloads(args.smoke):
        sys.exit(f"unknown workload {args.workload!r}")
    rounds = args.rounds or workloads.calibrate()
    runs = {}
    with tempfile.TemporaryDirectory() as folder:
        for spec in args.run:
            name, chunk, checkout = contender(spec, None)
            if checkout != ROOT:
                sys.exit(f"--run {spec}: profile.py runs this checkout's mpbatch only")
            runs[f"{name}:{chunk}"] = summarize(record(args, name, chunk, rounds, folder),
                                                args.min_share, args.rate * args.repeats)
    md = table(runs)
    print(md)
    smoke = "-smoke" if args.smoke else ""
    stem = f"{datetime.date.today()}{smoke}-profile-{args.workload}" + (
        f"-{args.tag}" if args.tag else "")
    out = RESULTS / f"{stem}.json"
    out.write_text(json.dumps({"workload": args.workload, "repeats": args.repeats,
                               "rate": args.rate, "command": " ".join(sys.argv),
                               "runs": runs, "table_md": md}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
