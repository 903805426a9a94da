"""Emotion speed: ``ClassifyEmotions`` in a real Beam pipeline, per worker configuration.

Generates N reviews of realistic length (``samples.generate``), writes them to a temp
JSON-lines file (not ``beam.Create``, which pickles everything), and for each
configuration runs ReadFromText -> parse -> ClassifyEmotions on the DirectRunner's
FnApiRunner in a child process of its own. A configuration is MODE:WxT: runner mode
(in_memory: worker threads in one process sharing one model; multi_processing: worker
processes, a model each), W workers, T torch threads each. Reports reviews/s (end to end,
and after startup: a 64-review run's wall time subtracted), RunInference's busy time per
review, model load time and peak RSS (main process, largest worker). A first step,
in-process with one thread, shows where the time goes: tokenising, padding, the model.

    python bench/emotion_speed.py --reviews 4000 [--workers in_memory:2x1 ...] \
        [--dtype auto float32] [--repeat 2] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.machine import cpu, load  # noqa: E402
from transforms.emotion import MAX_BATCH_SIZE  # noqa: E402
from transforms.emotion_model import DEFAULT_MODEL  # noqa: E402

DEFAULT_WORKERS = ("in_memory:1x1", "in_memory:1x2", "in_memory:2x1", "multi_processing:2x1")


def parse_line(line: str, number: int = 0):
    """A generated review line -> a canonical ``Review``, through the project's own parse
    and clean (so the bench feeds the model exactly what the pipelines do)."""
    from transforms.clean import clean_review
    from transforms.parse import parse_record
    from transforms.records import RawRecord

    return clean_review(parse_record(RawRecord("bench", number, line)))


def write_input(path: Path, reviews: int, fmt: int, seed: int) -> None:
    """The generated review lines, one JSON object per line."""
    from samples.generate import iter_lines

    with open(path, "w", encoding="utf-8") as handle:
        for line in iter_lines("reviews", fmt, reviews, seed=seed):
            handle.write(line + "\n")


class _PeakRss:
    """Samples VmHWM (peak RSS) of this process and its descendants until stopped."""

    def __init__(self, interval: float = 0.25):
        self.peaks: dict[int, tuple[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def __enter__(self) -> "_PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self._sample()

    def _sample(self) -> None:
        for pid in _descendants(os.getpid()):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    kib = int(line.split()[1])
                    old = self.peaks.get(pid, ("", 0))[1]
                    self.peaks[pid] = (cmdline, max(old, kib))

    def worker_peaks_mib(self) -> list[float]:
        """Peak RSS of each SDK worker subprocess, MiB."""
        return [
            kib / 1024
            for pid, (cmd, kib) in self.peaks.items()
            if pid != os.getpid() and "sdk_worker_main" in cmd
        ]

    def main_peak_mib(self) -> float:
        return self.peaks.get(os.getpid(), ("", 0))[1] / 1024


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            for task in Path(f"/proc/{current}/task").iterdir():
                children = (task / "children").read_text().split()
                todo.extend(int(c) for c in children)
        except OSError:
            continue
    return found


def run_config(args: argparse.Namespace) -> dict:
    """One configuration, in this (child) process: the pipeline, its counters, its peaks."""
    import apache_beam as beam
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    from transforms.emotion import ClassifyEmotions

    from transforms.emotion_model import fastest_dtype

    use_embeddings(args.embeddings)
    mode, shape = args.child.split(":")
    workers, threads = (int(x) for x in shape.split("x"))
    options = PipelineOptions(
        direct_running_mode=mode, direct_num_workers=workers, pickle_library="cloudpickle"
    )
    started = time.perf_counter()
    with _PeakRss() as rss:
        pipeline = beam.Pipeline(runner=FnApiRunner(), options=options)
        result_pcolls = (
            pipeline
            | "Read" >> beam.io.ReadFromText(args.input)
            | "Parse" >> beam.Map(parse_line)
            | "ClassifyEmotions"
            >> ClassifyEmotions(
                model=args.model,
                max_tokens=args.max_tokens,
                torch_threads=threads,
                dtype=args.dtype,
                min_batch_size=args.min_batch_size,
                max_batch_size=args.max_batch_size,
                reshuffle=not args.no_reshuffle,
            )
        )
        _ = result_pcolls.emotions | "Drop" >> beam.Filter(lambda _: False)
        result = pipeline.run()
        result.wait_until_finish()
    wall = time.perf_counter() - started
    metrics = result.metrics().query(MetricsFilter())

    def total(name: str) -> int:
        return sum(c.committed for c in metrics["counters"] if c.key.metric.name == name)

    latency = [
        d.committed
        for d in metrics["distributions"]
        if d.key.metric.name == "inference_batch_latency_micro_secs"
    ]
    load = [
        d.committed
        for d in metrics["distributions"]
        if d.key.metric.name == "load_model_latency_milli_secs"
    ]
    classified = total("emotion_classified")
    busy_s = sum(d.sum for d in latency) / 1e6
    worker_peaks = rss.worker_peaks_mib() or [rss.main_peak_mib()]
    return {
        "config": args.child,
        "dtype": args.dtype if args.dtype != "auto" else f"auto: {fastest_dtype(threads)}",
        "classified": classified,
        "dead_letters": total("emotion_dead_letters"),
        "skipped_no_text": total("emotion_skipped_no_text"),
        "wall_s": wall,
        "reviews_per_s": classified / wall if wall else 0.0,
        "wall_ms_per_review": 1000 * wall / classified if classified else 0.0,
        "busy_ms_per_review": 1000 * busy_s / classified if classified else 0.0,
        "model_load_ms": max((d.max for d in load if d.count), default=0),
        "main_peak_mib": rss.main_peak_mib(),
        "worker_peak_mib": max(worker_peaks),
        "workers_seen": len(rss.worker_peaks_mib()),
        "model_loads": sum(d.count for d in load),
    }


def use_embeddings(mode: str) -> None:
    """Run the default model with its embeddings computed as ``mode`` ("base" or "tuned",
    see ``transforms.emotion_model.build_network``); "shipped": as the package ships it."""
    if mode == "shipped":
        return
    from transforms import emotion_model

    artefact = Path(tempfile.mkdtemp(prefix=f"artefact-{mode}-"))
    for name in emotion_model.ARTEFACT_FILES:
        (artefact / name).write_bytes((emotion_model.ARTEFACT / name).read_bytes())
    config = json.loads((artefact / "config.json").read_text())
    (artefact / "config.json").write_text(json.dumps({**config, "embeddings": mode}))
    emotion_model.ARTEFACT = artefact


def run_profile(args: argparse.Namespace) -> dict:
    """Where the time goes, in-process, one thread: tokenising, padding, the model."""
    from transforms import emotion_model
    from transforms.emotion import EmotionInput, LoadedEmotionModel, model_text

    use_embeddings(args.embeddings)

    with open(args.input, encoding="utf-8") as handle:
        reviews = [parse_line(line) for _, line in zip(range(args.profile), handle)]
    texts = [model_text(r.title, r.text) for r in reviews]
    items = [EmotionInput(str(i), None, None, t) for i, t in enumerate(texts) if t]
    model = LoadedEmotionModel(args.model, "cpu", args.max_tokens, 1, args.dtype)
    model.classify(items[:64])  # warm up
    size = args.max_batch_size
    batches = [items[i : i + size] for i in range(0, len(items), size)]
    started = time.perf_counter()
    ids = [model.token_ids([x.text for x in b]) for b in batches]
    tokenise = time.perf_counter() - started
    real = sum(len(x) for b in ids for x in b)
    unsorted_padded = sum(len(b) * max(len(x) for x in b) for b in ids)
    sorted_padded = 0
    for b in ids:
        order = sorted(range(len(b)), key=lambda i: len(b[i]))
        for chunk in emotion_model.sub_batches(order, [len(x) for x in b]):
            width = emotion_model.padded_width(max(len(b[i]) for i in chunk))
            sorted_padded += len(chunk) * width
    started = time.perf_counter()
    for b in ids:
        model.run(b)
    unsorted = time.perf_counter() - started
    started = time.perf_counter()
    for b in batches:
        model.classify(b)
    full = time.perf_counter() - started
    n = len(items)
    return {
        "reviews": n,
        "mean_tokens": real / n,
        "truncated_share": sum(len(x) >= model.max_tokens for b in ids for x in b) / n,
        "tokenise_ms": 1000 * tokenise / n,
        "padding_unsorted": unsorted_padded / real,
        "padding_sorted": sorted_padded / real,
        "model_unsorted_ms": 1000 * unsorted / n,
        "classify_sorted_ms": 1000 * full / n,
        "dtype": model.dtype,
    }


def _child(args: argparse.Namespace, extra: Sequence[str], source: Optional[str] = None) -> dict:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    cmd = [sys.executable, __file__, *extra, "--input", source or args.input]
    cmd += ["--model", args.model, "--max-tokens", str(args.max_tokens)]
    cmd += ["--embeddings", args.embedding]
    cmd += [
        "--min-batch-size",
        str(args.min_batch_size),
        "--max-batch-size",
        str(args.max_batch_size),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(extra)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the profile and every configuration; print (and optionally append) a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reviews", type=int, default=2000, help="reviews to classify")
    parser.add_argument("--workers", nargs="+", default=list(DEFAULT_WORKERS), help="MODE:WxT")
    parser.add_argument(
        "--dtype", nargs="+", default=["auto"], help="auto, int8, float32, bfloat16"
    )
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument(
        "--embeddings",
        nargs="+",
        default=["shipped"],
        help="the default model's embeddings: shipped, base or tuned (one row set each)",
    )
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--min-batch-size", type=int, default=8)
    parser.add_argument("--max-batch-size", type=int, default=MAX_BATCH_SIZE)
    parser.add_argument("--format", type=int, default=2023, choices=(2018, 2023))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per configuration; the fastest is reported"
    )
    parser.add_argument("--profile", type=int, default=1024, help="reviews in the profile step")
    parser.add_argument(
        "--startup-reviews",
        type=int,
        default=64,
        help="a run this small, per configuration, measures the fixed startup cost",
    )
    parser.add_argument(
        "--no-reshuffle", action="store_true", help="ClassifyEmotions(reshuffle=False)"
    )
    parser.add_argument("--markdown", help="append the results to this file")
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--profile-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child or args.profile_child:
        args.dtype, args.embeddings = args.dtype[0], args.embeddings[0]
        print(json.dumps(run_profile(args) if args.profile_child else run_config(args)))
        return 0
    from transforms.emotion import EmotionModelError, check_model

    try:
        check_model(args.model)
    except EmotionModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for config in args.workers:
        mode, _, shape = config.partition(":")
        if mode not in ("in_memory", "multi_processing") or "x" not in shape:
            print(
                f"error: bad --workers {config!r}; use e.g. multi_processing:2x1", file=sys.stderr
            )
            return 2
    with tempfile.TemporaryDirectory(prefix="emotion-speed-") as tmp:
        args.input = str(Path(tmp) / "reviews.jsonl")
        write_input(Path(args.input), args.reviews, args.format, args.seed)
        small = str(Path(tmp) / "startup.jsonl")
        write_input(Path(small), args.startup_reviews, args.format, args.seed)
        load_before = load()
        lines = [
            f"{args.reviews:,} generated {args.format} reviews, model {args.model}, max_tokens "
            f"{args.max_tokens}, batches {args.min_batch_size}-{args.max_batch_size}, "
            f"fastest of {args.repeat} run(s) per row; {cpu()}; load average before {load_before}",
            "",
        ]
        variants = [(e, d) for e in args.embeddings for d in args.dtype]
        profile_args = []
        for args.embedding, dtype in variants:
            p = _child(args, ["--profile-child", "--dtype", dtype, "--profile", str(args.profile)])
            profile_args.append({**p, "embeddings": args.embedding})
        lines += [
            f"Where the time goes (in-process, 1 thread, {profile_args[0]['reviews']} reviews: "
            f"{profile_args[0]['mean_tokens']:.0f} tokens on average, "
            f"{100 * profile_args[0]['truncated_share']:.0f}% cut at {args.max_tokens}):",
            "",
            "| embeddings | dtype | tokenise ms/review | padded/real tokens, batch of "
            f"{args.max_batch_size} | same, length-sorted sub-batches | model ms/review, padded "
            "batch | classify ms/review, sorted sub-batches |",
            "|---|---|---|---|---|---|---|",
        ]
        for p in profile_args:
            lines.append(
                f"| {p['embeddings']} | {p['dtype']} | {p['tokenise_ms']:.2f} | {p['padding_unsorted']:.2f} | "
                f"{p['padding_sorted']:.2f} | {p['model_unsorted_ms']:.1f} | "
                f"{p['classify_sorted_ms']:.1f} |"
            )
        lines += [
            "",
            "| embeddings | runner mode | workers x threads | dtype | reviews/s | reviews/s after startup "
            f"({args.startup_reviews}-review run subtracted) | wall ms/review | "
            "inference busy ms/review | model load ms | peak RSS main MiB | peak RSS per worker MiB "
            "| model loads |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        print("\n".join(lines), flush=True)
        for args.embedding, dtype in variants:
            for config in args.workers:
                extra = ["--no-reshuffle"] if args.no_reshuffle else []
                runs = [
                    _child(args, ["--child", config, "--dtype", dtype, *extra])
                    for _ in range(args.repeat)
                ]
                r = min(runs, key=lambda x: x["wall_s"])
                r0 = min(
                    (
                        _child(args, ["--child", config, "--dtype", dtype, *extra], small)
                        for _ in range(args.repeat)
                    ),
                    key=lambda x: x["wall_s"],
                )
                span = r["wall_s"] - r0["wall_s"]
                marginal = (r["classified"] - r0["classified"]) / span if span > 0 else 0.0
                mode, shape = config.split(":")
                row = (
                    f"| {args.embedding} | {mode} | {shape} | {r['dtype']} | {r['reviews_per_s']:.1f} | {marginal:.1f} | "
                    f"{r['wall_ms_per_review']:.1f} | {r['busy_ms_per_review']:.1f} | "
                    f"{r['model_load_ms']:.0f} | {r['main_peak_mib']:.0f} | "
                    f"{r['worker_peak_mib']:.0f} | {r['model_loads']} |"
                )
                if r["dead_letters"] or r["classified"] + r["skipped_no_text"] != args.reviews:
                    row += f" ({r['classified']} classified, {r['dead_letters']} dead letters)"
                lines.append(row)
                print(row, flush=True)
        lines.append("")
        lines.append(f"load average after: {load()}")
        print(lines[-1])
    if args.markdown:
        with open(args.markdown, "a", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
