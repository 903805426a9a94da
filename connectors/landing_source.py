"""``FollowLanding``: the unbounded source over the landing zone.

A splittable DoFn polls a dataset's directory and emits each new file's lines once,
timestamped with the review time, advancing the watermark; the zone's ledger
(``landing_files``) makes a restarted pipeline skip what is done.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Optional, Union

import apache_beam as beam
import psycopg
from apache_beam import pvalue
from apache_beam.coders import PickleCoder
from apache_beam.io.iobase import RestrictionProgress, RestrictionTracker
from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
from apache_beam.metrics import Metrics
from apache_beam.transforms.core import RestrictionProvider
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Timestamp

from connectors.landing import LandedFile, list_landed
from connectors.files import ReadLinesFn
from transforms.clean import review_event_time
from transforms.parse import DEAD_LETTERS, METRICS_NAMESPACE, decode, detect
from transforms.records import REVIEW

# --- event time ---------------------------------------------------------------------

_LOG = logging.getLogger(__name__)


def event_time(text: str) -> Optional[Timestamp]:
    """The review time of a raw review line, read as cleaning reads it; else None.

    Products carry no event time, nor does a line whose time cannot be read (it will be
    a dead letter): only the time fields are cleaned, not the whole review.
    """
    try:
        fields = decode(text)
        kind, generation = detect(fields)
        if kind != REVIEW:
            return None
        return review_event_time(fields, generation)[0]
    except Exception:  # noqa: BLE001 - the parse and clean stages report why, downstream
        return None


def timestamped(output: Any, landed_at: Timestamp) -> tuple[Any, Optional[Timestamp]]:
    """A read output, timestamped: a record at its review time (else when its file
    landed), a dead letter when its file landed; and the record's time (None for a dead
    letter), which holds the watermark."""
    if isinstance(output, pvalue.TaggedOutput):
        return pvalue.TaggedOutput(output.tag, TimestampedValue(output.value, landed_at)), None
    when = event_time(output.text) or landed_at
    return TimestampedValue(output, when), when


# --- FollowLanding: the unbounded source over the landing zone -------------------


class LandingWatch(NamedTuple):
    """What FollowLanding follows: a dataset's landing directory."""

    directory: str
    dataset: str


class LandingRestriction(NamedTuple):
    """Where following stands: files claimed and not yet settled; when the first poll
    was (``--stop-after`` counts from it) and when a file was last new (``--stop-after-idle``)."""

    in_flight: frozenset
    started: Optional[float] = None
    last_new: Optional[float] = None
    finished: bool = False


class _Poll(NamedTuple):
    """One claim: the new files of one poll, and the in-flight files worth remembering."""

    files: tuple
    keep: frozenset
    at: float


_END = "end"


class LandingTracker(RestrictionTracker):
    """Claims are polls; a checkpoint keeps the in-flight set so no file is emitted twice.

    Only checkpoints (``try_split(0)``) split: the files of one poll are one unit of work.
    """

    def __init__(self, restriction: LandingRestriction):
        self._restriction = restriction

    def current_restriction(self) -> LandingRestriction:
        return self._restriction

    def current_progress(self) -> RestrictionProgress:
        return RestrictionProgress(completed=0, remaining=0 if self._restriction.finished else 1)

    def try_claim(self, position: Union[_Poll, str]) -> bool:
        if self._restriction.finished:
            return False
        if position == _END:
            self._restriction = self._restriction._replace(finished=True)
            return True
        started = self._restriction.started or position.at
        last_new = self._restriction.last_new
        if position.files or last_new is None:
            last_new = position.at
        self._restriction = LandingRestriction(
            position.keep | frozenset(position.files), started, last_new, False
        )
        return True

    def try_split(self, fraction_of_remainder: float):
        if self._restriction.finished or fraction_of_remainder > 0:
            return None
        primary = self._restriction._replace(finished=True)
        residual = self._restriction._replace(finished=False)
        self._restriction = primary
        return primary, residual

    def check_done(self) -> None:
        if not self._restriction.finished:
            raise ValueError("FollowLanding returned without a checkpoint or the end claim")

    def is_bounded(self) -> bool:
        return False


class _LandingRestrictionProvider(RestrictionProvider):
    def initial_restriction(self, watch: LandingWatch) -> LandingRestriction:
        return LandingRestriction(frozenset())

    def create_tracker(self, restriction: LandingRestriction) -> LandingTracker:
        return LandingTracker(restriction)

    def restriction_size(self, watch: LandingWatch, restriction: LandingRestriction) -> int:
        return 0 if restriction.finished else 1

    def restriction_coder(self):
        return PickleCoder()

    def truncate(self, watch: LandingWatch, restriction: LandingRestriction):
        return None  # on drain, stop following: what landed later waits for the next run


class _Claimed(NamedTuple):
    file: LandedFile
    replaces_run: Optional[str]  # the run whose dead letters for this file are replaced


