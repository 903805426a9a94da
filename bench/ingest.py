"""Ingestion benchmark: the real pipeline against a hand-written loader and raw COPY.

In one run, against one database server, for the same generated gzip JSON-lines file:
  (a) the ``reviews`` (or ``products``) pipeline end to end into an empty datalake;
  (b) the same pipeline again on the full table (every row a conflict);
  (c) the same-source anchor: a plain Python loop gzip -> json.loads -> binary COPY,
      append only, no cleaning, into an empty copy of the table without keys;
  (d) raw text COPY of the same cleaned rows, already in memory, into an empty copy
      of the table (with its keys).
Optional: (e) ``--unnest``, the sink as beam-postgres' ``WriteToPostgres``; (f)-(h)
``--ceilings``, the pipeline's Python half and the sink's database half measured alone,
which bound what (a) and (b) can reach on this machine.
Each step runs in its own process, so its peak RSS is its own. Prints rows/s, the
ratios of (a) and (b) to (c) and (d), peak RSS and the runner; ``--markdown`` appends
the table to a results file.

    python bench/ingest.py --reviews 500000 [--format 2018] [--repeat 3] [--ceilings]
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Raw fields the anchor copies, with their column types: what a hand-written loader
# would take from each record, uncleaned, into an append-only table of its own.
ANCHOR_FIELDS = {
    ("reviews", 2014): "reviewerID text, asin text, reviewerName text, overall float8,"
    " summary text, reviewText text, unixReviewTime int8",
    ("reviews", 2018): "reviewerID text, asin text, reviewerName text, overall float8,"
    " summary text, reviewText text, verified bool, unixReviewTime int8",
    ("reviews", 2023): "user_id text, asin text, parent_asin text, rating float8, title text,"
    " text text, verified_purchase bool, helpful_vote int8, timestamp int8",
    ("products", 2014): "asin text, title text, price float8, imUrl text",
    ("products", 2018): "asin text, title text, brand text, main_cat text, price text",
    ("products", 2023): "parent_asin text, title text, store text, main_category text,"
    " average_rating float8, rating_number int8",
}


def anchor_columns(kind: str, fmt: int) -> list[tuple[str, str]]:
    """(field, type) pairs the anchor copies."""
    return [tuple(c.split()) for c in ANCHOR_FIELDS[kind, fmt].split(",")]


# --- the measured steps, each run in a child process ------------------------------


def step_anchor(dsn: str, path: str, kind: str, fmt: int, table: str) -> dict:
    """(c) gzip -> json.loads (ast for 2014 metadata) -> binary COPY, append only."""
    import ast

    import psycopg

    fields = anchor_columns(kind, fmt)
    loads = ast.literal_eval if (kind, fmt) == ("products", 2014) else json.loads
    columns = ", ".join(f'"{name}"' for name, _ in fields)
    rows = 0
    started = time.perf_counter()
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        with cur.copy(f"COPY {table} ({columns}) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types([pg_type for _, pg_type in fields])
            with gzip.open(path, "rb") as lines:
                for line in lines:
                    record = loads(line)
                    copy.write_row([record.get(name) for name, _ in fields])
                    rows += 1
    return {"rows": rows, "seconds": time.perf_counter() - started}


def step_copy(dsn: str, source_table: str, table: str) -> dict:
    """(d) raw text COPY of the cleaned rows, read into memory first (not timed)."""
    import psycopg
    from psycopg.types.json import Jsonb

    with psycopg.connect(dsn) as conn:
        rows = [
            tuple(Jsonb(v) if isinstance(v, dict) else v for v in row)
            for row in conn.execute(f"SELECT * FROM {source_table}")
        ]
        started = time.perf_counter()
        with conn.cursor() as cur, cur.copy(f"COPY {table} FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        conn.commit()
    return {"rows": len(rows), "seconds": time.perf_counter() - started}


def step_pipeline(dsn: str, path: str, kind: str, extra: list[str]) -> dict:
    """(a)/(b) the real pipeline, timed by its own run record (pipeline start to end)."""
    from pipelines import cli

    module = cli.PIPELINES[kind]()
    summary = module.run(cli.with_default_runner(["--dsn", dsn, "--input", path, *extra]))
    return {
        "rows": summary.records,
        "seconds": summary.elapsed_s,
        "runner": summary.runner,
        "upserted": summary.upserted,
        "dead_letters": summary.dead_letters,
    }


def _cleaned_records(pipeline, path: str, kind: str):
    """The pipeline's own read -> parse -> clean of one file: (its table spec, the records)."""
    from connectors.files import ReadDataset
    from connectors.sink import PRODUCTS, REVIEWS
    from pipelines.composites import RECORDS, ReadParseClean

    spec = REVIEWS if kind == "reviews" else PRODUCTS
    source = ReadDataset([path], spec.table)
    return spec, (pipeline | ReadParseClean(source, kind[:-1], spec.table))[RECORDS]


