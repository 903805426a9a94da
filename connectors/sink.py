"""The bulk writer: each batch goes in by one binary ``COPY`` into a temporary stage plus
one guarded upsert, in one transaction, on background threads through a few connections.

A *lane* is one connection with its temp stage. A batch the database refuses is sorted
by SQLSTATE: a row's fault (bad data, a value too big for an index, a violated check)
sends that row alone to the dead letters after bisecting the batch; a fault of the
connection or server (lost connection, restart, deadlock, disk full) is retried with
backoff for a bounded time, reconnecting; anything else fails the run. Work that must
commit with the rows (run counters, landed-file settling, stream stats) runs in the
same transaction through ``CommitHook``s.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import logging
import operator
import time
import typing
import uuid
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import apache_beam as beam
import orjson
import psycopg
from apache_beam.transforms.window import GlobalWindows
from apache_beam.utils.retry import FuzzedExponentialIntervals
from apache_beam.utils.timestamp import Timestamp
from psycopg import sql

from connectors import datalake
from transforms.records import DeadLetter, EmotionResult, Product, Review, ReviewEmbedding

SINK_STAGE = "sink"
DEFAULT_BATCH_SIZE = 10_000
# Connections a sink writes through at once: one batch's upsert overlaps the next's COPY.
DEFAULT_WRITE_LANES = 2
DEFAULT_RETRY_S = 60.0
# The precedence of two records with one key, most significant first: the newer
# generation wins, then the later (source, line). One rule, used by the upsert's guard
# against what is stored and by the choice between two records in one batch.
PRECEDENCE = ("source_format", "source", "line")
_LOG = logging.getLogger(__name__)


class DatalakeLost(RuntimeError):
    """The datalake stayed unreachable for the whole retry budget; the run stops."""


# --- how rows bind to the stage ---------------------------------------------------------


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
    # pgvector reads a real[] cast: no client-side vector type needed for COPY.
    Sequence[float]: ("float4[]", "{}::vector", list),
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

    @property
    def stage(self) -> str:
        return f"stage_{self.table}"

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

    @property
    def ranked(self) -> bool:
        """Whether two records of one key are ranked by ``PRECEDENCE`` (tables with lineage)."""
        return bool(self.key) and all(f in self.record_type._fields for f in PRECEDENCE)

    @property
    def stage_types(self) -> list[str]:
        return [t for _, t, _, _ in self._field_types()]

    def copy_rows(self, records: Sequence[Any]) -> list[list[Any]]:
        """Records as rows ready for the stage; of several with one key, the one first by
        ``PRECEDENCE`` (one statement cannot upsert a key twice)."""
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
        rank = operator.itemgetter(*(fields.index(f) for f in PRECEDENCE)) if self.ranked else None
        first: dict[Any, list[Any]] = {}
        for row in rows:
            seen = first.setdefault(key(row), row)
            if seen is not row and (rank is None or rank(row) >= rank(seen)):
                first[key(row)] = row
        return list(first.values())

    def stage_ddl(self) -> sql.Composed:
        cols = [
            sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(stage_type))
            for name, stage_type, _, _ in self._field_types()
        ]
        return sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} ({}) ON COMMIT DELETE ROWS").format(
            sql.Identifier(self.stage), sql.SQL(", ").join(cols)
        )

    def copy_sql(self) -> sql.Composed:
        return sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
            sql.Identifier(self.stage),
            sql.SQL(", ").join(map(sql.Identifier, self.record_type._fields)),
        )

    def upsert_sql(self, stage: Union[str, sql.Composable, None] = None) -> sql.Composed:
        """INSERT … SELECT from the stage (or any FROM item with the stage's columns); on a
        key conflict, update only a row that differs and that the new record outranks."""
        stage = stage or self.stage
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

        def row(prefix: sql.Composable, columns: Sequence[str]) -> sql.Composed:
            return sql.SQL(", ").join(
                sql.SQL("{}.{}").format(prefix, sql.Identifier(c)) for c in columns
            )

        excluded = sql.SQL("EXCLUDED")
        guard = sql.SQL("({}) IS DISTINCT FROM ({})").format(
            row(target, updated), row(excluded, updated)
        )
        if self.ranked:  # the precedence rule, against what is stored
            guard += sql.SQL(" AND ({}) >= ({})").format(
                row(excluded, PRECEDENCE), row(target, PRECEDENCE)
            )
        return statement + sql.SQL(" ON CONFLICT ({}) DO UPDATE SET {} WHERE {}").format(
            sql.SQL(", ").join(map(sql.Identifier, self.key)),
            sql.SQL(", ").join(
                sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in updated
            ),
            guard,
        )


REVIEWS = TableSpec("reviews", Review, ("review_id",))
PRODUCTS = TableSpec("products", Product, ("asin",))
REVIEW_EMOTIONS = TableSpec("review_emotions", EmotionResult, ("review_id", "model"))
REVIEW_EMBEDDINGS = TableSpec("review_embeddings", ReviewEmbedding, ("review_id", "model"))


def dead_letter_table(run_id: Optional[str]) -> TableSpec:
    """The append-only dead-letter table, each row stamped with the run's id."""
    constants = (("run_id", "uuid", run_id),) if run_id else ()
    return TableSpec("dead_letters", DeadLetter, (), constants)


def write_through_stage(conn: psycopg.Connection, spec: TableSpec, rows: Sequence[Any]) -> int:
    """Binary COPY of ``TableSpec.copy_rows`` into the stage, then the guarded upsert, in the
    caller's transaction; returns the rows inserted or changed."""
    with conn.cursor() as cur:
        with cur.copy(spec.copy_sql()) as copy:
            copy.set_types(spec.stage_types)
            for row in rows:
                copy.write_row(row)
        cur.execute(spec.upsert_sql())
        return max(cur.rowcount, 0)


def open_stage(dsn: str, spec: TableSpec) -> psycopg.Connection:
    """A sink's connection: autocommit, asynchronous commit, the table's temp stage made."""
    conn = datalake.open_connection(dsn, autocommit=True)
    # A crash can lose the last commits' flush, never consistency; upserts make the
    # re-run that follows a crash harmless, and bulk loads stop waiting on fsync.
    conn.execute("SET synchronous_commit TO off")
    conn.execute(spec.stage_ddl())
    return conn


# --- dead letters: Postgres text holds neither NUL nor a lone surrogate ---------------


def storable_text(text: str) -> str:
    """Text Postgres can store: NUL and a lone surrogate escaped, the rest untouched."""
    if "\x00" in text:
        text = text.replace("\x00", "\\u0000")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: as its escape, \udXXX
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def storable_dead_letter(letter: DeadLetter) -> DeadLetter:
    """The dead letter with its raw line and error made storable, so it is kept, not lost."""
    raw = None if letter.raw is None else storable_text(letter.raw)
    return letter._replace(raw=raw, error=storable_text(letter.error))


def write_dead_letters(
    conn: psycopg.Connection, letters: Sequence[DeadLetter], run_id: Optional[str] = None
) -> None:
    """Append dead letters in the caller's transaction (the one writer of ``dead_letters``,
    for Beam's sinks and for the REST service alike)."""
    spec = dead_letter_table(run_id)
    conn.execute(spec.stage_ddl())
    write_through_stage(conn, spec, spec.copy_rows([storable_dead_letter(d) for d in letters]))


# --- what commits with a batch ------------------------------------------------------------


class CommitHook:
    """Work that commits in the same transaction as a batch of rows (picklable settings;
    connections are the lane's). ``after_bundle`` is optional periodic work of its own."""

    def on_commit(
        self, conn: psycopg.Connection, records: Sequence[Any]
    ) -> Optional[Mapping[str, int]]:
        """Called in the batch's transaction, after its rows are upserted; returns counts to
        add to the run's counters (in the same transaction)."""

    def after_bundle(self, conn: psycopg.Connection) -> None:
        """Called once per bundle, in a transaction of its own."""


@dataclasses.dataclass(frozen=True)
class Target:
    """Where and how a sink writes: the datalake, the run it writes for, batching, retries."""

    dsn: str
    run_id: Optional[str] = None
    pipeline: str = ""
    batch_size: int = DEFAULT_BATCH_SIZE
    lanes: int = DEFAULT_WRITE_LANES
    retry_s: float = DEFAULT_RETRY_S
    stop_file: Optional[str] = None  # where the run's sources look for a stop request


@dataclasses.dataclass
class BatchResult:
    """What one batch did: records written, rows inserted or changed, records refused."""

    written: int = 0
    changed: int = 0
    rejected: list[tuple[Any, str]] = dataclasses.field(default_factory=list)


class _Trial(Exception):
    """Raised inside a trial write so that its transaction always rolls back."""


class Lane:
    """One connection with the table's temp stage; writes a batch in one transaction.

    A transient fault (lost connection, restart, deadlock) closes the connection and
    retries the batch with backoff until ``retry_s`` have passed, then raises
    ``DatalakeLost``. A row's fault bisects the batch: each refused row comes back with
    the database's message; the rest is written.
    """

    def __init__(self, target: Target, spec: TableSpec, hooks: Sequence[CommitHook] = ()):
        self._target = target
        self._spec = spec
        self._hooks = list(hooks)
        self._conn: Optional[psycopg.Connection] = None
        self._counter_source = uuid.uuid4().hex[:16]  # this lane's rows in run_counters

    def write(self, records: Sequence[Any]) -> BatchResult:
        """Write a batch (retrying, bisecting); its result."""
        return self._retrying(lambda conn: self._write_sorting_rows(conn, list(records)))

    def after_bundle(self) -> None:
        """Periodic work of the hooks (e.g. stats refresh), retried like a batch."""
        if any(type(h).after_bundle is not CommitHook.after_bundle for h in self._hooks):
            self._retrying(self._hooks_after_bundle)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- retries

    def _retrying(self, work: Callable[[psycopg.Connection], Any]) -> Any:
        deadline = time.monotonic() + self._target.retry_s
        delays = iter(FuzzedExponentialIntervals(0.5, 10_000, max_delay_secs=5))
        while True:
            try:
                return work(self._connection())
            except Exception as error:  # noqa: BLE001 - sorted right here
                if not datalake.is_transient(error):
                    raise
                self.close()
                wait = next(delays)
                if time.monotonic() + wait > deadline:
                    raise DatalakeLost(
                        f"the datalake stayed unreachable for {self._target.retry_s:.0f} s "
                        f"while writing {self._spec.table} ({datalake.first_line(error)}); "
                        "what was committed before is kept: rerun to continue"
                    ) from None
                _LOG.warning(
                    "writing %s: %s; retrying in %.1f s",
                    self._spec.table,
                    datalake.first_line(error),
                    wait,
                )
                time.sleep(wait)

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = open_stage(self._target.dsn, self._spec)
        return self._conn

    # -- one batch

    def _write_sorting_rows(self, conn: psycopg.Connection, records: list) -> BatchResult:
        result = BatchResult()
        try:
            result.changed = self._commit(conn, records)
        except Exception as error:  # noqa: BLE001 - a row's fault is sorted out here
            if not datalake.is_row_fault(error):
                raise
            bad = self._refused(conn, records, error)
            if not bad:  # no row fails alone: the batch's fault is not a row's
                raise
            refused = {id(record) for record, _ in bad}
            records = [r for r in records if id(r) not in refused]
            result.rejected = [(record, datalake.first_line(e)) for record, e in bad]
            result.changed = self._commit(conn, records) if records else 0
        result.written = len(records)
        return result

    def _commit(self, conn: psycopg.Connection, records: Sequence[Any]) -> int:
        with conn.transaction():
            changed = write_through_stage(conn, self._spec, self._spec.copy_rows(records))
            counts = {f"{self._spec.table}_upserted": len(records)}
            if self._spec.key:
                counts[f"{self._spec.table}_changed"] = changed
            for hook in self._hooks:
                counts.update(hook.on_commit(conn, records) or {})
            if self._target.run_id:
                datalake.add_run_counters(conn, self._target.run_id, self._counter_source, counts)
        return changed

    def _refused(self, conn, records: list, error: Exception) -> list[tuple[Any, Exception]]:
        """The records the database refuses on their own, found by bisecting trial writes
        (rolled back); ``error`` is what the whole batch failed with."""
        if len(records) == 1:
            return [(records[0], error)]
        half = len(records) // 2
        refused = []
        for part in (records[:half], records[half:]):
            try:
                with conn.transaction():
                    write_through_stage(conn, self._spec, self._spec.copy_rows(part))
                    raise _Trial
            except _Trial:
                continue
            except Exception as part_error:  # noqa: BLE001 - sorted right here
                if not datalake.is_row_fault(part_error):
                    raise
                refused += self._refused(conn, part, part_error)
        return refused

    def _hooks_after_bundle(self, conn: psycopg.Connection) -> None:
        with conn.transaction():
            for hook in self._hooks:
                hook.after_bundle(conn)


class WriteBatchesFn(beam.DoFn):
    """Records -> the table in batches, written on background threads through ``lanes``
    connections (at most that many batches in flight: memory stays flat). Concurrent
    upserts of one key are safe: row locks serialise them and the precedence guard keeps
    the record that ranks first. Output: a DeadLetter per record the database refused.
    """

    def __init__(self, target: Target, spec: TableSpec, hooks: Sequence[CommitHook] = ()):
        self._target = target
        self._spec = spec
        self._hooks = tuple(hooks)

    def setup(self):
        self._lanes = [
            Lane(self._target, self._spec, self._hooks) for _ in range(max(1, self._target.lanes))
        ]
        self._pool = concurrent.futures.ThreadPoolExecutor(
            len(self._lanes), f"write-{self._spec.table}"
        )

    def start_bundle(self):
        self._filling: list = []
        # (lane, its batch's future), oldest first; the other lanes are free
        self._in_flight: collections.deque = collections.deque()

    def process(self, record) -> Iterator[DeadLetter]:
        self._filling.append(record)
        if len(self._filling) >= self._target.batch_size:
            yield from self._submit()

    def finish_bundle(self):
        if self._filling:
            yield from map(GlobalWindows.windowed_value, self._submit())
        while self._in_flight:
            yield from map(GlobalWindows.windowed_value, self._wait_oldest())
        self._lanes[0].after_bundle()

    def teardown(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=True)
        for lane in getattr(self, "_lanes", ()):
            lane.close()

    def _submit(self) -> Iterator[DeadLetter]:
        if len(self._in_flight) == len(self._lanes):
            yield from self._wait_oldest()
        busy = [lane for lane, _ in self._in_flight]
        lane = next(lane for lane in self._lanes if lane not in busy)
        batch, self._filling = self._filling, []
        self._in_flight.append((lane, self._pool.submit(lane.write, batch)))

    def _wait_oldest(self) -> Iterator[DeadLetter]:
        _, future = self._in_flight.popleft()
        for record, message in future.result().rejected:
            yield self._dead_letter(record, message)

    def _dead_letter(self, record: Any, message: str) -> DeadLetter:
        # stdlib json escapes what orjson refuses (lone surrogates): the raw row survives.
        return DeadLetter(
            self._target.pipeline or self._spec.table,
            SINK_STAGE,
            getattr(record, "source", None),
            getattr(record, "line", None),
            json.dumps(record._asdict(), default=str),
            f"{self._spec.table} rejected the row: {message}",
        )


class WriteRows(beam.PTransform):
    """Upsert records into their table in bulk; returns a DeadLetter per refused record.

    Idempotent: re-running the same input leaves the same rows and changes none.
    """

    def __init__(self, spec: TableSpec, target: Target, hooks: Sequence[CommitHook] = ()):
        super().__init__()
        self._fn = WriteBatchesFn(target, spec, hooks)

    def expand(self, records):
        return records | "CopyAndUpsert" >> beam.ParDo(self._fn).with_output_types(DeadLetter)


class WriteDeadLetters(beam.PTransform):
    """Append dead letters to ``dead_letters``, stamped with the run id, made storable.

    A dead letter the database still refuses fails the run: nothing is dropped silently.
    """

    def __init__(self, target: Target, hooks: Sequence[CommitHook] = ()):
        super().__init__()
        self._fn = WriteBatchesFn(
            dataclasses.replace(target, lanes=1), dead_letter_table(target.run_id), hooks
        )

    def expand(self, dead_letters):
        return (
            dead_letters
            | "Storable" >> beam.Map(storable_dead_letter).with_output_types(DeadLetter)
            | "Append" >> beam.ParDo(self._fn).with_output_types(DeadLetter)
            | "FailOnRefused" >> beam.Map(_refuse_to_drop)
        )


def _refuse_to_drop(letter: DeadLetter) -> None:
    raise RuntimeError(f"the datalake refused a dead letter: {letter.error}; raw: {letter.raw}")
