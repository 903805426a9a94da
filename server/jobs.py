"""Jobs: pipelines started over the API, each a separate ``python -m pipelines run`` process.

A job names a pipeline, input files (only under the configured input roots, matched
here so that the process gets plain paths), and a few allowed options. Its run in
``pipeline_runs`` is found by the ``--job_name`` the job passes; its output goes to a
log file under ``TERMIDATOR_HOME/jobs``. Cancelling sends SIGINT, then SIGTERM, then
SIGKILL to the job's process group.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import decimal
import glob
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Sequence, Union

import psycopg
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    StringConstraints,
    create_model,
    with_config,
)
from typing_extensions import TypedDict

from connectors import datalake
from pipelines import cli
from pipelines import options as options_module
from pipelines.options import UsageError
from transforms.emotion_model import DEFAULT_MODEL

ROOT = Path(__file__).resolve().parent.parent  # the project: `python -m pipelines` runs here
QUEUED, RUNNING, DONE, FAILED, CANCELLING, CANCELLED = (
    "QUEUED",
    "RUNNING",
    "DONE",
    "FAILED",
    "CANCELLING",
    "CANCELLED",
)
FINAL = frozenset({DONE, FAILED, CANCELLED})
# After SIGINT (a stream drains, a batch run stops): SIGTERM at 30 s, SIGKILL at 40 s.
_ESCALATION = ((30.0, signal.SIGTERM), (40.0, signal.SIGKILL))


class JobError(Exception):
    """A job request that cannot run; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


@dataclasses.dataclass
class Job:
    """One job: what it runs, its process and how it ended."""

    id: str
    pipeline: str
    inputs: list[str]
    options: dict[str, Any]
    argv: list[str]
    log: Path
    state: str = QUEUED
    submitted_at: datetime.datetime = dataclasses.field(default_factory=_now)
    started_at: Optional[datetime.datetime] = None
    finished_at: Optional[datetime.datetime] = None
    exit_code: Optional[int] = None
    process: Optional[subprocess.Popen] = None
    cancel_requested_at: Optional[float] = None
    signals_sent: int = 0

    @property
    def job_name(self) -> str:
        return f"termidator-job-{self.id}"


def resolve_inputs(patterns: Sequence[str], roots: Sequence[Path]) -> list[str]:
    """Files the patterns match inside the input roots (symlinks resolved); else JobError.

    A pattern that names something outside the roots gets the same answer as one that
    matches nothing, so that an answer never tells which files exist elsewhere, and
    nothing outside the roots is even listed.
    """
    if not roots:
        raise JobError(403, "no_input_roots", "this service has no input roots (--input-root)")
    resolved_roots = [root.resolve() for root in roots]
    files: dict[str, None] = {}
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern or "\x00" in pattern:
            raise JobError(422, "bad_input", f"input must be a path or glob, not {pattern!r}")
        matched = _matches(pattern, resolved_roots)
        if not matched:
            raise JobError(
                422, "no_input", f"input {pattern!r} matches no file under the input roots"
            )
        files.update(dict.fromkeys(matched))
    return list(files)


def _matches(pattern: str, roots: Sequence[Path]) -> list[str]:
    """The regular files ``pattern`` matches inside ``roots``; relative patterns are read
    from the first root."""
    if "://" in pattern:
        return []
    full = pattern if os.path.isabs(pattern) else str(roots[0] / pattern)
    try:
        literal = Path(os.path.realpath(re.split(r"[*?\[]", full, maxsplit=1)[0] or "/"))
        if not any(_inside(literal, root) for root in roots):
            return []
        found = []
        for path in sorted(glob.glob(full)):
            real = Path(os.path.realpath(path))
            if real.is_file() and any(_inside(real, root) for root in roots):
                found.append(str(real))
        return found
    except (OSError, ValueError):  # a name the file system cannot hold matches no file
        return []


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def allowed_options(pipeline: str) -> dict[str, argparse.Action]:
    """What a job of ``pipeline`` may set over the API: the api-settable options of the
    option classes the pipeline reads (``pipelines.options``), with their types and ranges."""
    return options_module.api_options(cli.PIPELINES[pipeline]().OPTIONS)


