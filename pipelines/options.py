"""Pipeline options: TermiDator's own flags, as ``PipelineOptions`` subclasses.

Every other flag on the command line is a Beam pipeline option (``--runner``,
``--direct_num_workers``, ``--job_endpoint``, ...).
"""

from __future__ import annotations

from apache_beam.options.pipeline_options import PipelineOptions

from connectors.sink import DEFAULT_BATCH_SIZE


class UsageError(Exception):
    """Bad command-line input: printed as one line naming the fix, exit code 2."""


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


class EmotionOptions(PipelineOptions):
    """Emotion analysis: which model, where it runs. ``--emotions`` is the one switch that
    turns inline classification on in the ``reviews`` and ``stream`` pipelines."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--emotions",
            action="store_true",
            help="classify the emotion of each review while ingesting it",
        )
        parser.add_argument(
            "--model",
            default="minilm-goemotions-ekman",
            help="emotion model: the offline default, a Hugging Face model id, or a local path",
        )
        parser.add_argument("--device", default="cpu", help="cpu or cuda")
        parser.add_argument(
            "--dtype",
            default="auto",
            choices=("auto", "float32", "bfloat16"),
            help="inference precision; auto: bfloat16 where the CPU (AMX) or GPU runs it fast",
        )
        parser.add_argument(
            "--max_tokens", type=int, default=256, help="truncate texts to this many tokens"
        )
        parser.add_argument(
            "--torch_threads", type=int, default=1, help="torch threads per worker process"
        )
        parser.add_argument(
            "--limit",
            type=int,
            default=None,
            help="run emotions: classify at most this many reviews",
        )


class StreamOptions(PipelineOptions):
    """The ``stream`` pipeline: what it follows, when it stops, its event-time windows.

    Durations take a number of seconds or a suffix: ``90s``, ``30m``, ``6h``, ``1d``.
    ``--emotions`` and ``--model`` come from ``EmotionOptions``.
    """

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--dataset",
            default="reviews",
            help="landing zone to follow: reviews or products (default reviews)",
        )
        parser.add_argument(
            "--stop-after",
            "--stop_after",
            dest="stop_after",
            default=None,
            help="stop following after this long (default: run until interrupted)",
        )
        parser.add_argument(
            "--stop-after-idle",
            "--stop_after_idle",
            dest="stop_after_idle",
            default=None,
            help="stop once no new file has landed for this long",
        )
        parser.add_argument(
            "--replay",
            default=None,
            help="stream this dataset file instead of following the landing zone",
        )
        parser.add_argument(
            "--rate", default=None, help="--replay: records per second (default: as read)"
        )
        parser.add_argument(
            "--window", default="1d", help="event-time window of review_stats (default 1d)"
        )
        parser.add_argument(
            "--allowed-lateness",
            "--allowed_lateness",
            dest="allowed_lateness",
            default="1d",
            help="late reviews within this still update their window's row (default 1d)",
        )
        parser.add_argument(
            "--poll-interval",
            "--poll_interval",
            dest="poll_interval",
            default="1s",
            help="how often the landing zone is listed when idle (default 1s)",
        )
        parser.add_argument(
            "--landing",
            default=None,
            help="landing zone root (default $TERMIDATOR_HOME/landing)",
        )
