"""The reviews an emotion model has not classified yet (or, for a model that embeds
them, not embedded yet: a datalake classified before embeddings existed is backfilled),
read from the datalake as a Beam source that streams: a run commits its results as it goes, holds only a page of reviews
per worker in memory, and a rerun continues with what is left.

The key space (``review_id`` is hexadecimal) is cut into ranges, one element each of a
``Create``; each range is read a page at a time (keyset pagination, short statements, no
transaction held while the model works), so every runner that runs ``Create`` and
``ParDo`` spreads the ranges over its workers.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Optional

import apache_beam as beam
import psycopg
from apache_beam.metrics import Metrics
from psycopg.rows import class_row

from connectors import datalake
from connectors.stopping import stop_requested
from transforms.records import METRICS_NAMESPACE, StoredReview

PAGE = 500
# Reviews with text and no emotions yet for the model: reviews without text never get an
# emotion row, so they would be read again by every run and could fill every --limit.
_UNCLASSIFIED = (
    "FROM reviews r WHERE r.text IS NOT NULL"
    " AND (NOT EXISTS (SELECT 1 FROM review_emotions e"
    " WHERE e.review_id = r.review_id AND e.model = %(model)s)"
)
_OR_UNEMBEDDED = (
    " OR NOT EXISTS (SELECT 1 FROM review_embeddings v"
    " WHERE v.review_id = r.review_id AND v.model = %(embedding_model)s)"
)


def _todo(embedding_model: Optional[str]) -> str:
    """FROM/WHERE of the reviews still to do: unclassified, or not embedded when the model
    embeds."""
    return _UNCLASSIFIED + (_OR_UNEMBEDDED if embedding_model else "") + ")"


class KeyRange(NamedTuple):
    """Review ids ``> after`` and ``<= last`` (None: unbounded)."""

    after: str
    last: Optional[str]


class Plan(NamedTuple):
    """What a run will classify: how many reviews, and the last key (with --limit)."""

    reviews: int
    last_key: Optional[str]


def plan(dsn: str, model: str, limit: Optional[int], embedding_model: Optional[str] = None) -> Plan:
    """Count the reviews still to do (the first ``limit`` in key order)."""
    with datalake.connect(dsn, autocommit=True) as conn:
        params = {"model": model, "limit": limit, "embedding_model": embedding_model}
        count, last = conn.execute(
            "SELECT count(*), max(review_id) FROM (SELECT r.review_id "
            + _todo(embedding_model)
            + " ORDER BY r.review_id LIMIT %(limit)s) AS todo",
            params,
        ).fetchone()
    return Plan(count, last if limit is not None else None)


def sample(dsn: str, model: str, n: int) -> list[StoredReview]:
    """The first ``n`` reviews still to classify (for a warm-up measurement)."""
    with datalake.connect(dsn, autocommit=True) as conn:
        with conn.cursor(row_factory=class_row(StoredReview)) as cursor:
            return cursor.execute(
                "SELECT r.review_id, r.title, r.text, r.source, r.line "
                + _todo(None)
                + " ORDER BY r.review_id LIMIT %(n)s",
                {"model": model, "n": n},
            ).fetchall()


def key_ranges(last_key: Optional[str] = None) -> list[KeyRange]:
    """The hexadecimal key space cut into 16 ranges, one per first digit, up to
    ``last_key``: enough to keep every worker of a machine or a small cluster busy."""
    digits = "0123456789abcdef"
    ranges = []
    for index, digit in enumerate(digits):
        after = digit if index else ""
        # A key's first digit is ``digit``: it sorts below ``digit + "g"`` (not a hex digit).
        last = None if digit == "f" else digit + "g"
        if last_key is not None:
            if after > last_key:
                break
            last = last_key if last is None else min(last, last_key)
        ranges.append(KeyRange(after, last))
    return ranges


class ReadRangeFn(beam.DoFn):
    """A key range -> its unclassified reviews, a page at a time, in key order."""

    def __init__(
        self,
        dsn: str,
        model: str,
        stop_file: Optional[str],
        embedding_model: Optional[str] = None,
        page: int = PAGE,
    ):
        self._dsn = dsn
        self._model = model
        self._stop_file = stop_file
        self._embedding_model = embedding_model
        self._page = page
        self._read = Metrics.counter(METRICS_NAMESPACE, "records_read")

    def setup(self):
        self._conn: Optional[psycopg.Connection] = None

    def teardown(self):
        if self._conn is not None:
            self._conn.close()

    def process(self, keys: KeyRange) -> Iterator[StoredReview]:
        after = keys.after
        while True:
            page = self._next_page(after, keys.last)
            for review in page:
                if stop_requested(self._stop_file):  # a stat per review: inference costs more
                    return
                self._read.inc()
                yield review
            if len(page) < self._page:
                return
            after = page[-1].review_id

    def _next_page(self, after: str, last: Optional[str]) -> list[StoredReview]:
        if self._conn is None or self._conn.closed:
            self._conn = datalake.open_connection(self._dsn, autocommit=True)
        with self._conn.cursor(row_factory=class_row(StoredReview)) as cursor:
            return cursor.execute(
                "SELECT r.review_id, r.title, r.text, r.source, r.line "
                + _todo(self._embedding_model)
                + " AND r.review_id > %(after)s"
                " AND (%(last)s::text IS NULL OR r.review_id <= %(last)s)"
                " ORDER BY r.review_id LIMIT %(page)s",
                {
                    "model": self._model,
                    "embedding_model": self._embedding_model,
                    "after": after,
                    "last": last,
                    "page": self._page,
                },
            ).fetchall()


class ReadUnclassified(beam.PTransform):
    """Reviews not yet classified by ``model`` (or not embedded by ``embedding_model``)
    up to ``last_key``, as ``StoredReview``."""

    def __init__(
        self,
        dsn: str,
        model: str,
        last_key: Optional[str] = None,
        stop_file: Optional[str] = None,
        embedding_model: Optional[str] = None,
    ):
        super().__init__()
        self._dsn = dsn
        self._model = model
        self._stop_file = stop_file
        self._embedding_model = embedding_model
        self._ranges = key_ranges(last_key)

    def expand(self, pbegin):
        return (
            pbegin
            | "KeyRanges" >> beam.Create(self._ranges)
            | "ReadPages"
            >> beam.ParDo(
                ReadRangeFn(self._dsn, self._model, self._stop_file, self._embedding_model)
            ).with_output_types(StoredReview)
        )
