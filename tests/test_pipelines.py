"""End to end: real files through real Beam pipelines into the embedded Postgres."""

from __future__ import annotations

import gzip
import json
import random
import string
import os
import subprocess
import sys
from pathlib import Path

import apache_beam as beam
import psycopg
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from conftest import query
from connectors.sink import REVIEWS, Target, WriteDeadLetters, WriteRows
from pipelines import emotions, products, reviews
from pipelines.cli import main as cli_main
from samples import generate
from test_parse import META_2014, META_2018, META_2023, REVIEW_2014, REVIEW_2018, REVIEW_2023
from transforms.clean import clean_review
from transforms.parse import decode, detect
from transforms.records import DeadLetter, ParsedRecord

ROOT = Path(__file__).resolve().parent.parent


def write_lines(path: Path, lines: list[str]) -> str:
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return str(path)


@pytest.fixture
def dataset(tmp_path):
    """One review file and one metadata file per generation, gzipped and not."""
    files = {
        "reviews_Music_5.json.gz": [REVIEW_2014],
        "All_Beauty_5.json": [REVIEW_2018],
        "All_Beauty.jsonl": [REVIEW_2023],
        "meta_Music.json.gz": [META_2014],
        "meta_Gift_Cards.json": [META_2018],
        "meta_All_Beauty.jsonl.gz": [META_2023],
    }
    for name, lines in files.items():
        write_lines(tmp_path / name, lines)
    return tmp_path


def snapshot(dsn: str, table: str) -> list[tuple]:
    return query(dsn, f"SELECT * FROM {table} ORDER BY 1")


def test_every_generation_lands_with_the_right_values(datalake, dataset):
    summary = reviews.run(
        [
            "--dsn",
            datalake,
            "--input",
            str(dataset / "*_5.json*"),
            "--input",
            str(dataset / "All_Beauty.jsonl"),
        ],
        test_pipeline=TestPipeline(),
    )
    assert (summary.records, summary.upserted, summary.dead_letters) == (3, 3, 0)
    rows = query(
        datalake,
        "SELECT source_format, reviewer_id, asin, rating, helpful_votes, total_votes, verified,"
        " reviewed_at::text, style, line FROM reviews ORDER BY source_format",
    )
    assert rows == [
        (2014, "A2SUAM1J3GNN3B", "0000013714", 5.0, 2, 3, None, "2009-09-13 00:00:00+00", None, 1),
        (
            2018,
            "AUI6WTTT0QZYS",
            "5120053084",
            5.0,
            1341,
            None,
            True,
            "2011-07-09 00:00:00+00",
            {"Size": "Big Boys", "Color": "Blue/Orange"},
            1,
        ),
        (
            2023,
            "AGKHLEW2SOWHNMFQIJGBECAF7INQ",
            "B00YQ6X8EO",
            5.0,
            0,
            None,
            True,
            "2020-05-05 14:08:48.923+00",
            None,
            1,
        ),
    ]

    summary = products.run(["--dsn", datalake, "--input", str(dataset / "meta_*")])
    assert (summary.records, summary.upserted, summary.dead_letters) == (3, 3, 0)
    rows = query(
        datalake,
        "SELECT asin, title, price::float, sales_rank, main_category, brand, source_format"
        " FROM products ORDER BY source_format",
    )
    assert rows == [
        ("0000031852", "Don't Drink His Blood", 3.17, {"Music": 505556}, "CDs & Vinyl", None, 2014),
        (
            "B001GXRQW0",
            "Maggiano's Gift Card",
            29.99,
            {"Gift Cards": 1786},
            "Gift Cards",
            None,
            2018,
        ),
        (
            "B01CUPMQZE",
            "Howard LC0008 Leather Conditioner",
            None,
            None,
            "All Beauty",
            "Howard Products",
            2023,
        ),
    ]


def test_second_run_changes_nothing(datalake, dataset):
    argv = ["--dsn", datalake, "--input", str(dataset / "meta_*")]
    first = products.run(argv)
    before = snapshot(datalake, "products")
    second = products.run(argv)
    assert first.changed == 3 and second.changed == 0 and second.upserted == 3
    assert snapshot(datalake, "products") == before


