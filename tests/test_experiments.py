"""Experiment suites (`--smoke`, tiny real data) against a real Prefect test server and a real
MLflow SQLite store: arms run as sub-flows, results come back from MLflow, a re-run skips finished
arms, shared work is shared, and `rsir report` writes tables, figures and verdicts."""

from __future__ import annotations

import re

import pytest
from mlflow import MlflowClient

from core.errors import RsirError
from reporting.results import collect_runs
from storage.tracking import Tracker
from tests.conftest import make_tiny_home

pytestmark = pytest.mark.prefect

SMOKE = dict(smoke=True, datasets=["tiny"], device="cpu", threads=1)


@pytest.fixture(scope="module")
def suites(prefect_api, tiny_csv, tmp_path_factory):
    from flows.experiments import experiment

    ws = make_tiny_home(tmp_path_factory.mktemp("experiments") / "workspace", tiny_csv)
    uri = f"sqlite:///{ws.root / 'mlflow.db'}"
    runs = {name: experiment(suite=name, home=str(ws.root), tracking_uri=uri, **SMOKE)
            for name in ("main", "sensitivity", "backbones", "faithful")}
    return ws, uri, runs


def _rows(uri: str, experiment: str) -> list[dict]:
    return collect_runs(Tracker.open(uri, experiment))


def test_main_suite_runs_every_arm_and_reports_from_mlflow(suites):
    ws, uri, runs = suites
    main = runs["main"]
    assert sorted(main["ran"]) == sorted(f"tiny/{arm}/seed{s}" for arm in ("fidelity", "no-fidelity") for s in (0, 1))
    rows = _rows(uri, main["experiment"])
    assert {(r["arm"], r["seed"], r["k"]) for r in rows} == {
        (arm, str(s), k) for arm in ("fidelity", "no-fidelity") for s in (0, 1) for k in (0, 1, 2)}
    for r in rows:
        assert 0 <= r["test/ndcg@10"] <= r["test/recall@10"] <= 1
    # Both arms of a seed start from the same θ_0 (trained once; test_sharing.py checks the reuse).
    for s in ("0", "1"):
        zero = [r for r in rows if r["seed"] == s and r["k"] == 0]
        assert len(zero) == 2 and zero[0]["test/ndcg@10"] == zero[1]["test/ndcg@10"]
    no_fid = {r["k"]: r for r in rows if r["arm"] == "no-fidelity" and r["seed"] == "0"}
    fid = {r["k"]: r for r in rows if r["arm"] == "fidelity" and r["seed"] == "0"}
    assert no_fid[1]["data/acceptance_rate"] > fid[1]["data/acceptance_rate"]
    # τ_k is logged where a threshold filtered D_{k+1}, never for the arm without fidelity control.
    assert fid[0]["generation/tau"] == fid[1]["generation/tau"] == 10
    assert not any("generation/tau" in r for r in no_fid.values())


def test_rerun_skips_finished_arms(suites):
    from flows.experiments import experiment

    ws, uri, runs = suites
    again = experiment(suite="main", home=str(ws.root), tracking_uri=uri, **SMOKE)
    assert again["ran"] == [] and sorted(again["skipped"]) == sorted(runs["main"]["ran"])


def test_sensitivity_shares_theta0_and_one_generation_per_seed(suites):
    ws, uri, runs = suites
    sens = runs["sensitivity"]
    rows = _rows(uri, sens["experiment"])
    taus = {(r["tau"], r["seed"]) for r in rows if r["sweep"] == "tau"}
    assert taus == {(t, s) for t in ("1", "10") for s in ("0", "1")}
    # The p sweep ran at the τ with the best mean validation NDCG@10 of the τ sweep.
    from reporting.results import best_on_validation

    chosen = best_on_validation(rows, "tiny", "tau")
    assert {r["tau"] for r in rows if r["sweep"] == "p"} == {chosen}
    # No τ-sweep generation (p = 0.5) ran at τ = 1: those arms re-filtered the one made at τ_max.
    from storage.artifacts import read_table

    made = [read_table(p)[1]["params"] for p in (ws.runs / "generations").glob("rollouts-*.parquet")]
    assert made and not [m for m in made if m["tau"] == 1 and m["p"] == 0.5]
    assert {m["tau"] for m in made} >= {10, None}
    # Shared trainings: fewer distinct checkpoints than iterations trained across all suites.
    iterations = sum(len(_rows(uri, runs[name]["experiment"])) for name in runs)
    assert len(list((ws.checkpoints / "by-content").glob("*.pt"))) < iterations


