"""The tune suite (issue 26, `rsir experiment tune --smoke` on tiny real data, a real Prefect test
server, real MLflow and Optuna on SQLite): a study per dataset on validation, then the paper's
fixed setting, the study's best settings and K auto on every seed, each against the same θ_0;
a re-run and a restored archive skip everything; the report tables the changes and plots the study."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.errors import RsirError
from reporting.results import collect_runs, study_outcome
from storage.tracking import Tracker
from tests.conftest import interrupt_command, make_tiny_home

pytestmark = pytest.mark.prefect

SMOKE = dict(suite="tune", smoke=True, datasets=["tiny"], device="cpu", threads=1)


@pytest.fixture(scope="module")
def tune_suite(prefect_api, tiny_csv, tmp_path_factory):
    from flows.experiments import experiment

    root = tmp_path_factory.mktemp("tune-suite")
    ws = make_tiny_home(root / "workspace", tiny_csv)
    uri = f"sqlite:///{ws.root / 'mlflow.db'}"
    summary = experiment(home=str(ws.root), tracking_uri=uri, archive=str(root / "archive"), **SMOKE)
    return ws, uri, summary, root / "archive"


def test_study_then_fixed_tuned_and_adaptive_arms_on_every_seed(tune_suite):
    ws, uri, summary, _ = tune_suite
    arms = [f"tiny/{arm}/seed{s}" for s in (0, 1) for arm in ("fixed", "tuned", "adaptive")]
    assert summary["ran"] == ["tiny/study", *arms] and summary["pending"] == []
    tracker = Tracker.open(uri, summary["experiment"])
    outcome = study_outcome(tracker, f"{summary['experiment']}-tiny")
    assert outcome is not None and outcome.ended == 2 and outcome.best_trial is not None
    assert set(outcome.best_settings) == {"tau", "p", "m", "synthetic_weight", "max_sources"}
    rows = collect_runs(tracker)
    assert {r["arm"] for r in rows} == {"fixed", "tuned", "adaptive"}  # the trials' runs are no arm
    parents = {r["parent_run_id"]: r for r in rows}
    for parent_id, row in parents.items():
        params = tracker.search_runs(f"attributes.run_id = '{parent_id}'")[0].data.params
        if row["arm"] == "tuned":  # the study's best settings, found again from its run's tags
            assert row["study"] == outcome.study and row["trial"] == str(outcome.best_trial)
            assert {k: params[k] for k in outcome.best_settings} == {
                k: str(v) for k, v in outcome.best_settings.items()}
        else:
            assert (params["tau"], params["p"], params["m"]) == ("10", "0.5", "5")
        assert params["K"] == ("auto" if row["arm"] == "adaptive" else "1")
        assert params["tau_schedule"] == ("leakage" if row["arm"] == "adaptive" else "fixed")
    for s in ("0", "1"):  # one θ_0 per seed, the same in every arm
        zero = {r["test/ndcg@10"] for r in rows if r["seed"] == s and r["k"] == 0}
        assert len([r for r in rows if r["seed"] == s and r["k"] == 0]) == 3 and len(zero) == 1
        assert max(r["k"] for r in rows if r["seed"] == s and r["arm"] == "adaptive") <= 2  # k_max = K = 2


def test_rerun_and_restored_archive_skip_the_study_and_every_arm(tune_suite, tmp_path, tiny_csv):
    from flows.experiments import experiment

    ws, uri, summary, archive = tune_suite
    again = experiment(home=str(ws.root), tracking_uri=uri, **SMOKE)
    assert again["ran"] == [] and sorted(again["skipped"]) == sorted(summary["ran"])
    # A new workspace (no Optuna database, no checkpoints): the archive's tags carry the study.
    fresh = make_tiny_home(tmp_path / "workspace", tiny_csv)
    restored = experiment(home=str(fresh.root), tracking_uri=f"sqlite:///{fresh.root / 'mlflow.db'}",
                          archive=str(archive), **SMOKE)
    assert restored["ran"] == [] and sorted(restored["skipped"]) == sorted(summary["ran"])
    assert not (fresh.root / "optuna.db").exists()


def test_a_restored_archive_lists_the_tuned_arms_under_the_same_run_keys(tune_suite, tmp_path):
    """A cut arm resumes in another workspace only if its run key (labels included) is the same
    there; restoring an archive gives every run a new id, so no label may hold one (the tuned arm
    named its study's run id and, cut in one sitting, started over in the next: session 18)."""
    from flows.experiments import Finished, tune_arms
    from tasks.archive import restore_runs
    from tasks.config import RunConfig
    from tasks.experiment_config import ExperimentConfig

    ws, uri, summary, archive = tune_suite
    cfg = ExperimentConfig.from_parameters({**SMOKE, "home": str(ws.root)})
    here = Tracker.open(uri, summary["experiment"])
    fresh = Tracker.open(f"sqlite:///{tmp_path / 'fresh.db'}", summary["experiment"])
    assert restore_runs(fresh, archive)

    def keys(tracker: Tracker) -> list[tuple[str, str]]:
        arms = tune_arms(cfg, Finished(collect_runs(tracker), tracker))
        assert {a.arm for a in arms} == {"fixed", "tuned", "adaptive"}
        return [(a.id, RunConfig.from_parameters({**a.params, "labels": a.labels}).run_key("d0")) for a in arms]

    assert keys(fresh) == keys(here)
    assert study_outcome(fresh, f"{summary['experiment']}-tiny").run_id != study_outcome(
        here, f"{summary['experiment']}-tiny").run_id  # the ids do differ: what the key must not hold


def test_the_report_finds_a_finished_study_before_any_tuned_arm_used_it(tune_suite, tmp_path):
    """Found by its dataset: a study that ended while its tuned arms had not (amazon-beauty, session
    17) was reported as "No finished study"."""
    from reporting.report import tune_report

    ws, uri, summary, _ = tune_suite
    tracker = Tracker.open(uri, summary["experiment"])
    untuned = [r for r in collect_runs(tracker) if r["arm"] != "tuned"]
    parts, _ = tune_report(tracker, untuned, tmp_path)
    text = "".join(parts)
    assert "Study `experiment-tune-smoke-tiny`" in text and "2 trials ended" in text
    assert "No finished study" not in text
    assert study_outcome(tracker, dataset="tiny") == study_outcome(tracker, "experiment-tune-smoke-tiny")
    assert study_outcome(tracker, dataset="other") is None
    with pytest.raises(ValueError, match="one of them"):
        study_outcome(tracker)


def test_tune_report_tables_every_arm_against_theta0_and_plots_the_study(tune_suite, tmp_path):
    from reporting.report import write_report

    ws, uri, summary, _ = tune_suite
    out = write_report(Tracker.open(uri, summary["experiment"]), "tune", tmp_path, command="rsir experiment tune")
    text = Path(out["report"]).read_text()
    assert "Study `experiment-tune-smoke-tiny`" in text and "2 trials ended" in text
    section = text.split("### tiny: against θ_0")[1].split("\n## ")[0]
    for arm in ("fixed: K = 1 at the paper's setting", "tuned: K = 1 at the study's best settings",
                "adaptive: K auto, τ by the leakage rule"):
        assert f"| {arm} |" in section
    # The settings column says what the arms' runs logged (the suite's τ, p, m), and each seed's
    # τ_k per iteration that generated (one for K = 1).
    cells = {line.split(" | ")[0].lstrip("| ").split(":")[0]: line.split(" | ") for line in section.splitlines()
             if line.startswith("| fixed") or line.startswith("| adaptive")}
    assert cells["fixed"][1] == "tau=10, p=0.5, m=5, synthetic_weight=1" and cells["fixed"][3] == "10; 10"
    assert cells["adaptive"][1] == "tau=10, p=0.5, m=5, synthetic_weight=1, tau_schedule=leakage, K auto"
    assert "## Answer" in text and ("* tiny, tuned: " in text) and ("* tiny, adaptive: " in text)
    assert [Path(p).name for p in out["figures"]] == ["study_tiny.png"] and Path(out["figures"][0]).stat().st_size > 0
    assert json.dumps(out)  # the CLI prints it


def test_a_study_cut_short_resumes_from_the_archive_in_a_new_workspace(prefect_api, tiny_csv, tmp_path):
    """A sitting ends (a deadline, a lost machine) after one trial of a study of two: its study run
    killed, its workspace gone. The archive keeps the ended trial (its Optuna record and its run);
    the next sitting, in a new workspace, makes the study again from it and runs only the missing
    trial, its sampler seeing the first."""
    import optuna

    from flows.experiments import experiment
    from storage.tracking import ARCHIVED_ID_TAG
    from tasks.archive import archive_runs, archive_trials
    from tasks.tune import export_trials

    archive = tmp_path / "archive"
    first = make_tiny_home(tmp_path / "first", tiny_csv)
    uri = f"sqlite:///{first.root / 'mlflow.db'}"
    cut = experiment(home=str(first.root), tracking_uri=uri, archive=str(archive), trials=1, arms=["none"], **SMOKE)
    assert cut["ran"] == ["tiny/study"]
    study_name = f"{cut['experiment']}-tiny"
    tracker = Tracker.open(uri, cut["experiment"])
    # What an interrupt leaves instead of a finished study run: that run KILLED, and the archive
    # written at the stop (`_run_study`'s finally) from the stores as they are then.
    (study_run,) = [r for r in tracker.search_runs(f"tags.`rsir.tune_study` = '{study_name}'")
                    if "rsir.tune_state" not in r.data.tags]
    tracker.end_run(study_run.info.run_id, "KILLED")
    for path in archive.iterdir():
        path.unlink()
    storage = f"sqlite:///{first.root / 'optuna.db'}"
    from tasks.tune import TuneConfig

    cfg = TuneConfig(dataset="tiny", study=study_name)
    archive_trials(archive, study_name, export_trials(cfg, storage))
    archive_runs(tracker, archive)
    (trial_run,) = [r for r in tracker.search_runs(f"tags.`rsir.tune_study` = '{study_name}'")
                    if r.data.tags.get("rsir.tune_state") in ("COMPLETE", "PRUNED")]
    assert (archive / f"{trial_run.info.run_id}.json").exists()
    assert not (archive / f"{study_run.info.run_id}.json").exists()
    first_trial = optuna.load_study(study_name=study_name, storage=storage).trials[0]

    fresh = make_tiny_home(tmp_path / "second", tiny_csv)
    furi = f"sqlite:///{fresh.root / 'mlflow.db'}"
    resumed = experiment(home=str(fresh.root), tracking_uri=furi, archive=str(archive), trials=2, arms=["none"],
                         **SMOKE)
    assert resumed["ran"] == ["tiny/study"]
    made = optuna.load_study(study_name=study_name, storage=f"sqlite:///{fresh.root / 'optuna.db'}")
    assert [t.number for t in made.trials] == [0, 1]  # one trial run here, not two
    assert (made.trials[0].params, made.trials[0].state) == (first_trial.params, first_trial.state)
    ftracker = Tracker.open(furi, resumed["experiment"])
    outcome = study_outcome(ftracker, study_name)
    assert outcome is not None and outcome.ended == 2
    assert ftracker.search_runs(f"tags.`{ARCHIVED_ID_TAG}` = '{trial_run.info.run_id}'")  # the first trial's run
    # The archive now holds both trials; a third sitting has nothing to add (and so runs nothing:
    # its --arm matches no arm), not even an Optuna storage.
    assert len((archive / f"{study_name}.trials.jsonl").read_text().splitlines()) == 2
    third = make_tiny_home(tmp_path / "third", tiny_csv)
    with pytest.raises(RsirError, match="--arm none matches no arm"):
        experiment(home=str(third.root), tracking_uri=f"sqlite:///{third.root / 'mlflow.db'}",
                   archive=str(archive), trials=2, arms=["none"], **SMOKE)
    assert not (third.root / "optuna.db").exists()


def test_a_suite_interrupted_mid_study_archives_what_ended_and_resumes_elsewhere(prefect_api, tiny_csv, tmp_path):
    """`rsir experiment tune` gets SIGINT (a deadline's `timeout -s INT`, Ctrl-C) in its second
    trial: on its way out it archives the first trial (Optuna record and run) and the second as
    interrupted; the same suite in a new workspace runs only the missing trial."""
    import signal

    import optuna

    from flows.experiments import experiment

    archive, first = tmp_path / "archive", make_tiny_home(tmp_path / "first", tiny_csv)
    # Trainings longer than the smoke's (the budget is the study's run setting: the resumed suite
    # gives the same).
    budget = dict(epochs=30, patience=30)
    args = ["experiment", "tune", "--smoke", "--dataset", "tiny", "--trials", "2", "--epochs", "30", "--patience", "30",
            "--threads", "1", "--device", "cpu", "--arm", "none", "--home", str(first.root), "--archive", str(archive)]
    # Trial 0 has ended (never pruned: the startup trial) and trial 1's run has begun; the pruner
    # may end trial 1 within seconds, so at once.
    seen = interrupt_command(args, signal.SIGINT, lambda lines: any(
        "Beginning subflow run 'tune-trial-1-seed-0'" in line for line in lines))
    assert seen.returncode == 130, "".join(seen.after[-30:])
    study_name = "experiment-tune-smoke-tiny"
    records = [json.loads(line) for line in (archive / f"{study_name}.trials.jsonl").read_text().splitlines()]
    assert [(r["number"], r["state"], r["user_attrs"].get("interrupted", False)) for r in records] == [
        (0, "COMPLETE", False), (1, "FAIL", True)]
    archived = [json.loads(p.read_text()) for p in archive.glob("*.json")]
    (trial_run,) = [r for r in archived if r["tags"].get("rsir.tune_state") == "COMPLETE"]
    assert trial_run["tags"]["rsir.tune_trial"] == "0" and "mlflow.parentRunId" not in trial_run["tags"]

    fresh = make_tiny_home(tmp_path / "second", tiny_csv)
    uri = f"sqlite:///{fresh.root / 'mlflow.db'}"
    resumed = experiment(home=str(fresh.root), tracking_uri=uri, archive=str(archive), trials=2, arms=["none"],
                         **budget, **SMOKE)
    assert resumed["ran"] == ["tiny/study"]
    made = optuna.load_study(study_name=study_name, storage=f"sqlite:///{fresh.root / 'optuna.db'}")
    assert [t.number for t in made.trials] == [0, 1, 2]  # the interrupted trial replaced by one more
    assert made.trials[0].params == records[0]["params"] and made.trials[2].state.name in ("COMPLETE", "PRUNED")
    outcome = study_outcome(Tracker.open(uri, resumed["experiment"]), study_name)
    assert outcome is not None and outcome.ended == 2
