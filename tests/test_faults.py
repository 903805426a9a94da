"""Faults a long run meets: the database restarting under it, its own process killed.
Real processes, the real embedded Postgres (stopped and started inside the test)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import query
from connectors.datalake import stop_embedded
from samples import generate
from test_stream import wait_for
from transforms.clean import clean_review
from transforms.parse import parse_record
from transforms.records import RawRecord

ROOT = Path(__file__).resolve().parent.parent


def pipeline_process(*args: str, **env: str) -> subprocess.Popen:
    """``python -m pipelines ARGS`` as a real child, SIGINT at its default (as a shell's
    foreground job has it), its output captured."""
    return subprocess.Popen(
        [sys.executable, "-m", "pipelines", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


@pytest.fixture(scope="module")
def big_file(tmp_path_factory) -> tuple[str, int]:
    """120,000 generated 2018 reviews (a few seconds of work) and how many distinct keys."""
    path = tmp_path_factory.mktemp("faults") / "Books_5.jsonl"
    generate.write_dataset("reviews", 2018, 120_000, str(path), seed=11)
    keys = {
        clean_review(parse_record(RawRecord(str(path), number, line))).review_id
        for number, line in enumerate(Path(path).read_text().splitlines(), 1)
    }
    return str(path), len(keys)


def test_a_database_restart_during_a_run_loses_nothing(datalake, big_file):
    path, distinct = big_file
    child = pipeline_process(
        "run", "reviews", "--input", path, "--dsn", datalake, "--batch_size", "2000"
    )
    try:
        wait_for(lambda: query(datalake, "SELECT count(*) FROM reviews")[0][0] > 0, 120, 0.05)
        stop_embedded()  # the server goes away mid-run (fast shutdown: connections cut)
        time.sleep(3)
        # and comes back, as its error message tells a user: `db status` restarts it
        subprocess.run(
            [sys.executable, "-m", "pipelines", "db", "status"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            timeout=120,
        )
        output, _ = child.communicate(timeout=600)
    finally:
        child.kill()
    assert child.returncode == 0, output
    assert "reviews: DONE" in output and "retrying" in output, output
    (reviews,) = query(datalake, "SELECT count(*) FROM reviews")[0]
    (dead,) = query(datalake, "SELECT count(*) FROM dead_letters")[0]
    (read,) = query(
        datalake,
        "SELECT (counters->>'records_read')::int FROM pipeline_runs WHERE pipeline = 'reviews'",
    )[0]
    # Every record is a row (duplicates collapse) or a dead letter: none lost in the restart.
    assert read == 120_000 and dead == 0
    assert reviews == distinct


def test_a_killed_run_is_abandoned_for_every_reader_and_a_rerun_finishes_it(datalake, big_file):
    path, distinct = big_file
    child = pipeline_process("run", "reviews", "--input", path, "--dsn", datalake)
    try:
        wait_for(lambda: query(datalake, "SELECT count(*) FROM reviews")[0][0] > 0, 120, 0.05)
    finally:
        child.kill()  # kill -9: no chance to record anything
        child.wait()
    assert query(datalake, "SELECT state FROM pipeline_runs") == [("RUNNING",)]
    listing = subprocess.run(
        [sys.executable, "-m", "pipelines", "runs", "--dsn", datalake],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listing.returncode == 0 and " ABANDONED " in listing.stdout, listing.stdout
    assert query(datalake, "SELECT state FROM pipeline_runs") == [("ABANDONED",)]
    # Committed batches are there and consistent; a rerun completes the rest, once.
    (kept,) = query(datalake, "SELECT count(*) FROM reviews")[0]
    rerun = pipeline_process("run", "reviews", "--input", path, "--dsn", datalake)
    output, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, output
    assert 0 < kept <= distinct == query(datalake, "SELECT count(*) FROM reviews")[0][0]
    assert query(datalake, "SELECT state, count(*) FROM pipeline_runs GROUP BY 1 ORDER BY 1") == [
        ("ABANDONED", 1),
        ("DONE", 1),
    ]