def _run_timed(pipeline) -> dict:
    """Run a bench pipeline the way ``execute`` does; rows read and seconds."""
    from pipelines.lifecycle import beam_counters, bulk_garbage_collection

    started = time.perf_counter()
    with bulk_garbage_collection():
        result = pipeline.run()
        result.wait_until_finish()
    seconds = time.perf_counter() - started
    return {"rows": beam_counters(result).get("records_read", 0), "seconds": seconds}


def _bench_pipeline():
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    return beam.Pipeline(options=PipelineOptions(["--runner", "FnApiRunner"]))


def step_unnest(dsn: str, path: str, kind: str) -> dict:
    """(e) the same read -> parse -> clean, sunk by beam-postgres' own ``WriteToPostgres``
    with one ``INSERT … SELECT FROM unnest(%b arrays) … ON CONFLICT`` per 10,000 rows:
    the alternative to the COPY sink that issue #3 asks to measure."""
    import apache_beam as beam
    import orjson
    from beam_postgres.io.postgres import WriteToPostgres
    from psycopg import sql

    from connectors.datalake import migrate
    from connectors.sink import DEFAULT_BATCH_SIZE

    migrate(dsn)
    pipeline = _bench_pipeline()
    spec, cleaned = _cleaned_records(pipeline, path, kind)
    fields, types = spec.record_type._fields, spec.stage_types
    lists = {i for i, t in enumerate(types) if t.endswith("[]")}  # arrays of arrays cannot
    unnested = sql.SQL(", ").join(  # be unnested: list columns travel as JSON text
        sql.SQL("%b::text[]" if i in lists else f"%b::{t}[]") for i, t in enumerate(types)
    )
    columns = sql.SQL(", ").join(
        sql.SQL(
            "ARRAY(SELECT jsonb_array_elements_text({0}::jsonb)) AS {0}" if i in lists else "{0}"
        ).format(sql.Identifier(name))
        for i, name in enumerate(fields)
    )
    source = sql.SQL("(SELECT {} FROM unnest({}) AS u({})) AS stage").format(
        columns, unnested, sql.SQL(", ").join(map(sql.Identifier, fields))
    )
    statement = spec.upsert_sql(source).as_string(None)

    def to_columns(batch: list) -> tuple:
        """The COPY sink's own rows (converted, one per key), as one array per column."""
        columns = [list(column) for column in zip(*spec.copy_rows(batch))]
        for i in lists:
            columns[i] = [None if v is None else orjson.dumps(list(v)).decode() for v in columns[i]]
        return tuple(columns)

    _ = (
        cleaned
        | "Batch"
        >> beam.BatchElements(min_batch_size=DEFAULT_BATCH_SIZE, max_batch_size=DEFAULT_BATCH_SIZE)
        | "ToColumns" >> beam.Map(to_columns)
        | "WriteToPostgres" >> WriteToPostgres(dsn, statement, batch_size=1)
    )
    return _run_timed(pipeline)


def step_python(path: str, kind: str) -> dict:
    """(f) the pipeline's read -> parse -> clean with every record dropped: how fast its
    Python half runs when the sink costs nothing (a ceiling for (a) and (b))."""
    import apache_beam as beam

    pipeline = _bench_pipeline()
    _, cleaned = _cleaned_records(pipeline, path, kind)
    _ = cleaned | "Drop" >> beam.Filter(lambda record: False)
    return _run_timed(pipeline)


