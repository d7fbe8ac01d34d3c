"""What a person sees of one RSIR run (K = 2) in MLflow's UI, in headless Chromium: the parent
run's charts draw each statistic as a line over the iterations, an iteration run shows D_k and
D_{k+1}, θ_k has a model page with D_k, its metrics and its run, and the link rsir publishes
opens the model-training view. Screenshots go to $RSIR_SCREENSHOTS (docs/img was made with
RSIR_UI_DATASET=ml-100k-sparse: the same test on the real sparse view instead of the tiny slice)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from core.hashing import short_digest
from storage.dataset import dataset_store
from tests.conftest import TINY_FLOW, make_tiny_home
from tests.test_e2e_deployment import _free_port, stop_serve
from tests.test_services import _page

pytestmark = pytest.mark.prefect
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Ui:
    url: str  # the MLflow server's
    summary: dict
    digests: list[str]  # D_0..D_K, as MLflow shows them (core.hashing.short_digest)
    shots: Path


@pytest.fixture(scope="module")
def ui(prefect_api, tiny_csv, tmp_path_factory):
    """One run tracked in the workspace's SQLite store, and `rsir serve --only mlflow` over it."""
    import json

    from flows.rsir import rsir

    root = tmp_path_factory.mktemp("ui")
    ws = make_tiny_home(root / "workspace", tiny_csv)
    dataset = os.environ.get("RSIR_UI_DATASET", "tiny")
    summary = rsir(K=2, home=str(ws.root), tracking_uri=f"sqlite:///{ws.mlflow_db}",
                   **{**TINY_FLOW, "dataset": dataset})
    store = dataset_store(ws)
    digests = [short_digest(store.manifest(summary["run_dataset"], k).digest) for k in range(3)]
    ready = root / "mlflow.ready"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING"))}
    proc = subprocess.Popen([sys.executable, "-m", "rsir.cli", "serve", "--only", "mlflow", "--home", str(ws.root),
                             "--mlflow-port", str(_free_port()), "--ready-file", str(ready)],
                            cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert ready.exists(), proc.stdout.read().decode()[-3000:] if proc.poll() is not None else "not ready"
        shots = Path(os.environ.get("RSIR_SCREENSHOTS") or root / "screenshots")
        shots.mkdir(parents=True, exist_ok=True)
        yield Ui(json.loads(ready.read_text())["tracking_uri"], summary, digests, shots)
    finally:
        stop_serve(proc)


def _children(ui: Ui) -> dict:
    from mlflow import MlflowClient

    client = MlflowClient(ui.url)
    parent = client.get_run(ui.summary["mlflow_run_id"])
    runs = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return {r.info.run_name: r for r in runs}


# What the parent's "Model metrics" tab draws: every Plotly chart with the metric its legend names
# and the number of points of its first trace.
_CHARTS = """() => Array.from(document.querySelectorAll('.js-plotly-plot')).map(g => {
    let card = g;
    while (card.parentElement && card.parentElement.querySelectorAll('.js-plotly-plot').length === 1) {
        card = card.parentElement;
    }
    const match = card.innerText.match(/\\(([A-Za-z_]+\\/[^()]+)\\)/);  // the legend: "run (key/metric)"
    return [match ? match[1] : card.innerText.slice(0, 80), (g.data && g.data[0] && g.data[0].x || []).length,
            g.data && g.data[0] ? g.data[0].type : null];
})"""


def test_the_parent_run_charts_the_trend_over_k(ui, browser):
    """The link rsir publishes opens the model-training view; its metrics tab draws density and
    the validation metric as lines through K + 1 points, one per iteration."""
    link = f"{ui.url}/{ui.summary['mlflow_path']}"
    page = _page(browser, link, "Model metrics")
    text = page.inner_text("body")
    assert "Model registry" in text and "Evaluation runs" not in text and "Observability" not in text, text[:800]
    page.get_by_text("Model metrics", exact=True).first.click()
    page.get_by_text("(data/density)").first.wait_for(timeout=90_000)
    time.sleep(2)  # let every chart draw before reading them and taking the picture
    charts = {name: (points, kind) for name, points, kind in page.evaluate(_CHARTS)}
    for metric in ("data/density", "data/interactions"):  # the first section, open and drawn
        assert charts.get(metric) == (3, "scatter"), (metric, charts)
    page.screenshot(path=str(ui.shots / "mlflow-trend.png"), full_page=False)
    # Other sections start collapsed: a person finds the validation metric with the search box.
    page.get_by_placeholder("Search metric charts").fill("ndcg_at_10")
    page.get_by_text("(valid/ndcg_at_10)").first.wait_for(timeout=60_000)
    time.sleep(2)
    charts = {name: (points, kind) for name, points, kind in page.evaluate(_CHARTS)}
    assert charts.get("valid/ndcg_at_10") == (3, "scatter"), charts


def test_an_iteration_run_shows_d_k_and_d_k_plus_1_and_theta_k(ui, browser):
    child = _children(ui)["iteration-0"]
    dataset = ui.summary["run_dataset"]
    url = f"{ui.url}/#/experiments/{child.info.experiment_id}/runs/{child.info.run_id}?workflowType=machine_learning"
    page = _page(browser, url, f"{dataset}@v0 ({ui.digests[0]})")
    page.get_by_text("+1").first.click()  # MLflow lists a run's second dataset behind "+1"
    page.get_by_text(f"{dataset}@v1 ({ui.digests[1]})").first.wait_for(timeout=60_000)
    text = page.inner_text("body")
    assert "Training" in text and "Output" in text and "theta-0" in text, text[:3000]
    time.sleep(1)
    page.screenshot(path=str(ui.shots / "mlflow-lineage-iteration-0.png"), full_page=True)


def test_theta_k_has_a_model_page_with_its_data_metrics_and_run(ui, browser):
    child = _children(ui)["iteration-0"]
    [model_id] = [m.model_id for m in child.outputs.model_outputs]
    dataset = f"{ui.summary['run_dataset']}@v0"
    url = f"{ui.url}/#/experiments/{child.info.experiment_id}/models/{model_id}?workflowType=machine_learning"
    page = _page(browser, url, "Datasets used")
    page.get_by_text("valid/ndcg_at_10").first.wait_for(timeout=60_000)
    text = page.inner_text("body")
    assert "theta-0" in text and "Ready" in text and "iteration-0" in text, text[:3000]
    assert f"{dataset} (#{ui.digests[0]})" in text, text[:3000]  # D_k, with each metric and as "Datasets used"
    assert text.count(f"{dataset} (#{ui.digests[0]})") >= 3
    time.sleep(1)
    page.screenshot(path=str(ui.shots / "mlflow-model-theta-0.png"), full_page=True)
    # The registered θ's page names its version in the registry.
    champion = ui.summary["champion"]
    page = _page(browser, url.replace(model_id, champion["model_id"]), "Datasets used")
    page.get_by_text(f"{champion['registered_model']}").first.wait_for(timeout=60_000)
    text = page.inner_text("body")
    assert f"{champion['registered_model']}\nv{champion['version']}" in text or \
        f"{champion['registered_model']} v{champion['version']}" in text, text[:3000]