class FollowLandingFn(beam.DoFn):
    """Poll a landing directory; emit each new file's lines once, then checkpoint.

    Main output: ``RawRecord`` timestamped with the review time (the file's mtime for
    products and for lines that are not reviews); tagged ``dead_letters``: unreadable
    lines. Once a file is emitted its record count goes to ``landing_files``, where the
    sinks settle it. The watermark follows the oldest event in the latest file, never
    ahead of the wall clock. Local runners ignore a checkpoint's resume delay, so an idle poll
    sleeps here (at most ``poll_interval``) before it checkpoints.
    """

    def __init__(
        self,
        dsn: str,
        run_id: str,
        pipeline_name: str,
        poll_interval: float = 1.0,
        stop_after: Optional[float] = None,
        stop_after_idle: Optional[float] = None,
        drain_file: Optional[str] = None,
        stale_after: float = 300.0,
        max_files_per_poll: int = 256,
        max_bytes_per_poll: int = 256 << 20,
    ):
        self._dsn = dsn
        self._drain_file = drain_file
        self._run_id = run_id
        self._pipeline_name = pipeline_name
        self._poll_interval = poll_interval
        self._stop_after = stop_after
        self._stop_after_idle = stop_after_idle
        self._stale_after = stale_after
        self._max_files = max_files_per_poll
        self._max_bytes = max_bytes_per_poll
        self._reader = ReadLinesFn(pipeline_name)
        self._claimed = Metrics.counter(METRICS_NAMESPACE, "landing_files_claimed")
        self._taken_over = Metrics.counter(METRICS_NAMESPACE, "landing_files_taken_over")
        self._behind = Metrics.counter(METRICS_NAMESPACE, "records_behind_watermark")

    def setup(self):
        self._conn: Optional[psycopg.Connection] = None
        self._known_done: set[str] = set()  # not asked about again by this worker

    def teardown(self):
        if self._conn is not None:
            self._conn.close()

    @beam.DoFn.unbounded_per_element()
    def process(
        self,
        watch: LandingWatch,
        tracker=beam.DoFn.RestrictionParam(_LandingRestrictionProvider()),
        watermark=beam.DoFn.WatermarkEstimatorParam(ManualWatermarkEstimator.default_provider()),
    ) -> Iterator[Any]:
        restriction = tracker.current_restriction()
        if time.time() >= self._deadline(restriction) or draining(self._drain_file):
            tracker.try_claim(_END)
        else:
            yield from self._follow(watch, restriction, tracker, watermark)

    def _follow(self, watch, restriction, tracker, watermark) -> Iterator[Any]:
        """One poll: claim new files, emit them, checkpoint (idle: sleep, checkpoint)."""
        try:
            keep, claimed = self._poll(watch, restriction)
        except psycopg.OperationalError as error:  # the datalake is away: try again later
            _LOG.warning("landing poll failed, retrying: %s", str(error).strip())
            self._close()
            keep, claimed = restriction.in_flight, []
        poll = _Poll(tuple(c.file.name for c in claimed), keep, time.time())
        if not tracker.try_claim(poll):
            return  # checkpointed meanwhile: the residual claims these files again
        if not claimed:
            self._idle(tracker.current_restriction())
        for claim in claimed:
            yield from self._emit(watch.dataset, claim.file, watermark)
        tracker.defer_remainder()

    # -- stopping and idling

    def _deadline(self, restriction: LandingRestriction) -> float:
        """When to stop following; the clocks start at the first poll, not at launch
        (which may include minutes of model loading)."""
        deadlines = [float("inf")]
        if self._stop_after is not None and restriction.started is not None:
            deadlines.append(restriction.started + self._stop_after)
        if self._stop_after_idle is not None and restriction.last_new is not None:
            deadlines.append(restriction.last_new + self._stop_after_idle)
        return min(deadlines)

    def _idle(self, restriction: LandingRestriction) -> None:
        pause = min(self._poll_interval, self._deadline(restriction) - time.time())
        if pause > 0:
            time.sleep(pause)

    # -- the ledger: claims in landing_files

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self._dsn, autocommit=True, connect_timeout=10)
        return self._conn

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _poll(
        self, watch: LandingWatch, restriction: LandingRestriction
    ) -> tuple[frozenset, list[_Claimed]]:
        """Heartbeat our claims, list the directory, claim what is new (or orphaned)."""
        landed = [f for f in list_landed(watch.directory) if f.name not in self._known_done]
        conn = self._connection()
        with conn.transaction():
            conn.execute(
                "UPDATE landing_files SET heartbeat_at = now()"
                " WHERE run_id = %s AND state = 'claimed'",
                (self._run_id,),
            )
            ledger = {
                name: (state, str(run_id), stale, run_state)
                for name, state, run_id, stale, run_state in conn.execute(
                    "SELECT l.name, l.state, l.run_id, l.heartbeat_at < now() - %s * interval"
                    " '1 second', r.state FROM landing_files l LEFT JOIN pipeline_runs r"
                    " USING (run_id) WHERE l.dataset = %s AND l.name = ANY(%s) FOR UPDATE OF l",
                    (self._stale_after, watch.dataset, [f.name for f in landed]),
                )
            }
            self._known_done.update(n for n, row in ledger.items() if row[0] == "done")
            present = {f.name for f in landed}
            keep = frozenset(
                n
                for n in restriction.in_flight
                if n in present and ledger.get(n, ("",))[0] != "done"
            )
            claimed: list[_Claimed] = []
            budget = self._max_bytes
            for landed_file in landed:
                if len(claimed) >= self._max_files or (claimed and landed_file.bytes > budget):
                    break
                if landed_file.name in restriction.in_flight:
                    continue
                claim = self._claim(conn, watch.dataset, landed_file, ledger.get(landed_file.name))
                if claim is not None:
                    claimed.append(claim)
                    budget -= landed_file.bytes
        for claim in claimed:
            self._claimed.inc()
            if claim.replaces_run is not None:
                self._taken_over.inc()
        return keep, claimed

    def _claim(self, conn, dataset: str, landed: LandedFile, row) -> Optional[_Claimed]:
        if row is None:
            inserted = conn.execute(
                "INSERT INTO landing_files (dataset, name, path, bytes, state, run_id)"
                " VALUES (%s, %s, %s, %s, 'claimed', %s) ON CONFLICT DO NOTHING RETURNING name",
                (dataset, landed.name, landed.path, landed.bytes, self._run_id),
            ).fetchone()
            return _Claimed(landed, None) if inserted else None
        state, run_id, stale, run_state = row
        if state == "done":
            return None
        mine = run_id == self._run_id  # emitted by a failed attempt of this run: retried
        if not (mine or stale or run_state != "RUNNING"):
            return None  # another live run has it
        # The earlier claim's dead letters for this file are replaced by this reading.
        conn.execute(
            "DELETE FROM dead_letters WHERE source = %s AND run_id = %s", (landed.path, run_id)
        )
        conn.execute(
            "UPDATE landing_files SET run_id = %s, path = %s, bytes = %s, records = NULL,"
            " settled = 0,"
            " attempts = attempts + 1, claimed_at = now(), heartbeat_at = now()"
            " WHERE dataset = %s AND name = %s",
            (self._run_id, landed.path, landed.bytes, dataset, landed.name),
        )
        if not mine:
            _LOG.warning("taking over %s from run %s (%s)", landed.path, run_id, run_state)
        return _Claimed(landed, run_id)

    # -- emitting a file

    def _emit(self, dataset: str, landed: LandedFile, watermark) -> Iterator[Any]:
        landed_at = Timestamp(landed.mtime)
        current = watermark.current_watermark()
        oldest: Optional[Timestamp] = None
        count = 0
        for output in self._reader.process(landed.path):
            count += 1
            value, when = timestamped(output, landed_at)
            if when is not None:
                if current is not None and when < current:
                    self._behind.inc()
                oldest = when if oldest is None or when < oldest else oldest
            yield value
        # Now the file's record count is known; it is done once that many are settled
        # (already, if the sinks were quicker than this update).
        self._connection().execute(
            "UPDATE landing_files SET records = %(n)s,"
            " state = CASE WHEN settled >= %(n)s THEN 'done' ELSE state END,"
            " done_at = CASE WHEN settled >= %(n)s THEN now() END"
            " WHERE dataset = %(dataset)s AND name = %(name)s AND run_id = %(run)s",
            {"n": count, "dataset": dataset, "name": landed.name, "run": self._run_id},
        )
        if oldest is not None:
            advance_watermark(watermark, oldest)


