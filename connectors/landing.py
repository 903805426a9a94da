"""The landing zone: ``TERMIDATOR_HOME/landing/<dataset>/`` holds complete files only.

Producers (the REST service, ``land_lines``, any tool) write a hidden temp name, fsync,
then rename, so a reader never sees half a file. ``landing_files`` in the datalake is the
zone's ledger: which run claimed a file, how many of its records are settled, whether it
is done. The streaming source over the zone is ``connectors.landing_source``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Optional, Union

import psycopg

from connectors.datalake import termidator_home
from transforms.records import PRODUCT, REVIEW

DATASETS: Mapping[str, str] = {"reviews": REVIEW, "products": PRODUCT}
SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz")
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
