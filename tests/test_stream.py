"""Streaming: the landing zone, FollowLanding on the DirectRunner while files appear,
restarts, replay, and windowed review stats with late data on TestStream."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
from apache_beam.runners.sdf_utils import RestrictionTrackerView, ThreadsafeRestrictionTracker
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.utils.timestamp import Timestamp

from conftest import query
from connectors import landing, landing_source, stats, stopping
from connectors.sink import REVIEW_EMOTIONS, REVIEWS, Target, WriteRows
from connectors.datalake import connect, finish_run, start_run
from connectors.landing import LandingFile
from connectors.landing_source import (
    FollowLanding,
    FollowLandingFn,
    LandingRestriction,
    LandingTracker,
    LandingWatch,
)
from pipelines import cli
from pipelines import lifecycle, stream
from test_parse import META_2018, REVIEW_2018
from test_portable import job_endpoint  # noqa: F401 - Beam's local job service, per module
from transforms.clean import clean_review
from transforms.parse import decode, detect
from transforms.records import EmotionResult, ParsedRecord

DAY = 86400
D0 = 10_000  # days since the epoch: 1997-05-19; review times must be plausible
FAST = ["--poll-interval", "0.1", "--stop-after-idle", "1.5"]


def review(reviewer: str, asin: str = "B000000001", when: int = 1_300_000_000, rating=4.0) -> str:
    """A 2018-format review line."""
    fields = {**json.loads(REVIEW_2018), "reviewerID": reviewer, "asin": asin}
    fields.update(overall=rating, unixReviewTime=when)
    fields.pop("reviewTime")
    return json.dumps(fields)


def wait_for(condition, timeout: float = 60.0, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {condition}")


def claimed(dsn: str, path: Path, state: str = "%") -> bool:
    found = query(
        dsn, "SELECT 1 FROM landing_files WHERE path = %s AND state LIKE %s", (str(path), state)
    )
    return bool(found)


def land_after_claims(
    dsn: str, root: Path, batches: list[tuple[Path, list[str]]], state: str = "%"
):
    """Land each batch once the previous file is claimed (or in ``state``): files appear
    while the stream runs."""

    def produce():
        for previous, (name, lines) in batches:
            wait_for(lambda: claimed(dsn, previous, state))
            landing.land_lines("reviews", lines, name=name, root=root)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    return thread


# --- the landing zone ----------------------------------------------------------------


def test_a_landing_file_is_invisible_until_committed_and_leaves_nothing_when_aborted(tmp_path):
    directory = landing.landing_dir("reviews", tmp_path)
    with LandingFile(directory, "a.jsonl") as file:
        file.write(b"{}\n")
        assert landing.list_landed(directory) == []  # only the hidden temp file exists
        assert [p.name.startswith(".a.jsonl") for p in directory.iterdir()] == [True]
        file.commit()
    assert [f.name for f in landing.list_landed(directory)] == ["a.jsonl"]
    with pytest.raises(RuntimeError):
        with LandingFile(directory, "b.jsonl") as file:
            file.write(b"half")
            raise RuntimeError("producer died")
    assert sorted(p.name for p in directory.iterdir()) == ["a.jsonl"]
    with pytest.raises(landing.UnknownDataset):
        landing.landing_dir("music", tmp_path)


# --- FollowLanding -----------------------------------------------------------------


def test_follow_landing_emits_files_appearing_while_it_runs_once_with_review_times(
    datalake, tmp_path
):
    run_id = start_run(datalake, "test", {})
    first = landing.land_lines(
        "reviews", [review("A", when=(D0 + 1_000) * DAY)], "1.jsonl", tmp_path
    )
    second, third = tmp_path / "reviews" / "2.jsonl", tmp_path / "reviews" / "3.jsonl"
    producer = land_after_claims(
        datalake,
        tmp_path,
        [
            (
                first,
                (
                    "2.jsonl",
                    [review("B", when=(D0 + 2_000) * DAY), review("C", when=(D0 + 1_500) * DAY)],
                ),
            ),
            (second, ("3.jsonl", [b"\xff not text", review("D", when=(D0 + 3_000) * DAY)])),
        ],
    )
    with TestPipeline() as p:
        out = p | FollowLanding(
            tmp_path / "reviews", "reviews", datalake, run_id, "stream", 0.05, None, 1.5
        )
        assert_that(
            out.records
            | beam.Map(
                lambda r, ts=beam.DoFn.TimestampParam: (
                    Path(r.source).name,
                    r.line,
                    ts.micros // 10**6 // DAY - D0,
                )
            ),
            equal_to(
                [
                    ("1.jsonl", 1, 1000),
                    ("2.jsonl", 1, 2000),
                    ("2.jsonl", 2, 1500),
                    ("3.jsonl", 2, 3000),
                ]
            ),
        )
        assert_that(
            out.dead_letters | beam.Map(lambda d: (Path(d.source).name, d.line, d.stage)),
            equal_to([("3.jsonl", 1, "read")]),
            label="DeadLetters",
        )
    producer.join()
    rows = query(
        datalake, "SELECT name, state, records, run_id::text FROM landing_files ORDER BY 1"
    )
    assert rows == [
        (n, "claimed", c, run_id) for n, c in (("1.jsonl", 1), ("2.jsonl", 2), ("3.jsonl", 2))
    ]
    assert third.exists()


def test_the_watermark_follows_the_oldest_event_of_the_latest_file(datalake, tmp_path):
    """The SDF itself, driven poll by poll with Beam's own tracker and estimator."""
    run_id = start_run(datalake, "test", {})
    directory = landing.landing_dir("reviews", tmp_path)
    fn = FollowLandingFn(datalake, run_id, "stream", poll_interval=0.01)
    fn.setup()
    watch = LandingWatch(str(directory), "reviews")
    estimator = ManualWatermarkEstimator(None)
    restriction = LandingRestriction(frozenset())

    def poll():
        nonlocal restriction
        tracker = ThreadsafeRestrictionTracker(LandingTracker(restriction))
        out = list(fn.process(watch, tracker=RestrictionTrackerView(tracker), watermark=estimator))
        restriction = tracker.deferred_status()[0]
        return [o for o in out if not isinstance(o, beam.pvalue.TaggedOutput)]

    landing.land_lines(
        "reviews",
        [review("A", when=(D0 + 20) * DAY), review("B", when=(D0 + 10) * DAY)],
        "a.jsonl",
        tmp_path,
    )
    assert len(poll()) == 2
    assert estimator.current_watermark() == Timestamp((D0 + 10) * DAY)
    assert poll() == [] and estimator.current_watermark() == Timestamp((D0 + 10) * DAY)  # idle
    landing.land_lines("reviews", [review("C", when=(D0 + 5) * DAY)], "b.jsonl", tmp_path)
    assert len(poll()) == 1 and estimator.current_watermark() == Timestamp((D0 + 10) * DAY)  # late
    landing.land_lines(
        "reviews",
        [review("D", when=(D0 + 30) * DAY), review("E", when=(D0 + 25) * DAY)],
        "c.jsonl",
        tmp_path,
    )
    assert len(poll()) == 2 and estimator.current_watermark() == Timestamp((D0 + 25) * DAY)
    assert restriction.in_flight == {"a.jsonl", "b.jsonl", "c.jsonl"}  # none settled yet
    fn.teardown()


