"""Per-product, event-time windowed ``review_stats`` that appear while a stream runs.

One code path on every runner: every batch of reviews (or of their emotions) that
commits queues the (product, window) pairs it touched, in its own transaction; at most
every ``every_s`` seconds the stream refreshes the queued windows by recomputing them
from the datalake. A recompute, not an increment, so a replayed file, a restart or a
review sent twice never double-counts. A window's row is marked ``final`` once a
run's watermark has passed its end (and stays so); until then it is a partial result. A review later
than ``allowed lateness`` after its window closed is kept in ``reviews`` but no longer
changes the window's row.
"""

from __future__ import annotations

import datetime
import time
from typing import Any, Optional, Sequence

import psycopg

from connectors.sink import CommitHook
from transforms.records import EmotionResult, Review

# Beam's fixed windows start at multiples of their size since the epoch; so do these.
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)

_QUEUE_SQL = """
INSERT INTO review_stats_queue (asin, window_start, window_end)
SELECT DISTINCT r.asin, w.start, w.start + %(width)s
FROM reviews r
CROSS JOIN LATERAL (SELECT date_bin(%(width)s, r.reviewed_at, %(origin)s) AS start) w
LEFT JOIN pipeline_runs p ON p.run_id = %(run)s
WHERE r.review_id = ANY(%(ids)s)
  AND (p.watermark IS NULL OR w.start + %(width)s + %(lateness)s > p.watermark)
ON CONFLICT DO NOTHING
"""

_REFRESH_SQL = """
WITH keys AS (
    DELETE FROM review_stats_queue
    WHERE window_end - window_start = %(width)s
    RETURNING asin, window_start, window_end
), counted AS (
    SELECT k.asin, k.window_start, k.window_end, count(*) AS reviews,
           avg(r.rating) AS mean_rating
    FROM keys k
    JOIN reviews r ON r.asin = k.asin
        AND r.reviewed_at >= k.window_start AND r.reviewed_at < k.window_end
    GROUP BY 1, 2, 3
), labelled AS (
    SELECT asin, window_start, jsonb_object_agg(label, n ORDER BY label) AS emotions
    FROM (
        SELECT k.asin, k.window_start, e.label, count(*) AS n
        FROM keys k
        JOIN reviews r ON r.asin = k.asin
            AND r.reviewed_at >= k.window_start AND r.reviewed_at < k.window_end
        JOIN review_emotions e ON e.review_id = r.review_id AND e.model = %(model)s
        GROUP BY 1, 2, 3
    ) per_label
    GROUP BY 1, 2
)
INSERT INTO review_stats AS s
    (asin, window_start, window_end, reviews, mean_rating, emotions, final, updated_at)
SELECT c.asin, c.window_start, c.window_end, c.reviews, c.mean_rating, l.emotions,
       coalesce(c.window_end <= %(watermark)s, false), now()
FROM counted c LEFT JOIN labelled l USING (asin, window_start)
ON CONFLICT (asin, window_start, window_end) DO UPDATE
SET reviews = EXCLUDED.reviews, mean_rating = EXCLUDED.mean_rating,
    emotions = EXCLUDED.emotions, final = s.final OR EXCLUDED.final,
    updated_at = EXCLUDED.updated_at
WHERE (s.reviews, s.mean_rating, s.emotions, s.final)
      IS DISTINCT FROM (EXCLUDED.reviews, EXCLUDED.mean_rating, EXCLUDED.emotions,
                        s.final OR EXCLUDED.final)
"""

_FINALISE_SQL = """
UPDATE review_stats SET final = true, updated_at = now()
WHERE NOT final AND window_end <= %(watermark)s AND window_end - window_start = %(width)s
"""


class LiveReviewStats(CommitHook):
    """Queue the windows a committed batch of reviews or emotions touched; refresh queued
    windows (and mark passed ones final) at most every ``every_s`` seconds."""

    def __init__(self, run_id: str, model: str, window_s: float, lateness_s: float, every_s: float):
        self._run_id = run_id
        self._model = model
        self._width = datetime.timedelta(seconds=window_s)
        self._lateness = datetime.timedelta(seconds=lateness_s)
        self._every_s = every_s
        self._refreshed_at: Optional[float] = None

    def on_commit(self, conn: psycopg.Connection, records: Sequence[Any]) -> None:
        ids = [r.review_id for r in records if type(r) in (Review, EmotionResult)]
        if ids:
            conn.execute(
                _QUEUE_SQL,
                {
                    "ids": ids,
                    "width": self._width,
                    "origin": _EPOCH,
                    "lateness": self._lateness,
                    "run": self._run_id,
                },
            )

    def after_bundle(self, conn: psycopg.Connection) -> None:
        now = time.monotonic()
        if self._refreshed_at is not None and now - self._refreshed_at < self._every_s:
            return
        self._refreshed_at = now
        refresh(conn, self._run_id, self._model, self._width)


def refresh(conn: psycopg.Connection, run_id: str, model: str, width: datetime.timedelta) -> None:
    """Recompute every queued window of this width and mark windows the run's watermark
    has passed as final, in the caller's transaction."""
    (watermark,) = conn.execute(
        "SELECT watermark FROM pipeline_runs WHERE run_id = %s", (run_id,)
    ).fetchone() or (None,)
    params = {"width": width, "model": model, "watermark": watermark}
    conn.execute(_REFRESH_SQL, params)
    if watermark is not None:
        conn.execute(_FINALISE_SQL, params)


def newest_window(conn: psycopg.Connection) -> Optional[dict[str, Any]]:
    """The newest window with stats: its bounds, products, reviews, whether final."""
    row = conn.execute(
        "SELECT window_start, window_end, count(*), sum(reviews), bool_and(final),"
        " max(updated_at) FROM review_stats"
        " WHERE window_start = (SELECT max(window_start) FROM review_stats)"
        " GROUP BY 1, 2 ORDER BY 2 LIMIT 1"
    ).fetchone()
    if row is None:
        return None
    start, end, products, reviews, final, updated = row
    return {
        "window_start": start.isoformat(),
        "window_end": end.isoformat(),
        "products": products,
        "reviews": int(reviews),
        "final": final,
        "updated_at": updated.isoformat(),
    }
