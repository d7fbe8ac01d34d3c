"""`rsir tune` (issue 26): an Optuna study over RSIR's settings on tiny real data, each trial an
`rsir` run at K = 1 scored on θ_1's validation NDCG@10, against the session's Prefect server: one
worker on the workspace's SQLite study (θ_0 and the generation shared, a trial pruned, the best θ_1
registered), two worker processes on one PostgreSQL study, an interrupted `rsir tune` that closes
what it opened and is continued by the same command, and bad input refused in one line."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from core.errors import RsirError
from storage.tracking import Tracker
from tasks.tune import TUNED, EpochPruner, TuneConfig
from tests.conftest import TINY_FLOW, command_env, interrupt_command, make_tiny_home

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
                                      "running": 0, "interrupted": 0}
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
    # The first trial trained θ_0, the second and the third reused it (task seconds below the
    # training's own); the third, pruned in θ_1's training, counts: it ran θ_0's task and D_1.
    assert (reuse["runs"], reuse["theta0_trained"], reuse["theta0_reused"]) == (3, 1, 2)
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
    assert "reuse: θ_0 trained 1x, reused 2x" in out and "1 generations for 3 runs" in out


def test_study_trials_caps_the_study_not_the_worker(prefect_api, tiny_csv, tmp_path):
    """Several workers (or suite jobs) share one budget: a worker asked for 3 trials stops when the
    study holds the 2 it may, and a worker that finds it full adds none (Optuna's MaxTrialsCallback)."""
    from flows.tune import tune

    ws = make_tiny_home(tmp_path / "workspace", tiny_csv)
    kw = dict(home=str(ws.root), run_params={**TINY_RUN, "tracking_uri": f"sqlite:///{ws.root / 'mlflow.db'}"},
              **TINY_TUNE)
    first = tune(trials=3, study_trials=2, **kw)
    assert first["trials"]["this_worker"] == 2 and first["trials"]["total"] == 2
    again = tune(trials=3, study_trials=2, **kw)
    assert again["trials"]["this_worker"] == 0 and again["trials"]["total"] == 2
    more = tune(trials=1, study_trials=5, **kw)  # a larger cap: this worker's own count still holds
    assert more["trials"]["this_worker"] == 1 and more["trials"]["total"] == 3
    study = optuna.load_study(study_name=first["study"], storage=f"sqlite:///{ws.root / 'optuna.db'}")
    assert len(study.trials) == 3


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
    (["--tau", "0..100"], "--tau 0..100: range 0..100"),
    (["--p", "0.5..2"], "--p 0.5..2: range 0.5..2"),
    (["--m", "1..10 log step 2"], "--m '1..10 log step 2': "),
    (["--synthetic-weight", "0..1 log"], "a log range needs low > 0"),
    (["--storage", "mysql://db/optuna"], "--storage mysql://db/optuna: "),
    (["--storage", "sqlite:///relative.db"], "--storage sqlite:///relative.db: "),
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


# The summary's JSON as it was a string-keyed dict (before TuneSummary): `rsir tune --json` and the
# study run's tune_summary.json keep these keys.
SUMMARY_KEYS = {"study", "storage", "dataset", "model", "seeds", "metric", "trials", "best", "registered", "reuse",
                "rows", "mlflow_run_id", "tracking_uri", "mlflow_url", "wall_seconds"}
NESTED_KEYS = {
    "trials": {"this_worker", "total", "complete", "pruned", "fail", "running", "interrupted"},
    "best": {"trial", "settings", "valid_ndcg@10", "theta0_valid_ndcg@10", "gain", "beats_theta0"},
    "registered": {"model", "version", "trial", "champion_version"},
    "reuse": {"runs", "theta0_trained", "theta0_reused", "theta0_seconds_saved", "generations", "generation_seconds"},
}
ROW_KEYS = {"number", "state", "value", "settings", "worker", "runs", "last_report", "interrupted"}
SEED_RUN_KEYS = {"seed", "valid", "theta0_valid", "mlflow_run_id", "theta0_reused", "theta0_train_seconds",
                 "theta0_task_seconds", "generation_key", "generate_seconds", "wall_seconds", "pruned"}


def _assert_summary_keys(summary: dict) -> None:
    assert set(summary) == SUMMARY_KEYS
    for name, keys in NESTED_KEYS.items():
        assert set(summary[name]) == keys, name
    assert set(summary["best"]["settings"]) == {*TUNED, "max_sources"}
    for row in summary["rows"]:
        assert set(row) == ROW_KEYS and set(row["settings"]) == set(TUNED)
        for run in row["runs"]:
            assert set(run) == SEED_RUN_KEYS


def test_the_summary_is_a_typed_record_with_the_json_it_had(one_worker):
    from tasks.tune import TuneSummary

    ws, uri, summary = one_worker
    _assert_summary_keys(summary)
    json.dumps(summary)  # plain JSON, as the flow's result and `--json`
    typed = TuneSummary.model_validate(summary)
    assert typed.model_dump(mode="json") == summary  # the record round-trips its JSON exactly
    assert typed.best.valid == summary["best"]["valid_ndcg@10"]
    # The pruned trial's run: θ_0 and the generation it shared, no θ_1 score and no wall time.
    (pruned,) = typed.rows[2].runs
    assert (pruned.pruned, pruned.valid, pruned.wall_seconds, pruned.theta0_reused) == (True, None, None, True)
    assert pruned.theta0_valid == typed.rows[0].runs[0].theta0_valid
    assert pruned.generation_key == typed.rows[0].runs[0].generation_key and not typed.rows[0].runs[0].pruned
    assert pruned.mlflow_run_id == MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name("rsir").experiment_id],
        "tags.`rsir.tune_trial` = '2'")[0].info.run_id
    assert isinstance(typed.rows[0].settings["tau"], int) and isinstance(summary["rows"][0]["settings"]["tau"], int)
    # The study run's tune_summary.json is the same JSON.
    logged = Tracker.open(uri, "rsir").load_dict(summary["mlflow_run_id"], "tune_summary.json")
    assert logged == summary
    # `rsir tune --json` adds only the command's seconds, which the record reads.
    with_command = {**summary, "command_seconds": 12.5}
    assert TuneSummary.model_validate(with_command).model_dump(mode="json") == with_command


