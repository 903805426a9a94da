"""Emotion classification of reviews: ``ClassifyEmotions`` wraps Beam's ``RunInference``.

Two kinds of model sit behind one ``ModelHandler``: the offline default
(``transforms.emotion_model``: MiniLM-L6 with a LoRA adapter trained on GoEmotions mapped
to Ekman's emotions, which also gives each review's sentence embedding) and any Hugging
Face text-classification model (hub id or local directory; no embeddings). Batches are
tokenised once, sorted by token length and run in sub-batches of similar length so padding
stays small; the model is loaded once per worker process (RunInference's
``shared.Shared``) and shared by the worker's threads.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Optional, Sequence, Union

import apache_beam as beam
from apache_beam.ml.inference.base import ModelHandler, RunInference

from transforms.emotion_model import (
    ARTEFACT,
    ARTEFACT_FILES,
    DEFAULT_MODEL,
    DTYPES,
    EMBEDDING_MODEL,
    LABELS,
    base_dir,
    fastest_dtype,
    load_runner,
    pad,
    sub_batches,
)
from transforms.records import (
    DEAD_LETTERS,
    METRICS_NAMESPACE,
    DeadLetter,
    EmotionResult,
    ReviewEmbedding,
)

_LOG = logging.getLogger(__name__)
# Reviews per inference call at most: a wide batch sorts into sub-batches of near-equal
# length (less padding): 256 runs 10% faster than 64 (bench/emotion_speed.py).
MAX_BATCH_SIZE = 256

STAGE = "emotion"
EMOTIONS = "emotions"
EMBEDDINGS = "embeddings"

# Characters kept per token of budget before tokenising: English averages ~4-5
# characters per WordPiece token, so this never binds on real text but bounds the
# tokeniser's work on pathological 100k-character reviews.
_CHARS_PER_TOKEN = 20
_OFFLINE_FIX = (
    f"use the offline default --model {DEFAULT_MODEL}, "
    "or --model PATH (a local Hugging Face text-classification model directory)"
)


class EmotionModelError(ValueError):
    """The emotion model cannot be loaded; the message is one line naming the fix."""


class EmotionInput(NamedTuple):
    """What the model handler sees: the text fed to the model, with its lineage."""

    review_id: str
    source: Optional[str]
    line: Optional[int]
    text: str


class Classified(NamedTuple):
    """One review's emotion, and its sentence embedding when the model gives one."""

    result: EmotionResult
    embedding: Optional[tuple[float, ...]]


class InferenceFailure(NamedTuple):
    """One input whose inference failed on its own (its batch-mates were retried)."""

    item: EmotionInput
    error: str


def model_text(title: Optional[str], text: Optional[str]) -> Optional[str]:
    """The text the model reads: ``"title. text"``; None when the review has no text."""
    if not isinstance(text, str) or not text.strip():
        return None
    text = text.strip()
    if isinstance(title, str) and title.strip():
        title = title.strip()
        return f"{title} {text}" if title[-1] in ".!?;:" else f"{title}. {text}"
    return text


def check_settings(model: str, device: str, dtype: str) -> None:
    """A model, device and precision this machine can run, or EmotionModelError naming the
    fix; cheap (no weights load), so the launcher checks before any worker starts.

    A hub id must be in the local Hugging Face cache (``connectors.models`` fetches it
    there first when the hub is reachable): inference never goes online.
    """
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise EmotionModelError(f"unknown device {device!r}; use --device cpu or cuda")
    if dtype not in DTYPES:
        raise EmotionModelError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if not isinstance(model, str) or not model.strip():
        raise EmotionModelError(f"no emotion model given; {_OFFLINE_FIX}")
    if model == DEFAULT_MODEL:
        needed = [base_dir() / "tokenizer.json", base_dir() / "model.safetensors"]
        needed += [ARTEFACT / f for f in ARTEFACT_FILES]
        missing = [p for p in needed if not p.is_file()]
        if missing:
            raise EmotionModelError(
                f"default emotion model incomplete, missing {missing[0]}; reinstall the"
                f" package, retrain it with python -m pipelines train-emotions, or use --model PATH"
            )
        return
    if dtype == "int8":
        raise EmotionModelError(
            f"--dtype int8 runs the default model only; use auto, float32 or bfloat16 for {model}"
        )
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise EmotionModelError(
                f"cannot load emotion model {model!r}: no config.json in that directory; "
                f"{_OFFLINE_FIX}"
            )
        return
    looks_like_path = model.startswith((".", "/", "~")) or model.count("/") > 1
    if looks_like_path or path.exists():
        raise EmotionModelError(
            f"cannot load emotion model {model!r}: no such model directory; {_OFFLINE_FIX}"
        )
    if _hub_cached(model):
        return
    raise EmotionModelError(
        f"cannot load emotion model {model!r}: not in the local Hugging Face cache (fetch it"
        f" first while online: python -m pipelines run emotions --model {model} fetches it);"
        f" {_OFFLINE_FIX}"
    )


