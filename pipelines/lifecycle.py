"""A run's life, the same for every pipeline: options parsed strictly, the datalake
migrated, the run recorded in ``pipeline_runs`` with its process and a heartbeat, the
graph built and run, and one ``RunResult`` — for the terminal, the job API and
``pipeline_runs.counters`` alike.

Counters come from Beam's metrics where the runner reports them, and from the datalake
itself (``run_counters``, added by the sinks in the same transactions as the rows) for
what was committed: true on every runner, and after an interrupt.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import re
import threading
import time
import uuid
from typing import Callable, Iterator, Mapping, Optional, Sequence

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import (
    DirectOptions,
    PipelineOptions,
    PortableOptions,
    StandardOptions,
)
from apache_beam.runners.runner import PipelineState

from connectors import datalake, stopping
from connectors.sink import Target
from pipelines import interrupts, progress
from pipelines import options as option_parsing
from pipelines.options import DatalakeOptions
from pipelines.progress import Measure
from transforms.records import METRICS_NAMESPACE

_LOG = logging.getLogger(__name__)

# One builder per pipeline: (pipeline, options, target) -> what its progress counts.
Builder = Callable[[beam.Pipeline, PipelineOptions, Target], Optional[Measure]]


@dataclasses.dataclass
class RunResult:
    """How a run went: its state, counters and speed, and which runner really ran."""

    pipeline: str
    run_id: str
    runner: str
    state: str
    counters: Mapping[str, int]
    elapsed_s: float
    table: Optional[str] = None
    notes: list[str] = dataclasses.field(default_factory=list)  # more lines for the summary
    planned: Optional[int] = None  # records the run set out to do, where known up front

    @property
    def upserted(self) -> int:
        return self.counters.get(f"{self.table}_upserted", 0) if self.table else 0

    @property
    def changed(self) -> int:
        return self.counters.get(f"{self.table}_changed", 0) if self.table else 0

    @property
    def dead_letters(self) -> int:
        return self.counters.get("dead_letters_upserted", 0)

    @property
    def records(self) -> int:
        """Records that entered the pipeline: lines read plus lines that could not be (from
        the datalake's counts where the runner reports no metrics)."""
        if "records_read" in self.counters:
            return self.counters["records_read"] + self.counters.get("read_dead_letters", 0)
        return self.upserted + self.dead_letters

    def format(self) -> str:
        """A few lines for the terminal: counts, speed, runner, and where to look. A stream's
        rate counts the time it was busy, not the time it waited for new files."""
        idle_s = self.counters.get("idle_ms", 0) / 1000
        busy_s = max(self.elapsed_s - idle_s, 0.0)
        rate = self.records / busy_s if busy_s > 0 else 0.0
        speed = f"{rate:,.0f} records/s" + (f" over {busy_s:.1f} s busy" if idle_s else "")
        lines = [
            f"{self.pipeline}: {self.state} in {self.elapsed_s:.1f} s on {self.runner}",
            f"  records read  {self.records:>12,}   ({speed})",
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
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


class RunFailed(RuntimeError):
    """A run that started and failed; the message is one line, the run is recorded FAILED."""

    def __init__(self, message: str, result: RunResult):
        super().__init__(message)
        self.result = result


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C; what it committed is kept and recorded (CANCELLED)."""

    def __init__(self, result: RunResult):
        super().__init__(result.pipeline)
        self.result = result


def beam_counters(result) -> dict[str, int]:
    """TermiDator's Beam counters, summed over steps (committed where the runner has it);
    empty where the runner reports no metrics."""
    counters: dict[str, int] = {}
    try:
        found = result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))
    except NotImplementedError:  # e.g. Beam's own DaskRunner (ours reports them)
        return counters
    except RecursionError:  # Beam 2.77's FnApiRunner after thousands of bundles (a stream)
        _LOG.info("the runner's metrics are too deep to read; counting from the datalake")
        return counters
    for counter in found["counters"]:
        try:
            value = counter.committed
        except Exception:  # noqa: BLE001 - some runners only have attempted values
            value = None
        if value is None:
            value = counter.attempted or 0
        name = counter.key.metric.name
        counters[name] = counters.get(name, 0) + int(value)
    return counters


def committed_counters(dsn: str, run_id: str) -> dict[str, int]:
    """What the run's sinks committed, from the datalake."""
    with datalake.connect(dsn) as conn:
        return datalake.run_counters(conn, run_id)


def runner_that_ran(result, options: PipelineOptions, runner: object = None) -> str:
    """Name the runner that really ran: the DirectRunner may have used Prism or the FnApiRunner.

    Portable runs clear ``--runner`` in the options, so the runner object names them. A run
    that was interrupted has no result: its runner object stands in for it.
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
    if module == "pipelines.dask_runner":  # its result, or its runner if interrupted
        return f"DaskRunner ({result.cluster or 'no scheduler reached'})"
    if module.endswith("direct_runner"):
        return f"{requested} -> BundleBasedDirectRunner"
    return requested


def _requested_runner(options: PipelineOptions) -> str:
    """The runner asked for, by its short name (what a run that never started records)."""
    runner = options.view_as(StandardOptions).runner or "DirectRunner"
    runner = runner if isinstance(runner, str) else type(runner).__name__
    return runner.rsplit(".", 1)[-1]


@contextlib.contextmanager
def showing(
    measure: Optional[Measure], dsn: str, run_id: str, every_s: float = 10.0
) -> Iterator[None]:
    """Show the run's progress while the block runs (nothing without a measure)."""
    if measure is None:
        yield
        return
    with progress.committed(dsn, run_id) as read:
        with progress.Reporter(measure, read, every_s=every_s).running():
            yield


@contextlib.contextmanager
def heartbeat(dsn: str, run_id: str, every_s: float = datalake.HEARTBEAT_S) -> Iterator[None]:
    """Beat the run's heartbeat in ``pipeline_runs`` from a thread while the block runs."""
    stop = threading.Event()

    def beat() -> None:
        conn = None
        while not stop.wait(every_s):
            try:
                conn = conn if conn is not None and not conn.closed else datalake.connect(dsn)
                datalake.heartbeat(conn, run_id)
                conn.commit()
            except Exception as error:  # noqa: BLE001 - a missed beat is not the run's end
                _LOG.debug("heartbeat of run %s failed: %s", run_id, error)
                conn = None
        if conn is not None:
            conn.close()

    thread = threading.Thread(target=beat, name=f"heartbeat-{run_id[:8]}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()


def execute(
    name: str,
    build: Builder,
    argv: Optional[Sequence[str]] = None,
    test_pipeline: Optional[beam.Pipeline] = None,
    table: Optional[str] = None,
) -> RunResult:
    """Build and run one pipeline against the datalake, recording it in ``pipeline_runs``.

    Bad input (a flag, no file, no database) raises before the run starts; a failed run is
    recorded FAILED and raised as ``RunFailed``; Ctrl-C records it CANCELLED, with what it
    committed, and raises ``RunInterrupted``.
    """
    options = option_parsing.parse(argv or [])
    lake = options.view_as(DatalakeOptions)
    dsn = datalake.resolve_dsn(lake.dsn)
    datalake.migrate(dsn)
    run_id = str(uuid.uuid4())
    stop = stopping.stop_file(run_id)
    target = Target(dsn, run_id, name, lake.batch_size, retry_s=lake.db_retry, stop_file=stop)
    pipeline = test_pipeline or beam.Pipeline(options=options)
    measure = build(pipeline, options, target)
    recorded = {k: v for k, v in options.get_all_options(drop_default=True).items() if k != "dsn"}
    with datalake.connect(dsn, autocommit=True) as conn:
        datalake.mark_abandoned(conn)
    datalake.start_run(dsn, name, recorded, run_id=run_id)
    started = time.monotonic()
    runner, counters, state, failure = _requested_runner(pipeline.options), {}, "FAILED", None
    try:
        with heartbeat(dsn, run_id), bulk_garbage_collection():
            # The first Ctrl-C asks the sources to stop: what is in flight is written.
            with interrupts.on_interrupt(lambda: stopping.request_stop(stop)):
                with showing(None if lake.quiet else measure, dsn, run_id, lake.progress_every):
                    result = pipeline.run()
                    result.wait_until_finish()
        state = str(result.state).replace("PipelineState.", "")
        runner = runner_that_ran(result, pipeline.options, pipeline.runner)
        _LOG.info("%s ran on %s", name, runner)
        counters = beam_counters(result)
        if result.state != PipelineState.DONE:
            failure = f"{name} ended {state} on {runner}"
            state = "FAILED"
        elif interrupts.requested():  # a graceful stop (sources stopped, all written)
            state = "CANCELLED"
        elif measure is not None and measure.max_bad_fraction is not None:
            failure = too_bad(
                dsn,
                run_id,
                {**counters, **committed_counters(dsn, run_id)},
                measure.max_bad_fraction,
            )
            state = "FAILED" if failure else state
        elif interrupts.requested():  # a graceful stop (a stream drained) is a cancel
            state = "CANCELLED"
    except KeyboardInterrupt:
        state = "CANCELLED"
        runner = runner_that_ran(pipeline.runner, pipeline.options, pipeline.runner)
    except Exception as error:  # noqa: BLE001 - recorded, then raised as one line
        failure = root_cause(error)
    elapsed = time.monotonic() - started
    stopping.clear_stop(stop)
    with contextlib.suppress(Exception):  # the datalake may be what failed
        counters = {**counters, **committed_counters(dsn, run_id)}
    counters = dict(counters, elapsed_ms=int(elapsed * 1000))
    with contextlib.suppress(Exception):
        datalake.finish_run(dsn, run_id, state, runner, counters)
    planned = measure.total if measure is not None and measure.unit != "B" else None
    outcome = RunResult(name, run_id, runner, state, counters, elapsed, table, planned=planned)
    if state == "CANCELLED":
        raise RunInterrupted(outcome)
    if failure is not None:
        raise RunFailed(f"{name} failed: {failure}", outcome)
    return outcome


def too_bad(dsn: str, run_id: str, counters: dict[str, int], bar: float) -> Optional[str]:
    """Why a finished run fails its bar: more than ``bar`` of its records dead letters (with
    the most common reason, which for input of the wrong kind names the right pipeline)."""
    result = RunResult("", run_id, "", "", counters, 0.0)
    if not result.records or result.dead_letters / result.records <= bar:
        return None
    reason = datalake.commonest_dead_letter(dsn, run_id)
    return (
        f"{result.dead_letters:,} of {result.records:,} records"
        f" ({result.dead_letters / result.records:.0%}) are dead letters, more than"
        f" --max_bad_fraction {bar:g}; most say: {reason}"
    )


def root_cause(error: BaseException) -> str:
    """The one line that says why a run failed: runners wrap a worker's exception in
    their own, with the original's traceback in the message; its last line is the cause."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    cause = error
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__
    for line in reversed(lines):
        if ":" in line and not line.startswith(("File ", "[", "During handling")):
            return re.sub(r" \[while running '[^']*'\]$", "", line)[:500]
    return datalake.first_line(cause)[:500]


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
