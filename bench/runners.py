"""Runner benchmark: the ``reviews`` pipeline on each local runner, side by side in one run.

For the same generated gzip files (one per seed), each into a fresh database on one server:
  - the default runner (the in-process FnApiRunner);
  - the DirectRunner's multi-processing mode (``--direct_running_mode multi_processing
    --direct_num_workers 2``, run by the same FnApiRunner);
  - the DaskRunner on a two-worker ``distributed.LocalCluster`` (one thread each, loopback)
    started once, as a cluster is, and warmed up before the first timed run;
  - raw text COPY of the cleaned rows into an empty copy of the table (``bench/ingest.py``
    step (d)), the anchor each runner's rate is divided by.
Each run also gives the CPU seconds of the launcher (with its child processes), of the
dask workers and of the database server (psutil on the postgres processes, when the server
runs on this machine), and so the database's share of the CPU the run took, and a
checksum of the rows that every runner must match.

    python bench/runners.py [--files 4] [--reviews 100000] [--repeat 1] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ingest  # noqa: E402 - bench/ingest.py: its steps run here as they run there

ROOT = ingest.ROOT
DASK = "dask"
RUNNERS = {
    "default": (),
    "multi_processing": ("--direct_running_mode", "multi_processing", "--direct_num_workers", "2"),
    DASK: ("--runner", "DaskRunner"),
}
CHECKSUM = "SELECT count(*), md5(string_agg(t::text, E'\\n' ORDER BY review_id)) FROM reviews t"


def generate(folder: Path, files: int, reviews: int) -> list[Path]:
    """``files`` gzip files of ``reviews`` 2018-format reviews each, seeds 1..files (cached)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in range(1, files + 1):
        path = folder / f"reviews_2018_{reviews}_seed{seed}.json.gz"
        if not path.exists():
            subprocess.run(
                [sys.executable, "-m", "pipelines", "generate", "reviews", "--format", "2018",
                 "--count", str(reviews), "--seed", str(seed), "--output", str(path)],
                cwd=ROOT, check=True,
            )  # fmt: skip
        paths.append(path)
    return paths