def option_arguments(
    pipeline: str, options: dict[str, Any], models: Sequence[str] = (DEFAULT_MODEL,)
) -> list[str]:
    """``--name=value`` flags for options a caller sent; a name not allowed, or a value of
    the wrong type or range, is a JobError (422). ``model`` must be one the service offers."""
    plain = {name: _plain_number(value) for name, value in options.items()}
    try:
        return options_module.api_argv(allowed_options(pipeline), plain, {"model": models})
    except UsageError as error:
        code = "option_not_allowed" if "not allowed" in str(error) else "bad_option"
        raise JobError(422, code, f"{error} (pipeline {pipeline!r})") from None


def _plain_number(value: Any) -> Any:
    """A float as a plain decimal (``1e-07`` -> ``0.0000001``), as the flags' types read it."""
    if isinstance(value, float):
        return format(decimal.Decimal(repr(value)), "f")
    return value


# --- the request body, as the OpenAPI schema describes it ------------------------------

# A path or glob: relative ones are read from the first input root.
InputPattern = Annotated[
    str, StringConstraints(min_length=1, max_length=4096, pattern=r"^[^\x00]+$")
]
# Inputs per pipeline: (at least, at most) files or globs.
_INPUTS = {"stream": (0, 1), "emotions": (0, 0)}
_MAX_INPUTS = 256
# A duration as ``pipelines.options.duration`` reads it, without the spaces it tolerates.
_DURATION = r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)[smhd]?$"
# What an option means over the API, where its command-line help says more.
_API_HELP = {
    "model": "one of the emotion models this service offers",
    "direct_num_workers": "Beam workers on the direct runner",
}
_EXAMPLES = {
    "reviews": {"input": ["*.jsonl"], "options": {"batch_size": 5000}},
    "products": {"input": ["*.jsonl"], "options": {"max_bad_fraction": 0.1}},
    "emotions": {"options": {"limit": 1000}},
    "stream": {"options": {"stop_after_idle": "30s"}},
}


def request_model(pipelines: Sequence[str], models: Sequence[str]) -> Any:
    """The body of ``POST /v1/jobs``: one model per pipeline (chosen by ``pipeline``), with
    the inputs it takes and the options it allows, each with its type and range, so that
    what the OpenAPI schema accepts is what a job accepts."""
    variants = tuple(_job_model(name, models) for name in pipelines)
    if len(variants) == 1:
        return variants[0]
    return Annotated[Union[variants], Field(discriminator="pipeline")]


def _job_model(pipeline: str, models: Sequence[str]) -> type[BaseModel]:
    title = pipeline.title()
    fields = {
        name: Annotated[
            _option_type(action, models), Field(description=_API_HELP.get(name, action.help))
        ]
        for name, action in sorted(allowed_options(pipeline).items())
    }
    options = with_config(ConfigDict(extra="forbid", title=f"{title}Options"))(
        TypedDict(f"{title}Options", fields, total=False)
    )
    needs_input = pipeline in cli.NEEDS_INPUT
    least, most = (1, _MAX_INPUTS) if needs_input else _INPUTS[pipeline]
    return create_model(
        f"{title}Job",
        __config__=ConfigDict(
            extra="forbid",
            json_schema_extra={"examples": [{"pipeline": pipeline, **_EXAMPLES[pipeline]}]},
        ),
        __doc__=f"Run the {pipeline} pipeline: {cli.PIPELINES[pipeline]().DESCRIPTION}",
        pipeline=(Literal[pipeline], ...),
        input=(
            list[InputPattern],
            Field(
                ... if needs_input else [],
                min_length=least,
                max_length=most,
                description="files or globs under the service's input roots",
            ),
        ),
        options=(options, Field(default_factory=dict)),
    )