def check_model(model: str) -> None:
    """``check_settings`` for a model on the CPU at the default precision."""
    check_settings(model, "cpu", "auto")


def _hub_cached(model: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(model, "config.json")
    return isinstance(found, str)


def _resolve(model: str) -> str:
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else model


class LoadedEmotionModel:
    """A tokenizer + network pair, loaded once per worker process and shared by threads.

    The default model runs on ``transforms.emotion_model``'s runners (one pass gives the
    emotion and the embedding); any other is a Hugging Face text classifier on torch (no
    embedding). ``classify`` tokenises a batch without padding, runs each distinct text
    once, sorted by token length in sub-batches of similar length, so a batch of short
    reviews never pays for its longest.
    """

    def __init__(
        self,
        model: str,
        device: str = "cpu",
        max_tokens: int = 256,
        torch_threads: int = 1,
        dtype: str = "auto",
        artefact: Optional[Path] = None,
    ):
        """``artefact``: another trained artefact of the default model (training scores
        the one it wrote); default: the packaged one."""
        from tokenizers import Tokenizer

        check_settings(model, device, dtype)
        self.name = model
        started = time.perf_counter()
        if model == DEFAULT_MODEL:
            if dtype == "auto":
                dtype = "float32" if device != "cpu" else fastest_dtype(torch_threads)
            self._forward = load_runner(dtype, torch_threads, device=device, artefact=artefact)
            self.labels = LABELS
            self.embedding_model: Optional[str] = EMBEDDING_MODEL
            tokenizer = Tokenizer.from_file(str(base_dir() / "tokenizer.json"))
            limit = json.loads((base_dir() / "tokenizer_config.json").read_text()).get(
                "model_max_length", 512
            )
            self.pad_id = 0
        else:
            tokenizer, limit, dtype = self._load_hub_model(model, device, torch_threads, dtype)
            self.embedding_model = None
        self.dtype = dtype
        self.max_tokens = int(min(max_tokens, limit)) if 0 < limit < 1_000_000 else max_tokens
        # A private copy configured once: a shared fast tokenizer whose truncation is
        # changed per call raises "Already borrowed" under concurrent threads.
        self._tokenizer = Tokenizer.from_str(tokenizer.to_str())
        self._tokenizer.enable_truncation(self.max_tokens)
        self._tokenizer.no_padding()
        _LOG.info(
            "emotion model %s loaded in %.1f s: %s on %s, %d threads, max_tokens %d",
            model,
            time.perf_counter() - started,
            dtype,
            device,
            torch_threads,
            self.max_tokens,
        )

    def _load_hub_model(self, model: str, device: str, threads: int, dtype: str):
        """A Hugging Face text classifier on torch: (fast tokenizer, its length limit, dtype)."""
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if threads:
            torch.set_num_threads(threads)
        if dtype == "auto":  # bfloat16 only where the hardware runs it natively
            cuda = device.startswith("cuda") and torch.cuda.is_available()
            dtype = "bfloat16" if cuda and torch.cuda.is_bf16_supported() else "float32"
        precision = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        source = _resolve(model)
        network = AutoModelForSequenceClassification.from_pretrained(source)
        network.to(device=device, dtype=precision).eval()
        id2label = network.config.id2label
        self.labels = tuple(str(id2label[i]).lower() for i in range(len(id2label)))
        multi_label = getattr(network.config, "problem_type", None) == "multi_label_classification"

        def forward(input_ids, mask):
            with torch.inference_mode():
                logits = network(
                    input_ids=torch.from_numpy(input_ids).to(device),
                    attention_mask=torch.from_numpy(mask).to(device),
                ).logits.float()
                probs = torch.sigmoid(logits) if multi_label else torch.softmax(logits, -1)
            return probs.cpu().numpy(), None

        self._forward = forward
        tokenizer = AutoTokenizer.from_pretrained(source)
        if not getattr(tokenizer, "is_fast", False):
            raise EmotionModelError(
                f"emotion model {model!r} has no fast tokenizer; {_OFFLINE_FIX}"
            )
        self.pad_id = tokenizer.pad_token_id or 0
        return tokenizer.backend_tokenizer, tokenizer.model_max_length, dtype

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, truncated to ``max_tokens``, unpadded."""
        cap = self.max_tokens * _CHARS_PER_TOKEN
        return [e.ids for e in self._tokenizer.encode_batch([t[:cap] for t in texts])]

    def run(self, ids: Sequence[Sequence[int]]):
        """(probabilities [rows x labels], embeddings [rows x dim] or None) of one sub-batch."""
        return self._forward(*pad(ids, self.pad_id))

    def classify(self, batch: Sequence[EmotionInput]) -> list[Union[Classified, InferenceFailure]]:
        """Classify a batch; an input that fails on its own becomes an InferenceFailure.
        Identical texts run once."""
        out: list[Any] = [None] * len(batch)
        first: dict[str, int] = {}  # text -> the index of its first occurrence
        for i, item in enumerate(batch):
            first.setdefault(item.text, i)
        unique = sorted(set(first.values()))
        ids = self._token_ids_each(batch, unique, out)
        order = sorted((i for i in unique if out[i] is None), key=lambda i: len(ids[i]))
        for chunk in sub_batches(order, {i: len(ids[i]) for i in order}):
            try:
                self._fill(out, chunk, batch, ids)
            except Exception as exc:
                if len(chunk) == 1:
                    out[chunk[0]] = InferenceFailure(batch[chunk[0]], _describe(exc))
                    continue
                for i in chunk:  # isolate the culprit: its batch-mates still get a label
                    try:
                        self._fill(out, [i], batch, ids)
                    except Exception as exc_i:
                        out[i] = InferenceFailure(batch[i], _describe(exc_i))
        for i, item in enumerate(batch):
            done = out[first[item.text]]
            if out[i] is None and isinstance(done, Classified):
                out[i] = Classified(done.result._replace(review_id=item.review_id), done.embedding)
            elif out[i] is None:
                out[i] = InferenceFailure(item, done.error)
        return out

    def _token_ids_each(self, batch, unique: Sequence[int], out: list) -> dict[int, list[int]]:
        """Token ids of the batch's distinct texts; if the tokenizer refuses them, each text
        alone, and a text it refuses becomes an InferenceFailure in ``out``."""
        try:
            return dict(zip(unique, self.token_ids([batch[i].text for i in unique])))
        except Exception:  # noqa: BLE001 - find the culprit; its batch-mates go on
            ids: dict[int, list[int]] = {}
            for i in unique:
                try:
                    ids[i] = self.token_ids([batch[i].text])[0]
                except Exception as exc:  # noqa: BLE001
                    out[i] = InferenceFailure(batch[i], _describe(exc))
                    ids[i] = []
            return ids

    def _fill(self, out: list, chunk: Sequence[int], batch, ids) -> None:
        probs, embeddings = self.run([ids[i] for i in chunk])
        for row, i in enumerate(chunk):
            scores = {label: float(p) for label, p in zip(self.labels, probs[row])}
            top = max(scores, key=scores.__getitem__)
            result = EmotionResult(batch[i].review_id, self.name, top, scores[top], scores)
            vector = None if embeddings is None else tuple(float(x) for x in embeddings[row])
            out[i] = Classified(result, vector)

    def embed(self, texts: Sequence[str]) -> list[tuple[float, ...]]:
        """Sentence embeddings of ``texts`` (search queries); the default model only."""
        if self.embedding_model is None:
            raise EmotionModelError(f"emotion model {self.name!r} gives no embeddings")
        found = self.classify([EmotionInput(str(i), None, None, t) for i, t in enumerate(texts)])
        failed = [f for f in found if isinstance(f, InferenceFailure)]
        if failed:
            raise EmotionModelError(f"cannot embed {failed[0].item.text[:40]!r}: {failed[0].error}")
        return [f.embedding for f in found]


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:1000]


class EmotionModelHandler(
    ModelHandler[EmotionInput, Union[Classified, InferenceFailure], LoadedEmotionModel]
):
    """RunInference handler for both model kinds; holds only settings, so it pickles small."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        device: str = "cpu",
        max_tokens: int = 256,
        torch_threads: int = 1,
        min_batch_size: int = 8,
        max_batch_size: int = MAX_BATCH_SIZE,
        dtype: str = "auto",
    ):
        # Beam 2.77's own length-aware batching (batch_length_fn) exists only on its
        # stateful path (max_batch_duration_secs), which fails on the legacy DirectRunner
        # (GroupByKeyOnly assertion); length-sorted sub-batches do the job in every runner.
        super().__init__(min_batch_size=min_batch_size, max_batch_size=max_batch_size)
        self._dtype = dtype
        self._model = model
        self._device = device
        self._max_tokens = max_tokens
        self._torch_threads = torch_threads

    def load_model(self) -> LoadedEmotionModel:
        """Load tokenizer and network on this worker (called once per process by RunInference)."""
        return LoadedEmotionModel(
            self._model, self._device, self._max_tokens, self._torch_threads, self._dtype
        )

    def run_inference(
        self,
        batch: Sequence[EmotionInput],
        model: LoadedEmotionModel,
        inference_args: Optional[dict[str, Any]] = None,
    ) -> Iterable[Union[Classified, InferenceFailure]]:
        """Classify one batch of reviews; if the batch fails as a whole (the device is
        lost, the model is broken), each review becomes an InferenceFailure: a run never
        stops on inference, and no Flatten of a separate failure path is needed (local
        runners would hold every result behind it until the end of the run)."""
        try:
            return model.classify(batch)
        except Exception as exc:  # noqa: BLE001 - every review of the batch is kept
            return [InferenceFailure(item, _describe(exc)) for item in batch]

    def get_num_bytes(self, batch: Sequence[EmotionInput]) -> int:
        """Text size of a batch (the default pickles the whole batch just to measure it)."""
        return sum(len(item.text) for item in batch)

    def get_metrics_namespace(self) -> str:
        """Namespace of RunInference's own metrics (latency, batch sizes)."""
        return "RunInference_emotion"

    def __repr__(self) -> str:
        return (
            f"EmotionModelHandler(model={self._model!r}, device={self._device!r}, "
            f"max_tokens={self._max_tokens}, torch_threads={self._torch_threads}, "
            f"dtype={self._dtype!r})"
        )


