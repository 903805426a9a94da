"""Long jobs a person can live with: progress with an end in sight, Ctrl-C as a normal
way to stop, work committed as it goes, kill -9 and a rerun that finishes the rest.
Real subprocesses and real signals, the real embedded Postgres."""

from __future__ import annotations

import re
import signal
import time

import pytest

from conftest import query
from pipelines import emotions, reviews
from pipelines.options import parse
from samples import generate
from test_faults import big_file, pipeline_process  # noqa: F401 - a module fixture
from test_stream import wait_for

EMOTION_REVIEWS = 400


def bytes_read(dsn: str) -> int:
    (total,) = query(
        dsn, "SELECT coalesce(sum(value), 0) FROM run_counters WHERE name = 'bytes_read'"
    )[0]
    return total


def finish(child, timeout: float = 600) -> str:
    output, _ = child.communicate(timeout=timeout)
    return output


def test_ctrl_c_stops_a_batch_run_with_one_line_and_keeps_what_is_committed(datalake, big_file):
    path, _ = big_file
    child = pipeline_process(
        "run", "reviews", "--input", path, "--dsn", datalake, "--progress_every", "1"
    )
    try:
        wait_for(lambda: query(datalake, "SELECT count(*) FROM reviews")[0][0] > 0, 120, 0.05)
        wait_for(lambda: bytes_read(datalake) > 0, 60, 0.05)
        time.sleep(2.5)  # a progress line or two (one a second) after the first report
        child.send_signal(signal.SIGINT)
        output = finish(child)
    finally:
        child.kill()
    assert child.returncode == 130, output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
    last = output.strip().splitlines()[-1]
    assert last.startswith("interrupted after ") and "(all committed; run " in last, output
    assert last.endswith("CANCELLED); rerun to continue")
    # Not a terminal: plain progress lines, with the end in sight.
    assert re.search(r"reviews: 1 file: \S+ \S+ of \S+ \S+ \(\d+\.\d%\), .*/s, ETA \d", output)
    ((state, runner, upserted),) = query(
        datalake,
        "SELECT state, runner, (counters->>'reviews_upserted')::int FROM pipeline_runs",
    )
    assert state == "CANCELLED" and runner == "FnApiRunner (in_memory)"
    # What the run says it committed is what is there: every batch whole, or not at all.
    stored = query(datalake, "SELECT count(*) FROM reviews")[0][0]
    assert 0 < stored <= upserted and f"after {upserted:,} records" in last


@pytest.fixture
def lake_with_reviews(datalake, tmp_path) -> str:
    path = tmp_path / "All_Beauty.jsonl"
    generate.write_dataset("reviews", 2023, EMOTION_REVIEWS, str(path), seed=5)
    reviews.run(["--dsn", datalake, "--input", str(path), "--quiet"])
    return datalake


def emotion_rows(dsn: str) -> int:
    return query(dsn, "SELECT count(*) FROM review_emotions")[0][0]


def test_emotions_commit_as_they_go_survive_ctrl_c_and_kill_9_and_a_rerun_finishes(
    lake_with_reviews,
):
    dsn = lake_with_reviews
    (todo,) = query(dsn, "SELECT count(*) FROM reviews WHERE text IS NOT NULL")[0]
    argv = ["run", "emotions", "--dsn", dsn, "--batch_size", "16"]

    # Ctrl-C: the run stops taking reviews, writes what is in flight, says so, exits 130.
    child = pipeline_process(*argv)
    try:
        wait_for(lambda: emotion_rows(dsn) > 0, 300, 0.1)
        child.send_signal(signal.SIGINT)
        output = finish(child)
    finally:
        child.kill()
    assert child.returncode == 130 and "Traceback" not in output, output
    assert f" of {todo:,} reviews (all committed; run " in output.strip().splitlines()[-1]
    ((state, runner, counted),) = query(
        dsn,
        "SELECT state, runner, (counters->>'review_emotions_upserted')::int FROM pipeline_runs"
        " WHERE pipeline = 'emotions'",
    )
    assert state == "CANCELLED" and "FnApiRunner" in runner
    assert counted == emotion_rows(dsn) < todo

    # kill -9: no chance to say anything; what committed is there and consistent.
    before = emotion_rows(dsn)
    child = pipeline_process(*argv)
    try:
        wait_for(lambda: emotion_rows(dsn) > before, 300, 0.1)
    finally:
        child.kill()
        child.wait()
    killed = emotion_rows(dsn)
    assert before < killed < todo
    assert query(
        dsn,
        "SELECT count(*) FROM review_emotions e LEFT JOIN reviews r"
        " USING (review_id) WHERE r.review_id IS NULL",
    ) == [(0,)]

    # A rerun classifies only what is left (no emotion, or no embedding yet: the two are
    # committed apart); together, one row of each per review, none twice.
    ((left,),) = query(
        dsn,
        "SELECT count(*) FROM reviews r WHERE text IS NOT NULL AND (NOT EXISTS (SELECT 1"
        " FROM review_emotions e WHERE e.review_id = r.review_id) OR NOT EXISTS (SELECT 1"
        " FROM review_embeddings b WHERE b.review_id = r.review_id))",
    )
    assert todo - killed <= left < todo
    child = pipeline_process(*argv)
    output = finish(child)
    assert child.returncode == 0, output
    assert f"{left:,} reviews to classify" in output
    assert emotion_rows(dsn) == todo
    assert query(dsn, "SELECT count(*) FROM review_embeddings") == [(todo,)]
    assert query(
        dsn,
        "SELECT state, count(*) FROM pipeline_runs WHERE pipeline = 'emotions'"
        " GROUP BY 1 ORDER BY 1",
    ) == [("ABANDONED", 1), ("CANCELLED", 1), ("DONE", 1)]


def test_a_second_ctrl_c_exits_at_once(lake_with_reviews):
    child = pipeline_process("run", "emotions", "--dsn", lake_with_reviews, "--batch_size", "8")
    try:
        wait_for(lambda: emotion_rows(lake_with_reviews) > 0, 300, 0.1)
        child.send_signal(signal.SIGINT)
        time.sleep(0.2)
        child.send_signal(signal.SIGINT)
        started = time.monotonic()
        output = finish(child, 30)
    finally:
        child.kill()
    assert child.returncode == 130 and time.monotonic() - started < 5, output
    assert "interrupted again: exiting now" in output and "Traceback" not in output


def test_run_emotions_says_its_cost_before_a_long_run(lake_with_reviews, capsys):
    dsn = lake_with_reviews
    emotions.run(["--dsn", dsn, "--limit", "200", "--quiet"])  # a run to learn the rate from
    (todo,) = query(dsn, "SELECT count(*) FROM reviews WHERE text IS NOT NULL")[0]
    options = parse(["--dsn", dsn])
    emotions.say_cost(todo - 200, options.view_as(emotions.EmotionOptions), options, dsn, 100)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"{todo - 200:,} reviews to classify, ~"), line
    assert " reviews/s (the rate of run " in line and "on this machine)" in line
    assert line.endswith("--limit N for fewer; Ctrl-C keeps what is done")