def test_the_tracker_only_splits_at_checkpoints():
    tracker = LandingTracker(LandingRestriction(frozenset({"a"}), 0.0))
    assert tracker.try_split(0.5) is None
    primary, residual = tracker.try_split(0)
    assert primary.finished and not residual.finished and residual.in_flight == {"a"}
    assert not tracker.try_claim(landing_source._END)
    tracker.check_done()


# --- the stream pipeline -------------------------------------------------------------


def test_a_row_the_database_rejects_is_settled_once_as_a_dead_letter(datalake, tmp_path):
    """The sink bisects a batch with a rejected row in trial transactions; only what is
    committed counts as settled, so the counter agrees with landing_files."""
    root = tmp_path / "landing"
    with connect(datalake) as conn:  # a rule of this lake's own that one review breaks
        conn.execute("ALTER TABLE reviews ADD CONSTRAINT no_x CHECK (reviewer_id <> 'X')")
    lines = [review(f"R{i}") for i in range(6)] + [review("X")]
    landing.land_lines("reviews", lines, "1.jsonl", root)
    summary = stream.run(["--dsn", datalake, "--landing", str(root), *FAST])
    assert (summary.records, summary.upserted, summary.dead_letters) == (7, 6, 1)
    assert query(datalake, "SELECT stage FROM dead_letters") == [("sink",)]
    assert query(datalake, "SELECT state, records, settled FROM landing_files") == [("done", 7, 7)]
    assert summary.counters["landing_records_settled"] == 7