def test_bad_lines_become_dead_letters_with_line_numbers_and_counts_agree(datalake, tmp_path):
    lines = [
        REVIEW_2014,
        "",
        REVIEW_2018[:70],  # cut in half
        REVIEW_2014,  # exact duplicate: collapses to one row
        META_2018,  # metadata in a review file
        json.dumps({**json.loads(REVIEW_2023), "rating": None}),
        "not a record at all",
        REVIEW_2023,
    ]
    path = write_lines(tmp_path / "mixed.jsonl", lines)
    summary = reviews.run(["--dsn", datalake, "--input", path, "--max_bad_fraction", "1"])

    dead = query(
        datalake, "SELECT stage, line, source, raw, run_id::text FROM dead_letters ORDER BY line"
    )
    assert [(stage, line) for stage, line, *_ in dead] == [
        ("parse", 3),
        ("parse", 5),
        ("clean", 6),
        ("parse", 7),
    ]
    assert all(source == path and run_id == summary.run_id for *_, source, raw, run_id in dead)
    assert [raw for _, _, _, raw, _ in dead] == [lines[2], lines[4], lines[5], lines[6]]
    errors = query(datalake, "SELECT error FROM dead_letters ORDER BY line")
    assert "ingest it with `run products`" in errors[1][0]
    assert "rating must be a number from 1 to 5" in errors[2][0]

    # Nothing lost: every record is upserted or a dead letter; one row per distinct key.
    assert summary.records == 7
    assert (summary.upserted, summary.dead_letters) == (3, 4)
    assert summary.records == summary.upserted + summary.dead_letters
    assert query(datalake, "SELECT count(*) FROM reviews") == [(2,)]
    ((state, runner, counters),) = query(
        datalake,
        "SELECT state, runner, counters FROM pipeline_runs WHERE run_id = %s",
        (summary.run_id,),
    )
    assert state == "DONE" and "FnApiRunner" in runner
    assert counters["reviews_upserted"] == 3 and counters["dead_letters_upserted"] == 4
    assert counters["records_read"] == 7


def test_rows_the_database_rejects_become_dead_letters_and_the_rest_land(datalake):
    good = [
        clean_review(
            ParsedRecord(
                "f", i, "review", 2014, {**json.loads(REVIEW_2014), "asin": f"A{i:09d}"}, ""
            )
        )
        for i in range(5)
    ]
    bad = good[2]._replace(rating=9.0, review_id="bad")  # violates the CHECK constraint
    with TestPipeline() as p:
        rejected = (
            p
            | beam.Create(good + [bad])
            | WriteRows(REVIEWS, Target(datalake, pipeline="reviews", batch_size=100))
        )
        assert_that(
            rejected
            | beam.Map(lambda d: (d.stage, d.source, d.line, "reviews_rating_check" in d.error)),
            equal_to([("sink", "f", 2, True)]),
        )
    assert query(datalake, "SELECT count(*) FROM reviews") == [(5,)]


def test_a_value_too_big_for_an_index_is_one_dead_letter_not_a_failed_run(datalake):
    """Postgres refuses an index entry over ~2.7 kB with SQLSTATE 54000, which psycopg
    raises as an OperationalError: a row's fault all the same (sorted by SQLSTATE class),
    so the row alone is a dead letter with the database's message and the rest lands."""
    noise = "".join(random.Random(1).choices(string.ascii_letters + string.digits, k=3000))
    base = clean_review(ParsedRecord("f", 1, "review", 2014, json.loads(REVIEW_2014), ""))
    good = [base._replace(review_id=f"r{i}", line=i) for i in range(1, 8)]
    huge = base._replace(review_id="huge", asin=noise, line=99)  # past the clean stage's bound
    with TestPipeline() as p:
        rejected = (
            p
            | beam.Create(good[:4] + [huge] + good[4:])
            | WriteRows(REVIEWS, Target(datalake, pipeline="reviews", batch_size=100))
        )
        assert_that(
            rejected | beam.Map(lambda d: (d.stage, d.line, "index row size" in d.error)),
            equal_to([("sink", 99, True)]),
        )
    assert query(datalake, "SELECT count(*) FROM reviews") == [(7,)]


def test_faults_are_sorted_by_sqlstate_class_not_by_exception_type(datalake):
    """Faults are sorted by SQLSTATE class, not exception type: a connection error is the
    connection's (retried), a programming error is nobody's row (the run fails at once)."""
    from connectors import datalake as lake

    lost = psycopg.OperationalError("server closed the connection unexpectedly")
    assert lake.is_transient(lost) and not lake.is_row_fault(lost)
    with psycopg.connect(datalake) as conn:
        for statement, transient, row in (
            ("SELECT 1/0", False, True),  # 22012: a data exception
            ("SELECT repeat('x', 10) :: varchar(2) :: int", False, True),  # 22P02
            ("SELECT * FROM no_such_table", False, False),  # 42P01: ours, not a row's
            ("SELECT pg_sleep(1)", True, False),  # 57014, with statement_timeout = 1 ms
        ):
            conn.execute("SET statement_timeout = 1" if "sleep" in statement else "SELECT 1")
            with pytest.raises(psycopg.Error) as caught:
                conn.execute(statement)
            conn.rollback()
            assert (lake.is_transient(caught.value), lake.is_row_fault(caught.value)) == (
                transient,
                row,
            ), statement


