"""The REST service: ``python -m pipelines serve`` (FastAPI + uvicorn, OpenAPI at /docs).

- ``POST /v1/ingest/{dataset}``: an NDJSON body (gzip too), streamed, validated line by
  line, landed as one file for the ``stream`` pipeline; answers accepted and rejected
  counts with each rejection's line and reason; ``Idempotency-Key`` makes retries safe.
- ``POST /v1/jobs``, ``GET /v1/jobs[/{id}]``, ``DELETE /v1/jobs/{id}``: pipelines run as
  separate processes on files under the input roots.
- ``GET /v1/health``, ``GET /v1/stats``.

Every error is JSON: ``{"error": {"status", "code", "message"}}``. A bearer token from
``TERMIDATOR_API_TOKEN`` guards everything but health and the docs; without one the
service binds to loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hmac
import ipaddress
import logging
import os
from pathlib import Path
from typing import Any, AsyncIterator, Optional, Union

import psycopg
from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from connectors import datalake, idempotency, landing
from server import ingest
from server.jobs import FINAL, JobError, JobManager

VERSION = "0.1.0"
TOKEN_ENV = "TERMIDATOR_API_TOKEN"
INPUT_ROOTS_ENV = "TERMIDATOR_INPUT_ROOTS"
_LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Settings:
    """How the service runs: its datalake, home, token, input roots and limits."""

    dsn: str
    home: Path
    token: Optional[str] = None
    input_roots: tuple[Path, ...] = ()
    limits: ingest.Limits = ingest.Limits()
    max_jobs: int = 2
    pending_key_stale_s: float = 600.0

    @property
    def landing_root(self) -> Path:
        return landing.landing_root(self.home)


class ApiError(Exception):
    """An answer other than success: HTTP status, a stable code, a message saying what to do."""

    def __init__(
        self, status: int, code: str, message: str, headers: Optional[dict[str, str]] = None
    ):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_response(
    status: int, code: str, message: str, headers: Optional[dict] = None, **extra: Any
) -> JSONResponse:
    body = {"error": {"status": status, "code": code, "message": message, **extra}}
    return JSONResponse(body, status_code=status, headers=headers)


# --- the API's shapes (for /docs) --------------------------------------------------


class ErrorDetail(BaseModel):
    status: int
    code: str = Field(examples=["unsupported_media_type"])
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class RejectedLine(BaseModel):
    line: int = Field(description="1-based line number in the request body")
    reason: str


class IngestAnswer(BaseModel):
    dataset: str
    file: Optional[str] = Field(description="landing file holding the accepted lines")
    lines: int = Field(description="non-blank lines received")
    accepted: int
    rejected: int
    rejections: list[RejectedLine]
    rejections_truncated: bool
    idempotency_key: Optional[str]


class JobRequest(BaseModel):
    pipeline: str = Field(examples=["reviews"])
    input: list[str] = Field(
        default_factory=list, description="files or globs under the service's input roots"
    )
    options: dict[str, Union[bool, int, float, str, list[Union[bool, int, float, str]]]] = Field(
        default_factory=dict, examples=[{"batch_size": 5000}]
    )


class JobRun(BaseModel):
    run_id: Optional[str] = None
    state: Optional[str] = None
    runner: Optional[str] = None
    counters: Optional[dict[str, Any]] = None
    started_at: Optional[str] = None
    finished_at: Optional[str] = None
    error: Optional[str] = None


class JobView(BaseModel):
    id: str
    pipeline: str
    input: list[str]
    options: dict[str, Any]
    state: str = Field(description="QUEUED, RUNNING, DONE, FAILED, CANCELLING or CANCELLED")
    exit_code: Optional[int]
    submitted_at: str
    started_at: Optional[str]
    finished_at: Optional[str]
    command: list[str]
    run: Optional[JobRun] = Field(description="the job's row in pipeline_runs")
    log_tail: list[str]


_ERRORS = {
    status: {"model": ErrorBody, "description": text}
    for status, text in (
        (400, "bad request"),
        (401, "missing or wrong bearer token"),
        (403, "input outside the input roots"),
        (404, "unknown dataset or job"),
        (409, "conflict"),
        (413, "body or line too large"),
        (415, "not NDJSON, or an unsupported Content-Encoding"),
        (422, "invalid request"),
    )
}
_NDJSON_BODY = {
    "requestBody": {
        "required": True,
        "description": "one record per line (NDJSON), optionally Content-Encoding: gzip",
        "content": {
            media: {"schema": {"type": "string", "format": "binary"}}
            for media in sorted(ingest.NDJSON_TYPES)
        },
    }
}


# --- the app -----------------------------------------------------------------------


def create_app(settings: Settings) -> FastAPI:
    """The FastAPI app for these settings (the datalake must be migrated already)."""
    jobs = JobManager(settings.dsn, settings.home, settings.input_roots, settings.max_jobs)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async def watch_jobs() -> None:
            while True:  # off the event loop: polling starts processes and may query
                try:
                    await run_in_threadpool(jobs.poll)
                except Exception:  # noqa: BLE001 - the watcher must outlive one bad poll
                    _LOG.exception("polling the jobs failed; retrying")
                await asyncio.sleep(0.5)

        watcher = asyncio.create_task(watch_jobs())
        try:
            yield
        finally:
            watcher.cancel()
            await run_in_threadpool(jobs.shutdown)

    app = FastAPI(
        title="TermiDator",
        version=VERSION,
        description="Stream Amazon review records into the datalake; start and watch jobs.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.jobs = jobs
    bearer = HTTPBearer(auto_error=False, description=f"the token in ${TOKEN_ENV}")

    def authorize(credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> None:
        if settings.token is None:
            return
        given = credentials.credentials.encode() if credentials else b""
        if not hmac.compare_digest(given, settings.token.encode()):
            raise ApiError(
                401,
                "unauthorized",
                f"send Authorization: Bearer <token> (the service's ${TOKEN_ENV})",
                {"WWW-Authenticate": "Bearer"},
            )

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError) -> JSONResponse:
        return error_response(error.status, error.code, error.message, error.headers)

    @app.exception_handler(JobError)
    async def _job_error(request: Request, error: JobError) -> JSONResponse:
        return error_response(error.status, error.code, error.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        message = str(error.detail)
        if error.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path} (see /docs)"
        return error_response(error.status_code, code, message, getattr(error, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = [
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in error.errors()
        ]
        return error_response(422, "invalid_request", "; ".join(problems) or "invalid request")

    @app.exception_handler(psycopg.OperationalError)
    @app.exception_handler(datalake.DatalakeUnavailable)
    async def _no_datalake(request: Request, error: Exception) -> JSONResponse:
        _LOG.warning("datalake unavailable: %s", str(error).strip())
        return error_response(503, "datalake_unavailable", "the datalake cannot be reached")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        _LOG.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(
            500, "internal_error", f"{type(error).__name__}: the service log has the details"
        )

    @app.get("/v1/health", tags=["service"])
    async def health() -> JSONResponse:
        """Liveness and whether the datalake answers (no token needed)."""
        try:
            await run_in_threadpool(datalake.ping, settings.dsn)
        except psycopg.Error:
            return JSONResponse({"status": "degraded", "datalake": "unavailable"}, 503)
        return JSONResponse({"status": "ok", "datalake": "ok", "version": VERSION})

    @app.get("/v1/stats", tags=["service"], dependencies=[Depends(authorize)])
    async def stats() -> dict[str, Any]:
        """Rows per table, dead letters by stage, the landing backlog, jobs by state."""
        return await run_in_threadpool(_stats, settings, jobs)

    @app.post(
        "/v1/ingest/{dataset}",
        tags=["ingest"],
        status_code=202,
        response_model=IngestAnswer,
        responses=_ERRORS,
        openapi_extra=_NDJSON_BODY,
        dependencies=[Depends(authorize)],
    )
    async def ingest_records(
        dataset: str,
        request: Request,
        idempotency_key: Optional[str] = Header(
            None, description="retries with the same key land nothing twice"
        ),
    ) -> JSONResponse:
        """Land NDJSON records of ``dataset`` (reviews or products) for the stream pipeline."""
        return await _ingest(settings, dataset, request, idempotency_key)

    @app.post(
        "/v1/jobs",
        tags=["jobs"],
        status_code=202,
        response_model=JobView,
        responses=_ERRORS,
        dependencies=[Depends(authorize)],
    )
    async def submit_job(job: JobRequest) -> JSONResponse:
        """Start a pipeline as a separate process (``python -m pipelines run ...``)."""
        submitted = await run_in_threadpool(jobs.submit, job.pipeline, job.input, job.options)
        view = await run_in_threadpool(jobs.describe, submitted)
        return JSONResponse(view, 202, headers={"Location": f"/v1/jobs/{submitted.id}"})

    @app.get("/v1/jobs", tags=["jobs"], dependencies=[Depends(authorize)])
    async def list_jobs() -> dict[str, Any]:
        """Every job of this service, newest first."""
        return {
            "jobs": [
                {
                    "id": j.id,
                    "pipeline": j.pipeline,
                    "state": j.state,
                    "exit_code": j.exit_code,
                    "submitted_at": j.submitted_at.isoformat(),
                    "finished_at": j.finished_at and j.finished_at.isoformat(),
                }
                for j in jobs.jobs()
            ]
        }

    @app.get(
        "/v1/jobs/{job_id}",
        tags=["jobs"],
        response_model=JobView,
        responses=_ERRORS,
        dependencies=[Depends(authorize)],
    )
    async def get_job(job_id: str) -> dict[str, Any]:
        """A job: state, start and end, its run's counters, the last log lines."""
        return await run_in_threadpool(jobs.describe, jobs.get(job_id))

    @app.delete(
        "/v1/jobs/{job_id}",
        tags=["jobs"],
        status_code=202,
        response_model=JobView,
        responses=_ERRORS,
        dependencies=[Depends(authorize)],
    )
    async def cancel_job(job_id: str) -> JSONResponse:
        """Cancel a job: SIGINT, then SIGTERM and SIGKILL if it does not stop."""
        job = jobs.get(job_id)
        if job.state in FINAL:
            raise ApiError(409, "job_finished", f"job {job_id} already ended {job.state}")
        jobs.cancel(job_id)
        return JSONResponse(await run_in_threadpool(jobs.describe, job), 202)

    return app


