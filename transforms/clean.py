"""Clean: one canonical ``Review`` / ``Product`` per parsed record, whatever its generation.

The rules follow FORMATS.md quirk by quirk: entities unescaped, markup stripped,
control characters removed, numbers-as-strings read, missing values null (never
the string "None"), times to UTC, category paths flattened and de-duplicated.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import html
import math
import re
import time
from typing import Any, Callable, Iterable, Mapping, Optional

import apache_beam as beam
import orjson
from apache_beam import pvalue
from apache_beam.metrics import Metrics
from apache_beam.utils.timestamp import Timestamp

from transforms.records import DEAD_LETTERS, METRICS_NAMESPACE
from transforms.records import PRODUCT, REVIEW, DeadLetter, ParsedRecord, Product, Review

CLEAN_STAGE = "clean"

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_LINE_BREAK_TAG = re.compile(r"<\s*(?:br|/p|/div|/li)\b[^>]*>", re.IGNORECASE)
# A tag, or a tag cut off by the scraper (no closing '>'), e.g. '<span class="a-size'.
_TAG = re.compile(r"<[A-Za-z/!][^<>]*(?:>|$)")
_SPACE_RUNS = re.compile(r" {2,}")
_IMG_ALT = re.compile(r"<img\b[^>]*\balt=\"([^\"]*)\"", re.IGNORECASE)
_COUNT = re.compile(r"^\d{1,3}(?:,\d{3})+$|^\d+$")
_PRICE = re.compile(r"^\$?\s*(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?$")
_RANK = re.compile(r"#?\s*(\d[\d,]*)\s+in\s+([^(]+?)\s*(?:\(|$)")
_REVIEW_DATE = re.compile(r"^(\d{1,2}) (\d{1,2}), (\d{4})$")
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
# Bounds of what is stored: no real id is longer (asins have 10 characters, 2023 user ids
# 28), and a longer key can exceed what a database index holds.
MAX_ID_CHARS = 64
MAX_COUNT = 2**31 - 1  # counts go to integer columns
MAX_PRICE = 1e9  # no product costs a billion dollars: such a "price" is scraping debris
# Plausible review times: the public datasets start in 1996; a day of clock skew ahead.
EARLIEST_REVIEW_MICROS = 631_152_000 * 1_000_000  # 1990-01-01T00:00:00Z
FUTURE_SLACK_MICROS = 86_400 * 1_000_000


class CleanError(ValueError):
    """A record that cannot become a canonical row; the message names the field."""


# --- field cleaners (pure functions, one per quirk family) -------------------------


def clean_text(value: Any, collapse: bool = False) -> Optional[str]:
    """Unescape entities, strip markup and control characters, trim; empty -> None.

    ``collapse`` folds every whitespace run to one space (names, titles, labels);
    long text keeps its own spacing and line breaks. Fast paths first: this runs on
    every text field of every record.
    """
    if type(value) is str:
        if (
            "&" not in value
            and "<" not in value
            and value.isprintable()
            and not (collapse and "  " in value)
        ):  # the usual case: nothing to clean but the ends
            return value.strip() or None
    elif value is None:
        return None
    elif isinstance(value, (list, tuple, dict)):
        raise CleanError(f"expected text, got {type(value).__name__}")
    else:
        value = str(value)
    if "&" in value:
        value = html.unescape(value)
    if "<" in value:
        value = _TAG.sub(" ", _LINE_BREAK_TAG.sub("\n", value))
        value = _SPACE_RUNS.sub(" ", value)  # where a tag stood between two spaces
    if not value.isprintable():  # line breaks, tabs, control characters, odd spaces
        value = _CONTROL.sub("", value)
        if collapse:
            value = " ".join(value.split())
    elif collapse and "  " in value:
        value = " ".join(value.split())
    value = value.strip()
    return value or None


def clean_label(value: Any) -> Optional[str]:
    """Short one-line text: a title, name, brand, category or key."""
    return clean_text(value, collapse=True)


def clean_labels(values: Any) -> list[str]:
    """A list of short texts, cleaned, empties dropped, de-duplicated in order."""
    if values is None or values == "":
        return []
    if isinstance(values, str):
        values = [values]
    return _unique(clean_label(v) for v in values)


def _unique(values: Iterable[Optional[str]]) -> list[str]:
    return list(dict.fromkeys(v for v in values if v))


def parse_count(value: Any, field: str = "count") -> Optional[int]:
    """A vote or rating count: 3, "3", "1,341" -> int; "" or None -> None; a count larger
    than an integer column holds is an error naming ``field``."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise CleanError(f"{field}: not a count: {value!r}")
    if isinstance(value, int):
        count = value
    elif isinstance(value, float) and value.is_integer():
        count = int(value)
    elif isinstance(value, str) and _COUNT.match(value.strip()):
        count = int(value.strip().replace(",", ""))
    else:
        raise CleanError(f"{field}: not a count: {value!r}")
    if not 0 <= count <= MAX_COUNT:
        raise CleanError(f"{field}: {count:,} is out of range for a count (0 to {MAX_COUNT:,})")
    return count


