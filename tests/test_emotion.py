"""Tests of ``transforms.emotion``: real models, real pipelines, no mocks, offline.

A tiny randomly initialised BERT classifier saved with ``save_pretrained`` exercises
the Hugging Face loading path; the shipped default model is run on unmistakable texts.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to, is_empty
from apache_beam.utils.timestamp import Timestamp

from transforms.emotion import (
    ClassifyEmotions,
    EmotionInput,
    EmotionModelError,
    EmotionModelHandler,
    LoadedEmotionModel,
    model_text,
)
from transforms.emotion_model import ARTEFACT, DEFAULT_MODEL, LABELS, sub_batches
from transforms.records import DeadLetter, EmotionResult, Review

ROOT = Path(__file__).resolve().parent.parent
WORDS = (
    "i love this best purchase ever so happy outrageous furious worst garbage "
    "the a is it and not good bad product works broke fine"
).split()


def review(review_id: str, text: Optional[str], title: Optional[str] = None, line: int = 1):
    """A canonical Review with only the fields emotion classification reads set meaningfully."""
    return Review(
        review_id=review_id,
        reviewer_id="R",
        asin="A",
        parent_asin=None,
        reviewer_name=None,
        rating=5.0,
        title=title,
        text=text,
        helpful_votes=None,
        total_votes=None,
        verified=None,
        reviewed_at=Timestamp(0),
        images=[],
        style=None,
        source_format=2023,
        source="reviews.jsonl",
        line=line,
    )


def tiny_model(directory: Path, max_position_embeddings: int = 512) -> str:
    """Save a randomly initialised 7-label BERT classifier and its WordPiece tokenizer."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'")
    tokens = specials + WORDS + letters + [f"##{c}" for c in letters]
    tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(tokens)})
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokens),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=max_position_embeddings,
        id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)},
    )
    BertForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny_short(tmp_path_factory) -> str:
    """A model that only accepts 16 positions: longer inputs make its forward raise."""
    return tiny_model(tmp_path_factory.mktemp("tiny_short"), max_position_embeddings=16)


def counter(result, name: str) -> int:
    """An emotion counter (``emotion_<name>`` in the project's metrics namespace)."""
    found = result.metrics().query(MetricsFilter().with_name(f"emotion_{name}"))["counters"]
    return sum(c.committed for c in found)


def valid_result(expected_ids, model: str):
    """Matcher: one well-formed EmotionResult per expected review id."""

    def check(results):
        assert sorted(r.review_id for r in results) == sorted(expected_ids)
        for r in results:
            assert isinstance(r, EmotionResult)
            assert r.model == model
            assert set(r.scores) == set(LABELS)
            assert r.label in LABELS and r.score == max(r.scores.values())
            assert math.isclose(sum(r.scores.values()), 1.0, rel_tol=1e-4)

    return check


def test_tiny_model_labels_batches_and_long_text(tiny):
    reviews = [review(f"r{i}", f"i love this product {i}", title="good") for i in range(21)]
    reviews.append(review("long", "the worst garbage ever, " * 900))  # ~21k characters
    p = TestPipeline()
    out = (
        p
        | beam.Create(reviews)
        | ClassifyEmotions(model=tiny, max_tokens=32, min_batch_size=4, max_batch_size=8)
    )
    assert_that(out.emotions, valid_result([r.review_id for r in reviews], tiny))
    assert_that(out.dead_letters, is_empty(), label="NoDeadLetters")
    result = p.run()
    result.wait_until_finish()
    assert counter(result, "classified") == 22
    sizes = result.metrics().query(MetricsFilter().with_name("inference_request_batch_size"))
    batch_sizes = [d.committed for d in sizes["distributions"]]
    assert batch_sizes and all(1 <= d.max <= 8 for d in batch_sizes)
    assert sum(d.sum for d in batch_sizes) == 22


