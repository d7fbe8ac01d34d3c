"""Imports point one way, from the front door down (docs/ARCHITECTURE.md):

    rsir (the CLI) → deployments → flows → tasks → storage, models → core

(`rsir serve` starts the deployments, so the CLI sits above them.)

A module may import its own package and packages of lower layers only; storage and models,
side by side, never import each other (storage knows no torch modules, models know no files).
Function-level (late) imports count too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = {"core": 0, "models": 1, "storage": 1, "tasks": 2, "flows": 3, "deployments": 4, "rsir": 5}


def imported_packages(source: str) -> set[str]:
    """Top-level names of every module `source` imports, at any depth of the code."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def violations(package: str, source: str) -> list[str]:
    """The project packages that a module of `package` may not import."""
    return sorted(other for other in imported_packages(source) & set(LAYERS)
                  if other != package and LAYERS[other] >= LAYERS[package])


def project_modules() -> list[tuple[str, Path]]:
    return [(package, path) for package in LAYERS for path in sorted((REPO / package).rglob("*.py"))]


@pytest.mark.parametrize("package,path", project_modules(), ids=lambda x: str(x).removeprefix(str(REPO) + "/"))
def test_imports_point_down(package, path):
    bad = violations(package, path.read_text())
    assert not bad, f"{path.relative_to(REPO)} ({package}) imports {', '.join(bad)}: imports must point down"


def test_the_rule_catches_upward_and_sideways_imports():
    # storage/checkpoints.py before issue 11 built models itself: storage must not know models.
    assert violations("storage", "from models import build_model\nfrom models.config import ModelConfig") == [
        "models"]
    assert violations("core", "def f():\n    from tasks.ingest import fetch_builtin\n") == ["tasks"]
    assert violations("tasks", "import flows.rsir") == ["flows"]
    assert violations("models", "import storage.dataset as d") == ["storage"]
    assert violations("flows", "from tasks.train import train_task\nfrom core.errors import RsirError") == []
    assert violations("rsir", "from flows.rsir import rsir\nimport torch") == []


def test_every_project_package_has_a_layer():
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")}
    assert packages - {"tests", "benchmarks"} <= set(LAYERS), packages
