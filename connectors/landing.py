"""The landing zone and the unbounded sources that stream records into the datalake.

``TERMIDATOR_HOME/landing/<dataset>/`` holds complete files only: producers (the REST
service, ``land_lines``, any tool) write a hidden temp name, fsync, then rename, so a
reader never sees half a file. ``FollowLanding`` is a splittable DoFn that polls a
dataset's directory and emits each new file's lines once, timestamped with the review
time, advancing the watermark; ``landing_files`` in the datalake is its ledger, so a
restarted pipeline skips what is done. ``ReplayFile`` streams any dataset file at a
fixed rate. Reading reuses ``connectors.files.ReadLinesFn``; writing reuses the
``connectors.postgres`` sinks, which here also count, in the same transaction, what
they settled of each landed file.
"""

from __future__ import annotations

import collections
import logging
import os
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Optional, Union

import apache_beam as beam
import psycopg
from apache_beam import pvalue
from apache_beam.coders import PickleCoder
from apache_beam.io.iobase import RestrictionProgress, RestrictionTracker
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
from apache_beam.metrics import Metrics
from apache_beam.transforms.core import RestrictionProvider
from apache_beam.transforms.window import GlobalWindows, TimestampedValue
from apache_beam.utils.timestamp import Timestamp

from connectors.files import NoInputError, ReadLinesFn
from connectors.postgres import (
    DEFAULT_BATCH_SIZE,
    CopyUpsertFn,
    TableSpec,
    _refuse_to_drop,
    _sanitise_dead_letter,
    _sink_dead_letter,
    dead_letter_table,
    termidator_home,
)
from transforms.clean import review_event_time
from transforms.parse import DEAD_LETTERS, METRICS_NAMESPACE, decode, detect
from transforms.records import PRODUCT, REVIEW, DeadLetter

DATASETS: Mapping[str, str] = {"reviews": REVIEW, "products": PRODUCT}
SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz")
COMMITTED = "committed"  # tagged output of the settling sinks: records in the datalake
_LOG = logging.getLogger(__name__)


class UnknownDataset(ValueError):
    """A dataset name that has no landing zone."""


# --- the landing zone -------------------------------------------------------------


def landing_root(home: Optional[Path] = None) -> Path:
    """``TERMIDATOR_HOME/landing``: one directory per dataset below it."""
    return (home or termidator_home()) / "landing"


