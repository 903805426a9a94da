"""Search latency: ``connectors.search.search`` over 100k and 1M stored review embeddings,
through the HNSW index and by exact scan, unfiltered and filtered.

What it does, in one fresh bench database on the datalake's server (dropped at the end,
also on failure or Ctrl-C, unless ``--keep``):

1. Embeds ~2000 generated reviews (``samples.generate``, 2023 format) once with the
   default emotion model, which also gives each its emotion; cached as ``.npz`` under
   ``--workdir``, so reruns skip it.
2. Generates N review embeddings as a randomly chosen real embedding plus gaussian noise
   (``--sigma`` per dimension), L2-normalised, and fills ``reviews`` (the source review's
   title, text and rating; an asin out of ``--products`` products; a date in 2010-2023),
   ``products``, ``review_emotions`` (the source review's emotion) and
   ``review_embeddings`` by COPY in chunks. A larger size adds rows to the smaller one.
3. Drops the HNSW index before loading, VACUUM ANALYZEs after, and times the index build
   (``maintenance_work_mem`` sized for the graph, one parallel maintenance worker).
4. Embeds ~20 realistic queries with ``pipelines.search.embed_query`` and times
   ``search()`` (a new connection per call, as users get it) per mode: HNSW only
   (``exact=False``), exact scan (``exact=True``) and, filtered, the default
   (``exact=None``: HNSW, exact when the filters leave fewer than k); per filter: none,
   anger with rating <= 2, and one product's asin. A warm-up round, then
   ``--queries-repeat`` rounds interleaved across configurations; p50/p95 in ms. Recall
   is the mean overlap of each mode's top-10 review ids with the exact scan's.
5. Reports relation sizes, a query plan per configuration (EXPLAIN ANALYZE of the
   statement search() runs, captured outside the timed rounds), the machine, the load
   average and the pgvector version, as markdown on stdout and in
   ``WORKDIR/search_latency.md``.

Run it (the embedded server under TERMIDATOR_HOME, or TERMIDATOR_DSN / --dsn):

    TERMIDATOR_HOME=/work/scratch/latency/home .venv/bin/python bench/search_latency.py \\
        --sizes 100000 1000000 --workdir /work/scratch/latency [--queries-repeat 3] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence
from unittest import mock

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402

from connectors import datalake  # noqa: E402
from connectors.search import Hit, Query, search  # noqa: E402
from transforms.emotion_model import DEFAULT_MODEL, EMBEDDING_MODEL  # noqa: E402

DIM = 384
CHUNK = 50_000
K = 10
INDEX = "review_embeddings_hnsw_idx"
CATEGORIES = (
    "All Beauty",
    "Musical Instruments",
    "Gift Cards",
    "Electronics",
    "Home & Kitchen",
    "Toys & Games",
)
QUERIES = (
    "stopped working after a week",
    "smells like chemicals",
    "arrived dirty and used",
    "gets too hot, fire hazard",
    "great gift",
    "broke the first time I used it",
    "cheap plastic, feels flimsy",
    "exactly as described, works perfectly",
    "gave me a rash",
    "battery dies fast",
    "missing parts in the box",
    "keeps going out of tune",
    "customer service never answered",
    "my kids love it",
    "way too expensive for what it is",
    "fake, not the real brand",
    "leaked all over my bag",
    "sounds amazing for the price",
    "it sparked when I plugged it in, scary",
    "disappointed, would not buy again",
)
FIRST_DAY = datetime.datetime(2010, 1, 1, tzinfo=datetime.timezone.utc)
LAST_DAY = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)


# --- the machine ---------------------------------------------------------------------


def cpu_description() -> dict[str, str]:
    """``lscpu``'s model name, core count and the AVX-512 / AMX flags."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"model": "unknown", "cpus": str(os.cpu_count()), "flags": ""}
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = sorted(
        f for f in fields.get("Flags", "").split() if f.startswith("avx512") or f.startswith("amx")
    )
    return {
        "model": fields.get("Model name", "unknown").strip(),
        "cpus": fields.get("CPU(s)", str(os.cpu_count())).strip(),
        "flags": " ".join(flags) or "none",
    }


def load_average() -> str:
    """The 1/5/15-minute load averages, as ``uptime`` prints them."""
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def server_facts(dsn: str) -> dict[str, str]:
    """Postgres and pgvector versions and the settings that shape search latency."""
    names = ("server_version", "shared_buffers", "work_mem", "max_parallel_workers_per_gather")
    with datalake.connect(dsn, autocommit=True) as conn:
        facts = {
            n: conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(n))).fetchone()[0]
            for n in names
        }
        facts["pgvector"] = conn.execute(
            "SELECT extversion FROM pg_extension WHERE extname = 'vector'"
        ).fetchone()[0]
    return facts


