"""The ``products`` pipeline: product metadata of any generation -> ``products`` table."""

from __future__ import annotations

from typing import Optional, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from connectors.files import ReadDataset
from connectors.sink import PRODUCTS, Target
from pipelines.composites import RECORDS, ReadParseClean, WriteDatalake
from pipelines.lifecycle import RunResult, execute
from pipelines.options import DatalakeOptions, IngestOptions
from transforms.records import PRODUCT

NAME = "products"
DESCRIPTION = "product metadata files (2014/2018/2023) -> products"
OPTIONS = (DatalakeOptions, IngestOptions)


def build(pipeline: beam.Pipeline, options: PipelineOptions, target: Target) -> beam.PCollection:
    """Read, parse, clean and upsert products; returns the cleaned records."""
    source = ReadDataset(options.view_as(IngestOptions).input or [], NAME)
    rows = pipeline | "ReadParseClean" >> ReadParseClean(source, PRODUCT, NAME)
    _ = rows | "WriteDatalake" >> WriteDatalake(PRODUCTS, target)
    return rows[RECORDS]


def run(
    argv: Optional[Sequence[str]] = None, test_pipeline: Optional[beam.Pipeline] = None
) -> RunResult:
    """Run the pipeline (``python -m pipelines run products --input FILE ...``)."""
    return execute(NAME, build, argv, test_pipeline, table=PRODUCTS.table)