def _owned_run(tracker: Tracker, study: str, trial: int, pid: int, started: float) -> str:
    """A RUNNING trial run of `study` as a worker process `pid` (start time `started`) makes it."""
    from storage.tracking import RunOwner, _machine

    owner = RunOwner(socket.gethostname(), _machine(), pid, started)
    return tracker.start_run(f"trial-{trial}", {"rsir.lineage": "x", "rsir.label.tune_study": study,
                                                "rsir.label.tune_trial": str(trial), **owner.tags()})


def test_a_stopped_worker_fails_its_trial_and_ends_the_study_run_unless_another_worker_lives(tmp_path):
    import psutil

    from flows.tune import _reopen, close_worker, worker_id
    from storage.tracking import RESUMES_TAG

    cfg = TuneConfig(dataset="tiny", study="stopped")
    tracker = Tracker.open(f"sqlite:///{tmp_path / 'mlflow.db'}", "rsir")
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}", study_name="stopped")
    study_run = tracker.start_run("stopped")
    study.set_user_attr("mlflow_run_id", study_run)
    other = study.ask()
    other.set_user_attr("worker", "elsewhere:1")
    mine = study.ask()  # as a SIGTERM leaves it: Prefect's TerminationSignal passes Optuna by
    mine.set_user_attr("worker", worker_id())
    # Another worker's trial run, alive (its process is this test's parent): the run stays open.
    parent = psutil.Process(os.getppid())
    alive = _owned_run(tracker, "stopped", other.number, parent.pid, parent.create_time())
    said = close_worker(cfg, tracker, study)
    states = {t.number: t.state.name for t in study.trials}
    assert states == {other.number: "RUNNING", mine.number: "FAIL"}
    assert said[0] == f"Optuna trial {mine.number} FAIL"
    assert said[1].startswith(f"MLflow study run {study_run} left RUNNING for the worker of trial {other.number}")
    assert tracker.status(study_run) == "RUNNING"
    # That worker was killed (its process gone, its run left RUNNING): nobody would end the study run.
    tracker.end_run(alive, "KILLED")
    _owned_run(tracker, "stopped", other.number, 2 ** 22 + 1, 0.0)  # no such process
    assert close_worker(cfg, tracker, study, "KILLED") == [f"Optuna trial {mine.number} FAIL",
                                                           f"MLflow study run {study_run} KILLED"]
    assert tracker.status(study_run) == "KILLED"
    # The next worker (or the next trial of a live one) reopens it.
    _reopen(tracker, study_run)
    assert tracker.status(study_run) == "RUNNING"
    assert MlflowClient(tracker.uri).get_run(study_run).data.tags[RESUMES_TAG] == "1"


