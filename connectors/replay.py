"""``ReplayFile``: any dataset file as an unbounded stream at a fixed rate."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Iterator, NamedTuple, Optional

import apache_beam as beam
import psycopg
from apache_beam.metrics import Metrics
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
from apache_beam.transforms.core import RestrictionProvider
from apache_beam.utils.timestamp import Timestamp

from connectors import datalake
from connectors.landing_source import advance_watermark, timestamped
from connectors.stopping import stop_requested
from connectors.files import NoInputError, read_lines
from transforms.records import DEAD_LETTERS, METRICS_NAMESPACE

# --- ReplayFile: any dataset file as a stream at a fixed rate ---------------------


class ReplayStart(NamedTuple):
    """A file to replay, and when the replay started (for ``stop_after``)."""

    path: str
    started: float


class _CheckpointOnlyTracker(OffsetRestrictionTracker):
    """Offsets are positions in a file that can only be read in order: no dynamic splits."""

    def try_split(self, fraction_of_remainder: float):
        if fraction_of_remainder > 0:
            return None
        return super().try_split(0)

    def is_bounded(self) -> bool:
        return False


_LOG = logging.getLogger(__name__)
_NO_END = sys.maxsize


class _ReplayRestrictionProvider(RestrictionProvider):
    def initial_restriction(self, replay: ReplayStart) -> OffsetRange:
        return OffsetRange(0, _NO_END)

    def create_tracker(self, restriction: OffsetRange) -> _CheckpointOnlyTracker:
        return _CheckpointOnlyTracker(restriction)

    def restriction_size(self, replay: ReplayStart, restriction: OffsetRange) -> int:
        return 1

    def truncate(self, replay: ReplayStart, restriction: OffsetRange):
        return None


class _Cursor:
    """An open reading of a file, ``position`` items in (records and read errors)."""

    def __init__(self, items: Iterator[Any]):
        self.items = items
        self.position = 0


class ReplayFileFn(beam.DoFn):
    """Emit a file's lines at ``rate`` records/s, checkpointing every ``chunk_s`` seconds.

    The reading stays open between checkpoints (resumed where it stopped, re-read and
    skipped only on another worker). Timestamps and watermark as in ``FollowLandingFn``;
    with a ``run`` (dsn, run id) the watermark is recorded with the run.
    """

    def __init__(
        self,
        pipeline_name: str,
        rate: Optional[float] = None,
        stop_after: Optional[float] = None,
        stop_file: Optional[str] = None,
        chunk_s: float = 0.5,
        run: Optional[tuple[str, str]] = None,
    ):
        self._pipeline_name = pipeline_name
        self._rate = rate
        self._stop_after = stop_after
        self._stop_file = stop_file
        self._chunk_s = chunk_s
        self._run = run
        self._read = Metrics.counter(METRICS_NAMESPACE, "records_read")
        self._rejected = Metrics.counter(METRICS_NAMESPACE, "read_dead_letters")

    def setup(self):
        self._cursors: dict[tuple[str, int], _Cursor] = {}
        self._conn: Optional[psycopg.Connection] = None

    def teardown(self):
        for cursor in self._cursors.values():
            cursor.items.close()
        if self._conn is not None:
            self._conn.close()

    def _advance(self, watermark, oldest: Optional[Timestamp]) -> None:
        if oldest is None:
            return
        advance_watermark(watermark, oldest)
        if self._run is None:
            return
        dsn, run_id = self._run
        try:
            if self._conn is None or self._conn.closed:
                self._conn = datalake.open_connection(dsn, autocommit=True)
            datalake.record_watermark(self._conn, run_id, watermark.current_watermark())
        except psycopg.Error as error:  # the stats finalise at the next chance
            _LOG.warning("cannot record the replay's watermark: %s", datalake.first_line(error))
            self._conn = None

    def _cursor(self, path: str, start: int) -> _Cursor:
        cursor = self._cursors.pop((path, start), None)
        if cursor is None:
            cursor = _Cursor(read_lines(path, self._pipeline_name))
            if start:
                _LOG.warning("replay of %s resumes at item %d on a new reader", path, start)
            for _ in range(start):  # a checkpoint resumed on another worker: skip ahead
                next(cursor.items, None)
            cursor.position = start
        return cursor

    @beam.DoFn.unbounded_per_element()
    def process(
        self,
        replay: ReplayStart,
        tracker=beam.DoFn.RestrictionParam(_ReplayRestrictionProvider()),
        watermark=beam.DoFn.WatermarkEstimatorParam(ManualWatermarkEstimator.default_provider()),
    ) -> Iterator[Any]:
        restriction = tracker.current_restriction()
        cursor = self._cursor(replay.path, restriction.start)
        stop = self._stop_after is not None and time.time() >= replay.started + self._stop_after
        if stop or stop_requested(self._stop_file):
            cursor.items.close()  # counts what was read, in this step
            tracker.try_claim(restriction.stop)
        else:
            yield from self._replay(replay, restriction, cursor, tracker, watermark)

    def _replay(self, replay, restriction, cursor, tracker, watermark) -> Iterator[Any]:
        """Emit up to ``chunk_s`` seconds of records at the rate, then checkpoint."""
        landed_at = Timestamp(os.path.getmtime(replay.path))
        began = time.monotonic()
        oldest: Optional[Timestamp] = None
        sent = 0
        while time.monotonic() - began < self._chunk_s:
            if not tracker.try_claim(cursor.position):
                break
            item = next(cursor.items, None)
            if item is None:  # the end of the file
                tracker.try_claim(restriction.stop)
                self._advance(watermark, oldest)
                return
            cursor.position += 1
            if self._rate:
                wait = began + sent / self._rate - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
            sent += 1
            value, when = timestamped(item, landed_at)
            if when is None:
                self._rejected.inc()
            else:
                self._read.inc()
                oldest = when if oldest is None or when < oldest else oldest
            yield value
        self._advance(watermark, oldest)
        self._cursors[(replay.path, cursor.position)] = cursor
        tracker.defer_remainder()


class ReplayFile(beam.PTransform):
    """A dataset file as an unbounded stream at ``rate`` records/s (None: as fast as read).

    Returns ``.records`` (RawRecord, event-timestamped) and ``.dead_letters``.
    """

    def __init__(
        self,
        path: str,
        rate: Optional[float] = None,
        pipeline_name: str = "stream",
        stop_after: Optional[float] = None,
        stop_file: Optional[str] = None,
        run: Optional[tuple[str, str]] = None,
    ):
        super().__init__()
        if not os.path.isfile(path):
            raise NoInputError(f"no file to replay at {path!r}: check the path")
        self._path = os.path.abspath(path)
        self._fn = ReplayFileFn(pipeline_name, rate, stop_after, stop_file, run=run)

    def expand(self, pbegin):
        path = self._path
        return (
            pbegin
            | "Start" >> beam.Impulse()
            | "Replay" >> beam.Map(lambda _: ReplayStart(path, time.time()))
            | "Emit" >> beam.ParDo(self._fn).with_outputs(DEAD_LETTERS, main="records")
        )
