"""Beam's DaskRunner, made to run these pipelines on a dask.distributed cluster.

    python -m pipelines run reviews --input … --runner DaskRunner --dask_client_address HOST:8786

Beam 2.77's runner (``apache_beam/runners/dask/``) translates a pipeline into dask Bags but
loses or misroutes data on anything beyond a linear chain of ParDos. This subclass keeps
Beam's options (``DaskOptions``), its transform overrides (``overrides.py``) and its result
class, and replaces the translation (``dask_runner.py`` ``DaskRunner.run_pipeline`` and the
ops of ``transform_evaluator.py``); each fix names the Beam code it works around and could
be proposed upstream as it is (line numbers: Beam 2.77.0):

1. Tagged outputs. ``dask_runner.py`` ``DaskBagVisitor.visit_transform`` (l. 180-217)
   keys bags by the producing transform, so every consumer of a multi-output ParDo gets
   all of its outputs (``transform_evaluator.py`` ``get_windowed_value``, l. 60-74, strips
   the tag). Here every PCollection has its own bag, selected by tag.
2. Unexecuted branches. ``DaskRunner.run_pipeline`` (l. 245-253) computes only the last
   visited bag: sinks on other branches never run. Computing several bags would not do
   either: dask optimizes each collection apart, fusing a task they share into each, so
   it runs twice. Here every unconsumed PCollection is computed, as one collection.
3. Bundles. ``apply_dofn_to_bundle`` (``transform_evaluator.py`` l. 185-203) takes the
   outputs before ``finish_bundle`` (its outputs are lost), skips ``teardown`` when a
   bundle fails, and appends to a receiver list pickled on the client. Here a non-empty
   partition is a bundle run by Beam's ``DoFnRunner`` (setup, start, process, finish;
   teardown in ``finally``) with receivers made in the task; DoFns go through Beam's
   pickler, as on other runners, and are deserialized once per bundle.
4. Fusion. Beam's runner materializes every ParDo's output as a partition; a consumer of a
   small tagged output (dead letters) then depends on the whole main output, and dask's
   work stealing moves that task, and so the whole partition, to an idle worker (measured:
   3x the CPU). Here a chain of ParDos where each main output has a single ParDo reader
   runs in one task, elements flowing from DoFn to DoFn as in Beam's other runners; only
   outputs read elsewhere become partitions.
5. Windows. ParDo outputs are unwrapped to bare values (l. 198), ``GroupByKey``
   (l. 250-260) groups bare keys across windows, and ``TRANSLATIONS`` is looked up by exact
   class (``dask_runner.py`` l. 181), so ParDo subclasses (``WindowInto``,
   ``overrides._GroupAlsoByWindow``) are silent no-ops. Here WindowedValues flow through,
   translations are found along the MRO, and GroupByKey groups by the coder-encoded key (as
   the DirectRunner does) before Beam's GroupAlsoByWindow DoFn splits the windows.
6. Sources. ``overrides._Read`` (l. 51-56) and ``Impulse`` have no translation, so a
   ``beam.io.Read`` feeds ``None`` downstream, and ``_Read`` has no ``get_windowing``.
   Here the source is split on the client and each of its bundles is read in a partition.
7. Side inputs. ``DaskBagWindowedIterator`` (l. 85-96) recomputes the side input's graph
   inside every bundle. Here it is computed once, as a dependency of the bundles.
8. Parallelism. ``Create`` packs 128 elements per partition (l. 169-182) and
   ``overrides._Reshuffle`` (l. 44-48) has no translation: a list of up to 128 files is one
   task on one worker. Here, unless ``--dask_npartitions``/``--dask_partition_size`` say
   otherwise, each Create element is a partition (at most max(128, worker threads)), and
   Reshuffle splits a bag with fewer partitions than worker threads.
9. Metrics. ``DaskRunnerResult.metrics`` (``dask_runner.py`` l. 161-163) raises. Here each
   step of a bundle has a ``MetricsContainer``; its updates travel with the bundle's
   results to the client, which commits them as ``DirectMetrics`` once the run is done. (Not
   dask events: the scheduler keeps the last 1,000 per topic, so a run of more bundles
   silently lost counts.) A bundle dask recomputes after losing a worker counts once.
10. The client is closed when the pipeline has finished (Beam leaves it open), and so is
    the LocalCluster it starts without ``--dask_client_address``, which here listens on
    127.0.0.1 only and logs warnings only.

The short name ``DaskRunner`` is refused by ``runners/runner.py`` ``create_runner``: it is
not in ``StandardOptions.ALL_KNOWN_RUNNERS`` (``options/pipeline_options.py`` l. 728-742),
a one-line fix upstream. Until then ``pipelines.options.parse`` maps it to ``RUNNER``.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import logging
from typing import Any, NamedTuple, Optional

import dask.bag as db
import distributed
from apache_beam import ParDo, coders
from apache_beam.internal import pickler
from apache_beam.io import iobase
from apache_beam.metrics.execution import MetricsContainer
from apache_beam.pipeline import AppliedPTransform, PipelineVisitor, PTransformOverride
from apache_beam.pvalue import PCollection
from apache_beam.runners.common import DoFnRunner, Receiver
from apache_beam.runners.dask import dask_runner, overrides
from apache_beam.runners.direct.direct_metrics import DirectMetrics
from apache_beam.runners.runner import PipelineState
from apache_beam.runners.worker import statesampler
from apache_beam.transforms.core import Impulse, Windowing
from apache_beam.transforms.sideinputs import SideInputMap
from apache_beam.transforms.window import GlobalWindows
from apache_beam.typehints.trivial_inference import key_value_types
from apache_beam.utils.counters import CounterFactory

# Beam's default Create partition size, here the default cap on Create partitions.
MAX_CREATE_PARTITIONS = 128
# The stage output that carries a bundle's metric updates to the client.
_METRICS = -1


@dataclasses.dataclass
class DaskRunnerResult(dask_runner.DaskRunnerResult):
    """Beam's result, with the workers' metrics, and the client closed at the end."""

    cluster: str = ""  # e.g. "scheduler tcp://127.0.0.1:8786, 2 workers"
    _metrics: DirectMetrics = dataclasses.field(default_factory=DirectMetrics, init=False)

    def wait_until_finish(self, duration=None) -> str:
        """Wait for the run (``duration`` in ms); commit its metrics, close the client."""
        if PipelineState.is_terminal(self._state):
            return self._state
        (future,) = self.futures
        try:
            updates = future.result(timeout=None if duration is None else duration / 1000)
        except distributed.TimeoutError:
            return self._state  # still running
        except BaseException:
            self._state = PipelineState.FAILED
            self.client.close()
            raise
        for update in updates:
            self._metrics.commit_physical(None, update)
            self._metrics.commit_logical(None, update)
        self._state = PipelineState.DONE
        self.client.close()
        return self._state

    def metrics(self) -> DirectMetrics:
        """The metrics of every finished bundle (empty until the run is done)."""
        return self._metrics


class _Read(overrides._Read):
    """``overrides._Read`` without ``get_windowing`` (l. 51-56): a ParDo reading its output
    fails ('PBegin' object has no attribute 'windowing')."""

    def get_windowing(self, inputs) -> Windowing:
        return Windowing(GlobalWindows())


class _ReadOverride(PTransformOverride):
    """``beam.io.Read`` -> ``_Read``, ahead of Beam's ReadOverride (overrides.py l. 125-131)."""

    def matches(self, applied) -> bool:
        return type(applied.transform) is iobase.Read

    def get_replacement_transform_for_applied_ptransform(self, applied) -> _Read:
        return _Read(applied.transform.source)


