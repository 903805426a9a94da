"""``POST /v1/ingest/{dataset}``: validate an NDJSON body as it streams in, land it.

Each line is checked with the parse stage's own ``decode`` and ``detect``: accepted
lines go, in order, to one file in the landing zone (written under a temp name and
renamed when complete); rejected lines are answered with their line number and reason
and kept as dead letters (stage ``ingest``), so nothing sent is lost. An
Idempotency-Key makes a retried request land nothing twice and get the same answer.
A temp file whose request died with its process is removed when the service starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import zlib
from pathlib import Path
from typing import Any, Iterator, Optional


from connectors.files import decode_line
from connectors.landing import DATASETS, LandingFile
from transforms.clean import review_event_time
from transforms.parse import decode, detect
from transforms.records import REVIEW, DeadLetter

NDJSON_TYPES = (  # the first is the one the API documents first
    "application/x-ndjson",
    "application/ndjson",
    "application/jsonl",
    "application/x-jsonlines",
    "application/jsonlines",
    "application/json-lines",
)
ENCODINGS = frozenset({"identity", "gzip", "x-gzip"})
INGEST_PIPELINE = "ingest"
INGEST_STAGE = "ingest"
MAX_LISTED_REJECTIONS = 10_000
_OUT_CHUNK = 1 << 20
# The compression ratio is only judged past this much output: small bodies of repeated
# records compress well and are no threat.
_RATIO_FLOOR = 1 << 20
_LOG = logging.getLogger(__name__)


class LimitExceeded(Exception):
    """The body or one of its lines is over the service's limit (413)."""


class BadBody(Exception):
    """The body cannot be read as declared, e.g. gzip that is not gzip (400)."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-request limits: decompressed body bytes, bytes per line, and how much a gzip
    body may expand (decompressed : compressed, judged past the first MiB)."""

    max_body_bytes: int = 64 << 20
    max_line_bytes: int = 1 << 20
    max_gzip_ratio: int = 100


@dataclasses.dataclass
class Rejection:
    line: int
    reason: str
    raw: str


class BodyReader:
    """Decompress (gzip, several members too) and split a streamed body into lines.

    Yields the non-blank lines with their numbers (blank ones are skipped, as the file
    reader does, at a few operations each). Output per call is bounded, so a small gzip
    bomb cannot blow up memory, and a body that expands more than ``max_gzip_ratio`` is
    refused early, so it cannot cost seconds of CPU either; the limits count decompressed
    bytes. ``digest`` hashes the decompressed body.
    """

    def __init__(self, gzipped: bool, limits: Limits):
        self._limits = limits
        self._gzip = zlib.decompressobj(zlib.MAX_WBITS | 16) if gzipped else None
        self._pending = b""
        self._hash = hashlib.sha256()
        self._compressed = 0
        self.body_bytes = 0
        self.lines = 0

    @property
    def digest(self) -> str:
        return self._hash.hexdigest()

    def feed(self, chunk: bytes) -> Iterator[tuple[int, bytes]]:
        """(line number, line) for every non-blank line completed by this chunk."""
        for data in self._decompress(chunk):
            yield from self._split(data)

    def finish(self) -> Iterator[tuple[int, bytes]]:
        """The last line (without a trailing newline); checks gzip ended properly."""
        if self._gzip is not None:
            yield from self._split(self._gzip.flush())
            if not self._gzip.eof:
                raise BadBody("the gzip body ends before its end marker (truncated upload?)")
        if self._pending:
            self.lines += 1
            if self._pending.strip():
                yield self.lines, self._pending
            self._pending = b""

    def _decompress(self, chunk: bytes) -> Iterator[bytes]:
        if self._gzip is None:
            yield chunk
            return
        self._compressed += len(chunk)
        data = chunk
        while data:
            try:
                out = self._gzip.decompress(data, _OUT_CHUNK)
            except zlib.error as error:
                raise BadBody(f"the body is not valid gzip ({error})") from None
            data = self._gzip.unconsumed_tail
            if out:
                self._check_ratio(self.body_bytes + len(out), self._compressed - len(data))
                yield out
            if self._gzip.eof:
                rest = self._gzip.unused_data
                if rest.strip(b"\x00"):  # another gzip member follows
                    self._gzip = zlib.decompressobj(zlib.MAX_WBITS | 16)
                    data = rest + data
                else:
                    data = b""

    def _split(self, data: bytes) -> Iterator[tuple[int, bytes]]:
        if not data:
            return
        self.body_bytes += len(data)
        if self.body_bytes > self._limits.max_body_bytes:
            raise LimitExceeded(
                f"the body is over {self._limits.max_body_bytes:,} bytes (decompressed);"
                " send smaller batches"
            )
        self._hash.update(data)
        lines = (self._pending + data).split(b"\n")
        self._pending = lines.pop()
        limit = self._limits.max_line_bytes
        for line in lines:
            self.lines += 1
            if len(line) > limit:
                self._check_length(self.lines, line)
            if line.strip():
                yield self.lines, line
        self._check_length(self.lines + 1, self._pending)

    def _check_ratio(self, decompressed: int, compressed: int) -> None:
        ratio = self._limits.max_gzip_ratio
        if decompressed > _RATIO_FLOOR and decompressed > ratio * max(compressed, 1):
            raise LimitExceeded(
                f"the gzip body expands more than {ratio}:1 (a compression bomb?);"
                " send such data in smaller or uncompressed batches"
            )

    def _check_length(self, number: int, line: bytes) -> None:
        if len(line) > self._limits.max_line_bytes:
            raise LimitExceeded(
                f"line {number} is over {self._limits.max_line_bytes:,} bytes;"
                " one record per line, each under the limit"
            )


