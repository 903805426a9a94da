"""The REST service: ``python -m pipelines serve`` (FastAPI + uvicorn, OpenAPI at /docs).

- ``POST /v1/ingest/{dataset}``: an NDJSON body (gzip too), streamed, validated line by
  line, landed as one file for the ``stream`` pipeline; answers accepted and rejected
  counts with each rejection's line and reason; ``Idempotency-Key`` makes retries safe.
- ``POST /v1/jobs``, ``GET /v1/jobs[/{id}]``, ``DELETE /v1/jobs/{id}``: pipelines run as
  separate processes on files under the input roots, with the options the service allows;
  where and what code runs (runner, job endpoint, environment) is the service's own
  configuration (``--job-arg``), never a caller's.
- ``GET /v1/search?q=…``: the reviews nearest in meaning to a query, with filters (the
  same answers as ``python -m pipelines search``).
- ``GET /v1/health``, ``GET /v1/stats``.

Every error is JSON: ``{"error": {"status", "code", "message"}}``, and the OpenAPI schema
documents each one. A bearer token from ``TERMIDATOR_API_TOKEN`` guards everything but
health and the docs; without one the service binds to loopback only and answers only
requests addressed to a loopback name (``Host``), so a web page cannot reach it through
DNS rebinding.
"""

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import enum
import errno
import hmac
import ipaddress
import logging
import os
import re
from pathlib import Path
from typing import Any, AsyncIterator, Optional

import psycopg
from fastapi import Depends, FastAPI, Request
from fastapi import Path as PathParameter
from fastapi import Query as QueryParameter
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from connectors import datalake, idempotency, landing
from connectors.search import MAX_K, MAX_QUERY_CHARS, Query, SearchError, SearchUnavailable
from pipelines.interrupts import EXIT_INTERRUPTED
from pipelines.search import find, hit_json
from server import ingest
from server.jobs import FINAL, JobError, JobManager, request_model
from transforms.emotion_model import DEFAULT_MODEL, LABELS

VERSION = "0.1.0"
TOKEN_ENV = "TERMIDATOR_API_TOKEN"
INPUT_ROOTS_ENV = "TERMIDATOR_INPUT_ROOTS"
# 1 to 255 printable ASCII characters, no space at either end (HTTP drops those).
IDEMPOTENCY_KEY = r"^[!-~]([ -~]{0,253}[!-~])?$"
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
# Flags of a job that only the service sets: its datalake (in the job's environment, so
# that it is in no command line), its inputs (checked against the input roots) and the
# name its run is found by.
_SERVICE_FLAGS = frozenset({"--dsn", "--job_name", "--input", "--replay"})
_LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Settings:
    """How the service runs: its datalake, home, token, input roots, limits, and what its
    jobs run with (the models a job may name, the flags every job gets)."""

    dsn: str
    home: Path
    token: Optional[str] = None
    input_roots: tuple[Path, ...] = ()
    limits: ingest.Limits = ingest.Limits()
    max_jobs: int = 2
    pending_key_stale_s: float = 600.0
    models: tuple[str, ...] = (DEFAULT_MODEL,)
    job_args: tuple[str, ...] = ()

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
    """The one shape of every error answer."""
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


class JobSummary(BaseModel):
    id: str
    pipeline: str
    state: str
    exit_code: Optional[int]
    submitted_at: str
    finished_at: Optional[str]


class JobList(BaseModel):
    jobs: list[JobSummary] = Field(description="newest first")


Emotion = enum.Enum("Emotion", {label: label for label in LABELS}, type=str)


class SearchHit(BaseModel):
    rank: int
    similarity: float = Field(description="cosine similarity to the query, -1 to 1")
    review_id: str
    asin: str
    rating: float
    emotion: Optional[str] = Field(description="the default model's label, if classified")
    product: Optional[str] = Field(description="the product's title, if its metadata is in")
    title: Optional[str] = Field(description="the review's title")
    first_line: str
    reviewed_at: str


class SearchAnswer(BaseModel):
    query: str
    hits: list[SearchHit]


class Health(BaseModel):
    status: str = Field(examples=["ok"], description="ok, or degraded")
    datalake: str = Field(examples=["ok"], description="ok, or unavailable")
    version: Optional[str] = None


