"""The `rsir` flow: K self-improving iterations, each a named sub-flow in the Prefect UI.

    for k in 0, 1, ...:  train θ_k on D_k → leakage → evaluate θ_k → stop? → τ_k → generate → filter
                         → expand → D_{k+1}

It stops after θ_K for a fixed K; with K auto, after the first θ_k that does not beat the best
θ before it on validation by more than a tolerance, or at k_max (tasks/stopping.py); the
summary says why. τ_k, the fidelity threshold of iteration k, is tau, or chosen per iteration by
the run's tau_schedule (tasks/tau_schedule.py) from the leakage proxy of the data θ_k was trained
on (tasks/leakage.py, measured for every schedule) or from candidate θ_{k+1} trained in scratch
forks (`tau_candidates`, a sub-flow).

Wiring only: every step is a task from tasks/ that takes small references and returns a typed
one (TrainResult with its checkpoint path, Evaluation, Generation, Filtered, VersionRef) beside
the seconds its step took (`Timed`); each step waits for the results it reads (`wait_for`), so
Prefect's graph draws train → evaluate, train → generate → filter → expand. What MLflow holds of
the run (its lineage, θ_k, the champion) is logged by one object, tasks/runlog.py's `RunLog`;
the CLI formats the table (rsir/cli.py::format_table). A run works on its own
fork of the dataset, named by the lineage key of its parameters, so re-running the same parameters
after a crash finds the committed versions and checkpoints and continues from there (an iteration
that finished is read from its MLflow run, not run again: also one restored with the fork's versions
from an archive, tasks/archive.py, in another workspace), and closes
what the killed run left open (its MLflow run KILLED, its Prefect flow run CRASHED) once its process
is known to be gone (flows/liveness.py). The run key (lineage, K, labels, D_0) names the
run itself: a re-submission of a finished run returns its summary, a stopped run is reopened.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.context import get_run_context

from core.config import with_parameters
from core.workspace import Workspace
from flows.boundary import boundary, check_environment, naming_service
from flows.liveness import close_killed_lineage
from reporting.plots import plot_run_task
from storage.dataset import dataset_store
from storage.manifest import GeneratorRef
from storage.tracking import Tracker, redact_uri, resolve_tracking_uri
from tasks.builtin import fetch_builtin_task
from tasks.config import RunConfig, run_parameters
from tasks.evaluate import evaluate_task
from tasks.expand import expand_task
from tasks.filter import filter_task
from tasks.generate import Generation, generate_task
from tasks.leakage import leakage_task
from tasks.runlog import Iteration, RunLog, RunSummary, summary_markdown, table_rows
from tasks.runtime import Timed, torch_threads
from tasks.stopping import stop_reason
from tasks.tau_schedule import TauChoice, best_on_validation, candidate_score, fork_candidate_task, leakage_tau
from tasks.train import train_task


@flow(name="rsir-iteration", flow_run_name="iteration-{k}", log_prints=True)
def iteration(cfg: RunConfig, home: str, dataset: str, k: int, valid_before: list[float]) -> Iteration:
    """Train and evaluate θ_k on D_k; unless the run stops here (tasks/stopping.py, from θ_0..θ_{k-1}'s
    validation `valid_before` and θ_k's), produce D_{k+1}."""
    student = train_task(cfg.train_config(dataset, k, cfg.model), home, role="student", executor=cfg.executor_spec())
    # wait_for names the upstream result a step reads a field of: Prefect draws the edge.
    leakage = leakage_task(home, dataset, k, student.value.checkpoint, cfg.tau, cfg.device, wait_for=[student])
    evaluation = evaluate_task(home, student.value.checkpoint, dataset, k, cfg.device, cfg.executor_spec(),
                               wait_for=[student])
    times = {"train": student.seconds, "leakage": leakage.seconds, "evaluate": evaluation.seconds}
    stop = stop_reason(cfg, [*valid_before, evaluation.value.valid[cfg.early_stop]])
    if stop is not None:
        return Iteration(k, student.value, evaluation.value, times, stop=stop, leakage=leakage.value)
    generator = student
    if cfg.generator is not None and cfg.generator != cfg.model:  # weak-to-strong
        generator = train_task(cfg.train_config(dataset, k, cfg.generator), home, role="generator",
                               executor=cfg.executor_spec())
        times["train_generator"] = generator.seconds
    made_by = GeneratorRef(backbone=cfg.generator_model.name, checkpoint=generator.value.checkpoint)
    # τ_k: None with fidelity off, and for the validation schedule until its candidates are trained.
    choice = None if cfg.tau_schedule == "validation" else leakage_tau(cfg, leakage.value)
    generated = generate_task(home, dataset, k, generator.value.checkpoint,
                              cfg.generation_params(k, choice.tau if choice else None),
                              executor=cfg.executor_spec(), wait_for=[generator, leakage])
    if cfg.tau_schedule == "validation":  # one θ_{k+1} per candidate τ, in scratch forks of D_k
        chosen = tau_candidates(cfg, home, dataset, k, generated.value, made_by)
        choice, times["tau_candidates"] = chosen.value, chosen.seconds
    accepted = filter_task(home, dataset, k, generated.value, cfg.filter_params(choice.tau if choice else None),
                           wait_for=[generated])
    expanded = expand_task(home, accepted.value, k + 1, made_by, wait_for=[accepted, generator])
    times.update(generate=generated.seconds, filter=accepted.seconds, expand=expanded.seconds)
    return Iteration(k, student.value, evaluation.value, times, generator.value, generated.value, accepted.value,
                     expanded.value, leakage=leakage.value, tau=choice)


@flow(name="rsir-tau-candidates", flow_run_name="tau-candidates-{k}", log_prints=True)
def tau_candidates(cfg: RunConfig, home: str, dataset: str, k: int, generated: Generation,
                   made_by: GeneratorRef) -> Timed[TauChoice]:
    """The validation schedule's τ_k: `generated` (at the loosest candidate) filtered at each
    candidate τ into a scratch fork of D_k, a θ_{k+1} trained on each, the best on validation
    kept (tasks/tau_schedule.py). The winner's checkpoint is what the next iteration reuses."""
    valid, seconds = {}, 0.0
    for tau in cfg.taus_tried:
        scratch = fork_candidate_task(home, dataset, k, tau)
        accepted = filter_task(home, scratch, 0, generated, cfg.filter_params(tau))
        expanded = expand_task(home, accepted.value, 1, made_by, wait_for=[accepted])
        trained = train_task(cfg.train_config(scratch, 1, cfg.model), home, role=f"candidate-tau{tau}",
                             executor=cfg.executor_spec(), wait_for=[expanded])
        valid[tau] = candidate_score(trained.value, cfg.early_stop)
        seconds += accepted.seconds + expanded.seconds + trained.seconds
    return Timed(best_on_validation(cfg, valid), seconds)


def _rsir(**params: Any) -> dict[str, Any]:
    """RSIR over K iterations with fidelity control; returns the per-iteration table.

    The parameters are RunConfig's (tasks/config.py), flat: the backbones as a name plus a dict
    of settings; a training setting left None comes from the recipe (`default` or `release`)."""
    with boundary():  # a fault the user can fix: the flow run fails with its one line
        return run_rsir(RunConfig.from_parameters(params))


# The flow's signature (what Prefect shows, validates and deploys) is derived from RunConfig.
rsir = flow(name="rsir", flow_run_name="rsir-{dataset}-{model}-K{K}-seed{seed}", log_prints=True)(
    with_parameters(_rsir, run_parameters()))


def run_rsir(cfg: RunConfig) -> dict[str, Any]:
    """fork → for each k: iteration → log → champion → finish; a re-submission of a finished
    run gets its summary. Returns the summary's JSON (tasks/runlog.py RunSummary): the flow's
    result, what `rsir run --json` prints."""
    started = time.perf_counter()
    ws = Workspace.at(cfg.home)
    check_environment(ws, cfg.tracking_uri)
    tracker = _tracker(cfg, ws)
    fetch_builtin_task(cfg.dataset, ws.home)
    # The run's own fork of the dataset, named by its parameters: a re-run resumes in it.
    base = dataset_store(ws).fork(cfg.dataset, cfg.run_dataset).digest
    log = RunLog(tracker, cfg, dataset_store(ws), cfg.run_dataset, base)
    flow_run = _prefect_tags()
    close_killed_lineage(tracker, cfg.lineage_key()[:16], flow_run["prefect.flow_run_id"])
    summary = log.finished_summary()
    if summary is None:
        log.start(flow_run)
        with log.heartbeat():  # what tells a later run that this one still runs
            summary = _iterate(cfg, ws, log, started)
    create_markdown_artifact(summary_markdown(summary), key="rsir-summary",
                             description=f"RSIR on {cfg.dataset}: MLflow run, champion, iterations")
    return summary.model_dump(mode="json")


def _iterate(cfg: RunConfig, ws: Workspace, log: RunLog, started: float) -> RunSummary:
    """Iterations 0, 1, ... until one says the run stops, each logged as it ends; then the
    champion and the summary."""
    progress = create_progress_artifact(0.0, key="rsir-progress", description=f"RSIR on {cfg.dataset}")
    # One CPU thread setting for every task of the run (training, evaluation, generation).
    with torch_threads(cfg.threads):
        for k in range(cfg.max_iterations + 1):  # the rule stops at max_iterations at the latest
            if log.restore_iteration(k) is not None:  # finished before, here or in an archived workspace
                stop = log.stopped  # as that iteration decided
            else:
                log.start_iteration(k)
                result = iteration(cfg, ws.home, log.dataset, k, log.valid_scores())
                log.log_iteration(result)
                stop = result.stop
            update_progress_artifact(progress, 100.0 if stop else 100.0 * (k + 1) / (cfg.max_iterations + 1))
            if stop:
                break
    wall = time.perf_counter() - started
    best = log.champion()
    plots = plot_run_task(log.rows, str(ws.root / "runs" / log.dataset / "plots"))
    summary = log.finish(best, plots, wall)
    create_table_artifact(table_rows(log.rows), key="rsir-iterations", description="RSIR per-iteration results")
    return summary


def _tracker(cfg: RunConfig, ws: Workspace) -> Tracker:
    uri = resolve_tracking_uri(cfg.tracking_uri, ws.mlflow_db)
    naming_service(f"MLflow tracking store {redact_uri(uri)}")
    return Tracker.open(uri, cfg.experiment, ws.mlartifacts)


def _prefect_tags() -> dict[str, str]:
    """The Prefect flow run (and deployment) this run is, as MLflow tags."""
    flow_run = getattr(get_run_context(), "flow_run", None)
    return {"prefect.flow_run_id": str(flow_run.id) if flow_run else "",
            "prefect.deployment_id": str(flow_run.deployment_id or "") if flow_run else ""}
