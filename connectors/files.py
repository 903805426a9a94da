"""Bounded dataset reader: globs, several inputs, ``.json``/``.jsonl`` gzipped or not.

Files go through Beam's ``FileSystems`` (local paths, ``gs://``, ``s3://`` where the
filesystem is installed). Gzip is recognised by its magic bytes, not the name, and
decoded with ``zlib`` directly so that a truncated file yields every complete line
before the break and the break itself becomes a dead letter.
"""

from __future__ import annotations

import logging
import zlib
from typing import Iterable, Iterator, Sequence, Union

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from transforms.records import DEAD_LETTERS, METRICS_NAMESPACE
from transforms.records import DeadLetter, RawRecord

READ_STAGE = "read"
CHUNK_BYTES = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"
_LOG = logging.getLogger(__name__)


class NoInputError(ValueError):
    """An input pattern matched no file."""


def expand_inputs(patterns: Union[str, Sequence[str]]) -> list[str]:
    """Every file the patterns name, sorted, each once; an empty pattern is an error."""
    if isinstance(patterns, str):
        patterns = [patterns]
    if not patterns:
        raise NoInputError("no input given: pass --input PATH_OR_GLOB")
    files: dict[str, None] = {}
    for pattern in patterns:
        try:
            matched = FileSystems.match([pattern])[0].metadata_list
        except Exception as error:  # noqa: BLE001 - the filesystem's own words follow
            raise NoInputError(f"cannot list {pattern!r}: {error}") from None
        paths = sorted(m.path for m in matched if not m.path.endswith("/"))
        if not paths:
            raise NoInputError(
                f"no file matches {pattern!r}: check the path, and quote globs "
                "so the shell does not expand them"
            )
        files.update(dict.fromkeys(paths))
    return list(files)


class TruncatedFileError(IOError):
    """The file ends mid-stream (a cut-off gzip)."""


def iter_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """Yield (line number, line bytes) for every line, counting blank lines too.

    Raises TruncatedFileError after the last complete line if a gzip stream is cut off;
    the partial line, if any, is in the error's ``partial`` attribute.
    """
    for first, block in iter_blocks(path):
        yield from enumerate(block.split(b"\n"), first)


def iter_blocks(path: str) -> Iterator[tuple[int, bytes]]:
    """Yield (number of its first line, block of whole lines without the last newline).

    Blocks follow the decompressed chunks (~1 MiB): callers decode and split a block at
    once, which costs far less per line than handling lines one by one. Raises
    TruncatedFileError like ``iter_lines``.
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


def read_lines(path: str, pipeline_name: str) -> Iterator[Union[RawRecord, DeadLetter]]:
    """A RawRecord per non-blank line of a dataset file; a DeadLetter per line that is not
    text, for a truncated end (after every complete line before it) or an unreadable file."""
    count = 0
    try:
        for first, block in iter_blocks(path):
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


class ReadLinesFn(beam.DoFn):
    """One file path -> a RawRecord per non-blank line; unreadable lines are dead letters."""

    def __init__(self, pipeline_name: str):
        self._pipeline_name = pipeline_name
        self._read = Metrics.counter(METRICS_NAMESPACE, "records_read")
        self._files = Metrics.counter(METRICS_NAMESPACE, "files_read")
        self._rejected = Metrics.counter(METRICS_NAMESPACE, "read_dead_letters")

    def process(self, path: str) -> Iterable:
        read = rejected = 0
        for item in read_lines(path, self._pipeline_name):
            if type(item) is RawRecord:
                read += 1
                yield item
            else:
                rejected += 1
                yield pvalue.TaggedOutput(DEAD_LETTERS, item)
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

    def __init__(self, patterns: Union[str, Sequence[str]], pipeline_name: str = "read"):
        super().__init__()
        self._files = expand_inputs(patterns)
        self._pipeline_name = pipeline_name

    @property
    def files(self) -> list[str]:
        """The files this read will ingest (globs expanded at construction)."""
        return list(self._files)

    def expand(self, pbegin):
        files = pbegin | "ListFiles" >> beam.Create(self._files)
        if len(self._files) > 1:
            files = files | "SpreadFiles" >> beam.Reshuffle()
        return files | "ReadLines" >> beam.ParDo(ReadLinesFn(self._pipeline_name)).with_outputs(
            DEAD_LETTERS, main="records"
        )
