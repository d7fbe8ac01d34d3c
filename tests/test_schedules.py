"""Schedules fire: `rsir serve` on a real Prefect server (its scheduler service included) and a
worker; a schedule with its own parameters on the `rsir/iterate` deployment makes the server
create a flow run, which the worker runs to COMPLETED with the schedule's parameters. Restarting
`rsir serve` (which deploys prefect.yaml again) keeps a resumed schedule active.

Before the SQLAlchemy pin (2.1.x), the scheduler failed every loop with `Can't evaluate bulk
DML statement` and created no run: this test waited in vain."""

from __future__ import annotations

import json
import os
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from deployments.serve import prefect_api
from storage.dataset import dataset_store
from tests.conftest import TINY_FLOW, make_tiny_home
from tests.test_e2e_deployment import BIN, REPO, _free_port, stop_serve

pytestmark = pytest.mark.prefect


def start_serve(home: Path, port: int, ready: Path, *options: str) -> tuple[subprocess.Popen, str]:
    """`rsir serve` (Prefect server + worker) on `port`; returns it and its Prefect API once ready."""
    ready.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    # The scheduler looks every 2 s instead of 60 (only the test's wait changes).
    env["PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS"] = "2"
    env["PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS"] = "2"
    env["PREFECT_WORKER_QUERY_SECONDS"] = "2"
    proc = subprocess.Popen([str(BIN / "rsir"), "serve", "--port", str(port), "--home", str(home),
                             "--ready-file", str(ready), *options], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    if not ready.exists():
        stop_serve(proc) if proc.poll() is None else None
        pytest.fail(f"rsir serve not ready: {proc.stdout.read().decode()[-3000:]}")
    return proc, json.loads(ready.read_text())["prefect_api"]


def _iterate(api: str) -> dict:
    with prefect_api(api) as client:
        return client.get("/deployments/name/rsir/iterate").json()


def _wait_for_scheduled_run(api: str, deployment: str, timeout: float) -> dict:
    """The deployment's first auto-scheduled flow run once it is final (polls the API)."""
    deadline = time.monotonic() + timeout
    runs: list[dict] = []
    while time.monotonic() < deadline:
        with prefect_api(api) as client:
            runs = client.post("/flow_runs/filter", json={
                "deployments": {"id": {"any_": [deployment]}},
                "flow_runs": {"tags": {"all_": ["auto-scheduled"]}}}).json()
        final = [r for r in runs if r["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")]
        if final:
            return final[0]
        time.sleep(2)
    pytest.fail(f"no scheduled run ended within {timeout:.0f} s; runs: "
                f"{[(r['name'], r['state']['type']) for r in runs]}")


def fire_a_schedule(api: str, deployment: dict, ws) -> dict:
    """Give `rsir/iterate` a schedule of its own parameters (tiny data, K = 0) due 20 s from now,
    every 10 s, once (COUNT=1: one run is the proof; more would only load the machine); wait for
    the run the server's scheduler creates and the worker runs, and check it."""
    start = (datetime.now(timezone.utc) + timedelta(seconds=20)).strftime("%Y%m%dT%H%M%S")
    params = {**TINY_FLOW, "K": 0}
    with prefect_api(api) as client:
        resp = client.post(f"/deployments/{deployment['id']}/schedules", json=[{
            "schedule": {"rrule": f"DTSTART:{start}\nRRULE:FREQ=SECONDLY;INTERVAL=10;COUNT=1", "timezone": "UTC"},
            "active": True, "parameters": params, "slug": "test-tiny"}])
    run = _wait_for_scheduled_run(api, deployment["id"], timeout=400)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    assert {k: run["parameters"][k] for k in params} == params  # the schedule's, over the deployment's
    assert any(name.startswith("tiny--") and dataset_store(ws).versions(name) == [0]
               for name in dataset_store(ws).names())  # the run's fork of tiny, D_0 only (K = 0)
    return resp.json()[0]


def test_a_schedule_fires_with_its_parameters_and_keeps_its_state_across_restarts(tiny_csv, tmp_path):
    ws = make_tiny_home(tmp_path / "workspace", tiny_csv)
    port, ready = _free_port(), tmp_path / "ready"
    serve, api = start_serve(ws.root, port, ready)
    try:
        deployment = _iterate(api)
        # prefect.yaml's schedules arrive with their slugs, parameters and initial (paused) state.
        declared = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"][0]["schedules"]
        assert {s["slug"]: (s["active"], s["parameters"]) for s in deployment["schedules"]} == {
            d["slug"]: (d["active"], d["parameters"]) for d in declared}
        added = fire_a_schedule(api, deployment, ws)

        # A schedule resumed by hand stays active when `rsir serve` restarts and deploys again.
        weekly = next(s for s in deployment["schedules"] if s["slug"] == "weekly-ml-100k")
        with prefect_api(api) as client:
            for schedule, active in ((weekly, True), (added, False)):
                client.patch(f"/deployments/{deployment['id']}/schedules/{schedule['id']}", json={"active": active})
    finally:
        stop_serve(serve)
    serve, api = start_serve(ws.root, port, ready)
    try:
        again = _iterate(api)
        assert again["id"] == deployment["id"]
        states = {s["slug"]: s["active"] for s in again["schedules"]}
        assert states["weekly-ml-100k"] is True
        assert states.get("test-tiny", False) is False
    finally:
        stop_serve(serve)
        output = serve.stdout.read().decode()
    assert f"schedule weekly-ml-100k of rsir/iterate: active; pause it with: prefect deployment schedule pause " \
           f"rsir/iterate {weekly['id']}" in output


def test_a_schedule_fires_on_postgresql(tiny_csv, tmp_path, postgres):
    """The scheduler's insert differs by database (ON CONFLICT of PostgreSQL or SQLite): the same
    proof with the Prefect server on PostgreSQL."""
    ws = make_tiny_home(tmp_path / "workspace", tiny_csv)
    database = postgres("schedules").replace("postgresql://", "postgresql+asyncpg://")
    serve, api = start_serve(ws.root, _free_port(), tmp_path / "ready", "--database", database)
    try:
        fire_a_schedule(api, _iterate(api), ws)
    finally:
        stop_serve(serve)
