"""The REST service under faults and hostile bodies: a full disk, a kill -9 mid-upload, a
gzip bomb of blank lines. Real parts: uvicorn on loopback, the embedded Postgres, a real
tmpfs where the machine lets us mount one, a real ``python -m pipelines serve`` process."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import gzip
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import query
from connectors import landing
from samples import generate
from server import app as service
from server.ingest import Limits
from test_server import NDJSON, ROOT, TOKEN, assert_error, free_port, make_settings, serving
from test_stream import review, wait_for

KEY = {"Idempotency-Key": "batch-0001"}


def temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob(".*.tmp")) if directory.exists() else []


# --- a full landing zone ------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A tmpfs of ``size`` mounted at ``path``; skips the test where mounting is refused."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


@pytest.fixture(params=["tmpfs", "write-raises-ENOSPC"])
def full_disk(request, datalake, tmp_path, monkeypatch):
    """A service whose landing zone fills up: a 64 KiB tmpfs, or (where no tmpfs can be
    mounted, and always as a second case) a landing writer that raises ENOSPC."""
    settings = dataclasses.replace(
        make_settings(datalake, tmp_path), limits=Limits(max_body_bytes=4 << 20)
    )
    with contextlib.ExitStack() as stack:
        if request.param == "tmpfs":
            stack.enter_context(tmpfs(settings.landing_root, "64k"))
            free = lambda: None  # noqa: E731 - the refused upload's temp file held the space
        else:

            def no_space(self, data: bytes) -> None:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            monkeypatch.setattr(landing.LandingFile, "write", no_space)
            free = monkeypatch.undo
        url = stack.enter_context(serving(service.create_app(settings)))
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            yield http, settings, free


def test_a_full_landing_zone_answers_507_removes_the_temp_file_and_frees_the_key(
    full_disk, datalake
):
    http, settings, free = full_disk
    body = "\n".join(review(f"R{i}") for i in range(1000)).encode()  # ~1 MB > 64 KiB
    response = http.post("/v1/ingest/reviews", content=body, headers={**NDJSON, **KEY})
    error = assert_error(response, 507, "insufficient_storage")
    assert "out of disk space" in error["message"]
    directory = settings.landing_root / "reviews"
    assert temp_files(directory) == [] and landing.list_landed(directory) == []
    assert query(datalake, "SELECT count(*) FROM ingest_requests") == [(0,)]
    free()
    # The key is free at once: a retry (here a smaller batch, which fits) goes ahead.
    retried = http.post("/v1/ingest/reviews", content=body[:4000], headers={**NDJSON, **KEY})
    assert retried.status_code == 202, retried.text
    assert query(datalake, "SELECT state FROM ingest_requests") == [("done",)]


# --- kill -9 in the middle of an upload -----------------------------------------------------


class Service:
    """``python -m pipelines serve`` as its own process, on a free loopback port."""

    def __init__(self, home: Path, dsn: str, inputs: Path, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "TERMIDATOR_HOME": str(home),
            "TERMIDATOR_DSN": dsn,
            "TERMIDATOR_API_TOKEN": TOKEN,
        }
        command = [sys.executable, "-m", "pipelines", "serve", "--port", str(self.port)]
        with open(log, "ab") as out:
            self.process = subprocess.Popen(
                [*command, "--input-root", str(inputs)],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            )
        wait_for(self.healthy, timeout=180, every=0.25)

    def healthy(self) -> bool:
        assert self.process.poll() is None, "the service exited"
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{self.url}/v1/health", timeout=5).status_code == 200
        return False

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)


def test_a_service_killed_mid_upload_leaves_no_temp_file_and_frees_the_key(datalake, tmp_path):
    home, inputs = tmp_path / "home", tmp_path / "inputs"
    inputs.mkdir()
    directory = landing.landing_dir("reviews", landing.landing_root(home))
    first = Service(home, datalake, inputs, tmp_path / "serve.log")
    stop = threading.Event()

    def slow_body():
        yield (review("A") + "\n").encode()
        while not stop.wait(0.05):
            yield (review("B") + "\n").encode()

    def upload() -> None:
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(
                f"{first.url}/v1/ingest/reviews",
                content=slow_body(),
                headers={**NDJSON, **KEY, "Authorization": f"Bearer {TOKEN}"},
                timeout=60,
            )

    uploader = threading.Thread(target=upload, daemon=True)
    uploader.start()
    try:
        wait_for(lambda: temp_files(directory), timeout=60)
        assert query(datalake, "SELECT state FROM ingest_requests") == [("pending",)]
        first.kill()
    finally:
        stop.set()
        uploader.join(60)
    assert temp_files(directory)  # what the killed process left behind

    second = Service(home, datalake, inputs, tmp_path / "serve.log")
    try:
        assert temp_files(directory) == []  # cleaned when the service started
        body = (review("A") + "\n" + review("B") + "\n").encode()
        retried = httpx.post(
            f"{second.url}/v1/ingest/reviews",
            content=body,
            headers={**NDJSON, **KEY, "Authorization": f"Bearer {TOKEN}"},
            timeout=60,
        )
        assert retried.status_code == 202, retried.text  # not 409 for ten minutes
        assert retried.json()["accepted"] == 2
        assert [f.name for f in landing.list_landed(directory)] == [retried.json()["file"]]
        assert temp_files(directory) == []
    finally:
        second.process.terminate()
        second.process.wait(60)


# --- compression bombs ------------------------------------------------------------------------


def test_a_gzip_of_blank_lines_is_refused_before_it_costs_seconds(datalake, tmp_path):
    settings = dataclasses.replace(make_settings(datalake, tmp_path), limits=Limits())
    bomb = gzip.compress(b"\n" * (48 << 20), 9)  # ~48 KiB that expand to 48 MiB of "\n"
    real = tmp_path / "real.jsonl"
    generate.write_dataset("reviews", 2023, 2500, str(real), seed=3)  # ~2 MB, gzip ~6:1
    gzipped = {**NDJSON, "Content-Encoding": "gzip", "Authorization": f"Bearer {TOKEN}"}
    with serving(service.create_app(settings)) as url:
        started = time.perf_counter()
        refused = httpx.post(f"{url}/v1/ingest/reviews", content=bomb, headers=gzipped)
        elapsed = time.perf_counter() - started
        accepted = httpx.post(
            f"{url}/v1/ingest/reviews",
            content=gzip.compress(real.read_bytes()),
            headers=gzipped,
            timeout=120,
        )
    error = assert_error(refused, 413, "payload_too_large")
    assert "expands more than 100:1" in error["message"]
    print(f"gzip bomb ({len(bomb):,} bytes -> 48 MiB of newlines) refused in {elapsed:.3f} s")
    assert elapsed < 2.0
    # A real dataset compresses far less, and is landed whole.
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["accepted"] == 2500


def test_ctrl_c_stops_the_service_gracefully_with_one_line(datalake, tmp_path):
    (tmp_path / "inputs").mkdir()
    log = tmp_path / "serve.log"
    service = Service(tmp_path / "home", datalake, tmp_path / "inputs", log)
    service.process.send_signal(signal.SIGINT)
    assert service.process.wait(60) == 130
    text = log.read_text()
    assert text.strip().splitlines()[-1] == (
        "interrupted: the service stopped; jobs still running were cancelled"
    )
    assert "Traceback" not in text