def test_truncation_and_length_sorted_sub_batches(tiny):
    model = LoadedEmotionModel(tiny, "cpu", max_tokens=24, torch_threads=1)
    ids = model.token_ids(["i love this", "bad " * 20000])
    assert len(ids[0]) == 5 and len(ids[1]) == 24  # [CLS] i love this [SEP]; clipped
    batch = [EmotionInput(f"r{i}", None, None, "good " * (i % 7 + 1)) for i in range(30)]
    results = model.classify(batch)
    assert [r.result.review_id for r in results] == [b.review_id for b in batch]  # in order
    lengths = [3, 9, 4, 8, 4, 9]
    chunks = list(sub_batches(sorted(range(6), key=lengths.__getitem__), lengths))
    assert [i for c in chunks for i in c] == [0, 2, 4, 3, 1, 5]


def test_reviews_without_text_are_counted_and_skipped(tiny):
    reviews = [
        review("ok", "works fine"),
        review("none", None, title="a title alone is not a review"),
        review("blank", "   \n "),
    ]
    p = TestPipeline()
    out = p | beam.Create(reviews) | ClassifyEmotions(model=tiny)
    assert_that(out.emotions | beam.Map(lambda r: r.review_id), equal_to(["ok"]))
    assert_that(out.dead_letters, is_empty(), label="NoDeadLetters")
    result = p.run()
    result.wait_until_finish()
    assert counter(result, "skipped_no_text") == 2
    assert counter(result, "reviews") == 3


def test_failed_inference_becomes_dead_letter_and_spares_batch_mates(tiny_short):
    reviews = [review(f"short{i}", "i love it", line=i) for i in range(5)]
    reviews.append(review("long", "the product broke and it is garbage " * 10, line=99))
    p = TestPipeline()
    out = (
        p
        | beam.Create(reviews)
        | ClassifyEmotions(
            model=tiny_short, max_tokens=64, min_batch_size=6, max_batch_size=6, pipeline_name="t"
        )
    )
    assert_that(out.emotions, valid_result([f"short{i}" for i in range(5)], tiny_short))

    def check_dead(letters):
        assert len(letters) == 1
        letter = letters[0]
        assert isinstance(letter, DeadLetter)
        assert (letter.pipeline, letter.stage, letter.source, letter.line) == (
            "t",
            "emotion",
            "reviews.jsonl",
            99,
        )
        assert json.loads(letter.raw)["review_id"] == "long"
        assert letter.error and "\n" not in letter.error

    assert_that(out.dead_letters, check_dead, label="DeadLetters")
    result = p.run()
    result.wait_until_finish()
    assert counter(result, "dead_letters") == 1


def test_a_text_the_tokenizer_refuses_fails_alone(tiny):
    model = LoadedEmotionModel(tiny, "cpu", max_tokens=24, torch_threads=1)
    batch = [
        EmotionInput("ok1", None, None, "i love it"),
        EmotionInput("bad", None, None, "lone \ud800 surrogate"),
        EmotionInput("ok2", None, None, "terrible"),
    ]
    results = model.classify(batch)
    assert [type(r).__name__ for r in results] == [
        "Classified",
        "InferenceFailure",
        "Classified",
    ]
    assert results[1].item.review_id == "bad" and results[1].error


def test_whole_failed_batch_from_run_inference_becomes_one_failure_per_review():
    """A batch whose inference fails as a whole (here the model is missing) gives one
    failure per review, never an exception that would stop the run."""
    batch = [EmotionInput("a", "s", 1, "x"), EmotionInput("b", "s", 2, "y")]
    failures = list(EmotionModelHandler().run_inference(batch, None))
    assert [f.item.review_id for f in failures] == ["a", "b"]
    assert failures[0].error.startswith("AttributeError")


