"""``python -m pipelines report``: the datalake as one static, self-contained HTML page.

The page is made from the notebooks' own queries (``frames.Datalake``) and plots (``plots``),
so it shows what they show; its plots are inline PNG, so it opens anywhere, offline, as one
file. An empty lake still gives a page, saying what to run first.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import html
import io
import os
import string
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import matplotlib
import pandas as pd

from analysis import frames, plots
from connectors import datalake

if TYPE_CHECKING:
    from matplotlib.axes import Axes

DEFAULT_OUTPUT = "report.html"
RUN_FIRST = "python -m pipelines run"
RUN_EMOTIONS = "python -m pipelines run emotions"
RUNS_SHOWN = 20
EXAMPLE_CHARACTERS = 160  # of a dead letter's raw line
DPI = 90


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's flags."""
    parser.add_argument(
        "--output", default=DEFAULT_OUTPUT, help=f"the page to write (default {DEFAULT_OUTPUT})"
    )
    parser.add_argument("--dsn", default=None, help="default $TERMIDATOR_DSN, else embedded")


def main(args: argparse.Namespace) -> int:
    """Write the report to ``--output`` atomically and print where it is and how big."""
    path = Path(args.output).expanduser().absolute()
    if path.is_dir() or not path.parent.is_dir():
        from pipelines.options import UsageError

        wrong = f"{path} is a folder" if path.is_dir() else f"no folder {path.parent}"
        raise UsageError(f"{wrong}: --output names the page to write, e.g. {DEFAULT_OUTPUT}")
    matplotlib.use("Agg")  # headless: a process of its own, drawing only into PNGs
    dsn = datalake.resolve_dsn(args.dsn)
    datalake.migrate(dsn)  # a fresh lake has its tables, so its page can say what to run
    _write_atomically(path, render(dsn).encode("utf-8"))
    print(f"report: {path} ({_size(path.stat().st_size)})")
    return 0


def render(dsn: Optional[str] = None) -> str:
    """The datalake at ``dsn`` (default: as the CLI resolves it) as one HTML page."""
    lake = frames.Datalake(dsn)
    counts = lake.table_counts()
    sections = [
        ("rows", "Rows", _rows(lake, counts)),
        ("runs", "Runs", _runs(lake)),
        ("dead-letters", "Dead letters", _dead_letters(lake)),
        ("ratings", "Ratings", _ratings(lake)),
        ("emotions", "Emotions", _emotions(lake)),
    ]
    empty = not (counts.get("reviews", 0) or counts.get("products", 0))
    notice = (
        f'<p class="notice">The datalake is empty. Run <code>{RUN_FIRST}</code> first: it'
        " ingests the bundled samples and classifies their emotions (or <code>python -m"
        " pipelines run reviews --input PATH</code> for your own files); then make this"
        " report again.</p>"
        if empty
        else ""
    )
    generated = datetime.datetime.now(datetime.timezone.utc)
    return _PAGE.substitute(
        generated=f"{generated:%Y-%m-%d %H:%M:%S} UTC",
        dsn=html.escape(datalake.redact(lake.dsn)),
        notice=notice,
        contents="".join(f'<li><a href="#{key}">{title}</a></li>' for key, title, _ in sections),
        sections="".join(
            f'<section id="{key}"><h2>{title}</h2>{body}</section>' for key, title, body in sections
        ),
    )


# --- the sections ---------------------------------------------------------------------


def _rows(lake: frames.Datalake, counts: pd.Series) -> str:
    generations = lake.rows_by_generation()
    if generations.empty:
        by_generation = "<p>No reviews or products yet.</p>"
    else:
        by_generation = _table(generations, "rows-per-generation") + _image(
            plots.bar(
                generations,
                "Reviews and products per source generation",
                "generation",
                "rows",
                legend_title="table",
            )
        )
    return "".join(
        [
            _table(counts.to_frame(), "rows-per-table"),
            _plot(
                counts[counts > 0],
                lambda filled: plots.bar(filled, "Rows per datalake table", "table", "rows"),
                "Every table is empty.",
            ),
            "<h3>Per source generation</h3>",
            by_generation,
        ]
    )


