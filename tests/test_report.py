"""``python -m pipelines report``: one self-contained HTML page of a datalake the pipelines
filled, showing the numbers the datalake holds; an empty lake's page says what to run."""

from __future__ import annotations

import argparse
import base64
import datetime
import io
import json
import re
import subprocess
import sys
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import psycopg
import pytest
from PIL import Image

from conftest import query
from test_notebooks import DEFAULT_MODEL, add_test_emotions, load_samples
from analysis import frames, report
from connectors.datalake import DATALAKE_TABLES, create_database, drop_database, redact
from pipelines import cli, reviews
from pipelines.options import UsageError

ROOT = Path(__file__).resolve().parent.parent
# The command as the CLI will run it: the module's own flags and main, in a fresh process.
COMMAND = (
    "import argparse, sys\n"
    "from analysis import report\n"
    "parser = argparse.ArgumentParser()\n"
    "report.add_arguments(parser)\n"
    "sys.exit(report.main(parser.parse_args()))\n"
)
WROTE = re.compile(r"report: (?P<path>.+) \((?P<size>[\d.,]+) (?P<unit>KiB|MiB)\)")
# Two lines the reviews pipeline refuses (a rating out of range, at the clean stage; a
# product record in a reviews file, at parse), so there are dead letters of two stages.
REFUSED = [
    {"overall": 7.0, "reviewerID": "A1", "asin": "B000000001", "unixReviewTime": 1514764800},
    {"asin": "B000000002", "title": "A product", "categories": [["Beauty"]]},
]


class Page(HTMLParser):
    """The parts of a page the tests read: tables by id, images, links; tags must nest."""

    VOID = {"meta", "img", "br", "hr", "link", "input", "col", "wbr"}

    def __init__(self, text: str):
        super().__init__()
        self.text = text
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[dict[str, str]] = []
        self.links: list[str] = []
        self.tags: Counter = Counter()
        self._open: list[str] = []
        self._table: list[list[str]] = []
        self._cell: list[str] = []
        self.feed(text)
        self.close()
        assert self._open == [], f"unclosed: {self._open}"

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags[tag] += 1
        self.links += [attrs[a] for a in ("src", "href") if attrs.get(a)]
        if tag == "img":
            self.images.append(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("id", f"table{len(self.tables)}"), [])
        elif tag == "tr":
            self._table.append([])
        elif tag in ("td", "th"):
            self._cell = []
        if tag not in self.VOID:
            self._open.append(tag)

    def handle_endtag(self, tag):
        assert self._open and self._open[-1] == tag, f"</{tag}> closes {self._open[-1:]}"
        self._open.pop()
        if tag in ("td", "th"):
            self._table[-1].append("".join(self._cell).strip())

    def handle_data(self, data):
        self._cell.append(data)

    def rows(self, table_id: str) -> list[dict[str, str]]:
        """A table's body rows as {column: cell text}."""
        header, *body = self.tables[table_id]
        return [dict(zip(header, row)) for row in body]


def number(text: str) -> int:
    return int(text.replace(",", ""))


def counted(dsn: str, statement: str) -> dict[str, int]:
    return {str(key): value for key, value in query(dsn, statement)}


@pytest.fixture(scope="module")
def filled_lake(server_dsn, tmp_path_factory):
    """A datalake the pipelines filled from the samples (and two refused lines), with test
    emotions and a run whose process stopped without finishing (its heartbeat is stale)."""
    dsn = create_database(server_dsn, "t")
    load_samples(dsn)
    refused = tmp_path_factory.mktemp("refused") / "refused.jsonl"
    refused.write_text("".join(json.dumps(line) + "\n" for line in REFUSED))
    reviews.run(
        cli.with_default_runner(["--dsn", dsn, "--input", str(refused)])
        + ["--max_bad_fraction", "1"]
    )
    add_test_emotions(dsn)
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "INSERT INTO pipeline_runs (run_id, pipeline, runner, state, started_at, host,"
            " pid, heartbeat_at) VALUES (gen_random_uuid(), 'stream', 'FnApiRunner',"
            " 'RUNNING', now() - interval '1 hour', 'elsewhere', 1, now() - interval '50 min')"
        )
    yield dsn
    drop_database(server_dsn, dsn)


