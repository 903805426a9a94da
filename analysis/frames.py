"""Datalake analysis for the notebooks and the report: pandas frames from SQL aggregates.

The notebooks hold no logic of their own: they call this module (and ``plots``), which reads the lake
through the CLI's DSN resolution (``TERMIDATOR_DSN``, else the embedded datalake) and
aggregates in SQL, so the same cells work on the samples and on tens of millions of rows.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import pandas as pd
from psycopg import sql

from connectors import datalake
from transforms.emotion_model import DEFAULT_MODEL, LABELS

EMOTIONS_TABLE = "review_emotions"
PERIODS = ("day", "week", "month", "quarter", "year")
# Reviews join their product by parent asin (2023) or asin (2014, 2018).
_PRODUCT_JOIN = "LEFT JOIN products p ON p.asin = COALESCE(r.parent_asin, r.asin)"


class NoEmotionsError(LookupError):
    """The lake holds no emotions (for a model); the message names the command to run."""


# --- the datalake --------------------------------------------------------------------


class Datalake:
    """Read-only queries against the datalake; each returns a pandas DataFrame."""

    def __init__(self, dsn: Optional[str] = None):
        self.dsn = datalake.resolve_dsn(dsn)

    def __repr__(self) -> str:
        return f"Datalake({datalake.redact(self.dsn)})"

    def query(self, statement: Union[str, sql.Composable], params: Any = None) -> pd.DataFrame:
        """Rows of one query as a DataFrame, with the query's column names."""
        with datalake.connect(self.dsn) as conn, conn.cursor() as cur:
            cur.execute(statement, params)
            columns = [column.name for column in cur.description or ()]
            return pd.DataFrame(cur.fetchall(), columns=columns)

    def has_table(self, table: str) -> bool:
        """Whether the table exists (``review_emotions`` comes with the emotions step)."""
        found = self.query("SELECT to_regclass(%s) IS NOT NULL AS found", (table,))
        return bool(found.at[0, "found"])

    # --- what is in the lake ---------------------------------------------------------

    def table_counts(self) -> pd.Series:
        """Rows per datalake table (those this lake's migrations have created)."""
        found = self.query(
            "SELECT t FROM unnest(%s::text[]) AS t WHERE to_regclass(t) IS NOT NULL",
            (list(datalake.DATALAKE_TABLES),),
        )
        counts = datalake.table_counts(self.dsn, found["t"].tolist())
        return pd.Series(counts, name="rows").rename_axis("table")

    def rows_by_generation(self) -> pd.DataFrame:
        """Reviews and products per source generation (2014 / 2018 / 2023)."""
        frame = self.query(
            "SELECT source_format AS generation, 'reviews' AS table_name, count(*) AS n"
            " FROM reviews GROUP BY 1"
            " UNION ALL SELECT source_format, 'products', count(*) FROM products GROUP BY 1"
        )
        table = _pivot(frame, "generation", "table_name", "n")
        return table.reindex(columns=["reviews", "products"], fill_value=0)

    def pipeline_runs(self, limit: int = 20) -> pd.DataFrame:
        """The latest runs: pipeline, runner, state, duration, the main counters and speed
        (a run whose process died is marked ABANDONED first).

        ``records`` counts as the run's own summary does (lines read, or rows and dead
        letters where the runner reported no metrics); ``records_per_s`` is that over
        ``seconds``, empty while a run has no end or no counters.
        """
        with datalake.connect(self.dsn, autocommit=True) as conn:
            datalake.mark_abandoned(conn)
        return self.query(
            "WITH latest AS (SELECT pipeline, runner, state, started_at, run_id::text,"
            " extract(epoch FROM finished_at - started_at)::float8 AS seconds,"
            " (counters->>'records_read')::bigint AS records_read,"
            " (counters->>'read_dead_letters')::bigint AS read_dead_letters,"
            " (counters->>'dead_letters_upserted')::bigint AS dead_letters,"
            " (SELECT sum(value::bigint) FROM jsonb_each_text(counters) WHERE"
            "  right(key, 9) = '_upserted' AND key <> 'dead_letters_upserted')::bigint AS rows"
            " FROM pipeline_runs ORDER BY started_at DESC LIMIT %s)"
            " SELECT pipeline, runner, state, started_at, seconds, records_read, dead_letters,"
            " rows, records, records / nullif(seconds, 0) AS records_per_s, run_id"
            " FROM latest, LATERAL (SELECT coalesce(records_read + coalesce(read_dead_letters, 0),"
            " rows + coalesce(dead_letters, 0)) AS records) counted ORDER BY started_at DESC",
            (limit,),
        )

    def dead_letters(self, limit: int = 1000) -> pd.DataFrame:
        """The latest dead letters: where each came from and why it was refused."""
        return self.query(
            "SELECT pipeline, stage, source, line, error, raw, at FROM dead_letters"
            " ORDER BY at DESC, id DESC LIMIT %s",
            (limit,),
        )

    def dead_letter_counts(self) -> pd.DataFrame:
        """Dead letters by pipeline, stage and reason (see ``reason``)."""
        frame = self.query(
            "SELECT pipeline, stage, error, count(*) AS n FROM dead_letters GROUP BY 1, 2, 3"
        )
        return count_reasons(frame, weight="n")

    # --- reviews and products --------------------------------------------------------

    def rating_distribution(self) -> pd.DataFrame:
        """Reviews per star rating (rows) and generation (columns)."""
        frame = self.query(
            "SELECT rating, source_format AS generation, count(*) AS n FROM reviews GROUP BY 1, 2"
        )
        return _pivot(frame, "rating", "generation", "n")

    def reviews_over_time(self, period: str = "month") -> pd.DataFrame:
        """Reviews per period (``month``, ``quarter``, ``year``...) and generation."""
        return self._reviews_per_period(period, "source_format", "generation")

    def ratings_over_time(self, period: str = "year") -> pd.DataFrame:
        """Reviews per period (rows) and star rating (columns)."""
        return self._reviews_per_period(period, "rating", "rating")

    def ratings_by_category(self, n: int = 8) -> pd.DataFrame:
        """Reviews per main category (the ``n`` with most reviews) and star rating."""
        frame = self.query(
            "SELECT COALESCE(p.main_category, '(unknown)') AS category, r.rating, count(*) AS n"
            f" FROM reviews r {_PRODUCT_JOIN} GROUP BY 1, 2"
        )
        return _largest_rows(_pivot(frame, "category", "rating", "n"), n)

    def top_categories(self, n: int = 10) -> pd.DataFrame:
        """Main categories with the most reviews: reviews, products, mean rating."""
        return self.query(
            "SELECT COALESCE(p.main_category, '(unknown)') AS category,"
            " count(*) AS reviews, count(DISTINCT p.asin) AS products,"
            " round(avg(r.rating)::numeric, 2)::float8 AS mean_rating"
            f" FROM reviews r {_PRODUCT_JOIN}"
            " GROUP BY 1 ORDER BY reviews DESC, category LIMIT %s",
            (n,),
        )

    def top_brands(self, n: int = 10) -> pd.DataFrame:
        """Brands (2023: stores) with the most reviews: reviews, products, mean rating."""
        return self.query(
            "SELECT p.brand, count(*) AS reviews, count(DISTINCT p.asin) AS products,"
            " round(avg(r.rating)::numeric, 2)::float8 AS mean_rating"
            f" FROM reviews r {_PRODUCT_JOIN} WHERE p.brand IS NOT NULL"
            " GROUP BY 1 ORDER BY reviews DESC, p.brand LIMIT %s",
            (n,),
        )

    def price_vs_rating(self) -> pd.DataFrame:
        """Per priced product: its price, its reviews' mean rating and how many there are."""
        return self.query(
            "SELECT p.asin, p.title, p.price::float8 AS price,"
            " avg(r.rating)::float8 AS mean_rating, count(*) AS reviews"
            " FROM products p JOIN reviews r ON p.asin = COALESCE(r.parent_asin, r.asin)"
            " WHERE p.price IS NOT NULL GROUP BY p.asin ORDER BY p.asin"
        )

    def helpfulness(self) -> pd.DataFrame:
        """Helpful votes per star rating: reviews, share with any vote, mean and max votes."""
        return self.query(
            "SELECT rating, count(*) AS reviews,"
            " avg((COALESCE(helpful_votes, 0) > 0)::int)::float8 AS share_voted,"
            " avg(helpful_votes)::float8 AS mean_helpful_votes,"
            " max(helpful_votes) AS max_helpful_votes,"
            " (sum(helpful_votes) FILTER (WHERE total_votes > 0))::float8"
            " / NULLIF(sum(total_votes) FILTER (WHERE total_votes > 0), 0) AS helpful_ratio_2014"
            " FROM reviews GROUP BY rating ORDER BY rating"
        )

    def helpful_votes(self) -> pd.Series:
        """Helpful votes of every review that has any (for a histogram)."""
        frame = self.query("SELECT helpful_votes FROM reviews WHERE helpful_votes > 0")
        return frame["helpful_votes"].astype(int)

    def review_lengths(self) -> pd.DataFrame:
        """Length in characters of every review text, with its rating and generation."""
        return self.query(
            "SELECT rating, source_format AS generation, length(text) AS characters"
            " FROM reviews WHERE text IS NOT NULL"
        )

    def rows_from_source(self, file_name: str) -> int:
        """Reviews the lake holds from a dataset file, matched by its file name."""
        frame = self.query(
            "SELECT count(*) AS n FROM reviews WHERE source = %s OR source LIKE %s",
            (file_name, "%/" + file_name),
        )
        return int(frame.at[0, "n"])

    def _reviews_per_period(self, period: str, column: str, name: str) -> pd.DataFrame:
        """Reviews per period (rows, every one from first to last) and ``column`` value."""
        frame = self.query(
            sql.SQL(
                "SELECT date_trunc({}, reviewed_at AT TIME ZONE 'UTC') AS period,"
                " {} AS {}, count(*) AS n FROM reviews GROUP BY 1, 2"
            ).format(sql.Literal(_period(period)), sql.Identifier(column), sql.Identifier(name))
        )
        return _continuous(_pivot(frame, "period", name, "n"), period)

    # --- emotions --------------------------------------------------------------------

    def emotion_models(self) -> pd.DataFrame:
        """The emotion models in the lake: reviews classified, when."""
        if not self.has_table(EMOTIONS_TABLE):
            return pd.DataFrame(columns=["model", "reviews", "first", "last"])
        return self.query(
            "SELECT model, count(*) AS reviews, min(classified_at) AS first,"
            " max(classified_at) AS last FROM review_emotions GROUP BY model ORDER BY 2 DESC"
        )

    def emotion_model(self, preferred: Optional[str] = None) -> str:
        """The model to analyse: ``preferred`` (default: the pipeline's default model) if
        the lake has it, else the one that classified most reviews."""
        preferred = preferred or emotion_constants()[0]
        models = self.emotion_models()
        if models.empty:
            raise NoEmotionsError(
                "the datalake holds no emotions yet: run `python -m pipelines run` "
                "(or `python -m pipelines run emotions`) first"
            )
        if preferred in set(models["model"]):
            return preferred
        return str(models.at[0, "model"])

    def emotion_distribution(self, model: str) -> pd.Series:
        """Reviews per top emotion label, every label present (zero where none)."""
        frame = self.query(
            "SELECT label, count(*) AS n FROM review_emotions WHERE model = %s GROUP BY label",
            (model,),
        )
        counts = frame.set_index("label")["n"].astype(int)
        return counts.reindex(_labels(counts.index), fill_value=0).rename("reviews")

    def emotion_by_rating(self, model: str) -> pd.DataFrame:
        """Reviews per star rating (rows) and top emotion (columns)."""
        frame = self.query(
            "SELECT r.rating, e.label, count(*) AS n FROM review_emotions e"
            " JOIN reviews r USING (review_id) WHERE e.model = %s GROUP BY 1, 2",
            (model,),
        )
        table = _pivot(frame, "rating", "label", "n")
        return table.reindex(columns=_labels(table.columns), fill_value=0)

    def emotions_over_time(self, model: str, period: str = "year") -> pd.DataFrame:
        """Reviews per review period (rows) and top emotion (columns)."""
        frame = self.query(
            sql.SQL(
                "SELECT date_trunc({}, r.reviewed_at AT TIME ZONE 'UTC') AS period, e.label,"
                " count(*) AS n FROM review_emotions e JOIN reviews r USING (review_id)"
                " WHERE e.model = %s GROUP BY 1, 2"
            ).format(sql.Literal(_period(period))),
            (model,),
        )
        table = _continuous(_pivot(frame, "period", "label", "n"), period)
        return table.reindex(columns=_labels(table.columns), fill_value=0)

    def emotion_by_category(self, model: str, n: int = 8) -> pd.DataFrame:
        """Reviews per main category (the ``n`` with most emotions) and top emotion."""
        frame = self.query(
            "SELECT COALESCE(p.main_category, '(unknown)') AS category, e.label, count(*) AS n"
            f" FROM review_emotions e JOIN reviews r USING (review_id) {_PRODUCT_JOIN}"
            " WHERE e.model = %s GROUP BY 1, 2",
            (model,),
        )
        table = _pivot(frame, "category", "label", "n")
        return _largest_rows(table.reindex(columns=_labels(table.columns), fill_value=0), n)

    def emotion_confidence(self, model: str, bins: int = 10) -> pd.DataFrame:
        """Reviews per top-label score bin (rows: the bin's lower edge) and top emotion."""
        frame = self.query(
            "SELECT least(width_bucket(score, 0, 1, %s), %s) AS bin, label, count(*) AS n"
            " FROM review_emotions WHERE model = %s GROUP BY 1, 2",
            (bins, bins, model),
        )
        table = _pivot(frame, "bin", "label", "n")
        table = table.reindex(index=range(1, bins + 1), columns=_labels(table.columns))
        table = table.fillna(0).astype(int)
        table.index = pd.Index([round((b - 1) / bins, 3) for b in table.index], name="score")
        return table

    def emotion_examples(self, model: str, per_label: int = 2) -> pd.DataFrame:
        """The most confident reviews of each emotion: text, rating and every label's score."""
        frame = self.query(
            "SELECT label, score, rating, title, text, scores FROM ("
            " SELECT e.label, e.score, e.scores, r.rating, r.title, r.text,"
            " row_number() OVER (PARTITION BY e.label ORDER BY e.score DESC, e.review_id) AS k"
            " FROM review_emotions e JOIN reviews r USING (review_id) WHERE e.model = %s"
            ") ranked WHERE k <= %s ORDER BY label, score DESC",
            (model, per_label),
        )
        return expand_scores(frame)


