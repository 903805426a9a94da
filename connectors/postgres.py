"""The Postgres datalake: DSN resolution, embedded server, migrations, bulk upsert sinks.

Writes go through ``beam-postgres``: ``CopyUpsertFn`` extends its write DoFn (same
lifecycle, batching, retry strategy and failed-rows output) so that each batch goes
in by one binary ``COPY`` into a temporary stage plus one guarded upsert, instead of
one ``INSERT`` per row.
"""

from __future__ import annotations

import collections
import concurrent.futures
import copy
import dataclasses
import json
import logging
import operator
import os
import typing
import uuid
import warnings
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import apache_beam as beam
import orjson
import psycopg
from apache_beam.metrics import Metrics
from apache_beam.utils.timestamp import Timestamp
from beam_postgres.io.postgres import DEFAULT_MAX_RETRY_DELAY_SECS, _PostgresWriteFn
from beam_postgres.io.retry import RetryRowOnTransientErrorStrategy, RetryRowStrategy
from psycopg import sql

from transforms.parse import METRICS_NAMESPACE
from transforms.records import DeadLetter, EmotionResult, Product, Review

SINK_STAGE = "sink"
DEFAULT_BATCH_SIZE = 10_000
DEFAULT_WRITE_RETRIES = 5
# Connections a sink writes through at once: one batch's upsert overlaps the next's COPY.
DEFAULT_WRITE_LANES = 2
LINEAGE = ("source_format", "source", "line")
# What a row can fail with on its way in: the database's refusal, or a value that cannot
# even be encoded for COPY (a lone surrogate from a Python-literal line, an int8 overflow).
REJECTED_ROW_ERRORS = (psycopg.Error, UnicodeError, ValueError, TypeError, OverflowError)
DATALAKE_TABLES = (
    "products",
    "reviews",
    "review_emotions",
    "review_stats",
    "landing_files",
    "dead_letters",
    "pipeline_runs",
)
_LOG = logging.getLogger(__name__)


class DatalakeUnavailable(RuntimeError):
    """The database cannot be reached; the message says how to point at one that can."""


# --- where the datalake is --------------------------------------------------------


def termidator_home() -> Path:
    """Where TermiDator keeps its state: ``TERMIDATOR_HOME``, default ``~/.termidator``."""
    return Path(os.environ.get("TERMIDATOR_HOME") or Path.home() / ".termidator").expanduser()


def resolve_dsn(dsn: Optional[str] = None) -> str:
    """The DSN to use: the argument, else ``TERMIDATOR_DSN``, else the embedded server."""
    return dsn or os.environ.get("TERMIDATOR_DSN") or embedded_dsn()


def _import_pgserver():
    """pgserver, imported only when the embedded default is used."""
    with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
        warnings.simplefilter("ignore")
        import pgserver
        import pgserver._commands
    return pgserver


def embedded_dsn(home: Optional[Path] = None) -> str:
    """Start (or find running) the embedded Postgres under the home and return its DSN.

    The server is left running between runs; ``stop_embedded`` stops it.
    """
    pgserver = _import_pgserver()
    pgdata = (home or termidator_home()) / "pgdata"
    pgdata.mkdir(parents=True, exist_ok=True)
    try:
        server = pgserver.get_server(pgdata, cleanup_mode=None)
    except Exception as error:  # noqa: BLE001 - pgserver raises many kinds
        raise DatalakeUnavailable(
            f"cannot start the embedded Postgres in {pgdata}: {error}; "
            "set --dsn or TERMIDATOR_DSN to use another server"
        ) from None
    return server.get_uri()


def stop_embedded(home: Optional[Path] = None) -> bool:
    """Stop the embedded server under the home, if it runs (tests, ``db stop``).

    Goes to ``pg_ctl`` directly: pgserver only stops a server when its own last
    handle closes, which a server left running between runs never has.
    """
    import subprocess

    pg_ctl = _import_pgserver()._commands.pg_ctl
    pgdata = (home or termidator_home()) / "pgdata"
    if not (pgdata / "postmaster.pid").exists():
        return False
    user = "pgserver" if os.name == "posix" and os.geteuid() == 0 else None
    try:
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user)
    except subprocess.CalledProcessError:
        return False  # not running after all (a stale pid file)
    return True