# --- the real reviews the vectors are made from --------------------------------------


@dataclasses.dataclass
class RealReviews:
    """Embedded generated reviews: vectors (n x 384, L2-normalised) and what each says."""

    vectors: np.ndarray
    titles: list[str]
    texts: list[str]
    ratings: np.ndarray
    labels: list[str]
    scores: np.ndarray
    scores_json: list[str]


def real_reviews(workdir: Path, count: int, seed: int) -> RealReviews:
    """``count`` distinct generated reviews and their embeddings and emotions, from the
    cache under ``workdir`` when it has them (embedding runs ~100 reviews/s)."""
    cache = workdir / f"real_reviews_{count}_seed{seed}_{DEFAULT_MODEL}.npz"
    if not cache.is_file():
        started = time.perf_counter()
        data = _embed_reviews(count, seed)
        workdir.mkdir(parents=True, exist_ok=True)
        np.savez(cache.with_suffix(".tmp.npz"), **data)
        cache.with_suffix(".tmp.npz").rename(cache)
        print(f"embedded {count} reviews in {time.perf_counter() - started:.0f} s -> {cache}")
    data = np.load(cache)
    return RealReviews(
        vectors=data["vectors"],
        titles=[str(t) for t in data["titles"]],
        texts=[str(t) for t in data["texts"]],
        ratings=data["ratings"],
        labels=[str(t) for t in data["labels"]],
        scores=data["scores"],
        scores_json=[str(t) for t in data["scores_json"]],
    )


def _distinct_reviews(count: int, seed: int) -> list[dict]:
    """``count`` generated reviews with distinct model texts."""
    from samples.generate import iter_lines
    from transforms.emotion import model_text

    seen: set[str] = set()
    found: list[dict] = []
    for line in iter_lines("reviews", 2023, count * 3, seed):
        record = json.loads(line)
        text = model_text(record.get("title"), record.get("text"))
        if text and text not in seen:
            seen.add(text)
            found.append({**record, "model_text": text})
            if len(found) == count:
                return found
    raise RuntimeError(f"only {len(found)} distinct reviews in {count * 3} generated")


def _embed_reviews(count: int, seed: int) -> dict[str, np.ndarray]:
    """Embed and classify ``count`` reviews with the default emotion model."""
    from transforms.emotion import Classified, EmotionInput, LoadedEmotionModel

    records = _distinct_reviews(count, seed)
    model = LoadedEmotionModel(DEFAULT_MODEL)
    found: list[Classified] = []
    for start in range(0, len(records), 64):
        batch = [
            EmotionInput(str(i), None, None, r["model_text"])
            for i, r in enumerate(records[start : start + 64], start)
        ]
        for item in model.classify(batch):
            if not isinstance(item, Classified) or item.embedding is None:
                raise RuntimeError(f"cannot embed a review: {item}")
            found.append(item)
    return {
        "vectors": np.asarray([f.embedding for f in found], dtype=np.float32),
        "titles": np.asarray([r.get("title") or "" for r in records]),
        "texts": np.asarray([r.get("text") or "" for r in records]),
        "ratings": np.asarray([float(r["rating"]) for r in records], dtype=np.float32),
        "labels": np.asarray([f.result.label for f in found]),
        "scores": np.asarray([f.result.score for f in found], dtype=np.float32),
        "scores_json": np.asarray(
            [json.dumps({k: round(v, 4) for k, v in f.result.scores.items()}) for f in found]
        ),
    }


# --- generated rows ------------------------------------------------------------------


@dataclasses.dataclass
class Chunk:
    """Generated rows ``start`` to ``stop``: the real review each copies, and its own parts."""

    start: int
    source: np.ndarray
    vectors: np.ndarray
    product: np.ndarray
    reviewer: np.ndarray
    reviewed_at: np.ndarray

    @property
    def ids(self) -> list[str]:
        return [review_id(i) for i in range(self.start, self.start + len(self.source))]


def review_id(i: int) -> str:
    return f"bench-{i:08d}"


def asin(j: int) -> str:
    return f"BENCH{j:05d}"


