"""The same pipelines on the portable runner: Beam's local job service, LOOPBACK workers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import query
from pipelines import cli, products, reviews
from samples import sample_files

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the job service exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"the job service did not listen on {port} in {timeout_s:.0f} s")


@pytest.fixture(scope="module")
def job_endpoint(tmp_path_factory):
    """Beam's local job service in its own process, for the module; its endpoint."""
    port = free_port()
    log = tmp_path_factory.mktemp("job_service") / "job_service.log"
    with open(log, "wb") as output:
        service = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "apache_beam.runners.portability.local_job_service_main",
                "--port",
                str(port),
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(port, service)
        yield f"localhost:{port}"
    finally:
        service.terminate()
        try:
            service.wait(timeout=15)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait()


def cli_run(pipeline: str, files: list[str], dsn: str, endpoint: str):
    """``python -m pipelines run PIPELINE`` on the portable runner, as a user types it."""
    inputs = [arg for path in files for arg in ("--input", path)]
    portable = ["--runner", "PortableRunner", "--job_endpoint", endpoint]
    portable += ["--environment_type", "LOOPBACK"]
    return subprocess.run(
        [sys.executable, "-m", "pipelines", "run", pipeline, *inputs, "--dsn", dsn, *portable],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "TERMIDATOR_DSN"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_pipelines_run_on_the_portable_runner_and_write_what_the_direct_runner_writes(
    datalake, job_endpoint
):
    samples = sample_files()
    expected_runner = f"PortableRunner (job service {job_endpoint}, LOOPBACK workers)"

    for name in ("products", "reviews"):
        result = cli_run(name, samples[name], datalake, job_endpoint)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"{name}: DONE" in result.stdout and expected_runner in result.stdout

    runs = query(
        datalake,
        "SELECT pipeline, runner, state, counters, run_id::text FROM pipeline_runs"
        " ORDER BY started_at",
    )
    assert [(p, r, s) for p, r, s, _, _ in runs] == [
        ("products", expected_runner, "DONE"),
        ("reviews", expected_runner, "DONE"),
    ]
    for pipeline, _, _, counters, run_id in runs:
        # Beam metrics come back through the job service: nothing lost, nothing uncounted.
        records = counters["records_read"] + counters.get("read_dead_letters", 0)
        upserted = counters[f"{pipeline}_upserted"]
        dead = counters.get("dead_letters_upserted", 0)
        assert records > 0 and records == upserted + dead
        stored_dead = query(
            datalake, "SELECT count(*) FROM dead_letters WHERE run_id = %s", (run_id,)
        )
        assert stored_dead == [(dead,)]
    # The bundled review samples hold exactly two malformed lines (samples/README.md).
    assert runs[1][3].get("dead_letters_upserted") == 2

    counts = query(
        datalake, "SELECT (SELECT count(*) FROM products), (SELECT count(*) FROM reviews)"
    )[0]
    assert counts[0] > 0 and counts[1] > 0

    # The DirectRunner, on the same input, finds every row already as it would write it.
    for module, name in ((products, "products"), (reviews, "reviews")):
        inputs = [arg for path in samples[name] for arg in ("--input", path)]
        direct = module.run(cli.with_default_runner(["--dsn", datalake, *inputs]))
        assert "FnApiRunner" in direct.runner
        assert direct.upserted == runs[0 if name == "products" else 1][3][f"{name}_upserted"]
        assert direct.changed == 0, f"{name}: the portable run wrote different rows"
    assert query(
        datalake, "SELECT (SELECT count(*) FROM products), (SELECT count(*) FROM reviews)"
    ) == [counts]