def test_stream_lands_every_record_once_and_a_restart_reads_only_unfinished_files(
    datalake, tmp_path
):
    root = tmp_path / "landing"
    early = landing.land_lines(
        "reviews",
        [
            review("A", "P1", (D0 + 100) * DAY + 10),
            review("B", "P1", (D0 + 100) * DAY + 20, 2.0),
            "not json",
        ],
        "1.jsonl",
        root,
    )
    producer = land_after_claims(
        datalake,
        root,
        [
            (
                early,
                (
                    "2.jsonl",
                    [
                        review("C", "P2", (D0 + 101) * DAY),
                        META_2018,
                        review("A", "P1", (D0 + 100) * DAY + 10),
                    ],
                ),
            )
        ],
        state="done",  # the first file is settled while the stream runs, not at its end
    )
    argv = ["--dsn", datalake, "--landing", str(root), *FAST]
    first = stream.run(argv)
    producer.join()
    assert "FnApiRunner" in first.runner or "Prism" in first.runner
    assert first.records == 6 and (first.upserted, first.dead_letters) == (4, 2)
    assert first.counters["landing_records_settled"] == 6
    # Its rate counts the time it was busy, not the --stop-after-idle it waited at the end.
    assert first.counters["idle_ms"] >= 1000 and "s busy)" in first.format()
    assert query(datalake, "SELECT count(*) FROM reviews") == [(3,)]  # A sent twice: one row
    assert query(datalake, "SELECT name, state, records FROM landing_files ORDER BY 1") == [
        ("1.jsonl", "done", 3),
        ("2.jsonl", "done", 3),
    ]
    # Windows fire on this runner when the stream stops (the source's watermark is held).
    stats = query(
        datalake,
        "SELECT asin, window_start::date::text, reviews, mean_rating, emotions"
        " FROM review_stats ORDER BY 1",
    )
    # A was sent twice: one row in reviews, one review in its window.
    assert stats == [("P1", "1997-08-27", 2, 3.0, None), ("P2", "1997-08-28", 1, 4.0, None)]

    # A crashed run left a claim on a newer file, and half its dead letters.
    crashed = start_run(datalake, "stream", {})
    finish_run(datalake, crashed, "FAILED", None, {})
    orphan = landing.land_lines(
        "reviews", [review("E", "P1", (D0 + 100) * DAY + 30, 5.0), "{broken"], "3.jsonl", root
    )
    with connect(datalake) as conn:
        conn.execute(
            "INSERT INTO landing_files (dataset, name, path, bytes, state, run_id)"
            " VALUES ('reviews', '3.jsonl', %s, 1, 'claimed', %s)",
            (str(orphan), crashed),
        )
        conn.execute(
            "INSERT INTO dead_letters (pipeline, stage, source, line, raw, error, run_id)"
            " VALUES ('stream', 'parse', %s, 2, '{broken', 'x', %s)",
            (str(orphan), crashed),
        )
    second = stream.run(argv)
    assert second.counters.get("files_read") == 1 and second.records == 2
    assert second.counters.get("landing_files_taken_over") == 1
    assert query(datalake, "SELECT count(*) FROM reviews") == [(4,)]
    assert query(
        datalake,
        "SELECT name, state, attempts, run_id::text FROM landing_files WHERE name = '3.jsonl'",
    ) == [("3.jsonl", "done", 2, second.run_id)]
    assert query(
        datalake, "SELECT run_id::text FROM dead_letters WHERE source = %s", (str(orphan),)
    ) == [(second.run_id,)]
    # E falls in the window the first run wrote: the row has all three reviews.
    assert query(datalake, "SELECT reviews, mean_rating FROM review_stats WHERE asin = 'P1'") == [
        (3, pytest.approx(11 / 3))
    ]

    third = stream.run(argv)
    assert third.records == 0 and third.counters.get("files_read", 0) == 0
    assert query(datalake, "SELECT count(*) FROM dead_letters") == [(3,)]


