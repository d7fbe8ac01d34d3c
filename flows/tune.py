"""The `rsir tune` flow: one worker of an Optuna study over RSIR's settings (τ, p, m, λ, the
generation budget), each trial an `rsir` run at K = 1 per seed, scored on validation only.

    open the study (SQLite in the workspace, or PostgreSQL: several workers share it)
    for each of this worker's trials:
        draw the settings (TPE)
        for each seed: rsir(K = 1)        θ_0 shared through the checkpoint store; generation at the
                                          range's largest τ, shared by trials that agree on p, m and
                                          the budget; the median pruner may stop θ_1's training
        value = mean validation NDCG@10 of θ_1
    register the best trial's θ_1 with its settings; log the study on its MLflow run

MLflow: the worker that creates the study creates its run (tag rsir.tune_study; its id is a user
attribute of the study, so every worker logs to the one run). Each trial's `rsir` runs carry the
labels tune_study, tune_trial and tune_seed (tags rsir.label.*) from their start and are nested
under the study run when they end (mlflow.parentRunId), with rsir.tune_state COMPLETE, PRUNED or
FAIL; their iterations stay their own children. The best trial's θ_1 is registered as a version of
the model named after the study, tagged with its settings and scores.

A worker stopped mid-study (Ctrl-C, SIGTERM, Prefect's cancellation: KILLED; a trial's error:
FAILED) leaves its trial FAIL and its trial's run ended (the run's own rule) and nested; it ends the
study run so too, unless another worker's trial run is alive by the liveness rule (that worker logs
to the run and ends it when done). A worker reopens the study run it finds ended, when it starts and
at each trial, so the same command continues the study.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import Any

from prefect import flow, get_run_logger

from core.config import with_parameters
from core.hashing import json_digest
from core.interrupts import stop_status
from core.workspace import Workspace
from flows.boundary import boundary, check_environment, naming_service
from flows.liveness import PARENT_RUNS
from flows.rsir import rsir
from storage.dataset import dataset_store
from storage.files import file_lock
from storage.tracking import RunOwner, Tracker, dead_reason, redact_uri, resolve_tracking_uri
from tasks.builtin import fetch_builtin_task
from tasks.runlog import ROW_FILE, IterationRow, RunSummary
from tasks.train import watching_epochs
from tasks.tune import (
    IMPORTED_ATTR,
    INTERRUPTED_ATTR,
    METRIC,
    SEED_TAG,
    STATE_TAG,
    STUDY_TAG,
    TRIAL_TAG,
    TUNED,
    BestTrial,
    EpochPruner,
    OpenedStudy,
    Registered,
    SeedRun,
    TrialRow,
    TuneConfig,
    TuneSummary,
    mean,
    open_study,
    reuse_figures,
    suggest,
    trial_counts,
    trial_rows,
    tune_parameters,
    worker_id,
)

_STUDY_RUN_ATTR = "mlflow_run_id"


def _tune(**params: Any) -> dict[str, Any]:
    """An Optuna study over RSIR's settings: this worker's trials, each an `rsir` run per seed at
    K = 1 scored on θ_1's validation NDCG@10; the study's best θ_1 registered with its settings.

    The parameters are TuneConfig's (tasks/tune.py), flat: a range as text (`1..100 log`). The
    result is TuneSummary's JSON (plain, as Prefect keeps a result and `rsir tune --json` prints it)."""
    with boundary():  # a fault the user can fix: the flow run fails with its one line
        return run_tune(TuneConfig.from_parameters(params)).model_dump(mode="json")


# The flow's signature (what Prefect shows, validates and deploys) is derived from TuneConfig.
tune = flow(name="rsir-tune", flow_run_name="tune-{dataset}-{model}", log_prints=True)(
    with_parameters(_tune, tune_parameters()))


