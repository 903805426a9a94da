"""What progress reporting costs a run: ``run reviews`` with ``--quiet`` against the same
run printing a progress line every second (the most often it can be asked for; the
default is every 10 s off a terminal), side by side, interleaved, each in its own child
process and fresh database, on the same generated file.

    python bench/progress_overhead.py --reviews 300000 [--repeat 5] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import ingest  # noqa: E402
from bench.machine import cpu, load, publish  # noqa: E402
from connectors import datalake  # noqa: E402
from connectors.datalake import create_database, drop_database, embedded_dsn  # noqa: E402

MODES = {"quiet": ["--quiet"], "progress every 1 s": ["--progress_every", "1"]}


def per_report_ms(server: str, calls: int = 300) -> tuple[float, float]:
    """Wall ms of what one progress report does: the reader's counter statement (as
    ``connectors.files.BytesRead.flush``) and the launcher's read of the run's counters."""
    dsn = create_database(server, "bench_progress")
    try:
        with datalake.open_connection(dsn, autocommit=True) as conn:
            run_id = str(uuid.uuid4())
            started = time.perf_counter()
            for _ in range(calls):
                datalake.add_run_counters(conn, run_id, "read-bench", {"bytes_read": 1 << 20})
            write = (time.perf_counter() - started) / calls * 1000
            started = time.perf_counter()
            for _ in range(calls):
                datalake.run_counters(conn, run_id)
            read = (time.perf_counter() - started) / calls * 1000
    finally:
        drop_database(server, dsn)
    return write, read


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reviews", type=int, default=300_000)
    parser.add_argument("--format", type=int, default=2018, choices=(2014, 2018, 2023))
    parser.add_argument("--repeat", type=int, default=5, help="rounds per mode, interleaved")
    parser.add_argument("--data", default=str(ROOT / "bench" / "out"), help="input cache dir")
    parser.add_argument("--markdown", help="append the table to this file")
    args = parser.parse_args(argv)
    path = ingest.dataset("reviews", args.reviews, args.format, Path(args.data))
    server = embedded_dsn()
    before = load()
    rates: dict[str, list[float]] = {mode: [] for mode in MODES}
    for round_ in range(args.repeat):
        for mode, flags in MODES.items():
            dsn = create_database(server, "bench_progress")
            try:
                step = ingest.run_step("pipeline", dsn, str(path), "reviews", flags)
            finally:
                drop_database(server, dsn)
            rates[mode].append(step["rows"] / step["seconds"])
            print(f"round {round_ + 1}: {mode}: {rates[mode][-1]:,.0f} rows/s", flush=True)
    write_ms, read_ms = per_report_ms(server)
    quiet = statistics.median(rates["quiet"])
    lines = [
        f"{args.reviews:,} generated {args.format} reviews (gzip), `run reviews` into an empty"
        f" datalake, median of {args.repeat} interleaved rounds; {cpu()}; load average before"
        f" {before}, after {load()}",
        "",
        "| mode | rows/s (median) | every round | cost vs --quiet |",
        "|---|---:|---|---:|",
    ]
    for mode, found in rates.items():
        median = statistics.median(found)
        rounds = ", ".join(f"{r:,.0f}" for r in found)
        lines.append(f"| {mode} | {median:,.0f} | {rounds} | {(1 - median / quiet) * 100:+.1f} % |")
    lines += [
        "",
        f"What one report costs, measured directly ({write_ms:.2f} ms for the reader's"
        f" counter statement + {read_ms:.2f} ms for the launcher's read of the counters):"
        f" at one report a second, {(write_ms + read_ms) / 10:.2f} % of one core's time,"
        " however noisy the end-to-end rounds above are.",
    ]
    table = "\n".join(lines)
    publish(table, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
