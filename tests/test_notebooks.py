"""The notebooks run headless against a datalake the pipelines filled, and
``python -m pipelines notebook`` serves them with the datalake already connected."""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pandas as pd
import psycopg
import pytest
from nbclient import NotebookClient

from conftest import query
from analysis import frames, notebook, plots
from pipelines import cli, products, reviews
from pipelines.options import UsageError
from samples import sample_files

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
DEFAULT_MODEL = "minilm-lora-goemotions-ekman"
LABELS = ("anger", "disgust", "fear", "joy", "neutral", "sadness", "surprise")
PLOTTING = re.compile(r"plt\.show\(\)|plots\.(?:bar|lines|heatmap|scatter|histogram|boxplot)\(")

# Injected around each notebook by the test only: every figure the kernel renders must have
# a title (its axes' or the figure's) and both axis labels; colour bars a label.
FIGURE_CHECK = """
from matplotlib.figure import Figure as _Figure

get_ipython().run_line_magic("matplotlib", "inline")  # registers the inline PNG formatter
_unlabelled = []
_png = get_ipython().display_formatter.formatters["image/png"]
_render = _png.lookup_by_type(_Figure)


def _check_then_render(fig, *args, **kwargs):
    suptitle = fig._suptitle.get_text() if fig._suptitle else ""
    for ax in fig.axes:
        if ax.get_label() == "<colorbar>":
            if not (ax.get_ylabel() or ax.get_xlabel()):
                _unlabelled.append("a colour bar without a label")
        elif not (ax.get_title() or suptitle) or not ax.get_xlabel() or not ax.get_ylabel():
            _unlabelled.append(f"{ax.get_title()!r}: x={ax.get_xlabel()!r} y={ax.get_ylabel()!r}")
    return _render(fig, *args, **kwargs)


_png.for_type(_Figure, _check_then_render)
"""
FIGURES_LABELLED = "assert not _unlabelled, _unlabelled"


def load_samples(dsn: str) -> None:
    """Fill the datalake the way `python -m pipelines run` does: products, then reviews."""
    for module, name in ((products, "products"), (reviews, "reviews")):
        inputs = [arg for path in sample_files()[name] for arg in ("--input", path)]
        module.run(cli.with_default_runner(["--dsn", dsn, *inputs]))


def add_test_emotions(dsn: str) -> None:
    """TEST DATA, NOT A MODEL: plausible ``review_emotions`` rows for every review with text.

    The emotions step of `python -m pipelines run` (torch, ~20 s) is not what these tests
    are about, so the test writes rows of the same schema itself: a label leaning on the
    star rating, probabilities that sum to 1 (seeded: the same rows every run). A few rows
    of a second model check that several models coexist and the default one is chosen.
    """
    leaning = {
        1: {"anger": 4, "disgust": 3, "sadness": 3, "fear": 1, "neutral": 1, "surprise": 1},
        2: {"disgust": 3, "sadness": 3, "anger": 2, "neutral": 2, "fear": 1, "surprise": 1},
        3: {"neutral": 4, "surprise": 2, "sadness": 1, "joy": 2, "fear": 1},
        4: {"joy": 5, "neutral": 2, "surprise": 2},
        5: {"joy": 7, "surprise": 2, "neutral": 1},
    }
    rows = []
    for review_id, rating in query(
        dsn, "SELECT review_id, rating FROM reviews WHERE text IS NOT NULL ORDER BY review_id"
    ):
        rng = random.Random(review_id)
        weights = leaning[int(round(rating))]
        raw = {label: rng.gammavariate(0.3 + 2.0 * weights.get(label, 0), 1.0) for label in LABELS}
        total = sum(raw.values())
        scores = {label: value / total for label, value in raw.items()}
        label = max(scores, key=scores.get)
        rows.append((review_id, DEFAULT_MODEL, label, scores[label], json.dumps(scores)))
    other = [
        (r[0], "test-other-model", "neutral", 1.0, json.dumps({"neutral": 1.0})) for r in rows[:5]
    ]
    with psycopg.connect(dsn) as conn:
        # The schema of connectors/sql/002_emotions.sql, for a lake migrated without it.
        conn.execute(
            "CREATE TABLE IF NOT EXISTS review_emotions (review_id text NOT NULL,"
            " model text NOT NULL, label text NOT NULL, score real NOT NULL,"
            " scores jsonb NOT NULL, classified_at timestamptz NOT NULL DEFAULT now(),"
            " PRIMARY KEY (review_id, model))"
        )
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO review_emotions (review_id, model, label, score, scores)"
                " VALUES (%s, %s, %s, %s, %s::jsonb) ON CONFLICT DO NOTHING",
                rows + other,
            )


