"""Prefect's home is the workspace's `prefect` folder, or the user's $PREFECT_HOME: never `~/.prefect`.
Prefect creates its home when first imported, from the settings it reads then, so rsir sets
PREFECT_HOME before anything imports Prefect; a command refused for bad input creates no home at
all. Each command runs in its own process (in this one Prefect is imported long before), with
$HOME a temp folder and none of the test session's PREFECT_* settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import make_tiny_home

REPO = Path(__file__).resolve().parent.parent


def rsir_as_user(args: list[str], home: Path, **env: str) -> subprocess.CompletedProcess:
    """`rsir ARGS` with $HOME `home`, the environment a user has (no PREFECT_* but `env`'s)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    home.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-m", "rsir.cli", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**base, "HOME": str(home), "PYTHONPATH": str(REPO), **env})


def test_a_refused_run_creates_no_prefect_home(tmp_path):
    ws = tmp_path / "workspace"
    done = rsir_as_user(["run", "--dataset", "ml-100k-sprase", "--home", ws], tmp_path / "user")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "'ml-100k-sprase'" in done.stderr, done.stderr
    assert not (tmp_path / "user" / ".prefect").exists() and not (ws / "prefect").exists()


def test_a_run_keeps_prefect_home_in_the_workspace(tiny_csv, tmp_path, prefect_api):
    """A whole `rsir run` (on the session's Prefect server: the client side is what imports
    Prefect in this process)."""
    ws = make_tiny_home(tmp_path / "workspace", tiny_csv)
    done = rsir_as_user(["run", "--dataset", "tiny", "--seed", "0", "--threads", "1", "--model-params", "hidden=16",
                         "--model-params", "max_len=20", "--json", "-K", "0", "--epochs", "1", "--home", ws.root],
                        tmp_path / "user", PREFECT_API_URL=prefect_api)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (tmp_path / "user" / ".prefect").exists()
    assert (ws.root / "prefect").is_dir()


def test_the_users_prefect_home_wins(tmp_path):
    """`rsir evaluate` imports Prefect (its task module declares a Prefect task) before it finds
    the checkpoint missing: the home Prefect makes then is the user's."""
    ws, own = tmp_path / "workspace", tmp_path / "own-prefect"
    done = rsir_as_user(["evaluate", "--checkpoint", tmp_path / "missing.pt", "--home", ws], tmp_path / "user",
                        PREFECT_HOME=str(own))
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert own.is_dir() and not (tmp_path / "user" / ".prefect").exists() and not (ws / "prefect").exists()
