"""The ``emotions`` pipeline: reviews in the datalake without emotions (for a model) ->
``review_emotions``. Re-running does no work twice: classified reviews are not read."""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions
from beam_postgres.io import ReadFromPostgres
from psycopg import sql
from psycopg.rows import class_row

from connectors.sink import REVIEW_EMOTIONS, Target
from pipelines.composites import write_emotions
from pipelines.lifecycle import RunResult, execute
from pipelines.options import DatalakeOptions, EmotionOptions
from transforms.records import METRICS_NAMESPACE

NAME = "emotions"
DESCRIPTION = "reviews in the datalake without emotions -> review_emotions [--model, --limit]"
OPTIONS = (DatalakeOptions, EmotionOptions)


class StoredReview(NamedTuple):
    """The part of a stored review that emotion analysis reads."""

    review_id: str
    title: Optional[str]
    text: Optional[str]
    source: Optional[str]
    line: Optional[int]


def unclassified_query(model: str, limit: Optional[int]) -> str:
    """Reviews with text and no emotions yet for ``model``, in key order (stable with
    --limit). Reviews without text (cleaning stores blank text as NULL) are left out: they
    never get an emotion row, so they would be read again by every run and could fill
    every --limit window."""
    query = sql.SQL(
        "SELECT review_id, title, text, source, line FROM reviews r WHERE r.text IS NOT NULL"
        " AND NOT EXISTS (SELECT 1 FROM review_emotions e"
        " WHERE e.review_id = r.review_id AND e.model = {})"
        " ORDER BY review_id"
    ).format(sql.Literal(model))
    if limit is not None:
        query += sql.SQL(" LIMIT {}").format(sql.Literal(limit))
    return query.as_string(None)


_RECORDS_READ = Metrics.counter(METRICS_NAMESPACE, "records_read")


def _count_read(review: StoredReview) -> StoredReview:
    _RECORDS_READ.inc()
    return review


def build(pipeline: beam.Pipeline, options: PipelineOptions, target: Target) -> None:
    """Read unclassified reviews with beam-postgres, classify, upsert; returns the emotions."""
    emotion = options.view_as(EmotionOptions)
    reviews = (
        pipeline
        | "ReadUnclassified"
        >> ReadFromPostgres(
            target.dsn, unclassified_query(emotion.model, emotion.limit), class_row(StoredReview)
        )
        | "CountRead" >> beam.Map(_count_read)
    )
    write_emotions(reviews, options, target)


def run(
    argv: Optional[Sequence[str]] = None, test_pipeline: Optional[beam.Pipeline] = None
) -> RunResult:
    """Run the pipeline (``python -m pipelines run emotions [--model M] [--limit N]``)."""
    return execute(NAME, build, argv, test_pipeline, table=REVIEW_EMOTIONS.table)
