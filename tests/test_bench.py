"""The benchmarks still run: bench/RESULTS.md must come from committed code (each on a
tiny size here: what is checked is that it runs and prints its table, not the figures)."""

from __future__ import annotations

import re
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


def bench(*args: str, timeout: int = 900) -> str:
    run = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def test_progress_overhead_bench_compares_quiet_and_chatty_runs(server_dsn, tmp_path):
    out = bench("bench/progress_overhead.py", "--reviews", "2000", "--repeat", "1",
                "--data", str(tmp_path))  # fmt: skip
    assert "| quiet |" in out and "| progress every 1 s |" in out and "% |" in out


def test_embeddings_cost_bench_measures_both_ways(server_dsn):
    out = bench("bench/embeddings_cost.py", "--reviews", "40", "--repeat", "1")
    rows = re.findall(r"^\| (with|without) embeddings \| (\d+) \|", out, re.MULTILINE)
    assert sorted(rows) == [("with", rows[0][1]), ("without", rows[0][1])] and int(rows[0][1]) > 30


def test_search_quality_bench_prints_recall_per_embedding(tmp_path):
    out = bench("bench/search_quality.py", "--reviews", "150")
    assert "| **mean** |" in out and "recall@10 tuned" in out


def test_search_latency_bench_times_every_mode(server_dsn, tmp_path):
    out = bench("bench/search_latency.py", "--sizes", "300", "--real", "60", "--products",
                "20", "--queries-repeat", "1", "--dsn", server_dsn, "--workdir",
                str(tmp_path))  # fmt: skip
    for mode in ("| hnsw | none |", "| exact | none |", "| default | anger, rating <= 2 |"):
        assert mode in out, out[-3000:]
