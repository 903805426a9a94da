"""Clean: one test per FORMATS.md quirk, then the CleanRecords transform."""

from __future__ import annotations

import datetime
import time
import json

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.utils.timestamp import Timestamp

from test_parse import META_2014, META_2018, META_2023, REVIEW_2014, REVIEW_2018, REVIEW_2023
from transforms.clean import (
    CleanError,
    CleanRecords,
    clean_label,
    clean_product,
    clean_review,
    clean_text,
    flatten_categories,
    parse_count,
    parse_price,
    parse_sales_rank,
)
from transforms.parse import decode, detect
from transforms.records import PRODUCT, REVIEW, ParsedRecord


def parsed(line: str, fields: dict | None = None, line_no: int = 1) -> ParsedRecord:
    """A ParsedRecord as ParseRecords makes it, optionally with edited fields."""
    decoded = decode(line)
    decoded.update(fields or {})
    kind, generation = detect(decoded)
    return ParsedRecord("file.json", line_no, kind, generation, decoded, line)


def utc(*args) -> Timestamp:
    return Timestamp.from_utc_datetime(datetime.datetime(*args, tzinfo=datetime.timezone.utc))


# --- quirk 5: entities and markup ------------------------------------------------


def test_html_entities_are_unescaped():
    assert clean_label("Maggiano&#39;s Gift Card") == "Maggiano's Gift Card"
    assert clean_text("&quot;Amaranth&quot; &ntilde; &amp; &#34;x&#34;") == '"Amaranth" ñ & "x"'


def test_markup_is_stripped_and_line_breaks_kept():
    text = (
        'Nice.<br />Really<div id="video-block-R1">video</div> <a data-hook="product-link">it</a>'
    )
    assert clean_text(text) == "Nice.\nReally video\n it"


def test_markup_only_values_become_null():
    assert clean_label('<span class="a-size-medium a-color-secondary"') is None
    assert clean_label("</span></span></span>") is None


def test_nbsp_and_eacute_entities():
    assert clean_text("caf&eacute;&nbsp;au lait") == "café\xa0au lait"


# --- quirk 9 and 7: control characters and whitespace -------------------------------


def test_control_characters_are_removed_but_newlines_kept():
    assert clean_text("a\u0003b\nc\x00d") == "ab\ncd"


def test_whitespace_is_trimmed_and_labels_collapse_runs():
    assert clean_label("  Gift   Card \n") == "Gift Card"
    assert clean_text("  line one\n\tline two  ") == "line one\n\tline two"


def test_missing_is_null_never_the_string_none():
    assert clean_label(None) is None
    assert clean_label("") is None
    product = clean_product(parsed(META_2023, {"store": None, "price": None}))
    assert product.brand is None and product.price is None


# --- quirk 3: numbers as strings --------------------------------------------------


@pytest.mark.parametrize("value, expected", [("1,341", 1341), ("2", 2), (7, 7), ("", None)])
def test_vote_counts(value, expected):
    assert parse_count(value) == expected


def test_a_count_that_is_not_a_number_is_an_error():
    with pytest.raises(CleanError, match="not a count"):
        parse_count("lots")


@pytest.mark.parametrize(
    "value, expected",
    [
        ("$29.99", 29.99),
        ("$1,250.00", 1250.00),
        (12.5, 12.5),
        ("", None),
        (".a-box-inner{background-color:#fff}#alohaBuyBoxWidget .selected{}", None),
        ("\n\t\t   \n\r\n\r\n", None),
        ("\n\n\n<script>var x;</script>", None),
        ("None", None),  # what the HF loader writes for a missing price
        ("$5.99 - $12.99", None),
    ],
)
def test_prices(value, expected):
    assert parse_price(value) == expected


def test_2018_rank_string_cut_at_parenthesis_and_list_forms():
    assert parse_sales_rank("1,786 in Gift Cards (") == {"Gift Cards": 1786}
    assert parse_sales_rank(
        [
            ">#2,893,775 in Toys & Games (See Top 100 in Toys & Games)",
            ">#1,019 in Gift Cards > Kids",
        ]
    ) == {"Toys & Games": 2893775, "Gift Cards > Kids": 1019}
    assert parse_sales_rank([]) is None


