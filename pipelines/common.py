"""What every pipeline shares: the run lifecycle, the summary, and the ingest graph."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import time
import uuid
from typing import Callable, Mapping, Optional, Sequence

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import (
    DirectOptions,
    PipelineOptions,
    PortableOptions,
    StandardOptions,
)
from apache_beam.runners.runner import PipelineState

from connectors import datalake
from connectors.files import ReadDataset
from connectors.sink import REVIEW_EMOTIONS, TableSpec, UpsertToPostgres, WriteDeadLetters
from pipelines.options import DatalakeOptions, EmotionOptions
from transforms.clean import CleanProducts, CleanReviews
from transforms.parse import METRICS_NAMESPACE, ParseRecords
from transforms.records import PRODUCT, REVIEW

_LOG = logging.getLogger(__name__)
COUNTER_NAMESPACES = (METRICS_NAMESPACE, "emotion")

# One builder per pipeline: (pipeline, options, dsn, run_id) -> None.
Builder = Callable[[beam.Pipeline, PipelineOptions, str, str], None]


@dataclasses.dataclass
class RunSummary:
    """How a run went: the counters Beam reported, and which runner really ran."""

    pipeline: str
    run_id: str
    runner: str
    state: str
    counters: Mapping[str, int]
    elapsed_s: float
    table: Optional[str] = None

    @property
    def records(self) -> int:
        """Records that entered the pipeline: lines read plus lines that could not be."""
        return self.counters.get("records_read", 0) + self.counters.get("read_dead_letters", 0)

    @property
    def upserted(self) -> int:
        return self.counters.get(f"{self.table}_upserted", 0) if self.table else 0

    @property
    def changed(self) -> int:
        return self.counters.get(f"{self.table}_changed", 0) if self.table else 0

    @property
    def dead_letters(self) -> int:
        return self.counters.get("dead_letters_upserted", 0)

    def format(self) -> str:
        """A few lines for the terminal: counts, speed, runner, and where to look."""
        rate = self.records / self.elapsed_s if self.elapsed_s > 0 else 0.0
        lines = [
            f"{self.pipeline}: {self.state} in {self.elapsed_s:.1f} s on {self.runner}",
            f"  records read  {self.records:>12,}   ({rate:,.0f} records/s)",
            f"  upserted      {self.upserted:>12,}   into {self.table} "
            f"({self.changed:,} rows inserted or changed)",
            f"  dead letters  {self.dead_letters:>12,}",
        ]
        inline_emotions = "emotion_reviews" in self.counters and self.table != "review_emotions"
        if inline_emotions:
            lines.append(
                f"  emotions      {self.counters.get('review_emotions_upserted', 0):>12,}   "
                f"into review_emotions ({self.counters.get('emotion_skipped_no_text', 0):,}"
                " reviews without text skipped)"
            )
        elif self.table == "review_emotions" and self.counters.get("emotion_skipped_no_text"):
            lines.append(  # read = upserted + dead letters + these
                f"  skipped       {self.counters['emotion_skipped_no_text']:>12,}   "
                "reviews without text (nothing to classify)"
            )
        if self.dead_letters:
            lines.append(f"  see: SELECT * FROM dead_letters WHERE run_id = '{self.run_id}'")
        return "\n".join(lines)


def collect_counters(result) -> dict[str, int]:
    """TermiDator's Beam counters, summed over steps (committed where the runner has it)."""
    counters: dict[str, int] = {}
    for counter in result.metrics().query(MetricsFilter())["counters"]:
        namespace = counter.key.metric.namespace
        if namespace not in COUNTER_NAMESPACES:
            continue
        try:
            value = counter.committed
        except Exception:  # noqa: BLE001 - some runners only have attempted values
            value = None
        if value is None:
            value = counter.attempted or 0
        name = counter.key.metric.name
        if namespace != METRICS_NAMESPACE:
            name = f"{namespace}_{name}"
        counters[name] = counters.get(name, 0) + int(value)
    return counters


def runner_that_ran(result, options: PipelineOptions, runner: object = None) -> str:
    """Name the runner that really ran: the DirectRunner may have used Prism or the FnApiRunner.

    Portable runs clear ``--runner`` in the options, so the runner object names them.
    """
    requested = options.view_as(StandardOptions).runner or (
        type(runner).__name__ if runner is not None else "DirectRunner"
    )
    if not isinstance(requested, str):
        requested = type(requested).__name__
    requested = {"SwitchingDirectRunner": "DirectRunner"}.get(requested, requested)
    module = type(result).__module__
    if "fn_api_runner" in module:
        direct = options.view_as(DirectOptions)
        mode = direct.direct_running_mode or "in_memory"
        workers = direct.direct_num_workers
        detail = mode if mode == "in_memory" else f"{mode}, {workers or 'all'} workers"
        via = "" if requested.lower().startswith("fnapi") else f"{requested} -> "
        return f"{via}FnApiRunner ({detail})"
    if module.endswith("portable_runner") and requested.lower() in ("directrunner", "direct"):
        return "DirectRunner -> PrismRunner"
    portable = options.view_as(PortableOptions)
    if module.endswith("portable_runner") and portable.job_endpoint:
        workers = portable.environment_type or "DOCKER"
        return f"{requested} (job service {portable.job_endpoint}, {workers} workers)"
    if module.endswith("direct_runner"):
        return f"{requested} -> BundleBasedDirectRunner"
    return requested


