"""The Postgres datalake: where it is (DSN, embedded server), its schema (migrations), and
the bookkeeping every run shares (``pipeline_runs``, ``dead_letters``, counts).

Everything that talks to the database lives in ``connectors``: this module for the lake
itself, ``sink`` for the bulk writer, ``landing`` for the landing zone's ledger.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import uuid
import warnings
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import psycopg
import psycopg.rows
from psycopg import sql

DATALAKE_TABLES = (
    "products",
    "reviews",
    "review_emotions",
    "review_stats",
    "review_embeddings",
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


# Every connection has a connect timeout, a statement timeout and TCP keepalives (a cut
# network is noticed in ~30 s instead of the kernel's minutes; ignored on Unix sockets).
CONNECT_TIMEOUT_S = 10
STATEMENT_TIMEOUT_S = 300
_TCP = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}


def open_connection(
    dsn: str, statement_timeout_s: float = STATEMENT_TIMEOUT_S, **kwargs: Any
) -> psycopg.Connection:
    """A connection with the timeouts; psycopg's own errors pass through (for retry loops)."""
    options = f"-c statement_timeout={int(statement_timeout_s * 1000)}"
    return psycopg.connect(
        dsn, connect_timeout=CONNECT_TIMEOUT_S, options=options, **_TCP, **kwargs
    )


def connect(dsn: str, **kwargs: Any) -> psycopg.Connection:
    """Open a connection, turning failure into a one-line error that names the fix."""
    try:
        return open_connection(dsn, **kwargs)
    except psycopg.Error as error:
        raise DatalakeUnavailable(unreachable(dsn, error)) from None


def first_line(error: BaseException) -> str:
    """An error's message, first line only (psycopg adds context lines)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def is_embedded(dsn: str) -> bool:
    """Whether the DSN is the embedded datalake's (its socket lives under the home)."""
    try:
        host = psycopg.conninfo.conninfo_to_dict(dsn).get("host") or ""
    except psycopg.Error:
        return False
    return str(host).startswith(str(termidator_home()))


def unreachable(dsn: str, error: BaseException) -> str:
    """Why the datalake cannot be reached, and what to do about it, in one line."""
    if is_embedded(dsn):
        fix = "the embedded datalake is not running: `python -m pipelines db status` restarts it"
    else:
        fix = "fix --dsn or TERMIDATOR_DSN, or unset both to use the embedded datalake"
    return f"cannot connect to Postgres at {redact(dsn)}: {first_line(error)}; {fix}"


# --- whose fault: a row's, or the connection's ----------------------------------------

# SQLSTATE classes a row causes: data exception, integrity violation, program limit
# (e.g. 54000 index row size). Such a row goes to the dead letters alone.
ROW_FAULT_CLASSES = frozenset({"22", "23", "54"})
# Classes of the connection or server: connection exception, transaction rollback
# (deadlock, serialization), insufficient resources, operator intervention (shutdown,
# statement timeout), system error. Retried with backoff for a bounded time.
TRANSIENT_CLASSES = frozenset({"08", "40", "53", "57", "58"})
# What a row can fail with before it reaches the server: a value that cannot be encoded
# for COPY (a lone surrogate, an int8 overflow).
ENCODING_ERRORS = (UnicodeError, ValueError, TypeError, OverflowError)


def is_row_fault(error: BaseException) -> bool:
    """Whether a row caused the error (decided by SQLSTATE class, not exception type)."""
    if isinstance(error, ENCODING_ERRORS):
        return True
    state = getattr(error, "sqlstate", None)
    return bool(state) and state[:2] in ROW_FAULT_CLASSES


def is_transient(error: BaseException) -> bool:
    """Whether the connection or server failed (worth retrying): a transient SQLSTATE
    class, or a psycopg error with none at all (the connection was lost)."""
    if not isinstance(error, psycopg.Error):
        return False
    state = getattr(error, "sqlstate", None)
    if state:
        return state[:2] in TRANSIENT_CLASSES
    return isinstance(error, (psycopg.OperationalError, psycopg.InterfaceError))


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


def required_extensions(script: str) -> list[str]:
    """The extensions a migration needs, from its ``-- requires: a, b`` first line."""
    first = script.lstrip().splitlines()[0] if script.strip() else ""
    if not first.startswith("-- requires:"):
        return []
    return [name.strip() for name in first.split(":", 1)[1].split(",") if name.strip()]


