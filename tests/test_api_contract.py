"""The REST service keeps its contract: what the OpenAPI schema says is what it does, and
it runs only what it was built to run. Schemathesis fuzzes a real service on loopback
(with a bearer token and without one) with every check it has, statelessly and along the
links from ``POST /v1/jobs`` to ``GET``/``DELETE /v1/jobs/{job_id}``."""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import shutil
from pathlib import Path

import httpx
import psycopg
import pytest
import schemathesis

from conftest import query
from pipelines import cli
from server import app as service
from server.ingest import NDJSON_TYPES
from test_server import ROOT, TOKEN, Api, assert_error, make_settings, serving
from test_server import api  # noqa: F401 - the fixture
from test_stream import review
from transforms.emotion_model import DEFAULT_MODEL

# --- jobs run only what the service offers -------------------------------------------------

CHOOSES_WHAT_RUNS = [
    {"runner": "PortableRunner"},
    {"job_endpoint": "attacker.example:8099"},
    {"runner": "sysconfig._main"},
    {"environment_type": "PROCESS"},
    {"environment_config": '{"command": "/bin/sh"}'},
    {"dsn": "postgresql://attacker.example/lake"},
]
OUT_OF_RANGE = [
    {"direct_num_workers": 0},
    {"direct_num_workers": 65},
    {"direct_num_workers": True},
    {"limit": -1},
    {"batch_size": "500"},
    {"model": "/tmp/x"},
    {"model": "../models/x"},
]


def test_a_job_sets_only_the_options_the_service_offers(api):
    cases = [(o, "option_not_allowed") for o in CHOOSES_WHAT_RUNS]
    cases += [(o, "bad_option") for o in OUT_OF_RANGE]
    for options, code in cases:
        response = api.http.post("/v1/jobs", json={"pipeline": "emotions", "options": options})
        assert_error(response, 422, code)
    assert api.http.get("/v1/jobs").json() == {"jobs": []}


def test_serve_chooses_what_jobs_run_with_its_own_flags(monkeypatch, datalake, capsys):
    monkeypatch.setenv("TERMIDATOR_DSN", datalake)
    parser = argparse.ArgumentParser()
    service.add_arguments(parser)
    chosen = ["--job-arg=--runner=PortableRunner", "--job-arg=--job_endpoint=localhost:8099"]
    settings = service.settings_from(parser.parse_args([*chosen, "--model", "a", "--model", "b"]))
    assert settings.job_args == ("--runner=PortableRunner", "--job_endpoint=localhost:8099")
    assert settings.models == ("a", "b")
    default = service.settings_from(parser.parse_args([]))
    assert (default.job_args, default.models) == ((), (DEFAULT_MODEL,))
    for flag, says in (
        ("--job-arg=--dsn=postgresql://x", "the service sets --dsn itself"),
        ("--job-arg=--job_name=x", "the service sets --job_name itself"),
        ("--job-arg=--runer=X", "unknown option --runer; did you mean --runner?"),
    ):
        assert cli.main(["serve", flag, "--port", "1"]) == 2
        errors = capsys.readouterr().err.strip().splitlines()
        assert len(errors) == 1 and says in errors[0], errors
    # The models a job may name are the service's, in its schema too.
    model = service.create_app(settings).openapi()["components"]["schemas"]["EmotionsOptions"][
        "properties"
    ]["model"]
    assert model["enum"] == ["a", "b"]


def test_a_real_job_never_shows_the_datalake_dsn(datalake, tmp_path):
    secret = "s3cret-pw-7f3a"  # the embedded server trusts local sockets: it is never asked
    dsn = psycopg.conninfo.make_conninfo(datalake, password=secret)
    settings = dataclasses.replace(
        make_settings(datalake, tmp_path), dsn=dsn, job_args=("--runner=FnApiRunner",)
    )
    shutil.copy(ROOT / "samples" / "All_Beauty.jsonl", settings.input_roots[0])
    with serving(service.create_app(settings)) as url:
        client = Api(url, settings)
        submitted = client.http.post(
            "/v1/jobs",
            json={
                "pipeline": "reviews",
                "input": ["All_Beauty.jsonl"],
                "options": {"batch_size": 500, "direct_num_workers": 2},
            },
        )
        assert submitted.status_code == 202, submitted.text
        job = client.wait_job(submitted.json()["id"])
        answers = [
            submitted.text,
            client.http.get(f"/v1/jobs/{job['id']}").text,
            client.http.get("/v1/jobs").text,
            client.http.get("/v1/stats").text,
            client.http.get("/v1/health").text,
        ]
        client.http.close()
    assert job["state"] == "DONE", job["log_tail"]
    assert job["command"][-3:] == [
        "--direct_num_workers=2",
        "--runner=FnApiRunner",  # the service's own --job-arg, after the caller's options
        f"--job_name=termidator-job-{job['id']}",
    ]
    log = (settings.home / "jobs" / f"{job['id']}.log").read_text()
    (recorded,) = query(datalake, "SELECT options::text FROM pipeline_runs")
    for text in [*answers, log, recorded[0]]:
        assert secret not in text and "postgresql://" not in text and "password" not in text
    assert "dsn" not in json.loads(recorded[0]) and "dsn" not in job["options"]
    assert not [arg for arg in job["command"] if "dsn" in arg]


