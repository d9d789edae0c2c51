"""The ``mpbatch`` command (caller process): run a job on a file, list dead letters, replay.

Exit status: 0 every item succeeded, 1 some were dead-lettered (the count on stderr), 2 a
usage error (one line naming what and where, before any worker starts), 130 Ctrl-C.
Output lines go to stdout (or --output); progress, the report and messages to stderr.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from .dispatch import PER_WORKER, ROUTINGS
from .inputs import Input
from .report import Report, pyplot

OK, DEAD, USAGE, INTERRUPTED = 0, 1, 2, 130

RUN_EXAMPLE = """example:
  mpbatch run examples/jobs.py:fingerprint examples/data/requests.jsonl --key service \\
      --output fingerprints.jsonl --dead-letters failed.sqlite
  (jobs.py:  def fingerprint(batch): return {service: [digest(r) for r in requests]
                                              for service, requests in batch.items()})"""
DEAD_EXAMPLE = """example:
  mpbatch dead-letters failed.sqlite            a table, one row per item
  mpbatch dead-letters failed.sqlite --json     one JSON object per line"""
REPLAY_EXAMPLE = """example:
  mpbatch replay failed.sqlite examples/jobs.py:fingerprint_one --per-item --max-attempts 3
  (items that now succeed leave the store; the others stay, with their new error)"""


class UsageError(Exception):
    """Something the user gave cannot be used: exit 2 with this message."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not argparse's two
        self.exit(USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mpbatch`` and ``python -m mpbatch``; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        return args.command(args)
    except UsageError as exc:
        print(f"mpbatch {args.name}: {exc}", file=sys.stderr)
        return USAGE


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mpbatch", description="Keyed batch jobs across worker processes.")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    _run_parser(commands)
    _dead_letters_parser(commands)
    _replay_parser(commands)
    return parser


def _run_parser(commands: Any) -> None:
    run = commands.add_parser(
        "run", help="run FUNCTION on every item of INPUT", epilog=RUN_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run MODULE:FUNCTION on every item of INPUT, in batches, across worker "
                    "processes; write one JSON line per item that succeeded.")
    run.add_argument("function", metavar="MODULE:FUNCTION",
                     help="a dotted module on sys.path (the current directory is on it) or a "
                          "path to a .py file, and a function in it: do(batch) as for "
                          "mpbatch.Batcher, or, with --per-item, f(item)")
    run.add_argument("input", metavar="INPUT", help="a JSON Lines, CSV or text file, or - "
                                                    "(stdin, JSON Lines unless --format)")
    run.add_argument("--format", choices=("jsonl", "csv", "text"),
                     help="the input's format (default: by extension; text for others)")
    run.add_argument("--key", help="FIELD of each item, or MODULE:FUNCTION giving an item's "
                                   "key (default: every item has the key null)")
    run.add_argument("--per-item", action="store_true",
                     help="FUNCTION takes one item and returns its result; a raise fails "
                          "that item alone")
    run.add_argument("--output", default="-", help="JSON Lines output, one line per item: "
                     "key, input and result (default: - for stdout)")
    run.add_argument("--resume", action="store_true",
                     help="continue a job killed before: needs --output FILE; its journal "
                          "lives beside it (FILE.journal)")
    _common(run)
    run.add_argument("--report", metavar="FILE.json", help="write the report as JSON")
    run.add_argument("--plot", metavar="FILE.png",
                     help="draw items/s and each worker's busy share (mpbatch[plot])")
    run.set_defaults(command=_run, name="run")


def _dead_letters_parser(commands: Any) -> None:
    dead = commands.add_parser(
        "dead-letters", help="list the items kept in a dead-letter store", epilog=DEAD_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="List the dead-lettered items kept in FILE.sqlite.")
    dead.add_argument("store", metavar="FILE.sqlite")
    dead.add_argument("--json", action="store_true", help="one JSON object per line")
    dead.add_argument("--limit", type=int, default=None, help="show at most this many")
    dead.set_defaults(command=_dead_letters, name="dead-letters")


def _replay_parser(commands: Any) -> None:
    replay = commands.add_parser(
        "replay", help="run the items of a dead-letter store again", epilog=REPLAY_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the items kept in FILE.sqlite again through MODULE:FUNCTION: those "
                    "that succeed leave the store, the others stay with their new error "
                    "and attempt count.")
    replay.add_argument("store", metavar="FILE.sqlite")
    replay.add_argument("function", metavar="MODULE:FUNCTION")
    replay.add_argument("--per-item", action="store_true",
                        help="FUNCTION takes one item and returns its result")
    _common(replay)
    replay.set_defaults(command=_replay, name="replay")


def _common(parser: argparse.ArgumentParser) -> None:
    """The Batcher's options as flags, and the report's."""
    group = parser.add_argument_group("batching (see help(mpbatch.Batcher))")
    group.add_argument("--size", type=int, help="items per batch (default 100)")
    group.add_argument("--max-bytes", type=int, help="also flush at this many bytes")
    group.add_argument("--interval", type=float, help="seconds an item may wait (default 0.1)")
    group.add_argument("--workers", type=int, help="worker processes (default: the CPUs)")
    group.add_argument("--buffer", type=int, help="items in flight per worker (default 10000)")
    group.add_argument("--routing", choices=ROUTINGS)
    group.add_argument("--spill-after", type=float, metavar="SECONDS",
                       help="with --routing affinity: queued work before a key moves "
                            "(default 0.05; never under four batches of items)")
    group.add_argument("--max-attempts", type=int, help="tries per item (default 1)")
    group.add_argument("--retry-backoff", type=float, help="seconds before a retry (0.1)")
    group.add_argument("--timeout", type=float, help="seconds one batch may run")
    group.add_argument("--start-method", choices=("fork", "spawn", "forkserver", "zygote"))
    parser.add_argument("--dead-letters", metavar="FILE.sqlite",
                        help="keep dead-lettered items in this SQLite file")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bar and no report on stderr")


BATCHER_FLAGS = ("size", "max_bytes", "interval", "workers", "buffer", "routing",
                 "spill_after", "max_attempts", "retry_backoff", "timeout", "start_method")


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in BATCHER_FLAGS
            if getattr(args, name, None) is not None}


