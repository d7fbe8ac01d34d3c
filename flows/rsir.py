"""The `rsir` flow: K self-improving iterations, each a named sub-flow in the Prefect UI.

    for k in 0..K-1:  train θ_k on D_k → evaluate θ_k → generate → filter → expand → D_{k+1}
    finally:          train and evaluate θ_K on D_K

Wiring only: every step is a task from tasks/ that takes small references and returns a typed
one (TrainResult with its checkpoint path, Evaluation, Generation, Filtered, VersionRef) beside
the seconds its step took (`Timed`); each step waits for the results it reads (`wait_for`), so
Prefect's graph draws train → evaluate, train → generate → filter → expand. A run works on its own
fork of the dataset, named by the lineage key of its parameters, so re-running the same parameters
after a crash finds the committed versions and checkpoints and continues from there, and closes
what the killed run left open (its MLflow run KILLED, its Prefect flow run CRASHED) once its process
is known to be gone: see `_close_killed_runs`. The run key (lineage, K, labels, D_0) names the
run itself: a re-submission of a finished run returns its summary, a stopped run is reopened.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

from prefect import flow, get_run_logger
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
from flows.liveness import close_dead_runs
from reporting.plots import plot_run_task
from storage.dataset import DatasetStore, dataset_store
from storage.manifest import VersionRef
from storage.tracking import (
    BASE_DIGEST_TAG,
    RUN_KEY_TAG,
    Tracker,
    dataset_name,
    owner_tags,
    redact_uri,
    resolve_tracking_uri,
)
from tasks.builtin import fetch_builtin_task
from tasks.config import RunConfig, run_parameters
from tasks.evaluate import Evaluation, evaluate_task
from tasks.expand import expand_task
from tasks.filter import Filtered, filter_task
from tasks.generate import Generation, generate_task
from tasks.rollout import GenerationParams
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
    # wait_for names the upstream result a step reads a field of: Prefect draws the edge.
    evaluation = evaluate_task(home, student.value.checkpoint, dataset, k, cfg.device, cfg.executor_spec(),
                               wait_for=[student])
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
    generated = generate_task(home, dataset, k, generator.value.checkpoint, params, executor=cfg.executor_spec(),
                              wait_for=[generator])
    accepted = filter_task(home, dataset, k, generated.value.path, cfg.tau if cfg.fidelity else None, cfg.min_len,
                           cfg.fidelity, wait_for=[generated])
    expanded = expand_task(home, accepted.value.path, k + 1,
                           generator={"backbone": cfg.generator_model.name, "checkpoint": generator.value.checkpoint},
                           wait_for=[accepted, generator])
    times.update(generate=generated.seconds, filter=accepted.seconds, expand=expanded.seconds)
    return Iteration(k, student.value, evaluation.value, times, generator.value, generated.value, accepted.value,
                     expanded.value)


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
    started = time.perf_counter()
    ws = Workspace.at(cfg.home)
    check_environment(ws, cfg.tracking_uri)
    uri = resolve_tracking_uri(cfg.tracking_uri, ws.mlflow_db)
    naming_service(f"MLflow tracking store {redact_uri(uri)}")
    tracker = Tracker.open(uri, cfg.experiment, ws.mlartifacts)
    fetch_builtin_task(cfg.dataset, ws.home)
    lineage = cfg.lineage_key()
    # The run's own fork of the dataset, named by its parameters: a re-run resumes in it.
    run_dataset = f"{cfg.dataset}--{lineage[:10]}"
    base = dataset_store(ws).fork(cfg.dataset, run_dataset).digest
    run_key = cfg.run_key(base)[:16]
    flow_run = _prefect_tags()
    _close_killed_runs(tracker, lineage[:16], flow_run["prefect.flow_run_id"])
    summary = _finished_summary(tracker, run_key)
    if summary is None:
        parent = _parent_run(tracker, cfg, lineage, run_key, base, run_dataset, flow_run)
        with tracker.heartbeat(parent):  # what tells a later run that this one still runs
            logged = _iterate(cfg, ws, tracker, parent, run_dataset)
            summary = _finish(cfg, ws, tracker, parent, run_dataset, base, logged, time.perf_counter() - started)
    create_markdown_artifact(summary_markdown(summary), key="rsir-summary",
                             description=f"RSIR on {cfg.dataset}: MLflow run, champion, iterations")
    return summary


@dataclass(frozen=True)
class Logged:
    """One iteration as MLflow holds it: its child run, θ_k's logged model, the table row."""

    k: int
    run_id: str
    model_id: str
    row: dict[str, Any]