def generate_chunk(real: RealReviews, start: int, stop: int, args: argparse.Namespace) -> Chunk:
    """Rows ``start`` to ``stop``: a random real embedding plus N(0, sigma^2) per dimension,
    L2-normalised; the same arguments give the same rows."""
    rng = np.random.default_rng([args.seed, start])
    n = stop - start
    source = rng.integers(0, len(real.vectors), n)
    vectors = real.vectors[source] + rng.standard_normal((n, DIM), dtype=np.float32) * np.float32(
        args.sigma
    )
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    span = (LAST_DAY - FIRST_DAY).total_seconds()
    seconds = FIRST_DAY.timestamp() + rng.random(n) * span
    return Chunk(
        start=start,
        source=source,
        vectors=vectors,
        product=rng.integers(0, args.products, n),
        reviewer=rng.integers(0, max(1, (stop * 2) // 3), n),
        reviewed_at=seconds.astype("datetime64[s]"),
    )


def _copy_escape(value: str) -> str:
    """A value for COPY's text format."""
    return (
        value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    )


def reviews_copy_text(chunk: Chunk, real: RealReviews) -> Iterator[str]:
    """The chunk's ``reviews`` rows in COPY text format (short texts: the first 200 chars)."""
    titles = [_copy_escape(t) for t in real.titles]
    texts = [_copy_escape(t[:200]) for t in real.texts]
    stamps = np.datetime_as_string(chunk.reviewed_at, unit="s")
    for i, rid in enumerate(chunk.ids):
        s = chunk.source[i]
        product = asin(chunk.product[i])
        yield (
            f"{rid}\tU{chunk.reviewer[i]:08d}\t{product}\t{product}\t{real.ratings[s]:g}"
            f"\t{titles[s]}\t{texts[s]}\t{stamps[i]}+00\t2023\tbench\t{chunk.start + i}\n"
        )


def emotions_copy_text(chunk: Chunk, real: RealReviews) -> Iterator[str]:
    """The chunk's ``review_emotions`` rows (the source review's emotion, by DEFAULT_MODEL)."""
    scores = [_copy_escape(s) for s in real.scores_json]
    for i, rid in enumerate(chunk.ids):
        s = chunk.source[i]
        yield f"{rid}\t{DEFAULT_MODEL}\t{real.labels[s]}\t{real.scores[s]:.4f}\t{scores[s]}\n"


def embeddings_copy_binary(chunk: Chunk) -> bytes:
    """The chunk's ``review_embeddings`` rows (review_id, model, embedding) as binary COPY
    data (no header): pgvector's binary vector is int16 dim, int16 0, float4s big-endian."""
    ids = np.asarray([i.encode() for i in chunk.ids])
    model = EMBEDDING_MODEL.encode()
    row = np.dtype(
        [
            ("fields", ">i2"),
            ("id_len", ">i4"),
            ("id", ids.dtype),
            ("model_len", ">i4"),
            ("model", f"S{len(model)}"),
            ("vec_len", ">i4"),
            ("dim", ">i2"),
            ("unused", ">i2"),
            ("vec", ">f4", (DIM,)),
        ]
    )
    rows = np.zeros(len(ids), dtype=row)
    rows["fields"] = 3
    rows["id_len"] = ids.dtype.itemsize
    rows["id"] = ids
    rows["model_len"] = len(model)
    rows["model"] = model
    rows["vec_len"] = 4 + 4 * DIM
    rows["dim"] = DIM
    rows["vec"] = chunk.vectors
    return rows.tobytes()


_BINARY_HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00" * 8
_BINARY_TRAILER = b"\xff\xff"


def _copy_lines(cur: psycopg.Cursor, statement: str, lines: Iterator[str]) -> None:
    with cur.copy(statement) as copy:
        batch: list[str] = []
        for line in lines:
            batch.append(line)
            if len(batch) == 5000:
                copy.write("".join(batch).encode())
                batch = []
        copy.write("".join(batch).encode())


def load_chunk(conn: psycopg.Connection, chunk: Chunk, real: RealReviews) -> None:
    """COPY the chunk into reviews, review_emotions and review_embeddings, one transaction."""
    with conn.transaction(), conn.cursor() as cur:
        _copy_lines(
            cur,
            "COPY reviews (review_id, reviewer_id, asin, parent_asin, rating, title, text,"
            " reviewed_at, source_format, source, line) FROM STDIN",
            reviews_copy_text(chunk, real),
        )
        _copy_lines(
            cur,
            "COPY review_emotions (review_id, model, label, score, scores) FROM STDIN",
            emotions_copy_text(chunk, real),
        )
        with cur.copy(
            "COPY review_embeddings (review_id, model, embedding) FROM STDIN (FORMAT BINARY)"
        ) as copy:
            copy.write(_BINARY_HEADER + embeddings_copy_binary(chunk) + _BINARY_TRAILER)


def load_products(dsn: str, count: int) -> None:
    """``count`` products, each in one of a handful of main categories."""
    with datalake.connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
        with cur.copy(
            "COPY products (asin, title, main_category, categories, source_format, source,"
            " line) FROM STDIN"
        ) as copy:
            for j in range(count):
                category = CATEGORIES[j % len(CATEGORIES)]
                copy.write_row(
                    (asin(j), f"Bench product {j}", category, [category], 2023, "bench", j)
                )


def load_rows(dsn: str, real: RealReviews, start: int, stop: int, args) -> float:
    """Generate and load rows ``start`` to ``stop`` in chunks; seconds taken."""
    started = time.perf_counter()
    with datalake.connect(dsn, autocommit=True, statement_timeout_s=3600) as conn:
        for low in range(start, stop, CHUNK):
            load_chunk(conn, generate_chunk(real, low, min(stop, low + CHUNK), args), real)
            done = min(stop, low + CHUNK)
            rate = (done - start) / (time.perf_counter() - started)
            print(f"  loaded {done:,} rows ({rate:,.0f} rows/s)", flush=True)
    return time.perf_counter() - started


# --- the index -----------------------------------------------------------------------


def drop_index(dsn: str) -> None:
    with datalake.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(INDEX)))