# --- answers that tell nothing about what lies outside ------------------------------------------


def test_an_input_outside_the_roots_reads_exactly_as_one_that_matches_nothing(api, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jsonl").write_text(review("S") + "\n")
    root = api.settings.input_roots[0]
    (root / "link.jsonl").symlink_to(outside / "secret.jsonl")
    patterns = [
        str(outside / "secret.jsonl"),  # exists, outside
        str(outside / "nothing.jsonl"),  # does not exist, outside
        "../outside/secret.jsonl",
        "../outside/*.jsonl",
        "*/../../outside/secret.jsonl",
        "link.jsonl",  # inside, but resolves outside
        "missing.jsonl",  # inside, does not exist
        "/etc/passwd",
        "/etc/*",
        "file:///etc/passwd",
    ]
    for pattern in patterns:
        response = api.http.post("/v1/jobs", json={"pipeline": "reviews", "input": [pattern]})
        error = assert_error(response, 422, "no_input")
        assert error["message"] == f"input {pattern!r} matches no file under the input roots"
    assert api.http.get("/v1/jobs").json() == {"jobs": []}


def test_a_service_without_a_token_answers_only_loopback_names(datalake, tmp_path):
    settings = dataclasses.replace(make_settings(datalake, tmp_path), token=None)
    with serving(service.create_app(settings)) as url:
        port = url.rsplit(":", 1)[1]
        http = httpx.Client(base_url=url)
        for host in ("localhost", f"localhost:{port}", "LOCALHOST", "127.0.0.1", "[::1]"):
            response = http.get("/v1/health", headers={"Host": host})
            assert response.status_code == 200, (host, response.text)
        assert http.get("/v1/jobs", headers={"Host": f"[::1]:{port}"}).status_code == 200
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "::1"):
            for path in ("/v1/health", "/v1/jobs", "/docs", "/openapi.json"):
                response = http.get(path, headers={"Host": host})
                error = assert_error(response, 421, "misdirected_request")
                assert "answers only requests to localhost" in error["message"]
        ingest = http.post(
            "/v1/ingest/reviews",
            content=review("A").encode(),
            headers={"Host": "evil.example", "Content-Type": "application/x-ndjson"},
        )
        assert_error(ingest, 421, "misdirected_request")
        schema = http.get("/openapi.json").json()
        http.close()
    assert landing_files(settings) == []
    operations = [op for path in schema["paths"].values() for op in path.values()]
    assert all("421" in op["responses"] and "security" not in op for op in operations)


def landing_files(settings: service.Settings) -> list[str]:
    return sorted(p.name for p in settings.landing_root.rglob("*") if p.is_file())


# --- the schema says what the service does ------------------------------------------------------


def test_the_schema_documents_every_answer_and_enforced_constraint(api):
    schema = api.http.get("/openapi.json").json()
    paths = schema["paths"]
    for path, operations in paths.items():
        for method, operation in operations.items():
            responses = operation["responses"]
            guarded = path != "/v1/health"
            assert ("401" in responses) == guarded, (method, path)
            assert "405" in responses and "421" not in responses, (method, path)
            for status, answer in responses.items():
                if status.startswith(("4", "5")) and path != "/v1/health":
                    ref = answer["content"]["application/json"]["schema"]["$ref"]
                    assert ref == "#/components/schemas/ErrorBody", (method, path, status)
    # The Allow of a 405 names every method of the path, not only the first route's.
    response = api.http.put("/v1/jobs/0123")
    assert_error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "DELETE, GET"
    assert api.http.patch("/v1/jobs").headers["allow"] == "GET, POST"
    # What the service refuses, the schema refuses: a reviews job needs input.
    reviews = schema["components"]["schemas"]["ReviewsJob"]
    assert "input" in reviews["required"] and reviews["properties"]["input"]["minItems"] == 1
    for body in ({"pipeline": "reviews"}, {"pipeline": "reviews", "input": []}):
        assert_error(api.http.post("/v1/jobs", json=body), 422, "no_input")
    # The NDJSON body: its media types, the one clients should use first.
    ingest = paths["/v1/ingest/{dataset}"]["post"]
    content = ingest["requestBody"]["content"]
    assert list(content) == list(NDJSON_TYPES) and list(content)[0] == "application/x-ndjson"
    assert content["application/x-ndjson"]["schema"] == {"type": "string", "format": "binary"}
    links = paths["/v1/jobs"]["post"]["responses"]["202"]["links"]
    assert {link["operationId"] for link in links.values()} == {"get_job", "cancel_job"}


# --- schemathesis against the live service ---------------------------------------------------

