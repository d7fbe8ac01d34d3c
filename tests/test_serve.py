"""`rsir serve`'s process handling and validation, without starting servers."""

from __future__ import annotations

import http.server
import os
import re
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest

from core.config import parse_config
from core.errors import RsirError
from deployments.serve import ServeConfig, _deployments, prefect_api, stop_tree

# A child that starts a grandchild in a session of its own (as MLflow's job runners do), so
# signalling the child's process group alone would leave the grandchild running.
ESCAPING = ("import subprocess, sys, time; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True); "
            "print(p.pid, flush=True); time.sleep(600)")


def test_stop_tree_stops_a_descendant_that_left_the_process_group():
    proc = subprocess.Popen([sys.executable, "-c", ESCAPING], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    grandchild = int(proc.stdout.readline())
    assert os.getpgid(grandchild) != os.getpgid(proc.pid)
    started = time.monotonic()
    stop_tree(proc, grace=5)
    assert proc.poll() is not None
    assert not psutil.pid_exists(grandchild) or psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE
    assert time.monotonic() - started < 15


@pytest.mark.parametrize("params, message", [
    ({"services": ["worker"]}, "--only worker needs the Prefect server"),
    ({"database": "postgres://db"}, "postgresql+asyncpg://"),
    ({"services": ["mlflow"], "tracking_uri": "http://127.0.0.1:5000"}, "must be a database"),
    ({"workers": 0}, "'workers'"),
])
def test_bad_serve_options_fail_in_one_line_before_anything_starts(params, message, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with pytest.raises(RsirError, match=re.escape(message)) as info:
        parse_config(ServeConfig, params)
    assert "\n" not in str(info.value)


def test_workers_log_to_this_commands_mlflow_server_or_to_the_given_uri():
    both = parse_config(ServeConfig, {"services": ["prefect", "mlflow", "worker"], "host": "0.0.0.0",
                                      "mlflow_port": 5123, "tracking_uri": "postgresql://u@db/mlflow"})
    assert both.tracking_of_workers() == "http://127.0.0.1:5123"
    assert both.api_of_workers == "http://127.0.0.1:4200/api"
    alone = parse_config(ServeConfig, {"services": ["worker"], "prefect_api": "http://p:4200/api",
                                       "tracking_uri": "postgresql://u@db/mlflow"})
    assert alone.tracking_of_workers() == "postgresql://u@db/mlflow"


def test_a_public_host_is_warned_about(cli, tmp_path, monkeypatch, capsys):
    # The Prefect server's start is replaced by a failure: the command stops right after the warning.
    import deployments.serve as serve

    monkeypatch.setattr(serve.Services, "start_prefect", lambda self: (_ for _ in ()).throw(RsirError("stop here")))
    result = cli("serve", "--host", "0.0.0.0", "--home", tmp_path / "ws")
    assert result.code == 2 and "no authentication" in result.err and "stop here" in result.err


class _BusyThenOk(http.server.BaseHTTPRequestHandler):
    """Answers 503 (as the Prefect server does while its SQLite is busy) to the first two
    requests, then 200; a path under /missing is a 404 every time."""

    answers: list[int] = []

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        status = 404 if self.path.startswith("/missing") else (503 if len(self.answers) < 2 else 200)
        self.answers.append(status)
        self.send_response(status)
        self.send_header("Retry-After", "0")  # the test's wait only; the backoff is Prefect's
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"[]" if status == 200 else b'{"detail": "busy"}')

    def log_message(self, *args):
        pass


def test_calls_to_the_prefect_api_retry_a_busy_server_and_raise_on_other_errors():
    """Every call `rsir serve` (and its tests) makes to the Prefect REST API goes through
    `prefect_api`; a 503 from a busy server is retried, as Prefect's own client does (a CI run
    failed on one unretried 503 while creating a schedule)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _BusyThenOk)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    api = f"http://127.0.0.1:{server.server_port}"
    try:
        assert _deployments(api) == []
        assert _BusyThenOk.answers == [503, 503, 200]
        with prefect_api(api) as client, pytest.raises(httpx.HTTPStatusError, match="404"):
            client.post("/missing", json={})
        assert _BusyThenOk.answers[3:] == [404]
    finally:
        server.shutdown()
