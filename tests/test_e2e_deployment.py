"""End to end: `rsir serve` starts a real Prefect server and worker on loopback and deploys
prefect.yaml; `prefect deployment run rsir/iterate` executes the flow; every process stops."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storage.dataset import dataset_store
from tests.conftest import TINY_FLOW, make_tiny_home

pytestmark = pytest.mark.prefect
REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def stop_serve(proc: subprocess.Popen, timeout: float = 90) -> None:
    """Ctrl-C an `rsir serve` (its whole session) and require a clean exit."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, proc.stdout.read().decode()[-2000:] if proc.stdout else proc.returncode


def test_deployment_run_through_server_and_worker(tiny_csv, tmp_path):
    ws = make_tiny_home(tmp_path / "workspace", tiny_csv)
    port = _free_port()
    ready = tmp_path / "ready"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    serve = subprocess.Popen([str(BIN / "rsir"), "serve", "--port", str(port), "--home", str(ws.root),
                              "--ready-file", str(ready)], cwd=REPO, env=env, start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not ready.exists() and serve.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert ready.exists(), serve.stdout.read().decode()[-3000:] if serve.poll() is not None else "serve not ready"
        api = json.loads(ready.read_text())["prefect_api"]
        assert api == f"http://127.0.0.1:{port}/api"
        cli_env = {**env, "PREFECT_API_URL": api, "PREFECT_HOME": str(ws.root / "prefect")}
        params = {"K": 1, **TINY_FLOW, "model_params": json.dumps(TINY_FLOW["model_params"]), "synthetic_weight": 0.5}
        cmd = [str(BIN / "prefect"), "deployment", "run", "rsir/iterate", "--watch", "--watch-timeout", "300"]
        for key, value in params.items():
            cmd += ["--param", f"{key}={value}"]
        done = subprocess.run(cmd, cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "Completed" in done.stdout + done.stderr

        # The outcome: the run's lineage in the store and in MLflow (SQLite in the workspace).
        store = dataset_store(ws)
        runs = [n for n in store.names() if n.startswith("tiny--")]
        assert len(runs) == 1 and store.versions(runs[0]) == [0, 1]
        with sqlite3.connect(ws.root / "mlflow.db") as db:
            names = {r[0] for r in db.execute("select name from runs")}
            aliases = {r[0] for r in db.execute("select alias from registered_model_aliases")}
            weights = {r[0] for r in db.execute("select value from params where key = 'synthetic_weight'")}
        assert {"iteration-0", "iteration-1"} <= names and "champion" in aliases
        assert weights == {"0.5"}  # λ travelled from the deployment parameter to the tracked config

        # A bad parameter submitted through the deployment fails the run at its start, named.
        bad = subprocess.run([*cmd[:4], "--param", "tau=0", "--param", "dataset=tiny", "--watch",
                              "--watch-timeout", "120"], cwd=REPO, env=cli_env, capture_output=True, text=True,
                             timeout=200)
        assert bad.returncode != 0 and "Failed" in bad.stdout + bad.stderr
        worker_log = "".join(p.read_text() for p in (ws.root / "prefect" / "logs").glob("worker-*.log"))
        assert "invalid parameter 'tau'" in worker_log
        assert store.versions(runs[0]) == [0, 1]  # nothing was computed for the bad run
    finally:
        stop_serve(serve)
    assert not _port_open(port), "the Prefect server still listens after serve stopped"
    leftovers = subprocess.run(["pgrep", "-f", f"--port {port}"], capture_output=True, text=True).stdout.split()
    assert not leftovers, f"processes left running: {leftovers}"