def migrate(dsn: str) -> list[str]:
    """Apply pending migrations in order, once each, under an advisory lock; one that
    needs an extension this Postgres lacks waits (and is applied once it has it).

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
            available = {n for (n,) in conn.execute("SELECT name FROM pg_available_extensions")}
            for version, name, script in migrations():
                if version in done:
                    continue
                missing = set(required_extensions(script)) - available
                if missing:  # applied once the extension is installed
                    _LOG.warning("%s waits for the %s extension", name, ", ".join(missing))
                    continue
                conn.execute(script)
                conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                    (version, name),
                )
                applied_now.append(name)
    return applied_now


def has_table(conn: psycopg.Connection, table: str) -> bool:
    """Whether ``table`` exists: one waiting for an extension (``review_embeddings``
    without pgvector) does not."""
    return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()[0]


def can_search(dsn: str) -> bool:
    """Whether this datalake stores review embeddings (its Postgres has pgvector)."""
    with connect(dsn, autocommit=True) as conn:
        return has_table(conn, "review_embeddings")


def table_counts(dsn: str, tables: Iterable[str]) -> dict[str, int]:
    """Exact row counts of the named tables that exist (see ``has_table``)."""
    with connect(dsn) as conn:
        found = [table for table in tables if has_table(conn, table)]
        return {
            table: conn.execute(
                sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))
            ).fetchone()[0]
            for table in found
        }


def ping(dsn: str) -> None:
    """Raise unless the datalake answers within a few seconds."""
    with open_connection(dsn, statement_timeout_s=5, autocommit=True) as conn:
        conn.execute("SELECT 1")


def overview(dsn: str) -> dict[str, Any]:
    """Rows per table, dead letters by stage, and the newest stream stats window."""
    from connectors import stats  # the stats live with the stream's sinks

    counts = table_counts(dsn, DATALAKE_TABLES)
    with connect(dsn, autocommit=True) as conn:
        by_stage = dict(
            conn.execute("SELECT stage, count(*) FROM dead_letters GROUP BY 1 ORDER BY 1")
        )
        newest = stats.newest_window(conn)
    return {
        "tables": counts,
        "dead_letters": {"total": counts.get("dead_letters", 0), "by_stage": by_stage},
        "review_stats": {"rows": counts.get("review_stats", 0), "newest_window": newest},
    }


# --- runs ---------------------------------------------------------------------------

# The launcher's heartbeat: a run on another host whose heartbeat is older than
# STALE_AFTER_S is abandoned; on this host, a run whose process is gone is, at once.
HEARTBEAT_S = 10.0
STALE_AFTER_S = 60.0
RUN_STATES = ("RUNNING", "DONE", "FAILED", "CANCELLED", "ABANDONED")


def this_host() -> str:
    """This machine's name, as runs record it."""
    return socket.gethostname()


def this_process() -> tuple[str, int, datetime.datetime]:
    """(host, pid, start time) of this process: who owns a run, a claim, a request."""
    import psutil

    started = psutil.Process().create_time()
    return socket.gethostname(), os.getpid(), _utc(started)


def _utc(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)


def start_run(
    dsn: str, pipeline: str, options: Mapping[str, Any], run_id: Optional[str] = None
) -> str:
    """Record a run as RUNNING, with the process that runs it; returns its id."""
    run_id = run_id or str(uuid.uuid4())
    host, pid, started = this_process()
    with connect(dsn) as conn:
        conn.execute(
            "INSERT INTO pipeline_runs (run_id, pipeline, options, state, host, pid,"
            " process_started_at, heartbeat_at)"
            " VALUES (%s, %s, %s::jsonb, 'RUNNING', %s, %s, %s, now())",
            (run_id, pipeline, json.dumps(options, default=str), host, pid, started),
        )
    return run_id


def heartbeat(conn: psycopg.Connection, run_id: str, runner: Optional[str] = None) -> None:
    """The run is alive (and, once known, which runner really runs it)."""
    conn.execute(
        "UPDATE pipeline_runs SET heartbeat_at = now(), runner = coalesce(%s, runner)"
        " WHERE run_id = %s AND state = 'RUNNING'",
        (runner, run_id),
    )


def finish_run(
    dsn: str, run_id: str, state: str, runner: Optional[str], counters: Mapping[str, int]
) -> None:
    """Record how a run ended: state, the runner that really ran, its counters."""
    with connect(dsn) as conn:
        conn.execute(
            "UPDATE pipeline_runs SET state = %s, runner = coalesce(%s, runner),"
            " counters = %s::jsonb, finished_at = now() WHERE run_id = %s",
            (state, runner, json.dumps(dict(counters)), run_id),
        )


def process_gone(
    host: Optional[str], pid: Optional[int], started: Optional[datetime.datetime]
) -> bool:
    """Whether a run's process, on this host, no longer exists (or its pid was reused)."""
    import psutil

    if host != socket.gethostname() or pid is None:
        return False
    try:
        created = psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return True
    return started is not None and abs(created - started.timestamp()) > 1.0