# --- reviews, generation by generation ----------------------------------------------


def test_2014_review_helpful_pair_and_time():
    review = clean_review(parsed(REVIEW_2014))
    assert (review.helpful_votes, review.total_votes) == (2, 3)
    assert review.reviewed_at == utc(2009, 9, 13)
    assert review.rating == 5.0 and review.source_format == 2014
    assert review.title == "Heavenly Highway Hymns" and review.verified is None


def test_2014_review_time_from_unpadded_review_time_when_unix_time_missing():
    review = clean_review(parsed(REVIEW_2014, {"unixReviewTime": None, "reviewTime": "07 9, 2011"}))
    assert review.reviewed_at == utc(2011, 7, 9)


def test_2014_review_without_reviewer_name_has_null_name():
    fields = json.loads(REVIEW_2014)
    del fields["reviewerName"]
    assert clean_review(parsed(json.dumps(fields))).reviewer_name is None


def test_2018_review_vote_string_and_style():
    review = clean_review(parsed(REVIEW_2018))
    assert review.helpful_votes == 1341 and review.total_votes is None
    assert review.style == {"Size": "Big Boys", "Color": "Blue/Orange"}
    assert review.verified is True
    assert review.reviewed_at == utc(2011, 7, 9)


def test_2018_review_missing_vote_means_zero():
    fields = json.loads(REVIEW_2018)
    del fields["vote"]
    assert clean_review(parsed(json.dumps(fields))).helpful_votes == 0


def test_2018_review_missing_text_and_summary_are_null():
    fields = json.loads(REVIEW_2018)
    del fields["reviewText"], fields["summary"]
    review = clean_review(parsed(json.dumps(fields)))
    assert review.text is None and review.title is None


def test_2023_review_milliseconds_and_fields():
    review = clean_review(parsed(REVIEW_2023))
    assert review.reviewed_at == Timestamp(micros=1588687728923 * 1000)
    assert review.reviewer_id == "AGKHLEW2SOWHNMFQIJGBECAF7INQ"
    assert review.parent_asin == "B00YQ6X8EO" and review.helpful_votes == 0
    assert review.verified is True and review.source_format == 2023


def test_2023_review_documented_wrong_names():
    fields = json.loads(REVIEW_2023)
    fields["sort_timestamp"] = fields.pop("timestamp")
    fields["helpful_votes"] = 4
    del fields["helpful_vote"]
    review = clean_review(parsed(json.dumps(fields)))
    assert review.helpful_votes == 4
    assert review.reviewed_at == Timestamp(micros=1588687728923 * 1000)


def test_2023_review_images_keep_the_large_url():
    images = [{"small_image_url": "s", "medium_image_url": "m", "large_image_url": "L"}]
    assert clean_review(parsed(REVIEW_2023, {"images": images})).images == ["L"]


def test_review_id_is_stable_for_reviewer_asin_time_so_duplicates_collapse():
    first = clean_review(parsed(REVIEW_2014, line_no=1))
    copy = clean_review(parsed(REVIEW_2014, {"reviewText": "edited"}, line_no=9))
    other = clean_review(parsed(REVIEW_2014, {"asin": "0000000001"}))
    assert first.review_id == copy.review_id != other.review_id


@pytest.mark.parametrize(
    "edit, reason",
    [
        ({"overall": None}, "rating must be a number from 1 to 5"),
        ({"overall": 9.0}, "rating must be a number from 1 to 5"),
        ({"reviewerID": ""}, "missing reviewerID"),
        ({"unixReviewTime": None, "reviewTime": None}, "no review time"),
        ({"helpful": "2 of 3"}, "helpful must be"),
    ],
)
def test_reviews_that_cannot_be_cleaned_say_why(edit, reason):
    with pytest.raises(CleanError, match=reason):
        clean_review(parsed(REVIEW_2014, edit))


# --- products ---------------------------------------------------------------------