# --- pure helpers (also used on Interactive Beam results) ------------------------------

_REASON_CUTS = re.compile(r" \(|: |; |, got ")
_FORMAT_PREFIX = re.compile(r"^\d{4} (?:review|product): ")


def reason(error: str) -> str:
    """The general reason of a dead letter's error, without its specifics.

    ``"2014 review: rating must be a number from 1 to 5, got None"`` ->
    ``"rating must be a number from 1 to 5"``, so that errors group into a few reasons.
    """
    text = _FORMAT_PREFIX.sub("", (error or "").strip())
    return _REASON_CUTS.split(text, maxsplit=1)[0].strip() or "(no message)"


def count_reasons(dead_letters: pd.DataFrame, weight: Optional[str] = None) -> pd.DataFrame:
    """Dead letters (``pipeline``, ``stage``, ``error`` columns) counted by stage and reason."""
    if dead_letters.empty:
        return pd.DataFrame(columns=["pipeline", "stage", "reason", "dead_letters"])
    frame = dead_letters.assign(
        reason=dead_letters["error"].map(reason),
        dead_letters=dead_letters[weight] if weight else 1,
    )
    counted = frame.groupby(["pipeline", "stage", "reason"], as_index=False)["dead_letters"].sum()
    return counted.sort_values(["dead_letters", "stage"], ascending=[False, True]).reset_index(
        drop=True
    )


