"""A/B of mpbatch checkouts: one workload, contenders from different checkouts, interleaved.

    python benchmarks/ab.py --workload W2 --chunk 50 --repeats 8 \\
        --run ppe:200 --run mpbatch-add_many@/tmp/before --run mpbatch-add_many@/tmp/after

Each ``--run`` is ``contender[:chunk][@DIR]``: a contender of run.py, its chunk size
(default ``--chunk``) and the checkout to import mpbatch from (default this one). Every run
is run.py's own measured child (a fresh process, its tree's PSS sampled), so figures compare
with run.py's. The order rotates each repeat, and every other round of rotations runs it
backwards: no contender always runs first, nor always right after the same one. Reported:
medians of wall time, peak PSS, the caller's CPU and the CPU of the processes it reaped
(its workers, except under forkserver), and each run's wall divided by the first
``--run``'s in the same repeat (median and range): the ratio this VM's drifting speed leaves
the least noisy. On the paced W4, whose wall is its schedule's, also the medians of each
run's p50 and p99 latency and its p99 over the first run's in the same repeat. ``--gc
on|freeze|off`` also reports the caller's cyclic-GC collections of each generation and
their CPU, with the GC as it is, frozen (``gc.freeze()`` once imports are done) or off, in
every run. The JSON (every run, in its order) goes to
results/<date>-ab-<workload>[-gc-<mode>].json (``--smoke``: <date>-smoke-ab-...); when a run
fails or the run is interrupted, what was measured goes to <...>-ab-<workload>-failed.json
instead.
"""

import argparse
import compileall
import json
import statistics
import sys
from pathlib import Path

import run
import workloads

HERE = Path(__file__).resolve().parent


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", default="W2", help="a workload of run.py (default W2)")
    p.add_argument("--run", action="append", required=True, metavar="NAME[:CHUNK][@DIR]",
                   help="a contender, its chunk size and its checkout; the first is the base")
    p.add_argument("--chunk", type=int, default=50, help="chunk size where a --run has none")
    p.add_argument("--repeats", type=at_least_one, default=5, metavar="N",
                   help="interleaved rounds (default 5)")
    p.add_argument("--rounds", type=int, help="sha256 rounds per unit (default: calibrate)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--timeout", type=float, default=600, help="s per run")
    p.add_argument("--smoke", action="store_true", help="run.py's tiny workloads (CI)")
    p.add_argument("--gc", choices=run.GC_MODES,
                   help="the caller's cyclic GC in every run: on (as it is), freeze "
                        "(gc.freeze() once imports are done) or off; each then reports its "
                        "collections and their CPU (default: as it is, not measured)")
    return p.parse_args(argv)


def at_least_one(text):
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {n}")
    return n


def contender(text, chunk):
    """'mpbatch-add_many:50@/tmp/x' -> (name, chunk, checkout); a chunk may be a word that
    the contender takes (joblib's 'auto')."""
    text, _, where = text.partition("@")
    name, _, size = text.partition(":")
    if name not in run.contenders.CONTENDERS:
        sys.exit(f"unknown contender {name!r}; known: {list(run.contenders.CONTENDERS)}")
    checkout = Path(where).resolve() if where else run.ROOT
    if not (checkout / "mpbatch").is_dir():
        sys.exit(f"--run {text}@{where}: no mpbatch/ in {checkout}")
    return name, (int(size) if size.isdigit() else size) if size else chunk, checkout


