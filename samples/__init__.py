"""The bundled sample files (one per kind and generation) and the tools that make them:
``generate`` (synthetic datasets in the real formats) and ``make`` (rebuilds the samples)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def sample_files() -> dict[str, list[str]]:
    """The bundled sample files, by pipeline: ``meta_*`` files are product metadata."""
    folder = Path(str(resources.files(__name__)))
    files = sorted(str(p) for p in folder.iterdir() if ".json" in p.name)
    return {
        "products": [f for f in files if Path(f).name.startswith("meta_")],
        "reviews": [f for f in files if not Path(f).name.startswith("meta_")],
    }
