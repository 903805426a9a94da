"""Progress of a running pipeline, with an end in sight: done of total, rate, ETA.

The numbers come from the datalake (``run_counters``, which the sinks and readers add to
as they commit), so they are true on every runner, in-process or not. On a terminal a
live ``tqdm`` bar; elsewhere (CI, ``serve`` jobs, logs) one plain line every few seconds
with the same facts; nothing with ``--quiet``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import threading
import time
from typing import Callable, Iterator, Mapping, Optional, Sequence, TextIO

from connectors import datalake


@dataclasses.dataclass(frozen=True)
class Measure:
    """What a run's progress counts: the sum of ``done`` counters out of ``total`` (None:
    open-ended, e.g. a stream), in ``unit``; ``shown`` counters are named beside it."""

    label: str
    done: Sequence[str]
    total: Optional[int] = None
    unit: str = "records"
    shown: Mapping[str, str] = dataclasses.field(default_factory=dict)  # counter -> words
    # Extra facts for the line (e.g. a stream's backlog), from the launcher's own view.
    detail: Optional[Callable[[], str]] = None
    # The bar the run must clear at its end: a bounded ingest whose dead letters are more
    # than this share of its records fails (--max_bad_fraction).
    max_bad_fraction: Optional[float] = None


def duration(seconds: float) -> str:
    """``4321`` -> ``1:12:01``; ``65`` -> ``1:05``."""
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def amount(value: float, unit: str) -> str:
    """``123456789, "B"`` -> ``117.7 MiB``; records as ``12,345 reviews``."""
    if unit != "B":
        return f"{int(value):,} {unit}"
    for size, name in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if value >= size:
            return f"{value / size:.1f} {name}"
    return f"{int(value)} B"


class Reporter:
    """Polls a run's counters every ``poll_s`` and shows them (see the module's doc)."""

    def __init__(
        self,
        measure: Measure,
        read: Callable[[], dict[str, int]],
        stream: TextIO = sys.stderr,
        every_s: float = 10.0,
        poll_s: float = 1.0,
        terminal: Optional[bool] = None,
    ):
        self.measure = measure
        self._read = read
        self._stream = stream
        self._every_s = every_s
        self._poll_s = poll_s
        self._terminal = stream.isatty() if terminal is None else terminal
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._bar = None
        self._done = 0

    def line(self, counters: dict[str, int], now: Optional[float] = None) -> str:
        """One plain line: done of total (percent), rate, ETA, the shown counters."""
        elapsed = max((now or time.monotonic()) - self._started, 1e-9)
        done = sum(counters.get(name, 0) for name in self.measure.done)
        unit, total = self.measure.unit, self.measure.total
        rate = done / elapsed
        parts = [f"{self.measure.label}: {amount(done, unit)}"]
        if total:
            parts[0] += f" of {amount(total, unit)} ({min(done / total, 1):.1%})"
        parts.append(f"{amount(rate, unit)}/s")
        if total and rate > 0:
            parts.append(f"ETA {duration((total - done) / rate)}")
        parts += self._shown(counters)
        return ", ".join(parts)

    def _shown(self, counters: dict[str, int]) -> list[str]:
        shown = [f"{counters.get(n, 0):,} {words}" for n, words in self.measure.shown.items()]
        if self.measure.detail is not None:
            shown.append(self.measure.detail())
        return shown

    def _show(self) -> None:
        counters = self._read()
        if not self._terminal:
            self._stream.write(self.line(counters) + "\n")
            self._stream.flush()
            return
        from tqdm import tqdm

        unit = self.measure.unit
        if self._bar is None:
            self._bar = tqdm(
                total=self.measure.total,
                desc=self.measure.label,
                unit=unit if unit == "B" else f" {unit}",
                unit_scale=unit == "B",
                unit_divisor=1024 if unit == "B" else 1000,
                file=self._stream,
                dynamic_ncols=True,
            )
        done = sum(counters.get(name, 0) for name in self.measure.done)
        self._bar.update(done - self._done)
        self._done = done
        extra = self._shown(counters)
        if extra:
            self._bar.set_postfix_str(", ".join(extra), refresh=False)

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self._poll_s):
            if self._terminal or time.monotonic() - last >= self._every_s:
                last = time.monotonic()
                try:
                    self._show()
                except Exception:  # noqa: BLE001 - progress never stops a run
                    pass

    @contextlib.contextmanager
    def running(self) -> Iterator["Reporter"]:
        """Show progress from a thread while the block runs."""
        thread = threading.Thread(target=self._run, name="progress", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join(5)
            if self._bar is not None:
                self._bar.close()


@contextlib.contextmanager
def committed(dsn: str, run_id: str) -> Iterator[Callable[[], dict[str, int]]]:
    """A reader of the run's committed counters, on one connection of its own."""
    conn = None

    def read() -> dict[str, int]:
        nonlocal conn
        if conn is None or conn.closed:
            conn = datalake.open_connection(dsn, autocommit=True)
        return datalake.run_counters(conn, run_id)

    try:
        yield read
    finally:
        if conn is not None:
            conn.close()
