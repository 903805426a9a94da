"""The ``stream`` pipeline: records landing over time (or a replayed file) -> the datalake.

parse -> clean -> [emotions] -> upsert, continuously, with dead letters as in batch; for
reviews also per-product, event-time windowed ``review_stats`` (accumulating panes, so a
late review within ``--allowed-lateness`` fires its window again). Landed files are
settled in ``landing_files``: a restarted stream skips what is done. Ctrl-C drains.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple, Optional, Sequence

import apache_beam as beam
import psycopg
from apache_beam.coders import PickleCoder, StrUtf8Coder
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.transforms import trigger, userstate, window
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.window import GlobalWindows, TimestampedValue
from apache_beam.utils.timestamp import Duration, Timestamp

from connectors import datalake, landing
from connectors.landing_source import FollowLanding
from connectors.replay import ReplayFile
from connectors.sink import Ledger, UpsertAndSettle, WriteDeadLettersAndSettle
from connectors.sink import PRODUCTS, REVIEW_EMOTIONS, REVIEWS, WriteDeadLetters
from pipelines.common import CLEAN_TRANSFORMS, RunSummary, emotion_classifier, execute
from pipelines.options import DatalakeOptions, EmotionOptions, StreamOptions
from pipelines.options import UsageError
from transforms.parse import METRICS_NAMESPACE, ParseRecords
from transforms.records import REVIEW, DeadLetter

NAME = "stream"
STATS_STAGE = "stats"
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
DESCRIPTION = "landing zone (or --replay FILE) -> reviews|products, review_stats, continuously"
_LOG = logging.getLogger(__name__)
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([smhd]?)\s*$")


def parse_duration(value: Any, flag: str) -> float:
    """Seconds from ``90``, ``90s``, ``30m``, ``6h`` or ``1d``; a UsageError names the flag."""
    match = _DURATION.match(str(value))
    if not match:
        raise UsageError(f"{flag} takes a duration such as 90, 90s, 30m, 6h or 1d, not {value!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


@dataclasses.dataclass(frozen=True)
class StreamSettings:
    """The validated ``StreamOptions``."""

    dataset: str
    stop_after: Optional[float]
    stop_after_idle: Optional[float]
    replay: Optional[str]
    rate: Optional[float]
    window_s: float
    allowed_lateness_s: float
    poll_interval_s: float
    landing: Optional[str]

    @classmethod
    def from_options(cls, options: PipelineOptions) -> "StreamSettings":
        stream = options.view_as(StreamOptions)
        if stream.dataset not in landing.DATASETS:
            raise UsageError(
                f"--dataset takes one of: {', '.join(landing.DATASETS)}, not {stream.dataset!r}"
            )
        optional = {
            flag: None if value is None else parse_duration(value, flag)
            for flag, value in (
                ("--stop-after", stream.stop_after),
                ("--stop-after-idle", stream.stop_after_idle),
            )
        }
        rate = None
        if stream.rate is not None:
            if stream.replay is None:
                raise UsageError("--rate paces a replay: add --replay FILE")
            try:
                rate = float(stream.rate)
            except ValueError:
                rate = -1.0
            if not rate > 0:
                raise UsageError(f"--rate takes records per second > 0, not {stream.rate!r}")
        window_s = parse_duration(stream.window, "--window")
        if window_s <= 0:
            raise UsageError("--window must be longer than 0")
        return cls(
            dataset=stream.dataset,
            stop_after=optional["--stop-after"],
            stop_after_idle=optional["--stop-after-idle"],
            replay=stream.replay,
            rate=rate,
            window_s=window_s,
            allowed_lateness_s=parse_duration(stream.allowed_lateness, "--allowed-lateness"),
            poll_interval_s=max(parse_duration(stream.poll_interval, "--poll-interval"), 0.01),
            landing=stream.landing,
        )


# --- windowed review stats ---------------------------------------------------------


class StatInput(NamedTuple):
    """One contribution to a product's window: a review (rating) or its emotion (label)."""

    asin: str
    review_id: str
    rating: Optional[float]
    label: Optional[str]


