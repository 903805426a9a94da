"""The bulk writer: each batch goes in by one binary ``COPY`` into a temporary stage plus
one guarded upsert, written on background threads through several connections.

Writes go through ``beam-postgres``: ``CopyUpsertFn`` extends its write DoFn (same
lifecycle, batching, retry strategy and failed-rows output).
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import collections
import copy
import dataclasses
import json
import operator
import typing
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import apache_beam as beam
import orjson
import psycopg
from apache_beam import pvalue
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows
from apache_beam.utils.timestamp import Timestamp
from beam_postgres.io.postgres import DEFAULT_MAX_RETRY_DELAY_SECS, _PostgresWriteFn
from beam_postgres.io.retry import RetryRowOnTransientErrorStrategy, RetryRowStrategy
from psycopg import sql

from transforms.parse import METRICS_NAMESPACE
from transforms.records import DeadLetter, EmotionResult, Product, Review

SINK_STAGE = "sink"
COMMITTED = "committed"  # tagged output of the settling sinks: records in the datalake
DEFAULT_BATCH_SIZE = 10_000
DEFAULT_WRITE_RETRIES = 5
# Connections a sink writes through at once: one batch's upsert overlaps the next's COPY.
DEFAULT_WRITE_LANES = 2
LINEAGE = ("source_format", "source", "line")
# What a row can fail with on its way in: the database's refusal, or a value that cannot
# even be encoded for COPY (a lone surrogate from a Python-literal line, an int8 overflow).
REJECTED_ROW_ERRORS = (psycopg.Error, UnicodeError, ValueError, TypeError, OverflowError)


def _json_text(value: Any) -> Optional[str]:
    return None if value is None else orjson.dumps(value).decode()


_micros = Timestamp.micros.fget  # the property's function: one call less per row


_JSONB = "{}::jsonb"
# Timestamps travel as int8 microseconds and become timestamptz in the server: cheaper
# than building a datetime per row in Python.
_FROM_MICROS = "timestamptz 'epoch' + {} * interval '1 microsecond'"

# Python field type -> (type in the binary COPY stage, expression into the target, converter)
_STAGE_TYPES: Mapping[Any, tuple[str, str, Optional[Callable[[Any], Any]]]] = {
    str: ("text", "{}", None),
    int: ("int8", "{}", None),
    float: ("float8", "{}", None),
    bool: ("bool", "{}", None),
    Timestamp: ("int8", _FROM_MICROS, _micros),
    Sequence[str]: ("text[]", "{}", None),
    Mapping[str, str]: ("text", _JSONB, _json_text),
    Mapping[str, int]: ("text", _JSONB, _json_text),
    Mapping[str, float]: ("text", _JSONB, _json_text),
}
_JSON_TEXT_COLUMNS = {"details"}


@dataclasses.dataclass(frozen=True)
class TableSpec:
    """A datalake table fed from a record type: its key and how rows bind to COPY."""

    table: str
    record_type: type
    key: tuple[str, ...]
    constants: tuple[tuple[str, str, str], ...] = ()  # (column, stage type, value)

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(self.record_type._fields) + tuple(c for c, _, _ in self.constants)

    def _field_types(self) -> list[tuple[str, str, str, Optional[Callable[[Any], Any]]]]:
        hints = typing.get_type_hints(self.record_type)
        out = []
        for name in self.record_type._fields:
            hint = hints[name]
            if typing.get_origin(hint) is typing.Union:
                hint = next(a for a in typing.get_args(hint) if a is not type(None))
            stage_type, cast, convert = _STAGE_TYPES[hint]
            if name in _JSON_TEXT_COLUMNS:
                cast = _JSONB
            out.append((name, stage_type, cast, convert))
        return out

    def lineage_index(self) -> Optional[Callable[[Sequence[Any]], tuple]]:
        """(source_format, source, line) of a row, where the table keeps lineage."""
        fields = self.record_type._fields
        if all(f in fields for f in LINEAGE):
            return operator.itemgetter(*(fields.index(f) for f in LINEAGE))
        return None

    @property
    def stage_types(self) -> list[str]:
        return [t for _, t, _, _ in self._field_types()]

    def copy_rows(self, records: Sequence[Any]) -> list[list[Any]]:
        """Records as rows ready for the stage; of several with one key, the latest
        lineage wins (one statement cannot upsert a key twice)."""
        rows = [list(record) for record in records]
        for index, (_, _, _, convert) in enumerate(self._field_types()):
            if convert is not None:  # column by column: one loop per converter
                for row in rows:
                    value = row[index]
                    if value is not None:
                        row[index] = convert(value)
        if not self.key:
            return rows
        fields = self.record_type._fields
        key = operator.itemgetter(*(fields.index(k) for k in self.key))
        if len(set(map(key, rows))) == len(rows):  # the usual case: no key repeats
            return rows
        lineage = self.lineage_index()
        latest: dict[Any, list[Any]] = {}
        for row in rows:
            seen = latest.setdefault(key(row), row)
            if seen is not row and (lineage is None or lineage(row) >= lineage(seen)):
                latest[key(row)] = row
        return list(latest.values())

    def stage_ddl(self, stage: str) -> sql.Composed:
        cols = [
            sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(stage_type))
            for name, stage_type, _, _ in self._field_types()
        ]
        return sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} ({}) ON COMMIT DELETE ROWS").format(
            sql.Identifier(stage), sql.SQL(", ").join(cols)
        )

    def copy_sql(self, stage: str) -> sql.Composed:
        return sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
            sql.Identifier(stage),
            sql.SQL(", ").join(map(sql.Identifier, self.record_type._fields)),
        )

    def upsert_sql(self, stage: Union[str, sql.Composable]) -> sql.Composed:
        """INSERT … SELECT from the stage (a table name, or any FROM item with the stage's
        columns); on key conflict update only rows that differ."""
        select = [
            sql.SQL(cast).format(sql.Identifier(name)) for name, _, cast, _ in self._field_types()
        ] + [sql.SQL("{}::{}").format(sql.Literal(v), sql.SQL(t)) for _, t, v in self.constants]
        target = sql.Identifier(self.table)
        statement = sql.SQL("INSERT INTO {} ({}) SELECT {} FROM {}").format(
            target,
            sql.SQL(", ").join(map(sql.Identifier, self.columns)),
            sql.SQL(", ").join(select),
            sql.Identifier(stage) if isinstance(stage, str) else stage,
        )
        if not self.key:
            return statement
        updated = [c for c in self.columns if c not in self.key]
        # Only rows that differ are rewritten (cheap re-runs), and of two records with
        # one key the one from the later (source, line) wins whatever the order.
        guard = sql.SQL("")
        if self.lineage_index():
            guard = sql.SQL(
                " AND (EXCLUDED.source, EXCLUDED.line) >= ({0}.source, {0}.line)"
            ).format(target)
        return (
            statement
            + sql.SQL(" ON CONFLICT ({}) DO UPDATE SET {} WHERE ({}) IS DISTINCT FROM ({})").format(
                sql.SQL(", ").join(map(sql.Identifier, self.key)),
                sql.SQL(", ").join(
                    sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in updated
                ),
                sql.SQL(", ").join(
                    sql.SQL("{}.{}").format(target, sql.Identifier(c)) for c in updated
                ),
                sql.SQL(", ").join(
                    sql.SQL("EXCLUDED.{}").format(sql.Identifier(c)) for c in updated
                ),
            )
            + guard
        )


REVIEWS = TableSpec("reviews", Review, ("review_id",))
PRODUCTS = TableSpec("products", Product, ("asin",))
REVIEW_EMOTIONS = TableSpec("review_emotions", EmotionResult, ("review_id", "model"))


def dead_letter_table(run_id: Optional[str]) -> TableSpec:
    """The append-only dead-letter table, each row stamped with the run's id."""
    constants = (("run_id", "uuid", run_id),) if run_id else ()
    return TableSpec("dead_letters", DeadLetter, (), constants)


