"""A run's stop request: a file whose existence tells its sources to stop taking new
work, so that what is in flight is written and the run ends cleanly. A file, not a flag
in memory, so that every worker process on the machine (or on a shared filesystem) sees
it, whatever the runner."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Optional

from connectors.datalake import termidator_home


def stop_file(run_id: str, home: Optional[Path] = None) -> str:
    """Where the stop request of a run is made."""
    return str((home or termidator_home()) / "stops" / run_id)


def stop_requested(path: Optional[str]) -> bool:
    """Whether the run was asked to stop (a stat: cheap enough to ask per page or block)."""
    return path is not None and os.path.exists(path)


def request_stop(path: str) -> None:
    """Ask the run's sources to stop taking new work."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).touch()


def clear_stop(path: str) -> None:
    """Forget a stop request once its run has ended."""
    with contextlib.suppress(OSError):
        os.unlink(path)