SEED = 20_261_202
# A request the schema allows may still be refused (422) for what no schema can say: its
# glob matches no file now, or its Idempotency-Key was used before with another body.
STATE_DEPENDENT = frozenset({"no_input", "idempotency_key_reused"})


@schemathesis.serializer(*NDJSON_TYPES)
def ndjson(ctx: schemathesis.SerializationContext, value: object) -> bytes:
    """An NDJSON body as sent: generated bytes as they are, the schema's example as UTF-8."""
    data = getattr(value, "data", value)  # schemathesis wraps generated binary strings
    return data if isinstance(data, bytes) else str(data).encode()


@schemathesis.check
def refused_only_for_server_state(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> None:
    """A 422 to a request the schema allows must be one of the state-dependent refusals."""
    if case.meta is None or not case.meta.generation.mode.is_positive:
        return
    if response.status_code == 422:
        code = response.json()["error"]["code"]
        assert code in STATE_DEPENDENT, f"a request the schema allows was refused: {code}"


def fuzzing_config(token: str | None) -> schemathesis.Config:
    """Every check; bounded examples and steps (a run takes ~30 s; a request that hangs
    fails after a minute); one seed, so a run can be repeated."""
    accepted = ["2xx", "3xx", "401", "403", "404", "409", "422", "429"]
    config = {
        "seed": SEED,
        "request-timeout": 60,
        "generation": {"max-examples": 25, "database": "none"},
        "phases": {"stateful": {"max-steps": 6}},
        "checks": {"positive_data_acceptance": {"expected-statuses": accepted}},
        # DELETE cancels a job, which stays readable with its final state (as the schema
        # says): that a GET after it answers 200 is the contract, not a use after free.
        "operations": [
            {"include-operation-id": "get_job", "checks": {"use_after_free": {"enabled": False}}}
        ],
    }
    if token is not None:
        config["auth"] = {"openapi": {"HTTPBearer": {"bearer": token}}}
    return schemathesis.Config.from_dict(config)


@dataclasses.dataclass
class Fuzzed:
    """What a schemathesis run did: cases sent, answers by operation and status, seconds,
    and every problem it found."""

    cases: int = 0
    answers: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    seconds: float = 0.0
    problems: list[str] = dataclasses.field(default_factory=list)


def fuzz(schema: schemathesis.BaseSchema) -> Fuzzed:
    """Run schemathesis' engine on the schema as its CLI does: examples, coverage, fuzzing
    and the stateful phase (along the OpenAPI links), every check on every response."""
    from schemathesis.engine import Status, StopReason, events, from_schema

    run = Fuzzed()
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            run.cases += len(event.recorder.cases)
            for case_id, interaction in event.recorder.interactions.items():
                if interaction.response is not None:
                    label = event.recorder.cases[case_id].value.operation.label
                    run.answers[label, interaction.response.status_code] += 1
            for checks in event.recorder.checks.values():
                for check in checks:
                    if check.status == Status.FAILURE and check.failure_info is not None:
                        failure = check.failure_info
                        run.problems.append(
                            f"{event.recorder.label} [{event.phase}] {check.name}:"
                            f" {failure.failure.title}: {failure.failure.message}\n"
                            f"    {failure.code_sample}"
                        )
        elif isinstance(event, events.NonFatalError):
            run.problems.append(f"{event.label}: {event.info.format()}")
        elif isinstance(event, events.FatalError):
            run.problems.append(f"fatal: {event.exception!r}")
        elif isinstance(event, events.EngineFinished):
            run.seconds = event.running_time
            run.problems += [f"{f.title}: {f.message}" for f in event.failures]
            if event.stop_reason != StopReason.COMPLETED:
                run.problems.append(f"the run stopped early: {event.stop_reason}")
    return run


@pytest.mark.parametrize("token", [TOKEN, None], ids=["with-token", "without-token"])
def test_schemathesis_finds_the_service_true_to_its_schema(datalake, tmp_path: Path, token):
    """The service's input roots hold one tiny file (jobs the fuzzer starts end quickly;
    one runs at a time; shutting the service down cancels the rest)."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "tiny.jsonl").write_text(review("A") + "\n")
    settings = service.Settings(
        dsn=datalake, home=tmp_path / "home", token=token, input_roots=(inputs,), max_jobs=1
    )
    with serving(service.create_app(settings)) as url:
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json", config=fuzzing_config(token))
        run = fuzz(schema)
    print(f"schemathesis: {run.cases} cases in {run.seconds:.0f} s")
    assert not run.problems, "\n\n".join(run.problems)
    # It reached every operation, and along the links it read and cancelled real jobs.
    for answer in (
        ("GET /v1/health", 200),
        ("GET /v1/stats", 200),
        ("POST /v1/ingest/{dataset}", 202),
        ("POST /v1/jobs", 202),
        ("GET /v1/jobs", 200),
        ("GET /v1/jobs/{job_id}", 200),
        ("DELETE /v1/jobs/{job_id}", 202),
    ):
        assert run.answers[answer], (answer, run.answers)
    assert run.cases > 500