def _stats(settings: Settings, jobs: JobManager) -> dict[str, Any]:
    return {
        **datalake.overview(settings.dsn),
        "landing": {
            "root": str(settings.landing_root),
            "backlog": landing.backlog(settings.dsn, settings.landing_root),
        },
        "jobs": jobs.counts(),
    }


# --- ingest --------------------------------------------------------------------------


def _media_type(request: Request) -> tuple[str, dict[str, str]]:
    raw = request.headers.get("content-type", "")
    media, *params = [part.strip() for part in raw.split(";")]
    values = dict(p.split("=", 1) for p in params if "=" in p)
    return media.lower(), {k.strip().lower(): v.strip().strip('"') for k, v in values.items()}


def _check_request(settings: Settings, dataset: str, request: Request, key: Optional[str]) -> bool:
    """Validate what the headers say; returns whether the body is gzip."""
    if dataset not in landing.DATASETS:
        raise ApiError(
            404,
            "unknown_dataset",
            f"unknown dataset {dataset!r}; POST to "
            + " or ".join(f"/v1/ingest/{d}" for d in landing.DATASETS),
        )
    media, params = _media_type(request)
    if media not in ingest.NDJSON_TYPES:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Content-Type must be application/x-ndjson (one JSON record per line), not"
            f" {media or 'none'!r}",
        )
    charset = params.get("charset", "utf-8").lower()
    if charset not in ("utf-8", "utf8"):
        raise ApiError(415, "unsupported_charset", f"the body must be UTF-8, not {charset}")
    encoding = request.headers.get("content-encoding", "identity").strip().lower() or "identity"
    if encoding not in ingest.ENCODINGS:
        raise ApiError(
            415,
            "unsupported_content_encoding",
            f"Content-Encoding {encoding!r} is not supported: send gzip or nothing",
        )
    declared = request.headers.get("content-length")
    limit = settings.limits.max_body_bytes
    if declared and declared.isdigit() and int(declared) > limit + (64 << 10):
        raise ApiError(
            413, "payload_too_large", f"the body is over {limit:,} bytes; send smaller batches"
        )
    if key is not None and not (0 < len(key) <= 255 and key.isascii() and key.isprintable()):
        raise ApiError(
            400, "bad_idempotency_key", "Idempotency-Key must be 1 to 255 printable ASCII chars"
        )
    return encoding != "identity"