def connect(dsn: str, **kwargs: Any) -> psycopg.Connection:
    """Open a connection, turning failure into a one-line error that names the fix."""
    try:
        return psycopg.connect(dsn, connect_timeout=10, **kwargs)
    except psycopg.Error as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DatalakeUnavailable(
            f"cannot connect to Postgres at {redact(dsn)}: {reason}; fix --dsn or "
            "TERMIDATOR_DSN, or unset both to use the embedded datalake"
        ) from None


def redact(dsn: str) -> str:
    """The DSN without its password, for messages and logs."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.Error:
        return "<unparseable DSN>"
    if "password" in info:
        info["password"] = "***"
    return psycopg.conninfo.make_conninfo(**info)


def create_database(server_dsn: str, prefix: str = "termidator") -> str:
    """A new, migrated database on the server; its DSN (tests and benchmarks use one each)."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with connect(server_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    info = psycopg.conninfo.conninfo_to_dict(server_dsn)
    dsn = psycopg.conninfo.make_conninfo(**{**info, "dbname": name})
    migrate(dsn)
    return dsn


def drop_database(server_dsn: str, dsn: str) -> None:
    """Drop a database made by ``create_database``, closing its connections."""
    name = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    with connect(server_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


# --- schema -------------------------------------------------------------------------


def migrations() -> list[tuple[int, str, str]]:
    """The versioned migrations shipped in ``connectors/sql``: (version, name, sql)."""
    found = []
    for entry in resources.files("connectors").joinpath("sql").iterdir():
        if entry.name.endswith(".sql") and entry.name[:3].isdigit():
            found.append((int(entry.name[:3]), entry.name, entry.read_text()))
    return sorted(found)


def migrate(dsn: str) -> list[str]:
    """Apply pending migrations in order, once each, under an advisory lock.

    Returns the names applied now (empty when the schema is current).
    """
    applied_now = []
    with connect(dsn, autocommit=True) as conn:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(7461726)")  # one migrator at a time
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {v for (v,) in conn.execute("SELECT version FROM schema_migrations")}
            for version, name, script in migrations():
                if version in done:
                    continue
                conn.execute(script)
                conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                    (version, name),
                )
                applied_now.append(name)
    return applied_now


def table_counts(dsn: str, tables: Iterable[str]) -> dict[str, int]:
    """Exact row counts of the named tables."""
    with connect(dsn) as conn:
        return {
            table: conn.execute(
                sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))
            ).fetchone()[0]
            for table in tables
        }


# --- runs ---------------------------------------------------------------------------


def start_run(
    dsn: str, pipeline: str, options: Mapping[str, Any], run_id: Optional[str] = None
) -> str:
    """Record a run as RUNNING and return its id."""
    run_id = run_id or str(uuid.uuid4())
    with connect(dsn) as conn:
        conn.execute(
            "INSERT INTO pipeline_runs (run_id, pipeline, options, state)"
            " VALUES (%s, %s, %s::jsonb, 'RUNNING')",
            (run_id, pipeline, json.dumps(options, default=str)),
        )
    return run_id


def finish_run(
    dsn: str, run_id: str, state: str, runner: Optional[str], counters: Mapping[str, int]
) -> None:
    """Record how a run ended: state, the runner that really ran, its counters."""
    with connect(dsn) as conn:
        conn.execute(
            "UPDATE pipeline_runs SET state = %s, runner = %s, counters = %s::jsonb,"
            " finished_at = now() WHERE run_id = %s",
            (state, runner, json.dumps(dict(counters)), run_id),
        )


# --- tables and their bulk upsert -------------------------------------------------


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
