"""`rsir serve`: a local Prefect server (SQLite, loopback), the process work pool, the
deployments of prefect.yaml, and a worker; Ctrl-C (or SIGTERM) stops all of them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from core.errors import RsirError
from core.workspace import Workspace
from storage.tracking import MLFLOW_ENVIRONMENT

REPO = Path(__file__).resolve().parent.parent
POOL = "rsir-process"


def prefect_bin() -> str:
    return str(Path(sys.executable).with_name("prefect"))


def serve_env(ws: Workspace, host: str, port: int) -> dict[str, str]:
    return {
        **MLFLOW_ENVIRONMENT,
        **os.environ,
        "PREFECT_API_URL": f"http://{host}:{port}/api",
        "PREFECT_HOME": str(ws.root / "prefect"),
        "PREFECT_SERVER_API_HOST": host,
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(ws.root / "prefect" / "results"),
        "RSIR_HOME": ws.home,
        "RSIR_REPO": str(REPO),  # prefect.yaml's pull step changes into it
    }


def wait_healthy(url: str, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RsirError(f"the Prefect server exited with status {proc.returncode} (is the port in use?)")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RsirError(f"the Prefect server did not answer at {url} within {timeout:.0f} s")


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    # Own session: stopping it stops its children too (the server runs uvicorn and services).
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log.open("ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _stop(proc: subprocess.Popen, grace: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def _run(cmd: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RsirError(f"`{' '.join(cmd[1:])}` failed: {(done.stderr or done.stdout).strip()[-500:]}")


def serve(home: str | None = None, host: str = "127.0.0.1", port: int = 4200, ready_file: str | None = None) -> None:
    ws = Workspace.at(home)
    env = serve_env(ws, host, port)
    logs = ws.root / "prefect" / "logs"
    prefect = prefect_bin()
    procs: list[subprocess.Popen] = []
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(f"starting Prefect server on http://{host}:{port} (logs in {logs})", file=sys.stderr)
        procs.append(_start([prefect, "server", "start", "--host", host, "--port", str(port)], env,
                            logs / "server.log"))
        wait_healthy(f"{env['PREFECT_API_URL']}/health", 120, procs[0])
        _run([prefect, "work-pool", "create", POOL, "--type", "process", "--overwrite"], env)
        _run([prefect, "--no-prompt", "deploy", "--all"], env)
        procs.append(_start([prefect, "worker", "start", "--pool", POOL], env, logs / "worker.log"))
        print(f"ready: UI http://{host}:{port}, API {env['PREFECT_API_URL']}; "
              f"try: PREFECT_API_URL={env['PREFECT_API_URL']} prefect deployment run rsir/iterate --param K=1",
              file=sys.stderr)
        if ready_file:
            Path(ready_file).write_text(env["PREFECT_API_URL"])
        while not stopping:
            for proc in procs:
                if proc.poll() is not None:
                    raise RsirError(f"`{' '.join(proc.args[1:3])}` exited with status {proc.returncode}; "
                                    f"see {logs}")
            time.sleep(0.5)
    finally:
        for proc in reversed(procs):
            _stop(proc)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        print("stopped the worker and the server", file=sys.stderr)
