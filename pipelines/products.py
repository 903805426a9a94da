"""The ``products`` pipeline: product metadata of any generation -> ``products`` table."""

from __future__ import annotations

from typing import Optional, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from connectors.sink import PRODUCTS, Target
from pipelines.composites import ingest_files
from pipelines.lifecycle import RunResult, execute
from pipelines.options import DatalakeOptions, IngestOptions
from pipelines.progress import Measure
from transforms.records import PRODUCT

NAME = "products"
DESCRIPTION = "product metadata files (2014/2018/2023) -> products"
OPTIONS = (DatalakeOptions, IngestOptions)


def build(pipeline: beam.Pipeline, options: PipelineOptions, target: Target) -> Measure:
    """Read, parse, clean and upsert products."""
    return ingest_files(pipeline, options, target, PRODUCT, PRODUCTS)[1]


def run(
    argv: Optional[Sequence[str]] = None, test_pipeline: Optional[beam.Pipeline] = None
) -> RunResult:
    """Run the pipeline (``python -m pipelines run products --input FILE ...``)."""
    return execute(NAME, build, argv, test_pipeline, table=PRODUCTS.table)