@pytest.fixture
def filled_lake(datalake):
    """A fresh datalake with the bundled samples ingested by the pipelines, and test emotions."""
    load_samples(datalake)
    add_test_emotions(datalake)
    return datalake


def test_notebooks_are_stored_clean_and_use_the_project_code():
    names = {path.name for path in NOTEBOOKS}
    assert names >= {
        "01_interactive_pipeline.ipynb",
        "02_datalake_overview.ipynb",
        "03_emotions.ipynb",
    }
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        code = [cell for cell in nb.cells if cell.cell_type == "code"]
        assert all(not cell.outputs and cell.execution_count is None for cell in code), path.name
        assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
        assert sum(cell.cell_type == "markdown" for cell in nb.cells) >= 5, path.name
        assert "from analysis import frames, plots" in code[0].source
    first = nbformat.read(NOTEBOOK_DIR / "01_interactive_pipeline.ipynb", as_version=4)
    interactive = "\n".join(cell.source for cell in first.cells)
    for name in ("InteractiveRunner", "ReadDataset", "ReadParseClean"):
        assert name in interactive
    assert "ib.show(" in interactive and "ib.collect(" in interactive


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_runs_headless_with_labelled_plots(path, filled_lake, monkeypatch):
    monkeypatch.setenv("TERMIDATOR_DSN", filled_lake)  # what `pipelines notebook` sets
    pythonpath = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), pythonpath])))
    nb = nbformat.read(path, as_version=4)
    own_cells = list(nb.cells)
    nb.cells = (
        [nbformat.v4.new_code_cell(FIGURE_CHECK)]
        + own_cells
        + [nbformat.v4.new_code_cell(FIGURES_LABELLED)]
    )

    NotebookClient(
        nb,
        timeout=240,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    ).execute()

    errors = [o for cell in nb.cells for o in cell.get("outputs", []) if o.output_type == "error"]
    assert errors == []
    plotting = [
        cell for cell in own_cells if cell.cell_type == "code" and PLOTTING.search(cell.source)
    ]
    assert plotting, "each notebook has plots"
    for cell in plotting:
        images = [o for o in cell.outputs if "image/png" in o.get("data", {})]
        assert images, f"no image from:\n{cell.source}"


# --- the analysis module, on the same lake ------------------------------------------------


def test_analysis_reads_the_lake_the_pipelines_filled(filled_lake):
    lake = frames.Datalake(filled_lake)
    counts = lake.table_counts()
    assert counts["reviews"] == query(filled_lake, "SELECT count(*) FROM reviews")[0][0] > 0
    assert counts["review_emotions"] > 0 and counts["pipeline_runs"] == 2
    generations = lake.rows_by_generation()
    assert list(generations.index) == [2014, 2018, 2023]
    assert generations["reviews"].sum() == counts["reviews"]
    ratings = lake.rating_distribution()
    assert list(ratings.index) == [1, 2, 3, 4, 5] and ratings.to_numpy().sum() == counts["reviews"]
    monthly = lake.reviews_over_time("month")
    assert monthly.to_numpy().sum() == counts["reviews"]
    assert (monthly.index[1:] - monthly.index[:-1]).max() <= pd.Timedelta(days=31)
    assert lake.dead_letter_counts()["dead_letters"].sum() == 2

    assert lake.emotion_model() == DEFAULT_MODEL  # the default, though two models are stored
    by_rating = lake.emotion_by_rating(DEFAULT_MODEL)
    assert list(by_rating.columns) == list(LABELS)
    assert by_rating.to_numpy().sum() == lake.emotion_distribution(DEFAULT_MODEL).sum()
    examples = lake.emotion_examples(DEFAULT_MODEL, per_label=1)
    assert {f"p_{label}" for label in LABELS} <= set(examples.columns)
    assert examples[[f"p_{label}" for label in LABELS]].sum(axis=1).round(3).eq(1.0).all()
    with pytest.raises(ValueError, match="period must be one of"):
        lake.reviews_over_time("fortnight")


def test_reasons_group_dead_letter_errors():
    assert frames.reason("2014 review: rating must be a number from 1 to 5, got None") == (
        "rating must be a number from 1 to 5"
    )
    assert frames.reason(
        "this is a product record (2018 format), not a review; ingest it with `run products`"
    ) == ("this is a product record")
    assert frames.reason("truncated or malformed record (not JSON: unexpected end)") == (
        "truncated or malformed record"
    )
    assert frames.reason("missing reviewerID") == "missing reviewerID"
    dead = pd.DataFrame(
        {
            "pipeline": ["reviews"] * 3,
            "stage": ["parse", "parse", "clean"],
            "error": ["not UTF-8 text: a", "not UTF-8 text: b", "2018 review: missing asin"],
        }
    )
    counted = frames.count_reasons(dead)
    assert counted.values.tolist() == [
        ["reviews", "parse", "not UTF-8 text", 2],
        ["reviews", "clean", "missing asin", 1],
    ]


