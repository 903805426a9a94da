"""The layout is the data flow: each package imports only from the layers below it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Package -> the project packages it may import (lowest layer first).
ALLOWED = {
    "transforms": set(),
    "samples": set(),
    "connectors": {"transforms"},
    "training": {"transforms"},
    "pipelines": {"transforms", "connectors", "samples"},
    "analysis": {"transforms", "connectors", "samples", "pipelines"},
    "server": {"transforms", "connectors", "samples", "pipelines"},
}


def project_imports(path: Path) -> set[str]:
    """The project packages a module imports (at any depth in the module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found.update(name.split(".")[0] for name in names if name.split(".")[0] in ALLOWED)
    return found


def test_no_package_imports_from_a_layer_above_it():
    wrong = []
    for package, allowed in ALLOWED.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            for imported in project_imports(path) - allowed - {package}:
                wrong.append(f"{path.relative_to(ROOT)} imports {imported}")
    assert wrong == []


def test_transforms_do_no_io():
    """Pure record logic: no database, no sockets, no HTTP."""
    io_modules = {"psycopg", "socket", "httpx", "urllib", "requests", "subprocess"}
    wrong = []
    for path in sorted((ROOT / "transforms").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            wrong += [f"{path.name}: {n}" for n in names if n.split(".")[0] in io_modules]
    assert wrong == []
