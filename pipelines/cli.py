"""``python -m pipelines``: run pipelines, inspect the datalake, and the tools beside them.

The command table is the one place that names every command. Commands that are not
pipelines live in their own packages and load only when used (``module:function``), so
``--help`` stays fast and no package here imports the layers above it.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import logging
import sys
from types import ModuleType
from typing import Callable, Mapping, Optional, Sequence


class _QuietOptionalCloudImports(logging.Filter):
    """Beam warns at import that the Google Cloud extras are absent; they are optional here."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (
            message.startswith("apitools not found") or "Failed to import GCSFileSystem" in message
        )


class _QuietExpectedStops(logging.Filter):
    """Beam logs every exception a DoFn raises, with its traceback, before the run fails;
    a run that stops on purpose (wrong input, the datalake gone for good) says why in one
    line of its own instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        while error is not None:
            if type(error).__name__ in EXPECTED_STOPS:
                return False
            error = error.__cause__ or error.__context__
        return True


# Exceptions a run raises on purpose: the run fails with their message as its one line.
EXPECTED_STOPS = frozenset({"WrongInput", "DatalakeLost"})

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
for _handler in logging.getLogger().handlers:
    _handler.addFilter(_QuietOptionalCloudImports())
    _handler.addFilter(_QuietExpectedStops())

# After the filter: importing Beam logs.
from connectors import datalake  # noqa: E402
from connectors.datalake import DatalakeUnavailable  # noqa: E402
from connectors.files import NoInputError  # noqa: E402
from pipelines import interrupts  # noqa: E402
from pipelines.lifecycle import RunFailed, RunInterrupted, RunResult  # noqa: E402
from pipelines.options import UsageError, option_help  # noqa: E402
from samples import sample_files  # noqa: E402


def _lazy(module: str) -> Callable[[], ModuleType]:
    """Import pipeline modules only when used, so ``--help`` stays fast."""
    return lambda: importlib.import_module(module)


PIPELINES: Mapping[str, Callable[[], ModuleType]] = {
    "reviews": _lazy("pipelines.reviews"),
    "products": _lazy("pipelines.products"),
    "emotions": _lazy("pipelines.emotions"),
    "stream": _lazy("pipelines.stream"),
}
NEEDS_INPUT = {"reviews", "products"}

# Commands that are not pipelines: name -> (help, module with add_arguments and main,
# the extra that installs what the module needs, if any).
TOOLS: dict[str, tuple[str, str, Optional[str]]] = {
    "generate": ("write synthetic dataset files in the real formats", "samples.generate", None),
    "notebook": (
        "start JupyterLab on notebooks/, connected to the datalake",
        "analysis.notebook",
        "notebooks",
    ),
    "serve": (
        "REST service: ingest NDJSON into the landing zone, start and watch jobs",
        "server.app",
        "serve",
    ),
    "stream": (
        "send a dataset file to the REST service in batches (progress, retries)",
        "server.client",
        "serve",
    ),
    "report": (
        "write one self-contained HTML page of the datalake: rows, runs, dead letters, ratings,"
        " emotions",
        "analysis.report",
        "notebooks",
    ),
    "search": (
        "find the reviews nearest in meaning to a query, with filters (--category, --asin,"
        " --min-rating, --max-rating, --emotion, --since, --k)",
        "pipelines.search",
        None,
    ),
    "train-emotions": (
        "retrain the default emotion model on GoEmotions (--data DIR)",
        "training.emotions",
        "train",
    ),
}


def tool(name: str) -> ModuleType:
    """A tool's module; a missing extra is a one-line error naming the install command."""
    _, module, extra = TOOLS[name]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if extra is None:
            raise
        raise UsageError(
            f"`{name}` needs the {extra} extra ({error.name} is missing):"
            f" pip install -e '.[{extra}]'"
        ) from None


EXPECTED_ERRORS = (UsageError, NoInputError, DatalakeUnavailable)


def is_expected(error: BaseException) -> bool:
    """Errors that are the user's input, shown as one line (exit 2) rather than a traceback.

    The emotion module (and torch with it) is only checked once something imported it.
    """
    if isinstance(error, EXPECTED_ERRORS):
        return True
    emotion = sys.modules.get("transforms.emotion")
    return emotion is not None and isinstance(error, emotion.EmotionModelError)


