"""The file workload: a JSON Lines file through a function, end to end, as a shell user runs it.

    python benchmarks/files.py                 # trivial: 1,000,000 records; work: 100,000
    python benchmarks/files.py --smoke         # 20,000 / 2,000 records, 1 repeat

Contenders, each a fresh process tree timed as a whole (read, run, write), interleaved:
  serial        python file_jobs.py serial: json.loads -> function -> json.dumps per line
  parallel      GNU parallel --pipe -j2 --block B running that loop on each block (B swept,
                the best kept); needs Debian's `parallel`
  per-item      mpbatch run file_jobs.py:FN_one INPUT --per-item --workers 2
  batch         mpbatch run file_jobs.py:FN_batch INPUT --workers 2
  halves        the floor: the serial loop on each half of the file (split beforehand, not
                timed), two processes at once, outputs concatenated: what 2 vCPUs allow
                with no coordination at all (scored like the others, never the bar)
Every output is checked: one line per record, every id once. Scores: records/s (median of
the repeats), its ratio to serial and to GNU parallel in the same run, efficiency for the
~100 us function (serial wall / 2 / wall), and the peak PSS of the process tree.
"""

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
from run import TreeSampler, _cpu_now, communicate_sampled, foreign_cpu

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = HERE / ".data"
RESULTS = HERE / "results"
JOBS = HERE / "file_jobs.py"
MB = 2**20
TARGET_US = 100.0  # the "work" function's cost per record


def calibrate() -> int:
    """sha256 rounds that take about TARGET_US per record on this machine (the median of
    seven samples: one sample taken in a slow moment set the cost at half the target)."""
    samples = []
    for _ in range(7):
        rounds, digest = 2000, b"user-1"
        started = time.perf_counter()
        for _ in range(rounds):
            digest = hashlib.sha256(digest).digest()
        samples.append((time.perf_counter() - started) / rounds)
    return max(1, round(TARGET_US * 1e-6 / statistics.median(samples)))


def input_file(n: int) -> Path:
    DATA.mkdir(exist_ok=True)
    path = DATA / f"records-{n}.jsonl"
    if not path.exists():
        subprocess.run([sys.executable, str(JOBS), "make", str(n), str(path)], check=True)
    return path


def commands(fn: str, src: Path, out: Path, block: str | None) -> dict[str, list[str]]:
    py = sys.executable
    run = [py, "-m", "mpbatch", "run", "--workers", "2", "--quiet", "--output", str(out)]
    cmds = {
        "serial": [py, str(JOBS), "serial", fn, str(src), str(out)],
        "per-item": [*run, f"{JOBS}:{fn}_one", str(src), "--per-item"],
        "batch": [*run, f"{JOBS}:{fn}_batch", str(src)],
    }
    if block is not None:
        cmds["parallel"] = ["bash", "-c", f"parallel --pipe -j2 --block {block} {py} {JOBS} "
                                          f"serial {fn} - - < {src} > {out}"]
    a, b = halves(src)
    cmds["halves"] = ["bash", "-c", f"{py} {JOBS} serial {fn} {a} {out}.a & "
                                    f"{py} {JOBS} serial {fn} {b} {out}.b; wait; "
                                    f"cat {out}.a {out}.b > {out}; rm {out}.a {out}.b"]
    return cmds