def claim_by(dsn: str, path: Path, pid: int) -> str:
    """A landed file claimed by a RUNNING stream run of process ``pid`` on this host."""
    run_id = start_run(dsn, "stream", {})  # recorded as this process's run
    with connect(dsn) as conn:
        if pid != os.getpid():
            conn.execute("UPDATE pipeline_runs SET pid = %s WHERE run_id = %s", (pid, run_id))
        conn.execute(
            "INSERT INTO landing_files (dataset, name, path, bytes, state, run_id)"
            " VALUES ('reviews', %s, %s, 1, 'claimed', %s)",
            (path.name, str(path), run_id),
        )
    return run_id


def test_a_claim_of_a_stream_whose_process_died_is_taken_over_at_once(datalake, tmp_path):
    root = tmp_path / "landing"
    path = landing.land_lines("reviews", [review("A"), review("B")], "1.jsonl", root)
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid is gone: the claim's owner is known dead
    owner = claim_by(datalake, path, dead.pid)
    summary = stream.run(["--dsn", datalake, "--landing", str(root), *FAST])
    assert (summary.records, summary.upserted) == (2, 2)
    assert summary.counters.get("landing_files_taken_over") == 1
    assert query(datalake, "SELECT state FROM pipeline_runs WHERE run_id = %s", (owner,)) == [
        ("ABANDONED",)
    ]


def test_files_waiting_on_a_live_claim_are_named_with_until_when(datalake, tmp_path):
    root = tmp_path / "landing"
    path = landing.land_lines("reviews", [review("A")], "1.jsonl", root)
    owner = claim_by(datalake, path, os.getpid())  # this test's process: alive
    summary = stream.run(["--dsn", datalake, "--landing", str(root), *FAST])
    assert summary.records == 0
    assert any(
        f"1 landed file(s) wait on the claim of live run {owner}" in note for note in summary.notes
    ), summary.notes
    assert "wait on the claim of live run" in summary.format()


def test_the_stream_runs_on_the_portable_runner(datalake, tmp_path, job_endpoint):
    """The Fn API path Flink and Prism take: Beam's job service, LOOPBACK workers."""
    root = tmp_path / "landing"
    first = landing.land_lines("reviews", [review("A", "P1"), "junk"], "1.jsonl", root)
    producer = land_after_claims(
        datalake, root, [(first, ("2.jsonl", [review("B", "P1", 1_300_000_007)]))]
    )
    portable = ["--runner", "PortableRunner", "--job_endpoint", job_endpoint]
    summary = stream.run(
        [
            "--dsn",
            datalake,
            "--landing",
            str(root),
            *FAST,
            *portable,
            "--environment_type",
            "LOOPBACK",
        ]
    )
    producer.join()
    assert summary.runner.startswith("PortableRunner")
    assert (summary.records, summary.upserted, summary.dead_letters) == (3, 2, 1)
    assert query(datalake, "SELECT state, count(*) FROM landing_files GROUP BY 1") == [("done", 2)]
    assert query(datalake, "SELECT sum(reviews) FROM review_stats") == [(2,)]


def test_replay_streams_a_file_at_the_rate_with_its_own_lineage(datalake, tmp_path):
    path = tmp_path / "meta_Gift_Cards.json"
    lines = [META_2018.replace("B001GXRQW0", f"B{i:09d}") for i in range(20)] + ["oops"]
    path.write_text("\n".join(lines) + "\n")
    started = time.monotonic()
    summary = stream.run(
        ["--dsn", datalake, "--dataset", "products", "--replay", str(path), "--rate", "40"]
    )
    assert time.monotonic() - started >= 0.5  # 21 records at 40/s
    assert summary.table == "products" and summary.records == 21
    assert (summary.upserted, summary.dead_letters) == (20, 1)
    assert query(datalake, "SELECT min(line), max(line), min(source) FROM products") == [
        (1, 20, str(path))
    ]
    assert query(datalake, "SELECT count(*) FROM landing_files") == [(0,)]