async def _ingest(
    settings: Settings, dataset: str, request: Request, key: Optional[str]
) -> JSONResponse:
    gzipped = _check_request(settings, dataset, request, key)
    directory = await run_in_threadpool(landing.landing_dir, dataset, settings.landing_root)
    name = ingest.landing_name(dataset, None)
    stored = None
    if key is not None:
        try:
            name, stored = await run_in_threadpool(
                idempotency.begin,
                settings.dsn,
                dataset,
                key,
                settings.pending_key_stale_s,
                ingest.landing_name(dataset, key),
            )
        except idempotency.KeyInProgress:
            raise ApiError(
                409,
                "request_in_progress",
                "a request with this Idempotency-Key is still being processed; retry later",
            ) from None
    body = request.stream()
    if stored is not None:
        return await _replay(settings, body, stored, gzipped)
    work = None
    try:  # to the last step: a failure leaves nothing half-landed and the key free again
        work = ingest.NdjsonIngest(dataset, directory, name, gzipped, settings.limits)
        async for chunk in body:
            if chunk:
                await run_in_threadpool(work.feed, chunk)
        await run_in_threadpool(work.finish)
        file = await run_in_threadpool(work.commit)
        answer = work.answer(file, key)
        # The rejected lines' dead letters and the key's answer; if this fails after the
        # file landed, a retry (same key, same file name) lands it again and writes them.
        await run_in_threadpool(
            idempotency.finish,
            settings.dsn,
            dataset,
            key,
            work.reader.digest,
            202,
            answer,
            work.dead_letters(),
        )
    except BaseException as error:
        if work is not None:
            work.abort()  # removes the temp file; a committed file stays
        if key is not None:
            with contextlib.suppress(Exception):  # the datalake may be what failed
                await run_in_threadpool(idempotency.release, settings.dsn, dataset, key)
        if isinstance(error, ingest.LimitExceeded):
            await _drain(body, 4 * settings.limits.max_body_bytes)
            raise ApiError(413, "payload_too_large", str(error)) from None
        if isinstance(error, ingest.BadBody):
            raise ApiError(400, "bad_body", str(error)) from None
        raise
    return JSONResponse(answer, 202)