class _PrepareReviews(beam.DoFn):
    """Review -> EmotionInput; reviews without text are counted and skipped."""

    def __init__(self):
        self.seen = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "emotion_reviews")
        self.no_text = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "emotion_skipped_no_text")

    def process(self, review: Any) -> Iterator[EmotionInput]:
        self.seen.inc()
        text = model_text(getattr(review, "title", None), getattr(review, "text", None))
        if text is None:
            self.no_text.inc()
            return
        yield EmotionInput(
            str(review.review_id),
            getattr(review, "source", None),
            getattr(review, "line", None),
            text,
        )


class _RouteResults(beam.DoFn):
    """Results to the main output, embeddings to ``embeddings``, failures to
    ``dead_letters``; counts labels."""

    def __init__(self, pipeline_name: str, embedding_model: Optional[str]):
        self.pipeline_name = pipeline_name
        self.embedding_model = embedding_model
        self.classified = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "emotion_classified")
        self.failed = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "emotion_dead_letters")
        self.by_label: dict[str, Any] = {}

    def process(self, element: Union[Classified, InferenceFailure]) -> Iterator[Any]:
        if isinstance(element, InferenceFailure):
            self.failed.inc()
            yield beam.pvalue.TaggedOutput(
                DEAD_LETTERS, dead_letter(self.pipeline_name, element.item, element.error)
            )
            return
        result = element.result
        self.classified.inc()
        counter = self.by_label.get(result.label)
        if counter is None:
            counter = beam.metrics.Metrics.counter(
                METRICS_NAMESPACE, f"emotion_label_{result.label}"
            )
            self.by_label[result.label] = counter
        counter.inc()
        yield result
        if element.embedding is not None and self.embedding_model is not None:
            yield beam.pvalue.TaggedOutput(
                EMBEDDINGS,
                ReviewEmbedding(result.review_id, self.embedding_model, element.embedding),
            )