def _iterate(cfg: RunConfig, ws: Workspace, tracker: Tracker, parent: str, run_dataset: str) -> list[Logged]:
    """Iterations 0..K, each with its MLflow child run open from its start and logged as it ends."""
    logger = get_run_logger()
    progress = create_progress_artifact(0.0, key="rsir-progress", description=f"RSIR on {cfg.dataset}")
    logged: list[Logged] = []
    # One CPU thread setting for every task of the run (training, evaluation, generation).
    with torch_threads(cfg.threads):
        for k in range(cfg.K + 1):
            child, done = _start_iteration(tracker, parent, cfg, run_dataset, k)
            result = iteration(cfg, ws.home, run_dataset, k, last=k == cfg.K)
            model_id = (_log_theta(tracker, child, cfg, run_dataset, result) if done
                        else _log_iteration(tracker, parent, child, cfg, run_dataset, result))
            logged.append(Logged(k, child, model_id, _table_row(ws, run_dataset, result)))
            logger.info("iteration %d: valid %s %.4f, test ndcg@10 %.4f", k, cfg.early_stop,
                        result.evaluation.valid[cfg.early_stop], result.evaluation.test["ndcg@10"])
            update_progress_artifact(progress, 100.0 * (k + 1) / (cfg.K + 1))
    return logged


def _finish(cfg: RunConfig, ws: Workspace, tracker: Tracker, parent: str, run_dataset: str, base: str,
            logged: list[Logged], wall: float) -> dict[str, Any]:
    """Register this run's best θ (by the validation metric of early stopping), log the summary
    and plots, close the parent run."""
    rows = [item.row for item in logged]
    # The run's best θ: the first of equals, as the registry's rule (storage/tracking.champion_rule).
    best = max(logged, key=lambda item: (item.row["valid"][cfg.early_stop], -item.k))
    model_name = f"rsir-{cfg.dataset}-{cfg.model.name}"
    store = dataset_store(ws)
    registration = tracker.register_champion(model_name, best.run_id, best.model_id, tags={
        "rsir.iteration": best.k, "rsir.K": cfg.K, "rsir.dataset": run_dataset, "rsir.dataset_version": best.k,
        "rsir.dataset_digest": store.manifest(run_dataset, best.k).digest,
        "rsir.lineage": cfg.lineage_key()[:16], RUN_KEY_TAG: cfg.run_key(base)[:16],
        **{f"{split}_{metric.replace('@', '_at_')}": f"{value:.6g}" for split in ("valid", "test")
           for metric, value in best.row[split].items()}}, metric=cfg.early_stop, base_digest=base)
    _log_version(tracker, parent, store, run_dataset, cfg.K, "output")  # D_K: the parent's lineage ends here
    step_seconds = sum(sum(r["times"].values()) for r in rows)
    summary = {"dataset": cfg.dataset, "run_dataset": run_dataset, "model": cfg.model.name,
               "generator": cfg.generator_model.name, "K": cfg.K, "iterations": rows,
               "champion": {"iteration": best.k, "registered_model": model_name, "version": registration.version,
                            "alias": "champion", "champion_version": registration.champion,
                            "metric": cfg.early_stop, "valid": best.row["valid"][cfg.early_stop],
                            "model_id": best.model_id, "model_url": tracker.model_url(best.model_id)},
               "mlflow_run_id": parent, "tracking_uri": redact_uri(tracker.uri), "mlflow_url": tracker.run_url(parent),
               "mlflow_path": tracker.run_path(parent),
               "wall_seconds": wall, "step_seconds": step_seconds,
               "overhead_fraction": max(wall - step_seconds, 0.0) / wall if wall else 0.0}
    for path in plot_run_task(rows, str(ws.root / "runs" / run_dataset / "plots")):
        tracker.log_artifact(parent, path, "plots")
    tracker.log_dict(parent, summary, "summary.json")
    tracker.log_metrics(parent, {"overhead_fraction": summary["overhead_fraction"], "wall_seconds": wall,
                                 "best_valid_ndcg@10": max(r["valid"]["ndcg@10"] for r in rows)})
    tracker.end_run(parent)
    create_table_artifact(_flat_rows(rows), key="rsir-iterations", description="RSIR per-iteration results")
    return summary


def _finished_summary(tracker: Tracker, run_key: str) -> dict[str, Any] | None:
    """The summary of a finished run with this run key (same parameters, same D_0), as it logged
    it, with this tracker's links and the champion as the registry has it now; None if none
    finished. Nothing is trained, logged or registered for a re-submission."""
    finished = [r for r in tracker.runs_with_key(run_key) if r.info.status == "FINISHED"]
    if not finished:
        return None
    run_id = finished[0].info.run_id
    summary = tracker.load_dict(run_id, "summary.json")
    champion = summary["champion"]
    champion["champion_version"] = tracker.alias_version(champion["registered_model"], champion["alias"])
    summary.update(resubmitted=True, mlflow_url=tracker.run_url(run_id), mlflow_path=tracker.run_path(run_id))
    get_run_logger().info("an identical run finished before (MLflow run %s, same parameters and D_0): its "
                          "summary is the answer; nothing was trained or registered", run_id)
    return summary