def vacuum_analyze(dsn: str) -> float:
    """VACUUM ANALYZE the tables search reads; seconds taken."""
    started = time.perf_counter()
    with datalake.connect(dsn, autocommit=True, statement_timeout_s=3600) as conn:
        for table in ("reviews", "products", "review_emotions", "review_embeddings"):
            conn.execute(sql.SQL("VACUUM ANALYZE {}").format(sql.Identifier(table)))
    return time.perf_counter() - started


@dataclasses.dataclass
class Build:
    """An HNSW build: seconds (None: stopped at the time limit), how far it got, notices."""

    seconds: Optional[float]
    elapsed: float
    maintenance_work_mem: str
    progress: str
    notices: list[str]


def maintenance_work_mem(rows: int) -> str:
    """Enough for the in-memory graph (~2 kB a 384-d element at m=16; 4 kB allowed)."""
    return f"{int(rows * 4000 / 2**20) + 256}MB"


def build_index(dsn: str, rows: int, timeout_s: float) -> Build:
    """CREATE INDEX ... USING hnsw, as migration 008 does; stopped after ``timeout_s``."""
    memory = maintenance_work_mem(rows)
    notices: list[str] = []
    last = {"progress": ""}
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_build, args=(dsn, stop, last), daemon=True)
    started = time.perf_counter()
    with datalake.connect(dsn, autocommit=True, statement_timeout_s=timeout_s) as conn:
        conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        conn.execute(sql.SQL("SET maintenance_work_mem = {}").format(sql.Literal(memory)))
        conn.execute("SET max_parallel_maintenance_workers = 1")
        watcher.start()
        try:
            conn.execute(
                sql.SQL(
                    "CREATE INDEX {} ON review_embeddings USING hnsw (embedding vector_cosine_ops)"
                ).format(sql.Identifier(INDEX))
            )
            seconds: Optional[float] = time.perf_counter() - started
        except psycopg.errors.QueryCanceled:
            seconds = None
        finally:
            stop.set()
            watcher.join()
    return Build(seconds, time.perf_counter() - started, memory, last["progress"], notices)


def _watch_build(dsn: str, stop: threading.Event, last: dict) -> None:
    """Print the build's progress every 30 s (pg_stat_progress_create_index)."""
    started = time.perf_counter()
    with datalake.connect(dsn, autocommit=True) as conn:
        while not stop.wait(30):
            row = conn.execute(
                "SELECT phase, tuples_done, tuples_total FROM pg_stat_progress_create_index"
            ).fetchone()
            if row:
                last["progress"] = f"{row[0]}: {row[1]:,} of {row[2]:,} tuples"
                print(
                    f"  index build {time.perf_counter() - started:.0f} s: {last['progress']}"
                    f" (load {load_average()})",
                    flush=True,
                )


def relation_sizes(dsn: str) -> dict[str, int]:
    """Bytes on disk of review_embeddings (heap, all with indexes and TOAST, the HNSW
    index) and of the other tables search joins."""
    with datalake.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT pg_relation_size('review_embeddings'),"
            " pg_total_relation_size('review_embeddings'),"
            " coalesce(pg_relation_size(to_regclass(%s)), 0),"
            " pg_total_relation_size('reviews') + pg_total_relation_size('review_emotions')"
            " + pg_total_relation_size('products'),"
            " (SELECT count(*) FROM review_embeddings)",
            (INDEX,),
        ).fetchone()
    keys = ("heap", "total", "hnsw", "joined", "rows")
    return dict(zip(keys, row))


