"""The DaskRunner (pipelines/dask_runner.py) on a real two-worker dask.distributed cluster.

Every pipeline runs on the FnApiRunner and on the DaskRunner and must give the same
results: the runner-level tests compare what each bundle wrote, the project's pipelines
compare the datalake (rows and dead letters) and the run summary. The dask runs must use
both workers.
"""

from __future__ import annotations

import collections
import gzip
import pickle
import time
import uuid
from pathlib import Path

import apache_beam as beam
import distributed
import pytest
from apache_beam import pvalue
from apache_beam.io import iobase
from apache_beam.io.range_trackers import OffsetRangeTracker
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.runner import PipelineState
from apache_beam.transforms import window
from apache_beam.utils.windowed_value import WindowedValue

from conftest import query
from connectors import datalake
from pipelines import emotions, options, products, reviews
from pipelines.dask_runner import RUNNER
from samples import sample_files


@pytest.fixture(scope="module")
def cluster():
    """One two-worker cluster for the module, on loopback; a client to inspect it."""
    with distributed.LocalCluster(
        processes=True,
        n_workers=2,
        threads_per_worker=1,
        host="127.0.0.1",
        dashboard_address=None,
    ) as local:
        with distributed.Client(local) as client:
            yield client


def address(client) -> str:
    return client.scheduler.address


def worker() -> str | None:
    try:
        return distributed.get_worker().address
    except ValueError:  # not on a dask worker: the FnApiRunner
        return None


class Collect(beam.DoFn):
    """Test sink: each bundle's elements, and the worker that ran it, in a file of its own."""

    def __init__(self, folder: str, name: str, delay_s: float = 0.0):
        self.folder, self.name, self.delay_s = folder, name, delay_s

    def start_bundle(self):
        self.elements = []

    def process(self, element):
        time.sleep(self.delay_s)  # slow bundles make the scheduler use both workers
        self.elements.append(element)

    def finish_bundle(self):
        path = Path(self.folder) / f"{self.name}-{uuid.uuid4().hex}.pkl"
        path.write_bytes(pickle.dumps((worker(), self.elements)))


def collect(pcoll, folder: str, name: str, delay_s: float = 0.0) -> None:
    pcoll | f"Collect{name}" >> beam.ParDo(Collect(folder, name, delay_s))


def bundles(folder: Path, name: str) -> list[tuple[str | None, list]]:
    return [pickle.loads(p.read_bytes()) for p in folder.glob(f"{name}-*.pkl")]


def ordered(elements) -> list:
    return sorted(elements, key=repr)


def results(folder: Path) -> dict[str, list]:
    names = {p.name.rsplit("-", 1)[0] for p in folder.glob("*.pkl")}
    return {
        name: ordered(e for _, elements in bundles(folder, name) for e in elements)
        for name in sorted(names)
    }


def run(build, folder: Path, args: list[str]):
    folder.mkdir()
    pipeline = beam.Pipeline(options=PipelineOptions(args))
    build(pipeline, str(folder))
    result = pipeline.run()
    assert result.wait_until_finish() == PipelineState.DONE
    return result


def run_both(build, tmp_path: Path, client):
    """Run on the FnApiRunner and the DaskRunner and assert equal results; returns the
    dask run's folder, the dask result and the FnApiRunner's result."""
    fnapi_result = run(build, tmp_path / "fnapi", ["--runner", "FnApiRunner"])
    dask_result = run(
        build, tmp_path / "dask", ["--runner", RUNNER, "--dask_client_address", address(client)]
    )
    expected = results(tmp_path / "fnapi")
    assert expected, "the pipeline wrote nothing"
    assert results(tmp_path / "dask") == expected
    return tmp_path / "dask", dask_result, fnapi_result


def workers(folder: Path, name: str) -> set:
    return {address for address, _ in bundles(folder, name)}


def metric_values(result) -> dict:
    found = result.metrics().query(MetricsFilter().with_namespace("test"))
    counters = collections.Counter()
    for counter in found["counters"]:  # summed over steps
        counters[counter.key.metric.name] += counter.committed
    distributions = {
        d.key.metric.name: (d.committed.count, d.committed.sum, d.committed.min, d.committed.max)
        for d in found["distributions"]
    }
    return {**dict(counters), **distributions}


