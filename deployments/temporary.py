"""The Prefect server of one command-line run (`rsir run`, `rsir experiment`) when no
PREFECT_API_URL names one.

Prefect's own temporary server is a child in the caller's process group: Ctrl-C in a terminal
reaches it too, it dies at once, and the interrupted flow then spends minutes retrying a dead API
before it can report its end. This one runs in a session of its own, so an interrupt reaches the
run only; the run reports its end (Crashed, then rsir's Cancelled) to a live server, and the server
is stopped after that, when the block ends. Its start may take long (a new database is migrated
first on a busy machine), so it gets `STARTUP_SECONDS`, and a failure is one line naming its log."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from core.errors import RsirError
from deployments.serve import start_process, stop_tree, wait_healthy
from storage.files import file_lock

STARTUP_SECONDS = 300.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def prefect_api(prefect_home: Path) -> Iterator[str]:
    """Within the block, the Prefect API runs report to: Prefect's setting PREFECT_API_URL if set, else a
    temporary server on 127.0.0.1 with its state in `prefect_home` (SQLite; the UI off), which
    this process's Prefect settings and its children's environment point at until the block
    ends. Raises RsirError (one line, with the server's log file) if the server does not answer
    within STARTUP_SECONDS."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    given = PREFECT_API_URL.value()  # the environment's, a profile's, or a test harness's
    if given:
        yield given
        return

    port = _free_port()
    log = prefect_home / "logs" / "temporary-server.log"
    # The command Prefect's own temporary server runs (prefect.server.api.server.SubprocessASGIServer).
    cmd = [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app", "--host",
           "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"]
    env = {**os.environ, "PREFECT_HOME": str(prefect_home), "PREFECT_UI_ENABLED": "0",
           "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    url = f"http://127.0.0.1:{port}/api"
    proc = _start_first_safely(prefect_home, cmd, env, log, url)
    try:
        os.environ["PREFECT_API_URL"] = url  # child processes (Ray workers, subprocesses) report here too
        try:
            with temporary_settings(updates={PREFECT_API_URL: url}):
                try:
                    yield url
                finally:
                    _send_queued_reports()
        finally:
            os.environ.pop("PREFECT_API_URL", None)
    finally:
        stop_tree(proc, grace=10)


def _start_first_safely(prefect_home: Path, cmd: list[str], env: dict[str, str], log: Path, url: str) -> Any:
    """Start the server and wait until it answers. Its first start in a Prefect home creates and
    migrates the database, and servers of runs started together on a new workspace raced there
    (issue 24): until one start has succeeded (a marker file), starts take turns under a lock."""
    ready = prefect_home / "prefect.db.ready"
    with contextlib.nullcontext() if ready.exists() else file_lock(prefect_home / "prefect.db.lock"):
        proc = start_process(cmd, env, log, die_with_parent=True)  # even a SIGKILLed run leaves no server
        try:
            wait_healthy("temporary Prefect server", f"{url}/health", STARTUP_SECONDS, proc)
        except BaseException as exc:
            stop_tree(proc, grace=10)
            if isinstance(exc, RsirError):
                raise RsirError(f"{exc}; its log: {log}") from None
            raise
        ready.touch()
    return proc


def _send_queued_reports(timeout: float = 30.0) -> None:
    """Send the logs and events Prefect still queues for the server before it stops (the crash
    reports of an interrupted run are among them); left queued, Prefect retries the stopped
    server at exit for over a minute."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=timeout)