class ReviewStat(NamedTuple):
    """Reviews of one product in one event-time window: count, mean rating, emotion counts."""

    asin: str
    window_start: Timestamp
    window_end: Timestamp
    reviews: int
    mean_rating: Optional[float]
    emotions: Optional[Mapping[str, int]]


for _record_type in (StatInput, ReviewStat):
    beam.coders.registry.register_coder(_record_type, beam.coders.RowCoder)


class ReviewStatsFn(beam.CombineFn):
    """Ratings and emotion labels of one product's window, by review id.

    By id, so a review sent twice (the datalake keeps one row) counts once, as in
    ``reviews``; output: (reviews, rating sum, {label: count}).
    """

    def create_accumulator(self) -> tuple[dict, dict]:
        return {}, {}

    def add_input(self, accumulator, stat: StatInput):
        ratings, labels = accumulator
        if stat.rating is not None:
            ratings[stat.review_id] = stat.rating
        if stat.label is not None:
            labels[stat.review_id] = stat.label
        return ratings, labels

    def merge_accumulators(self, accumulators):
        ratings, labels = {}, {}
        for more_ratings, more_labels in accumulators:
            ratings.update(more_ratings)
            labels.update(more_labels)
        return ratings, labels

    def extract_output(self, accumulator) -> tuple[int, float, dict]:
        ratings, labels = accumulator
        counts: dict[str, int] = {}
        for label in labels.values():
            counts[label] = counts.get(label, 0) + 1
        return len(ratings), sum(ratings.values()), counts


class _ToReviewStat(beam.DoFn):
    """(asin, accumulator) in a window -> that window's ReviewStat (what this run saw)."""

    def process(self, element, win=beam.DoFn.WindowParam) -> Iterator[ReviewStat]:
        asin, (reviews, total, labels) = element
        yield ReviewStat(
            asin,
            win.start,
            win.end,
            reviews,
            total / reviews if reviews else None,
            dict(sorted(labels.items())) if labels else None,
        )


class WindowedReviewStats(beam.PTransform):
    """StatInput (event-timestamped) -> one ReviewStat per product, window and pane.

    Fixed windows of ``window_s``; a window fires when the watermark passes its end, then
    once per late element within ``allowed_lateness_s``, accumulating, so each pane
    carries the whole window as this run saw it. Later data is dropped here (never from
    ``reviews``).
    """

    def __init__(self, window_s: float, allowed_lateness_s: float):
        super().__init__()
        self._window_s = window_s
        self._lateness_s = allowed_lateness_s

    def expand(self, stats):
        return (
            stats
            | "EventTimeWindows"
            >> beam.WindowInto(
                window.FixedWindows(self._window_s),
                # Beam's default trigger: on time, then once per late element.
                trigger=trigger.DefaultTrigger(),
                accumulation_mode=trigger.AccumulationMode.ACCUMULATING,
                allowed_lateness=Duration(seconds=self._lateness_s),
            )
            | "ByProduct"
            >> beam.Map(lambda stat: (stat.asin, stat)).with_output_types(
                beam.typehints.Tuple[str, StatInput]
            )
            | "Aggregate" >> beam.CombinePerKey(ReviewStatsFn())
            | "ToRow" >> beam.ParDo(_ToReviewStat()).with_output_types(ReviewStat)
        )


def _review_stat(review) -> StatInput:
    return StatInput(review.asin, review.review_id, review.rating, None)


