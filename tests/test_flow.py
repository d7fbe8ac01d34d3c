"""The `rsir` flow on tiny real data (K = 2) against a real Prefect test server and a real MLflow
SQLite store: versions, metrics, MLflow runs, dataset inputs, artifacts and the champion alias."""

from __future__ import annotations

import json

import pytest
import torch
from mlflow import MlflowClient

from core.errors import RsirError
from core.hashing import SHOWN_DIGITS
from storage.checkpoints import read_checkpoint
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
    assert v1.generation.checkpoint == rows[0]["checkpoint"]  # θ_0 produced D_1
    assert v2.generation.checkpoint == rows[1]["checkpoint"]
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
        # Where θ_k trained: same seed, bit-identical θ only on the same hardware.
        assert child.data.tags["rsir.device"] == "cpu"
        assert child.data.tags["rsir.hardware"].endswith(f"({torch.backends.cpu.get_cpu_capability()}); torch "
                                                         f"{torch.__version__}")
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
    # The run registers its best θ by the validation metric of early stopping (the first of equals).
    best = max(range(3), key=lambda k: (summary["iterations"][k]["valid"]["ndcg@10"], -k))
    mine = client.get_model_version(summary["champion"]["registered_model"], str(summary["champion"]["version"]))
    assert mine.run_id == children[best].info.run_id and summary["champion"]["iteration"] == best


def test_the_parent_draws_every_metric_and_statistic_over_k(run):
    _, uri, summary = run
    client = MlflowClient(uri)
    parent = client.get_run(summary["mlflow_run_id"])
    for key in ("valid/ndcg_at_10", "test/recall_at_20", "data/density", "data/item_entropy", "data/sequences",
                "data/interactions", "train/epochs", "time/train"):
        history = client.get_metric_history(parent.info.run_id, key)
        assert sorted(m.step for m in history) == [0, 1, 2], key
    density = {m.step: m.value for m in client.get_metric_history(parent.info.run_id, "data/density")}
    assert [density[k] for k in range(3)] == [r["density"] for r in summary["iterations"]]
    generated = client.get_metric_history(parent.info.run_id, "generation/accepted")
    assert sorted(m.step for m in generated) == [0, 1]  # D_1 and D_2 were generated in iterations 0 and 1


def test_theta_k_is_a_logged_model_linked_to_d_k_its_metrics_and_the_registry(run):
    _, uri, summary = run
    client = MlflowClient(uri)
    experiment = client.get_run(summary["mlflow_run_id"]).info.experiment_id
    children = {c.info.run_name: c for c in client.search_runs(
        [experiment], f"tags.`mlflow.parentRunId` = '{summary['mlflow_run_id']}'")}
    for k in range(3):
        child = children[f"iteration-{k}"]
        [output] = child.outputs.model_outputs
        assert output.step == k
        model = client.get_logged_model(output.model_id)
        assert model.name == f"theta-{k}" and model.source_run_id == child.info.run_id
        assert str(model.status) == "READY" and model.model_type == "sasrec" and model.params["hidden"] == "16"
        files = [f.path for f in client.list_logged_model_artifacts(model.model_id)]
        assert len(files) == 1 and files[0].endswith(".pt")
        d_k = f"{summary['run_dataset']}@v{k}"
        scores = {m.key: m for m in model.metrics}
        assert scores["valid/ndcg_at_10"].value == pytest.approx(summary["iterations"][k]["valid"]["ndcg@10"])
        assert scores["valid/ndcg_at_10"].dataset_name == d_k and scores["test/ndcg_at_10"].dataset_name == d_k
        assert model.tags["rsir.dataset"] == d_k
    champion = summary["champion"]
    version = client.get_model_version(champion["registered_model"], str(champion["version"]))
    assert version.source == f"models:/{champion['model_id']}"
    model = client.get_logged_model(champion["model_id"])
    assert model.source_run_id == version.run_id
    assert {"name": champion["registered_model"], "version": champion["version"]} in json.loads(
        model.tags["mlflow.modelVersions"])  # what the model page lists as its registered versions


def test_iteration_runs_exist_from_their_start(run):
    """A child run starts before its iteration's training: its start precedes θ_k's file."""
    import os

    _, uri, summary = run
    client = MlflowClient(uri)
    experiment = client.get_run(summary["mlflow_run_id"]).info.experiment_id
    for child in client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{summary['mlflow_run_id']}'"):
        k = int(child.data.tags["rsir.iteration"])
        checkpoint_written = os.stat(summary["iterations"][k]["checkpoint"]).st_mtime * 1000
        assert child.info.start_time < checkpoint_written < child.info.end_time


