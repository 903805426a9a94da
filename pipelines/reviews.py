"""The ``reviews`` pipeline: review files of any generation -> ``reviews`` [+ emotions]."""

from __future__ import annotations

from typing import Optional, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from connectors.sink import REVIEWS, Target
from pipelines.composites import RECORDS, ingest_files, write_emotions
from pipelines.lifecycle import RunResult, execute
from pipelines.options import DatalakeOptions, EmotionOptions, IngestOptions
from pipelines.progress import Measure
from transforms.records import REVIEW

NAME = "reviews"
DESCRIPTION = "review files (2014/2018/2023, .json/.jsonl[.gz]) -> reviews [--emotions]"
OPTIONS = (DatalakeOptions, IngestOptions, EmotionOptions)


def build(pipeline: beam.Pipeline, options: PipelineOptions, target: Target) -> Measure:
    """Read, parse, clean and upsert reviews [and classify their emotions]."""
    rows, measure = ingest_files(pipeline, options, target, REVIEW, REVIEWS)
    if options.view_as(EmotionOptions).emotions:
        write_emotions(rows[RECORDS], options, target)
    return measure


def run(
    argv: Optional[Sequence[str]] = None, test_pipeline: Optional[beam.Pipeline] = None
) -> RunResult:
    """Run the pipeline (``python -m pipelines run reviews --input FILE ...``)."""
    return execute(NAME, build, argv, test_pipeline, table=REVIEWS.table)