def run_tune(cfg: TuneConfig) -> TuneSummary:
    """This worker's trials of the study, and the study as it stands after them. Stopped mid-study (an interrupt, a trial's error), it closes what it had open
    (`close_worker`) and re-raises."""
    started = time.perf_counter()
    ws = Workspace.at(cfg.home)
    cfg = cfg.model_copy(update={"home": ws.home})
    first = cfg.run_config(cfg.seeds[0], cfg.corner())
    check_environment(ws, first.tracking_uri)
    uri = resolve_tracking_uri(first.tracking_uri, ws.mlflow_db)
    naming_service(f"MLflow tracking store {redact_uri(uri)}")
    tracker = Tracker.open(uri, first.experiment, ws.mlartifacts)
    fetch_builtin_task(cfg.dataset, ws.home)
    base = dataset_store(ws).manifest(cfg.dataset, 0)
    url = cfg.storage_url(ws.root)
    opened = open_study(cfg, url)
    study_run = _study_run(tracker, opened, cfg, url)
    objective = Objective(cfg, ws, tracker, study_run, base.stats.sequences, worker_id(), first.epochs)
    from optuna.study import MaxTrialsCallback

    # A shared budget (study_trials): Optuna's callback stops this worker once the study holds it,
    # counted after each trial; a worker that finds it full adds none.
    trials = cfg.trials if cfg.study_trials is None else \
        min(cfg.trials, max(0, cfg.study_trials - len(opened.study.get_trials(deepcopy=False))))
    callbacks = [] if cfg.study_trials is None else [MaxTrialsCallback(cfg.study_trials, states=None)]
    try:
        if trials:
            opened.study.optimize(objective, n_trials=trials, callbacks=callbacks)
    except BaseException as exc:
        try:
            closed = close_worker(cfg, tracker, opened.study, stop_status(exc))
            get_run_logger().warning("stopped (%s): %s", type(exc).__name__, ", ".join(closed))
        except Exception as fault:  # the stop is what to report; `rsir tune` checks again
            get_run_logger().warning("stopped (%s); closing the study's records failed: %s", type(exc).__name__,
                                     (str(fault).splitlines() or [type(fault).__name__])[0][:200])
        raise
    return _finish(cfg, tracker, opened.study, study_run, base.digest, url, objective.ran,
                   time.perf_counter() - started)