def test_plots_refuse_to_go_unlabelled():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with pytest.raises(ValueError, match="needs a ylabel"):
        plots.bar(pd.Series([1, 2], index=["a", "b"]), "A title", "x", "")
    plt.close("all")


# --- python -m pipelines notebook ---------------------------------------------------------


def test_notebook_command_sets_the_dsn_and_makes_the_project_importable(tmp_path):
    args = argparse.Namespace(ip="0.0.0.0", port=9999, no_browser=True, notebook_dir=None, dsn=None)
    argv, env = notebook.command(args, "postgresql://u@h/db", {"PYTHONPATH": "/elsewhere"})
    assert argv[:3] == [sys.executable, "-m", "jupyterlab"]
    assert f"--ServerApp.root_dir={NOTEBOOK_DIR}" in argv
    assert "--ServerApp.ip=0.0.0.0" in argv and "--ServerApp.port=9999" in argv
    assert "--ServerApp.open_browser=False" in argv
    assert env["TERMIDATOR_DSN"] == "postgresql://u@h/db"
    assert env["PYTHONPATH"].split(os.pathsep) == [str(ROOT), "/elsewhere"]
    with pytest.raises(UsageError, match="no notebooks folder"):
        notebook.command(
            argparse.Namespace(**{**vars(args), "notebook_dir": str(tmp_path / "x")}), "d"
        )


def _get(url: str, token: str):
    request = urllib.request.Request(url, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.load(response)


def _post(url: str, token: str, body: dict):
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"token {token}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def test_notebook_command_serves_the_notebooks_with_the_datalake_connected(filled_lake, tmp_path):
    pytest.importorskip("jupyterlab", reason="JupyterLab comes with the notebooks extra")
    from jupyter_client import BlockingKernelClient

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    token = "test-token"
    runtime = tmp_path / "runtime"
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("TERMIDATOR_DSN", "PYTHONPATH")},
        "JUPYTER_TOKEN": token,
        "JUPYTER_RUNTIME_DIR": str(runtime),
        "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"),
    }
    log = tmp_path / "jupyterlab.log"
    with open(log, "wb") as output:
        server = subprocess.Popen(
            [sys.executable, "-m", "pipelines", "notebook", "--dsn", filled_lake]
            + ["--port", str(port), "--no-browser"],
            cwd=ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    base = f"http://127.0.0.1:{port}"
    client = None
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, log.read_text()[-3000:]
            try:
                contents = _get(f"{base}/api/contents", token)
                break
            except OSError:
                assert time.monotonic() < deadline, "JupyterLab did not answer in 90 s"
                time.sleep(0.5)
        served = sorted(item["name"] for item in contents["content"] if item["type"] == "notebook")
        assert served == [path.name for path in NOTEBOOKS]

        # Open a notebook the way JupyterLab does (a session), and run code in its kernel.
        session = _post(
            f"{base}/api/sessions",
            token,
            {
                "path": "02_datalake_overview.ipynb",
                "type": "notebook",
                "kernel": {"name": "python3"},
            },
        )
        kernel = session["kernel"]
        client = BlockingKernelClient()
        client.load_connection_file(str(runtime / f"kernel-{kernel['id']}.json"))
        client.start_channels()
        client.wait_for_ready(timeout=60)
        code = (
            "import os, json\n"
            "from analysis import frames\n"
            "lake = frames.Datalake()\n"
            "print(json.dumps({'dsn': os.environ['TERMIDATOR_DSN'], 'cwd': os.getcwd(),"
            " 'reviews': int(lake.table_counts()['reviews'])}))\n"
        )
        printed = []
        reply = client.execute_interactive(
            code,
            timeout=120,
            output_hook=lambda msg: printed.append(msg["content"].get("text", "")),
        )
        assert reply["content"]["status"] == "ok", reply["content"]
        seen = json.loads("".join(printed).strip().splitlines()[-1])
        assert seen["dsn"] == filled_lake
        assert Path(seen["cwd"]) == NOTEBOOK_DIR
        assert seen["reviews"] == query(filled_lake, "SELECT count(*) FROM reviews")[0][0]
    finally:
        if client is not None:
            client.stop_channels()
        server.send_signal(signal.SIGINT)  # Ctrl-C: JupyterLab is asked to stop, gracefully
        try:
            assert server.wait(timeout=30) == 130
        finally:
            server.kill()
            server.wait()
    assert "interrupted: JupyterLab stopped" in log.read_text()