class NdjsonIngest:
    """One request's lines: validated, accepted ones written to a landing file."""

    def __init__(self, dataset: str, directory: Path, name: str, gzipped: bool, limits: Limits):
        self.dataset = dataset
        self.kind = DATASETS[dataset]
        self.reader = BodyReader(gzipped, limits)
        self.landing = LandingFile(directory, name)
        self.accepted = 0
        self.rejections: list[Rejection] = []

    @property
    def path(self) -> str:
        return str(self.landing.path)

    def feed(self, chunk: bytes) -> None:
        for number, line in self.reader.feed(chunk):
            self._take(number, line)

    def finish(self) -> None:
        for number, line in self.reader.finish():
            self._take(number, line)

    def _take(self, number: int, line: bytes) -> None:
        line = line.rstrip(b"\r")
        text = decode_line(line)
        if type(text) is not str:  # its dead letter keeps the bytes, as the reader's does
            self.rejections.append(Rejection(number, str(text), text.raw))
            return
        reason = self._why_not(text)
        if reason is None:
            self.landing.write(line + b"\n")
            self.accepted += 1
        else:
            self.rejections.append(Rejection(number, reason, text))

    def _why_not(self, text: str) -> Optional[str]:
        """None when the line is a record of this dataset; else the reason it is not (a
        review must also carry a plausible time: the stream windows by it)."""
        try:
            fields = decode(text)
            kind, generation = detect(fields)
            if kind == REVIEW == self.kind:
                review_event_time(fields, generation)
        except Exception as error:  # noqa: BLE001 - ParseError, CleanError, the odd decoder error
            return str(error) if isinstance(error, ValueError) else repr(error)
        if kind != self.kind:
            other = next(d for d, k in DATASETS.items() if k == kind)
            return (
                f"this is a {kind} record ({generation} format), not a {self.kind};"
                f" POST it to /v1/ingest/{other}"
            )
        return None

    def commit(self) -> Optional[str]:
        """Land the accepted lines (none: no file); returns the landed file's name."""
        if not self.accepted:
            self.landing.abort()
            return None
        self.landing.commit()
        return self.landing.name

    def abort(self) -> None:
        """Remove the temp file (a committed file stays)."""
        self.landing.abort()

    def answer(self, file: Optional[str], key: Optional[str]) -> dict[str, Any]:
        listed = self.rejections[:MAX_LISTED_REJECTIONS]
        return {
            "dataset": self.dataset,
            "file": file,
            "lines": self.accepted + len(self.rejections),
            "accepted": self.accepted,
            "rejected": len(self.rejections),
            "rejections": [{"line": r.line, "reason": r.reason} for r in listed],
            "rejections_truncated": len(listed) < len(self.rejections),
            "idempotency_key": key,
        }

    def dead_letters(self) -> list[DeadLetter]:
        return [
            DeadLetter(INGEST_PIPELINE, INGEST_STAGE, self.path, r.line, r.raw, r.reason)
            for r in self.rejections
        ]
