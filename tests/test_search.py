"""Semantic search: embeddings written by the emotions pass (pgvector on the embedded
Postgres), backfilled, searched by the CLI and the REST service with filters; bad
queries are a clear error. Real datalake, real model, real subprocesses and server."""

from __future__ import annotations

import datetime
import json

import httpx
import psycopg
import pytest

from conftest import query
from connectors.datalake import create_database, drop_database
from pipelines import emotions, products, reviews
from pipelines.search import Query, SearchError, find
from samples import generate, sample_files
from server import app as service
from test_pipelines import cli
from test_server import TOKEN, make_settings, serving
from transforms.emotion_model import EMBEDDING_DIM, EMBEDDING_MODEL, LABELS

# How the samples say that something broke (samples/generate.py's sentences).
BROKEN = ("stopped working", "gave out", "failed on", "faded after", "broke")


@pytest.fixture(scope="module")
def lake(server_dsn):
    """The bundled samples ingested, classified and embedded (shared, read-only)."""
    dsn = create_database(server_dsn, "search")
    files = sample_files()
    products.run(["--dsn", dsn, "--quiet", *[f"--input={f}" for f in files["products"]]])
    reviews.run(["--dsn", dsn, "--quiet", *[f"--input={f}" for f in files["reviews"]]])
    emotions.run(["--dsn", dsn, "--quiet"])
    yield dsn
    drop_database(server_dsn, dsn)


def texts(dsn: str, ids) -> dict[str, str]:
    rows = query(dsn, "SELECT review_id, text FROM reviews WHERE review_id = ANY(%s)", (ids,))
    return dict(rows)


def test_the_migration_creates_the_vector_extension_and_an_hnsw_cosine_index(datalake):
    assert query(datalake, "SELECT extname FROM pg_extension WHERE extname = 'vector'")
    ((definition,),) = query(
        datalake,
        "SELECT indexdef FROM pg_indexes WHERE tablename = 'review_embeddings'"
        " AND indexdef LIKE '%hnsw%'",
    )
    assert "vector_cosine_ops" in definition
    ((kind,),) = query(
        datalake,
        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute"
        " WHERE attrelid = 'review_embeddings'::regclass AND attname = 'embedding'",
    )
    assert kind == f"vector({EMBEDDING_DIM})"


def test_every_classified_review_has_one_normalised_embedding_and_a_rerun_adds_none(lake):
    (with_text,) = query(lake, "SELECT count(*) FROM reviews WHERE btrim(text) <> ''")[0]
    rows = query(
        lake,
        "SELECT model, count(*), min(vector_norm(embedding)),"
        " max(vector_norm(embedding)) FROM review_embeddings GROUP BY model",
    )
    ((model, count, low, high),) = rows
    assert model == EMBEDDING_MODEL and count == with_text > 100
    assert 0.999 < low <= high < 1.001
    before = query(lake, "SELECT review_id, embedded_at FROM review_embeddings ORDER BY 1")
    again = emotions.run(["--dsn", lake, "--quiet"])
    assert (again.records, again.upserted) == (0, 0)
    assert query(lake, "SELECT review_id, embedded_at FROM review_embeddings ORDER BY 1") == before


def test_reviews_classified_before_embeddings_existed_are_backfilled_by_the_next_run(
    datalake, tmp_path
):
    path = tmp_path / "Books.jsonl"
    generate.write_dataset("reviews", 2023, 60, str(path), seed=11)
    reviews.run(["--dsn", datalake, "--input", str(path), "--quiet"])
    emotions.run(["--dsn", datalake, "--quiet"])
    (classified,) = query(datalake, "SELECT count(*) FROM review_emotions")[0]
    emotions_before = query(datalake, "SELECT review_id, label FROM review_emotions ORDER BY 1")
    # A lake from before the embeddings: emotions, and embeddings for only some reviews.
    with psycopg.connect(datalake, autocommit=True) as conn:
        conn.execute(
            "DELETE FROM review_embeddings WHERE review_id IN"
            " (SELECT review_id FROM review_embeddings ORDER BY review_id LIMIT 25)"
        )
    assert query(datalake, "SELECT count(*) FROM review_embeddings") == [(classified - 25,)]
    backfill = emotions.run(["--dsn", datalake, "--quiet"])
    assert backfill.records == 25
    assert query(datalake, "SELECT count(*) FROM review_embeddings") == [(classified,)]
    assert query(datalake, "SELECT review_id, label FROM review_emotions ORDER BY 1") == (
        emotions_before
    )
    assert emotions.run(["--dsn", datalake, "--quiet"]).records == 0


def test_a_search_finds_the_reviews_that_say_what_the_query_says(lake):
    hits = find(Query("stopped working after a week", k=5), lake)
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
    assert all(a.similarity >= b.similarity for a, b in zip(hits, hits[1:]))
    found = texts(lake, [h.review_id for h in hits])
    broken = [h for h in hits if any(word in found[h.review_id] for word in BROKEN)]
    assert len(broken) >= 3 and all(h.rating <= 2 for h in hits), hits
    # And the opposite query finds the opposite reviews.
    happy = find(Query("best purchase ever, I love it", k=3), lake)
    assert all(h.rating >= 4 for h in happy), happy


