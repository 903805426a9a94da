"""Pipeline options: TermiDator's own flags, as ``PipelineOptions`` subclasses read with
``view_as``; every other flag on the command line must be a Beam pipeline option.

``parse`` is strict: an unknown or misspelled flag, or a value out of range, is a
``UsageError`` naming the nearest valid flag. The REST job API takes its allowed options
from the same classes (``api_options``), with the same types and ranges.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import re
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

from connectors.sink import DEFAULT_BATCH_SIZE, DEFAULT_RETRY_S
from transforms.emotion_model import DEFAULT_MODEL, DTYPES


class UsageError(Exception):
    """Bad command-line input: printed as one line naming the fix, exit code 2."""


# --- value types: argparse ``type=`` callables that say what is wrong ------------------------


@dataclasses.dataclass(frozen=True)
class WholeNumber:
    """An option's type: a whole number in [minimum, maximum] (the REST API reads the bounds)."""

    minimum: int
    maximum: Optional[int] = None

    def __call__(self, text: str) -> int:
        span = (
            f"from {self.minimum:,} to {self.maximum:,}"
            if self.maximum is not None
            else (f">= {self.minimum:,}")
        )
        try:
            value = int(str(text).replace("_", ""))
        except ValueError:
            raise argparse.ArgumentTypeError(f"takes a whole number {span}, not {text!r}")
        if value < self.minimum or (self.maximum is not None and value > self.maximum):
            raise argparse.ArgumentTypeError(f"takes a whole number {span}, not {value:,}")
        return value


