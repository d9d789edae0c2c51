"""The mpbatch command, run as a user's shell runs it: real processes, exit codes, files."""

import json
import os
import pty
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

import mpbatch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mpbatch_cmd(*args, stdin=None, env=None, timeout=60, cwd=ROOT):
    """Run ``python -m mpbatch ARGS`` (what the mpbatch script runs) and wait for it."""
    return subprocess.run([sys.executable, "-m", "mpbatch", *map(str, args)], cwd=cwd,
                          input=stdin, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": ROOT, **(env or {})})


def start_cmd(*args, env=None):
    return subprocess.Popen([sys.executable, "-m", "mpbatch", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,
                            env={**os.environ, "PYTHONPATH": ROOT, **(env or {})})


def write_jsonl(path, rows, extra=""):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.write(extra)
    return path


def outputs(text):
    return [json.loads(line) for line in text.splitlines()]


def test_run_a_jsonl_file_with_a_key_to_an_output_file(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"n": n, "g": n % 3} for n in range(200)])
    out = tmp_path / "out.jsonl"
    proc = mpbatch_cmd("run", "tests.fns:double_rows", src, "--key", "g", "--output", out,
                       "--workers", 2, "--size", 16)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""  # the lines went to --output
    got = outputs(out.read_text())
    assert sorted((x["key"], x["input"]["n"], x["result"]) for x in got) == sorted(
        (n % 3, n, 2 * n) for n in range(200))
    assert "200 succeeded, 0 dead-lettered" in proc.stderr  # the report, on stderr


def test_output_defaults_to_stdout_and_stdin_is_jsonl(tmp_path):
    rows = "".join(json.dumps({"n": n}) + "\n" for n in range(5)) + "\n"  # a blank line
    proc = mpbatch_cmd("run", "tests.fns:double_n", "-", "--per-item", "--quiet", stdin=rows)
    assert proc.returncode == 0, proc.stderr
    assert sorted(x["result"] for x in outputs(proc.stdout)) == [0, 2, 4, 6, 8]
    assert proc.stderr == ""  # --quiet


def test_a_file_given_as_a_path_and_text_input(tmp_path):
    job = tmp_path / "job.py"
    job.write_text("def shout(line):\n    return line.upper() + '!'\n")
    src = tmp_path / "in.txt"
    src.write_text("one\ntwo\n")
    proc = mpbatch_cmd("run", f"{job}:shout", src, "--per-item", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert sorted(x["result"] for x in outputs(proc.stdout)) == ["ONE!", "TWO!"]


def test_csv_rows_are_dicts_and_a_bad_row_is_dead_lettered_with_its_line(tmp_path):
    src = tmp_path / "in.csv"
    src.write_text('n,g\n1,a\n2,"b\nc"\n3\n4,a\n')  # a quoted newline; a row of one field
    store = tmp_path / "dl.sqlite"
    proc = mpbatch_cmd("run", "tests.fns:double_rows", src, "--dead-letters", store,
                       "--output", tmp_path / "out.jsonl", "--quiet")
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"mpbatch run: 1 item dead-lettered (kept in {store})"
    inputs = sorted(x["input"]["n"] for x in outputs((tmp_path / "out.jsonl").read_text()))
    assert inputs == ["1", "2", "4"]
    listed = mpbatch_cmd("dead-letters", store, "--json")
    (row,) = outputs(listed.stdout)
    assert (row["line"], row["value"]) == (5, ["3"])
    assert "line 5 has 1 fields; the header has 2" in row["message"]


def test_a_line_that_does_not_parse_is_dead_lettered_and_the_job_goes_on(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"n": n} for n in range(10)],
                      extra='{"n": oops}\n' + json.dumps({"n": 13}) + "\n")
    store = tmp_path / "dl.sqlite"
    proc = mpbatch_cmd("run", "tests.fns:double_n", src, "--per-item", "--dead-letters", store,
                       "--quiet")
    assert proc.returncode == 1
    assert len(outputs(proc.stdout)) == 10
    table = mpbatch_cmd("dead-letters", store)
    assert table.returncode == 0
    assert re.search(r"\b11\b.*oops.*JSONDecodeError", table.stdout)
    assert re.search(r"\b12\b.*unlucky 13", table.stdout)
    assert "2 items in the store" in table.stdout


@pytest.mark.parametrize(("args", "text"), [
    (["run", "tests.fns:no_such_function", "IN"], "tests.fns has no function 'no_such_function'"),
    (["run", "no_such_module:f", "IN"], "module 'no_such_module' cannot be imported"),
    (["run", "tests/fns.py", "IN"], "must look like module:function"),
    (["run", "tests.fns:double_n", "/no/such/input.jsonl"], "cannot read /no/such/input.jsonl"),
    (["run", "tests.fns:double_n", "IN", "--output", "/no/such/dir/out"], "--output: cannot"),
    (["run", "tests.fns:double_n", "IN", "--resume"], "--resume needs --output FILE"),
    (["run", "tests.fns:double_n", "IN", "--size", "0"], "size must be >= 1 (got 0)"),
    (["run", "tests.fns:double_n", "IN", "--size", "x"], "invalid int value: 'x'"),
    (["run", "tests.fns:double_n", "IN", "--format", "xml"], "invalid choice: 'xml'"),
    (["dead-letters", "/no/such/store.sqlite"], "no such file: /no/such/store.sqlite"),
    (["replay", "/no/such/store.sqlite", "tests.fns:double_n"], "no such file"),
])
def test_usage_errors_exit_2_with_one_line(tmp_path, args, text):
    src = write_jsonl(tmp_path / "in.jsonl", [{"n": 1}])
    proc = mpbatch_cmd(*[src if a == "IN" else a for a in args])
    assert proc.returncode == 2, proc
    assert text in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stdout == ""