# --- the queries ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    """One measured configuration: a mode (exact=...) and a filter."""

    mode: str
    exact: Optional[bool]
    filter: str
    filters: tuple[tuple[str, Any], ...]

    @property
    def name(self) -> str:
        return f"{self.mode} / {self.filter}"


MODES = {"hnsw": False, "exact": True, "default": None}


def configs(product: str, with_index: bool) -> list[Config]:
    """HNSW and exact for each filter, and the default for the filtered ones."""
    filters = {
        "none": (),
        "anger, rating <= 2": (("emotion", "anger"), ("max_rating", 2.0)),
        f"asin {product}": (("asin", product),),
    }
    found = []
    for name, values in filters.items():
        for mode, exact in MODES.items():
            if mode == "default" and not values:
                continue  # unfiltered, the default is the HNSW path exactly
            if exact is not True and not with_index:
                continue
            found.append(Config(mode, exact, name, values))
    return found


def embed_queries(texts: Sequence[str]) -> list[Sequence[float]]:
    """Each query's embedding, as ``python -m pipelines search`` computes it."""
    from pipelines.search import embed_query

    return [embed_query(text) for text in texts]


def run_search(dsn: str, config: Config, text: str, vector: Sequence[float]) -> list[Hit]:
    query = Query(text, k=K, **dict(config.filters)).checked()
    return search(dsn, query, vector, EMBEDDING_MODEL, DEFAULT_MODEL, exact=config.exact)


@dataclasses.dataclass
class Measured:
    """Latencies (ms) of one configuration, and its hits from the warm-up round."""

    config: Config
    latencies: list[float] = dataclasses.field(default_factory=list)
    hits: list[list[Hit]] = dataclasses.field(default_factory=list)


def measure(
    dsn: str,
    cfgs: Sequence[Config],
    vectors: Sequence[Sequence[float]],
    repeat: int,
    budget_s: float,
) -> tuple[dict[Config, Measured], int]:
    """A warm-up round (its hits kept for recall), then ``repeat`` timed rounds, each over
    every configuration and query; rounds stop once ``budget_s`` is spent (at least one).
    Returns the measurements and the rounds run."""
    results = {c: Measured(c) for c in cfgs}
    for config in cfgs:
        for text, vector in zip(QUERIES, vectors):
            results[config].hits.append(run_search(dsn, config, text, vector))
    started = time.perf_counter()
    rounds = 0
    for _ in range(repeat):
        for config in cfgs:
            for text, vector in zip(QUERIES, vectors):
                t0 = time.perf_counter()
                run_search(dsn, config, text, vector)
                results[config].latencies.append((time.perf_counter() - t0) * 1000)
        rounds += 1
        print(
            f"  round {rounds}/{repeat} done ({time.perf_counter() - started:.0f} s,"
            f" load {load_average()})",
            flush=True,
        )
        if time.perf_counter() - started > budget_s:
            break
    return results, rounds


def connect_overhead_ms(dsn: str, times: int = 30) -> float:
    """p50 of a bare connection + ``SELECT 1`` (what every search() call pays first)."""
    found = []
    for _ in range(times):
        t0 = time.perf_counter()
        with datalake.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT 1").fetchone()
        found.append((time.perf_counter() - t0) * 1000)
    return float(np.percentile(found, 50))


def recall(hits: Sequence[Sequence[Hit]], truth: Sequence[Sequence[Hit]]) -> Optional[float]:
    """Mean share of the exact top-k found, over queries whose exact result is not empty."""
    shares = [
        len({h.review_id for h in got} & {h.review_id for h in want}) / len(want)
        for got, want in zip(hits, truth)
        if want
    ]
    return float(np.mean(shares)) if shares else None


