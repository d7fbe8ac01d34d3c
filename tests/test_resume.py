"""Crash-resume: kill the flow process (SIGKILL) in the middle of a run, run it again with the
same parameters, and get the same dataset digests and metrics as an uninterrupted run."""

from __future__ import annotations


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
    theta0 = [p for p in (ws.checkpoints / name).glob("*-v0-*.pt")]
    assert len(theta0) == 1
    theta0_mtime = theta0[0].stat().st_mtime_ns

    resumed = rsir(home=str(ws.root), tracking_uri=tracking, **params)
    assert _digests(ws, name) == _digests(clean, name)
    assert [r["test"] for r in resumed["iterations"]] == [r["test"] for r in reference["iterations"]]
    assert [r["valid"] for r in resumed["iterations"]] == [r["valid"] for r in reference["iterations"]]
    assert resumed["iterations"][0]["reused"]  # θ_0 was not trained again
    assert theta0[0].stat().st_mtime_ns == theta0_mtime
    for k in (1, 2):  # one partition per iteration, nothing duplicated
        assert len(list((ws.datasets / name / "sequences" / f"iteration={k}").rglob("*.parquet"))) == 1
