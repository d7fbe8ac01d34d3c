"""Crash-resume: kill the flow process (SIGKILL) in the middle of a run, run it again with the
same parameters, and get the same dataset digests and metrics as an uninterrupted run; the re-run
closes what the killed run left open (MLflow KILLED, Prefect CRASHED) and nothing that still runs,
then continues the killed run's MLflow parent (reopened, one parent per run key)."""

from __future__ import annotations

from pathlib import Path

import pytest

from storage.dataset import dataset_store
from tests.conftest import TINY_FLOW, kill_after_first_expansion, make_tiny_home

pytestmark = pytest.mark.prefect


def _digests(ws, name):
    store = dataset_store(ws)
    return [store.manifest(name, v).digest for v in store.versions(name)]


def test_killed_run_resumes_to_the_same_result(prefect_api, tiny_csv, tmp_path):
    from flows.rsir import rsir

    params = dict(K=2, **TINY_FLOW)
    clean = make_tiny_home(tmp_path / "clean", tiny_csv)
    reference = rsir(home=str(clean.root), tracking_uri=f"sqlite:///{clean.root / 'mlflow.db'}", **params)

    ws = make_tiny_home(tmp_path / "crash", tiny_csv)
    tracking = f"sqlite:///{ws.root / 'mlflow.db'}"
    name = reference["run_dataset"]  # same parameters -> same lineage name
    kill_after_first_expansion(ws, tracking, params, prefect_api, name)
    # θ_0 is stored once, by its content key (the same data and config as the clean run's θ_0).
    theta0 = [ws.checkpoints / "by-content" / Path(reference["iterations"][0]["checkpoint"]).name]
    assert theta0[0].is_file()
    theta0_mtime = theta0[0].stat().st_mtime_ns
    killed, live = _killed_and_live_runs(tracking)

    resumed = rsir(home=str(ws.root), tracking_uri=tracking, **params)
    _assert_only_the_killed_run_was_closed(tracking, killed, live)
    _assert_one_parent_resumed(tracking, killed, resumed)
    assert _digests(ws, name) == _digests(clean, name)
    assert [r["test"] for r in resumed["iterations"]] == [r["test"] for r in reference["iterations"]]
    assert [r["valid"] for r in resumed["iterations"]] == [r["valid"] for r in reference["iterations"]]
    assert resumed["iterations"][0]["reused"]  # θ_0 was not trained again
    assert theta0[0].stat().st_mtime_ns == theta0_mtime
    for k in (1, 2):  # one partition per iteration, nothing duplicated
        assert len(list((ws.datasets / name / "sequences" / f"iteration={k}").rglob("*.parquet"))) == 1


def _killed_and_live_runs(tracking):
    """The killed run's MLflow parent (left RUNNING, its Prefect flow run Running), and two runs of
    its lineage that still run: one of this (live) process, with a Running Prefect flow run, and
    one on another machine whose heartbeat is fresh."""
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    from flows.rsir import rsir
    from storage.tracking import owner_tags

    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name("rsir").experiment_id
    [killed] = client.search_runs([experiment], "attributes.status = 'RUNNING' and tags.`rsir.lineage` != ''")
    tags = killed.data.tags
    with get_client(sync_client=True) as prefect:
        assert prefect.read_flow_run(tags["prefect.flow_run_id"]).state.is_running()  # what Prefect believes
        live_flow_run = prefect.create_flow_run(rsir, parameters={}, state=Running()).id
    lineage = {"rsir.lineage": tags["rsir.lineage"], "rsir.K": tags["rsir.K"]}
    mine = client.create_run(experiment, tags={**lineage, **owner_tags(),
                                               "prefect.flow_run_id": str(live_flow_run)}).info.run_id
    elsewhere = client.create_run(experiment, tags={**lineage, **owner_tags(), "rsir.host": "another-host",
                                                    "rsir.pid": "1"}).info.run_id
    return killed, {mine: live_flow_run, elsewhere: None}


def _assert_only_the_killed_run_was_closed(tracking, killed, live):
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
    )

    client = MlflowClient(tracking)
    for run_id in live:
        assert client.get_run(run_id).info.status == "RUNNING"
    with get_client(sync_client=True) as prefect:
        flow_run = prefect.read_flow_run(killed.data.tags["prefect.flow_run_id"])
        assert flow_run.state.is_crashed() and "KILLED" in flow_run.state.message
        subflows = prefect.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run.id])))
        # The kill lands in iteration 0's expansion or early in iteration 1: whichever subflow and
        # task runs it cut short are closed too.
        assert 1 <= len(subflows) <= 2 and all(s.state.is_final() for s in subflows)
        tasks = prefect.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(
            any_=[flow_run.id, *(s.id for s in subflows)])))
        assert tasks and all(t.state.is_final() for t in tasks)
        assert prefect.read_flow_run(live[next(iter(live))]).state.is_running()


def _assert_one_parent_resumed(tracking, killed, resumed):
    """The resume reopened the killed run's parent (closed KILLED first) and finished it: one
    parent for the run key, counting one resume, with each iteration's child run once."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking)
    key = killed.data.tags["rsir.run_key"]
    [parent] = client.search_runs([killed.info.experiment_id], f"tags.`rsir.run_key` = '{key}'")
    assert parent.info.run_id == killed.info.run_id == resumed["mlflow_run_id"]
    assert parent.info.status == "FINISHED" and parent.data.tags["rsir.resumes"] == "1"
    assert parent.data.tags["prefect.flow_run_id"] != killed.data.tags["prefect.flow_run_id"]  # the resume's
    children = client.search_runs([killed.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == ["iteration-0", "iteration-1", "iteration-2"]
    assert {c.info.status for c in children} == {"FINISHED"}
    assert all(len(c.outputs.model_outputs) == 1 for c in children)  # θ_k logged once, also when resumed
    steps = [m.step for m in client.get_metric_history(parent.info.run_id, "data/density")]
    assert sorted(set(steps)) == [0, 1, 2]


def test_a_flow_run_prefect_cannot_close_is_reported_not_raised(prefect_api, monkeypatch):
    """The killed run may have used another Prefect server, or the server may be gone: the new run
    says so in its log line and goes on (its MLflow run is closed all the same)."""
    import uuid

    import prefect.client.orchestration

    from flows.liveness import crash_flow_run as _crash_flow_run

    missing = str(uuid.uuid4())
    assert _crash_flow_run(missing, "killed") == f"Prefect flow run {missing} unknown to this Prefect server"

    def gone(**_):
        raise ConnectionError("All connection attempts failed\ntraceback...")

    monkeypatch.setattr(prefect.client.orchestration, "get_client", gone)
    assert _crash_flow_run(missing, "killed") == (
        f"Prefect flow run {missing} not marked (ConnectionError: All connection attempts failed)")
