"""The landing zone: ``TERMIDATOR_HOME/landing/<dataset>/`` holds complete files only.

Producers (the REST service, ``land_lines``, any tool) write a hidden temp name, fsync,
then rename, so a reader never sees half a file. ``landing_files`` in the datalake is the
zone's ledger: which run claimed a file, how many of its records are settled, whether it
is done. The streaming source over the zone is ``connectors.landing_source``.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import glob
import hashlib
import logging
import os
import re
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Optional, Sequence, Union

import psycopg

from connectors import datalake, idempotency
from connectors.datalake import (
    DatalakeUnavailable,
    connect,
    process_gone,
    termidator_home,
    this_host,
    this_process,
)
from connectors.files import DATASET_SUFFIXES
from connectors.sink import CommitHook
from transforms.records import PRODUCT, REVIEW

DATASETS: Mapping[str, str] = {"reviews": REVIEW, "products": PRODUCT}
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
    return not name.startswith(".") and name.endswith(DATASET_SUFFIXES)


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
            raise ValueError(f"a landed file name ends in one of {DATASET_SUFFIXES}: {name!r}")
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
        """Remove the temp file (even when closing it fails, as on a full disk)."""
        with contextlib.suppress(OSError):  # the close closed it all the same
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
    with connect(dsn, autocommit=True) as conn:
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


# --- the ledger: which run claimed a file, and how much of it is settled ---------------


class Claim(NamedTuple):
    """A file this run now emits, and the run whose claim it took over (if any)."""

    file: LandedFile
    replaces_run: Optional[str]


class Waiting(NamedTuple):
    """A file another live run has claimed: who, and when its claim goes stale."""

    name: str
    run_id: str
    stale_at: datetime.datetime


class Ledger:
    """One streaming run's side of ``landing_files`` in a dataset: heartbeat its claims,
    claim new files (or those of runs that died), record how many records a file had.

    A claim held by a run that is no longer RUNNING (its process is gone: ABANDONED, or
    it ended) is taken over at once; a live run's claim only once its heartbeat is older
    than ``stale_after`` seconds. Files waiting on a live claim are listed in ``waiting``.
    """

    def __init__(self, dsn: str, dataset: str, run_id: str, stale_after: float = 300.0):
        self.dsn = dsn
        self.dataset = dataset
        self.run_id = run_id
        self.stale_after = stale_after
        self.waiting: list[Waiting] = []
        self._conn: Optional[psycopg.Connection] = None
        self._done: set[str] = set()  # not asked about again
        self._counter_source = f"landing-{run_id[:8]}-{os.getpid()}"
        self._idle_ms = 0  # waited for new files, not yet added to the run's counters
        self._idle_since_flush = time.monotonic()

    def connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = datalake.open_connection(self.dsn, autocommit=True)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def poll(
        self, landed: Sequence[LandedFile], in_flight: frozenset, max_files: int, max_bytes: int
    ) -> tuple[frozenset, list[Claim]]:
        """Heartbeat this run's claims and claim what is new (or orphaned), within the
        budgets; returns (the in-flight files still worth remembering, the new claims)."""
        landed = [f for f in landed if f.name not in self._done]
        conn = self.connection()
        datalake.mark_abandoned(conn)
        with conn.transaction():
            conn.execute(
                "UPDATE landing_files SET heartbeat_at = now()"
                " WHERE run_id = %s AND state = 'claimed'",
                (self.run_id,),
            )
            rows = conn.execute(
                "SELECT l.name, l.state, l.run_id::text, l.heartbeat_at < now() - %s * interval"
                " '1 second', r.state, l.heartbeat_at + %s * interval '1 second'"
                " FROM landing_files l LEFT JOIN pipeline_runs r USING (run_id)"
                " WHERE l.dataset = %s AND l.name = ANY(%s) FOR UPDATE OF l",
                (self.stale_after, self.stale_after, self.dataset, [f.name for f in landed]),
            ).fetchall()
            ledger = {row[0]: row[1:] for row in rows}
            self._done.update(n for n, row in ledger.items() if row[0] == "done")
            present = {f.name for f in landed}
            keep = frozenset(
                n for n in in_flight if n in present and ledger.get(n, ("",))[0] != "done"
            )
            claimed: list[Claim] = []
            waiting: list[Waiting] = []
            budget = max_bytes
            for landed_file in landed:
                if len(claimed) >= max_files or (claimed and landed_file.bytes > budget):
                    break
                if landed_file.name in in_flight:
                    continue
                row = ledger.get(landed_file.name)
                claim = self._claim(conn, landed_file, row)
                if claim is not None:
                    claimed.append(claim)
                    budget -= landed_file.bytes
                elif row is not None and row[0] == "claimed":
                    waiting.append(Waiting(landed_file.name, row[1], row[4]))
        if waiting != self.waiting and waiting:
            owners = sorted({w.run_id for w in waiting})
            _LOG.warning(
                "%d landed file(s) wait on the claim of live run(s) %s, until %s at the latest",
                len(waiting),
                ", ".join(owners),
                max(w.stale_at for w in waiting).isoformat(timespec="seconds"),
            )
        self.waiting = waiting
        return keep, claimed

    def _claim(self, conn, landed: LandedFile, row) -> Optional[Claim]:
        if row is None:
            inserted = conn.execute(
                "INSERT INTO landing_files (dataset, name, path, bytes, state, run_id)"
                " VALUES (%s, %s, %s, %s, 'claimed', %s) ON CONFLICT DO NOTHING RETURNING name",
                (self.dataset, landed.name, landed.path, landed.bytes, self.run_id),
            ).fetchone()
            return Claim(landed, None) if inserted else None
        state, run_id, stale, run_state, _ = row
        if state == "done":
            return None
        mine = run_id == self.run_id  # emitted by a failed attempt of this run: retried
        if not (mine or stale or run_state != "RUNNING"):
            return None  # another live run has it
        # The earlier claim's dead letters for this file are replaced by this reading.
        conn.execute(
            "DELETE FROM dead_letters WHERE source = %s AND run_id = %s", (landed.path, run_id)
        )
        conn.execute(
            "UPDATE landing_files SET run_id = %s, path = %s, bytes = %s, records = NULL,"
            " settled = 0, attempts = attempts + 1, claimed_at = now(), heartbeat_at = now()"
            " WHERE dataset = %s AND name = %s",
            (self.run_id, landed.path, landed.bytes, self.dataset, landed.name),
        )
        if not mine:
            _LOG.warning("taking over %s from run %s (%s)", landed.path, run_id, run_state)
        return Claim(landed, run_id)

    def idled(self, seconds: float) -> None:
        """Time spent waiting for new files (the stream's rate counts busy time only);
        added to the run's counters with the next file, or every ten seconds."""
        self._idle_ms += int(seconds * 1000)
        if time.monotonic() - self._idle_since_flush >= 10:
            self.flush_idle()

    def flush_idle(self) -> None:
        """Add the idle time not counted yet to the run's counters (e.g. as it stops)."""
        with contextlib.suppress(psycopg.Error):
            datalake.add_run_counters(
                self.connection(), self.run_id, self._counter_source, self._idle()
            )

    def _idle(self) -> dict[str, int]:
        idle, self._idle_ms = self._idle_ms, 0
        self._idle_since_flush = time.monotonic()
        return {"idle_ms": idle}

    def emitted(self, name: str, records: int, dead_letters: int) -> None:
        """A claimed file is read: it is done once ``records + dead_letters`` items are
        settled (already, if the sinks were quicker than this)."""
        conn = self.connection()
        with conn.transaction():
            conn.execute(
                "UPDATE landing_files SET records = %(n)s,"
                " state = CASE WHEN settled >= %(n)s THEN 'done' ELSE state END,"
                " done_at = CASE WHEN settled >= %(n)s THEN now() END"
                " WHERE dataset = %(dataset)s AND name = %(name)s AND run_id = %(run)s",
                {
                    "n": records + dead_letters,
                    "dataset": self.dataset,
                    "name": name,
                    "run": self.run_id,
                },
            )
            datalake.add_run_counters(
                conn,
                self.run_id,
                self._counter_source,
                {
                    "records_read": records,
                    "read_dead_letters": dead_letters,
                    "files_read": 1,
                    **self._idle(),
                },
            )


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


class SettleLandedFiles(CommitHook):
    """Each committed batch settles its records' landed files, in its own transaction:
    a file is done once every record read from it is a row or a dead letter."""

    def __init__(self, dataset: str, run_id: str):
        self._dataset = dataset
        self._run_id = run_id

    def on_commit(self, conn: psycopg.Connection, records: Sequence[Any]) -> dict[str, int]:
        names = collections.Counter(
            os.path.basename(r.source) for r in records if getattr(r, "source", None)
        )
        if names:
            conn.execute(
                _SETTLE_SQL, (list(names), list(names.values()), self._dataset, self._run_id)
            )
        return {"landing_records_settled": sum(names.values())}


def waiting_files(dsn: str, dataset: str, run_id: str) -> list[Waiting]:
    """Files of ``dataset`` claimed by other runs that are still RUNNING."""
    with connect(dsn, autocommit=True) as conn:
        datalake.mark_abandoned(conn)
        return [
            Waiting(*row)
            for row in conn.execute(
                "SELECT l.name, l.run_id::text, l.heartbeat_at + interval '300 seconds'"
                " FROM landing_files l JOIN pipeline_runs r USING (run_id)"
                " WHERE l.dataset = %s AND l.state = 'claimed' AND l.run_id <> %s"
                " AND r.state = 'RUNNING' ORDER BY l.name",
                (dataset, run_id),
            )
        ]


# --- leftovers: temp files of writers that died ----------------------------------------


def landing_name(dataset: str, key: Optional[str]) -> str:
    """A unique landing file name (sorting by arrival), marked with the key's digest; one
    without a key is marked with its writer instead, so that a temp file it leaves when
    its process dies can be told from a live one (a key's reservation records that)."""
    if key is None:
        host, pid, started = this_process()
        return new_file_name(f"-w{_host_digest(host)}-{pid}-{int(started.timestamp())}.jsonl")
    digest = hashlib.sha256(f"{dataset}\x1f{key}".encode()).hexdigest()[:24]
    return new_file_name(f"-key-{digest}.jsonl")


def _host_digest(host: str) -> str:
    return hashlib.sha256(host.encode()).hexdigest()[:8]


# LandingFile writes ``.{name}.{random hex}.tmp`` beside the file it lands.
_TEMP = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]+\.tmp$")
_WRITER = re.compile(r"-w(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-(?P<started>\d+)\.jsonl$")


