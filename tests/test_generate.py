"""Tests for the synthetic dataset generator and the bundled samples built with it."""

from __future__ import annotations

import argparse
import time
import sys
import subprocess
import signal
import ast
import datetime
import gzip
import json
import re
import statistics
from pathlib import Path

import pytest

from samples import generate
from samples.generate import FORMATS, asin_for, iter_lines, write_dataset

SAMPLES = Path(generate.__file__).resolve().parent

KEYS_2014 = [
    "reviewerID",
    "asin",
    "reviewerName",
    "helpful",
    "reviewText",
    "overall",
    "summary",
    "unixReviewTime",
    "reviewTime",
]
KEYS_2018_REVIEW = {
    "overall",
    "vote",
    "verified",
    "reviewTime",
    "reviewerID",
    "asin",
    "style",
    "reviewerName",
    "reviewText",
    "summary",
    "unixReviewTime",
    "image",
}
KEYS_2023_REVIEW = [
    "rating",
    "title",
    "text",
    "images",
    "asin",
    "parent_asin",
    "user_id",
    "timestamp",
    "helpful_vote",
    "verified_purchase",
]
KEYS_2018_META = [
    "category",
    "tech1",
    "description",
    "fit",
    "title",
    "also_buy",
    "tech2",
    "brand",
    "feature",
    "rank",
    "also_view",
    "details",
    "main_cat",
    "similar_item",
    "date",
    "price",
    "asin",
]
KEYS_2023_META = [
    "main_category",
    "title",
    "average_rating",
    "rating_number",
    "features",
    "description",
    "price",
    "images",
    "videos",
    "store",
    "categories",
    "details",
    "parent_asin",
    "bought_together",
]
KEYS_2014_META = {
    "asin",
    "title",
    "price",
    "imUrl",
    "related",
    "salesRank",
    "categories",
    "brand",
    "description",
}


def _day_text(seconds: int) -> str:
    day = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return f"{day.month:02d} {day.day}, {day.year}"


def _lines(kind: str, fmt: int, count: int, seed: int = 0) -> list[str]:
    return list(iter_lines(kind, fmt, count, seed))


# --- determinism and output files ------------------------------------------------------


@pytest.mark.parametrize("name", ["out.json.gz", "out.json"])
def test_same_arguments_give_identical_bytes(tmp_path, name):
    first, second = tmp_path / "a" / name, tmp_path / "b" / name
    assert write_dataset("reviews", 2018, 3000, str(first), seed=7) == 3000
    assert write_dataset("reviews", 2018, 3000, str(second), seed=7) == 3000
    assert first.read_bytes() == second.read_bytes()
    other = tmp_path / "c" / name
    write_dataset("reviews", 2018, 3000, str(other), seed=8)
    assert other.read_bytes() != first.read_bytes()


