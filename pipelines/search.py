"""``python -m pipelines search "QUERY"``: the reviews nearest in meaning to a query.

The query is embedded offline by the model that embedded the reviews (the default emotion
model's encoder, loaded once per process), then ``connectors.search`` finds the nearest
stored embeddings that pass the filters. The REST service's ``GET /v1/search`` and the
emotions notebook call ``find`` too, so all three answer alike.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import shutil
import threading
from typing import Optional, Sequence

from connectors import datalake
from connectors.search import MAX_K, Hit, Query, SearchError, SearchUnavailable, search
from pipelines.options import UsageError
from transforms.emotion_model import DEFAULT_MODEL, EMBEDDING_MODEL, LABELS

__all__ = ["Hit", "Query", "SearchError", "SearchUnavailable", "find", "embed_query"]

_LOADING = threading.Lock()


@functools.lru_cache(maxsize=1)
def _encoder():
    from transforms.emotion import LoadedEmotionModel

    return LoadedEmotionModel(DEFAULT_MODEL)


def embed_query(text: str) -> Sequence[float]:
    """The query's sentence embedding, by the model that embedded the reviews."""
    with _LOADING:  # one load per process, even when the first queries come together
        encoder = _encoder()
    return encoder.embed([text])[0]


def find(query: Query, dsn: Optional[str] = None, exact: Optional[bool] = None) -> list[Hit]:
    """The reviews nearest to ``query`` that pass its filters (SearchError: a query it
    cannot take; SearchUnavailable: a datalake without embeddings)."""
    query = query.checked()
    return search(
        datalake.resolve_dsn(dsn),
        query,
        embed_query(query.text),
        EMBEDDING_MODEL,
        DEFAULT_MODEL,
        exact=exact,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's flags (hyphens or underscores alike)."""
    parser.add_argument("query", help='what the reviews should say, e.g. "battery dies fast"')
    parser.add_argument(
        "--k", type=int, default=10, help=f"how many reviews (1-{MAX_K}, default 10)"
    )
    parser.add_argument("--category", help="only products in this category (case-insensitive)")
    parser.add_argument("--asin", help="only reviews of this product (asin or parent asin)")
    for bound in ("min", "max"):
        parser.add_argument(
            f"--{bound}-rating",
            f"--{bound}_rating",
            dest=f"{bound}_rating",
            type=float,
            help=f"only reviews rated at {'least' if bound == 'min' else 'most'} this (1-5)",
        )
    parser.add_argument("--emotion", help=f"only reviews felt as one of: {', '.join(LABELS)}")
    parser.add_argument("--since", help="only reviews written on or after this date (YYYY-MM-DD)")
    parser.add_argument("--json", action="store_true", help="one JSON object per review")
    parser.add_argument("--dsn", default=None, help="default $TERMIDATOR_DSN, else embedded")


def main(args: argparse.Namespace) -> int:
    """Print the reviews found, best first; a query it cannot take is exit 2."""
    try:
        since = datetime.date.fromisoformat(args.since) if args.since else None
    except ValueError:
        raise UsageError(f"--since {args.since!r} is not a date: use YYYY-MM-DD") from None
    query = Query(
        args.query,
        args.k,
        args.category,
        args.asin,
        args.min_rating,
        args.max_rating,
        args.emotion,
        since,
    )
    try:
        hits = find(query, args.dsn)
    except SearchError as error:
        raise UsageError(str(error)) from None
    except SearchUnavailable as error:
        print(f"error: {error}", flush=True)
        return 1
    if args.json:
        for hit in hits:
            print(json.dumps(hit_json(hit), ensure_ascii=False))
        return 0
    print(table(hits) if hits else "no review matches these filters")
    return 0


def hit_json(hit: Hit) -> dict:
    """A hit as JSON-ready values (the REST service answers these)."""
    return {**hit.__dict__, "reviewed_at": hit.reviewed_at.isoformat()}


def table(hits: Sequence[Hit], width: Optional[int] = None) -> str:
    """Rank, similarity, rating, emotion, product title and first line, one review a row,
    cut to the terminal's width."""
    width = width or shutil.get_terminal_size((120, 24)).columns
    rows = [
        (
            str(h.rank),
            f"{h.similarity:.2f}",
            f"{h.rating:g}",
            h.emotion or "-",
            h.product or h.asin,
            h.first_line or h.title or "",
        )
        for h in hits
    ]
    header = ("#", "sim", "rating", "emotion", "product", "review")
    fixed = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
    product = min(32, max(len(r[4]) for r in rows + [header]))
    review = max(20, width - sum(fixed) - product - 2 * 5)

    def line(cells) -> str:
        cut = [_cut(c, w) for c, w in zip(cells, fixed + [product, review])]
        return "  ".join(
            c.rjust(w) if i < 3 else c.ljust(w)
            for i, (c, w) in enumerate(zip(cut, fixed + [product, review]))
        ).rstrip()

    return "\n".join([line(header)] + [line(r) for r in rows])


def _cut(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
