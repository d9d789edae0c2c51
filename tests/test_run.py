"""mpbatch.run(): a whole job in one call, its Report, output, dead letters and journal."""

import json
import math

import pytest

import mpbatch
from tests import fns


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_run_writes_one_line_per_item_and_reports(tmp_path):
    out = tmp_path / "out.jsonl"
    report = mpbatch.run(fns.double, ((f"k{i % 3}", i) for i in range(1000)), output=out,
                         workers=2, size=50, progress=False)
    lines = read_lines(out)
    assert sorted((x["key"], x["input"], x["result"]) for x in lines) == sorted(
        (f"k{i % 3}", i, 2 * i) for i in range(1000))
    assert (report.accepted, report.succeeded, report.dead_lettered, report.pending) == (
        1000, 1000, 0, 0)
    assert report.ok and report.batches >= 20 and sum(
        n * k for n, k in report.batch_sizes.items()) == 1000
    assert len(report.busy) == 2 and all(0 <= b <= 1 for b in report.busy)
    assert report.wall_s > 0 and report.items_per_s > 0
    assert 0 < report.do_ms_p50 <= report.do_ms_p99 <= report.do_ms_max
    assert "1,000 succeeded" in str(report)


def test_run_with_key_and_per_item_keeps_failures_apart(tmp_path):
    rows = [{"n": n, "g": n % 2} for n in range(40)]
    got = []
    report = mpbatch.run(fns.double_n, rows, key=lambda row: row["g"], per_item=True,
                         dead_letters=tmp_path / "dl.sqlite", workers=2, size=8,
                         on_result=lambda k, vs, rs: got.extend(zip(vs, rs, strict=True)),
                         progress=False)
    assert sorted((row["n"], r) for row, r in got) == [(n, 2 * n) for n in range(40) if n != 13]
    assert (report.succeeded, report.dead_lettered) == (39, 1) and not report.ok
    with mpbatch.DeadLetterStore(tmp_path / "dl.sqlite") as store:
        (row,) = list(store)
    assert (row.key, row.value, row.line) == (1, {"n": 13, "g": 1}, 14)
    assert "unlucky 13" in row.message


def test_run_takes_pairs_unless_key_is_given():
    with pytest.raises(TypeError, match="run\\(\\) takes \\(key, value\\) pairs unless key= "
                                        "is given; item 1 is int"):
        mpbatch.run(fns.double, [5, 6], workers=1, progress=False)


def test_run_passes_batcher_options_through():
    with pytest.raises(ValueError, match="size must be >= 1"):
        mpbatch.run(fns.double, [("k", 1)], size=0, progress=False)


def test_report_counts_hold_the_invariant_and_save_as_json(tmp_path):
    report = mpbatch.run(fns.double_n, ({"n": n} for n in range(30)), key=lambda r: None,
                         per_item=True, workers=2, size=5, progress=False)
    assert report.accepted == (report.succeeded + report.dead_lettered + report.cancelled
                               + report.pending) == 30
    report.save(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert (data["succeeded"], data["dead_lettered"], data["ok"]) == (29, 1, False)
    assert data["timeline"] and set(data["timeline"][0]) == {"t", "done", "busy"}


def test_report_plot_draws_a_png(tmp_path):
    pytest.importorskip("matplotlib")  # the [plot] extra; the test extra installs it
    report = mpbatch.run(fns.slow_double, ((f"k{i % 4}", i) for i in range(400)), workers=2,
                         size=10, progress=False)
    report.plot(tmp_path / "run.png")
    assert (tmp_path / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_journal_resumes_a_run_without_doing_anything_twice(tmp_path):
    out, journal = tmp_path / "out.jsonl", tmp_path / "out.journal"
    first = mpbatch.run(fns.double, ((None, i) for i in range(300)), output=out,
                        journal=journal, workers=2, size=10, progress=False)
    again = mpbatch.run(fns.double, ((None, i) for i in range(500)), output=out,
                        journal=journal, workers=2, size=10, progress=False)
    assert (first.succeeded, again.succeeded, again.skipped) == (300, 200, 300)
    assert sorted(x["input"] for x in read_lines(out)) == list(range(500))


def test_a_journal_needs_an_output_file(tmp_path):
    with pytest.raises(ValueError, match="journal= \\(--resume\\) needs an output file"):
        mpbatch.run(fns.double, [("k", 1)], journal=tmp_path / "j", progress=False)


def test_a_result_json_cannot_hold_fails_alone(tmp_path):
    report = mpbatch.run(lambda batch: {k: [math.nan if v == 3 else v for v in vs]
                                        for k, vs in batch.items()},
                         ((None, i) for i in range(6)), output=tmp_path / "o.jsonl",
                         workers=1, size=6, progress=False)
    assert (report.succeeded, report.dead_lettered) == (5, 1)
