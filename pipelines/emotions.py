"""The ``emotions`` pipeline: reviews in the datalake without emotions (for a model) ->
``review_emotions``, and their embeddings -> ``review_embeddings`` (the default model,
where the datalake can search; reviews classified before embeddings existed are
embedded too). Results commit as they go; a rerun does only what is left.

Before a long run it says what it will cost: how many reviews, and how long at the rate
of the last run on this machine (or of a short warm-up measured now).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Optional, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions

from connectors import datalake, unclassified
from connectors.sink import REVIEW_EMOTIONS, Target
from connectors.unclassified import ReadUnclassified
from pipelines.composites import write_emotions
from pipelines.lifecycle import RunResult, execute
from pipelines.options import DatalakeOptions, EmotionOptions
from pipelines.progress import Measure, duration
from transforms.emotion_model import DEFAULT_MODEL, EMBEDDING_MODEL

NAME = "emotions"
DESCRIPTION = "reviews in the datalake without emotions -> review_emotions [--model, --limit]"
OPTIONS = (DatalakeOptions, EmotionOptions)
# Results commit in batches of this many: on a kill -9 at most a batch per worker is lost
# (seconds of inference), not the run.
COMMIT_EVERY = 500
# A run this long or longer is told its cost before it starts.
LONG_RUN_REVIEWS = 2000
_LOG = logging.getLogger(__name__)


def build(pipeline: beam.Pipeline, options: PipelineOptions, target: Target) -> Measure:
    """Read unclassified reviews a page at a time, classify, upsert as it goes."""
    emotion = options.view_as(EmotionOptions)
    embeds = emotion.model == DEFAULT_MODEL and datalake.can_search(target.dsn)
    embedding_model = EMBEDDING_MODEL if embeds else None
    todo = unclassified.plan(target.dsn, emotion.model, emotion.limit, embedding_model)
    say_cost(todo.reviews, emotion, options, target.dsn)
    reviews = pipeline | "ReadUnclassified" >> ReadUnclassified(
        target.dsn, emotion.model, todo.last_key, target.stop_file, embedding_model
    )
    batch = min(target.batch_size, COMMIT_EVERY)
    write_emotions(reviews, options, dataclasses.replace(target, batch_size=batch), reshuffle=False)
    return Measure(
        "emotions",
        done=("review_emotions_upserted", "dead_letters_upserted"),
        total=todo.reviews,
        unit="reviews",
    )


def say_cost(
    reviews: int,
    emotion: EmotionOptions,
    options: PipelineOptions,
    dsn: str,
    long_run: int = LONG_RUN_REVIEWS,
) -> None:
    """One line before a long run: how many reviews, how long, how to do fewer or stop."""
    workers = options.view_as(DirectOptions).direct_num_workers or os.cpu_count() or 1
    if reviews < long_run or emotion.limit is not None:
        print(f"{reviews:,} reviews to classify with {emotion.model}", flush=True)
        return
    rate, source = last_rate(dsn, emotion.model)
    if rate is None:
        rate, source = warm_up_rate(dsn, emotion, workers), "measured now"
    print(
        f"{reviews:,} reviews to classify, ~{duration(reviews / rate)} at {rate:,.0f} reviews/s"
        f" ({source}); --limit N for fewer; Ctrl-C keeps what is done",
        flush=True,
    )


def last_rate(dsn: str, model: str) -> tuple[Optional[float], str]:
    """Reviews/s of the latest emotions run of ``model`` on this machine that classified
    enough reviews to say (its start-up included)."""
    for run in datalake.recent_runs(dsn, 20, NAME):
        counters = run["counters"] or {}
        done = counters.get("review_emotions_upserted", 0)
        seconds = counters.get("elapsed_ms", 0) / 1000
        same = (run["options"] or {}).get("model", model) == model
        if same and run["host"] == datalake.this_host() and done >= 200 and seconds > 0:
            return done / seconds, f"the rate of run {run['run_id'][:8]} on this machine"
    return None, ""


def warm_up_rate(dsn: str, emotion: EmotionOptions, workers: int) -> float:
    """Classify a few reviews now and extrapolate to ``workers`` (start-up left out)."""
    from transforms.emotion import EmotionInput, LoadedEmotionModel, model_text

    model = LoadedEmotionModel(
        emotion.model, emotion.device, emotion.max_tokens, emotion.torch_threads, emotion.dtype
    )
    sample = unclassified.sample(dsn, emotion.model, 64)
    texts = [(r.review_id, model_text(r.title, r.text)) for r in sample]
    inputs = [EmotionInput(key, None, None, text) for key, text in texts if text]
    model.classify(inputs[:8])  # the first call pays for one-time set-up
    started = time.perf_counter()
    model.classify(inputs)
    return len(inputs) / max(time.perf_counter() - started, 1e-6) * workers


def run(
    argv: Optional[Sequence[str]] = None, test_pipeline: Optional[beam.Pipeline] = None
) -> RunResult:
    """Run the pipeline (``python -m pipelines run emotions [--model M] [--limit N]``)."""
    return execute(NAME, build, argv, test_pipeline, table=REVIEW_EMOTIONS.table)
