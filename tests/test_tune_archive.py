"""Workers of one tuning study, across sittings and side by side (issue 26; tasks/archive.py,
tasks/tune.py): its Optuna trials as archived records that make the study again, elsewhere, with
the same numbers, states, values and pruner reports; its finished trial runs archived though the
study run was killed; a joining worker's sampler seeded apart from the creator's. Real Optuna on
SQLite, real MLflow; no Prefect."""

from __future__ import annotations

import json

import optuna
import pytest
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState

from core.errors import RsirError
from reporting.results import study_outcome
from storage.tracking import ARCHIVED_ID_TAG, Tracker
from tasks.archive import archive_runs, archive_trials, archived_trials, restore_runs
from tasks.tune import (
    INTERRUPTED_ATTR,
    STATE_TAG,
    STUDY_TAG,
    SeedRun,
    TuneConfig,
    export_trials,
    import_trials,
    open_study,
    study_ended,
    study_settled,
    trial_counts,
    trial_rows,
)

CFG = TuneConfig(dataset="tiny", study="cut-short")
SEED_RUN = SeedRun(0, 0.05, 0.04, "0123abcd", False, 12.0, 12.0, "generation-key", 3.0, 40.0).to_json()
TAU, WEIGHT = IntDistribution(1, 100, log=True), FloatDistribution(0.1, 1.0, log=True)


def _cut_short_study(url: str) -> optuna.Study:
    """As a deadline leaves a study: complete, pruned, failed by a fault, interrupted, and one
    still RUNNING (another worker's, stopped before it could close its trial)."""
    study = open_study(CFG, url).study
    for state, value, attrs in ((TrialState.COMPLETE, 0.05, {}), (TrialState.PRUNED, None, {}),
                                (TrialState.FAIL, None, {}), (TrialState.FAIL, None, {INTERRUPTED_ATTR: True})):
        study.add_trial(optuna.trial.create_trial(
            state=state, value=value, params={"tau": 7, "synthetic_weight": 0.3},
            distributions={"tau": TAU, "synthetic_weight": WEIGHT}, intermediate_values={0: 0.04, 1: 0.045},
            user_attrs={"worker": "gpu:1", "seed_0": SEED_RUN, **attrs}))
    running = study.ask({"tau": TAU})
    running.set_user_attr("worker", "gpu:2")
    return study


def test_trials_made_again_elsewhere_keep_numbers_states_values_and_reports(tmp_path):
    source = f"sqlite:///{tmp_path / 'a.db'}"
    study = _cut_short_study(source)
    assert (study_ended(CFG, source), study_settled(CFG, source)) == (3, 4)  # neither interrupted nor running
    records = export_trials(CFG, source)
    assert [(r["number"], r["state"], r["user_attrs"].get(INTERRUPTED_ATTR, False)) for r in records] == [
        (0, "COMPLETE", False), (1, "PRUNED", False), (2, "FAIL", False), (3, "FAIL", True), (4, "FAIL", True)]
    archive_trials(tmp_path / "archive", CFG.study_name, records)
    again = archived_trials(tmp_path / "archive", CFG.study_name)
    assert again == json.loads(json.dumps(records))

    target = f"sqlite:///{tmp_path / 'b.db'}"
    assert import_trials(CFG, target, again) == 5
    made = optuna.load_study(study_name=CFG.study_name, storage=target)
    before = {t.number: t for t in study.trials}
    for t in made.trials:
        old = before[t.number]
        assert (t.params, t.intermediate_values) == (old.params, old.intermediate_values)
        assert t.value == (old.value if old.state == TrialState.COMPLETE else None) or t.state == TrialState.PRUNED
    assert [t.state.name for t in made.trials] == ["COMPLETE", "PRUNED", "FAIL", "FAIL", "FAIL"]
    assert made.best_trial.number == 0 and made.best_value == 0.05
    # The budget's count: the interrupted and the one left running are no ended trials.
    assert (study_ended(CFG, target), study_settled(CFG, target)) == (3, 5)
    counts = trial_counts(trial_rows(made), 0)
    assert (counts.complete, counts.pruned, counts.fail, counts.interrupted, counts.total) == (1, 1, 1, 2, 5)
    # The study exists now: a second import (another worker, or the next sitting) adds nothing.
    assert import_trials(CFG, target, again) == 0 and len(made.get_trials()) == 5
    # A study of other ranges is refused as before, in one line.
    other = CFG.model_copy(update={"tau": CFG.tau.model_copy(update={"high": 50})})
    with pytest.raises(RsirError, match="made with other ranges"):
        import_trials(other, target, again)


