"""Idempotency keys of the REST ingest (``ingest_requests``): the first request with a key
lands its lines and stores its answer; a retry with the same key and body gets the same
answer and lands nothing. A request that fails frees its key at once.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from psycopg.types.json import Jsonb

from connectors.datalake import connect
from connectors.sink import write_dead_letters
from transforms.records import DeadLetter


class KeyInProgress(Exception):
    """Another request with this Idempotency-Key is being processed (409)."""


@dataclasses.dataclass(frozen=True)
class Stored:
    """A finished request's answer, to give again to a retry."""

    status: int
    response: dict
    body_sha256: str


def begin(
    dsn: str, dataset: str, key: str, stale_s: float, name: str
) -> tuple[str, Optional[Stored]]:
    """Reserve ``key`` for a request that lands file ``name``: returns (name, None), or
    (the first request's file, Stored) for a retry.

    A reservation left pending longer than ``stale_s`` (a crashed request) is taken over,
    with the same file name.
    """
    with connect(dsn, autocommit=True) as conn:
        with conn.transaction():
            inserted = conn.execute(
                "INSERT INTO ingest_requests (dataset, idempotency_key, state, file)"
                " VALUES (%s, %s, 'pending', %s) ON CONFLICT DO NOTHING RETURNING file",
                (dataset, key, name),
            ).fetchone()
            if inserted:
                return name, None
            state, file, status, response, sha, stale = conn.execute(
                "SELECT state, file, status, response, body_sha256,"
                " created_at < now() - %s * interval '1 second' FROM ingest_requests"
                " WHERE dataset = %s AND idempotency_key = %s FOR UPDATE",
                (stale_s, dataset, key),
            ).fetchone()
            if state == "done":
                return file, Stored(status, response, sha)
            if not stale:
                raise KeyInProgress(key)
            conn.execute(
                "UPDATE ingest_requests SET created_at = now()"
                " WHERE dataset = %s AND idempotency_key = %s",
                (dataset, key),
            )
            return file, None


def finish(
    dsn: str,
    dataset: str,
    key: Optional[str],
    body_sha256: str,
    status: int,
    response: dict,
    dead_letters: list[DeadLetter],
) -> None:
    """In one transaction: the rejected lines' dead letters, and the key's answer."""
    with connect(dsn, autocommit=True) as conn:
        with conn.transaction():
            if dead_letters:
                write_dead_letters(conn, dead_letters)
            if key is not None:
                conn.execute(
                    "UPDATE ingest_requests SET state = 'done', body_sha256 = %s, status = %s,"
                    " response = %s, finished_at = now()"
                    " WHERE dataset = %s AND idempotency_key = %s",
                    (body_sha256, status, Jsonb(response), dataset, key),
                )


def release(dsn: str, dataset: str, key: str) -> None:
    """Forget a reservation whose request failed, so that a retry can go ahead."""
    with connect(dsn, autocommit=True) as conn:
        conn.execute(
            "DELETE FROM ingest_requests WHERE dataset = %s AND idempotency_key = %s"
            " AND state = 'pending'",
            (dataset, key),
        )
