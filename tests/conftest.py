"""Shared fixtures. Nothing here writes inside the repository: every workspace is a temp dir."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from rsir.cli import main
from rsir.workspace import Workspace


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("RSIR_HOME", str(tmp_path / "workspace"))


@pytest.fixture
def ws(tmp_path) -> Workspace:
    return Workspace.at(tmp_path / "workspace")


@pytest.fixture(scope="session")
def ml100k_ws(tmp_path_factory) -> Workspace:
    """A workspace with the real ml-100k and ml-100k-sparse, built once per session (read-only)."""
    from tasks.ingest import fetch_builtin

    ws = Workspace.at(tmp_path_factory.mktemp("ml100k") / "workspace")
    fetch_builtin(ws, "ml-100k")
    fetch_builtin(ws, "ml-100k-sparse")
    return ws


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    def json(self) -> dict:
        return json.loads(self.out)


@pytest.fixture
def cli(capsys):
    """Run the `rsir` console entry point in-process."""

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        out, err = capsys.readouterr()
        return CliResult(code, out, err)

    return run


def workspace_files(ws: Workspace) -> list[str]:
    """Every file under the workspace except the download cache (for 'nothing half-written')."""
    if not ws.root.exists():
        return []
    return sorted(str(p.relative_to(ws.root)) for p in ws.root.rglob("*")
                  if p.is_file() and ws.downloads not in p.parents)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