_ERROR_TEXT = {
    400: "bad request: a body that cannot be read as declared, or a search it cannot take",
    401: "missing or wrong bearer token",
    403: "the service has no input roots",
    404: "unknown dataset or job",
    405: "method not allowed on this path",
    409: "conflict: the job has ended, or the datalake has no review embeddings to search",
    413: "body or line too large, or a gzip body that expands too much",
    415: "not NDJSON, or an unsupported Content-Encoding",
    421: "the Host header is not a loopback name (a token-less service answers only those)",
    422: "invalid request",
    503: "the datalake cannot be reached",
    507: "the landing zone is out of disk space; nothing was landed, retry later",
}
_ERROR_HEADERS = {
    401: {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer"}},
    405: {"Allow": {"schema": {"type": "string"}, "description": "the methods of this path"}},
}


def _ingest_openapi() -> dict[str, Any]:
    """The ingest operation's header and body, which it reads itself as they stream in."""
    example = (
        '{"rating": 5.0, "title": "Lovely", "text": "Really nice.", "images": [],'
        ' "asin": "B00YQ6X8EO", "parent_asin": "B00YQ6X8EO", "user_id": "AGKHLEW2SOWHN",'
        ' "timestamp": 1588687728923, "helpful_vote": 0, "verified_purchase": true}\n'
    )
    return {
        "parameters": [
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "description": "retries with the same key land nothing twice (1 to 255"
                " printable ASCII characters)",
                "schema": {"type": "string", "maxLength": 255, "pattern": IDEMPOTENCY_KEY},
            }
        ],
        "requestBody": {
            "required": True,
            "description": "NDJSON: one JSON record of the dataset per line, UTF-8; blank"
            " lines are skipped, other lines that are not records are answered in"
            " `rejections` (the request is still accepted). Send `Content-Encoding: gzip`"
            " for a gzip body.",
            "content": {
                media: {
                    "schema": {"type": "string", "format": "binary"},
                    **({"example": example} if media == ingest.NDJSON_TYPES[0] else {}),
                }
                for media in ingest.NDJSON_TYPES
            },
        },
    }


# --- guards --------------------------------------------------------------------------


