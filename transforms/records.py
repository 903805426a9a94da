"""Canonical record types shared by every pipeline.

Each is a ``typing.NamedTuple`` registered with Beam's ``RowCoder``: Beam gets a
schema, ``ib.collect`` gives typed DataFrame columns, and rows bind straight to
SQL parameters in column order.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Optional, Sequence

import apache_beam as beam
from apache_beam.utils.timestamp import Timestamp

REVIEW = "review"
PRODUCT = "product"
FORMATS = (2014, 2018, 2023)
# Every stage's counters are Beam metrics in this namespace.
METRICS_NAMESPACE = "termidator"
# The tag of every stage's dead-letter output.
DEAD_LETTERS = "dead_letters"


class RawRecord(NamedTuple):
    """One non-blank line of a dataset file, with its lineage."""

    source: str
    line: int
    text: str


class ParsedRecord(NamedTuple):
    """A decoded line: which kind and generation it is, and its fields as found."""

    source: str
    line: int
    kind: str
    source_format: int
    fields: dict
    raw: str
    # False when the raw line is strict JSON with no '&', '<' or control-character
    # escape: then no text in it needs unescaping, unmarking or control stripping.
    needs_text_cleaning: bool = True


class Review(NamedTuple):
    """One cleaned review, the same shape whatever the source generation."""

    review_id: str
    reviewer_id: str
    asin: str
    parent_asin: Optional[str]
    reviewer_name: Optional[str]
    rating: float
    title: Optional[str]
    text: Optional[str]
    helpful_votes: Optional[int]
    total_votes: Optional[int]
    verified: Optional[bool]
    reviewed_at: Timestamp
    images: Sequence[str]
    style: Optional[Mapping[str, str]]
    source_format: int
    source: str
    line: int
    # What cleaning dropped and why ("images: dropped '…': not printable"); None if nothing.
    notes: Optional[Sequence[str]] = None


class Product(NamedTuple):
    """One cleaned product (item metadata); ``details`` is JSON text (values nest)."""

    asin: str
    title: Optional[str]
    brand: Optional[str]
    main_category: Optional[str]
    categories: Sequence[str]
    price: Optional[float]
    sales_rank: Optional[Mapping[str, int]]
    average_rating: Optional[float]
    rating_number: Optional[int]
    description: Optional[str]
    features: Sequence[str]
    image_urls: Sequence[str]
    also_bought: Sequence[str]
    also_viewed: Sequence[str]
    bought_together: Sequence[str]
    details: Optional[str]
    source_format: int
    source: str
    line: int
    notes: Optional[Sequence[str]] = None  # what cleaning dropped and why, as for Review


class DeadLetter(NamedTuple):
    """A record that could not go further: where it came from, what it was, and why."""

    pipeline: str
    stage: str
    source: Optional[str]
    line: Optional[int]
    raw: Optional[str]
    error: str


class StoredReview(NamedTuple):
    """The part of a stored review that emotion analysis reads (with its lineage)."""

    review_id: str
    title: Optional[str]
    text: Optional[str]
    source: Optional[str]
    line: Optional[int]


class EmotionResult(NamedTuple):
    """The emotion of one review by one model: top label, its score, every label's score."""

    review_id: str
    model: str
    label: str
    score: float
    scores: Mapping[str, float]


class ReviewEmbedding(NamedTuple):
    """One review's sentence embedding by one model (L2-normalised), for semantic search."""

    review_id: str
    model: str
    embedding: Sequence[float]


for _record_type in (
    RawRecord,
    Review,
    Product,
    DeadLetter,
    StoredReview,
    EmotionResult,
    ReviewEmbedding,
):
    beam.coders.registry.register_coder(_record_type, beam.coders.RowCoder)