class _AttachEmotionToReview(beam.DoFn):
    """Emotion results know only their review_id: join each to its review's product and
    event time (keyed state), so the label counts in the review's window."""

    REVIEW_STATE = userstate.ReadModifyWriteStateSpec("review", PickleCoder())
    LABEL_STATE = userstate.ReadModifyWriteStateSpec("label", StrUtf8Coder())
    EXPIRY = userstate.TimerSpec("expiry", TimeDomain.WATERMARK)

    def __init__(self, keep_s: float):
        self._keep = Duration(seconds=keep_s)
        self._joined = Metrics.counter(METRICS_NAMESPACE, "stats_emotions_joined")

    def process(
        self,
        element: tuple[str, tuple[str, Any]],
        review=beam.DoFn.StateParam(REVIEW_STATE),
        label=beam.DoFn.StateParam(LABEL_STATE),
        expiry=beam.DoFn.TimerParam(EXPIRY),
    ) -> Iterator[Any]:
        review_id, (kind, value) = element
        if kind == "review":
            asin, micros = value
            pending = label.read()
            if pending is None:
                review.write(value)
                # Past the window's lateness the label could not count anyway.
                expiry.set(Timestamp(micros=micros) + self._keep)
                return
            label.clear()
        else:
            stored = review.read()
            if stored is None:
                label.write(value)  # the emotion came first; the review is on its way
                return
            (asin, micros), pending = stored, value
            review.clear()
        self._joined.inc()
        stat = StatInput(asin, review_id, None, pending)
        yield TimestampedValue(stat, Timestamp(micros=micros))

    @userstate.on_timer(EXPIRY)
    def expire(
        self,
        review=beam.DoFn.StateParam(REVIEW_STATE),
        label=beam.DoFn.StateParam(LABEL_STATE),
    ):
        review.clear()
        label.clear()


def _expects_emotion(review) -> bool:
    """Whether ClassifyEmotions will classify this review (it skips reviews without text).
    Imported here: transforms.emotion loads torch, which a stream without emotions skips."""
    from transforms.emotion import model_text

    return model_text(review.title, review.text) is not None


def _review_key(review) -> Iterator[tuple[str, tuple[str, Any]]]:
    if _expects_emotion(review):
        yield review.review_id, ("review", (review.asin, review.reviewed_at.micros))


def _emotion_key(result) -> tuple[str, tuple[str, Any]]:
    return str(result.review_id), ("emotion", result.label)


class ReviewStats(beam.PTransform):
    """``{"reviews": Review, "emotions": EmotionResult (optional)}`` -> ReviewStat panes.

    Reviews must carry their review time as element timestamp (the streaming sources
    do). Emotion results are joined to their review first, so labels count in the
    review's product and window, and a late emotion fires its window again.
    """

    def __init__(self, window_s: float, allowed_lateness_s: float):
        super().__init__()
        self._window_s = window_s
        self._lateness_s = allowed_lateness_s

    def expand(self, inputs):
        stats = [inputs["reviews"] | "ReviewContributions" >> beam.Map(_review_stat)]
        emotions = inputs.get("emotions")
        if emotions is not None:
            keyed = (
                inputs["reviews"] | "KeyReviews" >> beam.FlatMap(_review_key),
                emotions | "KeyEmotions" >> beam.Map(_emotion_key),
            ) | "ReviewsAndEmotions" >> beam.Flatten()
            stats.append(
                keyed
                | "TypeJoinInput"
                >> beam.Map(lambda kv: kv).with_output_types(
                    beam.typehints.Tuple[str, beam.typehints.Tuple[str, beam.typehints.Any]]
                )
                | "AttachEmotions"
                >> beam.ParDo(_AttachEmotionToReview(self._window_s + self._lateness_s))
            )
        return (
            tuple(stats)
            | "AllContributions" >> beam.Flatten()
            | "Windowed" >> WindowedReviewStats(self._window_s, self._lateness_s)
        )