def rounds_of(labels, repeats):
    """The order of each repeat: rotated by one each time, backwards every other round."""
    n = len(labels)
    for r in range(repeats):
        turned = labels[r % n:] + labels[:r % n]
        yield r, turned[::-1] if (r // n) % 2 else turned


def spec(args, w, name, chunk, checkout, rounds):
    settings = argparse.Namespace(workers=args.workers, start_method=None, smoke=args.smoke,
                                  big=False, mpbatch=checkout, max_bytes=None)
    return run.make_spec(settings, w, name, w.n, chunk, rounds) | {"gc": args.gc}


def checkout_facts(checkout):
    """What run.py records of the mpbatch it measured, for one checkout."""
    settings = argparse.Namespace(mpbatch=checkout)
    # bytecode, as run.py makes it (see run.mpbatch_importable)
    compileall.compile_dir(str(checkout / "mpbatch"), quiet=1)
    return {"commit": run._git("rev-parse", "--short", "HEAD", cwd=checkout),
            "dirty": bool(run._git("status", "--porcelain", "--", "mpbatch", cwd=checkout)),
            "digest": run.mpbatch_digest(settings)}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    labels = args.run
    if len(set(labels)) < len(labels):
        sys.exit("each --run once: a repeated one would be measured twice under one name")
    w = workloads.workloads(args.smoke, False)[args.workload]
    runs = dict(zip(labels, (contender(text, args.chunk) for text in labels), strict=True))
    rounds = args.rounds or workloads.calibrate()
    facts = {str(c): checkout_facts(c) for c in {c for _, _, c in runs.values()}}
    env = {"python": sys.version.split()[0], "rounds_per_unit": rounds, "checkouts": facts,
           "argv": argv, "commit": run._git("rev-parse", "--short", "HEAD")}
    walls = {label: [] for label in labels}
    records = []
    failure = "interrupted"  # until every round has run
    try:
        failure = measure_all(args, w, runs, rounds, walls, records)
    finally:
        summary = None if failure else summarise(labels, walls, records)
        path = HERE / "results" / (f"{run.stem(args)}-ab-{w.name}"
                                   f"{f'-gc-{args.gc}' if args.gc else ''}"
                                   f"{'-failed' if failure else ''}.json")
        path.write_text(json.dumps({"workload": w.name, "environment": env,
                                    "summary": summary, "table_md": summary and table(summary),
                                    "failure": failure, "runs": records},
                                   indent=1, default=repr))
    if failure:
        sys.exit(f"{failure}\n(the runs so far are in {path})")
    print(table(summary))
    print(f"wrote {path}")


def measure_all(args, w, runs, rounds, walls, records):
    """Every round, in rounds_of's orders; the first failure's description, or None."""
    for r, order in rounds_of(list(runs), args.repeats):
        for label in order:
            name, chunk, checkout = runs[label]
            rec = run.measure(spec(args, w, name, chunk, checkout, rounds), args.timeout)
            records.append(rec | {"label": label, "repeat": r})
            if not rec.get("ok"):
                return f"{label} FAILED: {rec.get('error') or rec.get('stderr_tail')}"
            if rec.get("leftovers"):
                return f"{label}: LEFTOVER processes after its run: {rec['leftovers']}"
            walls[label].append(rec["wall"])
            latency = _latency(rec)
            shown = (f"p50 {latency['p50_ms']:.2f} ms, p99 {latency['p99_ms']:.2f} ms"
                     if latency else f"peak PSS {(rec.get('peak_pss') or 0) / 2**20:.1f} MB")
            print(f"[{r}] {label}: {rec['wall']:.3f} s, {shown}", flush=True)
    return None


def _latency(rec):
    """A paced run's (W4's) latency percentiles, or None: its wall is the schedule's."""
    extra = rec.get("extra") or {}
    if extra.get("p99_ms") is None:
        return None
    return {"p50_ms": extra["p50_ms"], "p99_ms": extra["p99_ms"]}


def summarise(labels, walls, records):
    base = walls[labels[0]]
    out = []
    for label in labels:
        ratios = [x / y for x, y in zip(walls[label], base, strict=True)]
        mine = [rec for rec in records if rec["label"] == label]
        pss = median_of(mine, "peak_pss")
        row = {"label": label, "wall": statistics.median(walls[label]),
               "ratio": statistics.median(ratios), "low": min(ratios), "high": max(ratios),
               "pss_mb": None if pss is None else pss / 2**20,
               "caller_cpu": median_of(mine, "caller_cpu"),
               "reaped_cpu": median_of(mine, "reaped_cpu")}
        if all(_latency(rec) for rec in records):  # paced (W4): what to compare is latency
            first = {rec["repeat"]: _latency(rec)["p99_ms"] for rec in records
                     if rec["label"] == labels[0]}
            p99s = [_latency(rec)["p99_ms"] / first[rec["repeat"]] for rec in mine]
            row["p50_ms"] = statistics.median(_latency(rec)["p50_ms"] for rec in mine)
            row["p99_ms"] = statistics.median(_latency(rec)["p99_ms"] for rec in mine)
            row["p99_ratio"] = (statistics.median(p99s), min(p99s), max(p99s))
        if all("gc" in rec for rec in mine):
            row["gc_cpu"] = [statistics.median(rec["gc"]["cpu_s"][g] for rec in mine)
                             for g in range(3)]
            row["gc_collections"] = [statistics.median(rec["gc"]["collections"][g]
                                                       for rec in mine) for g in range(3)]
        out.append(row)
    return out


def median_of(records, field):
    values = [rec[field] for rec in records if rec.get(field) is not None]
    return statistics.median(values) if values else None


def table(summary):
    gc_shown = all("gc_cpu" in row for row in summary)
    latency_shown = all("p99_ms" in row for row in summary)
    head = ("| run | wall s (median) | wall ÷ first, run by run: median (range) | peak PSS MB "
            "| caller CPU s | reaped CPU s |")
    head += " p50 ms | p99 ms | p99 ÷ first, run by run |" if latency_shown else ""
    lines = [head + (" GC CPU s, gen 0 / 1 / 2 (collections) |" if gc_shown else ""),
             "|---|---|---|---|---|---|" + ("---|---|---|" if latency_shown else "")
             + ("---|" if gc_shown else "")]
    for row in summary:
        cells = [row["label"], f"{row['wall']:.3f}",
                 f"{row['ratio']:.3f} ({row['low']:.3f}-{row['high']:.3f})",
                 run.or_dash(row["pss_mb"], ".1f"), run.or_dash(row["caller_cpu"], ".3f"),
                 run.or_dash(row["reaped_cpu"], ".3f")]
        if latency_shown:
            mid, low, high = row["p99_ratio"]
            cells += [f"{row['p50_ms']:.2f}", f"{row['p99_ms']:.2f}",
                      f"{mid:.2f} ({low:.2f}-{high:.2f})"]
        if gc_shown:
            cells.append(" / ".join(f"{s:.3f} ({n:.0f})" for s, n in
                                    zip(row["gc_cpu"], row["gc_collections"], strict=True)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