def test_report_tables_figures_and_mlflow(suites, tmp_path):
    from reporting.report import write_report

    ws, uri, runs = suites
    for name in ("main", "sensitivity", "backbones", "faithful"):
        tracker = Tracker.open(uri, runs[name]["experiment"])
        out = write_report(tracker, name, tmp_path / name, command=f"rsir experiment {name} --smoke")
        text = (tmp_path / name / "report.md").read_text()
        assert f"rsir experiment {name} --smoke" in text
        assert re.search(r"arms run, code ([0-9a-f]{12}|unknown)", text)  # which code produced the numbers
        assert "The paper's claims against our measurements" in text
        assert re.search(r"\*\*(held|not held|contradicted)\*\*", text)
        assert out["figures"] and all((tmp_path / name / p.split("/")[-1]).stat().st_size > 1000
                                      for p in out["figures"])
        logged = {f.path for f in MlflowClient(uri).list_artifacts(out["mlflow_run_id"], "report")}
        assert "report/report.md" in logged and len(logged) == 1 + len(out["figures"])
    main_text = (tmp_path / "main" / "report.md").read_text()
    assert "RSIR without fidelity K = 2" in main_text and "±" in main_text
    assert re.search(r"[+-]\d+\.\d% \[[+-]\d+\.\d%, [+-]\d+\.\d%\]", main_text)  # change with its CI
    assert "hstu (generator sasrec)" in (tmp_path / "backbones" / "report.md").read_text()
    faithful = (tmp_path / "faithful" / "report.md").read_text()
    for trainer in ("batch-weighted", "position-weighted", "release"):
        assert f"| {trainer} |" in faithful
    assert "synthetic share of gradient weight" in faithful and "RSIR without fidelity K = 2" in faithful
    # Each θ_1 is also compared with the θ_0 that validation prefers, and the trainings that the
    # epoch cap cut before early stopping fired are counted (smoke: 2 seeds, at most 2 epochs).
    assert "Δ test ndcg@10 vs θ_0 of `" in faithful
    assert re.search(r"\| \d+ \(best \d+; cut [0-2]/2\) / \d+ \(best \d+; cut [0-2]/2\) \|", faithful)


def test_faithful_suite_compares_trainers_then_iterates_under_the_one_validation_prefers(suites):
    from reporting.results import best_on_validation

    ws, uri, runs = suites
    rows = _rows(uri, runs["faithful"]["experiment"])
    trainers = [r for r in rows if r["stage"] == "trainer"]
    assert {(r["trainer"], r["seed"], r["k"]) for r in trainers} == {
        (t, str(s), k) for t in ("batch-weighted", "position-weighted", "release") for s in (0, 1) for k in (0, 1)}
    chosen = best_on_validation(trainers, "tiny", "trainer", k=0)
    long = [r for r in rows if r["stage"] == "long"]
    assert {r["trainer"] for r in long} == {chosen}
    assert {(r["fidelity"], r["seed"], r["k"]) for r in long} == {
        (f, str(s), k) for f in ("True", "False") for s in (0, 1) for k in (0, 1, 2)}
    # Each trainer trains its own θ_0 (the loss weighting changes θ even on real data only) ...
    zero = {r["trainer"]: r["train/loss"] for r in trainers if r["k"] == 0 and r["seed"] == "0"}
    assert len(set(zero.values())) == 3
    # ... and logs how much of its target positions and gradient weight are synthetic.
    for r in trainers:
        if r["k"] == 1:
            assert 0 < r["train/synthetic_position_share"] < 1
            if r["trainer"] != "batch-weighted":
                assert r["train/synthetic_weight_share"] == pytest.approx(r["train/synthetic_position_share"])
        else:
            assert r["train/synthetic_position_share"] == 0 == r["train/synthetic_weight_share"]


def test_report_of_an_empty_experiment_is_a_clear_error(suites, tmp_path):
    from reporting.report import write_report

    _, uri, _ = suites
    with pytest.raises(RsirError, match="no finished arm of suite 'main'"):
        write_report(Tracker.open(uri, "nothing-here"), "main", tmp_path)


def test_bad_suite_parameters_fail_before_compute(prefect_api, tmp_path):
    from prefect.exceptions import ParameterTypeError

    from flows.experiments import experiment

    # The flow's signature is derived from ExperimentConfig: Prefect checks the suite's name (an
    # enum in the deployment's schema too) before the flow runs.
    with pytest.raises(ParameterTypeError, match="suite"):
        experiment(suite="nope", home=str(tmp_path / "ws"))
    with pytest.raises(RsirError, match="seeds"):
        experiment(suite="main", seeds=[], home=str(tmp_path / "ws"))
    with pytest.raises(RsirError, match="unknown backbone 'sasrek'"):
        experiment(suite="backbones", backbone_options={"sasrek": {"dropout": 0.5}}, home=str(tmp_path / "ws"))
    with pytest.raises(RsirError, match="dropout"):  # checked for every arm before any arm runs
        experiment(suite="backbones", backbone_options={"hstu": {"dropout": 2.0}}, home=str(tmp_path / "ws"),
                   datasets=["tiny"])
    assert not (tmp_path / "ws" / "checkpoints").exists() and not (tmp_path / "ws" / "datasets").exists()


def test_smoke_trims_only_the_budget_the_caller_left_to_the_suite():
    from core.config import parse_config
    from tasks.experiment_config import ExperimentConfig, smoke_config

    left = smoke_config(parse_config(ExperimentConfig, {"suite": "main"}))
    assert (left.epochs, left.patience, left.trials, left.seeds) == (2, 1, 2, [0, 1])
    given = smoke_config(parse_config(ExperimentConfig, {"suite": "main", "epochs": 5000, "patience": 5000}))
    assert (given.epochs, given.patience, given.trials) == (5000, 5000, 2)