# A trial of `rsir tune` on tiny data whose trainings last long enough to be interrupted
# mid-trial, and short enough that the rerun's trial completes (epochs are a run setting of the
# study: the rerun must give the same).
INTERRUPT_EPOCHS = 30
TUNE_COMMAND = ["tune", "--dataset", "tiny", "--threads", "1", "--tau", "5..20 log", "--p", "0.5", "--m", "2",
                "--source-share", "0.5", "--sampler-seed", "0", "--trials", "1",
                *(arg for pair in (f"epochs={INTERRUPT_EPOCHS}", f"patience={INTERRUPT_EPOCHS}", "device=cpu",
                                   "model_params.hidden=16", "model_params.layers=1", "model_params.max_len=20")
                  for arg in ("--run-params", pair))]


def _training_trial(mlflow_db: Path) -> str | None:
    """The RUNNING trial run of the study whose θ_0 is training (its run iteration-0 exists)."""
    if not mlflow_db.exists():
        return None
    try:
        with sqlite3.connect(f"file:{mlflow_db}?mode=ro", uri=True) as db:
            found = db.execute(
                "select r.run_uuid from runs r join tags t on t.run_uuid = r.run_uuid "
                "join tags p on p.key = 'mlflow.parentRunId' and p.value = r.run_uuid "
                "join runs c on c.run_uuid = p.run_uuid and c.name = 'iteration-0' "
                "where r.status = 'RUNNING' and t.key = 'rsir.label.tune_trial'").fetchone()
    except sqlite3.Error:  # tables not made yet, or locked by the writer
        return None
    return found[0] if found else None


def _running_flow(prefect_db: Path, name: str) -> bool:
    """Whether the Prefect database holds a RUNNING flow run of that name."""
    if not prefect_db.exists():
        return False
    try:
        with sqlite3.connect(f"file:{prefect_db}?mode=ro", uri=True) as db:
            return db.execute("select 1 from flow_run where name = ? and state_type = 'RUNNING'",
                              (name,)).fetchone() is not None
    except sqlite3.Error:  # tables not made yet, or locked by the writer
        return False