def _json_integer(value: Any) -> Any:
    """JSON Schema's integers include ``5.0``; ``"5"``, ``true`` and ``5.5`` stay refused."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _option_type(action: argparse.Action, models: Sequence[str]) -> Any:
    """The JSON type of an option: its argparse type, choices and range, as pydantic
    validates them (strictly: ``"5"`` is not a number)."""
    kind = action.type
    if action.nargs == 0:
        return StrictBool
    if action.dest == "model":
        return Literal[tuple(models)]
    if action.choices:
        return Literal[tuple(action.choices)]
    if isinstance(kind, options_module.WholeNumber):
        return Annotated[
            StrictInt,
            Field(ge=kind.minimum, le=kind.maximum),
            BeforeValidator(_json_integer),
        ]
    number = {"strict": True, "allow_inf_nan": False}
    if isinstance(kind, options_module.Number):
        low = {"gt" if kind.exclusive else "ge": kind.minimum}
        return Annotated[float, Field(**low, le=kind.maximum, **number)]
    if isinstance(kind, options_module.Duration):
        seconds = Annotated[float, Field(ge=0, **number)]
        return Union[seconds, Annotated[StrictStr, StringConstraints(pattern=_DURATION)]]
    raise TypeError(f"option --{action.dest}: no JSON type for {kind!r}; add one here")


class JobManager:
    """Starts jobs (at most ``max_running`` at once, the rest queued), watches, cancels."""

    def __init__(
        self,
        dsn: str,
        home: Path,
        input_roots: Sequence[Path],
        max_running: int = 2,
        pipelines: Sequence[str] = tuple(cli.PIPELINES),
        models: Sequence[str] = (DEFAULT_MODEL,),
        job_args: Sequence[str] = (),
    ):
        self.dsn = dsn
        self.home = Path(home)
        self.input_roots = [Path(r) for r in input_roots]
        self.max_running = max_running
        self.pipelines = [p for p in pipelines if p in cli.PIPELINES]
        self.models = tuple(models)
        # The service's own flags for every job (runner, job endpoint, environment):
        # where and what code runs is never a caller's choice.
        self.job_args = list(job_args)
        self.log_dir = self.home / "jobs"
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    # -- submitting

    def submit(self, pipeline: str, inputs: Sequence[str], options: dict[str, Any]) -> Job:
        if pipeline not in self.pipelines:
            raise JobError(
                422,
                "unknown_pipeline",
                f"unknown pipeline {pipeline!r}; choose one of: {', '.join(self.pipelines)}",
            )
        argv = ["run", pipeline]
        files: list[str] = []
        if inputs:
            files = resolve_inputs(inputs, self.input_roots)
            if pipeline == "stream":
                if len(files) != 1:
                    raise JobError(422, "bad_input", "a stream job replays at most one file")
                argv.append(f"--replay={files[0]}")
            elif pipeline in cli.NEEDS_INPUT:
                argv += [f"--input={f}" for f in files]
            else:
                raise JobError(422, "bad_input", f"pipeline {pipeline!r} takes no input")
        elif pipeline in cli.NEEDS_INPUT:
            raise JobError(422, "no_input", f"pipeline {pipeline!r} needs input files")
        argv += option_arguments(pipeline, options, self.models) + self.job_args
        job_id = uuid.uuid4().hex[:16]
        self.log_dir.mkdir(parents=True, exist_ok=True)
        job = Job(job_id, pipeline, files, dict(options), argv, self.log_dir / f"{job_id}.log")
        job.argv.append(f"--job_name={job.job_name}")
        with self._lock:
            self._jobs[job.id] = job
        self.poll()
        return job

    # -- watching

    def poll(self) -> None:
        """Reap finished processes, escalate cancellations, start queued jobs."""
        with self._lock:
            for job in self._jobs.values():
                if job.process is not None and job.state in (RUNNING, CANCELLING):
                    self._reap(job)
            running = sum(job.state in (RUNNING, CANCELLING) for job in self._jobs.values())
            for job in sorted(self._jobs.values(), key=lambda j: j.submitted_at):
                if running >= self.max_running:
                    break
                if job.state == QUEUED:
                    self._start(job)
                    running += job.state == RUNNING

    def _start(self, job: Job) -> None:
        env = {
            **os.environ,
            "TERMIDATOR_DSN": self.dsn,
            "TERMIDATOR_HOME": str(self.home),
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        env.pop("TERMIDATOR_API_TOKEN", None)  # jobs do not call the service
        with open(job.log, "ab") as log:
            try:
                job.process = subprocess.Popen(
                    [sys.executable, "-m", "pipelines", *job.argv],
                    cwd=ROOT,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group: cancel reaches children
                )
            except OSError as error:  # it fails, said in its log; the queue moves on
                log.write(f"cannot start the job: {error}\n".encode())
                job.state, job.finished_at = FAILED, _now()
                return
        job.state, job.started_at = RUNNING, _now()

    def _reap(self, job: Job) -> None:
        code = job.process.poll()
        if code is None:
            if job.state == CANCELLING:
                self._escalate(job)
            return
        job.exit_code, job.finished_at = code, _now()
        if job.state == CANCELLING:
            job.state = CANCELLED
            self._record_cancelled(job)
        else:
            job.state = DONE if code == 0 else FAILED

    def _escalate(self, job: Job) -> None:
        waited = time.monotonic() - (job.cancel_requested_at or time.monotonic())
        for step, (after, sig) in enumerate(_ESCALATION, start=1):
            if job.signals_sent == step and waited >= after:
                self._signal(job, sig)

    def _signal(self, job: Job, sig: int) -> None:
        try:
            os.killpg(job.process.pid, sig)
        except ProcessLookupError:
            pass
        job.signals_sent += 1

    def _record_cancelled(self, job: Job) -> None:
        try:
            datalake.cancel_runs_of_job(self.dsn, job.job_name)
        except (psycopg.Error, datalake.DatalakeUnavailable):
            pass  # the job's own record stands

    # -- cancelling and shutting down

    def cancel(self, job_id: str) -> Job:
        with self._lock:
            job = self.get(job_id)
            if job.state == QUEUED:
                job.state, job.finished_at = CANCELLED, _now()
            elif job.state == RUNNING:
                job.state = CANCELLING
                job.cancel_requested_at = time.monotonic()
                self._signal(job, signal.SIGINT)
        return job

    def shutdown(self, wait_s: float = 10.0) -> None:
        """Cancel every job that still runs (jobs are children of the service)."""
        for job in list(self._jobs.values()):
            if job.state in (RUNNING, QUEUED):
                self.cancel(job.id)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and any(
            j.state == CANCELLING for j in self._jobs.values()
        ):
            self.poll()
            time.sleep(0.1)
        for job in self._jobs.values():
            if job.state == CANCELLING:
                self._signal(job, signal.SIGKILL)

    # -- reading

    def get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise JobError(404, "unknown_job", f"no job {job_id!r} (GET /v1/jobs lists them)")
        return job

    def jobs(self) -> list[Job]:
        return sorted(self._jobs.values(), key=lambda j: j.submitted_at, reverse=True)

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for job in self._jobs.values():
            counts[job.state] = counts.get(job.state, 0) + 1
        return counts

    def describe(self, job: Job, log_lines: int = 20) -> dict[str, Any]:
        """The job as the API shows it: state, times, its run's counters, the log's tail."""
        return {
            "id": job.id,
            "pipeline": job.pipeline,
            "input": job.inputs,
            "options": job.options,
            "state": job.state,
            "exit_code": job.exit_code,
            "submitted_at": job.submitted_at.isoformat(),
            "started_at": job.started_at and job.started_at.isoformat(),
            "finished_at": job.finished_at and job.finished_at.isoformat(),
            "command": ["python", "-m", "pipelines", *job.argv],
            "run": self._run_of(job),
            "log_tail": tail(job.log, log_lines),
        }

    def _run_of(self, job: Job) -> Optional[dict[str, Any]]:
        """The job's latest row in ``pipeline_runs`` (found by its ``--job_name``)."""
        try:
            return datalake.run_of_job(self.dsn, job.job_name)
        except (psycopg.Error, datalake.DatalakeUnavailable) as error:
            return {"error": f"cannot read pipeline_runs: {datalake.first_line(error)[:200]}"}


def tail(path: Path, lines: int) -> list[str]:
    """The last lines of a log (progress redraws split on carriage returns)."""
    try:
        with open(path, "rb") as log:
            log.seek(0, os.SEEK_END)
            size = log.tell()
            log.seek(max(0, size - 64 * 1024))
            text = log.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return []
    rows = [row for row in text.replace("\r", "\n").splitlines() if row.strip()]
    return rows[-lines:]