async def _replay(
    settings: Settings, body, stored: idempotency.Stored, gzipped: bool
) -> JSONResponse:
    """A retried request: same body, same answer; the body is only read to compare it."""
    reader = ingest.BodyReader(gzipped, settings.limits)
    try:
        async for chunk in body:
            for _ in reader.feed(chunk):
                pass
        for _ in reader.finish():
            pass
    except ingest.LimitExceeded as error:
        raise ApiError(413, "payload_too_large", str(error)) from None
    except ingest.BadBody as error:
        raise ApiError(400, "bad_body", str(error)) from None
    if reader.digest != stored.body_sha256:
        raise ApiError(
            422,
            "idempotency_key_reused",
            "this Idempotency-Key was used with a different body; use a new key",
        )
    return JSONResponse(stored.response, stored.status, headers={"Idempotent-Replayed": "true"})


async def _drain(body, limit: int) -> None:
    """Read what the client still sends (up to ``limit``), so that it gets our answer."""
    seen = 0
    with contextlib.suppress(Exception):
        async for chunk in body:
            seen += len(chunk)
            if seen > limit:
                break


# --- python -m pipelines serve ------------------------------------------------------


def is_loopback(host: str) -> bool:
    """Whether ``host`` only listens on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``python -m pipelines serve``."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--dsn", default=None, help="default $TERMIDATOR_DSN, else embedded")
    parser.add_argument(
        "--input-root",
        action="append",
        default=None,
        help=f"directory jobs may read (repeatable; default ${INPUT_ROOTS_ENV},"
        " else $TERMIDATOR_HOME/inputs)",
    )
    parser.add_argument("--max-body-mb", type=float, default=64, help="ingest body limit")
    parser.add_argument("--max-line-kb", type=float, default=1024, help="ingest line limit")
    parser.add_argument("--max-jobs", type=int, default=2, help="jobs running at once")


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from the flags and the environment; refuses a public bind without a token."""
    from pipelines.options import UsageError

    token = os.environ.get(TOKEN_ENV) or None
    if token is None and not is_loopback(args.host):
        raise UsageError(
            f"refusing to serve on {args.host} without a token: set {TOKEN_ENV}, or bind to"
            " 127.0.0.1"
        )
    home = datalake.termidator_home()
    roots = args.input_root or [
        r for r in os.environ.get(INPUT_ROOTS_ENV, "").split(os.pathsep) if r
    ]
    if not roots:
        default_root = home / "inputs"
        default_root.mkdir(parents=True, exist_ok=True)
        roots = [str(default_root)]
    for root in roots:
        if not os.path.isdir(root):
            raise UsageError(f"input root {root!r} is not a directory")
    dsn = datalake.resolve_dsn(args.dsn)
    datalake.migrate(dsn)
    return Settings(
        dsn=dsn,
        home=home,
        token=token,
        input_roots=tuple(Path(r).resolve() for r in roots),
        limits=ingest.Limits(int(args.max_body_mb * (1 << 20)), int(args.max_line_kb * 1024)),
        max_jobs=args.max_jobs,
    )


def main(args: argparse.Namespace) -> int:
    """Serve until interrupted."""
    import uvicorn

    settings = settings_from(args)
    print(
        f"TermiDator API on http://{args.host}:{args.port} (OpenAPI: /docs);"
        f" landing zone {settings.landing_root};"
        f" input roots {', '.join(map(str, settings.input_roots))};"
        f" {'bearer token required' if settings.token else 'no token: loopback only'}",
        flush=True,
    )
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="info")
    return 0