# Measured in bench/ingest.py (bench/RESULTS.md): the in-process FnApiRunner, called
# directly, beat the DirectRunner (which first tries to download Prism, without a
# timeout, then falls back to it) and multi_processing (records cross processes).
DEFAULT_BEAM_ARGS = ("--runner", "FnApiRunner")
# Emotion inference releases the GIL: two single-threaded workers sharing one model
# measured fastest on 2 cores (bench/emotion_speed.py); 0 means one per core.
EMOTION_WORKERS = ("--direct_num_workers", "0", "--direct_running_mode", "multi_threading")


def names() -> list[str]:
    """Pipeline names, in the order ``list`` shows them."""
    return list(PIPELINES)


def with_default_runner(argv: Sequence[str], emotions: bool = False) -> list[str]:
    """Add the measured default runner flags unless the user chose them."""
    argv = list(argv)
    if not any(a == "--runner" or a.startswith("--runner=") for a in argv):
        argv = list(DEFAULT_BEAM_ARGS) + argv
    if emotions and not any(a.startswith("--direct_") for a in argv):
        argv = list(EMOTION_WORKERS) + argv
    return argv


def run_samples(argv: Sequence[str]) -> list:
    """The main job: ingest the bundled samples (all three generations), products then
    reviews, then classify the emotions of every review."""
    summaries = []
    for name, files in sample_files().items():
        inputs = [arg for f in files for arg in ("--input", f)]
        summaries.append(PIPELINES[name]().run(with_default_runner(list(argv) + inputs)))
    summaries.append(PIPELINES["emotions"]().run(with_default_runner(argv, emotions=True)))
    return summaries


def db_command(action: str, dsn: Optional[str]) -> int:
    """``db url`` prints the DSN (starting the embedded server); ``status`` the tables."""
    if action == "stop":
        stopped = datalake.stop_embedded()
        print("embedded datalake stopped" if stopped else "embedded datalake was not running")
        return 0
    resolved = datalake.resolve_dsn(dsn)
    if action == "url":
        print(resolved)
        return 0
    applied = datalake.migrate(resolved)
    counts = datalake.table_counts(resolved, datalake.DATALAKE_TABLES)
    print(f"datalake: {datalake.redact(resolved)}")
    if applied:
        print(f"migrations applied now: {', '.join(applied)}")
    print(f"schema: {', '.join(name for _, name, _ in datalake.migrations())}")
    for table, count in counts.items():
        print(f"  {table:<16} {count:>12,} rows")
    return 0


def runs_command(limit: int, pipeline: Optional[str], dsn: Optional[str]) -> int:
    """``runs``: the latest runs, newest first; a run whose process died shows ABANDONED."""
    found = datalake.recent_runs(datalake.resolve_dsn(dsn), limit, pipeline)
    print(
        f"{'started (UTC)':<19}  {'pipeline':<9} {'state':<9} {'records':>10} {'rows':>10}"
        f" {'dead':>7} {'seconds':>8}  runner / run id"
    )
    for run in found:
        counters = run["counters"] or {}
        ended = run["finished_at"] or run["heartbeat_at"] or run["started_at"]
        seconds = (ended - run["started_at"]).total_seconds()
        rows = sum(v for k, v in counters.items() if k.endswith("_upserted") and "dead" not in k)
        records = counters.get("records_read", rows + counters.get("dead_letters_upserted", 0))
        print(
            f"{run['started_at'].astimezone(datetime.timezone.utc):%Y-%m-%d %H:%M:%S}  {run['pipeline']:<9} {run['state']:<9}"
            f" {records:>10,} {rows:>10,} {counters.get('dead_letters_upserted', 0):>7,}"
            f" {seconds:>8,.1f}  {run['runner'] or '-'} / {run['run_id']}"
        )
    if not found:
        print("no runs yet: python -m pipelines run")
    return 0