@pytest.fixture(scope="module")
def written(filled_lake, tmp_path_factory):
    """The command run end to end on the filled lake, in a process of its own."""
    folder = tmp_path_factory.mktemp("report")
    output = folder / "report.html"
    finished = subprocess.run(
        [sys.executable, "-c", COMMAND, "--output", str(output), "--dsn", filled_lake],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    return finished.stdout, output


@pytest.fixture(scope="module")
def page(written):
    return Page(written[1].read_text(encoding="utf-8"))


def test_the_command_writes_the_page_atomically_and_says_where(written):
    stdout, output = written
    assert len(stdout.splitlines()) == 1
    said = WROTE.fullmatch(stdout.strip())
    assert said and Path(said["path"]) == output
    unit = 1024 if said["unit"] == "KiB" else 1024**2
    assert abs(float(said["size"].replace(",", "")) * unit - output.stat().st_size) <= 0.05 * unit
    assert [p.name for p in output.parent.iterdir()] == ["report.html"]  # no temp file left


def test_the_page_shows_the_numbers_the_lake_holds(page, filled_lake):
    tables = {row["table"]: number(row["rows"]) for row in page.rows("rows-per-table")}
    assert tables == {
        table: query(filled_lake, f"SELECT count(*) FROM {table}")[0][0]
        for table in DATALAKE_TABLES
    }
    generations = page.rows("rows-per-generation")
    for table in ("reviews", "products"):
        shown = {row["generation"]: number(row[table]) for row in generations}
        held = counted(filled_lake, f"SELECT source_format, count(*) FROM {table} GROUP BY 1")
        assert shown == held and set(held) == {"2014", "2018", "2023"}

    by_stage = {row["stage"]: number(row["dead letters"]) for row in page.rows("dead-by-stage")}
    held = counted(filled_lake, "SELECT stage, count(*) FROM dead_letters GROUP BY 1")
    assert by_stage == held and set(held) >= {"parse", "clean"}
    reasons = page.rows("dead-by-reason")
    assert sum(number(row["dead letters"]) for row in reasons) == sum(held.values())
    examples = page.rows("dead-examples")
    kinds = sorted((row["pipeline"], row["stage"], row["reason"]) for row in reasons)
    assert sorted((row["pipeline"], row["stage"], row["reason"]) for row in examples) == kinds
    assert any("rating must be a number from 1 to 5" in row["error"] for row in examples)

    runs = page.rows("runs")
    held_runs = query(filled_lake, "SELECT run_id::text, pipeline, state FROM pipeline_runs")
    assert sorted((r["run id"], r["pipeline"], r["state"]) for r in runs) == sorted(held_runs)
    assert Counter(r["state"] for r in runs) == {"DONE": 3, "ABANDONED": 1}
    for run in runs:  # a speed for every finished run with counters, none for the abandoned
        assert (run["records/s"] == "–") == (run["state"] == "ABANDONED")
    assert "ABANDONED: the run's process died" in page.text

    models = {row["model"]: number(row["reviews"]) for row in page.rows("emotion-models")}
    assert models == counted(
        filled_lake, "SELECT model, count(*) FROM review_emotions GROUP BY model"
    )
    assert f"Reviews per emotion ({DEFAULT_MODEL})" in [image["alt"] for image in page.images]
    assert "No emotions yet" not in page.text


def test_the_page_is_self_contained_html_with_titled_png_plots(page, filled_lake):
    assert page.tags["html"] == page.tags["body"] == 1
    assert page.tags["script"] == page.tags["link"] == 0  # nothing to fetch, nothing to run
    assert not [link for link in page.links if re.match(r"(?i)\s*(https?:)?//", link)]
    assert all(link.startswith(("data:image/png;base64,", "#")) for link in page.links)
    titles = [image["alt"] for image in page.images]
    assert len(titles) == 12 and all(titles)
    for image in page.images:
        png = base64.b64decode(image["src"].removeprefix("data:image/png;base64,"), validate=True)
        with Image.open(io.BytesIO(png)) as decoded:
            assert decoded.format == "PNG" and min(decoded.size) > 100
            decoded.load()  # the whole image decodes
    header = page.text[: page.text.index("<nav>")]
    assert redact(filled_lake) in header
    stamp = re.search(r"generated (\S+ \S+) UTC", header)[1]
    age = datetime.datetime.now(datetime.timezone.utc) - datetime.datetime.fromisoformat(
        stamp + "+00:00"
    )
    assert datetime.timedelta(0) <= age < datetime.timedelta(minutes=10)


def test_an_empty_lake_gives_a_page_that_says_what_to_run(datalake, tmp_path, capsys):
    output = tmp_path / "report.html"
    output.write_text("a previous report")
    parser = argparse.ArgumentParser()
    report.add_arguments(parser)

    assert report.main(parser.parse_args(["--output", str(output), "--dsn", datalake])) == 0

    said = WROTE.fullmatch(capsys.readouterr().out.strip())
    assert said and Path(said["path"]) == output
    page = Page(output.read_text(encoding="utf-8"))
    text = re.sub(r"<[^>]+>", "", page.text)
    assert "The datalake is empty. Run python -m pipelines run first" in text
    assert "No emotions yet: run python -m pipelines run emotions" in text
    assert "No runs yet" in text and "No reviews yet" in text
    assert {number(row["rows"]) for row in page.rows("rows-per-table")} == {0}
    assert page.images == [] and [p.name for p in tmp_path.iterdir()] == ["report.html"]


@pytest.mark.skipif("report" not in cli.TOOLS, reason="`report` is not in pipelines/cli.py yet")
def test_python_m_pipelines_report_writes_the_page(datalake, tmp_path, capsys):
    output = tmp_path / "report.html"
    assert cli.main(["report", "--output", str(output), "--dsn", datalake]) == 0
    said = WROTE.fullmatch(capsys.readouterr().out.strip())
    assert said and Path(said["path"]) == output
    assert "The datalake is empty" in Page(output.read_text(encoding="utf-8")).text
    assert cli.main(["report", "--output", str(tmp_path / "absent" / "report.html")]) == 2


def test_a_missing_folder_is_a_usage_error_and_writes_nothing(tmp_path):
    args = argparse.Namespace(output=str(tmp_path / "absent" / "report.html"), dsn="unused")
    with pytest.raises(UsageError, match="no folder .*absent: --output names the page"):
        report.main(args)
    assert list(tmp_path.iterdir()) == []


def test_the_queries_the_report_added_add_up(filled_lake):
    lake = frames.Datalake(filled_lake)
    reviews_held = query(filled_lake, "SELECT count(*) FROM reviews")[0][0]
    yearly = lake.ratings_over_time("year")
    assert list(yearly.columns) == [1, 2, 3, 4, 5] and yearly.to_numpy().sum() == reviews_held
    assert (yearly.index[1:].year - yearly.index[:-1].year == 1).all()  # no year left out
    by_category = lake.ratings_by_category(3)
    assert len(by_category) == 3 and list(by_category.columns) == [1, 2, 3, 4, 5]
    totals = by_category.sum(axis=1).tolist()
    top = lake.top_categories(3)
    assert totals == sorted(totals, reverse=True) == top["reviews"].tolist()

    runs = lake.pipeline_runs()
    done = runs[runs["state"] == "DONE"]
    assert (done["records_per_s"] - done["records"] / done["seconds"]).abs().max() < 1e-6
    reviews_run = done[done["pipeline"] == "reviews"].iloc[-1]  # the samples' run
    assert reviews_run["records"] == reviews_run["records_read"] > reviews_run["rows"]

    dead = lake.dead_letters()
    examples = frames.reason_examples(dead, per_reason=1)
    assert len(examples) == len(lake.dead_letter_counts())
    assert examples["reason"].tolist() == [frames.reason(e) for e in examples["error"]]