class DaskRunner(dask_runner.DaskRunner):
    """Beam's DaskRunner with the translation fixed (see the module docstring)."""

    cluster = ""  # where the last run went; the run summary names it

    def run_pipeline(self, pipeline, options) -> DaskRunnerResult:
        """Translate the pipeline into one dask collection and submit it."""
        dask_options = options.view_as(dask_runner.DaskOptions).get_all_options(
            drop_default=True, current_only=True
        )
        bag_kwargs = dask_runner.DaskOptions._extract_bag_kwargs(dask_options)
        if not (dask_options.get("address") or dask_options.get("scheduler_file")):
            # Client() then starts a LocalCluster in this process (closed with the client):
            # by default its dashboard would listen on 0.0.0.0:8787, and distributed logs its
            # every start and stop at INFO, racing shutdowns as tracebacks.
            dask_options["dashboard_address"] = None
            logging.getLogger("distributed").setLevel(logging.WARNING)
        client = distributed.Client(**dask_options)
        workers = client.nthreads()
        self.cluster = f"scheduler {client.scheduler.address}, {len(workers)} workers"
        pipeline.replace_all([_ReadOverride(), *overrides.dask_overrides()])
        graph = _Graph()
        pipeline.visit(graph)
        translation = _Translation(graph, max(1, sum(workers.values())), bag_kwargs)
        # One collection: optimized apart, several would each fuse in (and run) shared tasks.
        leaves = [translation.bag(pcoll).map_partitions(_nothing) for pcoll in graph.leaves()]
        done = db.concat(leaves + translation.metrics)
        return DaskRunnerResult(client, [client.compute(done)], self.cluster)