def dead_letter(pipeline_name: str, item: EmotionInput, error: str) -> DeadLetter:
    """The dead letter of one review whose inference failed; raw = review id + text."""
    raw = json.dumps({"review_id": item.review_id, "text": item.text})  # escapes surrogates
    return DeadLetter(pipeline_name, STAGE, item.source, item.line, raw, error)


class ClassifyEmotions(beam.PTransform):
    """Reviews -> EmotionResult rows (main output ``emotions``), ReviewEmbedding rows
    (``embeddings``, the default model only, unless ``embeddings=False``) and DeadLetter
    rows (``dead_letters``).

    Reviews with no text are counted (``emotion:skipped_no_text``) and skipped. A review
    whose inference fails, alone or with its batch, becomes a dead letter, never a crash.
    ``model``: DEFAULT_MODEL, a hub id or a local directory (checked here, so a bad one is
    a one-line EmotionModelError). ``dtype``: one of DTYPES; ``auto`` measures this CPU.
    ``reshuffle``: spread inference over workers whatever the source's parallelism.
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        device: str = "cpu",
        max_tokens: int = 256,
        min_batch_size: int = 8,
        max_batch_size: int = MAX_BATCH_SIZE,
        pipeline_name: str = "emotions",
        torch_threads: int = 1,
        dtype: str = "auto",
        reshuffle: bool = True,
        embeddings: bool = True,
        label: Optional[str] = None,
    ):
        super().__init__(label)
        check_settings(model, device, dtype)
        if max_tokens < 2:
            raise EmotionModelError(f"max_tokens must be at least 2, got {max_tokens}")
        if not 1 <= min_batch_size <= max_batch_size:
            raise EmotionModelError(
                f"need 1 <= min_batch_size <= max_batch_size, got {min_batch_size}, {max_batch_size}"
            )
        self.pipeline_name = pipeline_name
        self.reshuffle = reshuffle
        self.embedding_model = EMBEDDING_MODEL if embeddings and model == DEFAULT_MODEL else None
        self.handler = EmotionModelHandler(
            model=model,
            device=device,
            max_tokens=max_tokens,
            torch_threads=torch_threads,
            min_batch_size=min_batch_size,
            max_batch_size=max_batch_size,
            dtype=dtype,
        )

    def expand(self, reviews: beam.PCollection) -> beam.pvalue.DoOutputsTuple:
        inputs = reviews | "PrepareText" >> beam.ParDo(_PrepareReviews()).with_output_types(
            EmotionInput
        )
        if self.reshuffle:
            # Inference costs ~100x more than reading: break fusion with the source so
            # every worker gets a share even when one file feeds the pipeline.
            inputs = inputs | "Redistribute" >> beam.Reshuffle()
        return (
            inputs
            | "RunInference" >> RunInference(self.handler)
            | "Route"
            >> beam.ParDo(_RouteResults(self.pipeline_name, self.embedding_model)).with_outputs(
                DEAD_LETTERS, EMBEDDINGS, main=EMOTIONS
            )
        )


beam.coders.registry.register_coder(EmotionInput, beam.coders.RowCoder)
