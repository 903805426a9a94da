"""Pipeline options: TermiDator's own flags, as ``PipelineOptions`` subclasses.

Every other flag on the command line is a Beam pipeline option (``--runner``,
``--direct_num_workers``, ``--job_endpoint``, ...).
"""

from __future__ import annotations

from apache_beam.options.pipeline_options import PipelineOptions

from connectors.postgres import DEFAULT_BATCH_SIZE


class DatalakeOptions(PipelineOptions):
    """Where the datalake is and how rows are written to it."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--dsn",
            default=None,
            help="Postgres DSN; default $TERMIDATOR_DSN, else the embedded datalake",
        )
        parser.add_argument(
            "--batch_size",
            type=int,
            default=DEFAULT_BATCH_SIZE,
            help="rows per COPY + upsert transaction",
        )


class IngestOptions(PipelineOptions):
    """What a bounded ingestion reads."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--input",
            action="append",
            default=None,
            help="dataset file or glob (.json/.jsonl, gzipped or not); repeatable",
        )