def test_concurrent_write_lanes_keep_the_latest_record_of_every_key(datalake):
    """Batches of 7 go out on two connections at once, every key in several batches:
    whatever order they commit in, each key ends with its latest (source, line)."""
    base = clean_review(ParsedRecord("f", 1, "review", 2014, json.loads(REVIEW_2014), ""))
    records = [
        base._replace(review_id=f"k{key:02d}", title=f"line {line}", line=line)
        for line in range(1, 201)
        for key in [line % 40]
    ]
    random.Random(3).shuffle(records)
    with TestPipeline() as p:
        rejected = (
            p
            | beam.Create(records)
            | WriteRows(REVIEWS, Target(datalake, pipeline="reviews", batch_size=7))
        )
        assert_that(rejected, equal_to([]))
    latest = {f"k{key:02d}": max(l for l in range(1, 201) if l % 40 == key) for key in range(40)}
    assert dict(query(datalake, "SELECT review_id, line FROM reviews")) == latest
    assert query(datalake, "SELECT count(*) FROM reviews WHERE title <> 'line ' || line") == [(0,)]


@pytest.mark.parametrize("fmt", [2014, 2018, 2023])
def test_generated_datasets_land_one_row_per_distinct_key(datalake, tmp_path, fmt):
    path = tmp_path / f"reviews_{fmt}.jsonl.gz"
    generate.write_dataset("reviews", fmt, 3000, str(path), seed=fmt)
    keys = set()
    with gzip.open(path, "rt") as lines:
        for number, line in enumerate(lines, 1):
            fields = decode(line)
            review = clean_review(ParsedRecord(str(path), number, *detect(fields), fields, line))
            keys.add(review.review_id)
    summary = reviews.run(["--dsn", datalake, "--input", str(path)])
    assert summary.records == 3000 and summary.dead_letters == 0
    assert query(datalake, "SELECT count(*) FROM reviews") == [(len(keys),)]


# --- the command line -------------------------------------------------------------


def cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "pipelines", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "nope"], "unknown pipeline 'nope'"),
        (["run", "reviews", "--input", "/nonexistent/*.json.gz"], "no file matches"),
        (["run", "reviews"], "needs --input"),
        (
            ["run", "reviews", "--input", "setup.py", "--dsn", "postgresql://nobody@127.0.0.1:1/x"],
            "cannot connect to Postgres",
        ),
    ],
)
def test_cli_errors_are_one_line_exit_2_no_traceback(args, message):
    result = cli(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0]


def test_cli_run_prints_the_summary_and_db_commands_work(datalake, dataset):
    result = cli("run", "reviews", "--input", str(dataset / "All_Beauty*"), "--dsn", datalake)
    assert result.returncode == 0, result.stderr
    assert "records read             2" in result.stdout
    assert "FnApiRunner" in result.stdout
    status = cli("db", "status", "--dsn", datalake)
    assert status.returncode == 0 and "reviews                     2 rows" in status.stdout
    url = cli("db", "url", env_extra={"TERMIDATOR_DSN": datalake})
    assert url.stdout.strip() == datalake
    listing = cli("list")
    assert listing.returncode == 0 and listing.stdout.splitlines()[0].startswith("reviews")


# --- emotions -----------------------------------------------------------------------


def test_emotions_pipeline_classifies_each_review_once(datalake, dataset):
    reviews.run(["--dsn", datalake, "--input", str(dataset / "*_5.json*")])
    first = emotions.run(["--dsn", datalake])
    assert (first.records, first.upserted, first.dead_letters) == (2, 2, 0)
    rows = query(datalake, "SELECT model, label, score, scores FROM review_emotions")
    assert len(rows) == 2
    for model, label, score, scores in rows:
        assert model == "minilm-lora-goemotions-ekman" and label in scores
        assert score == pytest.approx(max(scores.values()), abs=1e-5)
        assert sum(scores.values()) == pytest.approx(1.0, abs=1e-3)
    second = emotions.run(["--dsn", datalake])
    assert (second.records, second.upserted) == (0, 0)