def test_2014_product_from_python_literal():
    product = clean_product(parsed(META_2014))
    assert product.asin == "0000031852" and product.title == "Don't Drink His Blood"
    assert product.price == 3.17 and product.sales_rank == {"Music": 505556}
    assert product.categories == ["CDs & Vinyl", "Pop"] and product.main_category == "CDs & Vinyl"


def test_2014_categories_flattened_and_deduplicated_in_order():
    paths = [["Clothing", "Girls"], ["Clothing", "Novelty"], ["Toys &amp; Games"]]
    assert flatten_categories(paths) == ["Clothing", "Girls", "Novelty", "Toys & Games"]


def test_2014_related_lists():
    related = {"also_bought": ["B1", "B2"], "also_viewed": ["B3"], "bought_together": ["B1"]}
    product = clean_product(parsed(META_2014, {"related": related}))
    assert product.also_bought == ["B1", "B2"] and product.also_viewed == ["B3"]
    assert product.bought_together == ["B1"]


def test_2018_product_entities_rank_price():
    product = clean_product(parsed(META_2018))
    assert product.title == "Maggiano's Gift Card" and product.price == 29.99
    assert product.sales_rank == {"Gift Cards": 1786} and product.brand is None


def test_2018_debris_title_category_and_main_cat_img():
    product = clean_product(
        parsed(
            META_2018,
            {
                "title": '<span class="a-size-medium a-color-secondary"',
                "category": ["Magazines", "</span></span></span>", "Sports &amp; Outdoors"],
                "main_cat": '<img src="https://x/fashion.png" class="nav-categ-image" '
                'alt="AMAZON FASHION"/>',
                "price": ".a-box-inner{background-color:#fff}",
            },
        )
    )
    assert product.title is None and product.price is None
    assert product.categories == ["Magazines", "Sports & Outdoors"]
    assert product.main_category == "AMAZON FASHION"


def test_2018_image_variants_are_both_accepted():
    thumbs = ["https://x/a._SX38_SY50_CR,0,0,38,50_.jpg"]
    high = ["https://x/a.jpg"]
    old = clean_product(parsed(META_2018, {"image": thumbs}))
    new_fields = json.loads(META_2018)
    del new_fields["image"]
    new_fields.update(imageURL=thumbs, imageURLHighRes=high)
    new = clean_product(parsed(json.dumps(new_fields)))
    assert old.image_urls == thumbs and new.image_urls == high


def test_2018_details_keys_lose_scraping_whitespace_and_colons():
    details = {"\n    Product Dimensions: \n    ": "3 x 2 inches", "ASIN: ": "B001GXRQW0"}
    product = clean_product(parsed(META_2018, {"details": details, "date": "May 15, 2009"}))
    assert json.loads(product.details) == {
        "Product Dimensions": "3 x 2 inches",
        "ASIN": "B001GXRQW0",
        "date": "May 15, 2009",
    }


def test_2023_product_nested_details_rank_and_nulls():
    details = {"Best Sellers Rank": {"Our Brands": 1887, "Multivitamins": 307}, "Brand": "X"}
    product = clean_product(parsed(META_2023, {"details": details, "price": 31.78}))
    assert product.asin == "B01CUPMQZE" and product.brand == "Howard Products"
    assert product.sales_rank == {"Our Brands": 1887, "Multivitamins": 307}
    assert json.loads(product.details)["Best Sellers Rank"] == {
        "Our Brands": 1887,
        "Multivitamins": 307,
    }
    assert product.price == 31.78 and product.average_rating == 4.8 and product.rating_number == 10
    assert product.bought_together == [] and product.source_format == 2023


def test_2023_unicode_escapes_decode_to_text():
    product = clean_product(parsed(META_2023, {"title": "It\u2019s great\uff0c truly"}))
    assert product.title == "It’s great， truly"


def test_very_long_values_survive():
    text = "word " * 3000
    assert len(clean_review(parsed(REVIEW_2014, {"reviewText": text})).text) == len(text) - 1


# --- transforms -------------------------------------------------------------------


