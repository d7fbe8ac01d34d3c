"""End to end: `rsir serve` starts a real Prefect server and worker on loopback and deploys
prefect.yaml; `prefect deployment run` executes every deployment of prefect.yaml once, on tiny
data, through that worker; every process stops."""

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
import yaml

from core.workspace import Workspace
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


def deployments() -> list[dict]:
    """The deployments of prefect.yaml, in its order (what `rsir serve` deploys)."""
    return yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]


def deployment_id(deployment: dict) -> str:
    """FLOW/DEPLOYMENT as `prefect deployment run` names it: the flow's name comes from the
    entrypoint (path/to/module.py:attribute), imported here."""
    import importlib

    path, attribute = deployment["entrypoint"].split(":")
    flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), attribute)
    return f"{flow.name}/{deployment['name']}"


def _tiny_checkpoint(ws: Workspace) -> str:
    """θ_1 of the `iterate` run (trained on D_1 of the run's fork of `tiny`)."""
    found = [path for path in sorted((ws.checkpoints / "by-content").glob("*.pt"))
             if _trained_on(path)[0].startswith("tiny--") and _trained_on(path)[1] == 1]
    assert len(found) == 1, found
    return str(found[0])


def _trained_on(checkpoint: Path) -> tuple[str, int]:
    """The dataset and version a stored checkpoint was trained on (its meta)."""
    from storage.checkpoints import read_checkpoint

    meta = read_checkpoint(checkpoint)["meta"]
    return meta["dataset"], meta["version"]


# What each deployment of prefect.yaml runs with here, over its own parameters: tiny data and
# models, seconds each. Every deployment needs an entry (test_every_deployment_is_exercised), so
# a deployment added to prefect.yaml is run by the test below as soon as it has one. In
# prefect.yaml's order: `evaluate` uses the checkpoint `iterate` trained.
TINY_PARAMETERS = {
    "iterate": lambda ws: {"K": 1, **TINY_FLOW, "synthetic_weight": 0.5},
    # θ_1 of the run's fork, on the base dataset: D_1 shares tiny's item table, so it is accepted.
    "evaluate": lambda ws: {"checkpoint": _tiny_checkpoint(ws), "dataset": "tiny", "device": "cpu"},
    "experiment": lambda ws: {"smoke": True, "datasets": ["tiny"], "seeds": [0], "device": "cpu", "threads": 1},
    "tune": lambda ws: {"dataset": "tiny", "trials": 2, "threads": 1, "tau": "5..20 log", "m": "2",
                        "run_params": {**{k: v for k, v in TINY_FLOW.items() if k not in ("dataset", "seed", "threads")},
                                       "experiment": "tune"}},
}


def test_every_deployment_is_exercised():
    names = [d["name"] for d in deployments()]
    assert names == list(TINY_PARAMETERS), "give a new deployment tiny parameters in TINY_PARAMETERS"
    assert [deployment_id(d) for d in deployments()] == [
        "rsir/iterate", "rsir-evaluate/evaluate", "rsir-experiment/experiment", "rsir-tune/tune"]