class LoopbackHostOnly:
    """Without a token: answer only requests whose ``Host`` is a loopback name, so that a
    web page whose domain was re-pointed at 127.0.0.1 (DNS rebinding) gets nothing."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if not is_loopback_host(host):
                response = error_response(
                    421,
                    "misdirected_request",
                    f"this service answers only requests to localhost, 127.0.0.1 or [::1],"
                    f" not Host {host!r} (set {TOKEN_ENV} to serve other names)",
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def is_loopback_host(host: str) -> bool:
    """Whether a ``Host`` header names this machine: localhost or a loopback address
    (``[::1]`` for IPv6), with or without a port."""
    found = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^:\[\]]+)(:[0-9]*)?", host)
    if found is None:
        return False
    name = found.group(1).lower()
    return is_loopback(name[1:-1] if name.startswith("[") else name)


def _allowed_methods(app: FastAPI, scope: Scope) -> str:
    """Every method some route of this path takes (for ``Allow`` on a 405)."""
    methods: set[str] = set()
    for route in app.router.routes:
        match, _ = route.matches(scope)
        if match != Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return ", ".join(sorted(methods))


# --- the app -----------------------------------------------------------------------


def create_app(settings: Settings) -> FastAPI:
    """The FastAPI app for these settings (the datalake must be migrated already)."""
    jobs = JobManager(
        settings.dsn,
        settings.home,
        settings.input_roots,
        settings.max_jobs,
        models=settings.models,
        job_args=settings.job_args,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async def watch_jobs() -> None:
            while True:  # off the event loop: polling starts processes and may query
                try:
                    await run_in_threadpool(jobs.poll)
                except Exception:  # noqa: BLE001 - the watcher must outlive one bad poll
                    _LOG.exception("polling the jobs failed; retrying")
                await asyncio.sleep(0.5)

        await run_in_threadpool(
            landing.clean_abandoned_uploads,
            settings.dsn,
            settings.landing_root,
            settings.pending_key_stale_s,
        )
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
        redirect_slashes=False,
    )
    app.state.settings = settings
    app.state.jobs = jobs
    if settings.token is None:
        app.add_middleware(LoopbackHostOnly)
    bearer = HTTPBearer(auto_error=False, description=f"the token in ${TOKEN_ENV}")

    def authorize(credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> None:
        given = credentials.credentials.encode() if credentials else b""
        if not hmac.compare_digest(given, settings.token.encode()):
            raise ApiError(
                401,
                "unauthorized",
                f"send Authorization: Bearer <token> (the service's ${TOKEN_ENV})",
                {"WWW-Authenticate": "Bearer"},
            )

    # Without a token nothing is guarded, and the schema declares no security.
    guarded = [Depends(authorize)] if settings.token else []

    def errors(*statuses: int, guard: bool = True) -> dict[int, dict[str, Any]]:
        """The documented error answers of a route: its own, and the service's (401 where
        the token is needed, 421 where the Host is checked, 405 everywhere)."""
        service = {405}
        if settings.token is None:
            service.add(421)
        elif guard:
            service.add(401)
        return {
            status: {
                "model": ErrorBody,
                "description": _ERROR_TEXT[status],
                **({"headers": _ERROR_HEADERS[status]} if status in _ERROR_HEADERS else {}),
            }
            for status in sorted({*statuses, *service})
        }

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError) -> JSONResponse:
        return error_response(error.status, error.code, error.message, error.headers)

    @app.exception_handler(JobError)
    async def _job_error(request: Request, error: JobError) -> JSONResponse:
        return error_response(error.status, error.code, error.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        codes = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}
        code = codes.get(error.status_code, "http_error")
        message, headers = str(error.detail), getattr(error, "headers", None)
        if error.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path} (see /docs)"
        if error.status_code == 405:  # every route of the path, not only the first one
            allow = _allowed_methods(app, request.scope)
            message = f"{request.method} is not allowed on {request.url.path}; use {allow}"
            headers = {**(headers or {}), "Allow": allow}
        return error_response(error.status_code, code, message, headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = [
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in error.errors()
        ]
        if request.url.path == "/v1/search":  # a search it cannot take is a bad query
            return error_response(400, "bad_query", "; ".join(problems))
        codes = {_problem_code(e) for e in error.errors()}
        code = codes.pop() if len(codes) == 1 else "invalid_request"
        return error_response(422, code, "; ".join(problems) or "invalid request")

    @app.exception_handler(psycopg.OperationalError)
    @app.exception_handler(datalake.DatalakeUnavailable)
    async def _no_datalake(request: Request, error: Exception) -> JSONResponse:
        _LOG.warning("datalake unavailable: %s", str(error).strip())
        return error_response(503, "datalake_unavailable", _ERROR_TEXT[503])

    @app.exception_handler(OSError)
    async def _disk_full_error(request: Request, error: OSError) -> JSONResponse:
        if not _disk_full(error):
            raise error  # to the unexpected errors' handler
        _LOG.warning("%s %s: %s", request.method, request.url.path, error)
        return error_response(507, "insufficient_storage", _ERROR_TEXT[507])

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        _LOG.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(
            500, "internal_error", f"{type(error).__name__}: the service log has the details"
        )

    @app.get(
        "/v1/health",
        tags=["service"],
        operation_id="health",
        response_model=Health,
        responses={
            503: {"model": Health, "description": "the datalake does not answer"},
            **errors(guard=False),
        },
    )
    async def health() -> JSONResponse:
        """Liveness and whether the datalake answers (no token needed)."""
        try:
            await run_in_threadpool(datalake.ping, settings.dsn)
        except psycopg.Error:
            return JSONResponse({"status": "degraded", "datalake": "unavailable"}, 503)
        return JSONResponse({"status": "ok", "datalake": "ok", "version": VERSION})

    @app.get(
        "/v1/stats",
        tags=["service"],
        operation_id="stats",
        responses=errors(503),
        dependencies=guarded,
    )
    async def stats() -> dict[str, Any]:
        """Rows per table, dead letters by stage, the landing backlog, jobs by state."""
        return await run_in_threadpool(_stats, settings, jobs)

    @app.get(
        "/v1/search",
        tags=["search"],
        operation_id="search",
        response_model=SearchAnswer,
        responses=errors(400, 409, 503),
        dependencies=guarded,
    )
    async def search_reviews(
        q: str = QueryParameter(
            min_length=1,
            max_length=MAX_QUERY_CHARS,
            pattern=r"\S",
            description="what the reviews should say",
            examples=["stopped working after a week"],
        ),
        k: int = QueryParameter(10, ge=1, le=MAX_K, description="how many reviews"),
        category: Optional[str] = QueryParameter(
            None, description="only products in this category (case-insensitive)"
        ),
        asin: Optional[str] = QueryParameter(
            None, description="only reviews of this product (asin or parent asin)"
        ),
        min_rating: Optional[float] = QueryParameter(None, ge=1, le=5),
        max_rating: Optional[float] = QueryParameter(None, ge=1, le=5),
        emotion: Optional[Emotion] = QueryParameter(None, description="the review's emotion"),
        since: Optional[datetime.date] = QueryParameter(
            None, description="only reviews written on or after this date"
        ),
    ) -> dict[str, Any]:
        """The reviews nearest in meaning to ``q`` that pass the filters, best first (400:
        a query it cannot take, whatever is wrong with it; 409: no embeddings yet, `run
        emotions` makes them)."""
        feeling = emotion.value if emotion is not None else None
        query = Query(q, k, category, asin, min_rating, max_rating, feeling, since)
        try:
            hits = await run_in_threadpool(find, query, settings.dsn)
        except SearchError as error:
            raise ApiError(400, "bad_query", str(error)) from None
        except SearchUnavailable as error:
            raise ApiError(409, "search_unavailable", str(error)) from None
        return {"query": query.text.strip(), "hits": [hit_json(h) for h in hits]}

    schema_of = app.openapi

    def openapi() -> dict[str, Any]:
        """FastAPI's schema, less the 422 it adds to the search: a search's invalid
        parameters answer 400 bad_query (see ``_invalid``)."""
        if app.openapi_schema is None:
            schema_of()["paths"]["/v1/search"]["get"]["responses"].pop("422", None)
        return app.openapi_schema

    app.openapi = openapi

    @app.post(
        "/v1/ingest/{dataset}",
        tags=["ingest"],
        operation_id="ingest",
        status_code=202,
        response_model=IngestAnswer,
        responses=errors(400, 404, 409, 413, 415, 422, 503, 507),
        openapi_extra=_ingest_openapi(),
        dependencies=guarded,
    )
    async def ingest_records(
        request: Request,
        dataset: str = PathParameter(
            description="the landing zone to feed", json_schema_extra={"enum": [*landing.DATASETS]}
        ),
    ) -> JSONResponse:
        """Land NDJSON records of ``dataset`` (reviews or products) for the stream pipeline."""
        return await _ingest(settings, dataset, request, request.headers.get("idempotency-key"))

    job_request = request_model(jobs.pipelines, jobs.models)
    job_links = {
        name: {"operationId": operation, "parameters": {"job_id": "$response.body#/id"}}
        for name, operation in (("GetJob", "get_job"), ("CancelJob", "cancel_job"))
    }

    @app.post(
        "/v1/jobs",
        tags=["jobs"],
        operation_id="submit_job",
        status_code=202,
        response_model=JobView,
        responses={
            202: {
                "links": job_links,
                "headers": {"Location": {"schema": {"type": "string"}, "description": "the job"}},
            },
            **errors(400, 403, 422),
        },
        dependencies=guarded,
    )
    async def submit_job(job: job_request) -> JSONResponse:
        """Start a pipeline as a separate process (``python -m pipelines run ...``) on files
        under the input roots, with the options its schema allows."""
        submitted = await run_in_threadpool(jobs.submit, job.pipeline, job.input, job.options)
        view = await run_in_threadpool(jobs.describe, submitted)
        return JSONResponse(view, 202, headers={"Location": f"/v1/jobs/{submitted.id}"})

    @app.get(
        "/v1/jobs",
        tags=["jobs"],
        operation_id="list_jobs",
        response_model=JobList,
        responses=errors(),
        dependencies=guarded,
    )
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
        operation_id="get_job",
        response_model=JobView,
        responses=errors(404, 422),
        dependencies=guarded,
    )
    async def get_job(job_id: str) -> dict[str, Any]:
        """A job: state, start and end, its run's counters, the last log lines."""
        return await run_in_threadpool(jobs.describe, jobs.get(job_id))

    @app.delete(
        "/v1/jobs/{job_id}",
        tags=["jobs"],
        operation_id="cancel_job",
        status_code=202,
        response_model=JobView,
        responses=errors(404, 409, 422),
        dependencies=guarded,
    )
    async def cancel_job(job_id: str) -> JSONResponse:
        """Cancel a job: SIGINT, then SIGTERM and SIGKILL if it does not stop. The job stays
        listed, and readable here, with its final state."""
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
    if key is not None and not re.fullmatch(IDEMPOTENCY_KEY, key):
        raise ApiError(
            400,
            "bad_idempotency_key",
            "Idempotency-Key must be 1 to 255 printable ASCII characters, no space at either end",
        )
    return encoding != "identity"


