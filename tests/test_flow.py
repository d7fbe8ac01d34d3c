"""The `rsir` flow on tiny real data (K = 2) against a real Prefect test server and a real MLflow
SQLite store: versions, metrics, MLflow runs, dataset inputs, artifacts and the champion alias."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from core.errors import RsirError
from core.hashing import SHOWN_DIGITS
from storage.dataset import dataset_store
from tests.conftest import TINY_FLOW, make_tiny_home

pytestmark = pytest.mark.prefect


@pytest.fixture(scope="module")
def run(prefect_api, tiny_csv, tmp_path_factory):
    from flows.rsir import rsir

    ws = make_tiny_home(tmp_path_factory.mktemp("flow") / "workspace", tiny_csv)
    uri = f"sqlite:///{ws.root / 'mlflow.db'}"
    summary = rsir(K=2, home=str(ws.root), tracking_uri=uri, **TINY_FLOW)
    return ws, uri, summary


def test_versions_and_table(run):
    ws, _, summary = run
    store = dataset_store(ws)
    name = summary["run_dataset"]
    assert store.versions(name) == [0, 1, 2]
    assert store.manifest(name, 0).digest == store.manifest("tiny", 0).digest  # D_0 is the base data
    assert store.versions("tiny") == [0]  # the base dataset is never written to
    rows = summary["iterations"]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert {"ndcg@10", "ndcg@20", "recall@10", "recall@20"} <= set(r["valid"]) and set(r["valid"]) == set(r["test"])
    assert rows[0]["synthetic_sequences"] == 0
    assert rows[2]["synthetic_sequences"] > rows[1]["synthetic_sequences"] > 0  # D_2 ⊃ D_1 ⊃ D_0
    assert rows[2]["interactions"] > rows[1]["interactions"] > rows[0]["interactions"]
    assert 0 < rows[1]["acceptance_rate"] <= 1
    v1, v2 = store.manifest(name, 1), store.manifest(name, 2)
    assert v2.parent_version == 1 and len(v2.partitions) == 3
    assert v1.generation["checkpoint"] == rows[0]["checkpoint"]  # θ_0 produced D_1
    assert v2.generation["checkpoint"] == rows[1]["checkpoint"]
    assert 0 <= summary["overhead_fraction"] < 1


def test_mlflow_lineage_and_registry(run):
    ws, uri, summary = run
    client = MlflowClient(uri)
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.info.run_name == "rsir-tiny-sasrec-K2-seed0"  # runs of other seeds are told apart
    assert parent.data.tags["prefect.flow_run_id"]
    assert parent.data.params["synthetic_weight"] == "1.0" and parent.data.params["recipe"] == "default"
    assert parent.data.params["weighting"] == "position"
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                                  order_by=["attributes.start_time ASC"])
    assert [c.info.run_name for c in children] == ["iteration-0", "iteration-1", "iteration-2"]
    store = dataset_store(ws)
    for k, child in enumerate(children):
        inputs = {tag.value: di.dataset for di in child.inputs.dataset_inputs for tag in di.tags}
        assert inputs["training"].digest == store.manifest(summary["run_dataset"], k).digest[:SHOWN_DIGITS]
        if k < 2:
            assert inputs["output"].digest == store.manifest(summary["run_dataset"], k + 1).digest[:SHOWN_DIGITS]
        assert "valid/ndcg_at_10" in child.data.metrics and "data/density" in child.data.metrics
        curve = client.get_metric_history(child.info.run_id, "train/loss")
        assert len(curve) == summary["iterations"][k]["epochs"]
        # θ_0 trains on real data only; θ_1 and θ_2 on D_1, D_2 with synthetic sequences.
        share = child.data.metrics["train/synthetic_position_share"]
        assert (share == 0) if k == 0 else (0 < share < 1)
        assert child.data.metrics["train/synthetic_weight_share"] == pytest.approx(share)  # λ = 1
        files = [f.path for f in client.list_artifacts(child.info.run_id, "checkpoint")]
        assert len(files) == 1 and files[0].endswith(".pt")
    plots = {f.path for f in client.list_artifacts(parent.info.run_id, "plots")}
    assert plots == {"plots/metrics_per_iteration.png", "plots/density_entropy_per_iteration.png"}
    champion = client.get_model_version_by_alias(summary["champion"]["registered_model"], "champion")
    best = max(range(3), key=lambda k: summary["iterations"][k]["valid"]["ndcg@10"])
    assert champion.run_id == children[best].info.run_id


def test_invalid_parameters_fail_at_flow_start(prefect_api, tmp_path):
    from flows.rsir import rsir

    for bad, name in [(dict(tau=0), "tau"), (dict(p=1.5), "'p'"), (dict(K=-1), "'K'"),
                      (dict(model_params={"heads": 3}), "heads=3")]:
        with pytest.raises(RsirError, match=name):
            rsir(home=str(tmp_path / "ws"), **{**TINY_FLOW, **bad})
    assert not (tmp_path / "ws" / "datasets").exists()


def test_unreachable_tracking_uri_fails_fast(prefect_api, tmp_path):
    import time

    from flows.rsir import rsir

    started = time.monotonic()
    with pytest.raises(RsirError, match="unreachable"):
        rsir(home=str(tmp_path / "ws"), tracking_uri="http://127.0.0.1:9/", **TINY_FLOW)
    assert time.monotonic() - started < 60


def test_weak_to_strong_generator(prefect_api, tiny_csv, tmp_path):
    """An HSTU generator produces the data; the SASRec student is trained and evaluated on it;
    MLflow shows both checkpoints for the iteration."""
    from flows.rsir import rsir

    ws = make_tiny_home(tmp_path / "workspace", tiny_csv)
    uri = f"sqlite:///{ws.root / 'mlflow.db'}"
    summary = rsir(K=1, home=str(ws.root), tracking_uri=uri, generator="hstu",
                   generator_params={"hidden": 16, "layers": 1, "max_len": 20}, **TINY_FLOW)
    assert summary["generator"] == "hstu" and summary["model"] == "sasrec"
    v1 = dataset_store(ws).manifest(summary["run_dataset"], 1)
    assert v1.generation["generator"]["backbone"] == "hstu"
    assert "hstu-v0" in v1.generation["checkpoint"]
    client = MlflowClient(uri)
    child = client.search_runs([client.get_run(summary["mlflow_run_id"]).info.experiment_id],
                               f"tags.`mlflow.parentRunId` = '{summary['mlflow_run_id']}' "
                               f"and attributes.run_name = 'iteration-0'")[0]
    names = {f.path for f in client.list_artifacts(child.info.run_id)}
    assert {"checkpoint", "generator_checkpoint"} <= names