def _runs(lake: frames.Datalake) -> str:
    runs = lake.pipeline_runs(RUNS_SHOWN)
    if runs.empty:
        return f"<p>No runs yet: <code>{RUN_FIRST}</code>.</p>"
    states = runs["state"].value_counts()
    summary = ", ".join(f"{n} {html.escape(state)}" for state, n in states.items())
    abandoned = (
        " ABANDONED: the run's process died (or its heartbeat stopped) before it finished;"
        " what it committed is kept, and running it again completes it."
        if "ABANDONED" in states
        else ""
    )
    shown = runs.rename(
        columns={
            "started_at": "started (UTC)",
            "dead_letters": "dead letters",
            "records_per_s": "records/s",
            "run_id": "run id",
        }
    ).drop(columns=["records_read"])
    timed = runs.dropna(subset=["records_per_s"])
    speeds = timed.set_index(timed["pipeline"] + " " + timed["started_at"].map(_utc))
    return "".join(
        [
            f"<p>The latest {len(runs)} runs, newest first: {summary}.{abandoned}</p>",
            _table(shown, "runs"),
            _plot(
                speeds["records_per_s"],
                lambda speed: plots.bar(
                    speed, "Speed of the latest runs", "records/s", "run", horizontal=True
                ),
                "No finished run with counters yet.",
            ),
        ]
    )


def _dead_letters(lake: frames.Datalake) -> str:
    counts = lake.dead_letter_counts()
    if counts.empty:
        return "<p>No dead letters: every record read became a row.</p>"
    by_stage = counts.groupby("stage", as_index=False)["dead_letters"].sum()
    reasons = counts.head(10)
    examples = frames.reason_examples(lake.dead_letters()).head(10)
    examples = examples.assign(
        where=examples["source"].fillna("?")
        + ":"
        + examples["line"].astype("Int64").astype("string").fillna("?"),
        raw=examples["raw"].fillna("").str.slice(0, EXAMPLE_CHARACTERS),
    )[["pipeline", "stage", "reason", "where", "error", "raw"]]
    return "".join(
        [
            "<p>Records refused at a stage (read, parse, clean, sink, ...), with why. They"
            " are kept in the <code>dead_letters</code> table with their raw line.</p>",
            _table(by_stage.rename(columns={"dead_letters": "dead letters"}), "dead-by-stage"),
            "<h3>By reason</h3>",
            _table(counts.rename(columns={"dead_letters": "dead letters"}), "dead-by-reason"),
            _image(
                plots.bar(
                    reasons.set_index(reasons["stage"] + ": " + reasons["reason"])["dead_letters"],
                    "Dead letters by stage and reason",
                    "dead letters",
                    "stage: reason",
                    horizontal=True,
                )
            ),
            "<h3>Examples (the latest of each reason)</h3>",
            _table(examples, "dead-examples"),
        ]
    )


def _ratings(lake: frames.Datalake) -> str:
    ratings = lake.rating_distribution()
    if ratings.empty:
        return f"<p>No reviews yet: <code>{RUN_FIRST}</code>.</p>"
    categories = lake.top_categories(10)
    yearly = lake.ratings_over_time("year")
    reviews = lake.reviews_over_time("year")
    return "".join(
        [
            _table(ratings, "ratings"),
            _image(
                plots.bar(
                    ratings,
                    "Reviews per star rating",
                    "stars",
                    "reviews",
                    stacked=True,
                    legend_title="generation",
                )
            ),
            "<h3>Per product category</h3>",
            _table(categories.rename(columns={"mean_rating": "mean rating"}), "categories"),
            _image(
                plots.heatmap(
                    frames.shares(lake.ratings_by_category(10)),
                    "Star ratings per product category",
                    "stars",
                    "main category",
                    "share of the category's reviews",
                )
            ),
            "<h3>Over time</h3>",
            _image(
                plots.lines(
                    frames.shares(yearly),
                    "Share of each star rating among the year's reviews",
                    "year",
                    "share of the year's reviews",
                    area=True,
                    legend_title="stars",
                )
            ),
            _image(
                plots.bar(
                    reviews.set_axis(reviews.index.year),
                    "Reviews per year, by generation",
                    "year",
                    "reviews",
                    stacked=True,
                    legend_title="generation",
                )
            ),
        ]
    )