def reason_examples(dead_letters: pd.DataFrame, per_reason: int = 1) -> pd.DataFrame:
    """The first ``per_reason`` dead letters of each pipeline, stage and reason (e.g. of the
    latest, from ``Datalake.dead_letters``), with their ``reason``: one example per kind."""
    frame = dead_letters.assign(reason=dead_letters["error"].map(reason))
    kinds = frame.groupby(["pipeline", "stage", "reason"], sort=False)
    return kinds.head(per_reason).reset_index(drop=True)


def to_datetimes(values: Iterable[Any]) -> pd.Series:
    """Beam ``Timestamp`` values (as ``ib.collect`` returns them) -> UTC pandas datetimes."""
    micros = [None if v is None else getattr(v, "micros", v) for v in values]
    return pd.to_datetime(pd.Series(micros, dtype="Int64"), unit="us", utc=True)


def expand_scores(frame: pd.DataFrame, column: str = "scores") -> pd.DataFrame:
    """Replace a column of {label: score} dicts by one score column per emotion label."""
    scores = pd.DataFrame(list(frame[column]), index=frame.index)
    scores = scores.reindex(columns=_labels(scores.columns), fill_value=0.0).astype(float)
    return pd.concat([frame.drop(columns=[column]), scores.add_prefix("p_")], axis=1)


