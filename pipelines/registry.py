"""What the CLI can run: pipelines by name, tools, the bundled samples, ``db`` actions."""

from __future__ import annotations

import importlib
import sys
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Callable, Mapping, Optional, Sequence

from connectors import postgres
from connectors.files import NoInputError
from connectors.postgres import DatalakeUnavailable


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


def _tool(module: str, help_text: str) -> tuple[str, Callable, Callable]:
    """A subcommand whose module (``add_arguments``, ``main``) loads only when it is used."""
    return (
        help_text,
        lambda parser: importlib.import_module(module).add_arguments(parser),
        lambda args: importlib.import_module(module).main(args),
    )


# Subcommands that are not pipelines: name -> (help, add_arguments, main).
TOOLS: dict[str, tuple[str, Callable, Callable]] = {
    "generate": _tool("pipelines.generate", "write synthetic dataset files in the real formats"),
    "notebook": _tool(
        "pipelines.notebook", "start JupyterLab on notebooks/, connected to the datalake"
    ),
    "serve": _tool(
        "server.app", "REST service: ingest NDJSON into the landing zone, start and watch jobs"
    ),
    "stream": _tool(
        "server.client", "send a dataset file to the REST service in batches (progress, retries)"
    ),
    "train-emotions": _tool(
        "pipelines.train_emotions", "retrain the default emotion head on GoEmotions (--data DIR)"
    ),
}


class UsageError(Exception):
    """Bad command-line input: printed as one line naming the fix, exit code 2."""


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


def names() -> list[str]:
    """Pipeline names, in the order ``list`` shows them."""
    return list(PIPELINES)


# Emotion inference releases the GIL: two single-threaded workers sharing one model
# measured fastest on 2 cores (bench/emotion_speed.py); 0 means one per core.
EMOTION_WORKERS = ("--direct_num_workers", "0")


def with_default_runner(argv: Sequence[str], emotions: bool = False) -> list[str]:
    """Add the measured default runner flags unless the user chose them."""
    argv = list(argv)
    if not any(a == "--runner" or a.startswith("--runner=") for a in argv):
        argv = list(DEFAULT_BEAM_ARGS) + argv
    if emotions and not any(a.startswith("--direct_num_workers") for a in argv):
        argv = list(EMOTION_WORKERS) + argv
    return argv


def sample_files() -> dict[str, list[str]]:
    """The bundled sample files, by pipeline: ``meta_*`` files are product metadata."""
    folder = Path(str(resources.files("pipelines").joinpath("samples")))
    files = sorted(
        str(p)
        for p in folder.iterdir()
        if p.name.endswith((".json", ".jsonl", ".json.gz", ".jsonl.gz"))
    )
    return {
        "products": [f for f in files if Path(f).name.startswith("meta_")],
        "reviews": [f for f in files if not Path(f).name.startswith("meta_")],
    }


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
        stopped = postgres.stop_embedded()
        print("embedded datalake stopped" if stopped else "embedded datalake was not running")
        return 0
    resolved = postgres.resolve_dsn(dsn)
    if action == "url":
        print(resolved)
        return 0
    applied = postgres.migrate(resolved)
    counts = postgres.table_counts(resolved, postgres.DATALAKE_TABLES)
    print(f"datalake: {postgres.redact(resolved)}")
    if applied:
        print(f"migrations applied now: {', '.join(applied)}")
    print(f"schema: {', '.join(name for _, name, _ in postgres.migrations())}")
    for table, count in counts.items():
        print(f"  {table:<16} {count:>12,} rows")
    return 0