class CopyUpsertFn(_PostgresWriteFn):
    """beam-postgres' write DoFn, one binary COPY + one guarded upsert per batch.

    Batches are written on background threads while the next one fills, each through a
    *write lane*: a copy of this DoFn with its own connection and temp stage. With two
    lanes one batch's upsert overlaps the next one's COPY and Python's parsing (at most
    ``write_lanes`` batches in flight: memory stays flat). Concurrent upserts of one key
    are safe: row locks serialise them and the lineage guard keeps the latest record; a
    deadlock between lanes is a transient error, retried. A batch the database rejects is
    bisected to the offending row, which comes out of the failed-rows output; the rest
    of the batch is written.
    """

    def __init__(
        self,
        conninfo: str,
        spec: TableSpec,
        batch_size: int = DEFAULT_BATCH_SIZE,
        retry_strategy: RetryRowStrategy = RetryRowOnTransientErrorStrategy(),
        max_retries: int = DEFAULT_WRITE_RETRIES,
        max_retry_delay_secs: int = DEFAULT_MAX_RETRY_DELAY_SECS,
        write_lanes: int = DEFAULT_WRITE_LANES,
    ):
        self._spec = spec
        super().__init__(
            conninfo,
            spec.upsert_sql(f"stage_{spec.table}").as_string(None),
            batch_size,
            retry_strategy,
            max_retries,
            max_retry_delay_secs,
        )
        self._write_lanes = max(1, write_lanes)
        self._written = Metrics.counter(METRICS_NAMESPACE, f"{spec.table}_upserted")
        self._changed = Metrics.counter(METRICS_NAMESPACE, f"{spec.table}_changed")

    def setup(self):
        stage = f"stage_{self._spec.table}"
        self._copy = self._spec.copy_sql(stage)
        self._upsert = self._spec.upsert_sql(stage)
        self._types = self._spec.stage_types
        self._lanes = [copy.copy(self) for _ in range(self._write_lanes)]
        for lane in self._lanes:
            lane._connect(stage)
            lane._done_written = lane._done_changed = 0
        self._writer = concurrent.futures.ThreadPoolExecutor(
            self._write_lanes, f"write-{self._spec.table}"
        )

    def _connect(self, stage: str) -> None:
        self._pg_conn = connect_stage(self._conninfo, self._spec, stage)

    def start_bundle(self):
        super().start_bundle()
        self._filling: list = []
        # (lane, its batch's future), oldest first; the other lanes are free
        self._in_flight: collections.deque = collections.deque()

    def process(self, element):
        self._filling.append(element)
        if len(self._filling) < self._max_batch_size:
            return ()
        failed = []
        if len(self._in_flight) == len(self._lanes):
            failed = self._wait_oldest()
        busy = [lane for lane, _ in self._in_flight]
        lane = next(lane for lane in self._lanes if lane not in busy)
        lane._rows_buffer, self._filling = self._filling, []
        self._in_flight.append((lane, self._writer.submit(_flush_lane, lane)))
        return failed

    def finish_bundle(self):
        failed = []
        while self._in_flight:
            failed += self._wait_oldest()
        if self._filling:
            lane = self._lanes[0]
            lane._rows_buffer, self._filling = self._filling, []
            failed += list(lane._flush_batch())
            self._count(lane)
        return failed

    def teardown(self):
        if getattr(self, "_writer", None) is not None:
            self._writer.shutdown(wait=True)
        for lane in getattr(self, "_lanes", ()):  # setup may have failed part way
            if getattr(lane, "_pg_conn", None) is not None:
                lane._pg_conn.close()

    def _wait_oldest(self) -> list:
        """Failed rows of the oldest batch in flight (its errors are raised here)."""
        lane, future = self._in_flight.popleft()
        failed = future.result()
        self._count(lane)
        return failed

    def _count(self, lane: "CopyUpsertFn") -> None:
        # Beam metrics are per thread: writer threads tally, this thread reports.
        written, changed = lane._done_written, lane._done_changed
        lane._done_written = lane._done_changed = 0
        self._written.inc(written)
        self._changed.inc(changed)

    def _execute_batch(self, batch: list) -> Optional[tuple[Any, psycopg.Error]]:
        rows = self._spec.copy_rows(batch)
        try:
            changed = self._write(rows)
        except REJECTED_ROW_ERRORS as error:
            if self._pg_conn.closed:  # reconnect (the retry strategy decides what next)
                self._connect(f"stage_{self._spec.table}")
            if self._retry_strategy.should_retry(batch[0], error):
                return batch[0], error
            return self._find_rejected(batch, error)
        self._done_written += len(batch)
        self._done_changed += changed
        return None

    def _write(self, rows: list[list[Any]]) -> int:
        return write_through_stage(self._pg_conn, self._copy, self._types, self._upsert, rows)

    def _find_rejected(self, batch: list, error: psycopg.Error) -> tuple[Any, psycopg.Error]:
        """Bisect a rejected batch down to one row the database refuses, and its error."""
        while len(batch) > 1:
            half = batch[: len(batch) // 2]
            try:
                with self._pg_conn.transaction():
                    self._write(self._spec.copy_rows(half))
                    raise _Rollback
            except _Rollback:
                batch = batch[len(batch) // 2 :]
            except REJECTED_ROW_ERRORS as half_error:
                batch, error = half, half_error
        try:
            with self._pg_conn.transaction():
                self._write(self._spec.copy_rows(batch))
                raise _Rollback
        except _Rollback:
            pass
        except REJECTED_ROW_ERRORS as row_error:
            error = row_error
        return batch[0], error


def connect_stage(conninfo: str, spec: TableSpec, stage: str) -> psycopg.Connection:
    """A sink's connection: autocommit, asynchronous commit, the table's temp stage made."""
    conn = psycopg.connect(conninfo, autocommit=True)
    # A crash can lose the last commits' flush, never consistency; upserts make the
    # re-run that follows a crash harmless, and bulk loads stop waiting on fsync.
    conn.execute("SET synchronous_commit TO off")
    conn.execute(spec.stage_ddl(stage))
    return conn


def write_through_stage(
    conn: psycopg.Connection,
    copy_sql: sql.Composable,
    types: Sequence[str],
    upsert: sql.Composable,
    rows: Sequence[Sequence[Any]],
) -> int:
    """One batch in one transaction: binary COPY of ``TableSpec.copy_rows`` into the stage,
    then the guarded upsert; returns the rows inserted or changed."""
    with conn.transaction():
        with conn.cursor() as cur:
            with cur.copy(copy_sql) as copy:
                copy.set_types(types)
                for row in rows:
                    copy.write_row(row)
            cur.execute(upsert)
            return max(cur.rowcount, 0)


def _flush_lane(lane: CopyUpsertFn) -> list:
    """Write a lane's batch (beam-postgres' retry loop); its failed rows."""
    return list(lane._flush_batch())


class _Rollback(Exception):
    """Raised inside a trial transaction so that it always rolls back."""


def _sink_dead_letter(pipeline_name: str, table: str):
    def to_dead_letter(failed: tuple[Any, Exception]) -> DeadLetter:
        record, error = failed
        # stdlib json escapes what orjson refuses (lone surrogates): the raw row survives.
        raw = json.dumps(record._asdict(), default=str)
        message = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        return DeadLetter(
            pipeline_name,
            SINK_STAGE,
            getattr(record, "source", None),
            getattr(record, "line", None),
            raw,
            f"{table} rejected the row: {message}",
        )

    return to_dead_letter


class UpsertToPostgres(beam.PTransform):
    """Upsert canonical records into their table in bulk; rejected rows -> DeadLetter.

    Idempotent: re-running the same input leaves the same rows and changes none.
    """

    def __init__(
        self,
        dsn: str,
        spec: TableSpec,
        pipeline_name: str = "",
        batch_size: int = DEFAULT_BATCH_SIZE,
    ):
        super().__init__()
        self._dsn = dsn
        self._spec = spec
        self._pipeline_name = pipeline_name or spec.table
        self._batch_size = batch_size

    def expand(self, records):
        return (
            records
            | "CopyAndUpsert" >> beam.ParDo(CopyUpsertFn(self._dsn, self._spec, self._batch_size))
            | "RejectedRows"
            >> beam.Map(_sink_dead_letter(self._pipeline_name, self._spec.table)).with_output_types(
                DeadLetter
            )
        )


def _sanitise_dead_letter(letter: DeadLetter) -> DeadLetter:
    """Postgres text holds neither NUL nor a lone surrogate: escape them, keeping the raw
    line readable instead of losing it (or failing the run on it)."""
    raw = None if letter.raw is None else _storable_text(letter.raw)
    return letter._replace(raw=raw, error=_storable_text(letter.error))


def _storable_text(text: str) -> str:
    if "\x00" in text:
        text = text.replace("\x00", "\\u0000")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: as its escape, \udXXX
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


class WriteDeadLetters(beam.PTransform):
    """Append dead letters to ``dead_letters``, stamped with the run id.

    A dead letter the database refuses fails the run: nothing is dropped silently.
    """

    def __init__(self, dsn: str, run_id: Optional[str], batch_size: int = DEFAULT_BATCH_SIZE):
        super().__init__()
        self._dsn = dsn
        self._spec = dead_letter_table(run_id)
        self._batch_size = batch_size

    def expand(self, dead_letters):
        return (
            dead_letters
            | "Sanitise" >> beam.Map(_sanitise_dead_letter).with_output_types(DeadLetter)
            | "CopyDeadLetters" >> beam.ParDo(CopyUpsertFn(self._dsn, self._spec, self._batch_size))
            | "FailOnRejected" >> beam.Map(_refuse_to_drop)
        )


def _refuse_to_drop(failed: tuple[Any, Exception]) -> None:
    record, error = failed
    raise RuntimeError(f"the datalake refused a dead letter ({error}): {record!r}")


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
