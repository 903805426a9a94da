"""The ``products`` pipeline: product metadata of any generation -> ``products`` table."""

from __future__ import annotations

from typing import Optional, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from connectors.sink import PRODUCTS
from pipelines.common import RunSummary, execute, ingest, write_dead_letters
from pipelines.options import DatalakeOptions, IngestOptions
from transforms.records import PRODUCT

NAME = "products"
DESCRIPTION = "product metadata files (2014/2018/2023) -> products"


def build(pipeline: beam.Pipeline, options: PipelineOptions, dsn: str, run_id: str):
    """Read, parse, clean and upsert products; returns the cleaned records."""
    records, dead_letters = ingest(
        pipeline,
        PRODUCT,
        options.view_as(IngestOptions).input or [],
        dsn,
        PRODUCTS,
        options.view_as(DatalakeOptions).batch_size,
    )
    write_dead_letters(dead_letters, dsn, run_id)
    return records


def run(
    argv: Optional[Sequence[str]] = None, test_pipeline: Optional[beam.Pipeline] = None
) -> RunSummary:
    """Run the pipeline (``python -m pipelines run products --input FILE ...``)."""
    return execute(NAME, build, argv, test_pipeline, table=PRODUCTS.table)
