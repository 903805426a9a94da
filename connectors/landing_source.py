"""``FollowLanding``: the unbounded source over the landing zone.

A splittable DoFn polls a dataset's directory and emits each new file's lines once,
timestamped with the review time, advancing the watermark; the zone's ledger
(``landing_files``) makes a restarted pipeline skip what is done.
"""

from __future__ import annotations

import logging
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

from connectors import datalake
from connectors.landing import LandedFile, Ledger, list_landed
from connectors.stopping import stop_requested
from connectors.files import read_lines
from transforms.clean import review_event_time
from transforms.parse import decode, detect
from transforms.records import DEAD_LETTERS, METRICS_NAMESPACE
from transforms.records import REVIEW, DeadLetter, RawRecord

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


def timestamped(
    item: Union[RawRecord, DeadLetter], landed_at: Timestamp
) -> tuple[Any, Optional[Timestamp]]:
    """An item of ``read_lines`` as the source's output: a record at its review time (else
    when its file landed), a dead letter (tagged) when its file landed; and the record's
    time (None for a dead letter), which holds the watermark."""
    if type(item) is DeadLetter:
        return pvalue.TaggedOutput(DEAD_LETTERS, TimestampedValue(item, landed_at)), None
    when = event_time(item.text) or landed_at
    return TimestampedValue(item, when), when


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


class FollowLandingFn(beam.DoFn):
    """Poll a landing directory; emit each new file's lines once, then checkpoint.

    Main output: ``RawRecord`` timestamped with the review time (the file's mtime for
    products and for lines that are not reviews); tagged ``dead_letters``: unreadable
    lines. Claims and record counts go to the landing zone's ``Ledger``, where the sinks
    settle them. The watermark follows the oldest event in the latest file, never ahead
    of the wall clock, and is recorded with the run (the stream's stats read it). Local
    runners ignore a checkpoint's resume delay, so an idle poll sleeps here (at most
    ``poll_interval``) before it checkpoints.
    """

    def __init__(
        self,
        dsn: str,
        run_id: str,
        pipeline_name: str,
        poll_interval: float = 1.0,
        stop_after: Optional[float] = None,
        stop_after_idle: Optional[float] = None,
        stop_file: Optional[str] = None,
        stale_after: float = 300.0,
        max_files_per_poll: int = 256,
        max_bytes_per_poll: int = 256 << 20,
    ):
        self._dsn = dsn
        self._stop_file = stop_file
        self._run_id = run_id
        self._pipeline_name = pipeline_name
        self._poll_interval = poll_interval
        self._stop_after = stop_after
        self._stop_after_idle = stop_after_idle
        self._stale_after = stale_after
        self._max_files = max_files_per_poll
        self._max_bytes = max_bytes_per_poll
        self._claimed = Metrics.counter(METRICS_NAMESPACE, "landing_files_claimed")
        self._taken_over = Metrics.counter(METRICS_NAMESPACE, "landing_files_taken_over")
        self._behind = Metrics.counter(METRICS_NAMESPACE, "records_behind_watermark")

    def setup(self):
        self._ledgers: dict[str, Ledger] = {}

    def teardown(self):
        for ledger in self._ledgers.values():
            ledger.close()

    def _ledger(self, dataset: str) -> Ledger:
        if dataset not in self._ledgers:
            self._ledgers[dataset] = Ledger(self._dsn, dataset, self._run_id, self._stale_after)
        return self._ledgers[dataset]

    @beam.DoFn.unbounded_per_element()
    def process(
        self,
        watch: LandingWatch,
        tracker=beam.DoFn.RestrictionParam(_LandingRestrictionProvider()),
        watermark=beam.DoFn.WatermarkEstimatorParam(ManualWatermarkEstimator.default_provider()),
    ) -> Iterator[Any]:
        restriction = tracker.current_restriction()
        if time.time() >= self._deadline(restriction) or stop_requested(self._stop_file):
            self._ledger(watch.dataset).flush_idle()
            tracker.try_claim(_END)
        else:
            yield from self._follow(watch, restriction, tracker, watermark)

    def _follow(self, watch, restriction, tracker, watermark) -> Iterator[Any]:
        """One poll: claim new files, emit them, checkpoint (idle: sleep, checkpoint)."""
        ledger = self._ledger(watch.dataset)
        try:
            keep, claimed = ledger.poll(
                list_landed(watch.directory),
                restriction.in_flight,
                self._max_files,
                self._max_bytes,
            )
        except psycopg.Error as error:  # the datalake is away: try again at the next poll
            if not datalake.is_transient(error):
                raise
            _LOG.warning("landing poll failed, retrying: %s", datalake.first_line(error))
            ledger.close()
            keep, claimed = restriction.in_flight, []
        poll = _Poll(tuple(c.file.name for c in claimed), keep, time.time())
        if not tracker.try_claim(poll):
            return  # checkpointed meanwhile: the residual claims these files again
        if not claimed:
            ledger.idled(self._idle(tracker.current_restriction()))
        for claim in claimed:
            self._claimed.inc()
            if claim.replaces_run is not None:
                self._taken_over.inc()
            yield from self._emit(ledger, claim.file, watermark)
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

    def _idle(self, restriction: LandingRestriction) -> float:
        """Wait before the next poll (at most the poll interval); how long it waited."""
        pause = min(self._poll_interval, self._deadline(restriction) - time.time())
        if pause > 0:
            time.sleep(pause)
        return max(pause, 0.0)

    # -- emitting a file

    def _emit(self, ledger: Ledger, landed: LandedFile, watermark) -> Iterator[Any]:
        landed_at = Timestamp(landed.mtime)
        current = watermark.current_watermark()
        oldest: Optional[Timestamp] = None
        records = dead = 0
        for item in read_lines(landed.path, self._pipeline_name):
            value, when = timestamped(item, landed_at)
            if when is None:
                dead += 1
            else:
                records += 1
                if current is not None and when < current:
                    self._behind.inc()
                oldest = when if oldest is None or when < oldest else oldest
            yield value
        ledger.emitted(landed.name, records, dead)
        if oldest is not None:
            advance_watermark(watermark, oldest)
            datalake.record_watermark(
                ledger.connection(), self._run_id, watermark.current_watermark()
            )


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
    its run's stop file exists (``connectors.stopping``); else it follows forever.
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
        stop_file: Optional[str] = None,
    ):
        super().__init__()
        self._directory = str(directory)
        self._dataset = dataset
        self._fn = FollowLandingFn(
            dsn, run_id, pipeline_name, poll_interval, stop_after, stop_after_idle, stop_file
        )

    def expand(self, pbegin):
        directory, dataset = self._directory, self._dataset
        return (
            pbegin
            | "Start" >> beam.Impulse()
            | "Watch" >> beam.Map(lambda _: LandingWatch(directory, dataset))
            | "Follow" >> beam.ParDo(self._fn).with_outputs(DEAD_LETTERS, main="records")
        )
