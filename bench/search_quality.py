"""Search quality: recall@10 of semantic search on a labelled query set, and what the
embeddings cost the emotions pass.

The corpus is N generated reviews (``samples.generate``, the pipelines' own parse and
clean), the text as the model reads it. Each query paraphrases a complaint or a praise
the generator writes in several wordings; a review is relevant when its text says it in
any of them (``QUERIES``: phrases matched case-insensitively). Queries and reviews are
embedded by the same network, so the table compares embeddings, exact nearest neighbours:

- ``base``: the general sentence encoder's embedding (all-MiniLM-L6-v2, as
  sentence-transformers computes it): the adapted top layers run again with base weights;
- ``tuned``: the emotion-adapted encoder's own mean embedding (free: one pass).

recall@10 = relevant reviews in the top 10 / min(10, relevant reviews), averaged over
queries. The cost columns time the emotion+embedding network alone (ONNX int8, one
thread, the pipeline's sub-batches) with and without the second pass over the top layers.

    python bench/search_quality.py --reviews 3000 [--markdown FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.machine import cpu, load  # noqa: E402

# query -> phrases (regular expressions) that make a review relevant to it
QUERIES: dict[str, tuple[str, ...]] = {
    "stopped working after a week": (
        r"broke after",
        r"gave out after",
        r"stopped working",
        r"failed on day one",
        r"unfortunately it broke",
    ),
    "smells like chemicals": (
        r"smells like cheap chemicals",
        r"smelled like mold",
        r"smell is so foul",
    ),
    "arrived dirty, looked used": (
        r"arrived dirty",
        r"already used it",
        r"clearly used",
        r"greasy fingerprints",
        r"sticky residue",
    ),
    "fire hazard, it overheats": (
        r"overheat",
        r"start a fire",
        r"sparks",
        r"burning smell",
    ),
    "customer service refused my refund": (
        r"refund and they refused",
        r"customer service ignored",
        r"nobody will take responsibility",
        r"want my money back",
    ),
    "a complete waste of money": (
        r"wasted my money",
        r"threw my money away",
        r"waste money",
        r"rip ?off",
    ),
    "the color faded quickly": (r"faded after",),
    "insects in the box": (r"bugs in the packaging",),
    "sharp edges, I cut myself": (r"edge is sharp",),
    "gave me an allergic reaction": (r"skin reacted",),
    "much smaller than I expected": (r"how small the", r"bigger than i thought"),
    "came much sooner than promised": (r"arrived a week early", r"arrived quickly"),
    "it looks fake, a counterfeit": (r"counterfeit", r"nothing like the listing", r"fake reviews"),
    "my kid cried when it broke": (r"cried when it stopped working",),
    "I love it, it makes me happy": (
        r"made me so happy",
        r"puts a smile on my face",
        r"so happy with",
        r"brings me so much joy",
        r"could not be happier",
    ),
    "bought extra ones as presents": (r"more as gifts",),
    "mediocre, nothing special": (
        r"average, nothing special",
        r"not bad, not great",
        r"okay for the price",
    ),
    "disappointed, I had high hopes": (
        r"so disappointed",
        r"such a letdown",
        r"had high hopes",
        r"such a disappointment",
        r"not what i hoped for",
    ),
}
MODES = ("base", "tuned", "shared")


def corpus(reviews: int, seed: int) -> list[str]:
    """The texts the model reads of ``reviews`` generated 2023 reviews (duplicates once)."""
    from samples.generate import iter_lines
    from transforms.clean import clean_review
    from transforms.emotion import model_text
    from transforms.parse import parse_record
    from transforms.records import RawRecord

    texts = []
    for number, line in enumerate(iter_lines("reviews", 2023, reviews, seed=seed)):
        review = clean_review(parse_record(RawRecord("bench", number, line)))
        text = model_text(review.title, review.text)
        if text:
            texts.append(text)
    return list(dict.fromkeys(texts))


def relevant(texts: Sequence[str]) -> dict[str, np.ndarray]:
    """Query -> indexes of the reviews relevant to it."""
    return {
        query: np.array(
            [i for i, t in enumerate(texts) if any(re.search(p, t, re.I) for p in phrases)]
        )
        for query, phrases in QUERIES.items()
    }


def encoder(embeddings: str, dtype: str, threads: int):
    """Texts -> L2-normalised embeddings [n x 384] by the shipped network with the given
    embedding mode, on ``dtype`` (the export is cached per mode)."""
    from tokenizers import Tokenizer

    from transforms import emotion_model as em

    artefact = Path(tempfile.mkdtemp(prefix=f"artefact-{embeddings}-"))
    for name in em.ARTEFACT_FILES:
        (artefact / name).write_bytes((em.ARTEFACT / name).read_bytes())
    config = json.loads((artefact / "config.json").read_text())
    (artefact / "config.json").write_text(json.dumps({**config, "embeddings": embeddings}))
    run = em.load_runner(dtype, threads, artefact=artefact)
    tokenizer = Tokenizer.from_file(str(em.base_dir() / "tokenizer.json"))
    tokenizer.enable_truncation(256)
    tokenizer.no_padding()

    def encode(texts: Sequence[str]) -> tuple[np.ndarray, float]:
        ids = [e.ids for e in tokenizer.encode_batch(list(texts))]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = np.zeros((len(ids), em.EMBEDDING_DIM), np.float32)
        started = time.perf_counter()
        for chunk in em.sub_batches(order, [len(x) for x in ids]):
            out[chunk] = run(*em.pad([ids[i] for i in chunk]))[1]
        return out, time.perf_counter() - started

    return encode


def recall_at(k: int, scores: np.ndarray, wanted: np.ndarray) -> float:
    """Relevant reviews among the top ``k`` / min(k, relevant reviews)."""
    top = np.argsort(-scores)[:k]
    return len(set(top.tolist()) & set(wanted.tolist())) / min(k, len(wanted))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reviews", type=int, default=3000, help="generated reviews")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--dtype", default="int8", help="int8, float32 or bfloat16")
    parser.add_argument("--markdown", help="append the results to this file")
    args = parser.parse_args(argv)
    texts = corpus(args.reviews, args.seed)
    wanted = relevant(texts)
    empty = [q for q, w in wanted.items() if len(w) == 0]
    if empty:
        parser.error(f"no relevant review for {empty}: generate more --reviews")
    queries = list(QUERIES)
    rows = {}
    for mode in MODES:
        encode = encoder(mode, args.dtype, 1)
        encode(texts[:64])  # warm-up: shapes, caches
        vectors, seconds = encode(texts)
        query_vectors, _ = encode(queries)
        recalls = {q: recall_at(10, vectors @ v, wanted[q]) for q, v in zip(queries, query_vectors)}
        rows[mode] = (recalls, len(texts) / seconds)
        print(
            f"{mode}: recall@10 {np.mean(list(recalls.values())):.3f}, {len(texts) / seconds:.0f} texts/s",
            flush=True,
        )
    lines = [
        f"{len(texts):,} distinct generated reviews (seed {args.seed}), {len(queries)} queries,"
        f" exact cosine top 10, network {args.dtype} on 1 thread; {cpu()}; load average before"
        f" {load()}",
        "",
        "| query | relevant | " + " | ".join(f"recall@10 {m}" for m in MODES) + " |",
        "|---|---:|" + "---:|" * len(MODES),
    ]
    for q in queries:
        cells = " | ".join(f"{rows[m][0][q]:.2f}" for m in MODES)
        lines.append(f"| {q} | {len(wanted[q])} | {cells} |")
    means = " | ".join(f"**{np.mean(list(rows[m][0].values())):.3f}**" for m in MODES)
    lines.append(f"| **mean** | | {means} |")
    speeds = " | ".join(f"{rows[m][1]:.0f}" for m in MODES)
    lines.append(f"| network texts/s (emotion + embedding) | | {speeds} |")
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        command = "python bench/search_quality.py " + " ".join(argv or sys.argv[1:])
        with open(args.markdown, "a", encoding="utf-8") as handle:
            handle.write(f"\n```\n{command}\n```\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