class Objective:
    """A trial: its settings drawn, one `rsir` run per seed, the mean validation NDCG@10 of θ_1."""

    def __init__(self, cfg: TuneConfig, ws: Workspace, tracker: Tracker, study_run: str, sequences: int,
                 worker: str, epochs: int):
        self.cfg, self.ws, self.tracker, self.study_run = cfg, ws, tracker, study_run
        self.sequences, self.worker, self.epochs = sequences, worker, epochs
        self.ran: list[int] = []  # this worker's trials

    def __call__(self, trial: Any) -> float:
        import optuna

        trial.set_user_attr("worker", self.worker)  # first: a trial interrupted while drawing is this worker's too
        self.ran.append(trial.number)
        _reopen(self.tracker, self.study_run)  # a worker that stopped may have ended it meanwhile
        settings = suggest(trial, self.cfg)
        trial.set_user_attr("max_sources", settings.max_sources(self.sequences))
        scores = []
        for index, seed in enumerate(self.cfg.seeds):
            labels = {"tune_study": self.cfg.study_name, "tune_trial": str(trial.number), "tune_seed": str(seed)}
            params = self.cfg.run_parameters(seed, settings, self.sequences, labels)
            state = "FAIL"
            try:
                with watching_epochs(EpochPruner(trial, index * self.epochs)):
                    summary = RunSummary.model_validate(
                        rsir.with_options(flow_run_name=f"tune-trial-{trial.number}-seed-{seed}")(**params))
                state = "COMPLETE"
            except optuna.TrialPruned:
                state = "PRUNED"
                raise
            except BaseException as exc:
                if stop_status(exc) == "KILLED":  # an interrupt, not the trial's fault: a resumed study replaces it
                    trial.set_user_attr(INTERRUPTED_ATTR, True)
                raise
            finally:
                found = self._nest(trial.number, seed, state)
                if state == "PRUNED":
                    self._keep_pruned(trial, seed, found)
            run = SeedRun.of(seed, summary, self._generation_key(summary.run_dataset))
            trial.set_user_attr(f"seed_{seed}", run.to_json())
            scores.append(run.valid)
            get_run_logger().info(
                "trial %d seed %d (%s): valid %s θ_1 %.4f, θ_0 %.4f", trial.number, seed,
                ", ".join(f"{k}={v:g}" for k, v in asdict(settings).items()), METRIC, run.valid, run.theta0_valid)
        value = mean(scores)
        self.tracker.log_metrics(self.study_run, {f"trial/valid_{METRIC}": value}, step=trial.number)
        return value

    def _nest(self, number: int, seed: int, state: str) -> list[Any]:
        """The trial's run (found by its labels: a pruned run returned nothing) becomes a child
        of the study run, tagged with the study, trial, seed and how the trial ended; returned."""
        found = self.tracker.search_runs(f"tags.`rsir.label.tune_study` = '{self.cfg.study_name}' and "
                                         f"tags.`rsir.label.tune_trial` = '{number}' and "
                                         f"tags.`rsir.label.tune_seed` = '{seed}'")
        for run in found:
            self.tracker.set_tags(run.info.run_id, {"mlflow.parentRunId": self.study_run,
                                                    STUDY_TAG: self.cfg.study_name, TRIAL_TAG: number,
                                                    SEED_TAG: seed, STATE_TAG: state})
        return found

    def _keep_pruned(self, trial: Any, seed: int, found: list[Any]) -> None:
        """A pruned run is kept as the trial's run at `seed` from its finished iteration 0 (θ_0's
        row; D_1 was made before θ_1's training): it may be the run that trained θ_0 or made
        the generation the others reused, which the study's reuse figures must count."""
        run = max(found, key=lambda r: r.info.start_time, default=None)
        child = None if run is None else self.tracker.find_child(run.info.run_id, "iteration-0")
        if child is None or child[1] != "FINISHED" or ROW_FILE not in self.tracker.artifact_files(child[0], ""):
            return  # pruned before iteration 0 was logged (θ_1 is watched only after it): nothing to keep
        row = IterationRow.model_validate(self.tracker.load_dict(child[0], ROW_FILE))
        key = self._generation_key(run.data.params["run_dataset"])
        trial.set_user_attr(f"seed_{seed}", SeedRun.of_pruned(seed, run.info.run_id, row, key).to_json())

    def _generation_key(self, fork: str) -> str:
        """The content key of the generation the run's D_1 (dataset `fork`, version 1) was
        filtered from (D_1's key is it plus the filter's parameters): equal keys, one generation."""
        return dataset_store(self.ws).manifest(fork, 1).generation.key.split(":", 1)[0]


def _study_run(tracker: Tracker, opened: OpenedStudy, cfg: TuneConfig, url: str, wait_seconds: float = 60.0) -> str:
    """The study's MLflow run: made by the worker that created the study, its id kept as a user
    attribute of the study; a joining worker waits for it (a creator that died first: its own)."""
    study = opened.study
    # A study made from an archive (`import_trials`) has no creating worker to wait for.
    deadline = time.monotonic() + (0.0 if opened.created or IMPORTED_ATTR in study.user_attrs else wait_seconds)
    while _STUDY_RUN_ATTR not in study.user_attrs and time.monotonic() < deadline:
        time.sleep(0.5)
    if _STUDY_RUN_ATTR in study.user_attrs:
        run_id = study.user_attrs[_STUDY_RUN_ATTR]
        _reopen(tracker, run_id)  # ended by a worker that stopped, or by the last one that finished
        return run_id
    run_id = tracker.start_run(cfg.study_name, {STUDY_TAG: cfg.study_name, "rsir.tune_storage": redact_uri(url)})
    tracker.log_params(run_id, {**cfg.model_dump(mode="json", include={"dataset", "model", "seeds", "prune",
                                                                       "startup_trials", "warmup_epochs"}),
                                **{name: str(getattr(cfg, name)) for name in TUNED},
                                "run_params": json.dumps(cfg.run_params, sort_keys=True)})
    study.set_user_attr(_STUDY_RUN_ATTR, run_id)
    return run_id