def test_prefect_draws_the_data_dependencies_and_publishes_the_summary(run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
    )

    _, uri, summary = run
    flow_run_id = MlflowClient(uri).get_run(summary["mlflow_run_id"]).data.tags["prefect.flow_run_id"]
    with get_client(sync_client=True) as prefect:
        [first] = [r for r in prefect.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id]))) if r.name == "iteration-0"]
        tasks = {t.name.split("-")[0]: t for t in prefect.read_task_runs(
            flow_run_filter=FlowRunFilter(id={"any_": [first.id]}))}
        upstream = {name: {i.id for inputs in t.task_inputs.values() for i in inputs} for name, t in tasks.items()}
        assert tasks["train"].id in upstream["evaluate"] and tasks["train"].id in upstream["generate"]
        assert tasks["generate"].id in upstream["filter"] and tasks["filter"].id in upstream["expand"]
        [artifact] = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["rsir-summary"])),
            flow_run_filter=FlowRunFilter(id={"any_": [flow_run_id]}))
    text = artifact.data
    assert summary["mlflow_run_id"] in text and summary["mlflow_path"] in text
    assert summary["mlflow_path"].endswith("?workflowType=machine_learning")  # the model-training view
    assert f"{summary['champion']['registered_model']} v{summary['champion']['version']}" in text
    for row in summary["iterations"]:  # one table row per iteration, starting with k
        assert f"| {row['iteration']} | {row['sequences']} |" in text


def test_an_identical_resubmission_is_recognised_and_registers_nothing(run, prefect_api):
    from flows.rsir import rsir

    ws, uri, summary = run
    client = MlflowClient(uri)
    model = summary["champion"]["registered_model"]
    versions, parents = len(client.search_model_versions(f"name = '{model}'")), _parents(client)
    again = rsir(K=2, home=str(ws.root), tracking_uri=uri, **TINY_FLOW)
    assert again["resubmitted"] and again["mlflow_run_id"] == summary["mlflow_run_id"]
    assert again["iterations"] == summary["iterations"]
    assert again["champion"]["version"] == summary["champion"]["version"]
    assert len(client.search_model_versions(f"name = '{model}'")) == versions and _parents(client) == parents


def test_a_worse_run_on_the_same_data_does_not_take_the_champion_alias(run, prefect_api):
    """Another seed on the same D_0 registers its θ; the alias names the best version on the
    validation metric, whichever run registered it (the rule's unit tests force the worse case)."""
    from flows.rsir import rsir

    ws, uri, summary = run
    client = MlflowClient(uri)
    other = rsir(K=0, home=str(ws.root), tracking_uri=uri, **{**TINY_FLOW, "seed": 1, "epochs": 1})
    model = summary["champion"]["registered_model"]
    assert other["champion"]["version"] == summary["champion"]["version"] + 1
    scores = {int(v.version): float(v.tags["valid_ndcg_at_10"])
              for v in client.search_model_versions(f"name = '{model}'")}
    best = max(scores, key=lambda v: (scores[v], -v))
    champion = int(client.get_model_version_by_alias(model, "champion").version)
    assert champion == best == other["champion"]["champion_version"]
    if scores[other["champion"]["version"]] <= scores[summary["champion"]["version"]]:
        assert best == summary["champion"]["version"]


def _parents(client):
    experiment = client.get_experiment_by_name("rsir").experiment_id
    return sorted(r.info.run_id for r in client.search_runs([experiment], "tags.`rsir.run_key` != ''"))


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
    assert v1.generation.generator.backbone == "hstu"
    assert read_checkpoint(v1.generation.checkpoint)["backbone"] == "hstu"  # stored by content key
    client = MlflowClient(uri)
    child = client.search_runs([client.get_run(summary["mlflow_run_id"]).info.experiment_id],
                               f"tags.`mlflow.parentRunId` = '{summary['mlflow_run_id']}' "
                               f"and attributes.run_name = 'iteration-0'")[0]
    names = {f.path for f in client.list_artifacts(child.info.run_id)}
    assert {"checkpoint", "generator_checkpoint"} <= names
    # In MLflow each file has its readable name: backbone, version, seed, content key.
    [generator] = [f.path for f in client.list_artifacts(child.info.run_id, "generator_checkpoint")]
    assert generator.startswith("generator_checkpoint/hstu-v0-seed0-") and generator.endswith(".pt")
