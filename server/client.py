"""``python -m pipelines stream FILE``: send a dataset file to the REST service in batches.

Any dataset file (``.json``/``.jsonl``, gzipped or not, read with the pipelines' own
``iter_lines``) goes out in gzip NDJSON batches, each with an idempotency key derived
from the batch's records, so a retry, or sending the same records again (after a
failure, from a copy of the file), lands nothing twice — and the summary says which
records were new and which the service had already taken. Failures are retried with
exponential backoff; progress shows bytes of the file sent, the rate and the ETA.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gzip
import hashlib
import os
import random
import time
import uuid
from typing import Any, Callable, Iterator, Optional, Sequence

import httpx

from connectors.files import TruncatedFileError, iter_lines
from pipelines.interrupts import EXIT_INTERRUPTED
from pipelines.progress import Measure, Reporter

DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV = "TERMIDATOR_API_URL"
TOKEN_ENV = "TERMIDATOR_API_TOKEN"
RETRY_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
SHOWN_REJECTIONS = 20


class SendError(RuntimeError):
    """A batch the service refused, or that could not be sent after every retry."""


@dataclasses.dataclass
class SendResult:
    """What was sent and what the service said about it."""

    path: str
    dataset: str
    sent: int = 0
    accepted: int = 0
    rejected: int = 0
    # Of the accepted: records the service had already taken under the same idempotency
    # key (an earlier send of the same batches): answered again, landed nothing new.
    already: int = 0
    batches: int = 0
    retries: int = 0
    elapsed_s: float = 0.0
    rejections: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    files: list[str] = dataclasses.field(default_factory=list)
    truncated: Optional[str] = None
    error: Optional[str] = None
    interrupted: bool = False

    @property
    def complete(self) -> bool:
        return self.error is None and self.accepted + self.rejected == self.sent

    def format(self) -> str:
        rate = self.sent / self.elapsed_s if self.elapsed_s > 0 else 0.0
        lines = [
            f"sent {self.sent:,} records from {self.path} in {self.batches:,} batches"
            f" ({self.elapsed_s:.1f} s, {rate:,.0f} records/s, {self.retries} retries)",
            f"  landed    {self.accepted - self.already:>10,}   new, for the stream pipeline"
            f" ({self.dataset})",
            f"  already   {self.already:>10,}   taken before under the same keys: nothing new",
            f"  rejected  {self.rejected:>10,}   kept as dead letters (stage ingest)",
        ]
        for line, reason in self.rejections[:SHOWN_REJECTIONS]:
            lines.append(f"    line {line}: {reason}")
        if len(self.rejections) > SHOWN_REJECTIONS:
            lines.append(f"    ... and {len(self.rejections) - SHOWN_REJECTIONS:,} more")
        if self.truncated:
            lines.append(f"  note: {self.truncated}")
        if self.error:
            lines.append(f"  error: {self.error}")
            lines.append("  run the same command again: sent batches are not landed twice")
        if self.interrupted:
            lines.append(
                f"interrupted after {self.sent:,} records (every batch sent is landed);"
                " run the same command again to send the rest"
            )
        return "\n".join(lines)


def batches(
    path: str, size: int, result: SendResult, position: Optional[Callable[[int], None]] = None
) -> Iterator[tuple[list[bytes], list[int]]]:
    """(lines, their line numbers in the file), ``size`` non-blank lines at a time.

    A truncated gzip file yields its complete lines and then the cut-off one, which the
    service rejects (so it is kept as a dead letter, not lost).
    """
    lines: list[bytes] = []
    numbers: list[int] = []
    try:
        for number, line in iter_lines(path, position):
            if not line.strip():
                continue
            lines.append(line)
            numbers.append(number)
            if len(lines) >= size:
                yield lines, numbers
                lines, numbers = [], []
    except TruncatedFileError as error:
        partial = getattr(error, "partial", b"")
        result.truncated = f"{path}: {error}"
        if partial.strip():
            lines.append(partial)
            numbers.append(getattr(error, "line", 0))
    if lines:
        yield lines, numbers


def _post(
    client: httpx.Client,
    dataset: str,
    body: bytes,
    key: str,
    retries: int,
    result: SendResult,
) -> tuple[dict[str, Any], bool]:
    """POST one batch, retrying transient failures with exponential backoff and jitter;
    returns the service's answer and whether it was a replay (the key was taken)."""
    headers = {
        "Content-Type": "application/x-ndjson",
        "Content-Encoding": "gzip",
        "Idempotency-Key": key,
    }
    problem = ""
    for attempt in range(retries + 1):
        delay = min(30.0, 0.5 * 2**attempt) * random.uniform(0.5, 1.0)
        try:
            response = client.post(f"/v1/ingest/{dataset}", content=body, headers=headers)
        except httpx.TransportError as error:
            problem = f"{type(error).__name__}: {error}"
        else:
            if response.status_code < 300:
                replayed = response.headers.get("idempotent-replayed", "") == "true"
                return response.json(), replayed
            problem = f"HTTP {response.status_code}: {_message(response)}"
            if response.status_code not in RETRY_STATUSES:
                raise SendError(problem)
            retry_after = response.headers.get("retry-after", "")
            if retry_after.isdigit():
                delay = max(delay, float(retry_after))
        if attempt < retries:
            result.retries += 1
            time.sleep(delay)
    raise SendError(f"gave up after {retries + 1} attempts ({problem})")