def step_database(dsn: str, path: str, kind: str) -> dict:
    """(g) the sink's own statements (stage COPY + guarded upsert, 10,000 rows a batch,
    one connection) for records cleaned beforehand, untimed: how fast the database half
    runs when Python costs little. Run on an empty table, then again on the full one.
    Reports the server backend's CPU per row where /proc shows it (a local server)."""
    import gc

    from connectors.files import iter_lines
    from connectors.sink import (
        DEFAULT_BATCH_SIZE,
        PRODUCTS,
        REVIEWS,
        open_stage,
        write_through_stage,
    )
    from pipelines.lifecycle import bulk_garbage_collection
    from transforms.clean import CLEANERS, CleanError
    from transforms.parse import ParseError, parse_record
    from transforms.records import RawRecord

    spec = REVIEWS if kind == "reviews" else PRODUCTS
    clean = CLEANERS[kind[:-1]]
    records = []
    for number, data in iter_lines(path):
        if data.strip():
            try:
                records.append(clean(parse_record(RawRecord(path, number, data.decode()))))
            except (ParseError, CleanError):
                pass
    gc.freeze()  # the prepared records are not garbage: keep the collector off them
    result = {"rows": len(records)}
    with open_stage(dsn, spec) as conn:
        for table_state in ("empty", "full"):
            cpu_before = _backend_cpu_s(conn)
            started = time.perf_counter()
            with bulk_garbage_collection():
                for first in range(0, len(records), DEFAULT_BATCH_SIZE):
                    rows = spec.copy_rows(records[first : first + DEFAULT_BATCH_SIZE])
                    with conn.transaction():
                        write_through_stage(conn, spec, rows)
            seconds = time.perf_counter() - started
            cpu_after = _backend_cpu_s(conn)
            result[f"seconds_{table_state}"] = seconds
            result[f"backend_us_{table_state}"] = (
                None if cpu_before is None else (cpu_after - cpu_before) / len(records) * 1e6
            )
    result["seconds"] = result["seconds_empty"]
    return result


