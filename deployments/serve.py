"""`rsir serve`: the services a team runs, each a real process that rsir starts and stops.

    prefect   the Prefect server (SQLite in the workspace, or PostgreSQL with --database)
    mlflow    an MLflow tracking server (backend --tracking-uri, artifacts in the workspace's store)
    worker    the process work pool, the deployments of prefect.yaml, and N workers

By default one command runs the Prefect server and a worker (add the tracking server with
--mlflow). `--only SERVICE` runs one service, as deployments/compose.yaml does in its containers.
Ctrl-C (or SIGTERM) stops every process rsir started, each as a whole process tree."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from core.config import parse_config
from core.errors import RsirError
from core.workspace import Workspace
from storage.tracking import MLFLOW_ENVIRONMENT, default_tracking_uri, redact_uri

REPO = Path(__file__).resolve().parent.parent
POOL = "rsir-process"
Service = Literal["prefect", "mlflow", "worker"]
LOOPBACK = ("127.0.0.1", "localhost", "::1")
# How often `rsir serve` closes the runs whose worker died (flows/liveness.py): a killed worker
# takes its flow-run process with it, and no later run of that lineage may come to close them.
SWEEP_SECONDS = 60.0


class ServeConfig(BaseModel):
    """What `rsir serve` starts. Validated before any process starts."""

    services: list[Service] = Field(["prefect", "worker"], min_length=1, description="services to run")
    host: str = Field("127.0.0.1", description="interface every server binds (loopback by default)")
    port: int = Field(4200, ge=1, le=65535, description="port of the Prefect server")
    database: str | None = Field(None, description="Prefect's database: postgresql+asyncpg://… "
                                                   "(default: SQLite in the workspace)")
    workers: int = Field(1, ge=1, le=64, description="Prefect workers polling the work pool")
    mlflow_port: int = Field(5000, ge=1, le=65535, description="port of the MLflow tracking server")
    mlflow_workers: int = Field(2, ge=1, le=64, description="request-handling processes of the MLflow server")
    tracking_uri: str | None = Field(None, description="the MLflow server's backend store (with the mlflow "
                                                       "service), else what workers log to")
    prefect_api: str | None = Field(None, description="Prefect API of the workers when this command does not "
                                                      "run the Prefect server (default $PREFECT_API_URL)")

    @field_validator("services")
    @classmethod
    def _unique(cls, services: list[str]) -> list[str]:
        return [s for s in ("prefect", "mlflow", "worker") if s in services]  # start order

    @field_validator("database")
    @classmethod
    def _async_driver(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("postgresql+asyncpg://", "sqlite+aiosqlite://")):
            raise ValueError("Prefect's database must be postgresql+asyncpg://USER@HOST:PORT/DB "
                             "or sqlite+aiosqlite:///PATH")
        return url

    @model_validator(mode="after")
    def _workers_know_their_server(self) -> "ServeConfig":
        if "worker" in self.services and "prefect" not in self.services and not self.api_of_workers:
            raise ValueError("--only worker needs the Prefect server: give --prefect-api or set PREFECT_API_URL")
        if "mlflow" in self.services and (self.tracking_uri or "").startswith(("http://", "https://")):
            raise ValueError("the MLflow server's backend store must be a database (postgresql://… or "
                             "sqlite:///…), not another server")
        return self

    @property
    def api_of_workers(self) -> str | None:
        if "prefect" in self.services:
            return f"http://{_client_host(self.host)}:{self.port}/api"
        return self.prefect_api or os.environ.get("PREFECT_API_URL")

    def tracking_of_workers(self) -> str | None:
        """What the workers' flows log to: this command's MLflow server, else --tracking-uri
        (None: each flow's default, SQLite in the workspace)."""
        if "mlflow" in self.services:
            return f"http://{_client_host(self.host)}:{self.mlflow_port}"
        return self.tracking_uri


def _client_host(host: str) -> str:
    """Where a client on this machine reaches a server bound to `host`."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def prefect_bin() -> str:
    return str(Path(sys.executable).with_name("prefect"))


def mlflow_bin() -> str:
    return str(Path(sys.executable).with_name("mlflow"))


def serve_env(ws: Workspace, cfg: ServeConfig) -> dict[str, str]:
    env = {
        **MLFLOW_ENVIRONMENT,
        **os.environ,
        "PREFECT_HOME": str(ws.root / "prefect"),
        "PREFECT_SERVER_API_HOST": cfg.host,
        "PREFECT_SERVER_API_PORT": str(cfg.port),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(ws.root / "prefect" / "results"),
        "RSIR_HOME": ws.home,
        "RSIR_REPO": str(REPO),  # prefect.yaml's pull step changes into it
    }
    if cfg.api_of_workers:
        env["PREFECT_API_URL"] = cfg.api_of_workers
    if cfg.database:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = cfg.database
    return env


def wait_healthy(name: str, url: str, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RsirError(f"the {name} exited with status {proc.returncode} (is the port in use? is the "
                            f"database reachable?)")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RsirError(f"the {name} did not answer at {url} within {timeout:.0f} s")


def _check_port_free(host: str, port: int, what: str) -> None:
    with socket.socket() as s:
        if s.connect_ex((_client_host(host), port)) == 0:
            raise RsirError(f"port {port} on {host} is already in use; choose another {what}")


def start_process(cmd: list[str], env: dict[str, str], log: Path, die_with_parent: bool = False
                  ) -> subprocess.Popen:
    """Start `cmd` in a session of its own (a terminal's Ctrl-C does not reach it; stopping its
    group stops its children too: the servers run uvicorn, services, job runners), its output
    appended to `log`. `die_with_parent`: on Linux it gets SIGTERM when this process dies, even
    by SIGKILL, so that no orphan outlives the command that needed it."""
    log.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log.open("ab"), stderr=subprocess.STDOUT,
                            start_new_session=True,
                            preexec_fn=_term_on_parent_death if die_with_parent and sys.platform == "linux" else None)


def _term_on_parent_death() -> None:
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def stop_tree(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """Stop `proc`, its process group and every descendant, even one that left the group (MLflow's
    job runners start their own sessions): SIGTERM, then SIGKILL after `grace` seconds."""
    import psutil

    if proc.poll() is not None:
        return
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
    _gone, alive = psutil.wait_procs(descendants, timeout=grace)
    for child in alive:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _run(cmd: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RsirError(f"`{Path(cmd[0]).name} {' '.join(cmd[1:])}` failed: "
                        f"{redact_uri((done.stderr or done.stdout).strip()[-500:])}")


def prefect_api(api: str):
    """An HTTP client of the Prefect server at `api` (its REST API URL) that retries as
    Prefect's own client does: 408, 429, 502 and 503 (the server's SQLite busy while its
    scheduler and a flow run write, seen on loaded machines) and dropped connections, up to
    PREFECT_CLIENT_MAX_RETRIES times with backoff; any other error status raises
    `httpx.HTTPStatusError`. Use it as a context manager. Source: prefect.client.base."""
    from prefect.client.base import PrefectHttpxSyncClient

    return PrefectHttpxSyncClient(base_url=api, timeout=30)


def _deployments(api: str) -> list[dict]:
    with prefect_api(api) as client:
        return client.post("/deployments/filter", json={}).json()


def schedule_states(api: str) -> dict[tuple[str, str], bool]:
    """(deployment id, schedule slug) -> active, for every schedule with a slug on the server
    (empty on a new server). Deploying again keeps a deployment's id (its flow and name)."""
    return {(d["id"], s["slug"]): s["active"] for d in _deployments(api) for s in d["schedules"] if s.get("slug")}