def test_nothing_archived_restores_nothing_and_a_damaged_file_is_one_line(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    assert archived_trials(tmp_path, CFG.study_name) == [] and import_trials(CFG, url, []) == 0
    assert export_trials(CFG, url) == []  # no such study
    path = tmp_path / f"{CFG.study_name}.trials.jsonl"
    path.write_text('{"number": 0}\n{"number": 1,\n')
    with pytest.raises(RsirError, match=r"trials\.jsonl line 2: no JSON"):
        archived_trials(tmp_path, CFG.study_name)
    path.write_text('{"number": 0, "state": "DONE", "value": null, "params": {}, "distributions": {}, '
                    '"intermediate_values": {}, "user_attrs": {}}\n')
    with pytest.raises(RsirError, match="archived trial 0 of study 'cut-short' cannot be restored: 'DONE'"):
        import_trials(CFG, url, archived_trials(tmp_path, CFG.study_name))


def test_a_finished_trial_run_is_archived_though_its_study_run_was_killed(tmp_path):
    tracker = Tracker.open(f"sqlite:///{tmp_path / 'a.db'}", "suite")
    study_run = tracker.start_run("study", {STUDY_TAG: "s"})
    trial = tracker.start_run("trial-0", {STUDY_TAG: "s", STATE_TAG: "COMPLETE", "mlflow.parentRunId": study_run})
    iteration = tracker.start_run("iteration-1", {"mlflow.parentRunId": trial})
    cut = tracker.start_run("trial-1", {STUDY_TAG: "s", STATE_TAG: "FAIL", "mlflow.parentRunId": study_run})
    arm = tracker.start_run("arm", {})
    arm_iteration = tracker.start_run("iteration-0", {"mlflow.parentRunId": arm})
    for run in (iteration, trial, arm_iteration):
        tracker.end_run(run)
    for run in (cut, study_run, arm):  # the deadline: the study and the arm killed
        tracker.end_run(run, "KILLED")
    written = archive_runs(tracker, tmp_path / "archive")
    # The trial and its iteration; not the killed trial, the killed study run, or an interrupted arm's part.
    assert sorted(written) == sorted([trial, iteration])
    record = json.loads((tmp_path / "archive" / f"{trial}.json").read_text())
    assert "mlflow.parentRunId" not in record["tags"] and record["tags"][STATE_TAG] == "COMPLETE"

    fresh = Tracker.open(f"sqlite:///{tmp_path / 'b.db'}", "suite")
    assert sorted(restore_runs(fresh, tmp_path / "archive")) == sorted([trial, iteration])
    (restored,) = fresh.search_runs(f"tags.`{ARCHIVED_ID_TAG}` = '{trial}'")
    (child,) = fresh.search_runs(f"tags.`mlflow.parentRunId` = '{restored.info.run_id}'")
    assert child.info.run_name == "iteration-1"
    assert study_outcome(fresh, "s") is None  # a trial's run is no study's outcome


def test_a_joining_worker_does_not_repeat_the_creators_draws(tmp_path):
    """The tune suite gives every shard the study's sampler seed; a second worker with that seed
    drew the creator's startup settings one for one (two GPU workers, session 15: trials 0 and 1
    alike, 2 and 3 alike). A joining worker's seed is derived from the study's and its own id."""
    from tasks.tune import joining_seed, suggest

    cfg = TuneConfig(dataset="tiny", study="two-workers", sampler_seed=0, startup_trials=5)
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    creator, joiner = open_study(cfg, url), open_study(cfg, url)
    assert (creator.created, joiner.created) == (True, False)
    drawn = [suggest(opened.study.ask(), cfg) for opened in (creator, joiner)]
    assert drawn[0] != drawn[1]
    # The creator's draws are the seed's (reproducible); the joiner's seed is another, and fixed per worker.
    again = open_study(cfg, f"sqlite:///{tmp_path / 'again.db'}")
    assert suggest(again.study.ask(), cfg) == drawn[0]
    assert joining_seed(0) == joining_seed(0) != 0 and joining_seed(None) is None