def test_default_model_on_unmistakable_texts():
    reviews = [
        review("joy1", "I absolutely love this, best purchase ever, so happy!"),
        review("joy2", "Thank you so much, my kids adore it. Wonderful gift!", title="Great"),
        review("anger", "I am so angry. They ignored me and I hate this stupid company."),
        review("sadness", "I'm so sad, it broke my heart"),
        review("fear", "I am terrified, this is scary"),
        # The head reads "garbage" as disgust (GoEmotions' anger/disgust line is thin):
        # assert only that it is one of the two.
        review("hostile", "This is outrageous, I am furious, worst garbage ever"),
    ]
    with TestPipeline() as p:
        out = p | beam.Create(reviews) | ClassifyEmotions()
        labels = out.emotions | beam.Map(
            lambda r: (
                r.review_id,
                r.model,
                (
                    "anger|disgust"
                    if r.review_id == "hostile" and r.label in ("anger", "disgust")
                    else r.label
                ),
            )
        )
        assert_that(
            labels,
            equal_to(
                [
                    ("joy1", DEFAULT_MODEL, "joy"),
                    ("joy2", DEFAULT_MODEL, "joy"),
                    ("anger", DEFAULT_MODEL, "anger"),
                    ("sadness", DEFAULT_MODEL, "sadness"),
                    ("fear", DEFAULT_MODEL, "fear"),
                    ("hostile", DEFAULT_MODEL, "anger|disgust"),
                ]
            ),
        )
        assert_that(out.dead_letters, is_empty(), label="NoDeadLetters")


def test_default_model_ships_small_with_labels_and_its_measured_test_metrics():
    config = json.loads((ARTEFACT / "config.json").read_text())
    assert tuple(config["labels"]) == LABELS
    for dtype in ("float32", "int8"):
        test = config["metrics"][f"test {dtype}"]
        assert test["accuracy"] >= 0.66 and test["macro_f1"] >= 0.57, (dtype, test)
    assert sum(f.stat().st_size for f in ARTEFACT.iterdir()) < 1_000_000


@pytest.mark.parametrize(
    "model",
    ["/no/such/model/dir", "./missing-model", "nobody-has-this/emotion-model-xyz"],
)
def test_unloadable_model_is_a_one_line_error_naming_the_fixes(model, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EmotionModelError) as caught:
        ClassifyEmotions(model=model)
    message = str(caught.value)
    assert "\n" not in message and model in message
    assert "--model minilm-lora-goemotions-ekman" in message and "--model PATH" in message


def test_unreachable_hub_fails_fast_without_offline_flag(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with pytest.raises(EmotionModelError, match="--model minilm-lora-goemotions-ekman"):
        ClassifyEmotions(model="nobody-has-this/emotion-model-xyz")


def test_hub_id_found_in_the_offline_cache(tiny, tmp_path):
    """A hub id resolves from the Hugging Face cache with HF_HUB_OFFLINE=1 (fresh process:
    huggingface_hub reads its cache location at import)."""
    snapshot = tmp_path / "models--someone--tiny-emotions" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    code = (
        "from transforms.emotion import *\n"
        "from transforms.emotion_model import LABELS\n"
        "check_model('someone/tiny-emotions')\n"
        "m = LoadedEmotionModel('someone/tiny-emotions', 'cpu', 32, 1)\n"
        "r = m.classify([EmotionInput('r', None, None, 'i love it')])[0].result\n"
        "print(r.model, sorted(r.scores) == sorted(LABELS))\n"
    )
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path), HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["someone/tiny-emotions", "True"]


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(EmotionModelError, match="no config.json"):
        ClassifyEmotions(model=str(tmp_path))


def test_model_text_and_handler_settings():
    assert model_text("Great", "works.") == "Great. works."
    assert model_text("Great!", "works.") == "Great! works."
    assert model_text(None, " works ") == "works"
    assert model_text("title", None) is None and model_text("title", "  ") is None
    handler = EmotionModelHandler(min_batch_size=3, max_batch_size=5)
    assert handler.batch_elements_kwargs() == {"min_batch_size": 3, "max_batch_size": 5}
    assert not handler.share_model_across_processes()  # one copy per process, shared by threads


def test_emotions_summary_accounts_for_reviews_without_text():
    """read = upserted + dead letters + skipped: the summary says where every review went."""
    from pipelines.lifecycle import RunResult

    counters = {
        "records_read": 161,
        "emotion_reviews": 161,
        "review_emotions_upserted": 158,
        "emotion_skipped_no_text": 3,
    }
    text = RunResult("emotions", "id", "FnApiRunner", "DONE", counters, 1.0, "review_emotions")
    lines = text.format().splitlines()
    assert any(line.split()[:2] == ["skipped", "3"] for line in lines), lines


