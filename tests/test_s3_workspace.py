"""Issue 12 item 1: a workspace on an S3-compatible object store (moto's server on 127.0.0.1).
Datasets, checkpoints, run artifacts and MLflow artifacts live under the s3:// home; only
staging, Prefect's state and the default MLflow database stay in a local companion folder."""

from __future__ import annotations

import pytest

from core.workspace import Workspace
from storage.dataset import dataset_store
from tests.conftest import TINY_FLOW, kill_after_first_expansion, make_tiny_home

pytestmark = pytest.mark.prefect


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RSIR_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _digests(ws, name):
    store = dataset_store(ws)
    return [store.manifest(name, v).digest for v in store.versions(name)]


def _s3():
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)


def test_workspace_url_keeps_shared_state_remote(s3_bucket, cache):
    ws = Workspace.at(f"{s3_bucket}/team/ws/")
    assert ws.home == f"{s3_bucket}/team/ws" and ws.remote == ws.home
    assert ws.datasets == f"{s3_bucket}/team/ws/datasets" and ws.checkpoints == f"{s3_bucket}/team/ws/checkpoints"
    assert ws.staging.is_relative_to(cache) and ws.mlflow_db.is_relative_to(cache)
    assert Workspace.at(f"{s3_bucket}/team/ws").root == ws.root  # the same companion every time
    assert Workspace.at(f"{s3_bucket}/other").root != ws.root


def test_killed_run_on_s3_resumes_to_the_local_result(prefect_api, tiny_csv, tmp_path, s3_bucket, cache):
    from flows.rsir import rsir

    params = dict(K=2, **TINY_FLOW)
    local = make_tiny_home(tmp_path / "local", tiny_csv)
    reference = rsir(home=str(local.root), tracking_uri=f"sqlite:///{local.root / 'mlflow.db'}", **params)
    name = reference["run_dataset"]

    home = f"{s3_bucket}/ws"
    ws = make_tiny_home(home, tiny_csv)
    tracking = f"sqlite:///{tmp_path / 'mlflow-s3.db'}"
    kill_after_first_expansion(ws, tracking, params, prefect_api, name)
    store = dataset_store(ws)

    resumed = rsir(home=home, tracking_uri=tracking, **params)
    assert _digests(ws, name) == _digests(local, name)
    assert [r["test"] for r in resumed["iterations"]] == [r["test"] for r in reference["iterations"]]
    assert resumed["iterations"][0]["reused"]  # θ_0 was found on S3, not trained again
    for version in dataset_store(ws).versions(name):
        store.verify(name, store.manifest(name, version))

    bucket = s3_bucket.removeprefix("s3://")
    s3 = _s3()
    checkpoints = [p for p in s3.find(f"{bucket}/ws/checkpoints") if p.endswith(".pt")]
    theta0 = reference["iterations"][0]["checkpoint"].rsplit("/", 1)[-1]  # stored by content key
    assert any(p.endswith(f"/checkpoints/by-content/{theta0}") for p in checkpoints)
    assert [p for p in s3.find(f"{bucket}/ws/runs") if p.endswith(".parquet")]
    assert [p for p in s3.find(f"{bucket}/ws/mlartifacts") if p.endswith(".pt")]  # MLflow's copy of θ
    local_files = [p.relative_to(ws.root).as_posix() for p in ws.root.rglob("*") if p.is_file()]
    assert not [f for f in local_files if f.startswith(("datasets", "checkpoints", "runs/generations"))]