def _message(response: httpx.Response) -> str:
    try:
        return response.json()["error"]["message"]
    except Exception:  # noqa: BLE001 - not our JSON error: show the start of the body
        return response.text[:200]


def batch_key(dataset: str, lines: Sequence[bytes], fresh: str = "") -> str:
    """The idempotency key of a batch, from what it holds: the same records sent again
    (the same file, copied or renamed) are recognised, whatever the path or --batch."""
    digest = hashlib.sha256(f"{dataset}\x1f{fresh}\x1f".encode())
    for line in lines:
        digest.update(line)
        digest.update(b"\n")
    return digest.hexdigest()[:40]


def send_file(
    path: str,
    dataset: str,
    url: str = DEFAULT_URL,
    batch: int = 1000,
    rate: Optional[float] = None,
    retries: int = 8,
    token: Optional[str] = None,
    fresh: bool = False,
    timeout: float = 120.0,
    progress: bool = False,
) -> SendResult:
    """Send every record of ``path`` to ``POST /v1/ingest/{dataset}``; the service's tally.
    Ctrl-C stops between batches: what was sent is landed, and said."""
    salt = uuid.uuid4().hex if fresh else ""
    result = SendResult(path, dataset)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    read = {"bytes": 0}
    started = time.monotonic()
    measure = Measure(
        os.path.basename(path),
        done=("bytes",),
        total=os.path.getsize(path),
        unit="B",
        shown={"records": "records sent"},
    )
    reporter = Reporter(measure, lambda: {**read, "records": result.sent}, every_s=5.0)
    try:
        with (
            httpx.Client(base_url=url, headers=headers, timeout=timeout) as client,
            reporter.running() if progress else contextlib.nullcontext(),
        ):
            for lines, numbers in batches(path, batch, result, lambda at: read.update(bytes=at)):
                if rate:
                    wait = started + result.sent / rate - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                body = gzip.compress(b"\n".join(lines) + b"\n", compresslevel=1)
                key = batch_key(dataset, lines, salt)
                answer, replayed = _post(client, dataset, body, key, retries, result)
                result.batches += 1
                result.sent += len(lines)
                result.accepted += answer["accepted"]
                result.already += answer["accepted"] if replayed else 0
                result.rejected += answer["rejected"]
                if answer.get("file"):
                    result.files.append(answer["file"])
                result.rejections += [
                    (numbers[r["line"] - 1], r["reason"]) for r in answer["rejections"]
                ]
    except SendError as error:
        result.error = str(error)
    except KeyboardInterrupt:
        result.interrupted = True
    finally:
        result.elapsed_s = time.monotonic() - started
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``python -m pipelines stream``."""
    parser.add_argument("file", help="dataset file (.json/.jsonl, gzipped or not)")
    parser.add_argument(
        "--dataset",
        choices=["reviews", "products"],
        default=None,
        help="reviews or products (default: products for meta_* files, else reviews)",
    )
    parser.add_argument(
        "--url", default=None, help=f"the service (default ${URL_ENV}, else {DEFAULT_URL})"
    )
    parser.add_argument("--batch", type=int, default=1000, help="records per request")
    parser.add_argument("--rate", type=float, default=None, help="records per second at most")
    parser.add_argument("--retries", type=int, default=8, help="retries per batch")
    parser.add_argument(
        "--fresh", action="store_true", help="new idempotency keys: send the file again"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress while sending")


def main(args: argparse.Namespace) -> int:
    """Send the file; exit 0 when every record was answered, 1 when sending failed."""
    from pipelines.options import UsageError

    if not os.path.isfile(args.file):
        raise UsageError(f"no file at {args.file!r}: check the path")
    if args.batch < 1 or (args.rate is not None and args.rate <= 0):
        raise UsageError("--batch and --rate must be positive")
    dataset = args.dataset or (
        "products" if os.path.basename(args.file).startswith("meta_") else "reviews"
    )
    result = send_file(
        args.file,
        dataset,
        url=args.url or os.environ.get(URL_ENV) or DEFAULT_URL,
        batch=args.batch,
        rate=args.rate,
        retries=args.retries,
        token=os.environ.get(TOKEN_ENV) or None,
        fresh=args.fresh,
        progress=not args.quiet,
    )
    print(result.format())
    if result.interrupted:
        return EXIT_INTERRUPTED
    return 0 if result.complete else 1