def parse_price(value: Any, notes: Optional[list[str]] = None) -> Optional[float]:
    """USD price: 12.5, "$1,250.00" -> float; "", CSS, scripts, ranges -> None; a number
    that cannot be a price (NaN, a billion dollars) -> None, with a note."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        price = float(value) if value >= 0 else None
    elif isinstance(value, str) and (match := _PRICE.match(value.strip())):
        price = float(match.group(1).replace(",", "") + (match.group(2) or ""))
    else:
        return None
    if price is not None and not (math.isfinite(price) and price < MAX_PRICE):
        note(notes, "price", f"{value!r} is not a plausible price")
        return None
    return price


def parse_float(value: Any) -> Optional[float]:
    """A plain finite number, possibly written as a string; garbage, NaN, infinity -> None."""
    if value is None or value == "" or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def note(notes: Optional[list[str]], field: str, what: str) -> None:
    """Record that cleaning dropped a field's value and why (the row keeps the rest)."""
    if notes is not None:
        notes.append(f"{field}: {what}")


def parse_rating(value: Any) -> float:
    """A star rating 1–5; anything else is an error, since a review needs one."""
    rating = parse_float(value)
    if rating is None or not 1.0 <= rating <= 5.0:
        raise CleanError(f"rating must be a number from 1 to 5, got {value!r}")
    return rating


