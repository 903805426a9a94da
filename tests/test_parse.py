"""Parse: decoding each generation's lines, generation detection, dead letters."""

from __future__ import annotations

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from transforms.parse import ParseError, ParseRecords, decode, detect
from transforms.records import RawRecord

# Literal lines as FORMATS.md quotes them (shortened where only the shape matters).
REVIEW_2014 = (
    '{"reviewerID": "A2SUAM1J3GNN3B", "asin": "0000013714", "reviewerName": "J. McDonald",'
    ' "helpful": [2, 3], "reviewText": "I bought this for my husband.", "overall": 5.0,'
    ' "summary": "Heavenly Highway Hymns", "unixReviewTime": 1252800000,'
    ' "reviewTime": "09 13, 2009"}'
)
META_2014 = (
    "{'asin': '0000031852', 'title': \"Don't Drink His Blood\", 'price': 3.17,"
    " 'salesRank': {'Music': 505556}, 'categories': [['CDs & Vinyl', 'Pop']]}"
)
REVIEW_2018 = (
    '{"overall": 5.0, "vote": "1,341", "verified": true, "reviewTime": "07 9, 2011",'
    ' "reviewerID": "AUI6WTTT0QZYS", "asin": "5120053084",'
    ' "style": {"Size:": " Big Boys", "Color:": " Blue/Orange"},'
    ' "reviewerName": "Abbey", "reviewText": "I now have 4 of these", "summary": "Great",'
    ' "unixReviewTime": 1310169600}'
)
META_2018 = (
    '{"category": ["Gift Cards"], "tech1": "", "description": [], "fit": "",'
    ' "title": "Maggiano&#39;s Gift Card", "also_buy": [], "image": [], "tech2": "",'
    ' "brand": "", "feature": [], "rank": "1,786 in Gift Cards (", "also_view": [],'
    ' "details": {}, "main_cat": "Gift Cards", "similar_item": "", "date": "",'
    ' "price": "$29.99", "asin": "B001GXRQW0"}'
)
REVIEW_2023 = (
    '{"rating": 5.0, "title": "Such a lovely scent but not overpowering.",'
    ' "text": "This spray is really nice.", "images": [], "asin": "B00YQ6X8EO",'
    ' "parent_asin": "B00YQ6X8EO", "user_id": "AGKHLEW2SOWHNMFQIJGBECAF7INQ",'
    ' "timestamp": 1588687728923, "helpful_vote": 0, "verified_purchase": true}'
)
META_2023 = (
    '{"main_category": "All Beauty", "title": "Howard LC0008 Leather Conditioner",'
    ' "average_rating": 4.8, "rating_number": 10, "features": [], "description": [],'
    ' "price": null, "images": [], "videos": [], "store": "Howard Products",'
    ' "categories": [], "details": {"Package Dimensions": "7.1 x 5.5 x 3 inches"},'
    ' "parent_asin": "B01CUPMQZE", "bought_together": null}'
)


@pytest.mark.parametrize(
    "line, expected",
    [
        (REVIEW_2014, ("review", 2014)),
        (META_2014, ("product", 2014)),
        (REVIEW_2018, ("review", 2018)),
        (META_2018, ("product", 2018)),
        (REVIEW_2023, ("review", 2023)),
        (META_2023, ("product", 2023)),
    ],
)
def test_detects_kind_and_generation_per_record(line, expected):
    assert detect(decode(line)) == expected


def test_2014_metadata_is_a_python_literal_not_json():
    """Quirk 1: single quotes, and double quotes around strings holding an apostrophe."""
    fields = decode(META_2014)
    assert fields["title"] == "Don't Drink His Blood"
    assert fields["salesRank"] == {"Music": 505556}


def test_python_literal_is_never_evaluated():
    """``ast.literal_eval``, not ``eval``: code in a line is an error, not a call."""
    with pytest.raises(ParseError):
        decode("{'asin': __import__('os').getcwd()}")


def test_python_true_in_a_json_looking_line_is_accepted():
    """The official 2018 page's sample writes Python's True; real files write true."""
    assert decode('{"reviewerID": "A", "verified": True}')["verified"] is True


def test_surrogate_escapes_become_valid_unicode():
    """Strict JSON refuses a lone surrogate escape and Python accepts it; what comes out
    is valid Unicode either way: a pair is joined, a lone half is U+FFFD."""
    line = r"""{'reviewerID': 'A', 'reviewText': 'bad \ud800 text \ud83d\ude00', 'n': ['\udc00', r'\ud800']}"""
    assert decode(line) == {
        "reviewerID": "A",
        "reviewText": "bad \ufffd text \U0001f600",
        "n": ["\ufffd", "\\ud800"],  # a raw string holds the escape as text
    }
    assert (
        decode(r'{"reviewText": "lone \udc00 half", "overall": 5}')["reviewText"]
        == "lone \ufffd half"
    )


def test_json_array_wrapping_with_trailing_comma():
    """Quirk 12: copies wrapped in a JSON array, one record per line ending in a comma."""
    assert decode(REVIEW_2023 + ",")["user_id"] == "AGKHLEW2SOWHNMFQIJGBECAF7INQ"


@pytest.mark.parametrize(
    "line, reason",
    [
        (REVIEW_2018[:60], "truncated"),
        ("this is not a record", "truncated or malformed"),
        ("[1, 2, 3]", "one JSON object per line"),
        ('{"foo": 1}', "unrecognised record"),
    ],
)
def test_bad_lines_raise_a_clear_reason(line, reason):
    with pytest.raises(ParseError, match=reason):
        detect(decode(line))


def test_documented_but_wrong_2023_names_are_still_a_2023_review():
    """Quirk: the 2023 docs show ``sort_timestamp`` and ``helpful_votes``."""
    line = (
        '{"rating": 4.0, "title": "t", "text": "x", "asin": "B1", "parent_asin": "B1",'
        ' "user_id": "U1", "sort_timestamp": 1588687728923, "helpful_votes": 2}'
    )
    assert detect(decode(line)) == ("review", 2023)


def test_parse_records_routes_wrong_kind_and_garbage_to_dead_letters():
    raws = [
        RawRecord("r.json", 1, REVIEW_2014),
        RawRecord("r.json", 2, META_2018),
        RawRecord("r.json", 3, "garbage"),
        RawRecord("r.json", 4, REVIEW_2023),
    ]
    with TestPipeline() as p:
        result = p | beam.Create(raws) | ParseRecords("review", "reviews")
        assert_that(
            result.records | "Where" >> beam.Map(lambda r: (r.line, r.kind, r.source_format)),
            equal_to([(1, "review", 2014), (4, "review", 2023)]),
            label="records",
        )
        assert_that(
            result.dead_letters
            | "Why"
            >> beam.Map(lambda d: (d.stage, d.line, d.error.split(" (")[0].split(";")[0], d.raw)),
            equal_to(
                [
                    ("parse", 2, "this is a product record", META_2018),
                    ("parse", 3, "truncated or malformed record", "garbage"),
                ]
            ),
            label="dead letters",
        )
