"""Bounded dataset reader: globs, several inputs, ``.json``/``.jsonl`` gzipped or not.

Files go through Beam's ``FileSystems`` (local paths, ``gs://``, ``s3://`` where the
filesystem is installed). Gzip is recognised by its magic bytes, not the name, and
decoded with ``zlib`` directly so that a truncated file yields every complete line
before the break and the break itself becomes a dead letter.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
import zlib
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from connectors import datalake
from connectors.stopping import stop_requested
from transforms.records import DEAD_LETTERS, METRICS_NAMESPACE, DeadLetter, RawRecord

READ_STAGE = "read"
# The names of dataset files (gzip is recognised by content, whatever the name says).
DATASET_SUFFIXES = (".json", ".jsonl", ".ndjson", ".json.gz", ".jsonl.gz", ".ndjson.gz")
CHUNK_BYTES = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"
_LOG = logging.getLogger(__name__)


class NoInputError(ValueError):
    """An input pattern matched no file."""


def expand_inputs(patterns: Union[str, Sequence[str]]) -> list[str]:
    """Every file the patterns name, sorted, each once: a file, a glob, or a directory (its
    dataset files, recursively); a pattern that names no file is an error."""
    if isinstance(patterns, str):
        patterns = [patterns]
    if not patterns:
        raise NoInputError("no input given: pass --input PATH_OR_GLOB")
    files: dict[str, None] = {}
    for pattern in patterns:
        if os.path.isdir(pattern):
            paths = dataset_files(pattern)
            if not paths:
                raise NoInputError(
                    f"no dataset file in {pattern!r} (looked for {', '.join(DATASET_SUFFIXES)},"
                    " recursively)"
                )
        else:
            try:
                matched = FileSystems.match([pattern])[0].metadata_list
            except Exception as error:  # noqa: BLE001 - the filesystem's own words follow
                raise NoInputError(f"cannot list {pattern!r}: {error}") from None
            paths = sorted(_absolute(m.path) for m in matched if not m.path.endswith("/"))
        if not paths:
            raise NoInputError(
                f"no file matches {pattern!r}: check the path, and quote globs "
                "so the shell does not expand them"
            )
        files.update(dict.fromkeys(paths))
    return list(files)


def _absolute(path: str) -> str:
    """A local path made absolute (workers elsewhere have their own working directory);
    a URL such as gs://... as it is."""
    return path if "://" in path else os.path.abspath(path)


def dataset_files(directory: str) -> list[str]:
    """The dataset files below a local directory, recursively, sorted; hidden ones skipped."""
    found = []
    for folder, subfolders, names in os.walk(os.path.abspath(directory)):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        found += [
            os.path.join(folder, name)
            for name in names
            if name.endswith(DATASET_SUFFIXES) and not name.startswith(".")
        ]
    return sorted(found)


class TruncatedFileError(IOError):
    """The file ends mid-stream (a cut-off gzip)."""


def iter_lines(
    path: str, position: Optional[Callable[[int], None]] = None
) -> Iterator[tuple[int, bytes]]:
    """Yield (line number, line bytes) for every line, counting blank lines too.

    Raises TruncatedFileError after the last complete line if a gzip stream is cut off;
    the partial line, if any, is in the error's ``partial`` attribute. ``position``: as
    for ``iter_blocks``.
    """
    for first, block in iter_blocks(path, position):
        yield from enumerate(block.split(b"\n"), first)


def iter_blocks(
    path: str, position: Optional[Callable[[int], None]] = None
) -> Iterator[tuple[int, bytes]]:
    """Yield (number of its first line, block of whole lines without the last newline).

    Blocks follow the decompressed chunks (~1 MiB): callers decode and split a block at
    once, which costs far less per line than handling lines one by one. ``position`` is
    told how many bytes of the file (compressed, as stored) are read, after each block.
    Raises TruncatedFileError like ``iter_lines``.
    """
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as raw:
        head = raw.read(CHUNK_BYTES)
        chunks = _gunzip(head, raw) if head[:2] == GZIP_MAGIC else _plain(head, raw)
        pending = b""
        number = 0  # lines yielded so far
        try:
            for chunk in chunks:
                data = pending + chunk if pending else chunk
                cut = data.rfind(b"\n")
                if cut < 0:
                    pending = data
                    continue
                block, pending = data[:cut], data[cut + 1 :]
                if position is not None:
                    position(raw.tell())
                yield number + 1, block
                number += block.count(b"\n") + 1
        except TruncatedFileError as error:
            error.partial = pending
            error.line = number + 1
            raise
        if pending:
            yield number + 1, pending


