"""The Postgres datalake: where it is (DSN, embedded server), its schema (migrations), and
the bookkeeping every run shares (``pipeline_runs``, ``dead_letters``, counts).

Everything that talks to the database lives in ``connectors``: this module for the lake
itself, ``sink`` for the bulk writer, ``landing`` for the landing zone's ledger.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
import warnings
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import psycopg
from psycopg import sql

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
