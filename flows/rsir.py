"""The `rsir` flow: K self-improving iterations, each a named sub-flow in the Prefect UI.

    for k in 0..K-1:  train θ_k on D_k → evaluate θ_k → generate → filter → expand → D_{k+1}
    finally:          train and evaluate θ_K on D_K

Wiring only: every step is a task from tasks/ that takes small references and returns a typed
one (TrainResult with its checkpoint path, Evaluation, Generation, Filtered, VersionRef) beside
the seconds its step took (`Timed`). A run works on its own fork of the
dataset, named by the lineage key of its parameters, so re-running the same parameters after a
crash finds the committed versions and checkpoints and continues from there, and closes what the
killed run left open (its MLflow run KILLED, its Prefect flow run CRASHED) once its process is
known to be gone: see `_close_killed_runs`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.context import get_run_context

from core.config import with_parameters
from tasks.config import RunConfig, run_parameters
from core.workspace import Workspace
from storage.manifest import VersionRef
from storage.tracking import Tracker, owner_tags, resolve_tracking_uri, redact_uri
from tasks.evaluate import Evaluation, evaluate_task
from tasks.expand import expand_task
from tasks.filter import Filtered, filter_task
from tasks.generate import Generation, GenerationParams, generate_task
from tasks.ingest import fetch_builtin_task
from storage.dataset import DatasetStore, dataset_store
from tasks.plots import plot_run_task
from tasks.runtime import torch_threads
from tasks.train import TrainResult, train_task



@dataclass(frozen=True)
class Iteration:
    """What one iteration produced: θ_k and its evaluation; unless it was the last, the
    generation, the filter's counts and D_{k+1}. `times` holds each task's seconds."""

    k: int
    student: TrainResult
    evaluation: Evaluation
    times: dict[str, float]
    generator: TrainResult | None = None
    generation: Generation | None = None
    filtered: Filtered | None = None
    next: VersionRef | None = None


@flow(name="rsir-iteration", flow_run_name="iteration-{k}", log_prints=True)
def iteration(cfg: RunConfig, home: str, dataset: str, k: int, last: bool) -> Iteration:
    """Train and evaluate θ_k on D_k; unless this is the last iteration, produce D_{k+1}."""
    student = train_task(cfg.train_config(dataset, k, cfg.model), home, role="student", executor=cfg.executor_spec())
    evaluation = evaluate_task(home, student.value.checkpoint, dataset, k, cfg.device, cfg.executor_spec())
    times = {"train": student.seconds, "evaluate": evaluation.seconds}
    if last:
        return Iteration(k, student.value, evaluation.value, times)
    generator = student
    if cfg.generator is not None and cfg.generator != cfg.model:  # weak-to-strong
        generator = train_task(cfg.train_config(dataset, k, cfg.generator), home, role="generator",
                               executor=cfg.executor_spec())
        times["train_generator"] = generator.seconds
    params = GenerationParams(m=cfg.m, tau=cfg.generation_threshold, p=cfg.p, min_len=cfg.min_len,
                              seed=cfg.seed + k, batch_size=cfg.gen_batch_size, device=cfg.device,
                              max_sources=cfg.max_sources, retrieval=cfg.retrieval)
    generated = generate_task(home, dataset, k, generator.value.checkpoint, params, executor=cfg.executor_spec())
    accepted = filter_task(home, dataset, k, generated.value.path, cfg.tau if cfg.fidelity else None, cfg.min_len,
                           cfg.fidelity)
    expanded = expand_task(home, accepted.value.path, k + 1,
                           generator={"backbone": cfg.generator_model.name, "checkpoint": generator.value.checkpoint})
    times.update(generate=generated.seconds, filter=accepted.seconds, expand=expanded.seconds)
    return Iteration(k, student.value, evaluation.value, times, generator.value, generated.value, accepted.value,
                     expanded.value)


def _rsir(**params: Any) -> dict[str, Any]:
    """RSIR over K iterations with fidelity control; returns the per-iteration table.

    The parameters are RunConfig's (tasks/config.py), flat: the backbones as a name plus a dict
    of settings; a training setting left None comes from the recipe (`default` or `release`)."""
    return run_rsir(RunConfig.from_parameters(params))


# The flow's signature (what Prefect shows, validates and deploys) is derived from RunConfig.
rsir = flow(name="rsir", flow_run_name="rsir-{dataset}-{model}-K{K}-seed{seed}", log_prints=True)(
    with_parameters(_rsir, run_parameters()))


def run_rsir(cfg: RunConfig) -> dict[str, Any]:
    started = time.perf_counter()
    ws = Workspace.at(cfg.home)
    tracker = Tracker.open(resolve_tracking_uri(cfg.tracking_uri, ws.mlflow_db), cfg.experiment, ws.mlartifacts)
    fetch_builtin_task(cfg.dataset, ws.home)
    lineage = cfg.lineage_key()
    # The run's own fork of the dataset, named by its parameters: a re-run resumes in it.
    run_dataset = f"{cfg.dataset}--{lineage[:10]}"
    dataset_store(ws).fork(cfg.dataset, run_dataset)
    parent = _parent_run(tracker, cfg, lineage, run_dataset)
    with tracker.heartbeat(parent):  # what tells a later run that this one still runs
        rows, champion = _iterate(cfg, ws, tracker, parent, run_dataset)
        return _finish(cfg, ws, tracker, parent, run_dataset, rows, champion, time.perf_counter() - started)


@dataclass(frozen=True)
class Champion:
    """The iteration with the best validation NDCG@10 (its MLflow child run holds θ_k)."""

    run_id: str
    valid_ndcg: float
    k: int


def _iterate(cfg: RunConfig, ws: Workspace, tracker: Tracker, parent: str, run_dataset: str
             ) -> tuple[list[dict[str, Any]], Champion]:
    """Iterations 0..K, each logged as it ends; the table rows and the champion."""
    logger = get_run_logger()
    progress = create_progress_artifact(0.0, key="rsir-progress", description=f"RSIR on {cfg.dataset}")
    rows: list[dict[str, Any]] = []
    champion: Champion | None = None
    # One CPU thread setting for every task of the run (training, evaluation, generation).
    with torch_threads(cfg.threads):
        for k in range(cfg.K + 1):
            result = iteration(cfg, ws.home, run_dataset, k, last=k == cfg.K)
            child = _log_iteration(tracker, parent, cfg, run_dataset, result)
            rows.append(_table_row(ws, run_dataset, result))
            valid = result.evaluation.valid["ndcg@10"]
            logger.info("iteration %d: valid ndcg@10 %.4f, test ndcg@10 %.4f", k, valid,
                        result.evaluation.test["ndcg@10"])
            if champion is None or valid > champion.valid_ndcg:
                champion = Champion(child, valid, k)
            update_progress_artifact(progress, 100.0 * (k + 1) / (cfg.K + 1))
    assert champion is not None  # K >= 0: at least iteration 0 ran
    return rows, champion


def _finish(cfg: RunConfig, ws: Workspace, tracker: Tracker, parent: str, run_dataset: str,
            rows: list[dict[str, Any]], champion: Champion, wall: float) -> dict[str, Any]:
    """Register the champion, log the summary and plots, close the parent run."""
    model_name = f"rsir-{cfg.dataset}-{cfg.model.name}"
    best = rows[champion.k]
    version = tracker.register_champion(model_name, champion.run_id, "checkpoint", tags={
        "rsir.iteration": champion.k, "rsir.K": cfg.K, "rsir.dataset": run_dataset,
        "rsir.dataset_version": best["version"],
        "rsir.dataset_digest": dataset_store(ws).manifest(run_dataset, best["version"]).digest,
        "rsir.lineage": cfg.lineage_key()[:16], "valid_ndcg_at_10": f"{best['valid']['ndcg@10']:.4f}",
        "test_ndcg_at_10": f"{best['test']['ndcg@10']:.4f}"})
    _log_version(tracker, parent, dataset_store(ws), run_dataset, cfg.K, "output")  # D_K: the parent's lineage ends here
    step_seconds = sum(sum(r["times"].values()) for r in rows)
    summary = {"dataset": cfg.dataset, "run_dataset": run_dataset, "model": cfg.model.name,
               "generator": cfg.generator_model.name, "K": cfg.K, "iterations": rows,
               "champion": {"iteration": champion.k, "registered_model": model_name, "version": version,
                            "alias": "champion"},
               "mlflow_run_id": parent, "tracking_uri": redact_uri(tracker.uri), "mlflow_url": tracker.run_url(parent),
               "wall_seconds": wall, "step_seconds": step_seconds,
               "overhead_fraction": max(wall - step_seconds, 0.0) / wall if wall else 0.0}
    for path in plot_run_task(rows, str(ws.root / "runs" / run_dataset / "plots")):
        tracker.log_artifact(parent, path, "plots")
    tracker.log_dict(parent, summary, "summary.json")
    tracker.log_metrics(parent, {"overhead_fraction": summary["overhead_fraction"], "wall_seconds": wall,
                                 "best_valid_ndcg@10": champion.valid_ndcg})
    tracker.end_run(parent)
    create_table_artifact(_flat_rows(rows), key="rsir-iterations", description="RSIR per-iteration results")
    return summary


def _parent_run(tracker: Tracker, cfg: RunConfig, lineage: str, run_dataset: str) -> str:
    tags = {"rsir.lineage": lineage[:16], "rsir.K": str(cfg.K),
            **{f"rsir.label.{key}": str(value) for key, value in cfg.labels.items()}}
    ctx = get_run_context()
    flow_run = getattr(ctx, "flow_run", None)
    prefect_tags = {"prefect.flow_run_id": str(flow_run.id) if flow_run else "",
                    "prefect.deployment_id": str(flow_run.deployment_id or "") if flow_run else ""}
    _close_killed_runs(tracker, lineage[:16], prefect_tags["prefect.flow_run_id"])
    run_id = tracker.start_run(f"rsir-{cfg.dataset}-{cfg.model.name}-K{cfg.K}-seed{cfg.seed}",
                               {**tags, **prefect_tags, **owner_tags()})
    tracker.log_params(run_id, {**cfg.model_dump(mode="json", exclude={"home", "tracking_uri", "progress"}),
                                "run_dataset": run_dataset})
    _log_version(tracker, run_id, dataset_store(Workspace.at(cfg.home)), run_dataset, 0, "input")  # D_0
    return run_id


def _close_killed_runs(tracker: Tracker, lineage: str, this_flow_run: str) -> None:
    """Close what a killed run of this lineage left open: its MLflow parent run (and an iteration
    cut short) KILLED, its Prefect flow run CRASHED; one log line each. Which runs are dead is
    decided by their process or heartbeat (`Tracker.dead_runs`), never by the RUNNING state the
    killed process left: two workers may run one lineage at once, and a live run stays open."""
    logger = get_run_logger()
    for dead in tracker.dead_runs(f"tags.`rsir.lineage` = '{lineage}'"):
        tracker.kill(dead.run_id)
        flow_run = dead.tags.get("prefect.flow_run_id", "")
        if not flow_run:
            prefect = "no Prefect flow run"
        elif flow_run == this_flow_run:  # Prefect runs a crashed flow run again under its id
            prefect = f"Prefect flow run {flow_run} runs again as this run"
        else:
            prefect = _crash_flow_run(flow_run, f"killed: {dead.reason}; MLflow run {dead.run_id} was marked "
                                                "KILLED by a later run of its lineage")
        logger.warning("closed a killed run of lineage %s (%s): MLflow run %s KILLED, %s; this run resumes its work",
                       lineage, dead.reason, dead.run_id, prefect)


def cancel_tagged_flow_runs(tag: str, message: str) -> list[tuple[str, str]]:
    """After an interrupt: every flow run tagged `tag` (the runs of one interrupted command) that
    did not complete, CANCELLED with its open subflow and task runs. (flow run id, what became of
    it) for each; never raises."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.states import Cancelled

    try:
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag])))
    except Exception as exc:  # the server is unreachable: say so
        return [("", f"Prefect flow runs not marked ({type(exc).__name__})")]
    return [(str(run.id), _crash_flow_run(str(run.id), message, Cancelled)) for run in runs
            if run.parent_task_run_id is None and not (run.state and run.state.is_completed())]  # subflows: below


