"""`rsir serve`'s process handling and validation, without starting servers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import psutil
import pytest

from core.config import parse_config
from core.errors import RsirError
from deployments.serve import ServeConfig, stop_tree

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