def _backend_cpu_s(conn) -> "float | None":
    """CPU seconds the connection's server process has used (Linux, local server only)."""
    try:
        with open(f"/proc/{conn.info.backend_pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


STEPS = {
    "anchor": step_anchor,
    "copy": step_copy,
    "pipeline": step_pipeline,
    "unnest": step_unnest,
    "python": step_python,
    "database": step_database,
}


def run_step(name: str, *args) -> dict:
    """Run one step in a child process; add its peak RSS (MiB)."""
    child = subprocess.Popen(
        [sys.executable, __file__, "--step", name, json.dumps(args)],
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    if status != 0:
        raise SystemExit(f"step {name} failed (status {status})")
    result = json.loads(output.decode().strip().splitlines()[-1])
    result["peak_rss_mib"] = usage.ru_maxrss / 1024
    return result


# --- orchestration ------------------------------------------------------------------


def one_round(
    server_dsn: str,
    path: str,
    kind: str,
    fmt: int,
    extra: list[str],
    unnest: bool = False,
    ceilings: bool = False,
) -> dict:
    """(a), (b), (c), (d) once, in a fresh database; (e) in another, with ``unnest``;
    with ``ceilings``, (f) and (g)/(h), the latter in a database of its own."""
    import psycopg

    from connectors.datalake import create_database, drop_database

    dsn = create_database(server_dsn, "bench")
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            columns = ", ".join(
                f'"{name}" {pg_type}' for name, pg_type in anchor_columns(kind, fmt)
            )
            conn.execute(f"CREATE TABLE anchor_{kind} ({columns})")
            conn.execute(f"CREATE TABLE copy_{kind} (LIKE {kind} INCLUDING ALL)")
        result = {
            "a": run_step("pipeline", dsn, path, kind, extra),
            "b": run_step("pipeline", dsn, path, kind, extra),
            "c": run_step("anchor", dsn, path, kind, fmt, f"anchor_{kind}"),
            "d": run_step("copy", dsn, kind, f"copy_{kind}"),
        }
    finally:
        drop_database(server_dsn, dsn)
    if unnest:
        dsn = create_database(server_dsn, "bench")
        try:
            result["e"] = run_step("unnest", dsn, path, kind)
        finally:
            drop_database(server_dsn, dsn)
    if ceilings:
        result["f"] = run_step("python", path, kind)
        dsn = create_database(server_dsn, "bench")
        try:
            database = run_step("database", dsn, path, kind)
        finally:
            drop_database(server_dsn, dsn)
        for key, state in (("g", "empty"), ("h", "full")):
            result[key] = dict(
                database,
                seconds=database[f"seconds_{state}"],
                backend_us=database[f"backend_us_{state}"],
            )
    for key in result:
        result[key]["rate"] = result[key]["rows"] / result[key]["seconds"]
    return result


def median_round(rounds: list[dict]) -> dict:
    """Per step, the median rate (and the seconds and RSS of that same round)."""
    out = {}
    for key in rounds[0]:
        ordered = sorted(rounds, key=lambda r: r[key]["rate"])
        out[key] = ordered[len(ordered) // 2][key]
        out[key]["rates"] = [r[key]["rate"] for r in rounds]
    return out


def report(result: dict, args: argparse.Namespace, command: str) -> str:
    a, b, c, d = (result[k] for k in "abcd")
    names = {
        "a": f"(a) {args.kind} pipeline, empty datalake",
        "b": f"(b) {args.kind} pipeline again, all conflicts",
        "c": "(c) same-source anchor: gzip -> json.loads -> binary COPY",
        "d": "(d) raw text COPY of the cleaned rows",
        "e": "(e) as (a), sink = beam-postgres WriteToPostgres, %b unnest arrays",
        "f": "(f) Python half alone: read -> parse -> clean in Beam, records dropped",
        "g": "(g) database half alone: the sink's COPY + upsert of prepared rows, empty",
        "h": "(h) the same on the full table (all conflicts)",
    }
    lines = [
        f"### {args.kind} x {args.count:,} ({args.format} format), {args.repeat} round(s), median",
        "",
        f"`{command}` — {datetime.date.today()}, {platform.node() or 'host'},"
        f" {os.cpu_count()} cores; runner: {a['runner']}",
        "",
        "| step | rows/s | seconds | peak RSS MiB | ratio to (c) | ratio to (d) |",
        "|---|---|---|---|---|---|",
    ]
    for key in sorted(result):
        step = result[key]
        lines.append(
            f"| {names[key]} | {step['rate']:,.0f} | {step['seconds']:.1f} |"
            f" {step['peak_rss_mib']:,.0f} | {step['rate'] / c['rate']:.2f} |"
            f" {step['rate'] / d['rate']:.2f} |"
        )
    lines += [
        "",
        f"(a)/(c) = **{a['rate'] / c['rate']:.2f}**, (b)/(c) = **{b['rate'] / c['rate']:.2f}**;"
        f" (a)/(d) = {a['rate'] / d['rate']:.2f}, (b)/(d) = {b['rate'] / d['rate']:.2f}."
        f" Pipeline rows: {a['upserted']:,} upserted + {a['dead_letters']:,} dead letters"
        f" of {a['rows']:,} read. Per round, (a)/(c): "
        + ", ".join(f"{x / y:.2f}" for x, y in zip(a["rates"], c["rates"]))
        + "; (b)/(c): "
        + ", ".join(f"{x / y:.2f}" for x, y in zip(b["rates"], c["rates"]))
        + ". Rates per round: "
        + "; ".join(
            f"{k} " + ", ".join(f"{r:,.0f}" for r in result[k]["rates"]) for k in sorted(result)
        ),
        "",
    ]
    if "f" in result:
        lines += [_ceilings(result), ""]
    return "\n".join(lines)


def _ceilings(result: dict) -> str:
    """What (f), (g) and (h) say about the CPU each row needs against what 0.7x (c) allows."""
    target = 0.7 * result["c"]["rate"]
    python_us = 1e6 / result["f"]["rate"]
    text = (
        f"Ceilings: the Python half alone (f) runs at {result['f']['rate'] / result['c']['rate']:.2f}"
        f" of (c) ({python_us:.1f} µs/row, before any sink work); the database half alone at"
        f" {result['g']['rate'] / result['c']['rate']:.2f} of (c) on an empty table and"
        f" {result['h']['rate'] / result['c']['rate']:.2f} on the full one."
        f" At 0.7x (c) = {target:,.0f} rows/s a row has {1e6 / target:.1f} µs of wall,"
        f" {os.cpu_count() or 1}x that of CPU over this machine's cores."
    )
    if result["g"].get("backend_us") is not None:
        text += (
            f" The server spends {result['g']['backend_us']:.1f} µs of CPU per row on an empty"
            f" table and {result['h']['backend_us']:.1f} on the full one: with (f), a row of (a)"
            f" needs {python_us + result['g']['backend_us']:.1f} µs of CPU and a row of (b)"
            f" {python_us + result['h']['backend_us']:.1f}, before the sink's own Python."
        )
    return text


def dataset(kind: str, count: int, fmt: int, folder: Path) -> Path:
    """The generated gzip input of ``count`` records, made once and kept in ``folder``."""
    path = folder / f"{kind}_{fmt}_{count}.jsonl.gz"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pipelines", "generate", kind, "--format",
             str(fmt), "--count", str(count), "--output", str(path)],
            cwd=ROOT, check=True,
        )  # fmt: skip
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--reviews", type=int, help="benchmark the reviews pipeline on N reviews")
    size.add_argument("--products", type=int, help="benchmark the products pipeline on N items")
    parser.add_argument("--format", type=int, default=2018, choices=(2014, 2018, 2023))
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the median is reported")
    parser.add_argument("--dsn", help="server to use (default: a fresh embedded one)")
    parser.add_argument("--data", default=str(ROOT / "bench" / "out"), help="input cache dir")
    parser.add_argument("--markdown", help="append the result table to this file")
    parser.add_argument(
        "--unnest",
        action="store_true",
        help="also measure (e): the sink as beam-postgres WriteToPostgres with %%b arrays",
    )
    parser.add_argument(
        "--ceilings",
        action="store_true",
        help="also measure (f) the Python half and (g)/(h) the database half alone",
    )
    parser.add_argument("pipeline_args", nargs="*", help="extra pipeline flags after --")
    args = parser.parse_args()
    args.kind = "reviews" if args.reviews else "products"
    args.count = args.reviews or args.products

    path = dataset(args.kind, args.count, args.format, Path(args.data))

    home = None
    server_dsn = args.dsn
    if not server_dsn:
        home = Path(tempfile.mkdtemp(prefix="termidator-bench-"))
        os.environ["TERMIDATOR_HOME"] = str(home)
        from connectors import datalake

        server_dsn = datalake.embedded_dsn(home)
    try:
        rounds = []
        for number in range(args.repeat):
            rounds.append(
                one_round(
                    server_dsn,
                    str(path),
                    args.kind,
                    args.format,
                    args.pipeline_args,
                    args.unnest,
                    args.ceilings,
                )
            )
            print(
                f"round {number + 1}: "
                + ", ".join(f"{k} {step['rate']:,.0f} rows/s" for k, step in rounds[-1].items()),
                file=sys.stderr,
            )
    finally:
        if home:
            from connectors import datalake

            datalake.stop_embedded(home)
            shutil.rmtree(home, ignore_errors=True)
    from connectors.datalake import redact

    shown = [redact(arg) if arg == args.dsn else arg for arg in sys.argv[1:]]
    command = "python bench/ingest.py " + " ".join(shown)  # no password in a results file
    text = report(median_round(rounds), args, command)
    print(text)
    if args.markdown:
        with open(args.markdown, "a") as out:
            out.write(text + "\n")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--step":
        step_args = json.loads(sys.argv[3])
        print(json.dumps(STEPS[sys.argv[2]](*step_args)))
        sys.exit(0)
    sys.exit(main())