def load_function(spec: str, what: str = "MODULE:FUNCTION") -> Callable[..., Any]:
    """The function named by ``module:function`` or ``path/to/file.py:function``."""
    module_name, sep, name = spec.rpartition(":")
    if not sep or not module_name or not name:
        raise UsageError(f"{what} must look like module:function or file.py:function "
                         f"(got {spec!r})")
    module = _module(module_name)
    try:
        fn = getattr(module, name)
    except AttributeError:
        raise UsageError(f"{module_name} has no function {name!r}") from None
    if not callable(fn):
        raise UsageError(f"{spec} is a {type(fn).__name__}, not a function")
    return fn


def _module(name: str) -> Any:
    if name.endswith(".py") or os.sep in name:
        if not os.path.isfile(name):
            raise UsageError(f"no such file: {name}")
        module_name = os.path.splitext(os.path.basename(name))[0]
        spec = importlib.util.spec_from_file_location(module_name, name)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)  # type: ignore[union-attr]
        except Exception as exc:
            raise UsageError(f"{name} failed to load ({type(exc).__name__}: {exc})") from exc
        import cloudpickle

        # Workers cannot import a file by path: its functions travel by value.
        cloudpickle.register_pickle_by_value(module)
        return module
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as with python -m
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise UsageError(f"module {name!r} cannot be imported ({exc})") from exc


def _run(args: argparse.Namespace) -> int:
    from .run import run_job

    fn = load_function(args.function)
    field_key = _key(args.key)
    output = None if args.output is None else args.output
    journal = _journal(args, output)
    _check_writable(output, "--output")
    _check_writable(args.report, "--report")
    _check_plot(args)
    source = _input(args.input, args.format)
    options = _options(args)
    pairs = _pairs(source, field_key, options.get("routing"))
    total = None if args.quiet else source.lines_total()
    try:
        report = run_job(
            fn, pairs, name=getattr(fn, "__name__", "do"), per_item=args.per_item,
            fmt=source.fmt, header=source.header, field_key=field_key, output=output,
            dead_letters=args.dead_letters, journal=journal,
            progress=False if args.quiet else None, total=total,
            job_id=_job_id(args), blank=lambda: source.blank, **options)
    except KeyboardInterrupt as exc:
        report = getattr(exc, "report", None)
        if report is not None:
            _finish(args, report)
        print("mpbatch run: interrupted", file=sys.stderr)
        return INTERRUPTED
    except (TypeError, ValueError) as exc:  # a bad option value, named by the Batcher
        raise UsageError(str(exc)) from exc
    finally:
        source.close()
    return _finish(args, report)


def _key(spec: str | None) -> Any:
    if spec is None:
        return None
    return load_function(spec, "--key") if ":" in spec else spec


def _journal(args: argparse.Namespace, output: str | None) -> str | None:
    if not args.resume:
        return None
    if output in (None, "-"):
        raise UsageError("--resume needs --output FILE (its journal lives beside it)")
    return f"{output}.journal"