def test_filters_combine_and_never_come_back_short(lake):
    every = Query("disappointed, it broke", k=200, min_rating=1, max_rating=2)
    filtered = find(every, lake)
    assert filtered and all(1 <= h.rating <= 2 for h in filtered)
    emotion = filtered[0].emotion
    both = find(Query("disappointed, it broke", k=5, max_rating=2, emotion=emotion), lake)
    assert both and all(h.rating <= 2 and h.emotion == emotion for h in both)
    (matching,) = query(
        lake,
        "SELECT count(*) FROM reviews r JOIN review_emotions m USING (review_id)"
        " JOIN review_embeddings USING (review_id) WHERE r.rating <= 2 AND m.label = %s",
        (emotion,),
    )[0]
    assert len(both) == min(5, matching)
    # The index path and the exact scan agree on who is in.
    exact = find(Query("disappointed, it broke", k=5, max_rating=2, emotion=emotion), lake, True)
    assert {h.review_id for h in exact} == {h.review_id for h in both}
    (asin,) = query(lake, "SELECT asin FROM reviews GROUP BY asin ORDER BY count(*) DESC")[0]
    of_product = [h.review_id for h in find(Query("good", k=50, asin=asin), lake)]
    assert of_product and query(
        lake,
        "SELECT count(*) FROM reviews WHERE review_id = ANY(%s)" " AND %s IN (asin, parent_asin)",
        (of_product, asin),
    ) == [(len(of_product),)]
    assert find(Query("good", since=datetime.date(2999, 1, 1)), lake) == []
    assert find(Query("good", min_rating=4, max_rating=2), lake) == []  # nothing can match


@pytest.mark.parametrize(
    "bad, says",
    [
        (Query("   "), "empty"),
        (Query("x" * 10_000), "at most"),
        (Query("broken", emotion="happy"), "unknown emotion"),
        (Query("broken", k=0), "k must be"),
        (Query("broken", min_rating=0.5), "min_rating must be"),
    ],
)
def test_a_query_it_cannot_take_says_what_to_change(bad, says):
    with pytest.raises(SearchError, match=says):
        bad.checked()


def test_the_cli_prints_ranked_reviews_and_refuses_bad_queries_with_exit_2(lake):
    done = cli("search", "stopped working after a week", "--dsn", lake, "--k", "3")
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.strip().splitlines()
    assert header.split()[:4] == ["#", "sim", "rating", "emotion"] and len(rows) == 3
    assert [r.split()[0] for r in rows] == ["1", "2", "3"]
    as_json = cli("search", "stopped working after a week", "--dsn", lake, "--k", "3", "--json")
    found = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [f["rank"] for f in found] == [1, 2, 3] and all(f["emotion"] in LABELS for f in found)
    for args in ([""], ["x" * 10_000], ["broken", "--emotion", "happy"], ["a", "--since", "May"]):
        refused = cli("search", *args, "--dsn", lake)
        assert refused.returncode == 2, refused.stderr
        assert "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) == 1


def test_the_cli_says_when_there_is_nothing_to_search_yet(datalake):
    done = cli("search", "anything", "--dsn", datalake)
    assert done.returncode == 1 and "run emotions" in done.stdout + done.stderr


def test_rest_search_answers_as_the_cli_with_the_same_auth_and_400_for_bad_queries(
    lake, datalake, tmp_path
):
    cli_hits = cli("search", "stopped working after a week", "--dsn", lake, "--json", "--k", "4")
    expected = [json.loads(line) for line in cli_hits.stdout.splitlines()]
    with serving(service.create_app(make_settings(lake, tmp_path))) as url:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=url, timeout=60) as http:
            assert http.get("/v1/search", params={"q": "broken"}).status_code == 401
            answer = http.get(
                "/v1/search", params={"q": "stopped working after a week", "k": 4}, headers=auth
            )
            assert answer.status_code == 200, answer.text
            assert answer.json()["hits"] == expected
            low = http.get(
                "/v1/search",
                params={"q": "it broke", "max_rating": 2, "emotion": expected[0]["emotion"]},
                headers=auth,
            ).json()["hits"]
            assert low and all(
                h["rating"] <= 2 and h["emotion"] == expected[0]["emotion"] for h in low
            )
            bad = ({"q": ""}, {"q": " "}, {"q": "x" * 10_000}, {"q": "a", "emotion": "happy"})
            for params in bad + ({"q": "a", "k": 0}, {"q": "a", "since": "May"}):
                refused = http.get("/v1/search", params=params, headers=auth)
                assert refused.status_code == 400, refused.text
                assert refused.json()["error"]["code"] == "bad_query"
            schema = http.get("/openapi.json").json()["paths"]["/v1/search"]["get"]
            assert {"400", "401", "409"} <= set(schema["responses"])
    (tmp_path / "empty").mkdir()
    with serving(service.create_app(make_settings(datalake, tmp_path / "empty"))) as url:
        empty = httpx.get(f"{url}/v1/search", params={"q": "a"}, headers=auth, timeout=60)
        assert empty.status_code == 409 and "run emotions" in empty.json()["error"]["message"]


def test_the_emotions_notebook_finds_reviews_like_this_one(lake, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    from test_notebooks import NOTEBOOK_DIR, ROOT

    monkeypatch.setenv("TERMIDATOR_DSN", lake)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    nb = nbformat.read(NOTEBOOK_DIR / "03_emotions.ipynb", as_version=4)
    NotebookClient(nb, timeout=240, kernel_name="python3").execute(cwd=str(NOTEBOOK_DIR))
    search_cells = [c for c in nb.cells if c.cell_type == "code" and "reviews_like(" in c.source]
    shown = [
        o["data"]["text/plain"]
        for c in search_cells
        for o in c.outputs
        if o.output_type == "display_data" and "text/plain" in o.get("data", {})
    ]
    assert len(shown) == 3 and all("similarity" in table for table in shown), shown
    assert any(word in shown[0].lower() for word in BROKEN), shown[0]