def _reopen(tracker: Tracker, study_run: str) -> None:
    """The study run RUNNING while a worker adds trials (MLflow counts each reopening)."""
    if tracker.status(study_run) != "RUNNING":
        tracker.reopen(study_run, {})


def close_worker(cfg: TuneConfig, tracker: Tracker, study: Any, status: str = "KILLED") -> list[str]:
    """What this worker (`worker_id`) leaves when it stops mid-study, one phrase each: its trial
    still RUNNING in the study FAIL (Optuna marks a trial FAIL on KeyboardInterrupt and re-raises,
    but lets Prefect's TerminationSignal pass by), and the study's MLflow run ended with `status`,
    unless another worker's trial run is alive (Tracker's liveness rule: its process on this
    machine, its heartbeat elsewhere): that worker logs to the run and ends it, and a worker
    reopens an ended run (`_reopen`). A run nobody would end is never left RUNNING. Idempotent;
    the trial's own `rsir` run is ended (KILLED or FAILED) by its heartbeat's handler."""
    from optuna.trial import TrialState

    worker, said = worker_id(), []
    mine = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("worker") == worker]
    for trial in mine:
        if trial.state == TrialState.RUNNING:
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
    if mine:
        last = max(t.number for t in mine)
        (now,) = [t for t in study.get_trials(deepcopy=False) if t.number == last]
        said.append(f"Optuna trial {last} {now.state.name}")
    study_run = study.user_attrs.get(_STUDY_RUN_ATTR)
    if study_run is None:
        return said
    alive = _live_trial_runs(tracker, cfg.study_name)
    if alive:
        said.append(f"MLflow study run {study_run} left RUNNING for the worker of {alive[0]}")
    else:
        if tracker.status(study_run) == "RUNNING":
            tracker.end_run(study_run, status)
        said.append(f"MLflow study run {study_run} {tracker.status(study_run)}")
    return said


def close_interrupted(cfg: TuneConfig, url: str, tracker: Tracker) -> list[str]:
    """`rsir tune` after an interrupt: `close_worker` again (the flow did it unless the interrupt
    came before its trials or cut its closing short), for the line that names the trial and the
    study run; nothing when the study was not made yet."""
    import optuna

    try:
        study = optuna.load_study(study_name=cfg.study_name, storage=url)
    except KeyError:  # no such study
        return []
    return close_worker(cfg, tracker, study)


def _live_trial_runs(tracker: Tracker, study: str) -> list[str]:
    """Other processes' RUNNING trial runs of the study that are alive by Tracker's liveness rule:
    'trial N (pid P on HOST)' each."""
    here, now = RunOwner.current(), time.time()
    alive = []
    for run in tracker.search_runs(f"attributes.status = 'RUNNING' and tags.`rsir.label.tune_study` = '{study}' "
                                   f"and {PARENT_RUNS}"):
        tags = dict(run.data.tags)
        owner = RunOwner.from_tags(tags)
        if owner is not None and owner.shares_process_table(here) and owner.pid == here.pid:
            continue  # this worker's own, which its heartbeat's handler ends
        if dead_reason(tags, run.info.start_time / 1000, here, now) is None:
            alive.append(f"trial {tags.get('rsir.label.tune_trial', '?')} ({owner or 'another process'})")
    return alive


