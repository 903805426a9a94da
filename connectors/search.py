"""Semantic search over the reviews: the nearest review embeddings (pgvector, cosine) to a
query's, with filters on the review, its product and its emotion.

Without filters the HNSW index answers; with filters it is asked for enough candidates
that the filters leave ``k`` (and an exact scan takes over when they would not), so a
filtered search never comes back short.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any, Optional, Sequence

import psycopg
from psycopg import sql

from connectors import datalake
from transforms.emotion_model import LABELS

MAX_QUERY_CHARS = 1000
MAX_K = 200
# HNSW candidates per wanted result when filters apply (pgvector 0.6 filters after the
# index scan): past this, an exact scan is cheaper than a wide index search.
_CANDIDATES_PER_RESULT = 20
_MAX_EF_SEARCH = 1000


class SearchError(ValueError):
    """A query the search cannot take; the message says what to change (400 / exit 2)."""


class SearchUnavailable(RuntimeError):
    """The datalake cannot search: no pgvector, or no embeddings yet (the message says)."""


@dataclasses.dataclass(frozen=True)
class Query:
    """What a search asks: the text, how many results, and filters (all optional)."""

    text: str
    k: int = 10
    category: Optional[str] = None
    asin: Optional[str] = None
    min_rating: Optional[float] = None
    max_rating: Optional[float] = None
    emotion: Optional[str] = None
    since: Optional[datetime.date] = None

    def checked(self) -> "Query":
        """The query, or a SearchError naming what is wrong with it."""
        text = (self.text or "").strip()
        if not text:
            raise SearchError("the query is empty: say what the reviews should be about")
        if len(text) > MAX_QUERY_CHARS:
            raise SearchError(
                f"the query is {len(text):,} characters long; at most {MAX_QUERY_CHARS:,}"
            )
        if not 1 <= self.k <= MAX_K:
            raise SearchError(f"k must be from 1 to {MAX_K}, not {self.k}")
        for name in ("min_rating", "max_rating"):
            value = getattr(self, name)
            if value is not None and not 1 <= value <= 5:
                raise SearchError(f"{name} must be from 1 to 5, not {value:g}")
        if self.emotion is not None and self.emotion not in LABELS:
            raise SearchError(
                f"unknown emotion {self.emotion!r}; choose one of: {', '.join(LABELS)}"
            )
        return dataclasses.replace(self, text=text)

    @property
    def filtered(self) -> bool:
        return any(getattr(self, name) is not None for name in _FILTERS)


@dataclasses.dataclass(frozen=True)
class Hit:
    """One review found: how similar, its rating, emotion, product and first line."""

    rank: int
    similarity: float
    review_id: str
    asin: str
    rating: float
    emotion: Optional[str]
    product: Optional[str]
    title: Optional[str]
    first_line: str
    reviewed_at: datetime.datetime


def vector_text(vector: Sequence[float]) -> str:
    """A vector as pgvector reads it: ``[0.1,0.2,...]``."""
    return "[" + ",".join(f"{float(v):.7g}" for v in vector) + "]"


def search(
    dsn: str,
    query: Query,
    vector: Sequence[float],
    embedding_model: str,
    emotion_model: str,
    exact: Optional[bool] = None,
) -> list[Hit]:
    """The ``query.k`` reviews nearest to ``vector`` that pass the query's filters.
    ``exact``: force (True) or forbid (False) the exact scan; default: decided here."""
    where, params = _filters(query)
    params.update(vector=vector_text(vector), model=embedding_model, emotion_model=emotion_model)
    statement = sql.SQL(
        "SELECT e.review_id, 1 - (e.embedding <=> %(vector)s::vector) AS similarity,"
        " r.asin, r.rating, m.label, p.title, r.title, r.text, r.reviewed_at"
        " FROM review_embeddings e JOIN reviews r USING (review_id)"
        " LEFT JOIN review_emotions m ON m.review_id = e.review_id"
        "  AND m.model = %(emotion_model)s"
        " LEFT JOIN products p ON p.asin = coalesce(r.parent_asin, r.asin)"
        " WHERE e.model = %(model)s{}"
        " ORDER BY e.embedding <=> %(vector)s::vector LIMIT %(k)s"
    ).format(sql.SQL("").join(sql.SQL(" AND ") + w for w in where))
    params["k"] = query.k
    with datalake.connect(dsn, autocommit=True) as conn:
        _check_searchable(conn, embedding_model)
        rows = _run(conn, statement, params, query, exact)
    return [
        Hit(
            rank,
            round(float(similarity), 4),
            review_id,
            asin,
            rating,
            label,
            product,
            title,
            _first_line(text),
            reviewed_at,
        )
        for rank, (
            review_id,
            similarity,
            asin,
            rating,
            label,
            product,
            title,
            text,
            reviewed_at,
        ) in (enumerate(rows, 1))
    ]


def _run(conn, statement, params: dict, query: Query, exact: Optional[bool]) -> list[tuple]:
    """Index first (wide enough for the filters), exact when the index comes back short."""
    ef_search = min(
        _MAX_EF_SEARCH, max(40, query.k * (_CANDIDATES_PER_RESULT if query.filtered else 2))
    )
    if exact is not True:
        with conn.transaction():
            conn.execute(sql.SQL("SET LOCAL hnsw.ef_search = {}").format(sql.Literal(ef_search)))
            rows = conn.execute(statement, params).fetchall()
        if len(rows) == query.k or exact is False or not query.filtered:
            return rows
    with conn.transaction():  # the filters leave fewer than k of the index's candidates
        conn.execute("SET LOCAL enable_indexscan = off")
        return conn.execute(statement, params).fetchall()


# Each filter of a Query: the condition it adds, with its value as the named parameter.
_FILTERS = {
    "asin": "(r.asin = %(asin)s OR r.parent_asin = %(asin)s)",
    "category": "(p.main_category ILIKE %(category)s"
    " OR EXISTS (SELECT 1 FROM unnest(p.categories) c WHERE c ILIKE %(category)s))",
    "min_rating": "r.rating >= %(min_rating)s",
    "max_rating": "r.rating <= %(max_rating)s",
    "emotion": "m.label = %(emotion)s",
    "since": "r.reviewed_at >= %(since)s",
}


def _filters(query: Query) -> tuple[list[sql.Composable], dict[str, Any]]:
    given = {name: getattr(query, name) for name in _FILTERS}
    given = {name: value for name, value in given.items() if value is not None}
    return [sql.SQL(_FILTERS[name]) for name in given], given


def _check_searchable(conn: psycopg.Connection, model: str) -> None:
    if not datalake.has_table(conn, "review_embeddings"):
        raise SearchUnavailable(
            "semantic search needs the pgvector extension in this Postgres (the embedded"
            " datalake and the compose image have it): install it, then run any command"
        )
    if conn.execute(
        "SELECT NOT EXISTS (SELECT 1 FROM review_embeddings WHERE model = %s)", (model,)
    ).fetchone()[0]:
        raise SearchUnavailable(
            "no review embeddings yet: `python -m pipelines run emotions` computes them"
            " (with the emotions, in the same pass)"
        )


def _first_line(text: Optional[str], limit: int = 160) -> str:
    line = next((part.strip() for part in (text or "").splitlines() if part.strip()), "")
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"