def parse_bool(value: Any) -> Optional[bool]:
    """JSON booleans, and the strings a hand-edited copy might hold."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise CleanError(f"not a boolean: {value!r}")


@functools.lru_cache(maxsize=1 << 16)
def _whole_seconds(seconds: int) -> tuple[Timestamp, int]:
    """(Timestamp, micros) of epoch seconds. 2014/2018 review times are whole days, a few
    thousand distinct values: each Timestamp is built once (building one costs ~1.5 µs)."""
    return Timestamp(micros=seconds * 1_000_000), seconds * 1_000_000


def plausible_time(micros: int, field: str, value: Any) -> int:
    """``micros`` if it is a plausible review time (1990 to a day from now); else a
    CleanError naming the field (an impossible time must not reach Beam's windows)."""
    if not EARLIEST_REVIEW_MICROS <= micros <= time.time() * 1e6 + FUTURE_SLACK_MICROS:
        raise CleanError(
            f"{field}: {value!r} is not a plausible review time (1990 to a day from now)"
        )
    return micros


def review_time(
    seconds: Any = None, date_text: Any = None, millis: Any = None, field: str = "time"
) -> tuple[Timestamp, int]:
    """Review time as (UTC Timestamp, epoch micros): from epoch seconds, epoch millis, or
    "MM D, YYYY"; outside 1990 to a day from now is a CleanError naming ``field``."""
    if type(seconds) is int and seconds > 0 and millis is None:  # 2014/2018: the usual case
        return _whole_seconds(plausible_time(seconds * 1_000_000, field, seconds) // 1_000_000)
    for value, scale in ((millis, 1000), (seconds, 1)):
        number = parse_float(value)
        if number is not None and number > 0:
            if scale == 1000 and number < 1e11:  # a 2023 copy written in seconds
                scale = 1
            micros = plausible_time(int(round(number * 1_000_000 / scale)), field, value)
            return Timestamp(micros=micros), micros
    if isinstance(date_text, str):
        match = _REVIEW_DATE.match(date_text.strip())
        if match:
            month, day, year = (int(g) for g in match.groups())
            try:
                when = datetime.datetime(year, month, day, tzinfo=datetime.timezone.utc)
            except ValueError as error:
                raise CleanError(f"bad reviewTime {date_text!r}: {error}") from None
            timestamp = Timestamp.from_utc_datetime(when)
            plausible_time(timestamp.micros, "reviewTime", date_text)
            return timestamp, timestamp.micros
    raise CleanError(
        f"no review time: unixReviewTime/timestamp {seconds or millis!r}, "
        f"reviewTime {date_text!r}"
    )


def review_event_time(fields: Mapping[str, Any], generation: int) -> tuple[Timestamp, int]:
    """A review's time (Timestamp, epoch micros) from its fields: the one place each
    generation's time fields are read (cleaning, the streaming source's event time, the
    REST service's check of each line)."""
    if generation == 2023:
        name = "timestamp" if fields.get("timestamp") else "sort_timestamp"
        return review_time(millis=fields.get(name), field=name)
    return review_time(
        seconds=fields.get("unixReviewTime"),
        date_text=fields.get("reviewTime"),
        field="unixReviewTime",
    )


def review_id(reviewer_id: str, asin: str, micros: int) -> str:
    """Stable key for (reviewer, product, time in epoch micros), so duplicates collapse."""
    key = f"{reviewer_id}\x1f{asin}\x1f{micros}".encode()
    return hashlib.blake2b(key, digest_size=12).hexdigest()


def _long_text(value: Any, needs_cleaning: bool) -> Optional[str]:
    """Review text: when parse vouched for the line, only the ends need trimming."""
    if not needs_cleaning and type(value) is str:
        return value.strip() or None
    return clean_text(value)


def required_id(fields: Mapping[str, Any], *names: str) -> str:
    """An identifier that must be present (reviewer, asin): first non-empty of names, at
    most MAX_ID_CHARS long (a longer one is an error naming the field)."""
    for name in names:
        value = fields.get(name)
        if not (type(value) is str and value.isalnum()):  # the usual case: nothing to clean
            value = clean_label(value)
        if value:
            return bounded_id(value, name)
    raise CleanError(f"missing {' / '.join(names)}")


def bounded_id(value: str, field: str) -> str:
    """An identifier no longer than any real one; else a CleanError naming the field."""
    if len(value) > MAX_ID_CHARS:
        raise CleanError(
            f"{field} is {len(value):,} characters long; an id has at most {MAX_ID_CHARS}"
        )
    return value


def optional_id(value: Any, field: str) -> Optional[str]:
    """An identifier that may be missing (2023 parent_asin), bounded like ``required_id``."""
    value = clean_label(value)
    return None if value is None else bounded_id(value, field)


def clean_style(style: Any) -> Optional[dict[str, str]]:
    """2018 style: keys lose their trailing colon, values their leading space."""
    if not style:
        return None
    if not isinstance(style, dict):
        raise CleanError(f"style is not an object: {style!r}")
    cleaned = {}
    for key, value in style.items():
        key = _style_key(key)
        value = clean_label(value)
        if key and value:
            cleaned[key] = value
    return cleaned or None


@functools.lru_cache(maxsize=4096)
def _style_key(key: Any) -> Optional[str]:
    """ "Size Name:" -> "Size Name"; the few dozen style keys are cleaned once each."""
    return clean_label(str(key).strip().rstrip(":"))


def clean_details(details: Any, extra: Optional[Mapping[str, Any]] = None) -> Optional[str]:
    """Product details as JSON text: keys trimmed of scraping whitespace and colons."""
    merged: dict[str, Any] = {}
    if isinstance(details, str):  # the HF loader stores details as a JSON string
        try:
            details = orjson.loads(details)
        except orjson.JSONDecodeError:
            details = {"details": details}
    if isinstance(details, dict):
        for key, value in details.items():
            key = clean_label(str(key).strip().rstrip(":"))
            value = _clean_json_value(value)
            if key and value not in (None, "", [], {}):
                merged[key] = value
    for key, value in (extra or {}).items():
        value = _clean_json_value(value)
        if value not in (None, "", [], {}):
            merged[key] = value
    return orjson.dumps(merged).decode() if merged else None


def _clean_json_value(value: Any) -> Any:
    if isinstance(value, str):
        return clean_label(value)
    if isinstance(value, dict):
        return {clean_label(str(k)) or str(k): _clean_json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean_json_value(v) for v in value]
    return value


def parse_sales_rank(rank: Any) -> Optional[dict[str, int]]:
    """Sales rank as {category: rank} from 2014 dicts, 2018 strings or lists, 2023 details."""
    if not rank:
        return None
    ranks: dict[str, int] = {}
    if isinstance(rank, dict):
        for category, value in rank.items():
            count = _lenient_count(value)
            name = clean_label(category)
            if name and count is not None:
                ranks[name] = count
    else:
        for text in [rank] if isinstance(rank, str) else rank:
            if not isinstance(text, str):
                continue
            match = _RANK.search(clean_label(text) or "")
            if match:
                name = clean_label(match.group(2))
                if name:
                    ranks.setdefault(name, int(match.group(1).replace(",", "")))
    return ranks or None


def _lenient_count(
    value: Any, field: str = "count", notes: Optional[list[str]] = None
) -> Optional[int]:
    """A count, or None where it is not one (noted when ``notes`` is given)."""
    try:
        return parse_count(value, field)
    except CleanError as error:
        note(notes, field, str(error).removeprefix(f"{field}: "))
        return None


def clean_main_category(value: Any) -> Optional[str]:
    """2018 main_cat can be a raw <img> tag: keep its alt text, else the cleaned label."""
    if isinstance(value, str) and "<img" in value:
        match = _IMG_ALT.search(value)
        return clean_label(match.group(1)) if match else None
    return clean_label(value)


def flatten_categories(categories: Any) -> list[str]:
    """Category paths (2014: list of lists; 2018/2023: list) flattened, de-duplicated; a
    single category given as a string is one category, not its letters."""
    if not categories:
        return []
    if isinstance(categories, str):
        return clean_labels([categories])
    flat: list[Any] = []
    for item in categories:
        if isinstance(item, (list, tuple)):
            flat.extend(item)
        else:
            flat.append(item)
    return clean_labels(flat)


def join_paragraphs(value: Any) -> Optional[str]:
    """Description: 2014 one string, 2018/2023 a list of paragraphs -> one text."""
    if isinstance(value, (list, tuple)):
        parts = [clean_text(v) for v in value if isinstance(v, str)]
        return "\n".join(p for p in parts if p) or None
    return clean_text(value)


def _urls(values: Any, field: str = "url", notes: Optional[list[str]] = None) -> list[str]:
    """URLs (or ASINs): trimmed, de-duplicated; one with a control character (a NUL, which
    Postgres text cannot hold) is dropped with a note, not the whole record."""
    if not values:
        return []
    if isinstance(values, str):
        values = [values]
    kept = []
    for value in values:
        if not isinstance(value, str) or not value.strip():
            continue
        if not value.isprintable():
            note(notes, field, f"dropped {value[:80]!r}: not printable")
            continue
        kept.append(value.strip())
    return list(dict.fromkeys(kept))


# --- records -----------------------------------------------------------------------


def clean_review(record: ParsedRecord) -> Review:
    """Canonical Review from a parsed review of any generation."""
    f = record.fields
    notes: list[str] = []
    if record.source_format == 2023:
        reviewer = required_id(f, "user_id")
        asin = required_id(f, "asin", "parent_asin")
        parent = optional_id(f.get("parent_asin"), "parent_asin")
        when, micros = review_event_time(f, 2023)
        helpful = parse_count(f.get("helpful_vote", f.get("helpful_votes")), "helpful_vote")
        images = _urls(
            [
                i.get("large_image_url") or i.get("medium_image_url") or i.get("small_image_url")
                for i in f.get("images") or ()
                if isinstance(i, dict)
            ],
            "images",
            notes,
        )
        return Review(
            review_id(reviewer, asin, micros),
            reviewer,
            asin,
            parent,
            None,
            parse_rating(f.get("rating")),
            clean_label(f.get("title")),
            _long_text(f.get("text"), record.needs_text_cleaning),
            helpful if helpful is not None else 0,
            None,
            parse_bool(f.get("verified_purchase")),
            when,
            images,
            None,
            2023,
            record.source,
            record.line,
            notes or None,
        )
    reviewer = required_id(f, "reviewerID")
    asin = required_id(f, "asin")
    when, micros = review_event_time(f, record.source_format)
    if record.source_format == 2014:
        helpful_votes, total_votes = _helpful_pair(f.get("helpful"))
        verified, images, style = None, [], None
    else:
        votes = parse_count(f.get("vote"), "vote")
        helpful_votes, total_votes = (votes if votes is not None else 0), None
        verified = parse_bool(f.get("verified"))
        images, style = _urls(f.get("image"), "image", notes), clean_style(f.get("style"))
    return Review(
        review_id(reviewer, asin, micros),
        reviewer,
        asin,
        None,
        clean_label(f.get("reviewerName")),
        parse_rating(f.get("overall")),
        clean_label(f.get("summary")),
        _long_text(f.get("reviewText"), record.needs_text_cleaning),
        helpful_votes,
        total_votes,
        verified,
        when,
        images,
        style,
        record.source_format,
        record.source,
        record.line,
        notes or None,
    )


def _helpful_pair(helpful: Any) -> tuple[Optional[int], Optional[int]]:
    """2014 ``helpful: [helpful_yes, total_votes]``."""
    if helpful is None:
        return None, None
    if not isinstance(helpful, (list, tuple)) or len(helpful) != 2:
        raise CleanError(f"helpful must be [helpful_votes, total_votes], got {helpful!r}")
    return parse_count(helpful[0], "helpful"), parse_count(helpful[1], "helpful")


def clean_product(record: ParsedRecord) -> Product:
    """Canonical Product from parsed metadata of any generation."""
    f = record.fields
    fmt = record.source_format
    notes: list[str] = []
    if fmt == 2023:
        details = f.get("details")
        rank = details.get("Best Sellers Rank") if isinstance(details, dict) else None
        extra = {k: f.get(k) for k in ("subtitle", "author", "videos")}
        return Product(
            required_id(f, "parent_asin", "asin"),
            clean_label(f.get("title")),
            clean_label(f.get("store")),
            clean_main_category(f.get("main_category")),
            flatten_categories(f.get("categories")),
            parse_price(f.get("price"), notes),
            parse_sales_rank(rank),
            parse_float(f.get("average_rating")),
            _lenient_count(f.get("rating_number"), "rating_number", notes),
            join_paragraphs(f.get("description")),
            clean_labels(f.get("features")),
            _urls(
                [
                    i.get("hi_res") or i.get("large") or i.get("thumb")
                    for i in f.get("images") or ()
                    if isinstance(i, dict)
                ],
                "images",
                notes,
            ),
            [],
            [],
            _urls(f.get("bought_together"), "bought_together", notes),
            clean_details(details, extra),
            fmt,
            record.source,
            record.line,
            notes or None,
        )
    if fmt == 2018:
        extra = {k: f.get(k) for k in ("date", "tech1", "tech2", "fit", "similar_item")}
        return Product(
            required_id(f, "asin"),
            clean_label(f.get("title")),
            clean_label(f.get("brand")),
            clean_main_category(f.get("main_cat")),
            flatten_categories(f.get("category")),
            parse_price(f.get("price"), notes),
            parse_sales_rank(f.get("rank")),
            None,
            None,
            join_paragraphs(f.get("description")),
            clean_labels(f.get("feature")),
            _urls(f.get("imageURLHighRes") or f.get("imageURL") or f.get("image"), "image", notes),
            _urls(f.get("also_buy"), "also_buy", notes),
            _urls(f.get("also_view"), "also_view", notes),
            [],
            clean_details(f.get("details"), extra),
            fmt,
            record.source,
            record.line,
            notes or None,
        )
    related = f.get("related") if isinstance(f.get("related"), dict) else {}
    categories = flatten_categories(f.get("categories"))
    first_path = (f.get("categories") or [[]])[0]
    return Product(
        required_id(f, "asin"),
        clean_label(f.get("title")),
        clean_label(f.get("brand")),
        clean_label(first_path[0]) if isinstance(first_path, list) and first_path else None,
        categories,
        parse_price(f.get("price"), notes),
        parse_sales_rank(f.get("salesRank")),
        None,
        None,
        join_paragraphs(f.get("description")),
        [],
        _urls(f.get("imUrl"), "imUrl", notes),
        _urls(related.get("also_bought"), "also_bought", notes),
        _urls(related.get("also_viewed"), "also_viewed", notes),
        _urls(related.get("bought_together"), "bought_together", notes),
        clean_details(None, {"buy_after_viewing": related.get("buy_after_viewing")}),
        fmt,
        record.source,
        record.line,
        notes or None,
    )


CLEANERS: Mapping[str, Callable[[ParsedRecord], Any]] = {
    REVIEW: clean_review,
    PRODUCT: clean_product,
}


# --- transforms --------------------------------------------------------------------


class CleanRecordFn(beam.DoFn):
    """ParsedRecord -> canonical record; a record that cannot be cleaned is a dead letter."""

    def __init__(self, kind: str, pipeline_name: str):
        self._kind = kind
        self._pipeline_name = pipeline_name
        self._cleaned = Metrics.counter(METRICS_NAMESPACE, f"{kind}s_cleaned")
        self._rejected = Metrics.counter(METRICS_NAMESPACE, "clean_dead_letters")

    def setup(self):
        self._clean = CLEANERS[self._kind]

    def start_bundle(self):
        self._cleaned_in_bundle = 0  # counted per bundle: a counter per record costs

    def finish_bundle(self):
        self._cleaned.inc(self._cleaned_in_bundle)

    def process(self, record: ParsedRecord):
        try:
            cleaned = self._clean(record)
        except Exception as error:  # noqa: BLE001 - a bad record never stops the run
            self._rejected.inc()
            message = str(error) if isinstance(error, CleanError) else repr(error)
            yield pvalue.TaggedOutput(
                DEAD_LETTERS,
                DeadLetter(
                    self._pipeline_name,
                    CLEAN_STAGE,
                    record.source,
                    record.line,
                    record.raw,
                    f"{record.source_format} {record.kind}: {message}",
                ),
            )
            return
        self._cleaned_in_bundle += 1
        yield cleaned


class CleanRecords(beam.PTransform):
    """ParsedRecord -> canonical ``Review`` or ``Product`` (by ``kind``): ``.records``, and
    records that cannot be cleaned as ``.dead_letters``."""

    def __init__(self, kind: str, pipeline_name: str = ""):
        super().__init__()
        self._kind = kind
        self._pipeline_name = pipeline_name or f"{kind}s"

    def expand(self, parsed):
        return parsed | "Canonicalise" >> beam.ParDo(
            CleanRecordFn(self._kind, self._pipeline_name)
        ).with_outputs(DEAD_LETTERS, main="records")
