"""What storing review embeddings costs ``run emotions``: reviews/s and datalake size, side
by side on the same reviews.

Two fresh databases on the datalake's server get the same generated reviews; in one the
``review_embeddings`` table is dropped first, so ``run emotions`` classifies without
storing embeddings (what a Postgres without pgvector gets). Both runs are timed in turn,
``--repeat`` times each, interleaved; the sizes are the tables' total relation sizes
(heap, TOAST, indexes: the HNSW index included).

    python bench/embeddings_cost.py --reviews 4000 [--repeat 2] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402

from bench.machine import cpu, load, publish  # noqa: E402
from connectors.datalake import create_database, drop_database, embedded_dsn  # noqa: E402
from pipelines import cli, emotions, reviews  # noqa: E402
from samples import generate  # noqa: E402


def sizes(dsn: str) -> dict[str, int]:
    """Total bytes of the tables an emotions run writes (and of the reviews, for scale)."""
    with psycopg.connect(dsn) as conn:
        return {
            table: conn.execute("SELECT pg_total_relation_size(%s)", (table,)).fetchone()[0]
            for table in ("reviews", "review_emotions", "review_embeddings")
            if conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()[0]
        }


def fresh_lake(server: str, path: str, with_embeddings: bool) -> str:
    dsn = create_database(server, "bench_emb" if with_embeddings else "bench_noemb")
    reviews.run(cli.with_default_runner(["--dsn", dsn, "--input", path, "--quiet"]))
    if not with_embeddings:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("DROP TABLE review_embeddings")
    return dsn


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reviews", type=int, default=4000)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--markdown", help="append the table to this file")
    args = parser.parse_args(argv)
    server = embedded_dsn()
    before = load()
    seconds: dict[bool, list[float]] = {True: [], False: []}
    measured: dict[bool, dict[str, int]] = {}
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "Electronics.jsonl")
        generate.write_dataset("reviews", 2023, args.reviews, path, seed=3)
        for _ in range(args.repeat):
            for with_embeddings in (True, False):
                dsn = fresh_lake(server, path, with_embeddings)
                try:
                    started = time.perf_counter()
                    argv = ["--dsn", dsn, "--quiet"]  # as `python -m pipelines run emotions`
                    done = emotions.run(cli.with_default_runner(argv, emotions=True))
                    seconds[with_embeddings].append(time.perf_counter() - started)
                    measured[with_embeddings] = {"classified": done.records, **sizes(dsn)}
                finally:
                    drop_database(server, dsn)
    rows = []
    for with_embeddings in (False, True):
        found = measured[with_embeddings]
        n = found["classified"]
        stored = found.get("review_embeddings")
        rows.append(
            f"| {'with' if with_embeddings else 'without'} embeddings | {n:,} "
            f"| {n / min(seconds[with_embeddings]):.1f} "
            f"| {statistics.median(seconds[with_embeddings]):.1f} "
            f"| {found['review_emotions'] / n:,.0f} "
            f"| {'-' if stored is None else f'{stored / n:,.0f}'} |"
        )
    reviews_per_row = measured[True]["reviews"] / measured[True]["classified"]
    table = "\n".join(
        [
            f"{args.reviews:,} generated 2023 reviews, `run emotions` as the CLI runs it,"
            f" fastest of {args.repeat} per row (interleaved); {cpu()}; load average before"
            f" {before}, after {load()}; the `reviews` table itself: {reviews_per_row:,.0f}"
            " bytes per review",
            "",
            "| run emotions | reviews | reviews/s (whole run) | median s | review_emotions"
            " bytes/review | review_embeddings bytes/review (HNSW included) |",
            "|---|---:|---:|---:|---:|---:|",
            *rows,
        ]
    )
    publish(table, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