def _interrupt_tune(root: Path, sig: int) -> tuple[list[str], str]:
    """`rsir tune` (TUNE_COMMAND) in a process group of its own, sent `sig` while its first trial
    trains θ_0 (SIGINT to the group, as Ctrl-C in a terminal; SIGTERM to the process). Asserts the
    exit status (128 + sig), the one line and that the stores hold what it says: the trial FAIL in
    the study, its run KILLED and nested under the study run (tune_state FAIL), the study run
    KILLED (no other worker), every flow run CANCELLED. Returns the command and the study run."""
    args = [*TUNE_COMMAND, "--home", str(root)]
    training: list[str] = []

    def ready(_: list[str]) -> bool:  # θ_0's training has begun in the trial's run and its subflow
        # The MLflow iteration run opens before its Prefect subflow does: under load (seen in CI)
        # more than the settling second apart, and the signal then came before the subflow existed.
        found = _training_trial(root / "mlflow.db")
        if not found or not _running_flow(root / "prefect" / "prefect.db", "iteration-0"):
            return False
        training.append(found)
        return True

    seen = interrupt_command(args, sig, ready, settle=1)  # inside θ_0's training loop
    trial_run, after = training[0], seen.after
    assert seen.returncode == 128 + sig, "".join(after)
    assert len(after) < 15 and not any("Traceback" in line for line in after), "".join(after)

    (told,) = [line for line in after if line.startswith("rsir: interrupted")]
    assert f"interrupted by {signal.Signals(sig).name}" in told and told.rstrip().endswith(
        "run the same command again to resume"), told
    flow_run = re.search(r"Prefect flow run ([0-9a-f-]{36}) CANCELLED", told)
    killed = re.findall(r"MLflow run ([0-9a-f]{32}) KILLED", told)
    study_run = re.search(r"MLflow study run ([0-9a-f]{32}) KILLED", told)  # no other worker: ended
    assert flow_run and killed == [trial_run] and study_run and "Optuna trial 0 FAIL" in told, told

    # What the line says is what the stores hold.
    study = optuna.load_study(study_name="rsir-tune-tiny-sasrec-seeds0", storage=f"sqlite:///{root / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["FAIL"]
    assert study.trials[0].user_attrs.get("interrupted") is True  # no fault of the trial's: not counted ended
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    run = client.get_run(trial_run)
    assert run.info.status == "KILLED"
    assert (run.data.tags["mlflow.parentRunId"], run.data.tags["rsir.tune_trial"], run.data.tags["rsir.tune_state"]) \
        == (study_run.group(1), "0", "FAIL")
    assert client.get_run(study_run.group(1)).info.status == "KILLED"
    with sqlite3.connect(root / "prefect" / "prefect.db") as db:
        (state,) = db.execute("select state_type from flow_run where id = ?", (flow_run.group(1),)).fetchone()
        states = db.execute("select name, state_type from flow_run").fetchall()
    assert state == "CANCELLED"
    # The tune flow, its trial's rsir subflow and the iteration it cut short: none left open.
    assert len(states) >= 3 and {name.split("-")[0] for name, _ in states} >= {"tune", "iteration"}
    assert all(state == "CANCELLED" for _, state in states), states
    return [sys.executable, "-m", "rsir.cli", *args], study_run.group(1)


def test_a_tune_stopped_by_sigterm_closes_its_trial_though_optuna_does_not(tiny_csv, tmp_path):
    # Prefect's TerminationSignal is no KeyboardInterrupt: Optuna leaves the trial RUNNING, the
    # worker marks it FAIL.
    _interrupt_tune(make_tiny_home(tmp_path / "workspace", tiny_csv).root, signal.SIGTERM)


def test_an_interrupted_tune_closes_what_it_opened_and_the_same_command_continues_the_study(tiny_csv, tmp_path):
    ws = make_tiny_home(tmp_path / "workspace", tiny_csv)
    cmd, study_run = _interrupt_tune(ws.root, signal.SIGINT)
    # The same command again continues the study: a new trial, complete; the study run reopened
    # and ended, the interrupted trial still FAIL.
    again = subprocess.run([*cmd, "--json"], cwd=REPO, env=command_env(), capture_output=True, text=True, timeout=1200)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads(again.stdout)
    # The interrupted trial is no ended one (a suite's budget replaces it).
    assert summary["trials"] == {"this_worker": 1, "total": 2, "complete": 1, "pruned": 0, "fail": 0, "running": 0,
                                 "interrupted": 1}
    assert summary["mlflow_run_id"] == study_run and summary["best"]["trial"] == 1
    _assert_summary_keys({k: v for k, v in summary.items() if k != "command_seconds"})
    reopened = MlflowClient(f"sqlite:///{ws.root / 'mlflow.db'}").get_run(study_run)
    assert reopened.info.status == "FINISHED" and reopened.data.tags["rsir.resumes"] == "1"
    assert [t.state.name for t in optuna.load_study(study_name=summary["study"], storage=summary["storage"]).trials] \
        == ["FAIL", "COMPLETE"]


def test_a_killed_workers_trial_is_failed_by_the_heartbeat_and_the_same_command_continues(tiny_csv, tmp_path):
    # SIGKILL runs no handler: the trial stays RUNNING in the study until its heartbeat is stale
    # (twice --heartbeat-seconds); the next worker's next trial marks it FAIL (Optuna), so the
    # study's counts say what happened and nothing waits on a dead worker forever.
    root = make_tiny_home(tmp_path / "workspace", tiny_csv).root
    cmd = [sys.executable, "-m", "rsir.cli", *TUNE_COMMAND, "--heartbeat-seconds", "1", "--home", str(root)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=command_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while _training_trial(root / "mlflow.db") is None:
            assert proc.poll() is None and time.monotonic() < deadline, "no trial trained"
            time.sleep(0.2)
        time.sleep(3)  # several beats
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    storage = f"sqlite:///{root / 'optuna.db'}"
    (study,) = optuna.get_all_study_summaries(storage)
    assert [t.state.name for t in optuna.load_study(study_name=study.study_name, storage=storage).trials] \
        == ["RUNNING"]
    time.sleep(2.5)  # the last beat is now older than the grace period
    again = subprocess.run([*cmd, "--json"], cwd=REPO, env=command_env(), capture_output=True, text=True, timeout=1200)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads(again.stdout)
    # Nothing closed that trial but the heartbeat: a failure, not a known interrupt.
    assert summary["trials"] == {"this_worker": 1, "total": 2, "complete": 1, "pruned": 0, "fail": 1, "running": 0,
                                 "interrupted": 0}
    assert summary["best"]["trial"] == 1
    assert [t.state.name for t in optuna.load_study(study_name=study.study_name, storage=storage).trials] \
        == ["FAIL", "COMPLETE"]
