"""``python -m pipelines``: run pipelines, inspect the datalake, generate datasets.

Any flag a subcommand does not know is passed on to Beam as a pipeline option, so
the runner is chosen on the command line (``--runner``, ``--direct_num_workers``, ...).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence


class _QuietOptionalCloudImports(logging.Filter):
    """Beam warns at import that the Google Cloud extras are absent; they are optional here."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (
            message.startswith("apitools not found") or "Failed to import GCSFileSystem" in message
        )


logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
for _handler in logging.getLogger().handlers:
    _handler.addFilter(_QuietOptionalCloudImports())

from pipelines import registry  # noqa: E402 - after the filter: importing Beam logs
from pipelines.registry import UsageError  # noqa: E402


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
        help="one of: " + ", ".join(registry.names()) + "; then its flags and Beam's",
    )

    commands.add_parser("list", help="list the pipelines")

    db = commands.add_parser("db", help="the datalake: url, status, stop")
    db.add_argument("action", choices=["url", "status", "stop"])
    db.add_argument("--dsn", default=None, help="default $TERMIDATOR_DSN, else embedded")

    for name, (help_text, add_arguments, _) in registry.TOOLS.items():
        tool = commands.add_parser(name, help=help_text, description=help_text)
        if name == command:  # a tool's module (FastAPI, Jupyter, ...) loads only when used
            add_arguments(tool)
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
    args, extra = _parser(command).parse_known_args(argv)
    if args.verbose:
        logging.getLogger().setLevel(logging.INFO)
    for ours in ("pipelines", "connectors", "transforms", "server"):
        logging.getLogger(ours).setLevel(logging.INFO)
    try:
        return _dispatch(args, extra, run_args)
    except Exception as error:
        if not registry.is_expected(error):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


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
        for name, module in registry.PIPELINES.items():
            print(f"{name:<10} {module().DESCRIPTION}")
        return 0
    if args.command == "db":
        return registry.db_command(args.action, args.dsn)
    _, _, command_main = registry.TOOLS[args.command]
    return command_main(args)


def _run(pipeline: Optional[str], argv: list[str]) -> int:
    if pipeline is None:
        if any(a == "--input" or a.startswith("--input=") for a in argv):
            raise UsageError("name the pipeline: `run reviews --input ...` or `run products ...`")
        summaries = registry.run_samples(argv)
    else:
        if pipeline not in registry.PIPELINES:
            raise UsageError(
                f"unknown pipeline {pipeline!r}; choose one of: "
                f"{', '.join(registry.names())} (`python -m pipelines list`)"
            )
        module = registry.PIPELINES[pipeline]()
        if pipeline in registry.NEEDS_INPUT and not any(
            a == "--input" or a.startswith("--input=") for a in argv
        ):
            raise UsageError(f"`run {pipeline}` needs --input PATH_OR_GLOB")
        emotions = pipeline == "emotions" or "--emotions" in argv
        summaries = [module.run(registry.with_default_runner(argv, emotions))]
    for summary in summaries:
        print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