def halves(src: Path) -> tuple[Path, Path]:
    """The input split into two files of half its lines each (made once, not timed)."""
    a, b = src.with_suffix(".a.jsonl"), src.with_suffix(".b.jsonl")
    if not a.exists() or not b.exists():
        with open(src, encoding="utf-8") as f:
            lines = f.readlines()
        a.write_text("".join(lines[:len(lines) // 2]), encoding="utf-8")
        b.write_text("".join(lines[len(lines) // 2:]), encoding="utf-8")
    return a, b


def measure(cmd: list[str], n: int, out: Path, rounds: int, timeout: float) -> dict:
    """One run: wall time, peak PSS of the tree, a check of the output."""
    before = _cpu_now()
    env = os.environ | {"FILE_JOBS_ROUNDS": str(rounds), "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    sampler = TreeSampler(proc.pid)
    _, err, _, ended = communicate_sampled(proc, sampler, timeout)
    wall = ended - started
    foreign, _ = foreign_cpu(before, _cpu_now(), sampler.cpu_seconds())
    rec = {"wall_s": wall, "records_per_s": n / wall, "peak_pss_mb": sampler.peak / MB,
           "exit": proc.returncode, "foreign_cpu": foreign, "ok": False}
    if proc.returncode != 0:
        rec["error"] = err[-1000:]
        return rec
    rec["ok"], rec["check"] = check(out, n)
    return rec


def check(out: Path, n: int) -> tuple[bool, str]:
    """One line per record, every id exactly once."""
    seen = bytearray(n)
    lines = 0
    with open(out, encoding="utf-8") as f:
        for line in f:
            lines += 1
            i = json.loads(line)["input"]["id"]
            if seen[i]:
                return False, f"id {i} written twice"
            seen[i] = 1
    return (lines == n and all(seen)), f"{lines} lines for {n} records"


def sweep_blocks(fn: str, src: Path, n: int, rounds: int, blocks: list[str],
                 timeout: float) -> tuple[str, dict]:
    """GNU parallel's best block size for this function (one run each)."""
    out = DATA / "out.jsonl"
    tried = {}
    for block in blocks:
        cmd = commands(fn, src, out, block)["parallel"]
        tried[block] = measure(cmd, n, out, rounds, timeout)
        print(f"  parallel --block {block}: {tried[block]['records_per_s']:,.0f} records/s",
              flush=True)
    best = max((b for b in tried if tried[b]["ok"]), key=lambda b: tried[b]["records_per_s"])
    return best, tried


def run_function(fn: str, n: int, rounds: int, args: argparse.Namespace) -> dict:
    src = input_file(n)
    out = DATA / "out.jsonl"
    print(f"{fn}: {n:,} records from {src}", flush=True)
    if not shutil.which("parallel"):
        print("  GNU parallel is not installed: its contender is skipped", flush=True)
    block, tried = (sweep_blocks(fn, src, n, rounds, args.blocks, args.timeout)
                    if shutil.which("parallel") else (None, {}))
    cmds = commands(fn, src, out, block)
    runs: dict[str, list[dict]] = {name: [] for name in cmds}
    for repeat in range(args.repeats):  # interleaved: a slow phase hits every contender
        for name, cmd in cmds.items():
            rec = measure(cmd, n, out, rounds, args.timeout)
            runs[name].append(rec)
            print(f"  [{repeat + 1}/{args.repeats}] {name:9s} {rec['records_per_s']:>11,.0f} "
                  f"records/s  {rec['peak_pss_mb']:6.1f} MB  {'ok' if rec['ok'] else rec}",
                  flush=True)
    return {"records": n, "block": block, "sweep": tried, "runs": runs,
            "summary": summarize(runs, fn)}


def summarize(runs: dict[str, list[dict]], fn: str) -> dict:
    med = {name: statistics.median(r["records_per_s"] for r in recs)
           for name, recs in runs.items() if recs and all(r["ok"] for r in recs)}
    walls = {name: statistics.median(r["wall_s"] for r in recs) for name, recs in runs.items()}
    out = {}
    for name, rate in med.items():
        row = {"records_per_s": rate,
               "vs_serial": rate / med["serial"] if "serial" in med else None,
               "vs_parallel": rate / med["parallel"] if "parallel" in med else None,
               "peak_pss_mb": max(r["peak_pss_mb"] for r in runs[name])}
        if fn == "work" and "serial" in walls:
            row["efficiency"] = walls["serial"] / 2 / walls[name]
        out[name] = row
    return out


def table(results: dict) -> str:
    lines = ["| function | contender | records/s | x serial | x GNU parallel | efficiency "
             "| peak MB |", "|---|---|---|---|---|---|---|"]
    for fn, res in results.items():
        for name, row in res["summary"].items():
            eff = f"{row['efficiency']:.2f}" if "efficiency" in row else ""
            par = f"{row['vs_parallel']:.2f}" if row["vs_parallel"] is not None else ""
            lines.append(f"| {fn} | {name} | {row['records_per_s']:,.0f} | "
                         f"{row['vs_serial']:.2f} | {par} | {eff} | {row['peak_pss_mb']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny inputs, 1 repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trivial", type=int, default=1_000_000, help="records (trivial)")
    parser.add_argument("--work", type=int, default=100_000, help="records (~100 us each)")
    parser.add_argument("--blocks", default="1M,4M,16M", help="GNU parallel --block sizes")
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    args.blocks = args.blocks.split(",")
    if args.smoke:
        args.repeats, args.trivial, args.work, args.blocks = 1, 20_000, 2_000, ["1M"]
    rounds = calibrate()
    print(f"work: {rounds} sha256 rounds per record (~{TARGET_US:.0f} us)", flush=True)
    results = {"trivial": run_function("trivial", args.trivial, rounds, args),
               "work": run_function("work", args.work, rounds, args)}
    print(table(results))
    stamp = datetime.date.today().isoformat() + ("-smoke" if args.smoke else "")
    path = RESULTS / f"{stamp}-FILES.json"
    env = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                    capture_output=True, text=True).stdout.strip(),
           "python": platform.python_version(), "platform": platform.platform(),
           "cpus": psutil.cpu_count(), "rounds": rounds,
           "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
           "parallel": subprocess.run(["parallel", "--version"], capture_output=True,
                                      text=True).stdout.splitlines()[0]
           if shutil.which("parallel") else None}
    path.write_text(json.dumps({"environment": env, "results": results,
                                "table_md": table(results)}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
