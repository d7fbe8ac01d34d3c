"""MLflow on PostgreSQL without a tracking server: `tracking_uri=postgresql://…` (and
$MLFLOW_TRACKING_URI when none is given) for the flow, against the machine's real PostgreSQL."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from tests.conftest import TINY_FLOW, make_tiny_home

pytestmark = pytest.mark.prefect


def test_flow_tracks_to_postgresql_directly_and_through_the_environment(prefect_api, postgres, tiny_csv,
                                                                         tmp_path, monkeypatch):
    from flows.rsir import rsir

    uri = postgres("tracking")
    ws = make_tiny_home(tmp_path / "workspace", tiny_csv)
    first = rsir(K=1, home=str(ws.root), tracking_uri=uri, **TINY_FLOW)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # what `rsir serve` gives its workers
    second = rsir(K=1, home=str(ws.root), **{**TINY_FLOW, "seed": 1})
    assert first["tracking_uri"] == second["tracking_uri"] == uri
    assert first["mlflow_url"] is None  # a database, not a server: no UI link to print

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("rsir")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([experiment.experiment_id])
    parents = {r.info.run_id for r in runs if "rsir.lineage" in r.data.tags}
    assert parents == {first["mlflow_run_id"], second["mlflow_run_id"]}
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") in parents]
    assert sorted(r.info.run_name for r in children) == ["iteration-0", "iteration-0", "iteration-1", "iteration-1"]
    # Both runs start from the same D_0: the alias names the better of the two on validation
    # NDCG@10 (the earlier of equals), whichever registered last.
    assert (first["champion"]["version"], second["champion"]["version"]) == (1, 2)
    scores = [first["champion"]["valid"], second["champion"]["valid"]]
    champion = client.get_model_version_by_alias("rsir-tiny-sasrec", "champion")
    assert int(champion.version) == (2 if scores[1] > scores[0] else 1) == second["champion"]["champion_version"]
    assert champion.tags["rsir.dataset"] == (second if scores[1] > scores[0] else first)["run_dataset"]
    assert champion.source.startswith("models:/m-")  # the logged model θ_k, resolved on PostgreSQL
