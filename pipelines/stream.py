"""The ``stream`` pipeline: records landing over time (or a replayed file) -> the datalake.

``FollowLanding | ReadParseClean | WriteDatalake``, continuously, with dead letters as in
batch, [emotions], and for reviews per-product event-time windowed ``review_stats``
that refresh while the stream runs (``connectors.stats``). Landed files are settled in
``landing_files``, so a restarted stream skips what is done. Ctrl-C drains: the source
stops, what is in flight is written, the run ends CANCELLED with everything committed.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from connectors import datalake, landing, stats
from connectors.landing import SettleLandedFiles
from connectors.landing_source import FollowLanding
from connectors.replay import ReplayFile
from connectors.sink import PRODUCTS, REVIEWS, CommitHook, Target
from pipelines.composites import RECORDS, ReadParseClean, WriteDatalake, write_emotions
from pipelines.lifecycle import RunFailed, RunInterrupted, RunResult, execute
from pipelines.progress import Measure
from pipelines.options import (
    DatalakeOptions,
    EmotionOptions,
    StreamOptions,
    UsageError,
    describe_duration,
    parse,
)
from transforms.records import REVIEW

NAME = "stream"
DESCRIPTION = "landing zone (or --replay FILE) -> reviews|products, review_stats, continuously"
OPTIONS = (DatalakeOptions, StreamOptions, EmotionOptions)
_LOG = logging.getLogger(__name__)


def check(stream: StreamOptions) -> None:
    """What the option types alone cannot say; a UsageError names the flag."""
    if stream.rate is not None and stream.replay is None:
        raise UsageError("--rate paces a replay: add --replay FILE")
    if stream.window <= 0:
        raise UsageError("--window must be longer than 0")


def landing_root(stream: StreamOptions) -> Path:
    """The landing zone this stream follows (created on demand)."""
    root = Path(stream.landing).resolve() if stream.landing else landing.landing_root()
    root.mkdir(parents=True, exist_ok=True)
    return root


def build(pipeline: beam.Pipeline, options: PipelineOptions, target: Target) -> Measure:
    """Follow the landing zone (or replay a file) into the datalake."""
    stream = options.view_as(StreamOptions)
    check(stream)
    options.view_as(StandardOptions).streaming = True
    kind = landing.DATASETS[stream.dataset]
    hooks: list[CommitHook] = []
    if stream.replay:
        source = ReplayFile(
            stream.replay,
            stream.rate,
            NAME,
            stream.stop_after,
            target.stop_file,
            (target.dsn, target.run_id),
        )
        _LOG.info("stream: replaying %s at %s records/s", stream.replay, stream.rate or "max")
    else:
        directory = landing.landing_dir(stream.dataset, landing_root(stream))
        source = FollowLanding(
            directory,
            stream.dataset,
            target.dsn,
            target.run_id,
            NAME,
            stream.poll_interval,
            stream.stop_after,
            stream.stop_after_idle,
            target.stop_file,
        )
        # Every sink of a landed file's records settles it in landing_files.
        hooks.append(SettleLandedFiles(stream.dataset, target.run_id))
        _LOG.info(
            "stream: following %s (every %.1f s when idle; Ctrl-C drains)",
            directory,
            stream.poll_interval,
        )
    rows = pipeline | "ReadParseClean" >> ReadParseClean(source, kind, NAME)
    measure = following(stream, target)
    if kind != REVIEW:
        _ = rows | "WriteDatalake" >> WriteDatalake(PRODUCTS, target, hooks)
        return measure
    emotion = options.view_as(EmotionOptions)
    live = stats.LiveReviewStats(
        target.run_id, emotion.model, stream.window, stream.allowed_lateness, stream.stats_every
    )
    _ = rows | "WriteDatalake" >> WriteDatalake(REVIEWS, target, [*hooks, live])
    if emotion.emotions:
        write_emotions(rows[RECORDS], options, target, [live])
    _LOG.info(
        "stream: review_stats in %s windows refresh every %s while the stream runs",
        describe_duration(stream.window),
        describe_duration(stream.stats_every),
    )
    return measure


def following(stream: StreamOptions, target: Target) -> Measure:
    """A stream's progress: records written (open-ended), and the landing backlog."""
    table = REVIEWS.table if stream.dataset == "reviews" else PRODUCTS.table

    def backlog() -> str:
        if stream.replay:
            facts = f"replaying {os.path.basename(stream.replay)}"
        else:
            waiting = landing.backlog(target.dsn, landing_root(stream))[stream.dataset]
            age = waiting["oldest_age_s"]
            facts = f"backlog {waiting['files']:,} files" + (
                f", oldest {age:,.0f} s" if age else ""
            )
        if table == "reviews":
            with datalake.connect(target.dsn, autocommit=True) as conn:
                newest = stats.newest_window(conn)
            if newest is not None:
                state = "final" if newest["final"] else "partial"
                facts += (
                    f", newest window {newest['window_start'][:16]}: {newest['reviews']:,}"
                    f" reviews of {newest['products']:,} products ({state})"
                )
        return facts

    return Measure(
        "stream",
        done=(f"{table}_upserted", "dead_letters_upserted"),
        unit="records",
        shown={"review_emotions_upserted": "emotions"} if table == "reviews" else {},
        detail=backlog,
    )


def run(
    argv: Optional[Sequence[str]] = None, test_pipeline: Optional[beam.Pipeline] = None
) -> RunResult:
    """Run the pipeline (``python -m pipelines run stream [--dataset products] ...``).

    The first Ctrl-C drains: the source stops, what is in flight is written, and the run
    ends CANCELLED (``RunInterrupted``) with everything it read committed.
    """
    started: list[tuple[PipelineOptions, Target]] = []

    def built(pipeline: beam.Pipeline, options: PipelineOptions, target: Target) -> Measure:
        started.append((options, target))
        return build(pipeline, options, target)

    try:
        result = execute(NAME, built, argv, test_pipeline, table=_table(argv))
    except (RunFailed, RunInterrupted) as ended:
        _note_waiting(ended.result, started)
        raise
    else:
        _note_waiting(result, started)
        return result
    finally:
        for options, target in started:
            _last_refresh(options, target)


def _note_waiting(result: RunResult, started: list[tuple[PipelineOptions, Target]]) -> None:
    """Say which landed files wait on another live run's claim, and until when."""
    for options, target in started:
        stream = options.view_as(StreamOptions)
        if stream.replay:
            continue
        with contextlib.suppress(Exception):
            waiting = landing.waiting_files(target.dsn, stream.dataset, target.run_id)
            for owner in sorted({w.run_id for w in waiting}):
                files = [w for w in waiting if w.run_id == owner]
                until = max(w.stale_at for w in files).isoformat(timespec="seconds")
                result.notes.append(
                    f"{len(files)} landed file(s) wait on the claim of live run {owner}"
                    f" (taken over if it stops beating, by {until}): {files[0].name}, ..."
                )


def _table(argv: Optional[Sequence[str]]) -> str:
    dataset = parse(list(argv or [])).view_as(StreamOptions).dataset
    return REVIEWS.table if dataset == "reviews" else PRODUCTS.table


def _last_refresh(options: PipelineOptions, target: Target) -> None:
    """The last refresh of the windows this run touched (while it runs, the stream
    refreshes at most every --stats-every)."""
    stream = options.view_as(StreamOptions)
    if stream.dataset != "reviews":
        return
    with contextlib.suppress(Exception), datalake.connect(target.dsn) as conn:
        width = datetime.timedelta(seconds=stream.window)
        stats.refresh(conn, target.run_id, options.view_as(EmotionOptions).model, width)