def restore_schedule_states(api: str, before: dict[tuple[str, str], bool]) -> list[str]:
    """Give every schedule that existed before `prefect deploy` its earlier active state (a
    schedule resumed or paused with `prefect deployment schedule` stays so when `rsir serve`
    restarts; prefect.yaml's `active` is the state of a new schedule only). One line per
    schedule: its deployment, slug, state and id."""
    lines = []
    flows: dict[str, str] = {}
    with prefect_api(api) as client:
        for d in _deployments(api):
            if d["schedules"] and d["flow_id"] not in flows:
                flows[d["flow_id"]] = client.get(f"/flows/{d['flow_id']}").json()["name"]
            for s in d["schedules"]:
                active = before.get((d["id"], s.get("slug")), s["active"])
                if active != s["active"]:
                    client.patch(f"/deployments/{d['id']}/schedules/{s['id']}", json={"active": active})
                lines.append(_schedule_line(flows[d["flow_id"]], d, s, active))
    return lines


def _schedule_line(flow: str, d: dict, s: dict, active: bool) -> str:
    """One line naming a schedule, its state and the command that flips it."""
    name = f"{flow}/{d['name']}"
    verb = "pause" if active else "resume"
    return (f"schedule {s.get('slug') or s['id']} of {name}: {'active' if active else 'paused'}; "
            f"{verb} it with: prefect deployment schedule {verb} {name} {s['id']}")


