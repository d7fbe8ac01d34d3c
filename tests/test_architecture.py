"""Imports point one way, from the front door down (docs/ARCHITECTURE.md):

    rsir (the CLI) → deployments → flows → reporting → tasks → storage, models → core

(`rsir serve` starts the deployments, so the CLI sits above them; reporting reads runs back
from MLflow for the suites' flows and `rsir report`.)

A module may import its own package and packages of lower layers only; storage and models,
side by side, never import each other (storage knows no torch modules, models know no files).
No two modules import each other, directly or through others (no import circle), inside a
package too. Function-level (late) imports count too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = {"core": 0, "models": 1, "storage": 1, "tasks": 2, "reporting": 3, "flows": 4, "deployments": 5, "rsir": 6}


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


def module_name(path: Path) -> str:
    """tasks/generate.py -> tasks.generate; a package's __init__.py is the package."""
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def type_checking_only(node: ast.AST) -> bool:
    """`if TYPE_CHECKING:` (or `typing.TYPE_CHECKING`): a block that never runs."""
    test = getattr(node, "test", None) if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def runtime_nodes(tree: ast.AST):
    """Every node of `tree` that can run: all but the bodies of `if TYPE_CHECKING:` (annotations)."""
    for node in ast.iter_child_nodes(tree):
        for part in (node.orelse if type_checking_only(node) else [node]):
            yield part
            yield from runtime_nodes(part)


def imported_modules(source: str, known: set[str]) -> set[str]:
    """The modules of `known` that `source` imports when it runs, at any depth of the code (not in
    `if TYPE_CHECKING:`): `from a.b import c` names a.b.c when that is a module, else a.b;
    `import a.b.c` the longest known prefix."""
    found = set()
    for node in runtime_nodes(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                found |= {next((".".join(parts[:n]) for n in range(len(parts), 0, -1)
                                if ".".join(parts[:n]) in known), None)}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in known else node.module if node.module in known else None)
    return found - {None}


def import_circles(sources: dict[str, str]) -> list[list[str]]:
    """Every import circle among the modules (name -> source): the sets of two or more modules
    that reach each other through imports (strongly connected components), each sorted."""
    known = set(sources)
    graph = {name: sorted(imported_modules(src, known) - {name}) for name, src in sources.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(name: str) -> None:  # Tarjan's algorithm
        index[name] = low[name] = len(index)
        stack.append(name)
        for other in graph[name]:
            if other not in index:
                visit(other)
                low[name] = min(low[name], low[other])
            elif other in stack:
                low[name] = min(low[name], index[other])
        if low[name] == index[name]:
            members = []
            while not members or members[-1] != name:
                members.append(stack.pop())
            if len(members) > 1:
                circles.append(sorted(members))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return sorted(circles)


def test_no_import_circle():
    sources = {module_name(path): path.read_text() for _, path in project_modules()}
    assert import_circles(sources) == [], "modules that import each other (directly or through others)"


def test_the_circle_rule_catches_circles_late_and_indirect():
    # tasks/ingest.py and tasks/views.py before issue 25: a late import closed the circle.
    assert import_circles({
        "tasks.ingest": "def fetch_builtin():\n    from tasks.views import fetch_builtin_view\n",
        "tasks.views": "from tasks.ingest import build_sequences, fetch_builtin\n",
    }) == [["tasks.ingest", "tasks.views"]]
    # Through a third module, and with `from package import module` and `import a.b`.
    assert import_circles({
        "tasks": "", "tasks.a": "from tasks import b", "tasks.b": "import tasks.c\n", "tasks.c": "from tasks.a import f",
        "tasks.d": "from tasks.a import f", "core.x": "import numpy",
    }) == [["tasks.a", "tasks.b", "tasks.c"]]
    # Imports for annotations only never run: no circle (models/ before issue 25 needed them).
    assert import_circles({"models": "from models.base import M", "models.config": "def f():\n    from models import g",
                           "models.base": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                          "    from models.config import ModelConfig\n"}) == []
    assert import_circles({"models": "from models.base import M", "models.config": "def f():\n    from models import g",
                           "models.base": "from models.config import ModelConfig\n"}) == [
        ["models", "models.base", "models.config"]]
    # One-way imports are no circle.
    assert import_circles({"tasks.builtin": "from tasks.ingest import publish\nfrom tasks.views import derive_view",
                           "tasks.views": "from tasks.ingest import publish", "tasks.ingest": ""}) == []


def test_every_project_package_has_a_layer():
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")}
    assert packages - {"tests", "benchmarks"} <= set(LAYERS), packages