async def _ingest(
    settings: Settings, dataset: str, request: Request, key: Optional[str]
) -> JSONResponse:
    gzipped = _check_request(settings, dataset, request, key)
    directory = await run_in_threadpool(landing.landing_dir, dataset, settings.landing_root)
    name = landing.landing_name(dataset, key)
    body = request.stream()
    if key is not None:
        try:
            reservation = await run_in_threadpool(
                idempotency.begin,
                settings.dsn,
                dataset,
                key,
                settings.pending_key_stale_s,
                name,
            )
        except idempotency.KeyInProgress:
            raise ApiError(
                409,
                "request_in_progress",
                "a request with this Idempotency-Key is still being processed; retry later",
            ) from None
        if reservation.stored is not None:
            return await _replay(settings, body, reservation.stored, gzipped)
        name = reservation.file
        if reservation.taken_over:  # what the abandoned request left half-written
            await run_in_threadpool(landing.remove_temp_files, directory, name)
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
        if key is not None:
            with contextlib.suppress(Exception):  # the datalake may be what failed
                await run_in_threadpool(idempotency.release, settings.dsn, dataset, key)
        if work is not None:
            work.abort()  # removes the temp file; a committed file stays
        if isinstance(error, (ingest.LimitExceeded, ingest.BadBody)) or _disk_full(error):
            await _drain(body, 4 * settings.limits.max_body_bytes)  # so that it gets the answer
        if isinstance(error, ingest.LimitExceeded):
            raise ApiError(413, "payload_too_large", str(error)) from None
        if isinstance(error, ingest.BadBody):
            raise ApiError(400, "bad_body", str(error)) from None
        raise  # a full disk: 507, from the app's handler
    return JSONResponse(answer, 202)