# --- the runner, on small graphs --------------------------------------------------------

DEAD = "dead_letters"


class Route(beam.DoFn):
    def __init__(self):
        self.routed = Metrics.counter("test", "routed")

    def process(self, x):
        self.routed.inc()
        if x % 3 == 0:
            yield pvalue.TaggedOutput(DEAD, f"dead {x}")
        else:
            yield x


def test_tagged_outputs_reach_only_their_consumers_and_flatten_merges_them(cluster, tmp_path):
    def build(p, out):
        records, dead = (
            p | beam.Create(range(20)) | beam.ParDo(Route()).with_outputs(DEAD, main="records")
        )
        collect(records | beam.Map(lambda x: x * 10), out, "records")
        collect(dead, out, "dead")
        collect((records, dead) | beam.Flatten(), out, "flat")

    folder, dask, _ = run_both(build, tmp_path, cluster)
    assert metric_values(dask) == {"routed": 20}  # each element once, whatever reads it
    found = results(folder)
    assert found["records"] == ordered(x * 10 for x in range(20) if x % 3)
    assert found["dead"] == ordered(f"dead {x}" for x in range(0, 20, 3))
    assert len(found["flat"]) == 20
    assert len(workers(folder, "records")) == 2


class EmitInFinishBundle(beam.DoFn):
    """Buffers elements; emits them (main) and the odd ones (tag "odd") in finish_bundle."""

    def start_bundle(self):
        self.buffer = []

    def process(self, x):
        self.buffer.append(x)

    def finish_bundle(self):
        for x in self.buffer:
            yield WindowedValue(x, 0, [window.GlobalWindow()])
            if x % 2:
                yield pvalue.TaggedOutput("odd", WindowedValue(x, 0, [window.GlobalWindow()]))


def test_finish_bundle_outputs_are_kept(cluster, tmp_path):
    def build(p, out):
        result = p | beam.Create(range(12)) | beam.ParDo(EmitInFinishBundle()).with_outputs("odd")
        collect(result[None], out, "all")
        collect(result.odd, out, "odd")

    folder, *_ = run_both(build, tmp_path, cluster)
    assert results(folder) == {"all": ordered(range(12)), "odd": ordered(range(1, 12, 2))}


class ChunkedRangeSource(iobase.BoundedSource):
    """0..n-1, split into chunks of ``chunk`` whatever size the runner asks for."""

    def __init__(self, n: int, chunk: int):
        self.n, self.chunk = n, chunk

    def estimate_size(self):
        return self.n

    def get_range_tracker(self, start, stop):
        return OffsetRangeTracker(start or 0, self.n if stop is None else stop)

    def read(self, tracker):
        for i in range(tracker.start_position(), tracker.stop_position()):
            if not tracker.try_claim(i):
                return
            yield i

    def split(self, desired_bundle_size, start=None, stop=None):
        for begin in range(start or 0, self.n if stop is None else stop, self.chunk):
            yield iobase.SourceBundle(self.chunk, self, begin, min(begin + self.chunk, self.n))


def test_read_and_impulse(cluster, tmp_path):
    def build(p, out):
        collect(p | beam.io.Read(ChunkedRangeSource(40, 10)), out, "read", delay_s=0.02)
        collect(p | beam.Impulse() | beam.FlatMap(lambda _: ["a", "b"]), out, "impulse")

    folder, *_ = run_both(build, tmp_path, cluster)
    assert results(folder)["read"] == ordered(range(40))
    assert len(bundles(folder, "read")) == 4  # a partition per source bundle
    assert len(workers(folder, "read")) == 2


EVENTS = [(f"k{i % 3}", i, i * 25) for i in range(24)]  # (key, value, event time s)


def with_window(kv, w=beam.DoFn.WindowParam):
    key, values = kv
    return key, sorted(values) if isinstance(values, list) else values, int(w.start)