def _artifacts_destination(ws: Workspace) -> str:
    root = ws.mlartifacts
    return root if isinstance(root, str) else root.resolve().as_uri()


class Services:
    """The processes of one `rsir serve`, started in order and stopped in reverse."""

    def __init__(self, ws: Workspace, cfg: ServeConfig):
        self.ws, self.cfg = ws, cfg
        self.env = serve_env(ws, cfg)
        self.logs = ws.root / "prefect" / "logs"
        self.procs: list[subprocess.Popen] = []
        self.sweeper: subprocess.Popen | None = None
        self.next_sweep = 0.0

    def sweep_dead_runs(self, wait: bool = False) -> None:
        """Every SWEEP_SECONDS (from the start: what an earlier `rsir serve` left open), one
        `python -m flows.liveness` with the workers' environment (their Prefect API and tracking
        URI), in the background; its lines go to liveness.log. `wait`: sweep now, to the end."""
        running = self.sweeper is not None and self.sweeper.poll() is None
        if not wait and (running or time.monotonic() < self.next_sweep):
            return
        if running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.sweeper.wait(timeout=2 * SWEEP_SECONDS)
        env = dict(self.env)
        if self.cfg.tracking_of_workers():
            env["MLFLOW_TRACKING_URI"] = self.cfg.tracking_of_workers()
        self.sweeper = start_process([sys.executable, "-m", "flows.liveness", "--home", self.ws.home], env,
                                     self.logs / "liveness.log")
        self.next_sweep = time.monotonic() + SWEEP_SECONDS
        if wait:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.sweeper.wait(timeout=2 * SWEEP_SECONDS)

    def start_prefect(self) -> None:
        cfg = self.cfg
        _check_port_free(cfg.host, cfg.port, "--port")
        db = redact_uri(cfg.database) if cfg.database else "SQLite in the workspace"
        print(f"starting the Prefect server on http://{cfg.host}:{cfg.port} ({db})", file=sys.stderr)
        proc = self._spawn([prefect_bin(), "server", "start", "--host", cfg.host, "--port", str(cfg.port)],
                           "server.log")
        wait_healthy("Prefect server", f"{cfg.api_of_workers}/health", 180, proc)

    def start_mlflow(self) -> None:
        cfg = self.cfg
        _check_port_free(cfg.host, cfg.mlflow_port, "--mlflow-port")
        backend = cfg.tracking_uri or default_tracking_uri(self.ws.mlflow_db)
        if backend.startswith("sqlite:///"):
            Path(backend.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        print(f"starting the MLflow server on http://{cfg.host}:{cfg.mlflow_port} (backend {redact_uri(backend)}, "
              f"artifacts {_artifacts_destination(self.ws)})", file=sys.stderr)
        # MLflow's job runner (GenAI scorers, prompt optimisation) is ~7 processes and ~2 GB that
        # rsir never uses: off unless the environment turns it on.
        env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **self.env}
        proc = self._spawn([mlflow_bin(), "server", "--backend-store-uri", backend,
                            "--artifacts-destination", _artifacts_destination(self.ws), "--serve-artifacts",
                            "--host", cfg.host, "--port", str(cfg.mlflow_port),
                            "--workers", str(cfg.mlflow_workers)], "mlflow.log", env)
        wait_healthy("MLflow server", f"{cfg.tracking_of_workers()}/health", 180, proc)

    def start_workers(self) -> None:
        cfg = self.cfg
        env = dict(self.env)
        tracking = cfg.tracking_of_workers()
        if tracking:
            env["MLFLOW_TRACKING_URI"] = tracking  # the flows' default (storage.tracking.resolve_tracking_uri)
        _run([prefect_bin(), "work-pool", "create", POOL, "--type", "process", "--overwrite"], env)
        api = env["PREFECT_API_URL"]
        states = schedule_states(api)  # before deploying: `prefect deploy` sets each schedule to prefect.yaml's state
        _run([prefect_bin(), "--no-prompt", "deploy", "--all"], env)
        for line in restore_schedule_states(api, states):
            print(line, file=sys.stderr)
        host = socket.gethostname()
        for i in range(cfg.workers):
            self._spawn([prefect_bin(), "worker", "start", "--pool", POOL, "--name", f"rsir-{host}-{os.getpid()}-{i}"],
                        f"worker-{i}.log", env)
        print(f"started {cfg.workers} worker(s) on pool {POOL}, logging to "
              f"{redact_uri(tracking) if tracking else 'SQLite in the workspace'}", file=sys.stderr)

    def _spawn(self, cmd: list[str], log: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        proc = start_process(cmd, env or self.env, self.logs / log)
        self.procs.append(proc)
        return proc

    def check_alive(self) -> None:
        for proc in self.procs:
            if proc.poll() is not None:
                raise RsirError(f"`{Path(proc.args[0]).name} {' '.join(proc.args[1:3])}` exited with status "
                                f"{proc.returncode}; see {self.logs}")

    def stop(self) -> None:
        for proc in reversed([*self.procs, *([self.sweeper] if self.sweeper else [])]):
            stop_tree(proc)


def ready_lines(cfg: ServeConfig, logs: Path) -> list[str]:
    """What `rsir serve` prints once ready: the services, what to try with each (only the
    services this command runs), and where their logs are."""
    lines = [f"ready: {', '.join(cfg.services)}; service logs in {logs}/"]
    if "prefect" in cfg.services or "worker" in cfg.services:
        lines.append(f"try: PREFECT_API_URL={cfg.api_of_workers} prefect deployment run rsir/iterate --param K=1")
    if "prefect" in cfg.services:
        lines.append(f"Prefect UI: http://{_client_host(cfg.host)}:{cfg.port}")
    if "mlflow" in cfg.services:
        lines.append(f"MLflow UI: http://{_client_host(cfg.host)}:{cfg.mlflow_port}/#/experiments"
                     f"?workflowType=machine_learning")
    return lines


def serve(home: str | None, params: dict, ready_file: str | None = None) -> None:
    cfg = parse_config(ServeConfig, params)
    ws = Workspace.at(home)
    if cfg.host not in LOOPBACK:
        print(f"rsir: warning: binding {cfg.host}: the Prefect API and the MLflow server have no authentication; "
              f"anyone who reaches this address can run flows and read or change runs", file=sys.stderr)
    services = Services(ws, cfg)
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        starters = {"prefect": services.start_prefect, "mlflow": services.start_mlflow,
                    "worker": services.start_workers}
        for name in cfg.services:
            if stopping:
                break
            starters[name]()
        ready = {"prefect_api": cfg.api_of_workers, "tracking_uri": cfg.tracking_of_workers(),
                 "services": cfg.services}
        for line in ready_lines(cfg, services.logs):
            print(line, file=sys.stderr)
        if ready_file:
            Path(ready_file).write_text(json.dumps(ready))
        while not stopping:
            try:
                services.check_alive()
            except RsirError:
                if "worker" in cfg.services:  # a killed worker: close its runs while the servers still run
                    services.sweep_dead_runs(wait=True)
                raise
            if "worker" in cfg.services:
                services.sweep_dead_runs()
            time.sleep(0.5)
    finally:
        services.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        print(f"stopped: {', '.join(cfg.services)}", file=sys.stderr)