def _run_deployment(name: str, params: dict, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    """`prefect deployment run FLOW/NAME --watch` with each parameter as --param (JSON unless a string)."""
    (deployment,) = [d for d in deployments() if d["name"] == name]
    cmd = [str(BIN / "prefect"), "deployment", "run", deployment_id(deployment), "--watch", "--watch-timeout",
           str(timeout)]
    for key, value in params.items():
        cmd += ["--param", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout + 100)


def _flow_run_logs(done: subprocess.CompletedProcess, env: dict) -> str:
    """The logs of the flow run a `prefect deployment run` created (its id is in its output)."""
    import re

    found = re.search(r"UUID:\s*([0-9a-f-]{36})", done.stdout)
    if found is None:  # no flow run was created
        return ""
    logs = subprocess.run([str(BIN / "prefect"), "flow-run", "logs", found.group(1)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    return logs.stdout


def test_deployment_run_through_server_and_worker(tiny_csv, tmp_path):
    ws = make_tiny_home(tmp_path / "workspace", tiny_csv)
    port = _free_port()
    ready = tmp_path / "ready"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    # This checkout's code in every process (serve, worker, flow runs), whichever checkout the
    # environment's `rsir` was installed from.
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
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
        given, finished = {}, {}
        for deployment in deployments():
            name = deployment["name"]
            given[name] = TINY_PARAMETERS[name](ws)
            done = _run_deployment(name, given[name], cli_env)
            assert done.returncode == 0, (name, done.stdout[-2000:] + done.stderr[-2000:],
                                          _flow_run_logs(done, cli_env)[-4000:])
            assert "Completed" in done.stdout + done.stderr, name
            finished[name] = done

        # iterate: the run's lineage in the store and in MLflow (SQLite in the workspace).
        store = dataset_store(ws)
        checkpoint = Path(given["evaluate"]["checkpoint"])
        fork = _trained_on(checkpoint)[0]  # the iterate run's fork of tiny
        assert store.versions(fork) == [0, 1]

        def query(sql: str, experiment: str) -> set:
            with sqlite3.connect(ws.root / "mlflow.db") as db:
                return {r[0] for r in db.execute(sql + " and experiment_id = (select experiment_id from "
                                                 "experiments where name = ?)", (experiment,))}

        names = query("select name from runs where 1", "rsir")
        weights = query("select value from params join runs using (run_uuid) where key = 'synthetic_weight'", "rsir")
        with sqlite3.connect(ws.root / "mlflow.db") as db:
            aliases = {r[0] for r in db.execute("select alias from registered_model_aliases")}
        assert {"iteration-0", "iteration-1"} <= names and "champion" in aliases
        assert weights == {"0.5"}  # λ travelled from the deployment parameter to the tracked config

        # evaluate: θ_1 of the fork, accepted on tiny (one item table), printed its line and wrote
        # the per-user ranks.
        assert (ws.runs / "tiny" / "v0" / f"ranks-{checkpoint.stem}.parquet").is_file()
        logs = _flow_run_logs(finished["evaluate"], cli_env)
        assert "sasrec on tiny v0: test ndcg@10 0." in logs and str(checkpoint) in logs, logs[-2000:]

        # experiment --smoke: both arms of the main suite ran, and the suite run was tracked.
        suite = query("select name from runs where 1", "experiment-main-smoke")
        arms = query("select value from tags join runs using (run_uuid) where key = 'rsir.label.arm'",
                     "experiment-main-smoke")
        assert "suite-main" in suite and arms == {"fidelity", "no-fidelity"}

        # tune: a study of two trials in the workspace's SQLite storage, nested under its MLflow run.
        import optuna

        study = optuna.load_study(study_name="rsir-tune-tiny-sasrec-seeds0", storage=f"sqlite:///{ws.root / 'optuna.db'}")
        assert len(study.trials) == 2 and "rsir-tune-tiny-sasrec-seeds0" in query("select name from runs where 1", "tune")

        # A bad parameter submitted through the deployment fails the run at its start, named.
        bad = _run_deployment("iterate", {"tau": 0, "dataset": "tiny"}, cli_env, timeout=120)
        assert bad.returncode != 0 and "Failed" in bad.stdout + bad.stderr
        worker_log = "".join(p.read_text() for p in (ws.root / "prefect" / "logs").glob("worker-*.log"))
        assert "invalid parameter 'tau'" in worker_log
        assert store.versions(fork) == [0, 1]  # nothing was computed for the bad run
    finally:
        stop_serve(serve)
    assert not _port_open(port), "the Prefect server still listens after serve stopped"
    leftovers = subprocess.run(["pgrep", "-f", f"--port {port}"], capture_output=True, text=True).stdout.split()
    assert not leftovers, f"processes left running: {leftovers}"
