"""Shared fixtures. Nothing here writes inside the repository: every workspace is a temp dir."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from core.workspace import Workspace
from rsir.cli import main


@pytest.fixture(scope="session", autouse=True)
def _mlflow_fails_fast():
    """What the CLI's entry point sets for every process: no minutes of HTTP retries."""
    import os

    from storage.tracking import mlflow_environment_defaults

    mlflow_environment_defaults(os.environ)


@pytest.fixture(scope="session", autouse=True)
def _prefect_logs_to_the_sessions_stderr(tmp_path_factory):
    """Prefect configures its logging once per process, its console handler bound to the
    sys.stderr of that moment (`stream: ext://sys.stderr`). The first in-process command that
    sets it up (rsir/cli.py `_before_flow`) runs under the `cli` fixture's capsys, whose stream is
    closed when that test ends: every later Prefect record then failed to print, and inside a
    flow with log_prints (rsir-experiment) the failure's report, printed and so logged again,
    recursed until RecursionError (test_faults' suite flow right after test_cli_output). Set up
    here first, bound to pytest's own capture, which stays open for the session. Prefect is
    imported with a temporary home (it creates it on import); the environment is left as it was."""
    import os

    before = os.environ.get("PREFECT_HOME")
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-import-home"))
    try:
        from prefect.logging.configuration import ensure_logging_setup

        ensure_logging_setup()
    finally:
        if before is None:
            del os.environ["PREFECT_HOME"]
        else:
            os.environ["PREFECT_HOME"] = before


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("RSIR_HOME", str(tmp_path / "workspace"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and OpenMP spin-waiting makes them very slow on a
    busy machine. Restored afterwards, so tests on real data keep torch's default."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def ws(tmp_path) -> Workspace:
    return Workspace.at(tmp_path / "workspace")


@pytest.fixture(scope="session")
def ml100k_ws(tmp_path_factory) -> Workspace:
    """A workspace with the real ml-100k and ml-100k-sparse, built once per session (read-only)."""
    from tasks.builtin import fetch_builtin

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


TINY_USERS = 150


@pytest.fixture(scope="session")
def tiny_csv(ml100k_ws, tmp_path_factory) -> Path:
    """Real interactions, small: the first users of ml-100k-sparse as a CSV (user, item, position)."""
    import polars as pl

    from storage.dataset import dataset_store

    seqs = dataset_store(ml100k_ws).load("ml-100k-sparse").sort("seq_id").head(TINY_USERS)
    rows = (seqs.select("user_id", "items").explode("items")
            .with_columns(pl.int_range(pl.len()).over("user_id").alias("timestamp"))
            .rename({"items": "item_id"}))
    path = tmp_path_factory.mktemp("tiny") / "tiny.csv"
    rows.write_csv(path)
    return path


def make_tiny_home(root: Path, tiny_csv: Path) -> Workspace:
    from tasks.ingest import ImportSpec, import_dataset

    ws = Workspace.at(root)
    import_dataset(ws, ImportSpec(path=tiny_csv, name="tiny", format="csv"))
    return ws


# Flow parameters that make a whole RSIR run take seconds on tiny data.
TINY_FLOW = dict(dataset="tiny", epochs=2, patience=1, seed=0, device="cpu", threads=1,
                 model_params={"hidden": 16, "layers": 1, "max_len": 20})


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """One Prefect test server for the session, with state in temp dirs."""
    import os

    state = tmp_path_factory.mktemp("prefect-home")
    os.environ["PREFECT_HOME"] = str(state)
    os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(state / "results")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's server mode) on 127.0.0.1 for the session, with the
    standard AWS environment pointing at it (so child processes inherit it). Yields its URL."""
    import os

    from moto.server import ThreadedMotoServer

    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env["AWS_ENDPOINT_URL"] = f"http://{host}:{port}"
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env["AWS_ENDPOINT_URL"]
    finally:
        server.stop()
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket: its s3:// URL."""
    import uuid

    import s3fs

    name = f"rsir-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(name)
    return f"s3://{name}"


def kill_after_first_expansion(ws: Workspace, tracking: str, params: dict, prefect_api: str, name: str) -> None:
    """Run the `rsir` flow on `ws` in another process and SIGKILL it mid-run: as soon as D_1 of
    dataset `name` is committed (iteration 1 is then under way)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from storage.dataset import dataset_store

    script = (f"from flows.rsir import rsir; import json; "
              f"rsir(home={ws.home!r}, tracking_uri={tracking!r}, **json.loads({json.dumps(json.dumps(params))}))")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).resolve().parent.parent,
                            env={**os.environ, "PREFECT_API_URL": prefect_api},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = dataset_store(ws)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and 1 not in store.versions(name) and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the flow ended before it could be killed mid-run"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert store.versions(name) in ([0, 1], [0, 1, 2])


def require_service(reason: str) -> None:
    """Skip for a missing service, except where the run must have it: `.ci/run` sets
    RSIR_REQUIRE_SERVICES=1 and a skip there would hide an untested acceptance item."""
    import os

    if os.environ.get("RSIR_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason} (RSIR_REQUIRE_SERVICES=1: CI must run this test)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres():
    """A function that creates a fresh PostgreSQL database and returns its URL (without a
    driver); every database it made is dropped at the end of the session. The server is
    $RSIR_TEST_POSTGRES (default postgresql://postgres@127.0.0.1:5432, trust auth)."""
    import os
    import uuid

    server = os.environ.get("RSIR_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432").rstrip("/")
    try:
        import psycopg

        admin = psycopg.connect(f"{server}/postgres", autocommit=True, connect_timeout=5)
    except Exception as exc:  # no driver, no server, refused: the reason goes into the skip
        require_service(f"no PostgreSQL at {server}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    session = uuid.uuid4().hex[:8]
    made: list[str] = []

    def create(purpose: str) -> str:
        name = f"rsir_test_{session}_{purpose}"
        admin.execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        return f"{server}/{name}"

    try:
        yield create
    finally:
        for name in made:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="session")
def browser():
    """Headless Debian chromium driven by Playwright (which never downloads a browser here)."""
    import shutil

    executable = shutil.which("chromium")
    if executable is None:
        require_service("Debian's chromium is not installed (`make test` installs it when run as root)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require_service("playwright is not installed (pip install -e '.[dev]')")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the session (2 CPUs, a small object store, no dashboard): the
    `ray` executor joins it instead of starting its own."""
    try:
        import ray
    except ImportError:
        require_service("Ray is not installed (pip install -c requirements.lock -e '.[dist]')")
    ray.init(num_cpus=2, num_gpus=0, object_store_memory=256 * 1024 ** 2, include_dashboard=False,
             log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


REPO = Path(__file__).resolve().parent.parent


def command_env() -> dict[str, str]:
    """A terminal's environment: no Prefect server, no tracking URI (the command's own), this code."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


@dataclass
class Interrupted:
    """What `interrupt_command` saw: the exit status, seconds from the signal to the exit, the
    output before and after the signal."""

    returncode: int
    seconds: float
    before: list[str]
    after: list[str]


def interrupt_command(args: list[str], sig: int, ready, settle: float = 0.0, wait: float = 600) -> Interrupted:
    """Start `rsir ARGS` as a terminal would (its own process group, `command_env`), wait until
    `ready(lines)` holds (its output so far; asserted within `wait` seconds, the process alive),
    `settle` seconds more, then send `sig`: SIGINT to the whole group, as Ctrl-C in a terminal,
    any other signal to the process. Kills the group if it outlives 120 s after the signal."""
    import os
    import signal
    import subprocess
    import sys
    import threading
    import time

    proc = subprocess.Popen([sys.executable, "-m", "rsir.cli", *args], cwd=REPO, env=command_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + wait
        while not ready(lines):
            assert proc.poll() is None and time.monotonic() < deadline, "not ready:\n" + "".join(lines[-30:])
            time.sleep(0.05)
        time.sleep(settle)
        assert proc.poll() is None, "".join(lines[-30:])
        before = len(lines)
        sent = time.monotonic()
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        proc.wait(timeout=120)
        seconds = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(timeout=10)
    return Interrupted(proc.returncode, seconds, lines[:before], lines[before:])