def _crash_flow_run(flow_run_id: str, message: str, final: Any = None) -> str:
    """Set a killed Prefect flow run CRASHED (or the state `final` makes), with its subflow runs
    and task runs that had not ended (the killed process left them Running too); says what became
    of the flow run. Never raises: the MLflow run is closed all the same, and this run goes on."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterParentFlowRunId, TaskRunFilter,
                                                TaskRunFilterFlowRunId, TaskRunFilterState, TaskRunFilterStateType)
    from prefect.client.schemas.objects import TERMINAL_STATES, StateType
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    final = final or Crashed
    open_states = [t for t in StateType if t not in TERMINAL_STATES]
    try:
        with get_client(sync_client=True) as client:
            root = client.read_flow_run(flow_run_id)
            pending, outcome = [root], f"Prefect flow run {flow_run_id} had ended ({root.state_name})"
            while pending:
                run = pending.pop()
                if run.state is None or not run.state.is_final() or (final is not Crashed and run.state.is_crashed()):
                    state = client.set_flow_run_state(run.id, final(message=message), force=True).state
                    if run.id == root.id:
                        outcome = f"Prefect flow run {flow_run_id} {state.name.upper() if state else 'not marked'}"
                pending += client.read_flow_runs(flow_run_filter=FlowRunFilter(
                    parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])))
                for task_run in client.read_task_runs(task_run_filter=TaskRunFilter(
                        flow_run_id=TaskRunFilterFlowRunId(any_=[run.id]),
                        state=TaskRunFilterState(type=TaskRunFilterStateType(any_=open_states)))):
                    client.set_task_run_state(task_run.id, final(message=message), force=True)
            return outcome
    except ObjectNotFound:  # it ran against another Prefect server (or was deleted)
        return f"Prefect flow run {flow_run_id} unknown to this Prefect server"
    except Exception as exc:  # the server is unreachable or refused: say so, the run goes on
        reason = (str(exc).splitlines() or [""])[0][:200]
        return f"Prefect flow run {flow_run_id} not marked ({type(exc).__name__}: {reason})"


def _log_version(tracker: Tracker, run_id: str, store: DatasetStore, dataset: str, version: int, context: str) -> None:
    """Log dataset version `version` as an input of `run_id` with the given context."""
    manifest = store.manifest(dataset, version)
    tracker.log_dataset(run_id, dataset, version, manifest.digest, store.root + "/" + dataset, context,
                        _profile(manifest.stats))


def _log_iteration(tracker: Tracker, parent: str, cfg: RunConfig, dataset: str, result: Iteration) -> str:
    """One child run per iteration: curves, metrics, statistics, θ_k, and D_k → θ_k → D_{k+1}."""
    k, student, evaluation = result.k, result.student, result.evaluation
    store = dataset_store(Workspace.at(cfg.home))
    manifest = store.manifest(dataset, k)
    child = tracker.start_run(f"iteration-{k}", {"rsir.iteration": str(k), "rsir.dataset": dataset}, parent=parent)
    tracker.log_params(child, {"iteration": k, "dataset_version": k, "dataset_digest": manifest.digest,
                               "student": cfg.model.name, "generator": cfg.generator_model.name})
    for point in student.curve:
        tracker.log_metrics(child, {f"train/{key}": v for key, v in point.items() if key != "epoch"},
                            step=int(point["epoch"]))
    tracker.log_metrics(child, {**{f"valid/{key}": v for key, v in evaluation.valid.items()},
                                **{f"test/{key}": v for key, v in evaluation.test.items()},
                                **{f"data/{key}": v for key, v in manifest.stats.items()
                                   if isinstance(v, (int, float))},
                                **{f"time/{key}": v for key, v in result.times.items()},
                                "train/epochs": student.epochs,
                                "train/best_epoch": student.best_epoch,
                                "train/synthetic_position_share": student.synthetic_position_share,
                                "train/synthetic_weight_share": student.synthetic_weight_share})
    _log_version(tracker, child, store, dataset, k, "training")
    tracker.log_artifact(child, student.checkpoint, "checkpoint")
    tracker.log_artifact(child, evaluation.ranks_path, "ranks")  # per-user ranks: paired tests across runs
    if result.next is not None:
        nxt = result.next
        tracker.log_metrics(child, {f"generation/{key}": v for key, v in result.filtered.counts.items()})
        _log_version(tracker, child, store, dataset, nxt.version, "output")
        if result.generator.checkpoint != student.checkpoint:  # weak-to-strong
            tracker.log_artifact(child, result.generator.checkpoint, "generator_checkpoint")
    tracker.end_run(child)
    return child


def _profile(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: stats[k] for k in ("sequences", "synthetic_sequences", "interactions", "density") if k in stats}


def _table_row(ws: Workspace, dataset: str, result: Iteration) -> dict[str, Any]:
    stats = dataset_store(ws).manifest(dataset, result.k).stats
    return {
        "iteration": result.k,
        "version": result.k,
        "sequences": stats["sequences"],
        "synthetic_sequences": stats["synthetic_sequences"],
        "interactions": stats["interactions"],
        "density": stats["density"],
        "item_entropy": stats["item_entropy"],
        "acceptance_rate": stats.get("acceptance_rate"),
        "mean_new_length": stats.get("mean_new_length"),
        "valid": result.evaluation.valid,
        "test": result.evaluation.test,
        "epochs": result.student.epochs,
        "checkpoint": result.student.checkpoint,
        "train_seconds": result.student.seconds_total,
        "reused": result.student.reused,
        "stats": stats,
        "times": result.times,
    }


def _flat_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keys = ("ndcg@10", "ndcg@20", "recall@10", "recall@20")
    return [{"k": r["iteration"], "sequences": r["sequences"], "interactions": r["interactions"],
             "density": round(r["density"], 5), "entropy": round(r["item_entropy"], 4),
             "acceptance": None if r["acceptance_rate"] is None else round(r["acceptance_rate"], 4),
             **{f"valid {m}": round(r["valid"][m], 4) for m in keys},
             **{f"test {m}": round(r["test"][m], 4) for m in keys}} for r in rows]


def _cell(column: str, value: Any) -> str:
    """A table cell: '-' for a value that does not apply (no generation after the last
    iteration), floats at one precision per column (density 5 decimals, the rest 4)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.5f}" if column == "density" else f"{value:.4f}"
    return str(value)