class _ExplainingConnection:
    """A connection that EXPLAIN ANALYZEs search's statement before running it (plans
    only; never in the timed rounds)."""

    def __init__(self, conn: psycopg.Connection, plans: list[str]):
        self._conn = conn
        self._plans = plans

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    def __enter__(self) -> "_ExplainingConnection":
        self._conn.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._conn.__exit__(*exc)

    def execute(self, statement: Any, params: Any = None, **kwargs: Any) -> Any:
        if isinstance(statement, sql.Composable) and statement.as_string(self._conn).startswith(
            "SELECT e.review_id"
        ):
            explain = sql.SQL("EXPLAIN (ANALYZE, BUFFERS) ") + statement
            rows = self._conn.execute(explain, params).fetchall()
            setting = self._conn.execute("SHOW hnsw.ef_search").fetchone()[0]
            index = self._conn.execute("SHOW enable_indexscan").fetchone()[0]
            plan = "\n".join(r[0] for r in rows)
            self._plans.append(
                f"-- hnsw.ef_search={setting} enable_indexscan={index}\n"
                + re.sub(r"'\[[^\]]*\]'::vector", "'[query vector]'::vector", plan)
            )
        return self._conn.execute(statement, params, **kwargs)


def capture_plans(
    dsn: str, cfgs: Sequence[Config], text: str, vector: Sequence[float]
) -> dict[Config, list[str]]:
    """The plans (EXPLAIN ANALYZE) of each statement search() runs for one query."""
    connect = datalake.connect
    found: dict[Config, list[str]] = {}
    for config in cfgs:
        plans: list[str] = []

        def explaining(*a: Any, _plans: list[str] = plans, **kw: Any) -> _ExplainingConnection:
            return _ExplainingConnection(connect(*a, **kw), _plans)

        with mock.patch.object(datalake, "connect", explaining):
            run_search(dsn, config, text, vector)
        found[config] = plans
    return found


def uses_hnsw(plan: str) -> bool:
    return INDEX in plan


def plan_ms(plan: str) -> str:
    for line in plan.splitlines():
        if line.startswith("Execution Time:"):
            return line.split(":", 1)[1].strip().replace(" ms", "")
    return "?"


# --- one size ------------------------------------------------------------------------


@dataclasses.dataclass
class SizeResult:
    """Everything measured at one size."""

    rows: int
    load_s: float
    vacuum_s: float
    build: Build
    sizes: dict[str, int]
    product: str
    product_reviews: int
    anger_share: float
    connect_ms: float
    results: dict[Config, Measured]
    rounds: int
    plans: dict[Config, list[str]]
    load_before: str
    load_after: str
    top1: list[float]


def filter_facts(dsn: str, product: str) -> tuple[int, float]:
    """Reviews of the product, and the share of reviews felt as anger with rating <= 2."""
    with datalake.connect(dsn, autocommit=True) as conn:
        count = conn.execute(
            "SELECT count(*) FROM reviews WHERE asin = %s OR parent_asin = %s", (product, product)
        ).fetchone()[0]
        share = conn.execute(
            "SELECT avg((m.label = 'anger' AND r.rating <= 2)::int) FROM reviews r"
            " JOIN review_emotions m USING (review_id) WHERE m.model = %s",
            (DEFAULT_MODEL,),
        ).fetchone()[0]
    return count, float(share)


def measure_size(
    dsn: str, rows: int, load_s: float, vectors: Sequence[Sequence[float]], args
) -> SizeResult:
    """Vacuum, build the index, then time the queries at this size."""
    load_before = load_average()
    print(f"[{rows:,}] VACUUM ANALYZE ...", flush=True)
    vacuum_s = vacuum_analyze(dsn)
    print(f"[{rows:,}] building the HNSW index (limit {args.build_limit_min} min) ...")
    build = build_index(dsn, rows, args.build_limit_min * 60)
    print(
        f"[{rows:,}] index: "
        + (f"{build.seconds:.0f} s" if build.seconds else f"stopped at {build.elapsed:.0f} s")
        + (f"; notices: {build.notices}" if build.notices else ""),
        flush=True,
    )
    if build.seconds:
        with datalake.connect(dsn, autocommit=True) as conn:
            conn.execute("ANALYZE review_embeddings")
    product = asin(args.product_index)
    product_reviews, anger_share = filter_facts(dsn, product)
    cfgs = configs(product, with_index=build.seconds is not None)
    connect_ms = connect_overhead_ms(dsn)
    print(f"[{rows:,}] timing {len(cfgs)} configurations x {len(QUERIES)} queries ...")
    results, rounds = measure(dsn, cfgs, vectors, args.queries_repeat, args.query_budget_min * 60)
    plans = capture_plans(dsn, cfgs, QUERIES[0], vectors[0])
    exact = next(c for c in cfgs if c.mode == "exact" and not c.filters)
    top1 = [hits[0].similarity for hits in results[exact].hits if hits]
    return SizeResult(
        rows,
        load_s,
        vacuum_s,
        build,
        relation_sizes(dsn),
        product,
        product_reviews,
        anger_share,
        connect_ms,
        results,
        rounds,
        plans,
        load_before,
        load_average(),
        top1,
    )