def test_clean_reviews_transform_routes_bad_records_to_dead_letters():
    records = [parsed(REVIEW_2014, line_no=1), parsed(REVIEW_2014, {"overall": None}, line_no=2)]
    with TestPipeline() as p:
        result = p | beam.Create(records) | CleanRecords(REVIEW, "reviews")
        assert_that(
            result.records | "Ids" >> beam.Map(lambda r: (r.line, r.reviewer_id)),
            equal_to([(1, "A2SUAM1J3GNN3B")]),
            label="reviews",
        )
        assert_that(
            result.dead_letters | "Why" >> beam.Map(lambda d: (d.stage, d.line, d.error)),
            equal_to([("clean", 2, "2014 review: rating must be a number from 1 to 5, got None")]),
            label="dead letters",
        )


def test_clean_products_transform():
    records = [parsed(META_2014), parsed(META_2018), parsed(META_2023)]
    with TestPipeline() as p:
        result = p | beam.Create(records) | CleanRecords(PRODUCT, "products")
        assert_that(
            result.records | beam.Map(lambda r: (r.asin, r.source_format)),
            equal_to([("0000031852", 2014), ("B001GXRQW0", 2018), ("B01CUPMQZE", 2023)]),
        )


# --- the fast path: parse vouches for lines with nothing to clean ---------------------

_HAZARDS = {
    "plain text with line breaks": ("Good.\\nVery good.", False),
    "raw non-ASCII": ("Très bien", False),
    "escaped non-ASCII": ("Tr\\u00e8s bien", False),
    "entity": ("Tom &amp; Jerry", True),
    "escaped ampersand": ("Tom \\u0026amp; Jerry", True),
    "markup": ("Nice.<br />Really", True),
    "escaped markup": ("Nice.\\u003cbr /\\u003eReally", True),
    "escaped control character": ("bad\\u0003byte", True),
    "backspace escape": ("bad\\bbyte", True),
    "form feed escape": ("bad\\fbyte", True),
    "raw DEL": ("bad\x7fbyte", True),
}


def _review_line(text: str) -> str:
    """A 2018 review line whose reviewText is written exactly as given (already JSON-escaped)."""
    return REVIEW_2018.replace('"reviewText": "', '"reviewText": "' + text + " ", 1)


@pytest.mark.parametrize("name", list(_HAZARDS))
def test_fast_path_is_taken_only_when_nothing_needs_cleaning(name):
    from transforms.parse import parse_record
    from transforms.records import RawRecord

    text, needs_cleaning = _HAZARDS[name]
    record = parse_record(RawRecord("f", 1, _review_line(text)))
    assert record.needs_text_cleaning is needs_cleaning
    # whichever path is taken, the review is the one the full cleaning makes
    assert clean_review(record) == clean_review(record._replace(needs_text_cleaning=True))


def test_fast_path_matches_full_cleaning_on_every_bundled_sample():
    from pathlib import Path

    from connectors.files import iter_lines
    from transforms.parse import ParseError, parse_record
    from transforms.records import RawRecord

    samples = Path(__file__).resolve().parent.parent / "samples"
    fast = 0
    for path in sorted(samples.glob("*.json*")):
        for number, data in iter_lines(str(path)):
            try:
                record = parse_record(RawRecord(str(path), number, data.decode("utf-8")))
            except (ParseError, UnicodeDecodeError):
                continue
            if record.kind != REVIEW:
                continue
            fast += not record.needs_text_cleaning
            try:
                expected = clean_review(record._replace(needs_text_cleaning=True))
            except CleanError:
                continue
            assert clean_review(record) == expected, f"{path.name}:{number}"
    assert fast > 50  # the fast path really ran


# --- bounds: a single value never stops a run, never lands as garbage ---------------------