RUNNER = f"{__name__}.{DaskRunner.__qualname__}"


def _main_input(applied: AppliedPTransform) -> PCollection:
    (pcoll,) = applied.inputs
    return pcoll


class _Graph(PipelineVisitor):
    """The pipeline's primitive transforms and the readers of each PCollection (None for a
    side-input reader); which ParDos run fused."""

    def __init__(self):
        self.transforms: list[AppliedPTransform] = []
        self.readers: dict[PCollection, list] = collections.defaultdict(list)

    def visit_transform(self, applied) -> None:
        self.transforms.append(applied)
        for pcoll in applied.inputs:
            if isinstance(pcoll, PCollection):
                self.readers[pcoll].append(applied)
        for side_input in applied.side_inputs:
            self.readers[side_input.pvalue].append(None)

    def leaves(self) -> list[PCollection]:
        """PCollections nobody reads: computing them runs every transform."""
        return [
            pcoll
            for applied in self.transforms
            for pcoll in applied.outputs.values()
            if not self.readers[pcoll]
        ]

    def fused_reader(self, pcoll: PCollection) -> Optional[AppliedPTransform]:
        """The ParDo fed a ParDo's main output within one task: its only reader, if that
        reads it as main input."""
        readers = self.readers[pcoll]
        producer = pcoll.producer
        if (
            isinstance(producer.transform, ParDo)
            and producer.outputs.get(None) is pcoll
            and len(readers) == 1
            and readers[0] is not None
            and isinstance(readers[0].transform, ParDo)
        ):
            return readers[0]
        return None

    def stage(self, applied: AppliedPTransform) -> list[AppliedPTransform]:
        """The chain of fused ParDos that ``applied`` belongs to, first to last."""
        while self.fused_reader(_main_input(applied)) is applied:
            applied = _main_input(applied).producer
        steps = [applied]
        while (reader := self.fused_reader(steps[-1].outputs[None])) is not None:
            steps.append(reader)
        return steps