def shares(table: pd.DataFrame) -> pd.DataFrame:
    """Each row of a count table as fractions of its total (empty rows stay zero)."""
    totals = table.sum(axis=1).replace(0, 1)
    return table.div(totals, axis=0)


def sample_file(name: str) -> str:
    """Path of a bundled sample file by name, e.g. ``"All_Beauty_5.json.gz"``."""
    from samples import sample_files

    for files in sample_files().values():
        for path in files:
            if Path(path).name == name:
                return path
    raise FileNotFoundError(f"no bundled sample named {name!r}")


def emotion_constants() -> tuple[str, tuple[str, ...]]:
    """The emotion pipeline's default model and labels."""
    return DEFAULT_MODEL, tuple(LABELS)


def _labels(present: Iterable[str]) -> list[str]:
    """The emotion labels in their canonical order, then any others a model adds."""
    labels = emotion_constants()[1]
    present = [str(label) for label in present]
    return list(labels) + sorted(set(present) - set(labels))


def _pivot(frame: pd.DataFrame, index: str, columns: str, values: str) -> pd.DataFrame:
    if frame.empty:
        return pd.DataFrame(index=pd.Index([], name=index))
    table = frame.pivot_table(index=index, columns=columns, values=values, aggfunc="sum")
    table = table.fillna(0).astype(int).sort_index()
    table.columns.name = columns
    table.index = _whole_numbers(table.index)  # star ratings: 1..5, not 1.0..5.0
    table.columns = _whole_numbers(table.columns)
    return table


def _whole_numbers(labels: pd.Index) -> pd.Index:
    """Float labels that are all whole numbers as integers; any other labels as they are."""
    if labels.dtype.kind == "f" and all(float(v).is_integer() for v in labels):
        return labels.astype(int)
    return labels


def _largest_rows(table: pd.DataFrame, n: int) -> pd.DataFrame:
    """The ``n`` rows with the largest totals, largest first (ties keep their order)."""
    order = table.sum(axis=1).sort_values(ascending=False, kind="stable")
    return table.loc[order.index[:n]]


_PANDAS_FREQ = {"day": "D", "week": "W-MON", "month": "MS", "quarter": "QS", "year": "YS"}


def _continuous(table: pd.DataFrame, period: str) -> pd.DataFrame:
    """A time table with every period from first to last, zero where nothing happened."""
    if table.empty:
        return table
    start, end = table.index.min(), table.index.max()
    every = pd.date_range(start, end, freq=_PANDAS_FREQ[period], name=table.index.name)
    return table.reindex(every, fill_value=0)


def _period(period: str) -> str:
    if period not in PERIODS:
        raise ValueError(f"period must be one of {', '.join(PERIODS)}, got {period!r}")
    return period