def draining(drain_file: Optional[str]) -> bool:
    """Whether the launcher asked the source to stop (and the pipeline to drain)."""
    return drain_file is not None and os.path.exists(drain_file)


def advance_watermark(watermark, oldest: Timestamp) -> None:
    """Move the watermark up to ``oldest`` (never back, never past the wall clock)."""
    target = min(oldest, Timestamp.now())
    current = watermark.current_watermark()
    if current is None or target > current:
        watermark.set_watermark(target)


class FollowLanding(beam.PTransform):
    """Records landing in a dataset's directory, as an unbounded PCollection.

    Returns a tagged result: ``.records`` (RawRecord, event-timestamped) and
    ``.dead_letters``; the sinks given a ``Ledger`` mark its files done. Stops ``stop_after`` seconds after its
    first poll, after ``stop_after_idle`` seconds without a new file, or once
    ``drain_file`` exists, if given; else it follows forever.
    """

    def __init__(
        self,
        directory: Union[str, Path],
        dataset: str,
        dsn: str,
        run_id: str,
        pipeline_name: str = "stream",
        poll_interval: float = 1.0,
        stop_after: Optional[float] = None,
        stop_after_idle: Optional[float] = None,
        drain_file: Optional[str] = None,
    ):
        super().__init__()
        self._directory = str(directory)
        self._dataset = dataset
        self._fn = FollowLandingFn(
            dsn, run_id, pipeline_name, poll_interval, stop_after, stop_after_idle, drain_file
        )

    def expand(self, pbegin):
        directory, dataset = self._directory, self._dataset
        return (
            pbegin
            | "Start" >> beam.Impulse()
            | "Watch" >> beam.Map(lambda _: LandingWatch(directory, dataset))
            | "Follow" >> beam.ParDo(self._fn).with_outputs(DEAD_LETTERS, main="records")
        )