def cpu_seconds(processes: list[psutil.Process]) -> float:
    """User + system CPU of the processes, their live descendants and their reaped children."""
    seen, total = set(), 0.0
    for process in processes:
        try:
            family = [process, *process.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for member in family:
            if member.pid in seen:
                continue
            seen.add(member.pid)
            try:
                times = member.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system + times.children_user + times.children_system
    return total


def database_processes(dsn: str) -> list[psutil.Process]:
    """The server's postmaster, if it runs on this machine (its backends are its children)."""
    import psycopg

    with psycopg.connect(dsn) as conn:  # the backend lives as long as its connection
        host = conn.info.host
        if not (host.startswith("/") or host in ("localhost", "127.0.0.1", "::1")):
            return []
        backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        try:
            postmaster = psutil.Process(backend).parent()
        except psutil.Error:
            return []
    return [postmaster] if postmaster and "postgres" in postmaster.name() else []


def children_cpu_seconds() -> float:
    """CPU of this process's reaped children: a finished step and the processes it reaped."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measured(work: Callable[[], dict], database: list, workers: list) -> dict:
    """Run one step (a child process); add the CPU seconds of the launcher, the dask
    workers and the database it took, and the load average before it."""
    load = os.getloadavg()[0]
    before = (children_cpu_seconds(), cpu_seconds(workers), cpu_seconds(database))
    result = work()
    after = (children_cpu_seconds(), cpu_seconds(workers), cpu_seconds(database))
    launcher, dask_workers, db = (a - b for a, b in zip(after, before))
    db = db if database else None  # a server elsewhere: not measured
    return dict(result, launcher_cpu=launcher, workers_cpu=dask_workers, db_cpu=db, load=load)


def one_round(server: str, glob: str, order: list[str], scheduler: str, cpu: dict) -> dict:
    """Each runner once, in ``order``, each into a fresh database; the raw COPY anchor in
    the default runner's database; every runner's checksum of the rows."""
    import psycopg

    from connectors.datalake import create_database, drop_database

    out = {}
    for name in order:
        dsn = create_database(server, "bench")
        try:
            extra = list(RUNNERS[name])
            if name == DASK:
                extra += ["--dask_client_address", scheduler]
            step = ("pipeline", dsn, glob, "reviews", extra + ["--quiet"])
            watched = cpu if name == DASK else dict(cpu, workers=[])  # idle otherwise
            out[name] = measured(lambda: ingest.run_step(*step), **watched)
            with psycopg.connect(dsn, autocommit=True) as conn:
                out[name]["checksum"] = tuple(conn.execute(CHECKSUM).fetchone())
                if name == "default":
                    conn.execute("CREATE TABLE copy_reviews (LIKE reviews INCLUDING ALL)")
            if name == "default":
                copy = ("copy", dsn, "reviews", "copy_reviews")
                out["copy"] = measured(lambda: ingest.run_step(*copy), **dict(cpu, workers=[]))
        finally:
            drop_database(server, dsn)
    for step in out.values():
        step["rate"] = step["rows"] / step["seconds"]
    return out


def start_cluster() -> "distributed.LocalCluster":  # noqa: F821 - imported when used
    """A two-worker, single-thread LocalCluster on loopback, its workers' modules imported."""
    import distributed

    cluster = distributed.LocalCluster(
        processes=True,
        n_workers=2,
        threads_per_worker=1,
        host="127.0.0.1",
        dashboard_address=None,
    )
    with distributed.Client(cluster) as client:
        client.run(importlib.import_module, "pipelines.reviews")
    return cluster


def warm_up(server: str, path: Path, scheduler: str) -> None:
    """One untimed dask run of a small file: the workers load the pipeline's code (as a
    running cluster has) before the timed runs."""
    from connectors.datalake import create_database, drop_database

    dsn = create_database(server, "bench")
    try:
        argv = [*RUNNERS[DASK], "--dask_client_address", scheduler, "--quiet"]
        ingest.run_step("pipeline", dsn, str(path), "reviews", argv)
    finally:
        drop_database(server, dsn)


def median(rounds: list[dict]) -> dict:
    """Per step, the round with the median rate (all rates kept)."""
    out = {}
    for key in rounds[0]:
        ranked = sorted(rounds, key=lambda r: r[key]["rate"])
        out[key] = dict(ranked[len(ranked) // 2][key], rates=[r[key]["rate"] for r in rounds])
    return out


def cpu_model() -> str:
    """The CPU's model name, as lscpu shows it."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def report(result: dict, args: argparse.Namespace, command: str, load: tuple) -> str:
    """The markdown table of one benchmark, with its command, machine and load."""
    copy = result["copy"]
    names = {
        "default": "default (FnApiRunner, in-process)",
        "multi_processing": "DirectRunner multi_processing, 2 workers",
        DASK: "DaskRunner, LocalCluster 2 workers x 1 thread",
    }
    lines = [
        f"### reviews x {args.files} files x {args.reviews:,} (2018 format), runners side by side,"
        f" {args.repeat} round(s), median",
        "",
        f"`{command}` — {datetime.date.today()}, {platform.node() or 'host'},"
        f" {os.cpu_count()} cores ({cpu_model()}); load average at start"
        f" {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}",
        "",
        "| runner | ran as | records/s | seconds | ratio to raw COPY | CPU s: launcher"
        " / dask workers / database | database share of the CPU | load before |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, title in names.items():
        step = result[key]
        db, share = "n/a", "n/a (server not on this machine)"
        if step["db_cpu"] is not None:
            total = step["launcher_cpu"] + step["workers_cpu"] + step["db_cpu"]
            db, share = f"{step['db_cpu']:.1f}", f"{step['db_cpu'] / total:.0%}"
        workers = f"{step['workers_cpu']:.1f}" if key == DASK else "-"
        lines.append(
            f"| {title} | {step['runner']} | {step['rate']:,.0f} | {step['seconds']:.1f} |"
            f" {step['rate'] / copy['rate']:.2f} | {step['launcher_cpu']:.1f} / {workers} /"
            f" {db} | {share} | {step['load']:.2f} |"
        )
    copy_db = "n/a" if copy["db_cpu"] is None else f"{copy['db_cpu']:.1f}"
    lines.append(
        f"| raw text COPY of the cleaned rows | psycopg COPY | {copy['rate']:,.0f} |"
        f" {copy['seconds']:.1f} | 1.00 | - / - / {copy_db} | - | {copy['load']:.2f} |"
    )
    sums = {result[key]["checksum"] for key in names}
    rows = result["default"]
    lines += [
        "",
        f"Every runner wrote the same rows: {'yes' if len(sums) == 1 else 'NO: ' + str(sums)}"
        f" ({rows['checksum'][0]:,} rows, md5 {rows['checksum'][1]}) from {rows['rows']:,}"
        f" records ({rows['upserted']:,} upserted, {rows['dead_letters']:,} dead letters)."
        " Records/s: records read over the run's own time; CPU over each run's whole process"
        " (its imports included). Rates per round: "
        + "; ".join(f"{k} " + ", ".join(f"{r:,.0f}" for r in result[k]["rates"]) for k in result),
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    """Generate the inputs, start the server and the cluster, run the rounds, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=4, help="input files, one seed each")
    parser.add_argument("--reviews", type=int, default=100_000, help="reviews per file")
    parser.add_argument("--repeat", type=int, default=1, help="rounds; the median is reported")
    parser.add_argument("--dsn", help="server to use (default: a fresh embedded one)")
    parser.add_argument("--data", default=str(ROOT / "bench" / "out"), help="input cache dir")
    parser.add_argument("--markdown", help="append the result table to this file")
    args = parser.parse_args()
    load = os.getloadavg()
    paths = generate(Path(args.data), args.files, args.reviews)
    glob = str(paths[0].parent / f"reviews_2018_{args.reviews}_seed*.json.gz")

    home: Optional[Path] = None
    server = args.dsn
    if not server:
        home = Path(tempfile.mkdtemp(prefix="termidator-bench-"))
        os.environ["TERMIDATOR_HOME"] = str(home)
        from connectors import datalake

        server = datalake.embedded_dsn(home)
    cluster = start_cluster()
    try:
        cpu = {
            "database": database_processes(server),
            "workers": [psutil.Process(p.pid) for p in cluster.workers.values() if p.pid],
        }
        pids = ", ".join(f"{k} {[p.pid for p in v]}" for k, v in cpu.items())
        print(f"measuring the CPU of processes: {pids}", file=sys.stderr)
        warm_up(server, generate(Path(args.data), 1, 1000)[0], cluster.scheduler_address)
        rounds = []
        for number in range(args.repeat):
            order = list(RUNNERS)[number % 3 :] + list(RUNNERS)[: number % 3]
            rounds.append(one_round(server, glob, order, cluster.scheduler_address, cpu))
            print(
                f"round {number + 1}: "
                + ", ".join(f"{k} {step['rate']:,.0f} rows/s" for k, step in rounds[-1].items()),
                file=sys.stderr,
            )
    finally:
        cluster.close()
        if home:
            from connectors import datalake

            datalake.stop_embedded(home)
            shutil.rmtree(home, ignore_errors=True)
    from connectors.datalake import redact

    shown = [redact(arg) if arg == args.dsn else arg for arg in sys.argv[1:]]
    command = " ".join(["python bench/runners.py", *shown])  # no password in a results file
    text = report(median(rounds), args, command, load)
    print(text)
    if args.markdown:
        with open(args.markdown, "a") as out:
            out.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