_REFRESH_SQL = """
WITH keys AS (
    SELECT DISTINCT * FROM unnest(%(asins)s::text[], %(starts)s::timestamptz[])
        AS k (asin, window_start)
), counted AS (  -- one scan of each product's reviews, whatever the number of its windows
    SELECT r.asin, date_bin(%(width)s, r.reviewed_at, %(origin)s) AS window_start,
           count(*) AS reviews, avg(r.rating) AS mean_rating
    FROM reviews r WHERE r.asin IN (SELECT asin FROM keys)
    GROUP BY 1, 2
), labelled AS (
    SELECT asin, window_start, jsonb_object_agg(label, n ORDER BY label) AS emotions
    FROM (
        SELECT r.asin, date_bin(%(width)s, r.reviewed_at, %(origin)s) AS window_start,
               e.label, count(*) AS n
        FROM reviews r JOIN review_emotions e ON e.review_id = r.review_id AND e.model = %(model)s
        WHERE r.asin IN (SELECT asin FROM keys)
        GROUP BY 1, 2, 3
    ) per_label
    GROUP BY 1, 2
)
INSERT INTO review_stats AS s
    (asin, window_start, window_end, reviews, mean_rating, emotions, updated_at)
SELECT k.asin, k.window_start, k.window_start + %(width)s, c.reviews, c.mean_rating,
       l.emotions, now()
FROM keys k JOIN counted c USING (asin, window_start)
LEFT JOIN labelled l USING (asin, window_start)
ON CONFLICT (asin, window_start, window_end) DO UPDATE
SET reviews = EXCLUDED.reviews, mean_rating = EXCLUDED.mean_rating,
    emotions = EXCLUDED.emotions, updated_at = EXCLUDED.updated_at
WHERE (s.reviews, s.mean_rating, s.emotions)
      IS DISTINCT FROM (EXCLUDED.reviews, EXCLUDED.mean_rating, EXCLUDED.emotions)
"""


class _RefreshReviewStatsFn(beam.DoFn):
    """Fired windows -> their ``review_stats`` rows, recomputed from the datalake.

    A pane says which product-window changed; its row is computed from ``reviews`` (and
    ``review_emotions`` for ``model``), so it covers what earlier runs stored too, and a
    review sent twice counts once. Since the panes only see committed rows, the row has
    at least what the pane counted. A statement the database refuses becomes dead letters.
    """

    def __init__(self, dsn: str, model: str, window_s: float, batch_size: int = 50_000):
        self._dsn = dsn
        self._model = model
        self._width = datetime.timedelta(seconds=window_s)
        self._batch_size = batch_size
        self._panes = Metrics.counter(METRICS_NAMESPACE, "review_stats_panes")
        self._rows = Metrics.counter(METRICS_NAMESPACE, "review_stats_upserted")

    def setup(self):
        self._conn: Optional[psycopg.Connection] = None

    def teardown(self):
        if self._conn is not None:
            self._conn.close()

    def start_bundle(self):
        self._keys: dict[tuple[str, int], ReviewStat] = {}

    def process(self, pane: ReviewStat) -> Iterator[DeadLetter]:
        self._panes.inc()
        self._keys[(pane.asin, pane.window_start.micros)] = pane
        if len(self._keys) >= self._batch_size:
            yield from self._flush()

    def finish_bundle(self):
        for letter in self._flush():
            yield GlobalWindows.windowed_value(letter)

    def _flush(self) -> Iterator[DeadLetter]:
        panes, self._keys = list(self._keys.values()), {}
        if not panes:
            return
        params = {
            "asins": [p.asin for p in panes],
            "starts": [p.window_start.to_utc_datetime(has_tz=True) for p in panes],
            "width": self._width,
            "origin": _EPOCH,  # Beam's fixed windows start at multiples of the size
            "model": self._model,
        }
        for attempt in range(3):
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = psycopg.connect(self._dsn, autocommit=True, connect_timeout=10)
                self._rows.inc(max(self._conn.execute(_REFRESH_SQL, params).rowcount, 0))
                return
            except psycopg.OperationalError:
                if self._conn is not None:
                    self._conn.close()
                if attempt == 2:
                    raise
                time.sleep(1 + attempt)
            except psycopg.Error as error:
                message = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
                for pane in panes:
                    yield DeadLetter(
                        NAME,
                        STATS_STAGE,
                        None,
                        None,
                        json.dumps(pane._asdict(), default=str),
                        f"review_stats rejected the window: {message}",
                    )
                return