def _check_writable(path: str | None, flag: str) -> None:
    """An output that cannot be written is a usage error, before any work."""
    if path in (None, "-"):
        return
    try:
        with open(path, "ab"):
            pass
    except OSError as exc:
        raise UsageError(f"{flag}: cannot write {path}: {exc.strerror or exc}") from exc


def _check_plot(args: argparse.Namespace) -> None:
    if args.plot is None:
        return
    try:
        pyplot()
    except ImportError as exc:
        raise UsageError(f"--plot: {exc}") from exc


def _input(path: str, fmt: str | None) -> Input:
    try:
        return Input(path, fmt)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def _pairs(source: Input, field_key: Any, routing: str | None) -> Any:
    """(caller key, (line, payload)): keys are found in the workers, as the items are
    decoded there, unless routing ("key", "affinity") needs them here."""
    if routing not in PER_WORKER or field_key is None:
        return ((None, pair) for pair in source.pairs())
    from .job import Job

    decoder = Job(lambda batch: None, name="key", fmt=source.fmt, header=source.header,
                  key=field_key)
    return ((_caller_key(decoder, line, payload), (line, payload))
            for line, payload in source.pairs())


def _caller_key(decoder: Any, line: int, payload: Any) -> Any:
    try:
        item = decoder._decode(payload, line)
        key = decoder.key
        return item.get(key) if isinstance(key, str) else key(item)
    except Exception:
        return None  # the worker fails the item, with the reason


def _job_id(args: argparse.Namespace) -> str:
    """What makes two runs the same job, for --resume."""
    return json.dumps([args.function, os.path.abspath(args.input), args.format, args.key,
                       args.per_item])


def _finish(args: argparse.Namespace, report: Report) -> int:
    if not args.quiet:
        print(report, file=sys.stderr)
    if args.report:
        report.save(args.report)
    if args.plot:
        report.plot(args.plot)
    dead = report.dead_lettered + report.dead_before
    if report.interrupted:
        return INTERRUPTED
    if dead:
        where = f" (kept in {report.dead_letters})" if report.dead_letters else ""
        print(f"mpbatch run: {_items(dead)} dead-lettered{where}", file=sys.stderr)
        return DEAD
    return OK


def _items(n: int) -> str:
    return f"{n:,} item" if n == 1 else f"{n:,} items"


def _dead_letters(args: argparse.Namespace) -> int:
    from .deadletters import DeadLetterStore

    if not os.path.isfile(args.store):
        raise UsageError(f"no such file: {args.store}")
    with DeadLetterStore(args.store) as store:
        rows = list(_limited(store, args.limit))
        if args.json:
            for row in rows:
                print(json.dumps(_row_json(row), default=repr))
            return OK
        print(_table(rows, len(store)))
    return OK


def _limited(store: Any, limit: int | None) -> Any:
    for n, row in enumerate(store):
        if limit is not None and n >= limit:
            return
        yield row


def _row_json(row: Any) -> dict[str, Any]:
    return {"id": row.id, "line": row.line, "key": row.key, "value": row.value,
            "error_type": row.error_type, "message": row.message, "attempts": row.attempts,
            "worker": row.worker, "time": row.time, "run_id": row.run_id,
            "traceback": row.traceback}


def _table(rows: list, total: int) -> str:
    def cut(text: Any, width: int) -> str:
        text = str(text).replace("\n", " ")
        return text if len(text) <= width else text[:width - 1] + "…"

    lines = [f"{'id':>5}  {'line':>6}  {'key':<14}  {'value':<28}  {'tries':>5}  error"]
    for r in rows:
        lines.append(f"{r.id:>5}  {'' if r.line is None else r.line:>6}  "
                     f"{cut(r.key, 14):<14}  {cut(r.value, 28):<28}  {r.attempts:>5}  "
                     f"{cut(r.message, 60)}")
    lines.append(f"{total} items in the store" + (f" ({len(rows)} shown)"
                                                   if len(rows) < total else ""))
    return "\n".join(lines)


def _replay(args: argparse.Namespace) -> int:
    from .replay import replay

    if not os.path.isfile(args.store):
        raise UsageError(f"no such file: {args.store}")
    fn = load_function(args.function)
    try:
        report = replay(args.store, fn, per_item=args.per_item,
                        progress=False if args.quiet else None, **_options(args))
    except KeyboardInterrupt as exc:
        report = getattr(exc, "report", None)
        if report is not None and not args.quiet:
            print(report, file=sys.stderr)
        return INTERRUPTED
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    if not args.quiet:
        print(report, file=sys.stderr)
    if report.dead_lettered:
        print(f"mpbatch replay: {_items(report.dead_lettered)} failed again (kept in "
              f"{args.store})", file=sys.stderr)
        return DEAD
    return OK