def _problem_code(problem: dict[str, Any]) -> str:
    """The stable code of a request the schema refuses, as the job manager names it."""
    loc, kind = tuple(problem.get("loc", ())), problem.get("type")
    if kind == "union_tag_invalid":
        return "unknown_pipeline"
    if "options" in loc[:-1]:
        return "option_not_allowed" if kind == "extra_forbidden" else "bad_option"
    if kind in ("missing", "too_short") and loc[-1:] == ("input",):
        return "no_input"
    return "invalid_request"


def _disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in _DISK_FULL


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
    parser.add_argument(
        "--job-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="a flag every job gets, e.g. --job-arg=--runner=PortableRunner (repeatable): where"
        " and what code runs is this service's choice, never a caller's",
    )
    parser.add_argument(
        "--model",
        action="append",
        default=None,
        metavar="NAME",
        help=f"an emotion model a job may name (repeatable; default {DEFAULT_MODEL})",
    )


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from the flags and the environment; refuses a public bind without a token,
    and job flags that are not pipeline options or that the service sets itself."""
    from pipelines.options import UsageError, parse

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
    for arg in args.job_arg:
        if arg.split("=", 1)[0] in _SERVICE_FLAGS:
            raise UsageError(f"--job-arg {arg}: the service sets {arg.split('=', 1)[0]} itself")
    parse(args.job_arg)  # an unknown or misspelled flag fails here, not in every job
    dsn = datalake.resolve_dsn(args.dsn)
    datalake.migrate(dsn)
    return Settings(
        dsn=dsn,
        home=home,
        token=token,
        input_roots=tuple(Path(r).resolve() for r in roots),
        limits=ingest.Limits(int(args.max_body_mb * (1 << 20)), int(args.max_line_kb * 1024)),
        max_jobs=args.max_jobs,
        models=tuple(args.model or (DEFAULT_MODEL,)),
        job_args=tuple(args.job_arg),
    )


def main(args: argparse.Namespace) -> int:
    """Serve until interrupted (Ctrl-C: a graceful shutdown, then exit 130)."""
    import uvicorn

    settings = settings_from(args)
    print(
        f"TermiDator API on http://{args.host}:{args.port} (OpenAPI: /docs);"
        f" landing zone {settings.landing_root};"
        f" input roots {', '.join(map(str, settings.input_roots))};"
        f" {'bearer token required' if settings.token else 'no token: loopback only'}",
        flush=True,
    )
    config = uvicorn.Config(create_app(settings), host=args.host, port=args.port, log_level="info")
    try:
        uvicorn.Server(config).run()  # (uvicorn.run would swallow the Ctrl-C)
    except KeyboardInterrupt:  # uvicorn shut down gracefully, then passed the signal on
        print("interrupted: the service stopped; jobs still running were cancelled", flush=True)
        return EXIT_INTERRUPTED
    return 0
