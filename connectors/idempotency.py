"""Idempotency keys of the REST ingest (``ingest_requests``): the first request with a key
lands its lines and stores its answer; a retry with the same key and body gets the same
answer and lands nothing. A request that fails frees its key at once; one whose process
died (a crash, a kill -9) leaves a reservation that the next request with the key takes
over: at once when that process was on this host, else once it is older than ``stale_s``.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

from psycopg.types.json import Jsonb

from connectors.datalake import process_gone, this_process, connect
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


class Reservation(NamedTuple):
    """What ``begin`` decided: the file to land, the stored answer of a finished request
    (a retry), and whether an abandoned reservation was taken over (its temp files are
    leftovers)."""

    file: str
    stored: Optional[Stored]
    taken_over: bool


class Abandoned(NamedTuple):
    """A pending reservation whose request is gone: its dataset and file name."""

    dataset: str
    file: str


def begin(dsn: str, dataset: str, key: str, stale_s: float, name: str) -> Reservation:
    """Reserve ``key`` for this process, for a request that lands file ``name``; a retry
    of a finished request gets its stored answer; an abandoned reservation is taken over
    with its file name (so a file it landed is replaced, not landed twice)."""
    host, pid, started = this_process()
    with connect(dsn, autocommit=True) as conn:
        with conn.transaction():
            inserted = conn.execute(
                "INSERT INTO ingest_requests (dataset, idempotency_key, state, file, host, pid,"
                " process_started_at) VALUES (%s, %s, 'pending', %s, %s, %s, %s)"
                " ON CONFLICT DO NOTHING RETURNING file",
                (dataset, key, name, host, pid, started),
            ).fetchone()
            if inserted:
                return Reservation(name, None, False)
            state, file, status, response, sha, stale, *owner = conn.execute(
                "SELECT state, file, status, response, body_sha256,"
                " created_at < now() - %s * interval '1 second', host, pid, process_started_at"
                " FROM ingest_requests WHERE dataset = %s AND idempotency_key = %s FOR UPDATE",
                (stale_s, dataset, key),
            ).fetchone()
            if state == "done":
                return Reservation(file, Stored(status, response, sha), False)
            if not (stale or process_gone(*owner)):
                raise KeyInProgress(key)
            conn.execute(
                "UPDATE ingest_requests SET created_at = now(), host = %s, pid = %s,"
                " process_started_at = %s WHERE dataset = %s AND idempotency_key = %s",
                (host, pid, started, dataset, key),
            )
            return Reservation(file, None, True)


def abandoned(dsn: str, stale_s: float) -> list[Abandoned]:
    """Pending reservations whose request is gone: its process on this host no longer
    runs, or (any host) it is older than ``stale_s``."""
    with connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT dataset, file, created_at < now() - %s * interval '1 second', host, pid,"
            " process_started_at FROM ingest_requests WHERE state = 'pending'",
            (stale_s,),
        ).fetchall()
    return [
        Abandoned(dataset, file)
        for dataset, file, stale, *owner in rows
        if stale or process_gone(*owner)
    ]


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
    """Forget this process's reservation of a request that failed, so that a retry can go
    ahead (a reservation another process took over in the meantime stays)."""
    host, pid, _ = this_process()
    with connect(dsn, autocommit=True) as conn:
        conn.execute(
            "DELETE FROM ingest_requests WHERE dataset = %s AND idempotency_key = %s"
            " AND state = 'pending' AND host IS NOT DISTINCT FROM %s"
            " AND pid IS NOT DISTINCT FROM %s",
            (dataset, key, host, pid),
        )