def test_long_streams_survive_the_fnapi_runners_metric_merging():
    """Beam 2.77's FnApiRunner nests its metrics one generator deeper per bundle: after
    thousands of bundles (a stream polling for an hour) reading them raises RecursionError.
    The summary then takes its counters from the datalake instead of failing the run."""
    from apache_beam.metrics.monitoring_infos import consolidate
    from apache_beam.runners.portability.fn_api_runner.fn_runner import RunnerResult
    from apache_beam.runners.runner import PipelineState

    infos: object = []
    for _ in range(3000):
        infos = consolidate(itertools.chain([], infos))
    result = RunnerResult(PipelineState.DONE, {"stage": infos})
    with pytest.raises(RecursionError):  # what Beam 2.77 does on its own
        result.metrics().query()
    assert lifecycle.beam_counters(RunnerResult(PipelineState.DONE, {"stage": infos})) == {}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--window", "soon"], "--window takes a duration"),
        (["--rate", "5"], "--rate paces a replay"),
        (["--replay", "/nonexistent.jsonl"], "no file to replay"),
        (["--dataset", "music"], "--dataset takes one of"),
    ],
)
def test_bad_stream_options_are_one_line_errors(datalake, capsys, args, message):
    assert cli.main(["run", "stream", "--dsn", datalake, *args]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0]


# --- windowed review stats on TestStream --------------------------------------------


T0 = 1_300_000_020  # a multiple of 60: the windows below start at T0, T0 + 60, ...


def _review(reviewer: str, asin: str, when: int, text: str = "fine", rating: float = 5.0):
    """A cleaned review ``when`` seconds after T0."""
    line = json.loads(review(reviewer, asin, T0 + when, rating))
    line["reviewText"] = text
    fields = decode(json.dumps(line))
    return clean_review(ParsedRecord("f", 1, *detect(fields), fields, ""))


def write_with_stats(dsn: str, run_id: str, spec, records, window: float, lateness: float):
    """Records through the real sink with the live stats hook (refreshing at every bundle)."""
    hook = stats.LiveReviewStats(run_id, "m", window, lateness, every_s=0)
    with TestPipeline() as p:
        _ = p | beam.Create(records) | WriteRows(spec, Target(dsn, run_id, "stream"), [hook])


def window_rows(dsn: str) -> list[tuple]:
    return query(
        dsn,
        "SELECT asin, extract(epoch FROM window_start)::int - %s, reviews, mean_rating, emotions,"
        " final FROM review_stats ORDER BY 1, 2",
        (T0,),
    )


def test_stats_refresh_from_the_datalake_and_late_data_updates_the_window(datalake):
    run_id = start_run(datalake, "stream", {})
    first = [_review("1", "A", 10, rating=5.0), _review("2", "A", 20, rating=3.0)]
    write_with_stats(datalake, run_id, REVIEWS, first + [_review("3", "B", 70)], 60, 120)
    # The watermark has not passed the windows' ends: partial rows.
    assert window_rows(datalake) == [
        ("A", 0, 2, 4.0, None, False),
        ("B", 60, 1, 5.0, None, False),
    ]
    # The same reviews again (a replayed file, a restart): nothing counts twice.
    write_with_stats(datalake, run_id, REVIEWS, first, 60, 120)
    assert window_rows(datalake)[0] == ("A", 0, 2, 4.0, None, False)
    with connect(datalake) as conn:  # the source's watermark passes [0, 60)
        conn.execute(
            "UPDATE pipeline_runs SET watermark = to_timestamp(%s) WHERE run_id = %s",
            (T0 + 100, run_id),
        )
    late = _review("4", "A", 50, rating=1.0)  # within the lateness: the row is updated
    write_with_stats(datalake, run_id, REVIEWS, [late], 60, 120)
    assert window_rows(datalake)[0] == ("A", 0, 3, 3.0, None, True)
    with connect(datalake) as conn:  # now past [0, 60)'s end + lateness (60 + 120 s)
        conn.execute(
            "UPDATE pipeline_runs SET watermark = to_timestamp(%s) WHERE run_id = %s",
            (T0 + 300, run_id),
        )
    write_with_stats(datalake, run_id, REVIEWS, [_review("5", "A", 40, rating=5.0)], 60, 120)
    assert window_rows(datalake)[0] == ("A", 0, 3, 3.0, None, True)  # too late: kept out
    assert query(datalake, "SELECT count(*) FROM reviews WHERE asin = 'A'") == [(4,)]