@pytest.mark.parametrize("kind", ["reviews", "products"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_iter_lines_is_deterministic_and_exact_in_count(kind, fmt):
    lines = _lines(kind, fmt, 300, seed=3)
    assert lines == _lines(kind, fmt, 300, seed=3)
    assert len(lines) == 300
    assert not any("\n" in line for line in lines)


@pytest.mark.parametrize("kind", ["reviews", "products"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_lines_are_exactly_what_json_dumps_or_repr_writes(kind, fmt):
    """Review lines are assembled by hand for speed; they must match json.dumps byte for byte."""
    for line in iter_lines(kind, fmt, 3000, seed=6):
        if kind == "products" and fmt == 2014:
            assert repr(ast.literal_eval(line)) == line
        else:
            assert json.dumps(json.loads(line)) == line


def test_gz_output_is_gzip_and_plain_output_is_not(tmp_path):
    packed, plain = tmp_path / "deep" / "dir" / "r.json.gz", tmp_path / "r.json"
    write_dataset("products", 2023, 200, str(packed), seed=1)
    write_dataset("products", 2023, 200, str(plain), seed=1)
    assert packed.read_bytes()[:2] == b"\x1f\x8b"
    assert plain.read_bytes()[:2] != b"\x1f\x8b"
    text = gzip.decompress(packed.read_bytes())
    assert text == plain.read_bytes()
    assert text.endswith(b"\n") and text.count(b"\n") == 200
    assert text.decode("ascii").split("\n")[:-1] == _lines("products", 2023, 200, seed=1)


def test_zero_count_writes_an_empty_file(tmp_path):
    out = tmp_path / "empty.json.gz"
    assert write_dataset("reviews", 2014, 0, str(out)) == 0
    assert gzip.decompress(out.read_bytes()) == b""


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="kind"):
        iter_lines("ratings", 2018, 1)
    with pytest.raises(ValueError, match="format"):
        iter_lines("reviews", 2019, 1)
    with pytest.raises(ValueError, match="count"):
        iter_lines("reviews", 2018, -1)


def test_cli_arguments_and_summary_line(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    generate.add_arguments(parser)
    out = tmp_path / "out.json.gz"
    args = parser.parse_args(["reviews", "--format", "2018", "--count", "25", "--output", str(out)])
    assert args.seed == 0
    assert generate.main(args) == 0
    assert capsys.readouterr().out.strip() == f"wrote 25 reviews (2018) to {out}"
    assert gzip.decompress(out.read_bytes()).count(b"\n") == 25
    with pytest.raises(SystemExit):
        parser.parse_args(["reviews", "--format", "2019", "--count", "1", "--output", "x"])


# --- reviews ---------------------------------------------------------------------------


def test_2014_reviews_are_strict_json_in_the_fixed_key_order():
    lines = _lines("reviews", 2014, 4000)
    without_name = 0
    for line in lines:
        record = json.loads(line)
        keys = list(record)
        if "reviewerName" not in record:
            without_name += 1
            keys.insert(2, "reviewerName")
        assert keys == KEYS_2014
        assert re.search(r'"overall": [1-5]\.0,', line)
        assert isinstance(record["overall"], float)
        assert record["unixReviewTime"] % 86400 == 0
        assert record["reviewTime"] == _day_text(record["unixReviewTime"])
        assert re.fullmatch(r"\d\d [1-9]\d?, \d{4}", record["reviewTime"])
        yes, total = record["helpful"]
        assert 0 <= yes <= total
        assert len(record["asin"]) == 10
        assert re.fullmatch(r"A[0-9A-Z]{12,13}", record["reviewerID"])
    assert without_name > 0


def test_2018_reviews_vary_key_order_and_keep_their_quirks():
    lines = _lines("reviews", 2018, 4000)
    orders, votes, styles = set(), 0, 0
    for line in lines:
        record = json.loads(line)
        assert set(record) <= KEYS_2018_REVIEW
        assert {"overall", "verified", "reviewTime", "reviewerID", "asin"} <= set(record)
        orders.add(tuple(k for k in record if k in ("overall", "reviewerID", "verified")))
        assert isinstance(record["verified"], bool)
        assert '"verified": true' in line or '"verified": false' in line
        assert record["unixReviewTime"] % 86400 == 0
        assert record["reviewTime"] == _day_text(record["unixReviewTime"])
        if "vote" in record:
            votes += 1
            assert isinstance(record["vote"], str)
            assert re.fullmatch(r"[1-9]\d{0,2}(,\d{3})*", record["vote"])
        if "style" in record:
            styles += 1
            assert record["style"]
            for key, value in record["style"].items():
                assert key.endswith(":") and value.startswith(" ")
        for url in record.get("image", []):
            assert url.startswith("https://images-na.ssl-images-amazon.com/images/I/")
    assert len(orders) >= 4
    assert 0.07 <= votes / len(lines) <= 0.24
    assert styles > 0
    assert any('"vote": "' in line and re.search(r'"vote": "\d+,\d{3}"', line) for line in lines)
    assert any("reviewText" not in json.loads(line) for line in _lines("reviews", 2018, 6000))


def test_2023_reviews_have_the_documented_fields_and_millisecond_times():
    lines = _lines("reviews", 2023, 4000)
    not_midnight = 0
    for line in lines:
        record = json.loads(line)
        assert list(record) == KEYS_2023_REVIEW
        assert isinstance(record["rating"], float) and 1.0 <= record["rating"] <= 5.0
        assert len(str(record["timestamp"])) == 13
        not_midnight += record["timestamp"] % 86_400_000 != 0
        assert re.fullmatch(r"A[A-Z2-7]{27}", record["user_id"])
        assert type(record["helpful_vote"]) is int
        assert isinstance(record["verified_purchase"], bool)
        assert len(record["asin"]) == 10 and len(record["parent_asin"]) == 10
        for image in record["images"]:
            assert set(image) == {
                "small_image_url",
                "medium_image_url",
                "large_image_url",
                "attachment_type",
            }
    assert not_midnight > 0.99 * len(lines)
    assert any(json.loads(line)["asin"] != json.loads(line)["parent_asin"] for line in lines)


def _text(fmt: int, line: str) -> str:
    record = json.loads(line)
    return record.get("text" if fmt == 2023 else "reviewText", "")


@pytest.mark.parametrize("fmt", FORMATS)
def test_review_texts_have_realistic_lengths(fmt):
    texts = [_text(fmt, line) for line in iter_lines("reviews", fmt, 20_000, seed=11)]
    assert 350 <= statistics.mean(map(len, texts[:5000])) <= 700
    assert max(map(len, texts)) > 3000
    assert max(map(len, texts)) <= generate.MAX_TEXT_CHARS + 200  # room for one quirk


def test_review_texts_carry_an_emotion_that_fits_the_rating():
    happy = re.compile(r"love|happ|thrill|delight|wonderful|joy|pleas|glad|perfect|grin|favorite")
    unhappy = re.compile(
        r"furious|angry|ripoff|rip off|scam|livid|garbage|junk|mad|outrage|fuming|annoyed|"
        r"disgust|gross|revolting|nasty|yuck|vile|repulsive|foul|nause|sick|ew,|"
        r"disappoint|sad|let down|letdown|regret|shame|heartbreak|bummed|miss|upset|"
        r"worr|scared|afraid|nervous|panic|frighten|anxious|terrified|scary|unsafe|unacceptable"
    )
    five, one = [], []
    for line in iter_lines("reviews", 2018, 6000, seed=5):
        record = json.loads(line)
        text = record.get("reviewText", "").lower()
        if record["overall"] == 5.0:
            five.append(bool(happy.search(text)))
        elif record["overall"] == 1.0:
            one.append(bool(unhappy.search(text)) and not happy.search(text.split(".")[0]))
    assert sum(five) / len(five) > 0.8
    assert sum(one) / len(one) > 0.8


def test_texts_carry_real_world_quirks():
    joined_2014 = "\n".join(_lines("reviews", 2014, 20_000, seed=2))
    assert "&quot;" in joined_2014 and "&amp;" in joined_2014
    assert "\\u0003" in joined_2014
    assert "\\t" in joined_2014
    joined_2018 = "\n".join(_lines("reviews", 2018, 5000))
    assert "&nbsp;" in joined_2018 and '<a data-hook=\\"product-link-linked\\"' in joined_2018
    assert '<div id=\\"video-block-' in joined_2018 and "\\n" in joined_2018
    assert "<br />" in "\n".join(_lines("reviews", 2023, 2000))


@pytest.mark.parametrize("fmt", FORMATS)
def test_about_two_percent_of_review_lines_are_exact_duplicates(fmt):
    lines = _lines("reviews", fmt, 5000)
    share = (len(lines) - len(set(lines))) / len(lines)
    assert 0.01 <= share <= 0.035


# --- products --------------------------------------------------------------------------


def test_2014_metadata_is_python_literals_not_json():
    lines = _lines("products", 2014, 2000)
    orders = set()
    missing = {key: 0 for key in ("title", "related", "brand", "description")}
    for line in lines:
        with pytest.raises(ValueError):
            json.loads(line)
        record = ast.literal_eval(line)
        assert isinstance(record, dict)
        assert set(record) <= KEYS_2014_META and next(iter(record)) == "asin"
        orders.add(tuple(record))
        for key in missing:
            missing[key] += key not in record
        assert all(isinstance(path, list) for path in record["categories"])
        assert isinstance(record.get("price", 0.0), float)
        assert isinstance(record.get("description", ""), str)
        assert isinstance(record.get("salesRank", {}), dict)
        assert line.isascii()
    assert len(orders) > 3
    assert all(missing.values())
    assert any("\"Burt's Bees" in line or "\"D'Addario" in line for line in lines)


def test_2018_metadata_has_every_key_and_both_image_variants():
    lines = _lines("products", 2018, 2000)
    variants = {"image": 0, "imageURL": 0}
    prices, ranks = set(), set()
    for line in lines:
        record = json.loads(line)
        if "image" in record:
            variants["image"] += 1
            expected = KEYS_2018_META[:6] + ["image"] + KEYS_2018_META[6:]
        else:
            variants["imageURL"] += 1
            expected = KEYS_2018_META + ["imageURL", "imageURLHighRes"]
            assert len(record["imageURL"]) == len(record["imageURLHighRes"])
        assert list(record) == expected
        assert None not in record.values()
        assert isinstance(record["price"], str) and isinstance(record["description"], list)
        assert isinstance(record["details"], dict)
        price = record["price"]
        prices.add(
            "empty"
            if price == ""
            else (
                "comma"
                if re.fullmatch(r"\$\d{1,3}(,\d{3})+\.\d\d", price)
                else "plain" if re.fullmatch(r"\$\d+\.\d\d", price) else "garbage"
            )
        )
        rank = record["rank"]
        assert isinstance(rank, (str, list))
        ranks.add("str" if isinstance(rank, str) else "list" if rank else "empty")
        if isinstance(rank, str):
            assert rank.endswith(" (")
        else:
            assert all(item.startswith(">#") for item in rank)
    assert prices == {"empty", "plain", "comma", "garbage"}
    assert ranks == {"str", "list", "empty"}
    assert 0.4 <= variants["image"] / len(lines) <= 0.6
    joined = "\n".join(lines)
    for quirk in (
        '<span class=\\"a-size-medium a-color-secondary\\"',
        "</span></span></span>",
        "&amp;",
        "&#39;",
        '"title": " ',
        "background-color",
        "\\n    Product Dimensions: \\n    ",
    ):
        assert quirk in joined, quirk


def test_2023_metadata_uses_the_official_key_order_nulls_and_escapes():
    lines = _lines("products", 2023, 2000)
    nested = escaped = null_price = 0
    for line in lines:
        assert line.isascii()
        record = json.loads(line)
        assert list(record) == KEYS_2023_META
        assert record["bought_together"] is None
        null_price += record["price"] is None
        escaped += "\\u" in line
        nested += any(isinstance(value, dict) for value in record["details"].values())
        for image in record["images"]:
            assert list(image) == ["thumb", "large", "variant", "hi_res"]
    assert null_price > len(lines) / 2
    assert escaped > 0 and nested > 0
    assert len({json.loads(line)["parent_asin"] for line in lines}) == len(lines)


# --- asins -----------------------------------------------------------------------------


def test_asins_are_ten_characters_of_both_kinds_and_distinct():
    asins = [asin_for(i) for i in range(50_000)]
    assert len(set(asins)) == len(asins)
    assert all(len(asin) == 10 for asin in asins)
    isbn = [a for a in asins if re.fullmatch(r"\d{9}[\dX]", a)]
    bcode = [a for a in asins if re.fullmatch(r"B0[0-9A-Z]{8}", a)]
    assert len(isbn) + len(bcode) == len(asins)
    assert 0.1 < len(isbn) / len(asins) < 0.3


@pytest.mark.parametrize("fmt", FORMATS)
def test_reviews_reference_products_of_a_matching_products_file(fmt):
    products = set()
    for line in iter_lines("products", fmt, 260, seed=4):
        record = ast.literal_eval(line) if fmt == 2014 else json.loads(line)
        products.add(record.get("parent_asin") or record["asin"])
    referenced = set()
    for line in iter_lines("reviews", fmt, 1000, seed=9):
        record = json.loads(line)
        referenced.add(record.get("parent_asin") or record["asin"])
    assert referenced <= products
    assert len(referenced) > 50


# --- bundled samples -------------------------------------------------------------------


def _sample_lines(path: Path) -> list[str]:
    raw = path.read_bytes()
    if path.name.endswith(".gz"):
        raw = gzip.decompress(raw)
    text = raw.decode("utf-8")
    assert text.endswith("\n")
    return text[:-1].split("\n")


def _readme_malformed() -> dict:
    readme = (SAMPLES / "README.md").read_text()
    section = readme.split("## Malformed lines", 1)[1].split("\n## ", 1)[0]
    found: dict = {}
    for name, number in re.findall(r"^\| `([^`]+)` \| (\d+) \|", section, re.MULTILINE):
        found.setdefault(name, []).append(int(number))
    return found


SAMPLE_FILES = [
    "reviews_Musical_Instruments_5.json.gz",
    "meta_Musical_Instruments.json.gz",
    "All_Beauty_5.json.gz",
    "meta_Gift_Cards.json",
    "All_Beauty.jsonl",
    "meta_All_Beauty.jsonl.gz",
]


def test_samples_exist_and_stay_small():
    sizes = [(SAMPLES / name).stat().st_size for name in SAMPLE_FILES]
    assert sum(sizes) < 200_000
    for name in SAMPLE_FILES:
        records = [line for line in _sample_lines(SAMPLES / name) if line]
        assert 30 <= len(records) <= 80, name


def test_readme_lists_exactly_two_malformed_lines():
    from samples import make as make_samples

    malformed = _readme_malformed()
    assert sum(len(numbers) for numbers in malformed.values()) == 2
    assert malformed == make_samples.MALFORMED


@pytest.mark.parametrize("name", SAMPLE_FILES)
def test_sample_lines_are_valid_except_the_documented_malformed_ones(name):
    malformed = _readme_malformed().get(name, [])
    for number, line in enumerate(_sample_lines(SAMPLES / name), start=1):
        if number in malformed:
            with pytest.raises(ValueError):
                json.loads(line)
            with pytest.raises((ValueError, SyntaxError)):
                ast.literal_eval(line)
            continue
        if not line:
            continue  # blank lines are skipped by readers, not errors
        if name.startswith("meta_Musical_Instruments"):
            with pytest.raises(ValueError):
                json.loads(line)
            assert isinstance(ast.literal_eval(line), dict)
        else:
            assert isinstance(json.loads(line), dict), (name, number)


def test_sample_reviews_join_to_sample_products():
    pairs = [
        ("reviews_Musical_Instruments_5.json.gz", "meta_Musical_Instruments.json.gz"),
        ("All_Beauty_5.json.gz", "meta_Gift_Cards.json"),
        ("All_Beauty.jsonl", "meta_All_Beauty.jsonl.gz"),
    ]
    for reviews, products in pairs:
        known = set()
        for line in _sample_lines(SAMPLES / products):
            if line:
                record = ast.literal_eval(line) if "Musical" in products else json.loads(line)
                known.add(record.get("parent_asin") or record["asin"])
        malformed = _readme_malformed().get(reviews, [])
        for number, line in enumerate(_sample_lines(SAMPLES / reviews), start=1):
            if line and number not in malformed:
                record = json.loads(line)
                assert (record.get("parent_asin") or record["asin"]) in known, (reviews, number)


def test_samples_hold_the_documented_real_lines():
    reviews_2014 = _sample_lines(SAMPLES / "reviews_Musical_Instruments_5.json.gz")
    first = json.loads(reviews_2014[0])
    assert (first["reviewerID"], first["asin"], first["helpful"]) == (
        "A2SUAM1J3GNN3B",
        "0000013714",
        [2, 3],
    )
    assert any("\\u0003" in line for line in reviews_2014)
    assert len(reviews_2014) > len(set(reviews_2014))  # exact duplicates
    meta_2014 = _sample_lines(SAMPLES / "meta_Musical_Instruments.json.gz")
    assert any("'title': \"Don't Drink His Blood\"" in line for line in meta_2014)
    meta_2018 = _sample_lines(SAMPLES / "meta_Gift_Cards.json")
    assert any('"Maggiano&#39;s Gift Card ' in line for line in meta_2018)
    assert any('"price": ".a-box-inner{background-color:#fff}' in line for line in meta_2018)
    assert "" in meta_2018
    official = json.loads(_sample_lines(SAMPLES / "All_Beauty.jsonl")[0])
    assert official["user_id"] == "AGKHLEW2SOWHNMFQIJGBECAF7INQ"
    assert official["timestamp"] == 1588687728923


def test_samples_are_reproducible_from_make_samples():
    from samples import make as make_samples

    built = make_samples._build()
    assert sorted(built) == sorted(SAMPLE_FILES)
    for name, lines in built.items():
        assert _sample_lines(SAMPLES / name) == lines, name


def test_ctrl_c_leaves_no_half_written_file_and_says_so(tmp_path):
    out = tmp_path / "big.json.gz"
    child = subprocess.Popen(
        [sys.executable, "-m", "pipelines", "generate", "reviews", "--format", "2018"]
        + ["--count", "50000000", "--output", str(out)],
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while not list(tmp_path.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.1)  # the hidden partial file: writing has begun
    child.send_signal(signal.SIGINT)
    output, _ = child.communicate(timeout=60)
    assert child.returncode == 130, output
    assert output.strip().splitlines() == ["interrupted: nothing was left half-done"]
    assert list(tmp_path.iterdir()) == []
