"""Jobs: pipelines started over the API, each a separate ``python -m pipelines run`` process.

A job names a pipeline, input files (only under the configured input roots, matched
here so that the process gets plain paths), and a few allowed options. Its run in
``pipeline_runs`` is found by the ``--job_name`` the job passes; its output goes to a
log file under ``TERMIDATOR_HOME/jobs``. Cancelling sends SIGINT, then SIGTERM, then
SIGKILL to the job's process group.
"""

from __future__ import annotations

import dataclasses
import datetime
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
from typing import Any, Optional, Sequence

import psycopg

from pipelines.cli import NEEDS_INPUT

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
_RUNNER = ("runner", "direct_num_workers", "direct_running_mode", "job_endpoint", "parallelism")
_EMOTION = ("emotions", "model", "device", "dtype", "max_tokens", "torch_threads")
# Options a job may set, per pipeline; anything else (and --dsn) is the service's call.
ALLOWED_OPTIONS: dict[str, frozenset] = {
    "reviews": frozenset(("batch_size", *_RUNNER, *_EMOTION)),
    "products": frozenset(("batch_size", *_RUNNER)),
    "emotions": frozenset(("batch_size", "limit", *_RUNNER, *_EMOTION)),
    "stream": frozenset(
        (
            "batch_size",
            "dataset",
            "stop_after",
            "stop_after_idle",
            "rate",
            "window",
            "allowed_lateness",
            "poll_interval",
            *_RUNNER,
            *_EMOTION,
        )
    ),
}
_OPTION_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
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
    """Files the patterns match, each inside an input root (symlinks resolved); else JobError."""
    if not roots:
        raise JobError(403, "no_input_roots", "this service has no input roots (--input-root)")
    resolved_roots = [root.resolve() for root in roots]
    files: dict[str, None] = {}
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern or "\x00" in pattern:
            raise JobError(422, "bad_input", f"input must be a path or glob, not {pattern!r}")
        if "://" in pattern:
            raise JobError(
                403, "input_outside_roots", f"{pattern!r}: only local files may be named"
            )
        full = pattern if os.path.isabs(pattern) else str(resolved_roots[0] / pattern)
        literal = Path(os.path.realpath(re.split(r"[*?\[]", full, maxsplit=1)[0] or "/"))
        if not any(_inside(literal, r) or _inside(r, literal) for r in resolved_roots):
            raise JobError(
                403,
                "input_outside_roots",
                f"{pattern!r} is outside the input roots ({', '.join(map(str, resolved_roots))})",
            )
        matched = sorted(glob.glob(full))
        if not matched:
            raise JobError(422, "no_input", f"no file matches {pattern!r}")
        for path in matched:
            real = Path(os.path.realpath(path))
            if not any(_inside(real, root) for root in resolved_roots):
                raise JobError(
                    403, "input_outside_roots", f"{path!r} resolves outside the input roots"
                )
            if real.is_file():
                files[str(real)] = None
    if not files:
        raise JobError(422, "no_input", "the inputs match no file")
    return list(files)


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def option_arguments(pipeline: str, options: dict[str, Any]) -> list[str]:
    """``--name=value`` flags for the allowed options (bools as bare flags); else JobError."""
    allowed = ALLOWED_OPTIONS[pipeline]
    argv = []
    for raw_name, value in options.items():
        name = str(raw_name).replace("-", "_")
        if not _OPTION_NAME.match(name) or name not in allowed:
            raise JobError(
                422,
                "option_not_allowed",
                f"option {raw_name!r} is not allowed for pipeline {pipeline!r};"
                f" allowed: {', '.join(sorted(allowed))}",
            )
        values = value if isinstance(value, list) else [value]
        for item in values:
            if isinstance(item, bool):
                if item:
                    argv.append(f"--{name}")
            elif isinstance(item, (int, float, str)) and "\x00" not in str(item):
                argv.append(f"--{name}={item}")
            else:
                raise JobError(422, "bad_option", f"option {raw_name!r}: {item!r} is not a value")
    return argv


class JobManager:
    """Starts jobs (at most ``max_running`` at once, the rest queued), watches, cancels."""

    def __init__(
        self,
        dsn: str,
        home: Path,
        input_roots: Sequence[Path],
        max_running: int = 2,
        pipelines: Sequence[str] = tuple(ALLOWED_OPTIONS),
    ):
        self.dsn = dsn
        self.home = Path(home)
        self.input_roots = [Path(r) for r in input_roots]
        self.max_running = max_running
        self.pipelines = [p for p in pipelines if p in ALLOWED_OPTIONS]
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
            elif pipeline in NEEDS_INPUT:
                argv += [f"--input={f}" for f in files]
            else:
                raise JobError(422, "bad_input", f"pipeline {pipeline!r} takes no input")
        elif pipeline in NEEDS_INPUT:
            raise JobError(422, "no_input", f"pipeline {pipeline!r} needs input files")
        argv += option_arguments(pipeline, options)
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
            with psycopg.connect(self.dsn, autocommit=True, connect_timeout=5) as conn:
                conn.execute(
                    "UPDATE pipeline_runs SET state = 'CANCELLED',"
                    " finished_at = coalesce(finished_at, now())"
                    " WHERE options->>'job_name' = %s AND state IN ('RUNNING', 'FAILED')",
                    (job.job_name,),
                )
        except psycopg.Error:
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
            with psycopg.connect(self.dsn, autocommit=True, connect_timeout=5) as conn:
                row = conn.execute(
                    "SELECT run_id, state, runner, counters, started_at, finished_at"
                    " FROM pipeline_runs WHERE options->>'job_name' = %s"
                    " ORDER BY started_at DESC LIMIT 1",
                    (job.job_name,),
                ).fetchone()
        except psycopg.Error as error:
            return {"error": f"cannot read pipeline_runs: {str(error).strip()[:200]}"}
        if row is None:
            return None
        run_id, state, runner, counters, started, finished = row
        return {
            "run_id": str(run_id),
            "state": state,
            "runner": runner,
            "counters": counters,
            "started_at": started.isoformat(),
            "finished_at": finished and finished.isoformat(),
        }


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
