"""A team's setup, for real: the Prefect server on PostgreSQL, an MLflow tracking server on
PostgreSQL, and two workers, each started by the same `rsir serve --only SERVICE` command that
deployments/compose.yaml runs in its containers. Two `rsir` runs and an experiment smoke suite are
submitted at once with `prefect deployment run`; then what MLflow holds is checked run by run, and
a person's view of it in headless Chromium (MLflow's UI and Prefect's)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from core.hashing import SHOWN_DIGITS
from core.workspace import Workspace
from storage.dataset import dataset_store
from storage.tracking import Tracker
from tests.conftest import TINY_FLOW, make_tiny_home
from tests.test_e2e_deployment import _free_port, _port_open, stop_serve

pytestmark = pytest.mark.prefect
REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SMOKE_SUITE = {"suite": "main", "smoke": True, "datasets": ["tiny"], "seeds": [0], "device": "cpu", "threads": 1}


@dataclass
class Team:
    home: Path
    prefect_api: str
    tracking_uri: str
    env: dict[str, str]
    submitted: int
    completed: int
    seconds: float
    screenshots: Path


def _serve(args: list[str], home: Path, name: str, env: dict[str, str]) -> tuple[subprocess.Popen, dict]:
    ready = home.parent / f"{name}.ready"
    proc = subprocess.Popen([str(BIN / "rsir"), "serve", *args, "--home", str(home), "--ready-file", str(ready)],
                            cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    if not ready.exists():
        out = proc.stdout.read().decode()[-3000:] if proc.poll() is not None else "not ready in 240 s"
        raise AssertionError(f"`rsir serve {' '.join(args)}`: {out}")
    return proc, json.loads(ready.read_text())


def _submit(deployment: str, params: dict, env: dict[str, str]) -> subprocess.Popen:
    cmd = [str(BIN / "prefect"), "deployment", "run", deployment, "--watch", "--watch-timeout", "900"]
    for key, value in params.items():
        cmd += ["--param", f"{key}={json.dumps(value) if isinstance(value, (dict, list, bool)) else value}"]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def team(tiny_csv, tmp_path_factory, postgres):
    root = tmp_path_factory.mktemp("team")
    ws = make_tiny_home(root / "workspace", tiny_csv)
    prefect_db = postgres("prefect").replace("postgresql://", "postgresql+asyncpg://")
    mlflow_db = postgres("mlflow")
    port, mlflow_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING"))}
    procs = []
    try:
        proc, prefect = _serve(["--only", "prefect", "--database", prefect_db, "--port", str(port)], ws.root,
                               "prefect", env)
        procs.append(proc)
        proc, mlflow = _serve(["--only", "mlflow", "--tracking-uri", mlflow_db, "--mlflow-port", str(mlflow_port)],
                              ws.root, "mlflow", env)
        procs.append(proc)
        proc, _ = _serve(["--only", "worker", "--workers", "2", "--prefect-api", prefect["prefect_api"],
                          "--tracking-uri", mlflow["tracking_uri"]], ws.root, "worker", env)
        procs.append(proc)
        cli_env = {**env, "PREFECT_API_URL": prefect["prefect_api"], "PREFECT_HOME": str(root / "cli-prefect")}

        started = time.monotonic()
        flow = {**TINY_FLOW, "K": 1}
        runs = [_submit("rsir/iterate", {**flow, "seed": seed}, cli_env) for seed in (0, 1)]
        runs.append(_submit("rsir-experiment/experiment", SMOKE_SUITE, cli_env))
        outputs = [run.communicate(timeout=1000)[0] for run in runs]
        seconds = time.monotonic() - started
        completed = sum(run.returncode == 0 and "Completed" in out for run, out in zip(runs, outputs))
        assert completed == len(runs), "\n---\n".join(o[-2000:] for o in outputs)
        shots = Path(os.environ.get("RSIR_SCREENSHOTS") or root / "screenshots")
        shots.mkdir(parents=True, exist_ok=True)
        print(f"\nteam: {len(runs)} flow runs submitted at once, {completed} completed in {seconds:.1f} s")
        yield Team(ws.root, prefect["prefect_api"], mlflow["tracking_uri"], cli_env, len(runs), completed,
                   seconds, shots)
    finally:
        for proc in reversed(procs):
            stop_serve(proc)
    for p in (port, mlflow_port):
        assert not _port_open(p), f"port {p} still listens after rsir serve stopped"
    leftovers = subprocess.run(["pgrep", "-f", str(ws.root)], capture_output=True, text=True).stdout.split()
    assert not leftovers, f"processes left running: {leftovers}"


def _client(team: Team):
    from mlflow import MlflowClient

    return MlflowClient(team.tracking_uri)


def test_concurrent_runs_are_all_tracked_once_with_complete_lineages(team):
    client = _client(team)
    store = dataset_store(Workspace.at(team.home))
    experiments = {e.name: e.experiment_id for e in client.search_experiments()}
    assert {"rsir", "experiment-main-smoke"} <= set(experiments)
    runs = client.search_runs([experiments["rsir"], experiments["experiment-main-smoke"]], max_results=1000)
    parents = [r for r in runs if "rsir.lineage" in r.data.tags]
    # 2 submitted runs + the smoke suite's 2 arms (fidelity, no-fidelity), each exactly once. The
    # seed-0 run (K = 1) and the suite's seed-0 fidelity arm (K = 2) share a lineage, so they ran
    # the same θ_0 and D_1 at the same time: both finished, on one checkpoint and one D_1.
    keys = [(r.data.tags["rsir.lineage"], r.data.tags["rsir.K"]) for r in parents]
    assert len(parents) == 4 and len(set(keys)) == 4, keys
    assert len({r.data.tags["prefect.flow_run_id"] for r in parents}) == 4
    assert len({r.data.tags["rsir.lineage"] for r in parents}) == 3
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    by_parent: dict[str, list] = {}
    for run in runs:
        parent = run.data.tags.get("mlflow.parentRunId")
        if parent:
            by_parent.setdefault(parent, []).append(run)
    versions = client.search_model_versions("name = 'rsir-tiny-sasrec'")
    assert len(versions) == len(parents)  # one registration per run, none lost or doubled
    for parent in parents:
        K = int(parent.data.tags["rsir.K"])
        children = sorted(by_parent[parent.info.run_id], key=lambda r: r.info.run_name)
        assert [c.info.run_name for c in children] == [f"iteration-{k}" for k in range(K + 1)]
        dataset = parent.data.params["run_dataset"]
        digests = {v: store.manifest(dataset, v).digest for v in store.versions(dataset)}
        for k, child in enumerate(children):
            inputs = {(d.dataset.name, d.tags[0].value): d.dataset.digest for d in child.inputs.dataset_inputs}
            assert inputs[(f"{dataset}@v{k}", "training")] == digests[k][:SHOWN_DIGITS]
            if k < K:
                assert inputs[(f"{dataset}@v{k + 1}", "output")] == digests[k + 1][:SHOWN_DIGITS]
            assert [f.path for f in client.list_artifacts(child.info.run_id, "checkpoint")]
        parent_inputs = {(d.dataset.name, d.tags[0].value) for d in parent.inputs.dataset_inputs}
        assert parent_inputs == {(f"{dataset}@v0", "input"), (f"{dataset}@v{K}", "output")}
        # The version registered for this run is its best child on validation NDCG@10, tagged so.
        best = max(children, key=lambda c: c.data.metrics["valid/ndcg_at_10"])
        mine = [v for v in versions if v.run_id in {c.info.run_id for c in children}]
        assert len(mine) == 1 and mine[0].run_id == best.info.run_id
        assert mine[0].tags["rsir.dataset"] == dataset
        assert mine[0].tags["rsir.iteration"] == best.data.tags["rsir.iteration"]
        assert mine[0].tags["rsir.dataset_digest"] == digests[int(mine[0].tags["rsir.iteration"])]
    # Every run started from the same D_0: the alias names the best version on validation NDCG@10
    # (the earliest of equals), not the latest registration.
    champion = client.get_model_version_by_alias("rsir-tiny-sasrec", "champion")
    score = {int(v.version): float(v.tags["valid_ndcg_at_10"]) for v in versions}
    assert int(champion.version) == max(score, key=lambda v: (score[v], -v))
    for name in ("rsir", "experiment-main-smoke"):
        assert client.get_experiment(experiments[name]).tags["mlflow.experimentKind"] == "custom_model_development"


def _page(browser, url: str, expect: str, shot: Path | None = None):
    """Open `url` in a fresh page, wait until `expect` shows, close MLflow's assistant panel (it
    covers a third of the window) and take a screenshot."""
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.goto(url)
    page.get_by_text(expect, exact=False).first.wait_for(timeout=90_000)  # a loaded machine
    close = page.get_by_role("button", name="Close")
    if close.count():
        close.first.click()
    time.sleep(1)  # let tables settle before the picture
    if shot is not None:
        page.screenshot(path=str(shot), full_page=True)
    return page


def _parent_of(team: Team, seed: int):
    client = _client(team)
    experiment = client.get_experiment_by_name("rsir")
    parents = [r for r in client.search_runs([experiment.experiment_id], "params.seed = '%d'" % seed)
               if "rsir.lineage" in r.data.tags and r.data.tags["rsir.K"] == "1"]
    assert len(parents) == 1
    children = {c.info.run_name: c for c in client.search_runs(
        [experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")}
    return experiment.experiment_id, parents[0], children


def test_mlflow_ui_shows_the_lineage(team, browser):
    """What a person sees: the model-training view of the experiment, the parent run with its
    iteration-k children, D_k's digests with their contexts, θ_k, and the champion alias."""
    exp, parent, children = _parent_of(team, seed=1)
    dataset = parent.data.params["run_dataset"]
    store = dataset_store(Workspace.at(team.home))
    digest = {v: store.manifest(dataset, v).digest[:SHOWN_DIGITS] for v in (0, 1)}
    ui = f"{team.tracking_uri}/#/experiments/{exp}"
    view = "?workflowType=machine_learning"  # MLflow 3.17 picks the view from the URL or a toggle

    page = _page(browser, ui + view, parent.info.run_name)
    text = page.inner_text("body")
    assert "Model training" in text and "Evaluation runs" not in text, text[:1500]
    page.get_by_text("Expand rows", exact=True).first.click()  # every run's datasets, not the first
    page.screenshot(path=str(team.screenshots / "mlflow-experiment.png"), full_page=True)

    # The link rsir prints at the end of a run tracked through a server.
    link = Tracker.open(team.tracking_uri, "rsir").run_url(parent.info.run_id)
    assert link == f"{ui}/runs/{parent.info.run_id}{view}"
    page = _page(browser, link, "Child runs", team.screenshots / "mlflow-parent-run.png")
    text = page.inner_text("body")
    assert "iteration-0" in text and "iteration-1" in text, text
    assert f"{dataset}@v0 ({digest[0]})" in text and "Input" in text, text

    child = children["iteration-0"]
    page = _page(browser, f"{ui}/runs/{child.info.run_id}{view}", f"{dataset}@v0 ({digest[0]})")
    page.get_by_text("+1").first.click()  # the second dataset, D_1, behind a "+1"
    page.get_by_text(f"{dataset}@v1 ({digest[1]})").first.wait_for(timeout=30_000)
    text = page.inner_text("body")
    assert "Training" in text and "Output" in text, text
    page.screenshot(path=str(team.screenshots / "mlflow-iteration-0.png"), full_page=True)

    page = _page(browser, f"{ui}/runs/{child.info.run_id}/artifacts{view}", "checkpoint",
                 team.screenshots / "mlflow-iteration-0-artifacts.png")
    assert "ranks" in page.inner_text("body")

    page = _page(browser, f"{team.tracking_uri}/#/models/rsir-tiny-sasrec", "champion",
                 team.screenshots / "mlflow-registered-model.png")
    text = page.inner_text("body")
    assert "rsir.dataset_digest" in text and "rsir.iteration" in text and "valid_ndcg_at_10" in text, text


def test_prefect_ui_shows_the_flow_run_with_its_iterations(team, browser):
    _, parent, _ = _parent_of(team, seed=0)
    flow_run = parent.data.tags["prefect.flow_run_id"]
    ui = team.prefect_api.removesuffix("/api")
    page = _page(browser, f"{ui}/runs/flow-run/{flow_run}", "rsir-tiny-sasrec-K1",
                 team.screenshots / "prefect-flow-run.png")
    text = page.inner_text("body")
    assert "Completed" in text, text[:2000]
    page.get_by_text("Subflow Runs", exact=True).first.click()
    page.get_by_text("iteration-1").first.wait_for(timeout=30_000)
    assert "iteration-0" in page.inner_text("body")
    page.screenshot(path=str(team.screenshots / "prefect-subflows.png"), full_page=True)
    page.get_by_text("Artifacts", exact=True).first.click()
    page.get_by_text("rsir-iterations").first.wait_for(timeout=30_000)
    assert "rsir-progress" in page.inner_text("body")
    page.screenshot(path=str(team.screenshots / "prefect-artifacts.png"), full_page=True)
