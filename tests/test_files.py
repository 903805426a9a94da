"""The bounded reader: formats, globs, blank lines, truncated gzip, bad bytes."""

from __future__ import annotations

import contextlib
import gzip
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from connectors.files import NoInputError, ReadDataset, expand_inputs

LINES = [f'{{"n": {i}, "text": "{"x" * (i % 50)}"}}' for i in range(1, 301)]


def write(path: Path, lines: list[str], gz: bool = False) -> Path:
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@contextlib.contextmanager
def read_all(patterns):
    """(records as (file name, line, text), dead letters as (file name, line, error))."""
    with TestPipeline() as p:
        result = p | ReadDataset(patterns, "test")
        records = result.records | "R" >> beam.Map(lambda r: (Path(r.source).name, r.line, r.text))
        dead = result.dead_letters | "D" >> beam.Map(
            lambda d: (Path(d.source).name, d.line, d.stage, d.error.split(";")[0])
        )
        yield records, dead


def run_read(patterns, expected_records, expected_dead):
    with read_all(patterns) as (records, dead):
        assert_that(records, equal_to(expected_records), label="records")
        assert_that(dead, equal_to(expected_dead), label="dead")


@pytest.mark.parametrize(
    "name, gz", [("a.json", False), ("a.jsonl", False), ("a.json.gz", True), ("a.jsonl.gz", True)]
)
def test_reads_every_extension_gzipped_or_not(tmp_path, name, gz):
    write(tmp_path / name, LINES[:3], gz)
    run_read(str(tmp_path / name), [(name, i + 1, LINES[i]) for i in range(3)], [])


def test_gzip_is_recognised_by_content_not_name(tmp_path):
    write(tmp_path / "misnamed.json", LINES[:2], gz=True)
    run_read(
        str(tmp_path / "misnamed.json"),
        [("misnamed.json", 1, LINES[0]), ("misnamed.json", 2, LINES[1])],
        [],
    )


def test_globs_and_several_inputs(tmp_path):
    write(tmp_path / "x1.json", LINES[:1])
    write(tmp_path / "x2.json", LINES[1:2])
    write(tmp_path / "y.jsonl", LINES[2:3])
    run_read(
        [str(tmp_path / "x*.json"), str(tmp_path / "y.jsonl"), str(tmp_path / "x1.json")],
        [("x1.json", 1, LINES[0]), ("x2.json", 1, LINES[1]), ("y.jsonl", 1, LINES[2])],
        [],
    )


def test_blank_lines_are_skipped_and_line_numbers_stay_physical(tmp_path):
    (tmp_path / "b.json").write_text(f"{LINES[0]}\n\n   \n{LINES[1]}\r\n{LINES[2]}")
    run_read(
        str(tmp_path / "b.json"),
        [("b.json", 1, LINES[0]), ("b.json", 4, LINES[1]), ("b.json", 5, LINES[2])],
        [],
    )


def test_truncated_gzip_keeps_every_complete_line_and_dead_letters_the_break(tmp_path):
    data = gzip.compress(("\n".join(LINES) + "\n").encode())
    cut = tmp_path / "cut.json.gz"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with gzip.open(cut, "rt") as f:  # what gzip itself can still recover
        recovered = []
        try:
            for line in f:
                recovered.append(line)
        except EOFError:
            pass
    complete = sum(1 for line in recovered if line.endswith("\n"))
    assert 0 < complete < len(LINES)
    expected = [("cut.json.gz", i + 1, LINES[i]) for i in range(complete)]
    with read_all(str(cut)) as (records, dead):
        assert_that(records, equal_to(expected), label="records")
        assert_that(
            dead,
            equal_to(
                [
                    (
                        "cut.json.gz",
                        complete + 1,
                        "read",
                        "gzip stream ends before its end marker (truncated file)",
                    )
                ]
            ),
            label="dead",
        )


def test_concatenated_gzip_members_are_read_whole(tmp_path):
    path = tmp_path / "multi.json.gz"
    path.write_bytes(
        gzip.compress((LINES[0] + "\n").encode()) + gzip.compress((LINES[1] + "\n").encode())
    )
    run_read(str(path), [("multi.json.gz", 1, LINES[0]), ("multi.json.gz", 2, LINES[1])], [])


def test_a_line_that_is_not_utf8_is_a_dead_letter(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes(LINES[0].encode() + b"\n" + '{"t": "caf\xe9"}'.encode("latin-1") + b"\n")
    run_read(
        str(path),
        [("latin1.json", 1, LINES[0])],
        [
            (
                "latin1.json",
                2,
                "read",
                "not UTF-8 text: 'utf-8' codec can't decode byte 0xe9 in position 10: invalid continuation byte",
            )
        ],
    )


def test_no_match_is_a_clear_error(tmp_path):
    with pytest.raises(NoInputError, match="no file matches"):
        expand_inputs([str(tmp_path / "nothing*.json")])
    with pytest.raises(NoInputError, match="no input given"):
        expand_inputs([])


@pytest.mark.parametrize("gz", [False, True])
def test_line_numbers_and_bad_bytes_survive_block_boundaries(tmp_path, monkeypatch, gz):
    """Lines are decoded a block at a time: numbering, CRLF and a non-UTF-8 line must not
    depend on where the (here tiny) blocks happen to end."""
    import connectors.files as files

    monkeypatch.setattr(files, "CHUNK_BYTES", 97)
    lines = [line.encode() for line in LINES[:120]]
    lines[7] = b""  # blank
    lines[50] = LINES[50].encode() + b"\r"  # CRLF
    lines[90] = '{"t": "caf\xe9"}'.encode("latin-1")  # not UTF-8
    data = b"\n".join(lines) + b"\n"
    path = tmp_path / "blocks.json"
    path.write_bytes(gzip.compress(data) if gz else data)

    assert list(files.iter_lines(str(path))) == list(enumerate(data.split(b"\n")[:-1], 1))
    out = list(files.read_lines(str(path), "test"))
    records = [(r.line, r.text) for r in out if type(r) is files.RawRecord]
    dead = [(d.line, d.error.split(":")[0]) for d in out if type(d) is files.DeadLetter]
    expected = [(i + 1, LINES[i]) for i in range(120) if i not in (7, 90)]  # line 51 loses its \r
    assert records == expected
    assert dead == [(91, "not UTF-8 text")]


def test_a_directory_means_the_dataset_files_in_it_recursively(tmp_path):
    for name in ("a.jsonl", "sub/b.json.gz", "sub/deeper/c.ndjson", ".hidden.jsonl"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}\n")
    (tmp_path / "notes.txt").write_text("not a dataset")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x.json").write_text("{}")
    found = [Path(p).relative_to(tmp_path).as_posix() for p in expand_inputs(str(tmp_path))]
    assert found == ["a.jsonl", "sub/b.json.gz", "sub/deeper/c.ndjson"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoInputError, match="no dataset file in"):
        expand_inputs(str(tmp_path / "empty"))
