"""`rsir tune` (issue 26): an Optuna study over RSIR's settings on tiny real data, each trial an
`rsir` run at K = 1 scored on θ_1's validation NDCG@10, against the session's Prefect server: one
worker on the workspace's SQLite study (θ_0 and the generation shared, a trial pruned, the best θ_1
registered), two worker processes on one PostgreSQL study, and bad input refused in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from core.errors import RsirError
from storage.tracking import Tracker
from tasks.tune import TUNED, EpochPruner, TuneConfig
from tests.conftest import TINY_FLOW, make_tiny_home

pytestmark = pytest.mark.prefect
REPO = Path(__file__).resolve().parent.parent
# τ and λ drawn; p, m and the budget fixed, so every trial shares one generation (at τ = 20). τ
# from 5: at τ <= 2 the tiny model may accept no sequence, and θ_1 is then θ_0 (reused, not trained).
TINY_TUNE = dict(dataset="tiny", seeds=[0], threads=1, tau="5..20 log", p="0.5", m="2",
                 synthetic_weight="0.1..1 log", source_share="0.5", startup_trials=1, warmup_epochs=0,
                 sampler_seed=0)
TINY_RUN = {k: v for k, v in TINY_FLOW.items() if k not in ("dataset", "seed", "threads")}


def _iteration_runs(client: MlflowClient, experiment_id: str, study: str, trial: int) -> list:
    """θ_1's MLflow runs (iteration 1) of a trial, through its nested `rsir` parent runs."""
    parents = client.search_runs([experiment_id], f"tags.`rsir.tune_study` = '{study}' and "
                                                  f"tags.`rsir.tune_trial` = '{trial}'")
    return [child for parent in parents for child in client.search_runs(
        [experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and attributes.run_name = 'iteration-1'")]


@pytest.fixture(scope="module")
def one_worker(prefect_api, tiny_csv, tmp_path_factory):
    """Three trials on the workspace's SQLite study; the pruner stops trial 2 at θ_1's first epoch."""
    from flows.tune import tune

    ws = make_tiny_home(tmp_path_factory.mktemp("tune") / "workspace", tiny_csv)
    uri = f"sqlite:///{ws.root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(optuna.trial.Trial, "should_prune", lambda trial: trial.number == 2)
        summary = tune(trials=3, home=str(ws.root), run_params={**TINY_RUN, "tracking_uri": uri}, **TINY_TUNE)
    return ws, uri, summary


def test_a_study_in_the_workspace_runs_prunes_and_counts_its_trials(one_worker):
    ws, _, summary = one_worker
    assert summary["storage"] == f"sqlite:///{ws.root / 'optuna.db'}"
    study = optuna.load_study(study_name="rsir-tune-tiny-sasrec-seeds0", storage=summary["storage"])
    states = [t.state.name for t in sorted(study.trials, key=lambda t: t.number)]
    assert states == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert summary["trials"] | {} == {"this_worker": 3, "total": 3, "complete": 2, "pruned": 1, "fail": 0,
                                      "running": 0}
    pruned = study.trials[2]
    assert list(pruned.intermediate_values) == [1]  # reported θ_1's first epoch, then stopped
    assert summary["rows"][2]["value"] is None and summary["rows"][2]["last_report"][0] == 1  # no score
    assert summary["best"]["trial"] == study.best_trial.number
    assert summary["best"]["valid_ndcg@10"] == study.best_value
    for trial in study.trials:
        assert 5 <= trial.params["tau"] <= 20 and 0.1 <= trial.params["synthetic_weight"] <= 1
        assert (trial.params["p"], trial.params["m"], trial.params["source_share"]) == (0.5, 2, 0.5)
        assert trial.user_attrs["max_sources"] == 75  # half of the 150 tiny sequences


def test_trials_share_theta0_and_one_generation(one_worker):
    ws, _, summary = one_worker
    reuse = summary["reuse"]
    # The first trial trained θ_0, the second reused it (task seconds below the training's own).
    assert (reuse["runs"], reuse["theta0_trained"], reuse["theta0_reused"]) == (2, 1, 1)
    assert reuse["theta0_seconds_saved"] > 0
    # Every trial generated at τ = 20 with the same p, m and budget: one generation, filtered per τ.
    assert reuse["generations"] == 1
    assert len(list((ws.runs / "generations").glob("rollouts-*.parquet"))) == 1
    taus = {row["settings"]["tau"] for row in summary["rows"] if row["state"] == "COMPLETE"}
    assert len(taus) == 2  # two τ, one generation


def test_every_trial_is_scored_on_validation_and_nested_under_the_study_run(one_worker):
    _, uri, summary = one_worker
    client = MlflowClient(uri)
    study_run = client.get_run(summary["mlflow_run_id"])
    assert study_run.data.tags["rsir.tune_study"] == summary["study"] and "mlflow.parentRunId" not in study_run.data.tags
    assert study_run.data.metrics["best_valid_ndcg_at_10"] == summary["best"]["valid_ndcg@10"]
    assert study_run.data.params["tau"] == "5..20 log"
    experiment = study_run.info.experiment_id
    trials = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{study_run.info.run_id}'")
    assert sorted(r.data.tags["rsir.tune_trial"] for r in trials) == ["0", "1", "2"]
    states = {r.data.tags["rsir.tune_trial"]: (r.data.tags["rsir.tune_state"], r.info.status) for r in trials}
    assert states == {"0": ("COMPLETE", "FINISHED"), "1": ("COMPLETE", "FINISHED"), "2": ("PRUNED", "FAILED")}
    for row in summary["rows"]:
        if row["state"] != "COMPLETE":
            continue
        (theta1,) = _iteration_runs(client, experiment, summary["study"], row["number"])
        assert row["value"] == theta1.data.metrics["valid/ndcg_at_10"]  # validation, never test
        assert row["runs"][0]["theta0_valid"] == summary["best"]["theta0_valid_ndcg@10"]  # one θ_0


def test_the_best_trials_theta_is_registered_with_its_settings(one_worker):
    _, uri, summary = one_worker
    client = MlflowClient(uri)
    (version,) = client.search_model_versions(f"name = '{summary['study']}'")
    best = summary["best"]
    assert summary["registered"] == {"model": summary["study"], "version": 1, "trial": best["trial"],
                                     "champion_version": 1}
    assert version.tags["rsir.tune_trial"] == str(best["trial"])
    for name in TUNED:
        assert float(version.tags[f"setting.{name}"]) == best["settings"][name]
    assert float(version.tags["valid_ndcg_at_10"]) == pytest.approx(best["valid_ndcg@10"], rel=1e-5)
    (theta1,) = _iteration_runs(client, experiment_id=client.get_run(summary["mlflow_run_id"]).info.experiment_id,
                                study=summary["study"], trial=best["trial"])
    assert version.run_id == theta1.info.run_id and version.source.startswith("models:/m-")


def test_the_summary_for_people_names_the_best_settings_and_the_counts(one_worker, capsys):
    from rsir.cli import _render_tune

    _, _, summary = one_worker
    _render_tune(summary)
    out = capsys.readouterr().out
    best = summary["best"]
    assert "3 trials (3 by this worker): 2 complete, 1 pruned, 0 failed" in out
    assert f"best: trial {best['trial']} (tau={best['settings']['tau']}, " in out
    assert f"valid ndcg@10 of θ_1 {best['valid_ndcg@10']:.4f} against θ_0's {best['theta0_valid_ndcg@10']:.4f}" in out
    assert ("keep θ_0" in out) == (not best["beats_theta0"])
    assert "trial   2 PRUNED   valid      -" in out and "(stopped at step 1: " in out
    assert "reuse: θ_0 trained 1x, reused 1x" in out and "1 generations for 2 runs" in out


def test_the_pruner_watches_theta1_only():
    class Trial:
        number, reports = 7, []

        def report(self, value, step):
            self.reports.append((step, value))

        def should_prune(self):
            return True

    from tasks.config import TrainConfig

    watch = EpochPruner(Trial(), offset=10)
    watch(TrainConfig(version=0), {"epoch": 1, "valid_ndcg@10": 0.5})  # θ_0: not the objective
    assert Trial.reports == []
    with pytest.raises(optuna.TrialPruned, match="trial 7"):
        watch(TrainConfig(version=1), {"epoch": 2, "valid_ndcg@10": 0.25})
    assert Trial.reports == [(12, 0.25)]


def test_two_workers_run_trials_of_one_postgresql_study(prefect_api, postgres, tiny_csv, tmp_path):
    storage, tracking = postgres("optuna"), postgres("tune_tracking")
    ws = make_tiny_home(tmp_path / "workspace", tiny_csv)
    # The tracking store exists before its workers start, as a team's does (two processes that
    # create MLflow's tables in one new PostgreSQL database at once collide). Optuna's tables are
    # left to the workers: the one that loses that race tries again.
    Tracker.open(tracking, "rsir")
    params = {**TINY_TUNE, "sampler_seed": None, "startup_trials": 2, "trials": 2, "storage": storage,
              "study": "two-workers", "home": str(ws.root), "run_params": {**TINY_RUN, "tracking_uri": tracking}}
    script = "import json, sys; from flows.tune import tune; print(json.dumps(tune(**json.loads(sys.argv[1]))))"
    logs = [tmp_path / f"worker-{i}.log" for i in range(2)]
    workers = [subprocess.Popen([sys.executable, "-c", script, json.dumps(params)], cwd=REPO, text=True,
                                env={**os.environ, "PREFECT_API_URL": prefect_api}, stdout=subprocess.PIPE,
                                stderr=log.open("w")) for log in logs]
    summaries = []
    for worker, log in zip(workers, logs):
        out, _ = worker.communicate(timeout=1800)
        assert worker.returncode == 0, log.read_text()[-3000:]
        summaries.append(json.loads(out.strip().splitlines()[-1]))
    study = optuna.load_study(study_name="two-workers", storage=storage)
    assert len(study.trials) == 4 and [s["trials"]["this_worker"] for s in summaries] == [2, 2]
    by_worker: dict[str, int] = {}
    for trial in study.trials:
        assert trial.state.name in ("COMPLETE", "PRUNED")
        by_worker[trial.user_attrs["worker"]] = by_worker.get(trial.user_attrs["worker"], 0) + 1
    assert sorted(by_worker.values()) == [2, 2]  # both workers ran trials of the one study
    # Every complete trial's value is θ_1's validation NDCG@10 (the trial's MLflow run).
    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name("rsir").experiment_id
    for trial in study.trials:
        if trial.state.name == "COMPLETE":
            (theta1,) = _iteration_runs(client, experiment, "two-workers", trial.number)
            assert trial.value == theta1.data.metrics["valid/ndcg_at_10"]
    # The best trial's θ_1 is registered with its settings (a worker that finished earlier may
    # have registered the best of its time too; none registered anything else).
    versions = client.search_model_versions("name = 'two-workers'")
    complete = {str(t.number) for t in study.trials if t.state.name == "COMPLETE"}
    assert versions and {v.tags["rsir.tune_trial"] for v in versions} <= complete
    (best,) = [v for v in versions if v.tags["rsir.tune_trial"] == str(study.best_trial.number)]
    for name in TUNED:
        assert float(best.tags[f"setting.{name}"]) == study.best_trial.params[name]
    # θ_0 is trained at most once per worker (both started together), then reused; p, m and the
    # budget are fixed, so each θ_0 file made one generation at most (a generation is keyed by
    # the checkpoint file's bytes, which hold the training's own metadata besides the weights).
    runs = [run for t in study.trials for k, run in t.user_attrs.items() if k.startswith("seed_")]
    trained = sum(not r["theta0_reused"] for r in runs)
    assert 1 <= trained <= 2 and len({r["generation_key"] for r in runs}) <= trained


@pytest.mark.parametrize("args, needle", [
    (["--tau", "0..100"], "'tau': range 0..100"),
    (["--p", "0.5..2"], "'p': range 0.5..2"),
    (["--m", "1..10 log step 2"], "'m'"),
    (["--synthetic-weight", "0..1 log"], "a log range needs low > 0"),
    (["--storage", "mysql://db/optuna"], "'storage'"),
    (["--storage", "sqlite:///relative.db"], "'storage'"),
    (["--run-params", "tau=3"], "may not set tau"),
    (["--storage", "postgresql://postgres@127.0.0.1:1/none"], "Optuna storage 'postgresql://postgres@127.0.0.1:1/none'"),
])
def test_bad_input_is_one_line_and_exit_2(cli, args, needle, tiny_csv, tmp_path, monkeypatch):
    ws = make_tiny_home(tmp_path / "workspace", tiny_csv)
    monkeypatch.delenv("PREFECT_HOME", raising=False)
    result = cli("tune", "--dataset", "tiny", "--home", ws.root, *args)
    assert result.code == 2, result
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], lines
    assert not (ws.root / "prefect").exists() and not (ws.root / "optuna.db").exists()  # nothing started


def test_the_flow_and_the_command_take_every_tune_config_field(cli):
    from flows.tune import tune
    from tasks.tune import tune_parameters

    names = [p.name for p in tune_parameters()]
    assert set(names) == set(TuneConfig.model_fields)
    assert list(tune.parameters.model_dump()["properties"]) == names
    out = cli("tune", "--help").out
    for name in names:
        if name != "home":
            assert "--" + name.replace("_", "-") in out, name
    with pytest.raises(RsirError, match="'tau'"):
        TuneConfig.from_parameters({"tau": "5..1"})
    # A deployment's `--param m=2` arrives as a number: one value, the setting fixed.
    fixed = TuneConfig.from_parameters(tune.validate_parameters({"m": 2, "p": 0.5, "tau": "5..20 log"}))
    assert (fixed.m.low, fixed.m.high, fixed.p.low, fixed.p.high, str(fixed.tau)) == (2, 2, 0.5, 0.5, "5..20 log")


def test_lambda_does_not_key_a_training_on_real_data_only():
    # θ_0's data has no synthetic sequence, so λ weighs nothing: trials of any λ share θ_0.
    from tasks.config import TrainConfig
    from tasks.train import content_key

    low, default = TrainConfig(synthetic_weight=0.2), TrainConfig()
    assert content_key(low, "d", synthetic=False) == content_key(default, "d", synthetic=False) == \
        content_key(default, "d")  # keys made at the default stay as they were
    assert content_key(low, "d") != content_key(default, "d")


def test_a_storage_file_that_is_no_database_is_one_line(cli, tiny_csv, tmp_path, monkeypatch):
    ws = make_tiny_home(tmp_path / "workspace", tiny_csv)
    (ws.root / "optuna.db").write_text("not a database")  # the default storage
    monkeypatch.delenv("PREFECT_HOME", raising=False)
    result = cli("tune", "--dataset", "tiny", "--home", ws.root)
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1
    assert f"Optuna storage 'sqlite:///{ws.root / 'optuna.db'}' is unreachable or invalid" in result.err
    assert (ws.root / "optuna.db").read_text() == "not a database" and not (ws.root / "prefect").exists()