def _plain(head: bytes, raw) -> Iterator[bytes]:
    chunk = head
    while chunk:
        yield chunk
        chunk = raw.read(CHUNK_BYTES)


def _gunzip(head: bytes, raw) -> Iterator[bytes]:
    """Decompress gzip (several members too) chunk by chunk, noticing truncation."""
    decompressor = zlib.decompressobj(zlib.MAX_WBITS | 16)
    data = head
    while True:
        if not data:
            data = raw.read(CHUNK_BYTES)
            if not data:
                break
        try:
            out = decompressor.decompress(data)
        except zlib.error as error:
            raise TruncatedFileError(f"corrupt gzip data: {error}") from None
        if out:
            yield out
        data = b""
        if decompressor.eof:
            data = decompressor.unused_data
            if data.strip(b"\x00"):
                decompressor = zlib.decompressobj(zlib.MAX_WBITS | 16)
            else:
                data = raw.read(CHUNK_BYTES)
                if not data:
                    return
                decompressor = zlib.decompressobj(zlib.MAX_WBITS | 16)
    tail = decompressor.flush()
    if tail:
        yield tail
    if not decompressor.eof:
        raise TruncatedFileError("gzip stream ends before its end marker (truncated file)")


def read_lines(
    path: str,
    pipeline_name: str,
    position: Optional[Callable[[int], None]] = None,
    stop_file: Optional[str] = None,
) -> Iterator[Union[RawRecord, DeadLetter]]:
    """A RawRecord per non-blank line of a dataset file; a DeadLetter per line that is not
    text, for a truncated end (after every complete line before it) or an unreadable file.
    ``position``: as for ``iter_blocks``. Stops between blocks once ``stop_file`` exists."""
    count = 0
    try:
        for first, block in iter_blocks(path, position):
            if stop_requested(stop_file):
                return
            for number, text in enumerate(_decode_block(block), first):
                if type(text) is str:
                    if text and not text.isspace():
                        count += 1
                        yield RawRecord(path, number, text)
                else:
                    yield DeadLetter(pipeline_name, READ_STAGE, path, number, text.raw, str(text))
    except TruncatedFileError as error:
        partial = getattr(error, "partial", b"")
        yield DeadLetter(
            pipeline_name,
            READ_STAGE,
            path,
            getattr(error, "line", None),
            partial.decode("utf-8", "replace") if partial else None,
            f"{error}; {count} complete records before line "
            f"{getattr(error, 'line', '?')} were read",
        )
    except OSError as error:
        yield DeadLetter(pipeline_name, READ_STAGE, path, None, None, f"cannot read file: {error}")


class BytesRead:
    """Reports how far a run has read its files, as the run counter ``bytes_read`` in the
    datalake (where the launcher's progress reads it, whatever the runner), at most every
    ``every_s`` seconds (the first block at once, so progress has a rate early): a
    progress report costs one small statement."""

    def __init__(self, dsn: str, run_id: str, every_s: float = 2.0):
        self._dsn = dsn
        self._run_id = run_id
        self._every_s = every_s
        self._conn = None
        self._source = f"read-{uuid.uuid4().hex[:12]}"
        self._reported = self._unreported = 0
        self._last = float("-inf")

    def start(self) -> Callable[[int], None]:
        """A ``position`` callback for one file."""
        self._reported = 0
        return self._at

    def _at(self, position: int) -> None:
        self._unreported = position - self._reported
        if time.monotonic() - self._last >= self._every_s:
            self.flush()

    def flush(self) -> None:
        """Report what is read but not reported yet (a failed report waits for the next)."""
        if self._unreported <= 0:
            return
        try:
            if self._conn is None or self._conn.closed:
                self._conn = datalake.open_connection(self._dsn, autocommit=True)
            datalake.add_run_counters(
                self._conn, self._run_id, self._source, {"bytes_read": self._unreported}
            )
        except Exception as error:  # noqa: BLE001 - progress must never stop a run
            _LOG.debug("cannot report progress: %s", error)
            self._conn = None
            return
        self._reported += self._unreported
        self._unreported = 0
        self._last = time.monotonic()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