class RefreshReviewStats(beam.PTransform):
    """ReviewStat panes -> ``review_stats`` rows (recomputed); returns dead letters."""

    def __init__(self, dsn: str, model: str, window_s: float):
        super().__init__()
        self._fn = _RefreshReviewStatsFn(dsn, model, window_s)

    def expand(self, panes):
        return (
            panes
            | "Recompute" >> beam.ParDo(self._fn).with_output_types(DeadLetter)
            | "OutOfWindows" >> beam.WindowInto(window.GlobalWindows())
        )


def _reviewed_at(review) -> Timestamp:
    return review.reviewed_at


def _no_time(record) -> None:
    return None


# --- draining on Ctrl-C ----------------------------------------------------------------

_DRAIN_FILES: list[str] = []


def _drain_file(directory: str, run_id: str) -> str:
    """A hidden file whose existence tells the run's source to stop (any worker that sees
    the landing zone sees it)."""
    path = os.path.join(directory, f".drain-{run_id}")
    _DRAIN_FILES.append(path)
    return path


@contextlib.contextmanager
def _drain_on_interrupt() -> Iterator[list[bool]]:
    """First Ctrl-C (SIGINT): the source stops, everything in flight is written, windows
    fire, the run ends DRAINED. A second Ctrl-C aborts."""
    requested = [False]
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def drain(signum, frame):
        if requested[0]:
            raise KeyboardInterrupt
        requested[0] = True
        _LOG.warning(
            "draining: the source stops, what is in flight is written (Ctrl-C again: abort)"
        )
        for path in _DRAIN_FILES:
            with contextlib.suppress(OSError):
                Path(path).touch()

    previous = signal.signal(signal.SIGINT, drain)
    try:
        yield requested
    finally:
        signal.signal(signal.SIGINT, previous)
        for path in _DRAIN_FILES:
            with contextlib.suppress(OSError):
                os.unlink(path)
        _DRAIN_FILES.clear()


# --- the pipeline ------------------------------------------------------------------


def _classify_emotions(reviews, options: PipelineOptions, dsn: str, batch_size: int):
    """Reviews -> emotions upserted; returns (the committed results, [dead letters])."""
    result = reviews | "ClassifyEmotions" >> emotion_classifier(options, NAME)
    written = result.emotions | "UpsertEmotions" >> UpsertAndSettle(
        dsn, REVIEW_EMOTIONS, NAME, batch_size, committed_time=_no_time
    )
    return written["committed"], [result.dead_letters, written["rejected"]]


def merge_fnapi_metrics_eagerly() -> None:
    """Work around a Beam 2.77 FnApiRunner bug that kills long streams at their end.

    After each bundle the runner merges the stage's metrics into a *lazy* generator that
    wraps the previous one, so a stage of more than ~1,000 bundles (a stream polling for
    a few minutes) nests that deep and reading the counters raises RecursionError. Merged
    eagerly (a list), the result is the same and flat.
    """
    try:
        from apache_beam.runners.portability.fn_api_runner import fn_runner
    except ImportError:  # pragma: no cover - the runner moved: nothing to fix
        return
    merge = getattr(fn_runner, "consolidate_monitoring_infos", None)
    if merge is None or getattr(merge, "eager", False):
        return

    def eager(monitoring_infos):
        return list(merge(monitoring_infos))

    eager.eager = True
    fn_runner.consolidate_monitoring_infos = eager