def _parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines",
        description="TermiDator: Amazon review datasets -> Postgres datalake, with Beam.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log Beam's own INFO lines")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="run a pipeline (no name: ingest the bundled samples)",
        description="Run a pipeline. Unknown flags are Beam pipeline options.",
    )
    run.add_argument(
        "pipeline",
        nargs="?",
        help="one of: " + ", ".join(names()) + "; then its flags and Beam's",
    )

    commands.add_parser("list", help="list the pipelines")

    runs = commands.add_parser("runs", help="recent runs: state, runner, counts, speed")
    runs.add_argument("--limit", type=int, default=20, help="how many (default 20)")
    runs.add_argument("--pipeline", default=None, help="only runs of this pipeline")
    runs.add_argument("--dsn", default=None, help="default $TERMIDATOR_DSN, else embedded")

    db = commands.add_parser("db", help="the datalake: url, status, stop")
    db.add_argument("action", choices=["url", "status", "stop"])
    db.add_argument("--dsn", default=None, help="default $TERMIDATOR_DSN, else embedded")

    for name, (help_text, _, _) in TOOLS.items():
        parser_of_tool = commands.add_parser(name, help=help_text, description=help_text)
        if name == command:  # a tool's module (FastAPI, Jupyter, ...) loads only when used
            tool(name).add_arguments(parser_of_tool)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    run_args: list[str] = []
    if "run" in argv[:2] and not {"-h", "--help"} & set(argv[argv.index("run") + 1 :][:1]):
        # Everything after `run` belongs to the pipeline and Beam, verbatim.
        split = argv.index("run") + 1
        argv, run_args = argv[:split], argv[split:]
    command = next((a for a in argv if not a.startswith("-")), None)
    interrupts.install()
    try:
        args, extra = _parser(command).parse_known_args(argv)
        if args.verbose:
            logging.getLogger().setLevel(logging.INFO)
        for ours in ("pipelines", "connectors", "transforms", "server", "analysis", "samples"):
            logging.getLogger(ours).setLevel(logging.INFO)
        return _dispatch(args, extra, run_args)
    except RunInterrupted as stopped:
        print(interrupted_line(stopped.result), file=sys.stderr)
        return interrupts.EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("interrupted: nothing was left half-done", file=sys.stderr)
        return interrupts.EXIT_INTERRUPTED
    except RunFailed as failed:
        print(f"error: {failed}", file=sys.stderr)
        print(
            f"  run {failed.result.run_id} recorded FAILED; what it committed is kept",
            file=sys.stderr,
        )
        return 1
    except Exception as error:
        if not is_expected(error):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2


def interrupted_line(result: RunResult) -> str:
    """The one line an interrupted run ends with: how far it got, and that it is kept."""
    done = result.upserted + result.dead_letters
    what = {"review_emotions": "reviews"}.get(result.table or "", "records")
    of = f" of {result.planned:,}" if result.planned is not None else ""
    return (
        f"interrupted after {done:,}{of} {what} (all committed; run {result.run_id[:8]}"
        " CANCELLED); rerun to continue"
    )


def _dispatch(args: argparse.Namespace, extra: list[str], run_args: list[str]) -> int:
    if args.command is None:
        _parser().print_help()
        return 2
    if args.command == "run":
        rest = run_args + extra
        if rest and not rest[0].startswith("-"):
            return _run(rest[0], rest[1:])
        return _run(None, rest)
    if extra:
        raise UsageError(f"unrecognised arguments: {' '.join(extra)} (see --help)")
    if args.command == "list":
        for name, module in PIPELINES.items():
            print(f"{name:<10} {module().DESCRIPTION}")
        return 0
    if args.command == "db":
        return db_command(args.action, args.dsn)
    if args.command == "runs":
        return runs_command(args.limit, args.pipeline, args.dsn)
    return tool(args.command).main(args)


def pipeline_help(name: str, module: ModuleType) -> str:
    """``run NAME --help``: what the pipeline does and its options."""
    return (
        f"usage: python -m pipelines run {name} [options] [Beam pipeline options]\n\n"
        f"{module.DESCRIPTION}\n\n{option_help(module.OPTIONS)}\n\n"
        "Any Beam pipeline option is accepted too (--runner, --direct_num_workers,"
        " --job_endpoint, ...); an unknown option is an error."
    )


def _run(pipeline: Optional[str], argv: list[str]) -> int:
    if pipeline is None:
        if any(a == "--input" or a.startswith("--input=") for a in argv):
            raise UsageError("name the pipeline: `run reviews --input ...` or `run products ...`")
        summaries = run_samples(argv)
    else:
        if pipeline not in PIPELINES:
            raise UsageError(
                f"unknown pipeline {pipeline!r}; choose one of: "
                f"{', '.join(names())} (`python -m pipelines list`)"
            )
        module = PIPELINES[pipeline]()
        if {"-h", "--help"} & set(argv):
            print(pipeline_help(pipeline, module))
            return 0
        if pipeline in NEEDS_INPUT and not any(
            a == "--input" or a.startswith("--input=") for a in argv
        ):
            raise UsageError(f"`run {pipeline}` needs --input PATH_OR_GLOB")
        emotions = pipeline == "emotions" or "--emotions" in argv
        summaries = [module.run(with_default_runner(argv, emotions))]
    for summary in summaries:
        print(summary.format())
    return 0