def test_emotions_pipeline_does_not_reread_reviews_without_text(datalake, tmp_path):
    """They never get an emotion row: read again by every run, they could fill every
    --limit window and the run would never move on."""
    fields = json.loads(REVIEW_2018)
    lines = [
        json.dumps({**fields, "reviewerID": f"NOTEXT{i}", "reviewText": " "}) for i in range(3)
    ]
    lines.append(REVIEW_2018)
    reviews.run(["--dsn", datalake, "--input", write_lines(tmp_path / "r.jsonl", lines)])
    assert query(datalake, "SELECT count(*) FROM reviews") == [(4,)]
    first = emotions.run(["--dsn", datalake, "--limit", "1"])
    assert (first.records, first.upserted) == (1, 1)
    assert emotions.run(["--dsn", datalake]).records == 0


def test_reviews_with_emotions_classifies_inline(datalake, dataset):
    summary = reviews.run(
        ["--dsn", datalake, "--input", str(dataset / "All_Beauty*"), "--emotions"],
        test_pipeline=TestPipeline(),
    )
    assert summary.upserted == 2 and summary.counters["review_emotions_upserted"] == 2
    assert query(
        datalake,
        "SELECT count(*) FROM reviews r JOIN review_emotions e USING (review_id)",
    ) == [(2,)]


def test_an_unloadable_model_is_a_one_line_cli_error(datalake):
    result = cli("run", "emotions", "--dsn", datalake, "--model", "/nonexistent/model")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--model minilm-lora-goemotions-ekman" in result.stderr


def test_main_job_ingests_every_bundled_sample_and_classifies_emotions(datalake):
    """`python -m pipelines run` with no name: all three generations, then emotions."""
    result = cli("run", "--dsn", datalake)
    assert result.returncode == 0, result.stderr
    assert "direct_num_workers" not in result.stderr  # Beam's warning has no cause left
    assert [line.split(":")[0] for line in result.stdout.splitlines() if ": DONE" in line] == [
        "products",
        "reviews",
        "emotions",
    ]
    formats = dict(query(datalake, "SELECT source_format, count(*) FROM reviews GROUP BY 1"))
    assert set(formats) == {2014, 2018, 2023}
    dead = query(datalake, "SELECT stage, source, line FROM dead_letters ORDER BY source")
    assert [(stage, Path(source).name, line) for stage, source, line in dead] == [
        ("parse", "All_Beauty.jsonl", 30),
        ("parse", "All_Beauty_5.json.gz", 24),
    ]
    unclassified = query(
        datalake,
        "SELECT count(*) FROM reviews r WHERE nullif(trim(text), '') IS NOT NULL AND NOT EXISTS"
        " (SELECT 1 FROM review_emotions e WHERE e.review_id = r.review_id)",
    )
    assert unclassified == [(0,)]
    runs = query(
        datalake, "SELECT pipeline, state, counters FROM pipeline_runs ORDER BY started_at"
    )
    for pipeline, state, counters in runs:
        assert state == "DONE"
        if pipeline != "emotions":
            read = counters["records_read"] + counters.get("read_dead_letters", 0)
            assert read == counters[f"{pipeline}_upserted"] + counters.get(
                "dead_letters_upserted", 0
            )


def test_a_value_that_cannot_even_be_encoded_is_a_dead_letter_not_a_crash(datalake):
    """A lone surrogate (possible from a Python-literal line) cannot be sent as UTF-8."""
    good = clean_review(ParsedRecord("f", 1, "review", 2014, json.loads(REVIEW_2014), ""))
    with TestPipeline() as p:
        rejected = (
            p
            | beam.Create([good])
            # Made inside the fused stage: Beam's coders cannot carry it between stages.
            | beam.FlatMap(lambda r: [r, r._replace(review_id="bad", text="x \ud800", line=2)])
            | WriteRows(REVIEWS, Target(datalake, pipeline="reviews"))
        )
        assert_that(
            rejected | beam.Map(lambda d: (d.stage, d.line, "reviews rejected the row" in d.error)),
            equal_to([("sink", 2, True)]),
        )
    assert query(datalake, "SELECT count(*) FROM reviews") == [(1,)]


