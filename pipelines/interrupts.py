"""Ctrl-C, the same for every command: the first stops taking new work, the second exits
at once. The one place where SIGINT is handled.

The first Ctrl-C calls the graceful stoppers a command registered (``on_interrupt``: a
stream stops following and drains); with none, it raises ``KeyboardInterrupt`` in the
main thread, which the command turns into "interrupted, work so far kept" and exit 130.
The second Ctrl-C ends the process immediately with 130.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Callable, Iterator

EXIT_INTERRUPTED = 130
_stoppers: list[Callable[[], None]] = []
_requested = threading.Event()


def requested() -> bool:
    """Whether Ctrl-C was pressed since ``install``."""
    return _requested.is_set()


def _handle(signum, frame) -> None:
    if _requested.is_set():
        sys.stderr.write("interrupted again: exiting now\n")
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)
    _requested.set()
    if _stoppers:
        sys.stderr.write("stopping: finishing what is in flight (Ctrl-C again to exit now)\n")
        sys.stderr.flush()
        for stop in list(_stoppers):
            stop()
        return
    raise KeyboardInterrupt


def install() -> None:
    """Handle SIGINT as above (main thread only). A process that inherited SIGINT ignored
    (started in the background of a non-interactive shell) keeps ignoring it."""
    _requested.clear()
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, _handle)


@contextlib.contextmanager
def on_interrupt(stop: Callable[[], None]) -> Iterator[None]:
    """Within the block, the first Ctrl-C calls ``stop`` instead of raising."""
    _stoppers.append(stop)
    try:
        yield
    finally:
        _stoppers.remove(stop)
