"""``python -m pipelines notebook``: JupyterLab in ``notebooks/``, connected to the datalake.

The datalake's DSN goes into ``TERMIDATOR_DSN`` (starting the embedded server if that is
the one in use) and the project root onto ``PYTHONPATH``, so every kernel's first cell
connects and imports the project's code with no configuration.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Optional

from connectors import datalake
from pipelines import interrupts

PROJECT_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = PROJECT_ROOT / "notebooks"
INSTALL_HINT = "pip install -e '.[notebooks]' (or: pip install jupyterlab)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's flags (JupyterLab's own settings come from its usual config files)."""
    parser.add_argument("--dsn", default=None, help="default $TERMIDATOR_DSN, else embedded")
    parser.add_argument(
        "--ip", default="127.0.0.1", help="address to listen on (0.0.0.0 in Docker)"
    )
    parser.add_argument("--port", type=int, default=8888, help="port to listen on")
    parser.add_argument(
        "--no-browser", action="store_true", help="do not open a browser (servers, Docker)"
    )
    parser.add_argument(
        "--notebook-dir",
        default=None,
        help=f"folder to serve (default: the project's notebooks/, {NOTEBOOKS})",
    )


def notebook_dir(args: argparse.Namespace) -> Path:
    """The folder JupyterLab serves: ``--notebook-dir``, else the project's ``notebooks/``."""
    folder = Path(args.notebook_dir).expanduser() if args.notebook_dir else NOTEBOOKS
    if not folder.is_dir():
        from pipelines.options import UsageError

        raise UsageError(f"no notebooks folder at {folder}: pass --notebook-dir PATH")
    return folder.resolve()


def command(
    args: argparse.Namespace, dsn: str, environ: Optional[Mapping[str, str]] = None
) -> tuple[list[str], dict[str, str]]:
    """The JupyterLab command line and its environment: DSN set, project importable."""
    environ = dict(os.environ if environ is None else environ)
    paths = [str(PROJECT_ROOT)] + [p for p in environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**environ, "TERMIDATOR_DSN": dsn, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}
    argv = [
        sys.executable,
        "-m",
        "jupyterlab",
        f"--ServerApp.root_dir={notebook_dir(args)}",
        f"--ServerApp.ip={args.ip}",
        f"--ServerApp.port={args.port}",
    ]
    if args.no_browser:
        argv.append("--ServerApp.open_browser=False")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # Containers and CI machines often run as root, which JupyterLab refuses by default.
        argv.append("--ServerApp.allow_root=True")
    return argv, env


def main(args: argparse.Namespace) -> int:
    """Resolve and migrate the datalake, then run JupyterLab until it stops; the first
    Ctrl-C shuts it down gracefully (its kernels too) and exits 130."""
    if importlib.util.find_spec("jupyterlab") is None:
        from pipelines.options import UsageError

        raise UsageError(f"JupyterLab is not installed: {INSTALL_HINT}")
    dsn = datalake.resolve_dsn(args.dsn)
    datalake.migrate(dsn)  # a fresh lake has its tables, so the notebooks can query it
    argv, env = command(args, dsn)
    print(f"datalake: {datalake.redact(dsn)}", flush=True)
    folder = notebook_dir(args)
    print(f"JupyterLab: {folder} on {args.ip}:{args.port}", flush=True)
    # Its own session: a Ctrl-C reaches this process only, which asks JupyterLab to stop
    # (SIGTERM: it shuts its kernels down) instead of JupyterLab's "are you sure" prompt.
    # Kernels and terminals start beside the notebooks.
    jupyter = subprocess.Popen(argv, env=env, cwd=folder, start_new_session=True)
    try:
        with interrupts.on_interrupt(jupyter.terminate):
            code = jupyter.wait()
    finally:
        if jupyter.poll() is None:
            jupyter.kill()
    if interrupts.requested():
        print("interrupted: JupyterLab stopped (saved notebooks are kept)", flush=True)
        return interrupts.EXIT_INTERRUPTED
    return code