def _finish(cfg: TuneConfig, tracker: Tracker, study: Any, study_run: str, base_digest: str, url: str,
            ran: list[int], wall: float) -> TuneSummary:
    """The study as it stands after this worker's trials: the best trial (registered), the
    counts, what was reused; logged on the study run."""
    rows = trial_rows(study)
    complete = [r for r in rows if r.state == "COMPLETE"]
    best_row = max(complete, key=lambda r: (r.value, -r.number)) if complete else None
    counts = trial_counts(rows, len(ran))
    best = registered = None
    if best_row is not None:
        theta0 = mean([run.theta0_valid for run in best_row.runs])
        best = BestTrial(trial=best_row.number, settings={**best_row.settings,
                                                          "max_sources": _max_sources(study, best_row)},
                         valid=best_row.value, theta0_valid=theta0, gain=best_row.value - theta0,
                         beats_theta0=best_row.value > theta0)
        registered = _register_best(cfg, tracker, best_row, best, base_digest)
        tracker.log_metrics(study_run, {f"best_valid_{METRIC}": best.valid, f"theta0_valid_{METRIC}": theta0})
        # The outcome in tags, not only in the summary's artifact: an archive (tasks/archive.py)
        # keeps a run's tags and metrics, and the tune suite reads the study from them.
        tracker.set_tags(study_run, {"rsir.tune_best_trial": best.trial,
                                     "rsir.tune_best_settings": json.dumps(best.settings, sort_keys=True)})
    summary = TuneSummary(
        study=cfg.study_name, storage=redact_uri(url), dataset=cfg.dataset, model=cfg.model, seeds=cfg.seeds,
        metric=f"valid {METRIC} of θ_1 (mean over seeds)", trials=counts, best=best, registered=registered,
        reuse=reuse_figures(rows), rows=rows, mlflow_run_id=study_run, tracking_uri=redact_uri(tracker.uri),
        mlflow_url=tracker.run_url(study_run), wall_seconds=wall)
    tracker.log_metrics(study_run, {f"trials_{k}": v for k, v in counts.model_dump().items()
                                    if k not in ("this_worker", "total")})
    tracker.log_dict(study_run, summary.model_dump(mode="json"), "tune_summary.json")
    tracker.end_run(study_run)
    return summary


def _max_sources(study: Any, row: TrialRow) -> int | None:
    return next(t.user_attrs.get("max_sources") for t in study.trials if t.number == row.number)


def _register_best(cfg: TuneConfig, tracker: Tracker, best: TrialRow, outcome: BestTrial,
                   base_digest: str) -> Registered | None:
    """Register θ_1 of the best trial (of its seeds, the one best on validation) as a version of
    the model named after the study, tagged with the settings and scores; once per trial (a
    second worker finding the same best trial returns that version). None when that θ_1 is not
    in this workspace (a trial of an earlier sitting, restored from an archive: its run's id was
    another tracker's, and an archive keeps no models). The look and the registration are one
    step for the workers of one workspace (a file lock): two workers ending together both found
    no version of the same best trial and both registered it (seen under load). Workers in
    different workspaces are not serialized."""
    lock = Workspace.at(cfg.home).root / "locks" / f"register-{json_digest(cfg.study_name)[:16]}.lock"
    with file_lock(lock):
        return _register_once(cfg, tracker, best, outcome, base_digest)


def _register_once(cfg: TuneConfig, tracker: Tracker, best: TrialRow, outcome: BestTrial,
                   base_digest: str) -> Registered | None:
    name = cfg.study_name
    for version in tracker.model_versions(name):
        if version.tags.get(TRIAL_TAG) == str(best.number):
            return Registered(model=name, version=int(version.version), trial=best.number,
                              champion_version=tracker.alias_version(name, "champion"))
    run = max(best.runs, key=lambda r: r.valid)
    children = tracker.search_runs(f"tags.`mlflow.parentRunId` = '{run.mlflow_run_id}' and "
                                   f"attributes.run_name = 'iteration-1'")
    models = tracker.output_models(children[0].info.run_id) if len(children) == 1 else []
    if len(models) != 1:
        get_run_logger().info("the best trial %d's θ_1 was trained in another workspace (restored from an "
                              "archive): not registered", best.number)
        return None
    (child,), (model_id,) = children, models
    tags = {STUDY_TAG: name, TRIAL_TAG: best.number, SEED_TAG: run.seed, "rsir.iteration": 1,
            **{f"setting.{k}": v for k, v in outcome.settings.items()},
            f"valid_{METRIC.replace('@', '_at_')}": f"{run.valid:.6g}",
            f"theta0_valid_{METRIC.replace('@', '_at_')}": f"{run.theta0_valid:.6g}",
            "tune_objective": f"{best.value:.6g}"}
    registration = tracker.register_champion(name, child.info.run_id, model_id, tags, metric=METRIC,
                                             base_digest=base_digest)
    return Registered(model=name, version=registration.version, trial=best.number,
                      champion_version=registration.champion)