def _emotions(lake: frames.Datalake) -> str:
    models = lake.emotion_models()
    if models.empty:
        return f"<p>No emotions yet: run <code>{RUN_EMOTIONS}</code>.</p>"
    model = lake.emotion_model()
    return "".join(
        [
            f"<p>Emotions of the model <code>{html.escape(model)}</code> (the models in the"
            " lake are below; the pipeline's default one is shown when present).</p>",
            _table(models, "emotion-models"),
            _image(
                plots.bar(
                    lake.emotion_distribution(model),
                    f"Reviews per emotion ({model})",
                    "emotion",
                    "reviews",
                )
            ),
            "<h3>Per product category</h3>",
            _plot(
                lake.emotion_by_category(model, 10),
                lambda table: plots.heatmap(
                    frames.shares(table),
                    "Emotion by product category (share of each category's reviews)",
                    "emotion",
                    "main category",
                    "share of the category's reviews",
                ),
                "No classified review is joined to a product.",
            ),
            "<h3>Per star rating</h3>",
            _plot(
                lake.emotion_by_rating(model),
                lambda table: plots.heatmap(
                    frames.shares(table),
                    "Emotion by star rating (share of each rating's reviews)",
                    "emotion",
                    "stars",
                    "share of the rating's reviews",
                ),
                "No classified review is in the lake.",
            ),
            "<h3>Over time</h3>",
            _plot(
                lake.emotions_over_time(model, "year"),
                lambda table: plots.lines(
                    frames.shares(table),
                    "Share of each emotion among the year's reviews",
                    "year",
                    "share of the year's reviews",
                    area=True,
                    legend_title="emotion",
                ),
                "No classified review is in the lake.",
            ),
        ]
    )


# --- HTML -----------------------------------------------------------------------------


def _plot(data: Any, draw: Callable[[Any], "Axes"], nothing: str) -> str:
    """The plot of ``data`` as an image, or a line saying there is nothing to plot."""
    return f"<p>{html.escape(nothing)}</p>" if data.empty else _image(draw(data))


def _image(ax: "Axes") -> str:
    """A drawn plot as an inline PNG ``<img>`` (its title as the alt text); closes it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    try:
        ax.figure.savefig(buffer, format="png", dpi=DPI)
    finally:
        plt.close(ax.figure)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="{html.escape(ax.get_title())}" src="data:image/png;base64,{data}">'


def _table(frame: pd.DataFrame, table_id: str) -> str:
    """A frame as an HTML table, every cell escaped: a named index first, as labels (a
    generation is 2014, not 2,014); the values formatted by ``_cell``."""
    cells = frame.map(_cell)
    if frame.index.name is not None:
        cells = cells.set_axis(frame.index.map(str)).reset_index()
    return cells.rename_axis(columns=None).to_html(index=False, border=0, table_id=table_id)


def _cell(value: Any) -> str:
    """One value for a reader: whole numbers with thousands separators, other numbers to
    about three digits, times in UTC, nothing as a dash."""
    if pd.api.types.is_scalar(value) and pd.isna(value):
        return "–"
    if isinstance(value, (datetime.datetime, pd.Timestamp)):
        return _utc(value)
    if pd.api.types.is_float(value) and float(value).is_integer():
        value = int(value)  # a count in a column that has gaps
    if pd.api.types.is_integer(value):
        return f"{value:,}"
    if pd.api.types.is_float(value):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"
    return str(value)


def _utc(moment: datetime.datetime) -> str:
    return f"{pd.Timestamp(moment).tz_convert('UTC'):%Y-%m-%d %H:%M:%S}"


def _size(size: int) -> str:
    return f"{size / 1024:,.1f} KiB" if size < 1024**2 else f"{size / 1024**2:,.1f} MiB"


def _write_atomically(path: Path, data: bytes) -> None:
    """Write under a hidden temporary name beside ``path``, then rename it into place, so a
    reader sees the previous page or the new one, never half of one."""
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        temp.write_bytes(data)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


_PAGE = string.Template("""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>TermiDator datalake report</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; }
header p { margin: 0.2em 0; color: #555; }
nav ul { padding-left: 1.2em; }
section { margin-top: 2.5em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.3em 0.7em; text-align: left;
         vertical-align: top; max-width: 40em; overflow-wrap: anywhere; }
th { background: #f3f3f3; }
img { display: block; max-width: 100%; margin: 1em 0; }
code { background: #f3f3f3; padding: 0.1em 0.3em; }
.notice { background: #fff4d6; border-left: 4px solid #e0a800; padding: 0.8em 1em; }
</style>
</head>
<body>
<header>
<h1>TermiDator datalake report</h1>
<p>generated $generated</p>
<p>datalake: <code>$dsn</code></p>
</header>
$notice
<nav><ul>$contents</ul></nav>
$sections
</body>
</html>
""")