def remove_temp_files(directory: Path, name: str) -> int:
    """Remove the temp files of landing file ``name`` (an abandoned request's, taken
    over); returns how many."""
    return sum(
        _remove_if_older(path, float("inf"))
        for path in directory.glob(f".{glob.escape(name)}.*.tmp")
    )


def _remove_if_older(path: Path, before: float) -> int:
    try:
        if path.stat().st_mtime < before:
            path.unlink()
            return 1
    except FileNotFoundError:
        pass
    return 0


def clean_abandoned_uploads(dsn: str, root: Path, stale_s: float) -> int:
    """Remove the temp files of uploads no live request will finish (at start-up): those
    of abandoned keyed requests, and unkeyed ones whose writer on this host is gone (on
    another host: last written more than ``stale_s`` ago). Returns how many."""
    since = time.time()  # a temp file written after this belongs to a live request
    try:
        keyed = {(a.dataset, a.file) for a in idempotency.abandoned(dsn, stale_s)}
    except (psycopg.Error, DatalakeUnavailable) as error:
        _LOG.warning("cannot list abandoned ingest requests (%s); their temp files stay", error)
        keyed = set()
    removed = 0
    for dataset in DATASETS:
        for path in (root / dataset).glob(".*.tmp"):
            temp = _TEMP.match(path.name)
            if temp is None:
                continue
            name = temp["name"]
            if (dataset, name) in keyed:
                removed += _remove_if_older(path, since)
            elif (writer := _WRITER.search(name)) is not None:
                removed += _remove_if_older(path, _abandoned_before(writer, stale_s))
    if removed:
        _LOG.warning("removed %d temp file(s) of uploads that died with their process", removed)
    return removed


def _abandoned_before(writer: re.Match, stale_s: float) -> float:
    """Temp files of this writer last written before the returned time are abandoned:
    any, if it was a process of this host that is gone; else those older than stale_s."""
    host = this_host()
    if writer["host"] != _host_digest(host):
        return time.time() - stale_s
    started = datetime.datetime.fromtimestamp(int(writer["started"]), datetime.timezone.utc)
    return float("inf") if process_gone(host, int(writer["pid"]), started) else float("-inf")
