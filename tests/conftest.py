"""Shared fixtures: a real embedded Postgres for the session, a fresh database per test."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Before any project import: every test session gets its own TERMIDATOR_HOME.
_HOME = Path(tempfile.mkdtemp(prefix="termidator-test-"))
os.environ["TERMIDATOR_HOME"] = str(_HOME)
os.environ.pop("TERMIDATOR_DSN", None)

import psycopg  # noqa: E402

from connectors.datalake import (  # noqa: E402
    create_database,
    drop_database,
    embedded_dsn,
    stop_embedded,
)


@pytest.fixture(scope="session")
def server_dsn():
    """The embedded server, started once for the session and stopped after it."""
    dsn = embedded_dsn()
    yield dsn
    stop_embedded()
    shutil.rmtree(_HOME, ignore_errors=True)


@pytest.fixture
def datalake(server_dsn):
    """A fresh, migrated database on the embedded server; its DSN."""
    dsn = create_database(server_dsn, "t")
    yield dsn
    drop_database(server_dsn, dsn)


def query(dsn: str, statement: str, params=None) -> list[tuple]:
    """Rows of one query (tests read the datalake through plain SQL)."""
    with psycopg.connect(dsn) as conn:
        return conn.execute(statement, params).fetchall()