def execute(
    name: str,
    build: Builder,
    argv: Optional[Sequence[str]] = None,
    test_pipeline: Optional[beam.Pipeline] = None,
    table: Optional[str] = None,
) -> RunSummary:
    """Build and run one pipeline against the datalake, recording it in ``pipeline_runs``.

    Bad input (no file, no database) raises before the run starts; a failed run is
    recorded as FAILED and re-raised.
    """
    options = PipelineOptions(list(argv or []))
    dsn = datalake.resolve_dsn(options.view_as(DatalakeOptions).dsn)
    datalake.migrate(dsn)
    pipeline = test_pipeline or beam.Pipeline(options=options)
    run_id = str(uuid.uuid4())
    build(pipeline, options, dsn, run_id)
    recorded = {k: v for k, v in options.get_all_options(drop_default=True).items() if k != "dsn"}
    datalake.start_run(dsn, name, recorded, run_id=run_id)
    started = time.monotonic()
    runner, counters, state = "unknown", {}, "FAILED"
    try:
        with bulk_garbage_collection():
            result = pipeline.run()
            result.wait_until_finish()
        state = str(result.state).replace("PipelineState.", "")
        runner = runner_that_ran(result, pipeline.options, pipeline.runner)
        _LOG.info("%s ran on %s", name, runner)
        counters = collect_counters(result)
        if result.state != PipelineState.DONE:
            raise RuntimeError(f"{name} ended {state} on {runner}")
    finally:
        elapsed = time.monotonic() - started
        counters = dict(counters, elapsed_ms=int(elapsed * 1000))
        datalake.finish_run(dsn, run_id, state, runner, counters)
    return RunSummary(name, run_id, runner, state, counters, elapsed, table)


@contextlib.contextmanager
def bulk_garbage_collection(threshold: int = 50_000):
    """Collect garbage less often while a pipeline runs in this process.

    Records are short-lived, but the sink holds a batch of them, so with Python's default
    thresholds (700 allocations) the collector walks every held record again and again.
    """
    previous = gc.get_threshold()
    gc.set_threshold(threshold, previous[1], previous[2])
    try:
        yield
    finally:
        gc.set_threshold(*previous)


CLEAN_TRANSFORMS = {REVIEW: CleanReviews, PRODUCT: CleanProducts}


def ingest(
    pipeline: beam.Pipeline,
    kind: str,
    inputs: Sequence[str],
    dsn: str,
    spec: TableSpec,
    batch_size: int,
) -> tuple[beam.PCollection, list[beam.PCollection]]:
    """Files -> parse -> clean -> upsert into ``spec``'s table.

    Returns the cleaned records (for pipelines that do more with them) and every
    stage's dead letters, for ``write_dead_letters``.
    """
    name = spec.table
    title = kind.capitalize() + "s"
    lines = pipeline | f"Read{title}" >> ReadDataset(inputs, name)
    parsed = lines.records | f"Parse{title}" >> ParseRecords(kind, name)
    cleaned = parsed.records | f"Clean{title}" >> CLEAN_TRANSFORMS[kind](name)
    rejected = cleaned.records | f"Upsert{title}" >> UpsertToPostgres(dsn, spec, name, batch_size)
    return cleaned.records, [
        lines.dead_letters,
        parsed.dead_letters,
        cleaned.dead_letters,
        rejected,
    ]


def emotion_classifier(options: PipelineOptions, pipeline_name: str) -> beam.PTransform:
    """``ClassifyEmotions`` as the run's ``EmotionOptions`` configure it (torch loads only
    when emotions run)."""
    from transforms.emotion import ClassifyEmotions

    emotion = options.view_as(EmotionOptions)
    return ClassifyEmotions(
        model=emotion.model,
        device=emotion.device,
        max_tokens=emotion.max_tokens,
        torch_threads=emotion.torch_threads,
        dtype=emotion.dtype,
        pipeline_name=pipeline_name,
    )


def classify_emotions(
    reviews: beam.PCollection, options: PipelineOptions, dsn: str, pipeline_name: str
) -> list[beam.PCollection]:
    """Reviews -> emotions upserted into ``review_emotions``; returns the dead letters."""
    batch_size = options.view_as(DatalakeOptions).batch_size
    result = reviews | "ClassifyEmotions" >> emotion_classifier(options, pipeline_name)
    rejected = result.emotions | "UpsertEmotions" >> UpsertToPostgres(
        dsn, REVIEW_EMOTIONS, pipeline_name, batch_size
    )
    return [result.dead_letters, rejected]


def write_dead_letters(dead_letters: Sequence[beam.PCollection], dsn: str, run_id: str) -> None:
    """Every stage's dead letters, flattened into one ``dead_letters`` sink."""
    (
        tuple(dead_letters)
        | "CollectDeadLetters" >> beam.Flatten()
        | "WriteDeadLetters" >> WriteDeadLetters(dsn, run_id)
    )