def build(pipeline: beam.Pipeline, options: PipelineOptions, dsn: str, run_id: str):
    """Follow the landing zone (or replay a file) into the datalake; returns cleaned records."""
    merge_fnapi_metrics_eagerly()
    settings = StreamSettings.from_options(options)
    options.view_as(StandardOptions).streaming = True
    kind = landing.DATASETS[settings.dataset]
    spec = REVIEWS if kind == REVIEW else PRODUCTS
    batch_size = options.view_as(DatalakeOptions).batch_size
    root = Path(settings.landing).resolve() if settings.landing else landing.landing_root()
    root.mkdir(parents=True, exist_ok=True)
    drain_file = _drain_file(str(root), run_id)

    if settings.replay:
        source = pipeline | "ReplayFile" >> ReplayFile(
            settings.replay, settings.rate, NAME, settings.stop_after, drain_file
        )
        _LOG.info("stream: replaying %s at %s records/s", settings.replay, settings.rate or "max")
    else:
        directory = landing.landing_dir(settings.dataset, root)
        source = pipeline | "FollowLanding" >> FollowLanding(
            directory,
            settings.dataset,
            dsn,
            run_id,
            NAME,
            settings.poll_interval_s,
            settings.stop_after,
            settings.stop_after_idle,
            drain_file,
        )
        _LOG.info(
            "stream: following %s (every %.1f s when idle; Ctrl-C drains)",
            directory,
            settings.poll_interval_s,
        )

    # Every sink of a landed file's records settles it in landing_files (not a replay).
    ledger = None if settings.replay else Ledger(settings.dataset, run_id)
    parsed = source.records | "Parse" >> ParseRecords(kind, NAME)
    cleaned = parsed.records | "Clean" >> CLEAN_TRANSFORMS[kind](NAME)
    written = cleaned.records | "Upsert" >> UpsertAndSettle(
        dsn,
        spec,
        NAME,
        batch_size,
        ledger=ledger,
        committed_time=_reviewed_at if kind == REVIEW else None,
    )
    # One dead-letter sink per stage, not one behind a Flatten: local runners run what
    # follows a multi-input Flatten only once the stream ends.
    for stage, letters in (
        ("Read", source.dead_letters),
        ("Parse", parsed.dead_letters),
        ("Clean", cleaned.dead_letters),
        ("Sink", written["rejected"]),
    ):
        _ = letters | f"Write{stage}DeadLetters" >> WriteDeadLettersAndSettle(
            dsn, run_id, batch_size, ledger
        )

    other_dead_letters = []
    if kind == REVIEW:
        # Stats see committed rows only: a pane never counts what is not in the datalake.
        stats_inputs = {"reviews": written["committed"]}
        emotion = options.view_as(EmotionOptions)
        if emotion.emotions:
            emotions, emotion_dead = _classify_emotions(cleaned.records, options, dsn, batch_size)
            stats_inputs["emotions"] = emotions
            other_dead_letters += emotion_dead
        panes = stats_inputs | "ReviewStats" >> ReviewStats(
            settings.window_s, settings.allowed_lateness_s
        )
        other_dead_letters.append(
            panes
            | "RefreshReviewStats" >> RefreshReviewStats(dsn, emotion.model, settings.window_s)
        )
        _LOG.info(
            "stream: review_stats in %s windows fire as the watermark passes them; on the"
            " local FnApiRunner that is when the stream stops",
            _describe_duration(settings.window_s),
        )
    for index, letters in enumerate(other_dead_letters):  # not a landed file's records
        _ = letters | f"WriteOtherDeadLetters{index}" >> WriteDeadLetters(dsn, run_id, batch_size)
    return cleaned.records


def _describe_duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def run(
    argv: Optional[Sequence[str]] = None, test_pipeline: Optional[beam.Pipeline] = None
) -> RunSummary:
    """Run the pipeline (``python -m pipelines run stream [--dataset products] ...``)."""
    settings = StreamSettings.from_options(PipelineOptions(list(argv or [])))
    table = REVIEWS.table if settings.dataset == "reviews" else PRODUCTS.table
    with _drain_on_interrupt() as drained:
        summary = execute(NAME, build, argv, test_pipeline, table=table)
    if drained[0] and summary.state == "DONE":
        with datalake.connect(datalake.resolve_dsn(_dsn_of(argv))) as conn:
            conn.execute(
                "UPDATE pipeline_runs SET state = 'DRAINED' WHERE run_id = %s AND state = 'DONE'",
                (summary.run_id,),
            )
        summary = dataclasses.replace(summary, state="DRAINED")
    return summary


def _dsn_of(argv: Optional[Sequence[str]]) -> Optional[str]:
    return PipelineOptions(list(argv or [])).view_as(DatalakeOptions).dsn