# --- the report ----------------------------------------------------------------------


def _pct(values: Sequence[float], q: float) -> str:
    return f"{np.percentile(values, q):,.1f}" if values else "-"


def _mb(n: int) -> str:
    return f"{n / 2**20:,.0f} MB"


def size_table(result: SizeResult) -> list[str]:
    """The latency / recall table of one size."""
    lines = [
        "| mode | filter | p50 ms | p95 ms | n | mean hits | short (< k) | exact fallbacks |"
        " recall@10 vs exact | HNSW in plan |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for config, measured in result.results.items():
        same_filter = {
            c.mode: m.hits for c, m in result.results.items() if c.filter == config.filter
        }
        hits = measured.hits
        mean_hits = np.mean([len(h) for h in hits])
        short = sum(len(h) < K for h in hits)
        fallbacks = (
            f"{sum(len(h) < K for h in same_filter['hnsw'])}/{len(hits)}"
            if config.mode == "default"
            else "-"
        )
        got = recall(hits, same_filter["exact"]) if config.mode != "exact" else None
        plans = result.plans.get(config, [])
        in_plan = " then ".join(
            ("yes" if uses_hnsw(p) else "no") + f" ({plan_ms(p)} ms)" for p in plans
        )
        lines.append(
            f"| {config.mode} | {config.filter} | {_pct(measured.latencies, 50)}"
            f" | {_pct(measured.latencies, 95)} | {len(measured.latencies)}"
            f" | {mean_hits:.1f} | {short}/{len(hits)} | {fallbacks}"
            f" | {'-' if got is None else f'{got:.3f}'} | {in_plan} |"
        )
    return lines


def render(results: Sequence[SizeResult], args, facts: dict, cpu: dict, loads: tuple) -> str:
    """The markdown section."""
    command = " ".join(
        [f"TERMIDATOR_HOME={os.environ['TERMIDATOR_HOME']}"]
        if "TERMIDATOR_HOME" in os.environ
        else []
    )
    command = (command + " " if command else "") + ".venv/bin/python " + shlex.join(sys.argv)
    out = [
        f"## Search latency: {', '.join(f'{r.rows:,}' for r in results)} stored embeddings"
        f" ({datetime.date.today().isoformat()})",
        "",
        f"    {command}",
        "",
        f"- Machine: {cpu['model']}, {cpu['cpus']} CPUs; AVX-512/AMX flags: {cpu['flags']}.",
        f"- Postgres {facts['server_version']} (embedded pgserver), pgvector"
        f" {facts['pgvector']}; shared_buffers {facts['shared_buffers']}, work_mem"
        f" {facts['work_mem']}, max_parallel_workers_per_gather"
        f" {facts['max_parallel_workers_per_gather']}.",
        f"- Load average (1/5/15 min) before: {loads[0]}; after: {loads[1]}"
        " (other processes, e.g. model training, share the CPUs).",
        f"- Data: {args.real} distinct generated reviews (samples.generate, 2023) embedded"
        f" once; each stored vector = one of them + N(0, {args.sigma}^2) per dimension,"
        f" L2-normalised; {args.products:,} products; ratings, texts and emotions of the"
        f" source review. k = {K}; {len(QUERIES)} queries; search() opens a connection per"
        " call, as the CLI and REST service do.",
        "",
    ]
    for r in results:
        build = (
            f"{r.build.seconds:,.0f} s"
            if r.build.seconds is not None
            else f"**not finished** within {r.build.elapsed / 60:.0f} min ({r.build.progress})"
        )
        per_review = r.sizes["total"] / max(1, r.sizes["rows"])
        out += [
            f"### {r.rows:,} embeddings",
            "",
            f"- Load (COPY, 3 tables): {r.load_s:,.0f} s for the rows added;"
            f" VACUUM ANALYZE {r.vacuum_s:,.0f} s; HNSW build {build}"
            f" (maintenance_work_mem {r.build.maintenance_work_mem},"
            f" max_parallel_maintenance_workers 1)"
            + (f"; notices: {'; '.join(r.build.notices)}" if r.build.notices else "")
            + ".",
            f"- review_embeddings: heap {_mb(r.sizes['heap'])}, HNSW index {_mb(r.sizes['hnsw'])},"
            f" total with indexes {_mb(r.sizes['total'])} = {per_review:,.0f} bytes/review"
            f" (reviews + review_emotions + products: {_mb(r.sizes['joined'])}).",
            f"- Filters: anger with rating <= 2 matches {r.anger_share:.1%} of reviews;"
            f" {r.product} has {r.product_reviews:,} reviews.",
            f"- Exact top-1 cosine over the queries: p10 {_pct(r.top1, 10)[:5]}, median"
            f" {_pct(r.top1, 50)[:5]}, p90 {_pct(r.top1, 90)[:5]}.",
            f"- A bare connection + SELECT 1 (paid by every search() call): p50"
            f" {r.connect_ms:.1f} ms. Timed rounds: {r.rounds}; load {r.load_before} ->"
            f" {r.load_after}.",
            "",
            *size_table(r),
            "",
        ]
    out += [
        "Columns: *n* timed searches (queries x rounds, after a warm-up round); *mean hits*"
        " and *short* (results with fewer than k) from the warm-up round; *exact fallbacks*:"
        " default-mode searches whose HNSW statement came back short, so an exact statement"
        " ran too (the HNSW mode's short count: the same first statement); *recall@10*:"
        " mean share of the exact scan's top-10 review ids found; *HNSW in plan*: whether"
        " EXPLAIN ANALYZE of the statement(s) search() ran for the first query used"
        f" {INDEX} (execution ms); the default mode runs a second, exact statement when the"
        " first comes back short.",
        "",
    ]
    return "\n".join(out)


def write_plans(workdir: Path, results: Sequence[SizeResult]) -> Path:
    path = workdir / "search_latency_plans.txt"
    with path.open("w") as out:
        for r in results:
            for config, plans in r.plans.items():
                for plan in plans:
                    out.write(f"==== {r.rows:,} rows, {config.name}\n{plan}\n\n")
    return path


# --- main ----------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--queries-repeat", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument(
        "--query-budget-min",
        type=float,
        default=8.0,
        help="stop timed rounds at a size after this many minutes (default 8)",
    )
    parser.add_argument(
        "--build-limit-min",
        type=float,
        default=20.0,
        help="stop an HNSW build after this many minutes (default 20)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the bench database")
    parser.add_argument("--dsn", default=None, help="the server (default: the datalake's)")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=ROOT / "bench" / "out" / "search_latency",
        help="cache and report folder",
    )
    parser.add_argument("--real", type=int, default=2000, help="reviews to embed (default 2000)")
    parser.add_argument("--sigma", type=float, default=0.03, help="noise per dimension")
    parser.add_argument("--products", type=int, default=5000)
    parser.add_argument(
        "--product-index", type=int, default=42, help="the product of the asin filter"
    )
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.sizes != sorted(args.sizes):
        parser.error("--sizes must grow: a larger size adds rows to the smaller")
    return args