class ReadLinesFn(beam.DoFn):
    """One file path -> a RawRecord per non-blank line; unreadable lines are dead letters.
    With a ``run`` (dsn, run id), how far it has read is reported for progress."""

    def __init__(
        self,
        pipeline_name: str,
        run: Optional[tuple[str, str]] = None,
        stop_file: Optional[str] = None,
    ):
        self._pipeline_name = pipeline_name
        self._run = run
        self._stop_file = stop_file
        self._read = Metrics.counter(METRICS_NAMESPACE, "records_read")
        self._files = Metrics.counter(METRICS_NAMESPACE, "files_read")
        self._rejected = Metrics.counter(METRICS_NAMESPACE, "read_dead_letters")

    def setup(self):
        self._bytes = BytesRead(*self._run) if self._run else None

    def teardown(self):
        if self._bytes is not None:
            self._bytes.close()

    def process(self, path: str) -> Iterable:
        read = rejected = 0
        position = self._bytes.start() if self._bytes is not None else None
        for item in read_lines(path, self._pipeline_name, position, self._stop_file):
            if type(item) is RawRecord:
                read += 1
                yield item
            else:
                rejected += 1
                yield pvalue.TaggedOutput(DEAD_LETTERS, item)
        if self._bytes is not None:
            self._bytes.flush()
        self._read.inc(read)
        self._rejected.inc(rejected)
        self._files.inc()


def _decode_block(block: bytes) -> list[Union[str, "_NotText"]]:
    """A block's lines as text; a line that is not UTF-8 becomes a marker saying why."""
    try:
        text = block.decode("utf-8")
    except UnicodeDecodeError:  # rare: find the guilty lines one by one
        return [decode_line(line) for line in block.split(b"\n")]
    if "\r" in text:
        return [line.rstrip("\r") for line in text.split("\n")]
    return text.split("\n")


def decode_line(data: bytes) -> Union[str, "_NotText"]:
    """The line as text, or a marker carrying why it is not UTF-8 and its bytes (repr)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        return _NotText(f"not UTF-8 text: {error}", repr(data[:10000]))
    return text.rstrip("\r")


class _NotText:
    """A line that is not UTF-8 (its message becomes the dead letter's error)."""

    def __init__(self, message: str, raw: str):
        self.message = message
        self.raw = raw

    def __str__(self) -> str:
        return self.message


class ReadDataset(beam.PTransform):
    """Dataset files -> RawRecord per line (``.records``) and dead letters (``.dead_letters``).

    Parallelism is per file: a gzip stream cannot be split, and the public datasets come
    as one file per category.
    """

    def __init__(
        self,
        patterns: Union[str, Sequence[str]],
        pipeline_name: str = "read",
        run: Optional[tuple[str, str]] = None,
        stop_file: Optional[str] = None,
    ):
        super().__init__()
        self._files = expand_inputs(patterns)
        self._pipeline_name = pipeline_name
        self._run = run
        self._stop_file = stop_file

    @property
    def files(self) -> list[str]:
        """The files this read will ingest (globs expanded at construction)."""
        return list(self._files)

    @property
    def total_bytes(self) -> int:
        """How many bytes the files hold, as stored (compressed or not)."""
        return sum(m.size_in_bytes for r in FileSystems.match(self._files) for m in r.metadata_list)

    def expand(self, pbegin):
        files = pbegin | "ListFiles" >> beam.Create(self._files)
        if len(self._files) > 1:
            files = files | "SpreadFiles" >> beam.Reshuffle()
        read = ReadLinesFn(self._pipeline_name, self._run, self._stop_file)
        return files | "ReadLines" >> beam.ParDo(read).with_outputs(DEAD_LETTERS, main="records")
