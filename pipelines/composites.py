"""The graph every pipeline shares: ``source | ReadParseClean | WriteDatalake``.

``ReadParseClean`` turns any source of raw lines (dataset files, the landing zone, a
replayed file, a notebook's sample) into clean canonical records plus each stage's dead
letters; ``WriteDatalake`` upserts the records into their table and appends every dead
letter, each stage through its own small sink so that it commits as it goes, in batch
and in streaming alike.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from connectors import datalake, models
from connectors.files import ReadDataset
from connectors.sink import (
    REVIEW_EMBEDDINGS,
    REVIEW_EMOTIONS,
    CommitHook,
    TableSpec,
    Target,
    WriteDeadLetters,
    WriteRows,
)
from pipelines.options import EmotionOptions, IngestOptions
from pipelines.progress import Measure
from transforms.clean import CleanRecords
from transforms.parse import ParseRecords

RECORDS = "records"


class ReadParseClean(beam.PTransform):
    """A source of raw lines -> ``{"records": clean records, "<stage>": dead letters}``.

    ``source`` is any transform whose result has ``.records`` (RawRecord) and
    ``.dead_letters``: ``ReadDataset``, ``FollowLanding``, ``ReplayFile``.
    """

    def __init__(
        self,
        source: beam.PTransform,
        kind: str,
        pipeline_name: str,
        max_bad_fraction: Optional[float] = None,
    ):
        super().__init__()
        self._source = source
        self._kind = kind
        self._pipeline_name = pipeline_name
        self._max_bad_fraction = max_bad_fraction

    def expand(self, pbegin):
        read = pbegin | "Read" >> self._source
        parsed = read.records | "Parse" >> ParseRecords(
            self._kind, self._pipeline_name, self._max_bad_fraction
        )
        cleaned = parsed.records | "Clean" >> CleanRecords(self._kind, self._pipeline_name)
        return {
            RECORDS: cleaned.records,
            "read": read.dead_letters,
            "parse": parsed.dead_letters,
            "clean": cleaned.dead_letters,
        }


class WriteDatalake(beam.PTransform):
    """``{"records": records, "<stage>": dead letters, ...}`` (or records alone) -> the
    table and ``dead_letters``; rows the database refuses become dead letters too."""

    def __init__(self, spec: TableSpec, target: Target, hooks: Sequence[CommitHook] = ()):
        super().__init__()
        self._spec = spec
        self._target = target
        self._hooks = tuple(hooks)

    def expand(self, inputs: Union[beam.PCollection, Mapping[str, beam.PCollection]]):
        if isinstance(inputs, beam.PCollection):
            inputs = {RECORDS: inputs}
        refused = inputs[RECORDS] | "Upsert" >> WriteRows(self._spec, self._target, self._hooks)
        letters = {**{k: v for k, v in inputs.items() if k != RECORDS}, "sink": refused}
        for stage, dead in letters.items():
            # One small sink per stage, not one behind a Flatten: local runners run what
            # follows a Flatten of a running stream's outputs only once the stream ends.
            _ = dead | f"DeadLetters{stage.capitalize()}" >> WriteDeadLetters(
                self._target, self._hooks
            )


def ingest_files(
    pipeline: beam.Pipeline,
    options: PipelineOptions,
    target: Target,
    kind: str,
    spec: TableSpec,
) -> tuple[dict[str, beam.PCollection], Measure]:
    """The bounded ingest: ``ReadDataset | ReadParseClean | WriteDatalake(spec)`` over the
    run's ``--input``; returns the cleaned rows (for what more a pipeline does with them)
    and the run's progress measure: bytes of its files read, and the bar it must clear."""
    ingest = options.view_as(IngestOptions)
    source = ReadDataset(
        ingest.input or [], target.pipeline, (target.dsn, target.run_id), target.stop_file
    )
    bar = ingest.max_bad_fraction
    rows = pipeline | "ReadParseClean" >> ReadParseClean(source, kind, target.pipeline, bar)
    _ = rows | "WriteDatalake" >> WriteDatalake(spec, target)
    files = len(source.files)
    measure = Measure(
        f"{spec.table}: {files} file{'s' if files > 1 else ''}",
        done=("bytes_read",),
        total=source.total_bytes,
        unit="B",
        shown={f"{spec.table}_upserted": "rows", "dead_letters_upserted": "dead letters"},
        max_bad_fraction=bar,
    )
    return rows, measure


def write_emotions(
    reviews: beam.PCollection,
    options: PipelineOptions,
    target: Target,
    hooks: Sequence[CommitHook] = (),
    reshuffle: bool = True,
) -> None:
    """Reviews -> their emotions in ``review_emotions`` and, from the default model where
    the datalake can search, their embeddings in ``review_embeddings`` (torch and the
    runtimes load only when emotions run). ``hooks`` see the emotions' commits.
    ``reshuffle``: spread inference over workers (not needed when the source is spread)."""
    from transforms.emotion import ClassifyEmotions

    emotion = options.view_as(EmotionOptions)
    models.fetch(emotion.model)
    result = reviews | "ClassifyEmotions" >> ClassifyEmotions(
        model=emotion.model,
        device=emotion.device,
        max_tokens=emotion.max_tokens,
        torch_threads=emotion.torch_threads,
        dtype=emotion.dtype,
        pipeline_name=target.pipeline,
        reshuffle=reshuffle,
        embeddings=datalake.can_search(target.dsn),
    )
    emotions = {RECORDS: result.emotions, "emotion": result.dead_letters}
    _ = emotions | "WriteEmotions" >> WriteDatalake(REVIEW_EMOTIONS, target, hooks)
    _ = result.embeddings | "WriteEmbeddings" >> WriteDatalake(REVIEW_EMBEDDINGS, target)