def test_emotions_count_in_their_reviews_window_whatever_arrives_first(datalake):
    run_id = start_run(datalake, "stream", {})
    first, second, third = _review("A", "P1", 10), _review("B", "P1", 20), _review("C", "P2", 30)

    def result(r, label):
        return EmotionResult(r.review_id, "m", label, 0.9, {label: 0.9})

    # An emotion committed before its review counts once the review is there.
    write_with_stats(datalake, run_id, REVIEW_EMOTIONS, [result(second, "anger")], 60, 0)
    write_with_stats(datalake, run_id, REVIEWS, [first, second, third], 60, 0)
    write_with_stats(
        datalake, run_id, REVIEW_EMOTIONS, [result(first, "joy"), result(third, "joy")], 60, 0
    )
    assert [row[:5] for row in window_rows(datalake)] == [
        ("P1", 0, 2, 5.0, {"anger": 1, "joy": 1}),
        ("P2", 0, 1, 5.0, {"joy": 1}),
    ]


def test_review_stats_appear_and_update_while_the_stream_runs(datalake, tmp_path):
    """The stats of a window are written while the stream runs (partial, then final once
    the watermark passes the window's end); a late review within the allowed lateness
    updates its window's row; a restart that reads the same reviews again counts nothing
    twice."""
    hour = 3600
    t = 1_300_000_000 // hour * hour  # windows of an hour start at multiples of it
    root = tmp_path / "landing"
    argv = ["--dsn", datalake, "--landing", str(root), "--poll-interval", "0.2"]
    argv += ["--stats-every", "0.5", "--window", "1h", "--allowed-lateness", "1d"]
    argv += ["--stop-after-idle", "120", "--quiet"]
    landing.land_lines(
        "reviews", [review("A", "P1", t + 10), review("B", "P1", t + 20, 2.0)], "1.jsonl", root
    )
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(first=stream.run(argv)))
    thread.start()

    def p1() -> list[tuple]:
        return query(
            datalake, "SELECT reviews, mean_rating, final FROM review_stats" " WHERE asin = 'P1'"
        )

    try:
        wait_for(lambda: p1() == [(2, 3.0, False)], 120, 0.1)  # partial, while running
        assert thread.is_alive()
        landing.land_lines("reviews", [review("C", "P2", t + 2 * hour)], "2.jsonl", root)
        wait_for(lambda: p1() == [(2, 3.0, True)], 60, 0.1)  # the watermark passed its end
        late = review("D", "P1", t + 30, 5.0)  # behind the watermark, within the lateness
        landing.land_lines("reviews", [late], "3.jsonl", root)
        wait_for(lambda: p1() == [(3, pytest.approx(11 / 3), True)], 60, 0.1)
        assert thread.is_alive()
        (run_id,) = query(datalake, "SELECT run_id::text FROM pipeline_runs")[0]
    finally:
        stopping.request_stop(stopping.stop_file(run_id))  # what Ctrl-C does
        thread.join(120)
    # A restart that lands the same reviews again (a replayed file) counts nothing twice.
    landing.land_lines("reviews", [late, review("A", "P1", t + 10)], "4.jsonl", root)
    argv[argv.index("120")] = "1"
    second = stream.run(argv)
    assert second.upserted == 2  # the rows now name file 4 (the later source), and yet:
    assert p1() == [(3, pytest.approx(11 / 3), True)]
    assert query(datalake, "SELECT count(*) FROM reviews") == [(4,)]