@contextlib.contextmanager
def bench_database(server_dsn: str, keep: bool) -> Iterator[str]:
    """A fresh migrated database, dropped on the way out (also on Ctrl-C / SIGTERM)."""
    dsn = datalake.create_database(server_dsn, "search_latency")
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield dsn
    finally:
        signal.signal(signal.SIGTERM, previous)
        if keep:
            print(f"kept the bench database: {dsn}")
        else:
            datalake.drop_database(server_dsn, dsn)
            print("dropped the bench database")


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    cpu = cpu_description()
    load_start = load_average()
    started = time.perf_counter()
    real = real_reviews(args.workdir, args.real, args.seed)
    print(f"{len(real.vectors)} real embeddings; embedding {len(QUERIES)} queries ...")
    vectors = embed_queries(QUERIES)
    server = datalake.resolve_dsn(args.dsn)
    results: list[SizeResult] = []
    with bench_database(server, args.keep) as dsn:
        facts = server_facts(dsn)
        load_products(dsn, args.products)
        drop_index(dsn)  # bulk loads go faster without it; rebuilt and timed per size
        loaded = 0
        for size in args.sizes:
            print(f"[{size:,}] loading rows {loaded:,} to {size:,} ...", flush=True)
            load_s = load_rows(dsn, real, loaded, size, args)
            loaded = size
            results.append(measure_size(dsn, size, load_s, vectors, args))
            print("\n".join(size_table(results[-1])), flush=True)
            if size != args.sizes[-1]:
                drop_index(dsn)
    report = render(results, args, facts, cpu, (load_start, load_average()))
    report += f"\nWhole run: {(time.perf_counter() - started) / 60:.1f} min.\n"
    print("\n" + report)
    (args.workdir / "search_latency.md").write_text(report)
    print(f"plans: {write_plans(args.workdir, results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