def _prefect_tags() -> dict[str, str]:
    """The Prefect flow run (and deployment) this run is, as MLflow tags."""
    flow_run = getattr(get_run_context(), "flow_run", None)
    return {"prefect.flow_run_id": str(flow_run.id) if flow_run else "",
            "prefect.deployment_id": str(flow_run.deployment_id or "") if flow_run else ""}


def _parent_run(tracker: Tracker, cfg: RunConfig, lineage: str, run_key: str, base: str, run_dataset: str,
                prefect_tags: dict[str, str]) -> str:
    """The run's MLflow parent: the stopped (KILLED or FAILED) run of this run key reopened, so a
    resume continues its lineage under one parent, else a new run. A run of this key that still
    runs (another worker) is left alone: this one gets its own parent."""
    stopped = [r for r in tracker.runs_with_key(run_key) if r.info.status in ("KILLED", "FAILED")]
    if stopped:
        run_id = stopped[0].info.run_id
        resumes = tracker.reopen(run_id, {**prefect_tags, **owner_tags()})
        get_run_logger().info("resuming MLflow run %s (%s before; resume %d)", run_id, stopped[0].info.status,
                              resumes)
        return run_id
    tags = {"rsir.lineage": lineage[:16], "rsir.K": str(cfg.K), RUN_KEY_TAG: run_key, BASE_DIGEST_TAG: base,
            **{f"rsir.label.{key}": str(value) for key, value in cfg.labels.items()}}
    run_id = tracker.start_run(f"rsir-{cfg.dataset}-{cfg.model.name}-K{cfg.K}-seed{cfg.seed}",
                               {**tags, **prefect_tags, **owner_tags()})
    try:
        tracker.log_params(run_id, {**cfg.model_dump(mode="json", exclude={"home", "tracking_uri", "progress"}),
                                    "run_dataset": run_dataset})
        _log_version(tracker, run_id, dataset_store(Workspace.at(cfg.home)), run_dataset, 0, "input")  # D_0
    except Exception:  # before the heartbeat block: a failed start closes its run too, at once
        with contextlib.suppress(Exception):
            tracker.end_run(run_id, "FAILED")
        raise
    return run_id


def _close_killed_runs(tracker: Tracker, lineage: str, this_flow_run: str) -> None:
    """Close what a killed run of this lineage left open: its MLflow parent run (and an iteration
    cut short) KILLED, its Prefect flow run CRASHED; one log line each (flows/liveness.py: the
    same rule `rsir serve` sweeps with). A live run of the lineage stays open."""
    logger = get_run_logger()
    for closed in close_dead_runs(tracker, f"tags.`rsir.lineage` = '{lineage}'", this_flow_run):
        logger.warning("closed a killed run of lineage %s (%s): MLflow run %s KILLED, %s; this run resumes its work",
                       lineage, closed.reason, closed.run_id, closed.prefect)


def _log_version(tracker: Tracker, run_id: str, store: DatasetStore, dataset: str, version: int,
                 context: str) -> tuple[str, str]:
    """Log dataset version `version` as an input of `run_id` with the given context; its MLflow
    (name, digest)."""
    manifest = store.manifest(dataset, version)
    return tracker.log_dataset(run_id, dataset, version, manifest.digest, store.root + "/" + dataset, context,
                               _profile(manifest.stats))


def _start_iteration(tracker: Tracker, parent: str, cfg: RunConfig, dataset: str, k: int) -> tuple[str, bool]:
    """Iteration k's child run, open from the iteration's start with D_k as its training input;
    a resumed parent's own child is reused. Returns (run id, whether it had finished: its
    results are logged already)."""
    child, before = tracker.child_run(parent, f"iteration-{k}", {"rsir.iteration": str(k), "rsir.dataset": dataset})
    if before != "FINISHED":
        store = dataset_store(Workspace.at(cfg.home))
        tracker.log_params(child, {"iteration": k, "dataset_version": k,
                                   "dataset_digest": store.manifest(dataset, k).digest,
                                   "student": cfg.model.name, "generator": cfg.generator_model.name})
        _log_version(tracker, child, store, dataset, k, "training")
    return child, before == "FINISHED"


def _log_theta(tracker: Tracker, child: str, cfg: RunConfig, dataset: str, result: Iteration) -> str:
    """θ_k as an MLflow logged model, output of the iteration's run (one per run: a resumed
    iteration keeps the one it logged); its id."""
    manifest = dataset_store(Workspace.at(cfg.home)).manifest(dataset, result.k)
    return tracker.log_model(child, f"theta-{result.k}", result.student.checkpoint, result.k, cfg.model.name,
                             params=cfg.model.model_dump(mode="json"),
                             tags={"rsir.iteration": str(result.k), "rsir.dataset": dataset_name(dataset, result.k),
                                   "rsir.dataset_digest": manifest.digest,
                                   "rsir.checkpoint": result.student.checkpoint})


