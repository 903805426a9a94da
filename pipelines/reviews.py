"""The ``reviews`` pipeline: review files of any generation -> ``reviews`` table."""

from __future__ import annotations

from typing import Optional, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from connectors.sink import REVIEWS
from pipelines.common import RunSummary, execute, ingest, write_dead_letters, classify_emotions
from pipelines.options import DatalakeOptions, EmotionOptions, IngestOptions
from transforms.records import REVIEW

NAME = "reviews"
DESCRIPTION = "review files (2014/2018/2023, .json/.jsonl[.gz]) -> reviews [--emotions]"


def build(pipeline: beam.Pipeline, options: PipelineOptions, dsn: str, run_id: str):
    """Read, parse, clean and upsert reviews; returns the cleaned records."""
    records, dead_letters = ingest(
        pipeline,
        REVIEW,
        options.view_as(IngestOptions).input or [],
        dsn,
        REVIEWS,
        options.view_as(DatalakeOptions).batch_size,
    )
    if options.view_as(EmotionOptions).emotions:
        dead_letters += classify_emotions(records, options, dsn, NAME)
    write_dead_letters(dead_letters, dsn, run_id)
    return records


def run(
    argv: Optional[Sequence[str]] = None, test_pipeline: Optional[beam.Pipeline] = None
) -> RunSummary:
    """Run the pipeline (``python -m pipelines run reviews --input FILE ...``)."""
    return execute(NAME, build, argv, test_pipeline, table=REVIEWS.table)