def landing_dir(dataset: str, root: Optional[Path] = None, create: bool = True) -> Path:
    """The directory where complete files of ``dataset`` land (created on demand)."""
    if dataset not in DATASETS:
        raise UnknownDataset(f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")
    directory = Path(root or landing_root()) / dataset
    if create:
        directory.mkdir(parents=True, exist_ok=True)
    return directory


def is_landed_name(name: str) -> bool:
    """Whether a directory entry is a complete dataset file (temp files start with '.')."""
    return not name.startswith(".") and name.endswith(SUFFIXES)


def new_file_name(suffix: str = ".jsonl") -> str:
    """A name that sorts by arrival: UTC time to the microsecond, then a random part."""
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{int(now % 1 * 1e6):06d}Z"
    return f"{stamp}-{uuid.uuid4().hex[:12]}{suffix}"


class LandingFile:
    """A file being landed: written under a hidden temp name, visible only once committed.

    ``commit`` flushes, fsyncs, renames to the final name and fsyncs the directory, so a
    complete file is all a reader can ever see; ``abort`` (or leaving the ``with`` block
    on an exception) removes the temp file.
    """

    def __init__(self, directory: Path, name: Optional[str] = None):
        if name is not None and not is_landed_name(name):
            raise ValueError(f"a landed file name ends in one of {SUFFIXES}: {name!r}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.name = name or new_file_name()
        self.path = self.directory / self.name
        self._temp = self.directory / f".{self.name}.{uuid.uuid4().hex[:8]}.tmp"
        self._file = open(self._temp, "wb")
        self.bytes = 0

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self.bytes += len(data)

    def commit(self) -> Path:
        """Make the file visible under its final name, durably; returns its path."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._temp, self.path)
        _fsync_directory(self.directory)
        return self.path

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        self._temp.unlink(missing_ok=True)

    def __enter__(self) -> "LandingFile":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self._file.closed:
            self.abort()


def _fsync_directory(directory: Path) -> None:
    """Persist a rename: fsync the directory that holds the entry (POSIX only)."""
    if sys.platform.startswith("win"):
        return
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def land_lines(
    dataset: str,
    lines: Iterable[Union[str, bytes]],
    name: Optional[str] = None,
    root: Optional[Path] = None,
) -> Path:
    """Land lines as one complete file in the dataset's landing zone; returns its path."""
    with LandingFile(landing_dir(dataset, root), name) as landing:
        for line in lines:
            data = line.encode("utf-8") if isinstance(line, str) else line
            landing.write(data.rstrip(b"\n") + b"\n")
        return landing.commit()


class LandedFile(NamedTuple):
    """A complete file in a landing directory."""

    name: str
    path: str
    bytes: int
    mtime: float


def list_landed(directory: Union[str, Path]) -> list[LandedFile]:
    """Complete files in a landing directory, oldest first (mtime, then name)."""
    found = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    for entry in entries:
        if not is_landed_name(entry.name):
            continue
        try:
            stat = entry.stat()
        except FileNotFoundError:  # renamed or removed since the listing
            continue
        if entry.is_file():
            found.append((stat.st_mtime_ns, entry.name, entry.path, stat.st_size))
    return [LandedFile(n, p, size, mtime / 1e9) for mtime, n, p, size in sorted(found)]


def backlog(dsn: str, root: Optional[Path] = None) -> dict[str, dict[str, Any]]:
    """Per dataset: landed files no run has finished yet (files, bytes, oldest age in s)."""
    out = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        for dataset in DATASETS:
            landed = list_landed(landing_dir(dataset, root, create=False))
            done = {
                name
                for (name,) in conn.execute(
                    "SELECT name FROM landing_files WHERE dataset = %s AND state = 'done'"
                    " AND name = ANY(%s)",
                    (dataset, [f.name for f in landed]),
                )
            }
            waiting = [f for f in landed if f.name not in done]
            oldest = min((f.mtime for f in waiting), default=None)
            out[dataset] = {
                "files": len(waiting),
                "bytes": sum(f.bytes for f in waiting),
                "oldest_age_s": None if oldest is None else round(time.time() - oldest, 1),
            }
    return out


# --- event time ---------------------------------------------------------------------


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


def _timestamped(output: Any, landed_at: Timestamp) -> tuple[Any, Optional[Timestamp]]:
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
        if time.time() >= self._deadline(restriction) or _draining(self._drain_file):
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
            value, when = _timestamped(output, landed_at)
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


def _draining(drain_file: Optional[str]) -> bool:
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
    skipped only on another worker). Timestamps and watermark as in ``FollowLandingFn``.
    """

    def __init__(
        self,
        pipeline_name: str,
        rate: Optional[float] = None,
        stop_after: Optional[float] = None,
        drain_file: Optional[str] = None,
        chunk_s: float = 0.5,
    ):
        self._pipeline_name = pipeline_name
        self._rate = rate
        self._stop_after = stop_after
        self._drain_file = drain_file
        self._chunk_s = chunk_s

    def setup(self):
        self._cursors: dict[tuple[str, int], _Cursor] = {}

    def teardown(self):
        for cursor in self._cursors.values():
            cursor.items.close()

    def _cursor(self, path: str, start: int) -> _Cursor:
        cursor = self._cursors.pop((path, start), None)
        if cursor is None:
            cursor = _Cursor(iter(ReadLinesFn(self._pipeline_name).process(path)))
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
        if stop or _draining(self._drain_file):
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
                if oldest is not None:
                    advance_watermark(watermark, oldest)
                return
            cursor.position += 1
            if self._rate:
                wait = began + sent / self._rate - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
            sent += 1
            value, when = _timestamped(item, landed_at)
            if when is not None:
                oldest = when if oldest is None or when < oldest else oldest
            yield value
        if oldest is not None:
            advance_watermark(watermark, oldest)
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
        drain_file: Optional[str] = None,
    ):
        super().__init__()
        if not os.path.isfile(path):
            raise NoInputError(f"no file to replay at {path!r}: check the path")
        self._path = os.path.abspath(path)
        self._fn = ReplayFileFn(pipeline_name, rate, stop_after, drain_file)

    def expand(self, pbegin):
        path = self._path
        return (
            pbegin
            | "Start" >> beam.Impulse()
            | "Replay" >> beam.Map(lambda _: ReplayStart(path, time.time()))
            | "Emit" >> beam.ParDo(self._fn).with_outputs(DEAD_LETTERS, main="records")
        )


# --- settling: which records of each landed file are in the datalake ----------------


class Ledger(NamedTuple):
    """Whose landed files a sink settles: the run's claims in one dataset."""

    dataset: str
    run_id: str


# One statement per committed batch, in its transaction: the files' settled counts go up,
# and a file whose every emitted record is settled is done (the source sets ``records``).
_SETTLE_SQL = """
UPDATE landing_files l
SET settled = l.settled + v.n,
    state = CASE WHEN l.records IS NOT NULL AND l.settled + v.n >= l.records
                 THEN 'done' ELSE l.state END,
    done_at = CASE WHEN l.records IS NOT NULL AND l.settled + v.n >= l.records
                   THEN now() ELSE l.done_at END
FROM unnest(%s::text[], %s::int[]) AS v (name, n)
WHERE l.dataset = %s AND l.name = v.name AND l.run_id = %s AND l.state = 'claimed'
"""


class _SettlingCopyUpsertFn(CopyUpsertFn):
    """``CopyUpsertFn`` that settles landed files: each committed batch adds, in its own
    transaction, how many records of each file it wrote to ``landing_files`` (with a
    ``ledger``); and, with ``committed_time``, emits the committed records (tagged
    ``committed``, timestamped by it) for what must only see rows in the datalake."""

    def __init__(
        self,
        *args: Any,
        ledger: Optional[Ledger] = None,
        committed_time: Optional[Any] = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self._ledger = ledger
        self._committed_time = committed_time
        self._settled_files = Metrics.counter(METRICS_NAMESPACE, "landing_records_settled")

    def setup(self):
        # Made before the write lanes are copied from this DoFn: the lanes share the lock
        # and the committed list; each rebinds its own tally and settled count.
        self._lock = threading.Lock()
        self._committed: list = []
        self._tally: dict[str, int] = {}
        self._done_settled = 0
        super().setup()

    def _execute_batch(self, batch: list):
        if self._ledger is not None:
            names = collections.Counter(
                os.path.basename(r.source) for r in batch if getattr(r, "source", None)
            )
            self._tally = dict(names)  # what the batch's committing write settles
        outcome = super()._execute_batch(batch)
        if outcome is None:  # committed (a bisect's trial writes were rolled back)
            self._done_settled += sum(self._tally.values())
            if self._committed_time is not None:
                with self._lock:
                    self._committed.extend(batch)
        return outcome

    def _write(self, rows: list) -> int:
        if not self._tally:
            return super()._write(rows)
        with self._pg_conn.transaction():  # the rows and their files' tallies, or neither
            changed = super()._write(rows)
            names, counts = list(self._tally), list(self._tally.values())
            self._pg_conn.execute(
                _SETTLE_SQL, (names, counts, self._ledger.dataset, self._ledger.run_id)
            )
        return changed

    def _count(self, lane: CopyUpsertFn) -> None:
        super()._count(lane)
        settled, lane._done_settled = lane._done_settled, 0
        self._settled_files.inc(settled)

    def finish_bundle(self):
        outputs = list(super().finish_bundle() or ())
        with self._lock:
            committed = self._committed[:]
            self._committed.clear()
        for record in committed:
            when = self._committed_time(record)
            value = GlobalWindows.windowed_value(record, *([when] if when is not None else []))
            outputs.append(pvalue.TaggedOutput(COMMITTED, value))
        return outputs


class UpsertAndSettle(beam.PTransform):
    """``UpsertToPostgres`` that settles landed files (with a ``ledger``).

    Returns a dict: ``rejected`` (DeadLetters, as from UpsertToPostgres) and
    ``committed`` (the committed records, timestamped by ``committed_time``; empty
    without it).
    """

    def __init__(
        self,
        dsn: str,
        spec: TableSpec,
        pipeline_name: str = "",
        batch_size: int = DEFAULT_BATCH_SIZE,
        ledger: Optional[Ledger] = None,
        committed_time: Optional[Any] = None,
    ):
        super().__init__()
        self._fn = _SettlingCopyUpsertFn(
            dsn, spec, batch_size, ledger=ledger, committed_time=committed_time
        )
        self._to_dead_letter = _sink_dead_letter(pipeline_name or spec.table, spec.table)
        self._record_type = spec.record_type

    def expand(self, records):
        written = records | "CopyAndUpsert" >> beam.ParDo(self._fn).with_outputs(
            COMMITTED, main="rejected"
        )
        rejected = written.rejected | "RejectedRows" >> beam.Map(
            self._to_dead_letter
        ).with_output_types(DeadLetter)
        committed = written[COMMITTED] | "Committed" >> beam.Map(
            lambda record: record
        ).with_output_types(self._record_type)
        return {"rejected": rejected, "committed": committed}


class WriteDeadLettersAndSettle(beam.PTransform):
    """``WriteDeadLetters`` that settles landed files (with a ``ledger``).

    A dead letter the database refuses fails the run, as in ``WriteDeadLetters``.
    """

    def __init__(
        self,
        dsn: str,
        run_id: Optional[str],
        batch_size: int = DEFAULT_BATCH_SIZE,
        ledger: Optional[Ledger] = None,
    ):
        super().__init__()
        self._fn = _SettlingCopyUpsertFn(dsn, dead_letter_table(run_id), batch_size, ledger=ledger)

    def expand(self, dead_letters):
        return (
            dead_letters
            | "Sanitise" >> beam.Map(_sanitise_dead_letter).with_output_types(DeadLetter)
            | "CopyDeadLetters" >> beam.ParDo(self._fn)
            | "FailOnRejected" >> beam.Map(_refuse_to_drop)
        )