def format_table(summary: dict[str, Any]) -> str:
    """The per-iteration table the CLI and `make run` print. `command_seconds` and
    `server_start_seconds`, when the CLI adds them, count the Prefect server's start too."""
    rows = _flat_rows(summary["iterations"])
    cols = list(rows[0])
    cells = [[_cell(c, r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    wall = f"wall {summary['wall_seconds']:.1f} s"
    if "command_seconds" in summary:
        wall = (f"wall {summary['command_seconds']:.1f} s (Prefect server start {summary['server_start_seconds']:.1f} s, "
                f"flow {summary['wall_seconds']:.1f} s)")
    lines.append(f"{wall}, steps {summary['step_seconds']:.1f} s, "
                 f"orchestration+tracking overhead {100 * summary['overhead_fraction']:.1f}% of the flow")
    lines.append(f"data: D_0..D_{summary['K']} in dataset {summary['run_dataset']}, this run's fork of "
                 f"{summary['dataset']} (`rsir versions --dataset {summary['run_dataset']}`)")
    lines.append(f"champion: iteration {summary['champion']['iteration']} registered as "
                 f"{summary['champion']['registered_model']} v{summary['champion']['version']} @champion; "
                 f"MLflow run {summary['mlflow_run_id']} ({summary['tracking_uri']})")
    if summary.get("mlflow_url"):
        lines.append(f"lineage: {summary['mlflow_url']}")
    return "\n".join(lines)


