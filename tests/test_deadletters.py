"""Durable dead letters: a SQLite file, one row per item, committed before it is counted."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

import mpbatch
from mpbatch.deadletters import DeadLetter
from tests import fns


def test_the_store_keeps_keys_values_and_errors_json_or_pickled(tmp_path):
    path = tmp_path / "dl.sqlite"
    error = mpbatch.BatchFailed("do() raised ValueError: bad", "ValueError", "Traceback ...")
    with mpbatch.DeadLetterStore(path) as store:
        store.add(DeadLetter({"a": [1, {"x": [1, 2]}], ("t", 1): [(2, 3)]}, error, 2, 1), "r1")
        store.add_item(None, "not json", ValueError("bad line"), line=7, fmt="jsonl")
        assert len(store) == store.count() == 4
        rows = list(store)
    assert [(r.key, r.value) for r in rows] == [
        ("a", 1), ("a", {"x": [1, 2]}), (("t", 1), (2, 3)), (None, "not json")]
    assert all(type(r.key) is tuple for r in rows if r.key == ("t", 1))  # kept pickled
    first = rows[0]
    assert (first.error_type, first.message, first.traceback) == (
        "ValueError", "do() raised ValueError: bad", "Traceback ...")
    assert isinstance(first.error, mpbatch.BatchFailed) and str(first.error) == str(error)
    assert (first.attempts, first.worker, first.run_id, first.line) == (2, 1, "r1", None)
    assert (rows[3].line, rows[3].format, rows[3].attempts) == (7, "jsonl", 0)
    with mpbatch.DeadLetterStore(path) as store:  # another connection sees them all
        assert store.delete([rows[0].id, rows[2].id, 999]) == 2
        assert [r.value for r in store] == [{"x": [1, 2]}, "not json"]


def test_the_store_reads_many_rows_in_pages(tmp_path):
    with mpbatch.DeadLetterStore(tmp_path / "dl.sqlite") as store:
        store.add(DeadLetter({"k": list(range(1234))}, ValueError("x"), 1, 0))
        assert [r.value for r in store] == list(range(1234))


def test_a_batcher_commits_each_dead_letter_before_it_counts_it(batcher_factory, tmp_path):
    path = tmp_path / "dl.sqlite"
    seen = []

    def on_dead_letter(letter):  # runs before the letter is counted: it is on disk already
        with mpbatch.DeadLetterStore(path) as other:
            seen.append((sum(map(len, letter.batch.values())), len(other)))

    b = batcher_factory(fns.raise_value_error, size=4, workers=2, dead_letters=str(path),
                        on_dead_letter=on_dead_letter)
    for v in range(10):
        b.add(f"k{v % 2}", v)
    b.close()
    assert b.stats().dead_lettered == 10
    committed = 0
    for n, rows in seen:
        committed += n
        assert rows >= committed  # this letter's rows were there when it was reported
    with mpbatch.DeadLetterStore(path) as store:
        rows = list(store)
    assert sorted(r.value for r in rows) == list(range(10))
    assert {r.error_type for r in rows} == {"ValueError"}
    assert all(r.run_id.startswith("batcher-") for r in rows)


def test_a_caller_killed_right_after_a_dead_letter_loses_none(tmp_path):
    path = tmp_path / "dl.sqlite"
    script = textwrap.dedent(f"""
        import os, signal, mpbatch
        from tests import fns

        def die(letter):  # the letter is committed; the caller dies before counting it
            os.kill(os.getpid(), signal.SIGKILL)

        if __name__ == "__main__":
            b = mpbatch.Batcher(fns.raise_value_error, size=3, workers=1,
                                dead_letters={str(path)!r}, on_dead_letter=die)
            for v in range(3):
                b.add("k", v)
            b.flush()
    """)
    root = os.path.dirname(os.path.dirname(__file__))
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, timeout=60,
                          capture_output=True, env=dict(os.environ, PYTHONPATH=root))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    with mpbatch.DeadLetterStore(path) as store:
        assert sorted(r.value for r in store) == [0, 1, 2]


@pytest.mark.parametrize(("path", "error", "text"), [
    (42, TypeError, "dead_letters must be a path"),
    ("/no/such/folder/dl.sqlite", ValueError, "the folder '/no/such/folder' does not exist"),
])
def test_a_bad_dead_letters_path_is_refused_at_construction(path, error, text):
    with pytest.raises(error, match=text):
        mpbatch.Batcher(fns.double, dead_letters=path)


def test_a_folder_is_not_a_store(tmp_path):
    with pytest.raises(ValueError, match="cannot be opened as a SQLite file"):
        mpbatch.Batcher(fns.double, dead_letters=str(tmp_path))