@dataclasses.dataclass(frozen=True)
class Number:
    """An option's type: a finite number above ``minimum`` (or at it, unless ``exclusive``)
    and at most ``maximum``; ``what`` says it in words."""

    what: str
    minimum: float
    maximum: Optional[float] = None
    exclusive: bool = False

    def __call__(self, text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        low_ok = value > self.minimum if self.exclusive else value >= self.minimum
        if not (
            math.isfinite(value) and low_ok and (self.maximum is None or value <= self.maximum)
        ):
            raise argparse.ArgumentTypeError(f"takes {self.what}, not {text!r}")
        return value


fraction = Number("a number from 0 to 1", 0.0, 1.0)
rate = Number("records per second > 0", 0.0, exclusive=True)


_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([smhd]?)\s*$")


class Duration:
    """An option's type: seconds from ``90``, ``90s``, ``30m``, ``6h`` or ``1d``."""

    pattern = _DURATION

    def __call__(self, text: Any) -> float:
        match = self.pattern.match(str(text))
        if not match:
            raise argparse.ArgumentTypeError(
                f"takes a duration such as 90, 90s, 30m, 6h or 1d, not {text!r}"
            )
        return float(match.group(1)) * _UNITS[match.group(2)]


duration = Duration()


def describe_duration(seconds: float) -> str:
    """``86400`` -> ``1d``: the shortest exact way to write a duration."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


# --- the options ------------------------------------------------------------------------------


class DatalakeOptions(PipelineOptions):
    """Where the datalake is, how rows are written to it, and what a run reports."""

    api_settable = ("batch_size",)

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--dsn",
            default=None,
            help="Postgres DSN; default $TERMIDATOR_DSN, else the embedded datalake",
        )
        parser.add_argument(
            "--batch_size",
            type=WholeNumber(1, 1_000_000),
            default=DEFAULT_BATCH_SIZE,
            help=f"rows per COPY + upsert transaction (default {DEFAULT_BATCH_SIZE:,})",
        )
        parser.add_argument(
            "--db_retry",
            type=duration,
            default=DEFAULT_RETRY_S,
            help="how long a lost database connection is retried before the run fails"
            f" (default {describe_duration(DEFAULT_RETRY_S)})",
        )
        parser.add_argument(
            "--quiet", action="store_true", help="no progress while the run goes on"
        )
        parser.add_argument(
            "--progress_every",
            type=duration,
            default=10.0,
            help="when the output is not a terminal: a progress line this often (default 10s)",
        )


class IngestOptions(PipelineOptions):
    """What a bounded ingestion reads."""

    api_settable = ("max_bad_fraction",)

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--input",
            action="append",
            default=None,
            help="dataset file, glob or directory (its .json/.jsonl files, gzipped or not,"
            " recursively); repeatable",
        )
        parser.add_argument(
            "--max_bad_fraction",
            type=fraction,
            default=0.5,
            help="stop when more than this share of the records are dead letters (measured"
            " on the first few thousand and at the end; default 0.5)",
        )


class EmotionOptions(PipelineOptions):
    """Emotion analysis: which model, where and how it runs.

    ``--emotions`` is the one switch that turns inline classification on in the
    ``reviews`` and ``stream`` pipelines.
    """

    api_settable = ("emotions", "model", "dtype", "max_tokens", "torch_threads", "limit")

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--emotions",
            action="store_true",
            help="classify the emotion of each review while ingesting it",
        )
        parser.add_argument(
            "--model",
            default=DEFAULT_MODEL,
            help="emotion model: the offline default, a Hugging Face model id, or a local path",
        )
        parser.add_argument("--device", default="cpu", help="cpu or cuda")
        parser.add_argument(
            "--dtype",
            default="auto",
            choices=DTYPES,
            help="inference precision; auto: the default model measures int8, float32 and bfloat16"
            " on this CPU once (cached) and keeps the fastest; float32 on a GPU",
        )
        parser.add_argument(
            "--max_tokens",
            type=WholeNumber(2, 512),
            default=256,
            help="truncate texts to this many tokens",
        )
        parser.add_argument(
            "--torch_threads",
            type=WholeNumber(1, 64),
            default=1,
            help="torch threads per worker process",
        )
        parser.add_argument(
            "--limit",
            type=WholeNumber(0),
            default=None,
            help="run emotions: classify at most this many reviews",
        )


class StreamOptions(PipelineOptions):
    """The stream: what it follows, when it stops, its event-time windows.

    Durations take a number of seconds or a suffix: ``90s``, ``30m``, ``6h``, ``1d``.
    """

    api_settable = (
        "dataset",
        "stop_after",
        "stop_after_idle",
        "rate",
        "window",
        "allowed_lateness",
        "poll_interval",
        "stats_every",
    )

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--dataset",
            default="reviews",
            choices=("reviews", "products"),
            help="landing zone to follow: reviews or products (default reviews)",
        )
        parser.add_argument(
            "--stop-after",
            "--stop_after",
            dest="stop_after",
            type=duration,
            default=None,
            help="stop following after this long (default: run until interrupted)",
        )
        parser.add_argument(
            "--stop-after-idle",
            "--stop_after_idle",
            dest="stop_after_idle",
            type=duration,
            default=None,
            help="stop once no new file has landed for this long",
        )
        parser.add_argument(
            "--replay",
            default=None,
            help="stream this dataset file instead of following the landing zone",
        )
        parser.add_argument(
            "--rate",
            type=rate,
            default=None,
            help="--replay: records per second (default: as read)",
        )
        parser.add_argument(
            "--window",
            type=duration,
            default=86400.0,
            help="event-time window of review_stats (default 1d)",
        )
        parser.add_argument(
            "--allowed-lateness",
            "--allowed_lateness",
            dest="allowed_lateness",
            type=duration,
            default=86400.0,
            help="late reviews within this still update their window's row (default 1d)",
        )
        parser.add_argument(
            "--poll-interval",
            "--poll_interval",
            dest="poll_interval",
            type=duration,
            default=1.0,
            help="how often the landing zone is listed when idle (default 1s)",
        )
        parser.add_argument(
            "--stats-every",
            "--stats_every",
            dest="stats_every",
            type=duration,
            default=30.0,
            help="how often review_stats rows of running windows are refreshed (default 30s)",
        )
        parser.add_argument(
            "--landing",
            default=None,
            help="landing zone root (default $TERMIDATOR_HOME/landing)",
        )


# --- parsing, strictly ----------------------------------------------------------------------


class _StrictParser(_BeamArgumentParser):
    """Beam's parser, with errors raised as UsageError instead of exiting the process."""

    def error(self, message):
        found = re.match(r"argument ([^/:\s]+)\S*: (.*)", message)
        if found:
            flag, text = found.groups()
            choice = re.match(r"invalid choice: (.*?) \(choose from (.*)\)", text)
            if choice:
                text = (
                    f"takes one of: {choice.group(2).replace(chr(39), '')}, not {choice.group(1)}"
                )
            message = f"{flag} {text}"
        raise UsageError(message)


def _parser(classes: Optional[Iterable[type]] = None) -> _StrictParser:
    """A parser of every pipeline option Beam knows (as Beam builds its own), or of
    ``classes`` alone."""
    parser = _StrictParser(allow_abbrev=False, add_help=False)
    seen: dict[str, type] = {}
    for cls in classes or PipelineOptions.__subclasses__():
        seen.setdefault(str(cls), cls)
    for cls in seen.values():
        cls._add_argparse_args(parser)
    return parser


def flag_names(parser: argparse.ArgumentParser) -> list[str]:
    """Every ``--flag`` a parser knows."""
    return sorted({s for a in parser._actions for s in a.option_strings if s.startswith("--")})


def parse(argv: Sequence[str]) -> PipelineOptions:
    """Pipeline options from a command line; an unknown flag or a bad value is a
    UsageError naming the nearest valid flag."""
    argv = list(argv)
    for index, arg in enumerate(argv):
        name = arg.removeprefix("--runner=")
        given = name != arg or argv[index - 1 : index] == ["--runner"]
        if given and name.lower() in ("dask", "daskrunner"):
            try:  # Beam has no short name for it; the import adds the --dask_* options
                from pipelines.dask_runner import RUNNER
            except ModuleNotFoundError as error:
                raise UsageError(
                    f"--runner DaskRunner needs the dask extra ({error.name} is missing):"
                    " pip install -e '.[dask]'"
                ) from None
            argv[index] = arg.removesuffix(name) + RUNNER
    parser = _parser()
    _, unknown = parser.parse_known_args(list(argv))
    for arg in unknown:
        if arg.startswith("-"):
            name = arg.split("=", 1)[0]
            near = difflib.get_close_matches(name, flag_names(parser), n=1, cutoff=0.6)
            hint = f"; did you mean {near[0]}?" if near else "; see --help"
            raise UsageError(f"unknown option {name}{hint}")
        raise UsageError(f"unexpected argument {arg!r}: options take the form --name value")
    return PipelineOptions(list(argv))


def option_help(classes: Iterable[type]) -> str:
    """The options of the given classes, one group each (for ``run PIPELINE --help``)."""
    parser = argparse.ArgumentParser(add_help=False, usage=argparse.SUPPRESS)
    for cls in classes:
        group = parser.add_argument_group(cls.__doc__.split("\n")[0].rstrip("."))
        cls._add_argparse_args(group)
    return parser.format_help().strip()


# --- what the REST job API may set ------------------------------------------------------------

# Beam options a job over the API may set, with ranges here (Beam's own parser has none).
# Anything that chooses where or what code runs (runner, job_endpoint, environment_*, ...)
# comes only from the service's own configuration.
API_BEAM_OPTIONS: Mapping[str, Callable[[str], Any]] = {
    "direct_num_workers": WholeNumber(1, 64),
}


def api_options(classes: Iterable[type]) -> dict[str, argparse.Action]:
    """The options of ``classes`` a caller of the REST job API may set, by name, with the
    argparse action that validates each (type, choices, range)."""
    classes = list(classes)
    parser = _parser(classes)
    allowed = {name for cls in classes for name in getattr(cls, "api_settable", ())}
    actions = {a.dest: a for a in parser._actions if a.dest in allowed}
    for name, kind in API_BEAM_OPTIONS.items():
        actions[name] = argparse.Action([f"--{name}"], name, type=kind)
    return actions


def api_argv(
    actions: Mapping[str, argparse.Action],
    options: Mapping[str, Any],
    choices: Optional[Mapping[str, Sequence[str]]] = None,
) -> list[str]:
    """``--name=value`` flags for options given over the API, each checked against its
    action (and ``choices`` the service sets, e.g. the models it offers); else UsageError."""
    argv = []
    for name, value in options.items():
        action = actions.get(str(name))
        if action is None:
            raise UsageError(
                f"option {name!r} is not allowed here; allowed: {', '.join(sorted(actions))}"
            )
        flag = action.option_strings[0]
        if action.nargs == 0:  # a switch: true or false
            if not isinstance(value, bool):
                raise UsageError(f"option {name!r} takes true or false, not {value!r}")
            argv += [flag] if value else []
            continue
        if isinstance(value, (bool, list, dict)) or value is None:
            raise UsageError(f"option {name!r} takes one value, not {value!r}")
        text = str(value)
        allowed = (choices or {}).get(name) or action.choices
        if allowed is not None and text not in allowed:
            raise UsageError(f"option {name!r} takes one of {', '.join(allowed)}, not {text!r}")
        if action.type is not None:
            try:
                action.type(text)
            except (argparse.ArgumentTypeError, ValueError) as error:
                raise UsageError(f"option {name!r} {error}") from None
        argv.append(f"{flag}={text}")
    return argv
