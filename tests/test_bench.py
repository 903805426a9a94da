"""The ingestion benchmark still runs: bench/RESULTS.md must come from committed code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ingest_bench_runs_every_step_and_prints_the_ceilings(server_dsn, tmp_path):
    results = tmp_path / "results.md"
    run = subprocess.run(
        [sys.executable, "bench/ingest.py", "--reviews", "500", "--repeat", "1", "--unnest",
         "--ceilings", "--dsn", server_dsn, "--data", str(tmp_path), "--markdown", str(results)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    for step in "abcdefgh":
        assert f"| ({step}) " in run.stdout
    assert "of 500 read" in run.stdout and "0 dead letters" in run.stdout
    assert "Ceilings: the Python half alone (f) runs at" in run.stdout
    assert run.stdout.strip().endswith(results.read_text().strip())
