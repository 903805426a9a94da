"""Emotion quality: accuracy and macro-F1 on the GoEmotions test split, with baselines.

Test examples are those whose labels map to a single Ekman class or only neutral (the
same selection the default model was trained on; it never saw the test split). Next to
the model: the majority class of the train split, and a lexicon baseline (NRC EmoLex
counts, as shipped by the ``NRCLex`` package; a bench-only dependency).

    python bench/emotion_quality.py --data DIR [--model M] [--dtype auto int8 float32 bfloat16]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.machine import cpu, publish  # noqa: E402
from training.emotions import load_split, predict, scores  # noqa: E402
from transforms.emotion import LoadedEmotionModel, check_model  # noqa: E402
from transforms.emotion_model import DEFAULT_MODEL, DTYPES, LABELS  # noqa: E402

NRC_EMOTIONS = ("anger", "disgust", "fear", "joy", "sadness", "surprise")
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


def nrc_lexicon() -> Optional[dict[str, list[str]]]:
    """NRC EmoLex word -> emotions, from the NRCLex package's data file (None if absent)."""
    try:
        from importlib import resources

        path = resources.files("nrclex") / "data" / "nrc_en.json"
        return json.loads(path.read_text(encoding="utf-8"))
    except (ImportError, FileNotFoundError, OSError):
        return None


def lexicon_predict(texts: Sequence[str], lexicon: dict, prior: Sequence[int]) -> np.ndarray:
    """Most frequent Ekman emotion among a text's lexicon words; neutral when none.

    Ties go to the emotion more frequent in the train split.
    """
    rank = {label: -prior[LABELS.index(label)] for label in NRC_EMOTIONS}
    out = []
    for text in texts:
        counts: Counter = Counter()
        for word in _WORD.findall(text.lower()):
            entry = lexicon.get(word) or (lexicon.get(word[:-2]) if word.endswith("'s") else None)
            for emotion in entry or ():
                if emotion in rank:
                    counts[emotion] += 1
        if counts:
            best = min(counts, key=lambda e: (-counts[e], rank[e]))
            out.append(LABELS.index(best))
        else:
            out.append(LABELS.index("neutral"))
    return np.asarray(out)


def model_predict(
    texts: Sequence[str], model: str, dtype: str, max_tokens: int, threads: int
) -> tuple[np.ndarray, float, str]:
    """Predictions of a model through the same code path RunInference uses; (labels, s, dtype)."""
    loaded = LoadedEmotionModel(model, "cpu", max_tokens, threads, dtype=dtype)
    unknown = set(loaded.labels) - set(LABELS)
    if unknown:
        print(f"note: labels {sorted(unknown)} are not Ekman's; they count as errors")
    started = time.perf_counter()
    predicted = predict(loaded, texts)
    return predicted, time.perf_counter() - started, str(loaded.dtype)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Evaluate, print a markdown table; ``--markdown FILE`` appends it there too."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="GoEmotions folder")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model (default: the offline one)")
    parser.add_argument(
        "--dtype", nargs="+", default=["auto"], choices=DTYPES, help="dtypes to evaluate"
    )
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--markdown", help="append the results table to this file")
    args = parser.parse_args(argv)
    data = Path(args.data)
    if not (data / "test.tsv").is_file():
        print(f"error: no test.tsv in {data}; pass --data DIR (GoEmotions)", file=sys.stderr)
        return 2
    try:
        check_model(args.model)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    texts, truth = load_split(data, "test")
    _, train_y = load_split(data, "train")
    prior = np.bincount(train_y, minlength=len(LABELS))
    rows = []
    for dtype in args.dtype:
        predicted, seconds, used = model_predict(
            texts, args.model, dtype, args.max_tokens, args.torch_threads
        )
        rows.append((f"{args.model} ({used.replace('torch.', '')})", scores(truth, predicted)))
        print(f"{args.model} {used}: {len(texts) / seconds:.0f} texts/s", file=sys.stderr)
    rows.append(
        (
            "majority class (train: %s)" % LABELS[int(prior.argmax())],
            scores(truth, np.full_like(truth, prior.argmax())),
        )
    )
    lexicon = nrc_lexicon()
    if lexicon is None:
        print(
            "note: NRCLex not installed (pip install NRCLex): no lexicon baseline", file=sys.stderr
        )
    else:
        rows.append(
            (
                f"NRC EmoLex word counts ({len(lexicon):,} words)",
                scores(truth, lexicon_predict(texts, lexicon, prior)),
            )
        )
    header = "| method | accuracy | macro-F1 | " + " | ".join(f"F1 {x}" for x in LABELS) + " |"
    lines = [
        f"GoEmotions test, single-Ekman-or-neutral examples: n = {len(truth):,}; "
        f"max_tokens {args.max_tokens}; {cpu()}",
        "",
        header,
        "|" + "---|" * (3 + len(LABELS)),
    ]
    for name, result in rows:
        f1 = " | ".join(f"{result['f1'].get(x, 0.0):.3f}" for x in LABELS)
        lines.append(f"| {name} | {result['accuracy']:.3f} | {result['macro_f1']:.3f} | {f1} |")
    table = "\n".join(lines)
    publish(table, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