def test_group_by_key_with_windows_and_combiners(cluster, tmp_path):
    def build(p, out):
        events = p | beam.Create(EVENTS)
        windowed = (
            events
            | beam.Map(lambda e: window.TimestampedValue((e[0], e[1]), e[2]))
            | beam.WindowInto(window.FixedWindows(60))
        )
        grouped = windowed | beam.GroupByKey() | "GroupWindow" >> beam.Map(with_window)
        collect(grouped, out, "gbk")
        summed = (
            windowed
            | "SumPerWindow" >> beam.CombinePerKey(sum)
            | "SumWindow" >> beam.Map(with_window)
        )
        collect(summed, out, "windowed")
        pairs = events | beam.Map(lambda e: (e[0], e[1]))
        collect(pairs | beam.CombinePerKey(sum), out, "per_key")
        collect(pairs | beam.Values() | beam.CombineGlobally(sum), out, "global")
        collect(pairs | beam.combiners.Count.PerKey(), out, "count")

    folder, *_ = run_both(build, tmp_path, cluster)
    found = results(folder)
    groups = {(key, t // 60 * 60) for key, _, t in EVENTS}
    assert sorted((k, w) for k, _, w in found["gbk"]) == sorted(groups)
    assert found["global"] == [sum(range(24))]


def test_side_inputs(cluster, tmp_path):
    def build(p, out):
        side = p | "Side" >> beam.Create([("a", 1), ("b", 2)])
        total = p | "Total" >> beam.Create([100])
        collect(
            p
            | beam.Create(range(10))
            | beam.Map(
                lambda x, lst, dct, one, it: (
                    x,
                    len(lst),
                    dct["b"],
                    one + x,
                    sum(v for _, v in it),
                ),
                pvalue.AsList(side),
                pvalue.AsDict(side),
                pvalue.AsSingleton(total),
                pvalue.AsIter(side),
            ),
            out,
            "joined",
        )

    folder, *_ = run_both(build, tmp_path, cluster)
    assert results(folder)["joined"][0] == (0, 2, 2, 100, 3)


def test_each_file_is_its_own_partition_and_reshuffle_spreads_one(cluster, tmp_path):
    files = [f"file{i}.json.gz" for i in range(4)]

    def build(p, out):
        collect(p | "Files" >> beam.Create(files), out, "files", delay_s=0.3)
        spread = (
            p
            | "One" >> beam.Create(["one file"])
            | beam.FlatMap(lambda _: range(40))
            | beam.Reshuffle()
        )
        collect(spread, out, "spread", delay_s=0.02)

    folder, *_ = run_both(build, tmp_path, cluster)
    assert sorted(len(elements) for _, elements in bundles(folder, "files")) == [1, 1, 1, 1]
    assert len(workers(folder, "files")) == 2
    assert len(workers(folder, "spread")) == 2


class Counting(beam.DoFn):
    def __init__(self):
        self.seen = Metrics.counter("test", "seen")
        self.finished = Metrics.counter("test", "finished")
        self.sizes = Metrics.distribution("test", "size")

    def start_bundle(self):
        self.in_bundle = 0

    def process(self, x):
        self.seen.inc()
        self.sizes.update(x)
        self.in_bundle += 1
        yield x

    def finish_bundle(self):
        self.finished.inc(self.in_bundle)  # counted in finish_bundle, like the project does


def test_metrics_come_back_from_the_workers(cluster, tmp_path):
    def build(p, out):
        collect(p | beam.Create(range(1, 31)) | beam.ParDo(Counting()), out, "counted")

    folder, dask, fnapi = run_both(build, tmp_path, cluster)
    expected = {"seen": 30, "finished": 30, "size": (30, sum(range(1, 31)), 1, 30)}
    assert metric_values(dask) == metric_values(fnapi) == expected
    assert len(workers(folder, "counted")) == 2


class Step(beam.DoFn):
    def __init__(self):
        self.seen = Metrics.counter("test", "seen")

    def process(self, x):
        self.seen.inc()
        yield x


def test_metrics_of_more_bundles_than_dask_keeps_events(cluster):
    """128 bundles x 9 steps with metrics: more than the 1,000 events a dask topic keeps."""
    p = beam.Pipeline(
        options=PipelineOptions(["--runner", RUNNER, "--dask_client_address", address(cluster)])
    )
    pcoll = p | beam.Create(range(256))
    for step in range(9):
        pcoll = pcoll | f"Step{step}" >> beam.ParDo(Step())
    result = p.run()
    assert result.wait_until_finish() == PipelineState.DONE
    assert metric_values(result) == {"seen": 256 * 9}


class Lifecycle(beam.DoFn):
    """Marks setup and teardown in files; holds an unpicklable resource made in setup."""

    def __init__(self, folder: str, fail_on=None):
        self.folder, self.fail_on = folder, fail_on

    def setup(self):
        import threading

        self.lock = threading.Lock()  # cannot be pickled: must be made on the worker
        self.id = uuid.uuid4().hex
        (Path(self.folder) / f"setup-{self.id}").touch()

    def process(self, x):
        with self.lock:
            if x == self.fail_on:
                raise ValueError(f"refused {x}")
            yield x

    def teardown(self):
        (Path(self.folder) / f"teardown-{self.id}").touch()


def test_setup_and_teardown_pair_up_even_when_a_bundle_fails(cluster, tmp_path):
    def build(p, out):
        collect(p | beam.Create(range(6)) | beam.ParDo(Lifecycle(out)), out, "ok")

    folder, *_ = run_both(build, tmp_path, cluster)
    setups = {p.name.split("-")[1] for p in folder.glob("setup-*")}
    assert setups and setups == {p.name.split("-")[1] for p in folder.glob("teardown-*")}

    failing = tmp_path / "failing"
    failing.mkdir()
    p = beam.Pipeline(
        options=PipelineOptions(["--runner", RUNNER, "--dask_client_address", address(cluster)])
    )
    p | beam.Create(range(6)) | beam.ParDo(Lifecycle(str(failing), fail_on=4))
    result = p.run()
    with pytest.raises(ValueError, match="refused 4"):
        result.wait_until_finish()
    assert result.state == PipelineState.FAILED
    failed_setup = {p.name.split("-")[1] for p in failing.glob("setup-*")}
    assert failed_setup <= {p.name.split("-")[1] for p in failing.glob("teardown-*")}


def test_the_short_name_maps_to_this_runner_and_brings_its_options():
    for argv in (["--runner", "DaskRunner"], ["--runner=DaskRunner"]):
        parsed = options.parse(argv + ["--dask_client_address", "127.0.0.1:8786"])
        assert parsed.get_all_options()["runner"] == RUNNER
        assert parsed.get_all_options()["address"] == "127.0.0.1:8786"
    assert options.parse(["--runner", "FnApiRunner"]).get_all_options()["runner"] == "FnApiRunner"


# --- the project's pipelines: the same datalake on both runners ----------------------------

SNAPSHOTS = {
    "reviews": "SELECT count(*), md5(string_agg(t::text, E'\\n' ORDER BY review_id)) FROM reviews t",
    "products": "SELECT count(*), md5(string_agg(t::text, E'\\n' ORDER BY asin)) FROM products t",
    "review_emotions": "SELECT count(*), md5(string_agg(concat_ws('|', review_id, model, label,"
    " round(score::numeric, 3)), E'\\n' ORDER BY review_id, model)) FROM review_emotions",
    "review_embeddings": "SELECT count(*), md5(string_agg(review_id || model, E'\\n'"
    " ORDER BY review_id)) FROM review_embeddings",
    # without id, run_id and at: the same letters, whichever run wrote them
    "dead_letters": "SELECT count(*), md5(string_agg(concat_ws('|', pipeline, stage, source, line,"
    " raw, error), E'\\n' ORDER BY pipeline, stage, source, line, raw, error)) FROM dead_letters",
}


def lake(dsn: str) -> dict:
    return {table: query(dsn, sql)[0] for table, sql in SNAPSHOTS.items()}


def counts(summary) -> tuple:
    """What a run's summary says it did that any runner must repeat exactly. (Not
    ``changed``: which of two records of one key is written first depends on the order.)"""
    return (summary.records, summary.upserted, summary.dead_letters)


def stage_keys(client, label: str) -> dict[str, set]:
    """Per worker, the tasks it has run of stages whose name holds ``label``."""

    def ran(dask_worker) -> set:
        return {
            str(key)
            for key, start, finish, *_ in dask_worker.state.log
            if finish == "memory" and label in str(key)
        }

    return client.run(ran)


RUNNERS = ("FnApiRunner", "DaskRunner")  # the default runner, and this one


@pytest.fixture
def both(server_dsn):
    """A fresh datalake per runner: {"FnApiRunner": dsn, "DaskRunner": dsn}."""
    dsns = {runner: datalake.create_database(server_dsn, "dask") for runner in RUNNERS}
    yield dsns
    for dsn in dsns.values():
        datalake.drop_database(server_dsn, dsn)


def run_on_both(module, both: dict, client, argv: list[str], label: str) -> dict:
    """Run a pipeline on each runner into its datalake; assert equal datalakes and
    summaries, the runner named, and the stage ``label`` run on both workers."""
    before = stage_keys(client, label)
    flags = {"FnApiRunner": [], "DaskRunner": ["--dask_client_address", address(client)]}
    summaries = {
        runner: module.run(
            ["--dsn", both[runner], "--runner", runner, "--quiet", *flags[runner]] + argv
        )
        for runner in RUNNERS
    }
    after = stage_keys(client, label)
    fnapi, dask = summaries["FnApiRunner"], summaries["DaskRunner"]
    assert dask.state == "DONE"
    assert counts(dask) == counts(fnapi)
    assert dask.counters.get("records_read") == fnapi.counters.get("records_read")
    snapshot = lake(both["DaskRunner"])
    assert snapshot == lake(both["FnApiRunner"])
    assert snapshot[dask.table][0] <= dask.changed <= dask.upserted  # each row written once
    expected = f"DaskRunner (scheduler {address(client)}, 2 workers)"
    assert dask.runner == expected
    runs = query(
        both["DaskRunner"], "SELECT runner FROM pipeline_runs WHERE run_id = %s", [dask.run_id]
    )
    assert runs == [(expected,)]
    assert all(after[w] - before[w] for w in after), f"a worker ran no {label} task"
    return summaries


def bad_files(folder: Path) -> list[str]:
    """A review file with lines that cannot be read, parsed or cleaned, and a cut-off gzip."""
    good = gzip.open(sample_files()["reviews"][-1], "rt").read().splitlines()
    lines = good[:3] + ["{not json", '{"foo": 1}', '{"reviewerID": "x", "asin": "y"}']
    mixed = folder / "mixed.jsonl"
    mixed.write_bytes("\n".join(lines).encode() + b"\n\xff\xfe not utf-8\n")
    cut = folder / "cut.json.gz"
    cut.write_bytes(gzip.compress("\n".join(good[3:40]).encode())[:-200])
    return [str(mixed), str(cut)]


def inputs(files: list[str]) -> list[str]:
    return [arg for path in files for arg in ("--input", path)]


def test_reviews_on_dask_match_the_default_runner(cluster, both, tmp_path):
    files = sample_files()["reviews"] + bad_files(tmp_path)
    summaries = run_on_both(reviews, both, cluster, inputs(files), "ReadLines")
    dask = summaries["DaskRunner"]
    assert dask.records == dask.upserted + dask.dead_letters
    stages = dict(query(both["DaskRunner"], "SELECT stage, count(*) FROM dead_letters GROUP BY 1"))
    assert {"read", "parse", "clean"} <= set(stages), stages


def test_products_on_dask_match_the_default_runner(cluster, both):
    summaries = run_on_both(
        products, both, cluster, inputs(sample_files()["products"]), "ReadLines"
    )
    dask = summaries["DaskRunner"]
    assert dask.upserted > 0 and dask.records == dask.upserted + dask.dead_letters


def test_emotions_on_dask_match_the_default_runner(cluster, both):
    for dsn in both.values():
        reviews.run(
            ["--dsn", dsn, "--runner", "FnApiRunner", "--quiet"] + inputs(sample_files()["reviews"])
        )
    # float32: int8's activation scales are per batch, so its scores move in the third
    # decimal with the batch a review lands in, and the runners batch differently.
    limit = ["--limit", "40", "--dtype", "float32"]
    summaries = run_on_both(emotions, both, cluster, limit, "ReadPages")
    dask = summaries["DaskRunner"]
    skipped = dask.counters.get("emotion_skipped_no_text", 0)
    assert dask.records == 40 == dask.upserted + dask.dead_letters + skipped