def test_a_lone_surrogate_in_a_python_literal_line_cannot_stop_an_inline_emotion_run(
    tiny, datalake, tmp_path
):
    """Python literals may hold a lone surrogate, which Beam's coders, Postgres and the
    tokenizer all refuse: parse makes it U+FFFD, so the review lands and gets its emotion."""
    from conftest import query
    from pipelines import reviews as reviews_pipeline

    good = json.dumps(
        {"reviewerID": "A1", "asin": "B1", "reviewText": "I love it", "overall": 5.0,
         "helpful": [0, 0], "summary": "ok", "unixReviewTime": 1400000000}
    )  # fmt: skip
    literal = (
        "{'reviewerID': 'A2', 'asin': 'B1', 'helpful': [0, 0], 'reviewText': 'bad \\ud800 text',"
        " 'overall': 4.0, 'summary': 'meh', 'unixReviewTime': 1400000000}"
    )
    path = tmp_path / "reviews.json"
    path.write_text(good + "\n" + literal + "\n")
    summary = reviews_pipeline.run(
        ["--dsn", datalake, "--input", str(path), "--emotions", "--model", tiny]
    )
    assert summary.state == "DONE" and (summary.upserted, summary.dead_letters) == (2, 0)
    assert query(datalake, "SELECT text FROM reviews WHERE reviewer_id = 'A2'") == [
        ("bad \ufffd text",)
    ]
    assert query(datalake, "SELECT count(*) FROM review_emotions") == [(2,)]


def goemotions_folder(folder: Path) -> Path:
    """A small folder in the GoEmotions layout (emotions.txt, the Ekman mapping, tsv splits)."""
    names = ["anger", "disgust", "fear", "joy", "sadness", "surprise", "neutral"]
    folder.mkdir()
    (folder / "emotions.txt").write_text("\n".join(names) + "\n")
    mapping = {name: [name] for name in names if name != "neutral"}
    (folder / "ekman_mapping.json").write_text(json.dumps(mapping))
    phrases = {
        "anger": "this makes me furious and angry",
        "disgust": "gross, disgusting, it made me sick",
        "fear": "i am scared and afraid of it",
        "joy": "i love it, so happy and thrilled",
        "sadness": "so sad, i cried all day",
        "surprise": "wow, i did not expect that at all",
        "neutral": "it is a box with a lid",
    }
    for split, count in (("train", 12), ("dev", 4), ("test", 4)):
        lines = [
            f"{phrases[name]} number {i}\t{names.index(name)}\tid{split}{i}"
            for i in range(count)
            for name in names
        ]
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return folder


def test_train_emotions_writes_an_artefact_the_pipeline_loads_and_prints_its_table(tmp_path):
    data = goemotions_folder(tmp_path / "goemotions")
    output = tmp_path / "artefact"
    argv = ["--data", str(data), "--output", str(output), "--epochs", "1", "--threads", "1"]
    done = subprocess.run(
        [sys.executable, "-m", "pipelines", "train-emotions", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("| split | accuracy | macro-F1 | F1 anger")
    assert [line.split(" | ")[0] for line in lines[2:7]] == [
        "| dev float32",
        "| test float32",
        "| dev int8",
        "| test int8",
        "| test, majority class",
    ]
    config = json.loads((output / "config.json").read_text())
    assert config["training"]["examples"] == {"train": 84, "dev": 28}
    assert set(config["metrics"]) >= {"test float32", "test int8"}
    loaded = LoadedEmotionModel(DEFAULT_MODEL, "cpu", 64, 1, "float32", output)
    (found,) = loaded.classify([EmotionInput("r", None, None, "i love it, so happy")])
    assert found.result.label in LABELS and len(found.embedding) == 384
    missing = subprocess.run(
        [sys.executable, "-m", "pipelines", "train-emotions", "--data", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and "lacks" in missing.stderr


def test_train_emotions_without_the_train_extra_is_one_line_naming_it(tmp_path):
    hidden = tmp_path / "peft"  # shadows the installed package: as if it were not there
    hidden.mkdir()
    (hidden / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'peft'\", name='peft')\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    done = subprocess.run(
        [sys.executable, "-m", "pipelines", "train-emotions", "--data", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [line for line in done.stderr.splitlines() if "peft" in line]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert len(lines) == 1 and "pip install -e '.[train]'" in lines[0]