def mark_abandoned(conn: psycopg.Connection) -> list[str]:
    """Mark RUNNING runs whose process is gone (this host) or whose heartbeat is stale
    (any host) as ABANDONED; returns their ids. Every reader of runs calls this first."""
    rows = conn.execute(
        "SELECT run_id, host, pid, process_started_at,"
        " coalesce(heartbeat_at, started_at) < now() - %s * interval '1 second'"
        " FROM pipeline_runs WHERE state = 'RUNNING'",
        (STALE_AFTER_S,),
    ).fetchall()
    gone = [
        str(run)
        for run, host, pid, started, stale in rows
        if stale or process_gone(host, pid, started)
    ]
    if gone:
        conn.execute(
            "UPDATE pipeline_runs SET state = 'ABANDONED', finished_at = coalesce("
            " finished_at, heartbeat_at, now()) WHERE run_id = ANY(%s::uuid[])"
            " AND state = 'RUNNING'",
            (gone,),
        )
    return gone


def recent_runs(dsn: str, limit: int = 20, pipeline: Optional[str] = None) -> list[dict]:
    """The latest runs, newest first, each as a dict (abandoned ones marked so first)."""
    with connect(dsn, autocommit=True) as conn:
        mark_abandoned(conn)
        cursor = conn.cursor(row_factory=psycopg.rows.dict_row)
        return cursor.execute(
            "SELECT run_id::text, pipeline, state, runner, started_at, finished_at,"
            " heartbeat_at, host, pid, counters, options FROM pipeline_runs"
            " WHERE %(pipeline)s::text IS NULL OR pipeline = %(pipeline)s"
            " ORDER BY started_at DESC LIMIT %(limit)s",
            {"pipeline": pipeline, "limit": limit},
        ).fetchall()


def record_watermark(conn: psycopg.Connection, run_id: str, watermark: Any) -> None:
    """A streaming run's event-time watermark (a Beam Timestamp), for what reads it."""
    conn.execute(
        "UPDATE pipeline_runs SET watermark = to_timestamp(%s / 1e6)"
        " WHERE run_id = %s AND (watermark IS NULL OR watermark < to_timestamp(%s / 1e6))",
        (watermark.micros, run_id, watermark.micros),
    )


def run_of_job(dsn: str, job_name: str) -> Optional[dict[str, Any]]:
    """The latest run started with ``--job_name`` (the REST service's jobs)."""
    with connect(dsn, autocommit=True) as conn:
        mark_abandoned(conn)
        row = conn.execute(
            "SELECT run_id::text, state, runner, counters, started_at, finished_at"
            " FROM pipeline_runs WHERE options->>'job_name' = %s"
            " ORDER BY started_at DESC LIMIT 1",
            (job_name,),
        ).fetchone()
    if row is None:
        return None
    run_id, state, runner, counters, started, finished = row
    return {
        "run_id": run_id,
        "state": state,
        "runner": runner,
        "counters": counters,
        "started_at": started.isoformat(),
        "finished_at": finished and finished.isoformat(),
    }


def cancel_runs_of_job(dsn: str, job_name: str) -> None:
    """Record a cancelled job's run CANCELLED (if the job did not record it itself)."""
    with connect(dsn, autocommit=True) as conn:
        conn.execute(
            "UPDATE pipeline_runs SET state = 'CANCELLED',"
            " finished_at = coalesce(finished_at, now())"
            " WHERE options->>'job_name' = %s AND state IN ('RUNNING', 'FAILED', 'ABANDONED')",
            (job_name,),
        )


def commonest_dead_letter(dsn: str, run_id: str) -> str:
    """The error most of a run's dead letters give (their count in front)."""
    with connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*), min(error) FROM dead_letters WHERE run_id = %s"
            " GROUP BY regexp_replace(error, '[0-9]+', '#', 'g') ORDER BY 1 DESC LIMIT 1",
            (run_id,),
        ).fetchone()
    return f"{row[1]} ({row[0]:,} times)" if row else "(no dead letters recorded)"


def add_run_counters(
    conn: psycopg.Connection, run_id: str, source: str, counts: Mapping[str, int]
) -> None:
    """Add to a run's counters, in the caller's transaction (so they count what commits)."""
    conn.execute(
        "INSERT INTO run_counters AS c (run_id, source, name, value)"
        " SELECT %s, %s, name, value FROM unnest(%s::text[], %s::bigint[]) AS v (name, value)"
        " ON CONFLICT (run_id, source, name) DO UPDATE SET value = c.value + EXCLUDED.value",
        (run_id, source, list(counts), list(counts.values())),
    )


def run_counters(conn: psycopg.Connection, run_id: str) -> dict[str, int]:
    """A run's committed counters, summed over its writers."""
    return {
        name: int(value)
        for name, value in conn.execute(
            "SELECT name, sum(value) FROM run_counters WHERE run_id = %s GROUP BY name",
            (run_id,),
        )
    }