def test_plot_without_matplotlib_exits_2_before_any_work(tmp_path):
    fake = tmp_path / "fake" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    src = write_jsonl(tmp_path / "in.jsonl", [{"n": 1}])
    proc = mpbatch_cmd("run", "tests.fns:double_n", src, "--per-item", "--plot",
                       tmp_path / "p.png", env={"PYTHONPATH": f"{tmp_path / 'fake'}:{ROOT}"})
    assert proc.returncode == 2
    assert "mpbatch[plot]" in proc.stderr and proc.stdout == ""


def test_report_and_plot_files(tmp_path):
    pytest.importorskip("matplotlib")
    src = write_jsonl(tmp_path / "in.jsonl", [{"n": n} for n in range(20, 120)])
    proc = mpbatch_cmd("run", "tests.fns:double_n", src, "--per-item", "--quiet",
                       "--report", tmp_path / "r.json", "--plot", tmp_path / "r.png")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["accepted"] == report["succeeded"] == 100 and report["ok"]
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("command", ["run", "dead-letters", "replay"])
def test_help_on_every_command_has_an_example(command):
    proc = mpbatch_cmd(command, "--help")
    assert proc.returncode == 0 and "example:" in proc.stdout and "mpbatch" in proc.stdout


def test_python_dash_m_and_the_script_are_the_same_command():
    assert mpbatch_cmd("--help").returncode == 0
    script = os.path.join(os.path.dirname(sys.executable), "mpbatch")
    proc = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "run" in proc.stdout


def test_replay_runs_failed_items_again(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"n": n} for n in range(20)])
    store = tmp_path / "dl.sqlite"
    fixed = tmp_path / "fixed"
    env = {"MPBATCH_FIXED": str(fixed)}
    first = mpbatch_cmd("run", "tests.fns:fails_unless_fixed", src, "--per-item",
                        "--dead-letters", store, "--quiet", env=env)
    assert first.returncode == 1
    again = mpbatch_cmd("replay", store, "tests.fns:fails_unless_fixed", "--per-item",
                        "--max-attempts", 2, "--retry-backoff", 0, "--quiet", env=env)
    assert again.returncode == 1  # still broken: they stay, attempts added up
    with mpbatch.DeadLetterStore(store) as kept:
        rows = list(kept)
    assert len(rows) == 20 and {r.attempts for r in rows} == {3}
    fixed.touch()
    done = mpbatch_cmd("replay", store, "tests.fns:fails_unless_fixed", "--per-item", env=env)
    assert done.returncode == 0, done.stderr
    assert "20 succeeded" in done.stderr
    with mpbatch.DeadLetterStore(store) as kept:
        assert len(kept) == 0


def test_progress_goes_to_stderr_never_stdout(tmp_path):
    """With stderr a terminal (a pty) the bar is drawn there; stdout holds output only."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"n": n} for n in range(300)])
    leader, follower = pty.openpty()
    terminal = []

    def read_terminal():  # while it runs: what a closed pty still held may be dropped
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the other side is closed
                return
            if not chunk:
                return
            terminal.append(chunk)

    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    proc = subprocess.Popen([sys.executable, "-m", "mpbatch", "run", "tests.fns:slow_n", src,
                             "--per-item", "--workers", "2", "--size", "10"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=follower,
                            env={**os.environ, "PYTHONPATH": ROOT})
    os.close(follower)
    out, _ = proc.communicate(timeout=60)
    reader.join(10)
    os.close(leader)
    drawn = b"".join(terminal)
    assert proc.returncode == 0
    assert len(outputs(out.decode())) == 300  # every stdout line is an output line
    assert b"items/s" in drawn and b"300/300" in drawn, drawn[-500:]  # the bar, its total


def test_ctrl_c_stops_reading_and_exits_130_then_resume_finishes(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"n": n} for n in range(3000)])
    out = tmp_path / "out.jsonl"
    args = ("run", "tests.fns:slow_n", src, "--per-item", "--output", out, "--resume",
            "--workers", 2, "--size", 10)
    proc = start_cmd(*args)
    while not out.exists() or out.stat().st_size == 0:  # it has begun writing
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)  # polling a file's size: nothing signals it
    os.killpg(proc.pid, signal.SIGINT)
    started = time.monotonic()
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert time.monotonic() - started < 10  # it did not run the rest
    assert re.search(r"[\d,]+ cancelled", err), err
    first = len(outputs(out.read_text()))
    assert 0 < first < 3000
    rest = mpbatch_cmd(*args, "--quiet")
    assert rest.returncode == 0, rest.stderr
    ns = [x["input"]["n"] for x in outputs(out.read_text())]
    assert sorted(ns) == list(range(3000))  # none skipped, none written twice


@pytest.mark.slow
def test_a_job_killed_again_and_again_resumes_with_nothing_lost_or_doubled(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"n": n} for n in range(4000)])
    out = tmp_path / "out.jsonl"
    args = ("run", "tests.fns:slow_n", src, "--per-item", "--output", out, "--resume",
            "--workers", 2, "--size", 10, "--quiet")
    kills = 0
    for _ in range(4):
        proc = start_cmd(*args)
        size = out.stat().st_size if out.exists() else 0
        while not out.exists() or out.stat().st_size < size + 2000:  # some progress
            if proc.poll() is not None:
                break
            time.sleep(0.05)  # polling a file's size: nothing signals it
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the caller, its workers, all at once
            kills += 1
        proc.communicate(timeout=30)
    final = mpbatch_cmd(*args)
    assert final.returncode == 0, final.stderr
    ns = [x["input"]["n"] for x in outputs(out.read_text())]
    assert kills >= 3
    assert len(ns) == len(set(ns)) == 4000  # no duplicate line, no item skipped