class _Translation:
    """Beam primitives -> dask Bags of WindowedValues, one per PCollection, built on demand
    from the leaves up; ``metrics``: a bag of MetricUpdates per stage."""

    def __init__(self, graph: _Graph, threads: int, bag_kwargs: dict):
        self.graph = graph
        self.threads = threads
        self.bag_kwargs = bag_kwargs
        self.bags: dict[PCollection, db.Bag] = {}
        self.metrics: list[db.Bag] = []

    def bag(self, pcoll: PCollection) -> db.Bag:
        if pcoll not in self.bags:
            applied = pcoll.producer
            translate = next(
                (_TRANSLATIONS[c] for c in type(applied.transform).__mro__ if c in _TRANSLATIONS),
                None,
            )
            if translate is None:
                raise NotImplementedError(
                    f"DaskRunner cannot run {applied.full_label} "
                    f"({type(applied.transform).__name__})"
                )
            result = translate(self, applied)
            if isinstance(result, db.Bag):
                result = {pcoll: result}
            self.bags.update(result)
        return self.bags[pcoll]

    def create(self, applied) -> db.Bag:
        values = [GlobalWindows.windowed_value(v) for v in applied.transform.values]
        partitions = min(len(values), max(MAX_CREATE_PARTITIONS, self.threads))
        return db.from_sequence(values, **(self.bag_kwargs or {"npartitions": max(1, partitions)}))

    def impulse(self, applied) -> db.Bag:
        return db.from_sequence([GlobalWindows.windowed_value(b"")], npartitions=1)

    def read(self, applied) -> db.Bag:
        source = applied.transform.source
        bundle_size = max((source.estimate_size() or 0) // self.threads, 1 << 20)
        bundles = list(source.split(bundle_size))
        return db.from_sequence(bundles, npartitions=max(1, len(bundles))).map_partitions(
            _read_bundles
        )

    def reshuffle(self, applied) -> db.Bag:
        bag = self.bag(_main_input(applied))
        if bag.npartitions >= self.threads:
            return bag
        # More than twice as many pieces as threads: dask then places them as root-ish
        # tasks, by load; fewer would stay on the worker that holds the input.
        return bag.repartition(npartitions=4 * self.threads)

    def flatten(self, applied) -> db.Bag:
        return db.concat([self.bag(pcoll) for pcoll in applied.inputs])

    def group_by_key_only(self, applied) -> db.Bag:
        key_type = key_value_types(applied.outputs[None].element_type)[0]
        coder = coders.registry.get_coder(key_type).as_deterministic_coder(applied.full_label)
        bag = self.bag(_main_input(applied))
        # A task shuffle costs a task per pair of partitions: as many as threads suffice.
        if bag.npartitions > self.threads:
            bag = bag.repartition(npartitions=self.threads)
        grouped = bag.groupby(functools.partial(_encode_key, coder), shuffle="tasks")
        return grouped.map(functools.partial(_key_with_values, coder))

    def pardo(self, applied) -> dict[PCollection, db.Bag]:
        """The whole fused stage of ``applied``: one task per partition of its input."""
        steps = self.graph.stage(applied)
        outputs = [
            pcoll
            for step in steps
            for pcoll in step.outputs.values()
            if self.graph.fused_reader(pcoll) is None
        ]
        specs = [
            _Step(
                step.full_label,
                step.transform.fn,
                step.transform.args,
                step.transform.kwargs,
                [(type(si), si._view_options()) for si in step.side_inputs],
                _main_input(step).windowing,
                {
                    tag: outputs.index(pcoll)
                    for tag, pcoll in step.outputs.items()
                    if pcoll in outputs
                },
            )
            for step in steps
        ]
        sides = [
            self.bag(si.pvalue).reduction(list, _concat)
            for step in steps
            for si in step.side_inputs
        ]
        name = steps[0].full_label + (f"..{steps[-1].full_label}" if len(steps) > 1 else "")
        stage = _Stage(name, pickler.dumps(specs))
        results = self.bag(_main_input(steps[0])).map_partitions(stage, *sides)
        self.metrics.append(results.map_partitions(_select, _METRICS))
        return {pcoll: results.map_partitions(_select, i) for i, pcoll in enumerate(outputs)}


_TRANSLATIONS = {
    overrides._Create: _Translation.create,
    Impulse: _Translation.impulse,
    overrides._Read: _Translation.read,
    overrides._Reshuffle: _Translation.reshuffle,
    overrides._Flatten: _Translation.flatten,
    overrides._GroupByKeyOnly: _Translation.group_by_key_only,
    ParDo: _Translation.pardo,
}


# What runs on the workers: module-level, so that tasks pickle by reference.


class _Step(NamedTuple):
    """One ParDo of a stage; ``outputs``: tag -> index of the stage output it goes to."""

    name: str
    fn: Any
    args: tuple
    kwargs: dict
    views: list  # (side-input view class, its options), in side-input order
    windowing: Windowing
    outputs: dict


@dataclasses.dataclass(frozen=True)
class _Stage:
    """One partition through a chain of fused ParDos as one Beam bundle; returns the
    outputs that leave the stage as (output index, WindowedValue), and each step's metric
    updates as (``_METRICS``, MetricUpdates)."""

    name: str
    payload: bytes = dataclasses.field(repr=False)  # Beam-pickled list of _Step

    @property
    def __name__(self) -> str:  # dask names the tasks after it
        return self.name

    def __call__(self, elements, *side_values) -> list:
        elements = list(elements)
        if not elements:  # not a bundle: no DoFn setup (connections) for nothing
            return []
        steps = pickler.loads(self.payload)
        sides = iter(side_values)
        side_maps = [
            [SideInputMap(v, options, next(sides)) for v, options in s.views] for s in steps
        ]
        sampler = statesampler.StateSampler(self.name, CounterFactory())
        results: list = []
        chain: list[_StepRunner] = []
        for step, step_sides in zip(reversed(steps), reversed(side_maps)):
            receivers = _Receivers(results, step.outputs, chain[0] if chain else None)
            runner = DoFnRunner(
                step.fn, step.args, step.kwargs, step_sides, step.windowing, receivers, step.name
            )
            chain.insert(0, _StepRunner(runner, sampler, step.name))
        previous = statesampler.get_current_tracker()
        statesampler.set_current_tracker(sampler)
        try:
            set_up = []
            try:
                for step in chain:
                    step.call("setup")
                    set_up.append(step)
                for step in chain:
                    step.call("start")
                for element in elements:
                    chain[0].receive(element)
                for step in chain:
                    step.call("finish")
            finally:
                for step in set_up:
                    step.call("teardown")
        finally:
            statesampler.set_current_tracker(previous)
        for step in chain:
            updates = step.container.get_cumulative()
            if any(vars(updates).values()):
                results.append((_METRICS, updates))
        return results


class _StepRunner(Receiver):
    """A step's DoFnRunner, each call made in the step's own metrics state."""

    def __init__(self, runner: DoFnRunner, sampler, name: str):
        self.runner = runner
        self.container = MetricsContainer(name)
        self.state = sampler.scoped_state(name, "process", metrics_container=self.container)

    def call(self, method: str) -> None:
        with self.state:
            getattr(self.runner, method)()

    def receive(self, windowed_value) -> None:
        with self.state:
            self.runner.process(windowed_value)


class _Receivers(dict):
    """A step's receivers: its main output to the next fused step, if any; every other
    output to the stage results, as (output index, WindowedValue)."""

    def __init__(self, results: list, outputs: dict, fused: Optional[_StepRunner]):
        super().__init__()
        self.results, self.outputs, self.fused = results, outputs, fused

    def __missing__(self, tag):
        if tag is None and self.fused is not None:
            receiver = self.fused
        else:
            receiver = _Collect(self.results, self.outputs.get(tag))
        self[tag] = receiver
        return receiver


class _Collect(Receiver):
    def __init__(self, results: list, index: Optional[int]):
        self.results, self.index = results, index

    def receive(self, windowed_value) -> None:
        self.results.append((self.index, windowed_value))


def _select(results, index) -> list:
    return [value for output, value in results if output == index]


def _nothing(partition) -> list:
    return []


def _concat(partitions) -> list:
    return list(itertools.chain.from_iterable(partitions))


def _read_bundles(bundles) -> list:
    return [
        GlobalWindows.windowed_value(value)
        for bundle in bundles
        for value in bundle.source.read(
            bundle.source.get_range_tracker(bundle.start_position, bundle.stop_position)
        )
    ]


def _encode_key(coder, windowed_kv) -> bytes:
    return coder.encode(windowed_kv.value[0])


def _key_with_values(coder, group):
    encoded_key, windowed_kvs = group
    values = [windowed.value[1] for windowed in windowed_kvs]
    return GlobalWindows.windowed_value((coder.decode(encoded_key), values))