def test_dead_letters_postgres_cannot_hold_are_escaped_not_lost(datalake):
    """NUL and a lone surrogate cannot be stored as text: they land escaped."""
    letter = DeadLetter("p", "parse", "f", 1, "seed", "error")
    with TestPipeline() as p:
        _ = (
            p
            | beam.Create([letter])
            # Made inside the fused stage: Beam's coders cannot carry a lone surrogate.
            | beam.Map(lambda d: d._replace(raw="a\x00b \ud800 é", error="bad \ud800"))
            | WriteDeadLetters(Target(datalake))
        )
    assert query(datalake, "SELECT raw, error FROM dead_letters") == [
        ("a\\u0000b \\ud800 é", "bad \\ud800")
    ]


# --- precedence: a newer generation is never overwritten by an older one ------------------

# The same review in the 2014 format: fewer fields (no verified, no style), other votes.
REVIEW_2018_AS_2014 = json.dumps(
    {
        "reviewerID": "AUI6WTTT0QZYS",
        "asin": "5120053084",
        "reviewerName": "Abbey",
        "helpful": [0, 0],
        "reviewText": "I now have 4 of these (as the 2014 copy has it)",
        "overall": 5.0,
        "summary": "Great",
        "unixReviewTime": 1310169600,
        "reviewTime": "07 9, 2011",
    }
)
NEWEST = (2018, True, 1341, {"Size": "Big Boys", "Color": "Blue/Orange"})


def stored_review(dsn: str) -> list[tuple]:
    return query(dsn, "SELECT source_format, verified, helpful_votes, style FROM reviews")


@pytest.mark.parametrize("first", ["2018", "2014"])
def test_a_newer_generation_wins_in_either_order_across_runs(datalake, tmp_path, first):
    """The 2014 file's name sorts after the 2018 file's: the file name must not decide."""
    files = {
        "2018": write_lines(tmp_path / "a_Books_2018.json", [REVIEW_2018]),
        "2014": write_lines(tmp_path / "z_reviews_Books_2014.json", [REVIEW_2018_AS_2014]),
    }
    second = "2014" if first == "2018" else "2018"
    for generation in (first, second):
        summary = reviews.run(["--dsn", datalake, "--input", files[generation]])
        assert summary.upserted == 1 and summary.dead_letters == 0
        assert query(datalake, "SELECT count(*) FROM reviews") == [(1,)]
    assert stored_review(datalake) == [NEWEST]
    again = reviews.run(["--dsn", datalake, "--input", files["2014"], "--input", files["2018"]])
    assert again.changed == 0 and stored_review(datalake) == [NEWEST]


def test_a_newer_generation_wins_over_an_older_one_streamed_later(datalake, tmp_path):
    """Batch, stream and the REST path write through the one sink: the same rule holds."""
    from connectors import landing
    from pipelines import stream

    reviews.run(["--dsn", datalake, "--input", write_lines(tmp_path / "a.json", [REVIEW_2018])])
    root = tmp_path / "landing"
    landing.land_lines("reviews", [REVIEW_2018_AS_2014], "zzz.jsonl", root)
    summary = stream.run(
        ["--dsn", datalake, "--landing", str(root), "--poll-interval", "0.1"]
        + ["--stop-after-idle", "1"]
    )
    assert summary.upserted == 1 and summary.changed == 0
    assert stored_review(datalake) == [NEWEST]


# --- a run fed the wrong input stops early and says which pipeline reads it -----------------


def test_reviews_fed_to_products_stop_early_naming_the_right_pipeline(datalake, tmp_path, capsys):
    path = tmp_path / "Books.jsonl"
    generate.write_dataset("reviews", 2023, 3000, str(path), seed=3)
    assert cli_main(["run", "products", "--input", str(path), "--dsn", datalake]) == 1
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "this input is for `run reviews`" in error[0], error
    assert "Traceback" not in capsys.readouterr().err
    assert query(datalake, "SELECT state FROM pipeline_runs") == [("FAILED",)]
    (dead,) = query(datalake, "SELECT count(*) FROM dead_letters")[0]
    assert dead < 3000  # stopped after the first few thousand, not at the end


def test_a_run_of_mostly_dead_letters_fails_at_the_end_over_the_bar(datalake, tmp_path, capsys):
    good = [REVIEW_2018] * 3
    path = write_lines(tmp_path / "mixed.json", good + ["not a record"] * 4)
    assert cli_main(["run", "reviews", "--input", path, "--dsn", datalake]) == 1
    error = capsys.readouterr().err
    assert "4 of 7 records (57%) are dead letters, more than --max_bad_fraction 0.5" in error
    assert "most say: truncated or malformed record" in error
    assert (
        cli_main(
            ["run", "reviews", "--input", path, "--dsn", datalake] + ["--max_bad_fraction", "0.6"]
        )
        == 0
    )