@pytest.mark.parametrize(
    "line, edit, field",
    [
        (REVIEW_2014, {"asin": "B" * 3000}, "asin"),
        (REVIEW_2018, {"reviewerID": "A" * 65}, "reviewerID"),
        (REVIEW_2023, {"parent_asin": "P" * 100}, "parent_asin"),
        (META_2018, {"asin": "x" * 2000}, "asin"),
        (META_2023, {"parent_asin": "p" * 70}, "parent_asin"),
    ],
)
def test_ids_longer_than_any_real_one_are_refused_naming_the_field(line, edit, field):
    clean = clean_review if "review" in detect(decode(line))[0] else clean_product
    with pytest.raises(CleanError, match=rf"^{field} is [\d,]+ characters long"):
        clean(parsed(line, edit))
    assert clean(parsed(line, {k: v[:64] for k, v in edit.items()}))  # 64 is fine


@pytest.mark.parametrize(
    "line, edit, field",
    [
        (REVIEW_2014, {"unixReviewTime": 10**13}, "unixReviewTime"),  # year 318857
        (REVIEW_2014, {"unixReviewTime": 2_533_000_000_000}, "unixReviewTime"),  # year 82269
        (REVIEW_2018, {"unixReviewTime": 500_000_000}, "unixReviewTime"),  # 1985
        (REVIEW_2018, {"unixReviewTime": None, "reviewTime": "01 2, 1989"}, "reviewTime"),
        (REVIEW_2023, {"timestamp": 9_999_999_999_999_999}, "timestamp"),  # past year 9999
        (REVIEW_2023, {"timestamp": 1e300}, "timestamp"),
        (REVIEW_2023, {"timestamp": (time.time() + 3 * 86400) * 1000}, "timestamp"),
    ],
)
def test_impossible_review_times_are_refused_naming_the_field(line, edit, field):
    with pytest.raises(CleanError, match=rf"^{field}: .* is not a plausible review time"):
        clean_review(parsed(line, edit))


def test_tomorrow_is_a_plausible_time_clock_skew_allowed():
    soon = int((time.time() + 3600) * 1000)
    assert clean_review(parsed(REVIEW_2023, {"timestamp": soon})).reviewed_at.micros == soon * 1000


def test_a_category_given_as_a_string_is_one_category_not_its_letters():
    product = clean_product(parsed(META_2018, {"category": "Electronics"}))
    assert product.categories == ["Electronics"]
    assert flatten_categories("Toys & Games") == ["Toys & Games"]


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-Infinity", float("nan")])
def test_an_average_rating_that_is_not_a_number_is_null(value):
    assert clean_product(parsed(META_2023, {"average_rating": value})).average_rating is None


def test_a_nul_in_one_url_drops_that_value_with_a_note_and_keeps_the_review():
    good = "https://images.example.com/a.jpg"
    review = clean_review(parsed(REVIEW_2018, {"image": [good, "https://x/\x00b.jpg"]}))
    assert review.images == [good] and review.text
    assert review.notes == ["image: dropped 'https://x/\\x00b.jpg': not printable"]
    assert clean_review(parsed(REVIEW_2018)).notes is None  # nothing dropped, no note
    product = clean_product(parsed(META_2018, {"also_buy": ["B000000001", "B0\x00"]}))
    assert product.also_bought == ["B000000001"] and product.notes[0].startswith("also_buy:")


@pytest.mark.parametrize(
    "line, edit, reason",
    [
        (REVIEW_2018, {"vote": "3,000,000,000"}, "vote: 3,000,000,000 is out of range"),
        (REVIEW_2014, {"helpful": [1, 10**12]}, "helpful: 1,000,000,000,000 is out of range"),
        (REVIEW_2023, {"helpful_vote": 2**40}, "helpful_vote: 1,099,511,627,776 is out of range"),
    ],
)
def test_every_overflowing_count_names_its_field(line, edit, reason):
    with pytest.raises(CleanError, match=f"^{reason}"):
        clean_review(parsed(line, edit))


def test_a_number_that_cannot_be_a_price_or_a_count_is_null_with_a_note():
    product = clean_product(parsed(META_2023, {"price": 1e15, "rating_number": 10**12}))
    assert product.price is None and product.rating_number is None
    assert [n.split(":")[0] for n in product.notes] == ["price", "rating_number"]
    assert clean_product(parsed(META_2023, {"price": float("inf")})).price is None