def _log_iteration(tracker: Tracker, parent: str, child: str, cfg: RunConfig, dataset: str, result: Iteration) -> str:
    """What iteration k produced, on its child run: curves, θ_k (a logged model whose metrics name
    D_k), statistics, D_{k+1}; and every metric and statistic on the parent at step k, so MLflow
    draws each as a line over the iterations. Ends the child run; returns θ_k's model id."""
    k, student, evaluation = result.k, result.student, result.evaluation
    store = dataset_store(Workspace.at(cfg.home))
    manifest = store.manifest(dataset, k)
    for point in student.curve:
        tracker.log_metrics(child, {f"train/{key}": v for key, v in point.items() if key != "epoch"},
                            step=int(point["epoch"]))
    model_id = _log_theta(tracker, child, cfg, dataset, result)
    scores = {**{f"valid/{key}": v for key, v in evaluation.valid.items()},
              **{f"test/{key}": v for key, v in evaluation.test.items()}}
    tracker.log_metrics(child, scores, step=k, model_id=model_id,
                        dataset=(dataset_name(dataset, k), manifest.digest))
    rest = {**{f"data/{key}": v for key, v in manifest.stats.items() if isinstance(v, (int, float))},
            **{f"time/{key}": v for key, v in result.times.items()},
            "train/epochs": student.epochs,
            "train/best_epoch": student.best_epoch,
            "train/synthetic_position_share": student.synthetic_position_share,
            "train/synthetic_weight_share": student.synthetic_weight_share}
    if result.next is not None:
        rest.update({f"generation/{key}": v for key, v in result.filtered.counts.items()})
    tracker.log_metrics(child, rest, step=k)
    tracker.log_metrics(parent, {**scores, **rest}, step=k)  # the trend over k
    tracker.log_artifact(child, student.checkpoint, "checkpoint")
    tracker.log_artifact(child, evaluation.ranks_path, "ranks")  # per-user ranks: paired tests across runs
    if result.next is not None:
        _log_version(tracker, child, store, dataset, result.next.version, "output")
        if result.generator.checkpoint != student.checkpoint:  # weak-to-strong
            tracker.log_artifact(child, result.generator.checkpoint, "generator_checkpoint")
    tracker.end_run(child)
    return model_id


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
    lines.append(f"champion: {_champion_line(summary)}; "
                 f"MLflow run {summary['mlflow_run_id']} ({summary['tracking_uri']})")
    if summary.get("mlflow_url"):
        lines.append(f"lineage: {summary['mlflow_url']}")
    return "\n".join(lines)




def _champion_line(summary: dict[str, Any]) -> str:
    """Which θ this run registered, and whether it took the champion alias."""
    c = summary["champion"]
    registered = f"iteration {c['iteration']} registered as {c['registered_model']} v{c['version']}"
    if summary.get("resubmitted"):
        registered = f"identical to a finished run, nothing registered: its {registered}"
    if c.get("champion_version") in (None, c["version"]):
        return f"{registered} @{c['alias']}"
    return (f"{registered}; @{c['alias']} stays on v{c['champion_version']} (better or equal valid "
            f"{c.get('metric', 'ndcg@10')} on the same D_0)")


def summary_markdown(summary: dict[str, Any]) -> str:
    """The run's Prefect markdown artifact (`rsir-summary`): the MLflow run's link (model-training
    view), the champion and the per-iteration table."""
    c = summary["champion"]
    if summary.get("mlflow_url"):
        run = f"[{summary['mlflow_run_id']}]({summary['mlflow_url']})"
    else:  # a database, no server: the page's address under any server over it
        run = (f"`{summary['mlflow_run_id']}` in `{summary['tracking_uri']}`: start `rsir serve --only mlflow` "
               f"over this store and open `{summary['mlflow_path']}` on its URL")
    model = f"[{c['model_id']}]({c['model_url']})" if c.get("model_url") else f"`{c.get('model_id')}`"
    rows = _flat_rows(summary["iterations"])
    cols = list(rows[0])
    lines = [f"## RSIR on {summary['dataset']}: {summary['model']}, K = {summary['K']}", "",
             f"- **MLflow run**: {run}",
             f"- **Champion**: {_champion_line(summary)} (θ_{c['iteration']}: logged model {model})",
             f"- **Data**: the run's fork `{summary['run_dataset']}`, versions 0..{summary['K']}", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join("" if r[col] is None else str(r[col]) for col in cols) + " |" for r in rows]
    return "\n".join(lines)
