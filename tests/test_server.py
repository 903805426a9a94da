"""The REST service end to end: a real uvicorn server on a free loopback port, the real
embedded Postgres, jobs as real processes, and the streaming client."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi.responses import JSONResponse

from conftest import query
from connectors import landing
from pipelines import cli
from samples import generate
from server import app as service
from server.client import send_file
from server.ingest import Limits
from test_parse import META_2018, REVIEW_2014, REVIEW_2023
from test_stream import review, wait_for

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "test-token-0123456789"
NDJSON = {"Content-Type": "application/x-ndjson"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FailFirst:
    """ASGI wrapper: the first ``failures`` ingest requests get a 503 (to exercise retries)."""

    def __init__(self, app, failures: int):
        self.app, self.failures = app, failures

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/ingest") and self.failures:
            self.failures -= 1
            body = {"error": {"status": 503, "code": "unavailable", "message": "try again"}}
            await JSONResponse(body, 503)(scope, receive, send)
            return
        await self.app(scope, receive, send)


@contextlib.contextmanager
def serving(app):
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, timeout=30)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(60)


class Api:
    """A running service and an authorised client for it."""

    def __init__(self, url: str, settings: service.Settings):
        self.url, self.settings = url, settings
        self.http = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60
        )

    def ingest(self, dataset: str, body: bytes, headers=None) -> httpx.Response:
        return self.http.post(
            f"/v1/ingest/{dataset}", content=body, headers={**NDJSON, **(headers or {})}
        )

    def landed(self, dataset: str = "reviews") -> list[str]:
        return [f.name for f in landing.list_landed(self.settings.landing_root / dataset)]

    def job(self, job_id: str) -> dict:
        return self.http.get(f"/v1/jobs/{job_id}").json()

    def wait_job(self, job_id: str, states=("DONE", "FAILED", "CANCELLED"), timeout=180) -> dict:
        return wait_for(lambda: (j := self.job(job_id))["state"] in states and j, timeout, 0.25)


def make_settings(datalake: str, tmp_path: Path) -> service.Settings:
    inputs = tmp_path / "inputs"
    inputs.mkdir(exist_ok=True)
    return service.Settings(
        dsn=datalake,
        home=tmp_path / "home",
        token=TOKEN,
        input_roots=(inputs.resolve(),),
        limits=Limits(max_body_bytes=64 << 10, max_line_bytes=8 << 10),
    )


@pytest.fixture
def api(datalake, tmp_path):
    settings = make_settings(datalake, tmp_path)
    with serving(service.create_app(settings)) as url:
        client = Api(url, settings)
        yield client
        client.http.close()


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["status"] == status and error["code"] == code and error["message"]
    return error


# --- auth, health, docs ---------------------------------------------------------------


def test_health_and_docs_are_open_and_everything_else_needs_the_token(api):
    anonymous = httpx.Client(base_url=api.url)
    assert anonymous.get("/v1/health").json() == {
        "status": "ok",
        "datalake": "ok",
        "version": "0.1.0",
    }
    assert anonymous.get("/docs").status_code == 200
    paths = anonymous.get("/openapi.json").json()["paths"]
    assert {"/v1/ingest/{dataset}", "/v1/jobs", "/v1/jobs/{job_id}", "/v1/stats"} <= set(paths)
    for request in (
        anonymous.build_request("GET", "/v1/stats"),
        anonymous.build_request("GET", "/v1/jobs"),
        anonymous.build_request("POST", "/v1/ingest/reviews", content=b"{}", headers=NDJSON),
        anonymous.build_request("GET", "/v1/stats", headers={"Authorization": "Bearer wrong"}),
    ):
        response = anonymous.send(request)
        assert_error(response, 401, "unauthorized")
        assert response.headers["www-authenticate"] == "Bearer"
    assert api.landed() == []
    assert api.http.get("/v1/jobs").json() == {"jobs": []}
    stats = api.http.get("/v1/stats").json()
    assert stats["tables"]["reviews"] == 0 and stats["landing"]["backlog"]["reviews"]["files"] == 0


def test_serve_refuses_a_public_address_without_a_token(monkeypatch, capsys):
    monkeypatch.delenv(service.TOKEN_ENV, raising=False)
    assert cli.main(["serve", "--host", "0.0.0.0", "--port", "1"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and "without a token: set TERMIDATOR_API_TOKEN" in errors[0]
    assert service.is_loopback("127.0.0.1") and service.is_loopback("::1")
    assert not service.is_loopback("0.0.0.0") and not service.is_loopback("example.com")


# --- ingest ------------------------------------------------------------------------------


def test_ingest_lands_valid_lines_and_answers_each_rejected_line(api, datalake):
    lines = [
        REVIEW_2014,
        "",
        b"\xff\xfe not text",
        META_2018,
        "[1, 2]",
        '{"rating": 5',
        REVIEW_2023,
    ]
    body = b"\n".join(line.encode() if isinstance(line, str) else line for line in lines)
    response = api.ingest("reviews", gzip.compress(body), {"Content-Encoding": "gzip"})
    assert response.status_code == 202, response.text
    answer = response.json()
    assert (answer["lines"], answer["accepted"], answer["rejected"]) == (6, 2, 4)
    assert [r["line"] for r in answer["rejections"]] == [3, 4, 5, 6]
    reasons = [r["reason"] for r in answer["rejections"]]
    assert reasons[0].startswith("not UTF-8 text")
    assert "POST it to /v1/ingest/products" in reasons[1]
    assert "expected one JSON object per line" in reasons[2]
    assert "truncated or malformed" in reasons[3]
    (name,) = api.landed()
    assert name == answer["file"]
    landed = (api.settings.landing_root / "reviews" / name).read_text().splitlines()
    assert landed == [REVIEW_2014, REVIEW_2023]
    dead = query(datalake, "SELECT pipeline, stage, line, error FROM dead_letters ORDER BY line")
    assert [(p, s, n) for p, s, n, _ in dead] == [("ingest", "ingest", n) for n in (3, 4, 5, 6)]
    assert [e for *_, e in dead] == reasons
    # The undecodable line's bytes survive, as the file reader keeps them.
    assert query(datalake, "SELECT raw FROM dead_letters WHERE line = 3") == [
        (repr(b"\xff\xfe not text"),)
    ]
    assert not [
        p for p in (api.settings.landing_root / "reviews").iterdir() if p.name.startswith(".")
    ]


def test_a_retried_request_lands_nothing_twice_and_gets_the_same_answer(api, datalake):
    body = "\n".join([review("A"), review("B"), "nope"]).encode()
    key = {"Idempotency-Key": "batch-0001"}
    first = api.ingest("reviews", body, key)
    again = api.ingest("reviews", gzip.compress(body), {**key, "Content-Encoding": "gzip"})
    assert first.status_code == again.status_code == 202
    assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert len(api.landed()) == 1
    assert query(datalake, "SELECT count(*) FROM dead_letters") == [(1,)]
    assert_error(
        api.ingest("reviews", body + b"\n" + review("C").encode(), key),
        422,
        "idempotency_key_reused",
    )
    assert (
        api.ingest("products", META_2018.encode(), key).status_code == 202
    )  # keys are per dataset
    with psycopg_connection(datalake) as conn:  # another request with this key is in flight
        conn.execute(
            "INSERT INTO ingest_requests (dataset, idempotency_key, state, file)"
            " VALUES ('reviews', 'busy', 'pending', 'x.jsonl')"
        )
    assert_error(
        api.ingest("reviews", body, {"Idempotency-Key": "busy"}), 409, "request_in_progress"
    )
    assert len(api.landed()) == 1


def psycopg_connection(dsn: str):
    import psycopg

    return psycopg.connect(dsn, autocommit=True)


def test_bad_requests_get_the_right_status_and_a_json_error(api):
    http = api.http
    big_line = b'{"reviewerID": "' + b"x" * (9 << 10) + b'"}'
    bomb = gzip.compress(b"\n".join([review("A").encode()] * 2000))  # ~1 MB unzipped, 64 KiB cap
    cases = [
        (api.ingest("music", b"{}"), 404, "unknown_dataset"),
        (http.get("/v1/nothing"), 404, "not_found"),
        (
            api.ingest("reviews", b"{}", {"Content-Type": "text/plain"}),
            415,
            "unsupported_media_type",
        ),
        (http.post("/v1/ingest/reviews", content=b"{}"), 415, "unsupported_media_type"),
        (
            api.ingest("reviews", b"{}", {"Content-Type": "application/x-ndjson; charset=latin-1"}),
            415,
            "unsupported_charset",
        ),
        (
            api.ingest("reviews", b"{}", {"Content-Encoding": "br"}),
            415,
            "unsupported_content_encoding",
        ),
        (api.ingest("reviews", b"{}\n" * (40 << 10)), 413, "payload_too_large"),
        (api.ingest("reviews", bomb, {"Content-Encoding": "gzip"}), 413, "payload_too_large"),
        (api.ingest("reviews", review("A").encode() + b"\n" + big_line), 413, "payload_too_large"),
        (api.ingest("reviews", b"{}", {"Content-Encoding": "gzip"}), 400, "bad_body"),
        (
            api.ingest("reviews", gzip.compress(b"{}\n" * 10)[:-9], {"Content-Encoding": "gzip"}),
            400,
            "bad_body",
        ),
        (api.ingest("reviews", b"{}", {"Idempotency-Key": "k" * 300}), 400, "bad_idempotency_key"),
        (http.post("/v1/jobs", json={"input": ["x"]}), 422, "invalid_request"),
        (http.post("/v1/jobs", json={"pipeline": "nope"}), 422, "unknown_pipeline"),
        (http.post("/v1/jobs", json={"pipeline": "reviews"}), 422, "no_input"),
        (
            http.post("/v1/jobs", json={"pipeline": "reviews", "input": ["missing*.json"]}),
            422,
            "no_input",
        ),
        # Outside the input roots reads as "matches no file": no answer tells what exists.
        (
            http.post("/v1/jobs", json={"pipeline": "reviews", "input": ["/etc/passwd"]}),
            422,
            "no_input",
        ),
        (
            http.post("/v1/jobs", json={"pipeline": "reviews", "input": ["../../x.json"]}),
            422,
            "no_input",
        ),
        (
            http.post(
                "/v1/jobs", json={"pipeline": "stream", "options": {"dsn": "postgresql://x"}}
            ),
            422,
            "option_not_allowed",
        ),
        (http.get("/v1/jobs/0123"), 404, "unknown_job"),
        (http.delete("/v1/jobs/0123"), 404, "unknown_job"),
    ]
    for response, status, code in cases:
        assert_error(response, status, code)
    assert api.landed() == [] and http.get("/v1/jobs").json() == {"jobs": []}
    assert not list((api.settings.landing_root / "reviews").iterdir())  # no temp files either


# --- jobs ---------------------------------------------------------------------------------


def test_a_job_started_over_the_api_reaches_done_with_the_right_counters(api, datalake):
    sample = ROOT / "samples" / "All_Beauty.jsonl"
    shutil.copy(sample, api.settings.input_roots[0] / "All_Beauty.jsonl")
    records = sum(1 for line in sample.read_text().splitlines() if line.strip())
    response = api.http.post(
        "/v1/jobs",
        json={"pipeline": "reviews", "input": ["All_*.jsonl"], "options": {"batch_size": 500}},
    )
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    assert response.headers["location"] == f"/v1/jobs/{job_id}"
    assert response.json()["command"][-2:] == [
        "--batch_size=500",
        f"--job_name=termidator-job-{job_id}",
    ]
    job = api.wait_job(job_id)
    assert job["state"] == "DONE" and job["exit_code"] == 0, job["log_tail"]
    counters = job["run"]["counters"]
    assert job["run"]["state"] == "DONE" and "FnApiRunner" in job["run"]["runner"]
    assert counters["records_read"] == records
    assert counters["reviews_upserted"] + counters.get("dead_letters_upserted", 0) == records
    assert query(
        datalake, "SELECT count(*) FROM pipeline_runs WHERE run_id = %s", (job["run"]["run_id"],)
    ) == [(1,)]
    assert any("reviews: DONE" in line for line in job["log_tail"])
    assert [j["id"] for j in api.http.get("/v1/jobs").json()["jobs"]] == [job_id]
    assert_error(api.http.delete(f"/v1/jobs/{job_id}"), 409, "job_finished")


def test_cancelling_a_running_stream_job(api, datalake):
    response = api.http.post(
        "/v1/jobs", json={"pipeline": "stream", "options": {"poll_interval": "0.2"}}
    )
    job_id = response.json()["id"]
    wait_for(lambda: (api.job(job_id)["run"] or {}).get("state") == "RUNNING", timeout=120)
    cancelled = api.http.delete(f"/v1/jobs/{job_id}")
    assert cancelled.status_code == 202 and cancelled.json()["state"] == "CANCELLING"
    job = api.wait_job(job_id, timeout=60)
    # SIGINT drains a stream: its source stops, what is in flight is written, and the run
    # ends CANCELLED with exit code 130, like any interrupted command.
    assert job["state"] == "CANCELLED" and job["exit_code"] == 130, job["log_tail"]
    assert job["run"]["state"] == "CANCELLED"
    assert any("interrupted after 0 records (all committed" in line for line in job["log_tail"])


# --- the whole path: serve + run stream + stream FILE --------------------------------------


def test_serve_stream_and_client_move_a_file_into_the_datalake_losing_nothing(
    api, datalake, tmp_path
):
    plain = tmp_path / "Books.jsonl"
    generate.write_dataset("reviews", 2018, 300, str(plain), seed=7)
    lines = plain.read_bytes().splitlines()
    lines[10:10] = [
        b"garbage",
        META_2018.encode(),
        b"\xff\xfe",
        b'{"reviewerID": "X", "asin": "Y", "overall": 9.0, "unixReviewTime": 1300000000}',
    ]
    path = tmp_path / "Books.jsonl.gz"
    path.write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))
    sent = sum(1 for line in lines if line.strip())

    job = api.http.post(
        "/v1/jobs",
        json={"pipeline": "stream", "options": {"stop_after_idle": "4s", "poll_interval": "0.2"}},
    ).json()
    client = [
        sys.executable,
        "-m",
        "pipelines",
        "stream",
        str(path),
        "--url",
        api.url,
        "--batch",
        "50",
    ]
    env = {**os.environ, "TERMIDATOR_API_TOKEN": TOKEN}
    first = subprocess.run(client, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert f"sent {sent:,} records" in first.stdout
    assert re.search(r"landed\s+301\b.*\n\s+already\s+0\b.*\n\s+rejected\s+3\b", first.stdout)
    files = api.landed()
    assert len(files) == 7  # 304 lines in batches of 50
    # The same records again, from a copy of the file: the keys come from the records, so
    # the service answers from them, and the summary says that nothing new landed.
    shutil.copy(path, tmp_path / "copy.jsonl.gz")
    client[4] = str(tmp_path / "copy.jsonl.gz")
    again = subprocess.run(client, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert re.search(r"landed\s+0\b.*\n\s+already\s+301\b.*\n\s+rejected\s+3\b", again.stdout)
    assert api.landed() == files

    done = api.wait_job(job["id"])
    assert done["state"] == "DONE", done["log_tail"]
    counters = done["run"]["counters"]
    ingest_dead = query(datalake, "SELECT count(*) FROM dead_letters WHERE stage = 'ingest'")[0][0]
    pipeline_dead = query(
        datalake, "SELECT count(*) FROM dead_letters WHERE run_id = %s", (done["run"]["run_id"],)
    )[0][0]
    assert ingest_dead == 3 and pipeline_dead == counters.get("dead_letters_upserted", 0) == 1
    assert counters["records_read"] == sent - ingest_dead
    assert sent == counters["reviews_upserted"] + pipeline_dead + ingest_dead
    assert counters["landing_records_settled"] == sent - ingest_dead
    assert query(datalake, "SELECT state, count(*) FROM landing_files GROUP BY 1") == [("done", 7)]
    backlog = api.http.get("/v1/stats").json()["landing"]["backlog"]["reviews"]
    assert backlog["files"] == 0


def test_the_client_retries_failed_requests_and_lands_each_batch_once(datalake, tmp_path):
    settings = make_settings(datalake, tmp_path)
    path = tmp_path / "few.jsonl"
    path.write_text("\n".join(review(f"R{i}") for i in range(25)) + "\n")
    with serving(FailFirst(service.create_app(settings), failures=2)) as url:
        result = send_file(str(path), "reviews", url=url, batch=10, token=TOKEN, retries=3)
    assert result.complete and (result.sent, result.accepted, result.batches) == (25, 25, 3)
    assert result.retries == 2
    assert len(landing.list_landed(settings.landing_root / "reviews")) == 3
    with serving(FailFirst(service.create_app(settings), failures=5)) as url:
        failed = send_file(
            str(path), "reviews", url=url, batch=10, token=TOKEN, retries=1, fresh=True
        )
    assert not failed.complete and "gave up after 2 attempts" in failed.error


def test_an_impossible_review_time_is_refused_at_the_door_naming_the_field(api):
    future = json.loads(review("F"))
    future["unixReviewTime"] = 10**13  # year 318857: Beam's windows cannot hold it
    answer = api.ingest("reviews", (review("A") + "\n" + json.dumps(future) + "\n").encode())
    assert answer.status_code == 202, answer.text
    body = answer.json()
    assert (body["accepted"], body["rejected"]) == (1, 1)
    assert body["rejections"][0]["line"] == 2
    assert body["rejections"][0]["reason"].startswith("unixReviewTime: ")
    assert "not a plausible review time" in body["rejections"][0]["reason"]


def test_ctrl_c_stops_the_client_between_batches_and_says_what_landed(api, tmp_path):
    path = tmp_path / "Books.jsonl"
    path.write_text("\n".join(review(f"R{i}") for i in range(400)) + "\n")
    client = [sys.executable, "-m", "pipelines", "stream", str(path), "--url", api.url]
    child = subprocess.Popen(
        client + ["--batch", "20", "--rate", "40"],
        cwd=ROOT,
        env={**os.environ, "TERMIDATOR_API_TOKEN": TOKEN},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        wait_for(lambda: len(api.landed()) >= 2 or child.poll() is not None, timeout=120)
        child.send_signal(signal.SIGINT)
        output, _ = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 130 and "Traceback" not in output, output
    last = output.strip().splitlines()[-1]
    assert last.startswith("interrupted after ") and "run the same command again" in last
    sent = int(re.search(r"interrupted after ([\d,]+) records", last)[1].replace(",", ""))
    # Every batch counted as sent is landed; one in flight at the Ctrl-C may be landed too
    # (a rerun then counts it as already taken).
    assert sent <= 20 * len(api.landed()) <= sent + 20
