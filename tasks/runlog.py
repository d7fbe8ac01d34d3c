"""The run log: what an RSIR run tells MLflow, through the tracking adapter (storage/tracking.py's
`Tracker`, the one module that talks to MLflow), and the tables it reports.

The lineage as the MLflow UI shows it: one parent run per run key, D_0 its input and D_K its
output, its parameters the run config; one child run per iteration k (`iteration-k`), open from
the iteration's start with D_k as its training input, θ_k its logged model (whose metrics name
D_k), D_{k+1} its output; every metric and statistic also on the parent at step k (MLflow draws
each as a line over k); the run's best θ registered, the champion alias where the registry's
rule says (storage/tracking.py::champion_rule).

It sits in tasks/, not storage/: it reads the tasks' records (RunConfig, TrainResult,
Evaluation, Filtered) and the dataset store, which storage may not know."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

from prefect import get_run_logger
from pydantic import ConfigDict, Field

from storage.dataset import DatasetStore
from storage.manifest import Record, VersionRef, VersionStats
from storage.tracking import BASE_DIGEST_TAG, RUN_KEY_TAG, Tracker, dataset_name, owner_tags, redact_uri
from tasks.config import RunConfig
from tasks.evaluate import Evaluation
from tasks.filter import Filtered
from tasks.generate import Generation
from tasks.leakage import Leakage
from tasks.stopping import stop_reason
from tasks.tau_schedule import TauChoice
from tasks.train import TrainResult


@dataclass(frozen=True)
class Iteration:
    """What one iteration produced: θ_k and its evaluation; unless it was the last, the
    generation, the filter's counts and D_{k+1}. `times` holds each task's seconds; `stop`, set
    on the last iteration only, why the run stopped there (tasks/stopping.py); `leakage`, the
    proxy of the synthetic data θ_k was trained on (None for D_0: tasks/leakage.py); `tau`, the
    threshold τ_k D_{k+1} was filtered at and why (None on the last iteration)."""

    k: int
    student: TrainResult
    evaluation: Evaluation
    times: dict[str, float]
    generator: TrainResult | None = None
    generation: Generation | None = None
    filtered: Filtered | None = None
    next: VersionRef | None = None
    stop: str | None = None
    leakage: Leakage | None = None
    tau: TauChoice | None = None


class IterationRow(Record):
    """Iteration k in the run's table (the summary's `iterations`, `rsir run --json`): D_k's
    statistics (the acceptance rate and mean length of the sequences D_k gained, None for D_0),
    θ_k's metrics on D_k and its training; `tau`, the fidelity threshold τ_k iteration k filtered
    D_{k+1} at (None on the last iteration, which generates nothing); `leakage_proxy`, the share
    of D_k's newest synthetic items θ_k ranks worse than the threshold they were accepted under
    (τ_{k-1}; tasks/leakage.py; None for D_0), what the leakage schedule chose τ_k from."""

    model_config = ConfigDict(extra="allow")  # rows of summaries logged by other versions

    iteration: int
    version: int
    sequences: int
    synthetic_sequences: int
    interactions: int
    density: float
    item_entropy: float
    acceptance_rate: float | None
    mean_new_length: float | None
    valid: dict[str, float]
    test: dict[str, float]
    epochs: int
    checkpoint: str
    train_seconds: float
    reused: bool
    stats: VersionStats
    times: dict[str, float]
    tau: int | None = None
    leakage_proxy: float | None = None


class Champion(Record):
    """The θ a run registered (`version` of `registered_model`) and where the alias is now."""

    model_config = ConfigDict(extra="allow")

    iteration: int
    registered_model: str
    version: int | str | None = Field(description="None: not registered (its θ was trained in another "
                                      "workspace and restored from an archive, which keeps no models)")
    alias: str = "champion"
    champion_version: int | str | None = None
    metric: str = Field("ndcg@10", description="the validation metric it was chosen on (summaries logged "
                        "before it was recorded: ndcg@10)")
    valid: float | None = None
    model_id: str | None = None
    model_url: str | None = None


class RunSummary(Record):
    """What a run returns and logs (summary.json): the run, its table, its champion, its times.
    `K`: the iterations it made (with K auto, where it stopped); `stopped`: why it stopped there
    (None in summaries logged before it was recorded); `wall_seconds` includes `restored_seconds`,
    the step seconds of iterations finished in earlier sittings and read back. `resubmitted` (a finished run's summary
    answered again) and the CLI's `command_seconds` and `server_start_seconds` appear only when set."""

    model_config = ConfigDict(extra="allow")  # summaries logged by other versions

    dataset: str
    run_dataset: str
    model: str
    generator: str
    K: int
    iterations: list[IterationRow]
    champion: Champion
    stopped: str | None = None
    mlflow_run_id: str
    tracking_uri: str
    mlflow_url: str | None = None
    mlflow_path: str | None = None
    wall_seconds: float
    step_seconds: float
    restored_seconds: float = 0.0
    overhead_fraction: float
    resubmitted: bool = False
    command_seconds: float | None = None
    server_start_seconds: float | None = None


# An iteration run's row (IterationRow, JSON): what a resumed run reads instead of redoing the
# iteration, here or, restored from an archive (tasks/archive.py), in another workspace.
ROW_FILE = "iteration.json"


@dataclass(frozen=True)
class Logged:
    """One iteration as MLflow holds it: its child run, θ_k's logged model (None for an iteration
    restored from an archive: an archive keeps no models), the table row."""

    k: int
    run_id: str
    model_id: str | None
    row: IterationRow


class RunLog:
    """The MLflow lineage of one run of `cfg` on its fork `dataset` of a base dataset whose D_0
    has digest `base`: `start` the parent, `start_iteration` and `log_iteration` each k, pick
    the `champion`, `finish`. `finished_summary` answers a re-submission of a finished run."""

    def __init__(self, tracker: Tracker, cfg: RunConfig, store: DatasetStore, dataset: str, base: str):
        self.tracker, self.cfg, self.store, self.dataset, self.base = tracker, cfg, store, dataset, base
        self.run_key = cfg.run_key(base)[:16]
        self.parent = ""
        self.logged: list[Logged] = []
        self._child = ("", False)  # the current iteration's run, and whether it had finished
        self.stopped: str | None = None  # why the run stopped, once its last iteration is logged
        self.restored_seconds = 0.0  # step seconds of the iterations read, not run (earlier sittings')

    @property
    def rows(self) -> list[IterationRow]:
        """The per-iteration table so far (the summary's `iterations`)."""
        return [item.row for item in self.logged]

    def valid_scores(self) -> list[float]:
        """θ_0..θ_k's validation early-stopping metric so far (what the stop rule reads)."""
        return [item.row.valid[self.cfg.early_stop] for item in self.logged]

    def finished_summary(self) -> RunSummary | None:
        """The summary of a finished run with this run key (same parameters, same D_0), as it
        logged it, with this tracker's links and the champion as the registry has it now; None
        if none finished. Nothing is trained, logged or registered for a re-submission."""
        finished = [r for r in self.tracker.runs_with_key(self.run_key) if r.info.status == "FINISHED"]
        if not finished:
            return None
        run_id = finished[0].info.run_id
        summary = RunSummary.model_validate(self.tracker.load_dict(run_id, "summary.json"))
        champion = summary.champion
        champion.champion_version = self.tracker.alias_version(champion.registered_model, champion.alias)
        summary.resubmitted = True
        summary.mlflow_url, summary.mlflow_path = self.tracker.run_url(run_id), self.tracker.run_path(run_id)
        get_run_logger().info("an identical run finished before (MLflow run %s, same parameters and D_0): its "
                              "summary is the answer; nothing was trained or registered", run_id)
        return summary

    def start(self, prefect_tags: dict[str, str]) -> str:
        """The run's MLflow parent: the stopped (KILLED or FAILED) run of this run key reopened,
        so a resume continues its lineage under one parent, else a new run. A run of this key
        that still runs (another worker) is left alone: this one gets its own parent."""
        cfg, tracker = self.cfg, self.tracker
        stopped = [r for r in tracker.runs_with_key(self.run_key) if r.info.status in ("KILLED", "FAILED")]
        if stopped:
            self.parent = stopped[0].info.run_id
            resumes = tracker.reopen(self.parent, {**prefect_tags, **owner_tags()})
            get_run_logger().info("resuming MLflow run %s (%s before; resume %d)", self.parent,
                                  stopped[0].info.status, resumes)
            return self.parent
        tags = {"rsir.lineage": cfg.lineage_key()[:16], "rsir.K": str(cfg.K), RUN_KEY_TAG: self.run_key,
                BASE_DIGEST_TAG: self.base, **{f"rsir.label.{key}": str(value) for key, value in cfg.labels.items()}}
        self.parent = tracker.start_run(f"rsir-{cfg.dataset}-{cfg.model.name}-K{cfg.K}-seed{cfg.seed}",
                                        {**tags, **prefect_tags, **owner_tags()})
        try:
            tracker.log_params(self.parent, {**cfg.model_dump(mode="json", exclude={"home", "tracking_uri", "progress"}),
                                             "run_dataset": self.dataset})
            self._log_version(self.parent, 0, "input")  # D_0
        except Exception:  # before the heartbeat block: a failed start closes its run too, at once
            with contextlib.suppress(Exception):
                tracker.end_run(self.parent, "FAILED")
            raise
        return self.parent

    @contextlib.contextmanager
    def heartbeat(self) -> Iterator[None]:
        """What tells a later run that this one still runs (Tracker.heartbeat on the parent)."""
        with self.tracker.heartbeat(self.parent):
            yield

    def start_iteration(self, k: int) -> str:
        """Iteration k's child run, open from the iteration's start with D_k as its training
        input; a resumed parent's own child is reused (and if it had finished, `log_iteration`
        logs only what it must return: θ_k's model id)."""
        child, before = self.tracker.child_run(self.parent, f"iteration-{k}",
                                               {"rsir.iteration": str(k), "rsir.dataset": self.dataset})
        if before != "FINISHED":
            self.tracker.log_params(child, {"iteration": k, "dataset_version": k,
                                            "dataset_digest": self.store.manifest(self.dataset, k).digest,
                                            "student": self.cfg.model.name,
                                            "generator": self.cfg.generator_model.name})
            self._log_version(child, k, "training")
        self._child = (child, before == "FINISHED")
        return child

    def restore_iteration(self, k: int) -> Logged | None:
        """Iteration k as the reopened parent's finished child run holds it (its row, θ_k's
        model if it has one), or None when it has to run: no such child, not finished, or logged
        without its row (by a version before rows were kept). What a resumed run reads instead of
        training, evaluating and generating again: the same numbers, and no checkpoint needed
        (one restored from an archive, tasks/archive.py, has none). Also None when the run goes
        on after θ_k (`stop_reason`) but the fork lacks the D_{k+1} iteration k generated (an
        archive that kept the run but not that version): iteration k runs again in the same
        child run (marked KILLED here, reopened) and makes it. Sets `stopped` as iteration k decided."""
        found = self.tracker.find_child(self.parent, f"iteration-{k}") if self.parent else None
        if found is None or found[1] != "FINISHED" or ROW_FILE not in self.tracker.artifact_files(found[0], ""):
            return None
        run_id = found[0]
        row = IterationRow.model_validate(self.tracker.load_dict(run_id, ROW_FILE))
        stop = stop_reason(self.cfg, [*self.valid_scores(), row.valid[self.cfg.early_stop]])
        if stop is None and k + 1 not in self.store.versions(self.dataset):
            get_run_logger().warning("iteration %d: finished before (MLflow run %s), but dataset %r lacks the "
                                     "version %d it generated: run again", k, run_id, self.dataset, k + 1)
            # Its run is redone, not kept beside the new numbers: `start_iteration` reopens a
            # stopped child and everything, the row included, is logged again.
            self.tracker.end_run(run_id, "KILLED")
            return None
        logged = Logged(k, run_id, self.tracker.output_model(run_id, f"theta-{k}"), row)
        self.logged.append(logged)
        self.stopped = stop
        self.restored_seconds += sum(row.times.values())
        get_run_logger().info("iteration %d: finished before (MLflow run %s), read, not run again: valid %s %.4f, "
                              "test ndcg@10 %.4f", k, run_id, self.cfg.early_stop, row.valid[self.cfg.early_stop],
                              row.test["ndcg@10"])
        return logged

    def log_iteration(self, result: Iteration) -> Logged:
        """What iteration k produced, on the child run `start_iteration` opened: curves, θ_k (a
        logged model whose metrics name D_k), statistics, D_{k+1}, the row (ROW_FILE); and every
        metric and statistic on the parent at step k. Ends the child run."""
        child, done = self._child
        row = self._row(result)
        model_id = self._log_theta(child, result) if done else self._log_results(child, result, row)
        logged = Logged(result.k, child, model_id, row)
        self.logged.append(logged)
        get_run_logger().info("iteration %d: valid %s %.4f, test ndcg@10 %.4f", result.k, self.cfg.early_stop,
                              result.evaluation.valid[self.cfg.early_stop], result.evaluation.test["ndcg@10"])
        if result.tau is not None:
            get_run_logger().info("iteration %d: fidelity %s", result.k, result.tau.reason)
        if result.stop is not None:
            self.stopped = result.stop
            get_run_logger().info("%s", result.stop)
        return logged

    def champion(self) -> Logged:
        """The run's best θ by the validation metric of early stopping (cfg.early_stop), the
        first of equals, as the registry's rule (storage/tracking.champion_rule)."""
        metric = self.cfg.early_stop
        return max(self.logged, key=lambda item: (item.row.valid[metric], -item.k))

    def finish(self, best: Logged, plots: list[str], wall: float) -> RunSummary:
        """Register `best`, log D_K as the parent's output, the summary, the `plots` (files) and
        the run's totals; close the parent run. Returns the summary (`wall`: the flow's seconds;
        a resumed run's wall adds the step seconds of the iterations it read, `restored_seconds`,
        since the sittings that ran them logged no total: their overhead is not counted)."""
        cfg, tracker, parent, rows = self.cfg, self.tracker, self.parent, self.rows
        metric, last = cfg.early_stop, self.logged[-1].k
        model_name = f"rsir-{cfg.dataset}-{cfg.model.name}"
        version = champion_version = None
        if best.model_id is None:  # restored from an archive: its weights stayed in the other workspace
            get_run_logger().warning("the best θ, θ_%d, was trained in another workspace (restored from an archive, "
                                     "which keeps no models): not registered", best.k)
        else:
            registration = tracker.register_champion(model_name, best.run_id, best.model_id, tags={
                "rsir.iteration": best.k, "rsir.K": last, "rsir.dataset": self.dataset, "rsir.dataset_version": best.k,
                "rsir.dataset_digest": self.store.manifest(self.dataset, best.k).digest,
                "rsir.lineage": cfg.lineage_key()[:16], RUN_KEY_TAG: self.run_key,
                **{f"{split}_{name.replace('@', '_at_')}": f"{value:.6g}" for split in ("valid", "test")
                   for name, value in getattr(best.row, split).items()}}, metric=metric, base_digest=self.base)
            version, champion_version = registration.version, registration.champion
        self._log_version(parent, last, "output")  # D_K: the parent's lineage ends here
        wall += self.restored_seconds
        step_seconds = sum(sum(r.times.values()) for r in rows)
        champion = Champion(iteration=best.k, registered_model=model_name, version=version,
                            alias="champion", champion_version=champion_version, metric=metric,
                            valid=best.row.valid[metric], model_id=best.model_id,
                            model_url=tracker.model_url(best.model_id) if best.model_id else None)
        summary = RunSummary(dataset=cfg.dataset, run_dataset=self.dataset, model=cfg.model.name,
                             generator=cfg.generator_model.name, K=last, iterations=rows, champion=champion,
                             stopped=self.stopped,
                             mlflow_run_id=parent, tracking_uri=redact_uri(tracker.uri),
                             mlflow_url=tracker.run_url(parent), mlflow_path=tracker.run_path(parent),
                             wall_seconds=wall, step_seconds=step_seconds, restored_seconds=self.restored_seconds,
                             overhead_fraction=max(wall - step_seconds, 0.0) / wall if wall else 0.0)
        for path in plots:
            tracker.log_artifact(parent, path, "plots")
        tracker.log_dict(parent, summary.model_dump(mode="json"), "summary.json")
        # `best_valid_ndcg@10` keeps its name (and metric) for the charts and searches that use it.
        tracker.log_metrics(parent, {"overhead_fraction": summary.overhead_fraction, "wall_seconds": wall,
                                     "best_valid_ndcg@10": max(r.valid["ndcg@10"] for r in rows)})
        tracker.end_run(parent)
        return summary

    # ------------------------------------------------------------ what each call logs
    def _log_version(self, run_id: str, version: int, context: str) -> tuple[str, str]:
        """Log version `version` of the run's dataset as an input of `run_id` with the given
        context; its MLflow (name, digest)."""
        manifest = self.store.manifest(self.dataset, version)
        return self.tracker.log_dataset(run_id, self.dataset, version, manifest.digest,
                                        self.store.root + "/" + self.dataset, context, _profile(manifest.stats))

    def _log_theta(self, child: str, result: Iteration) -> str:
        """θ_k as an MLflow logged model, output of the iteration's run (one per run: a resumed
        iteration keeps the one it logged); its id."""
        k, student = result.k, result.student
        manifest = self.store.manifest(self.dataset, k)
        return self.tracker.log_model(child, f"theta-{k}", student.checkpoint, k, self.cfg.model.name,
                                      params=self.cfg.model.model_dump(mode="json"),
                                      tags={"rsir.iteration": str(k), "rsir.dataset": dataset_name(self.dataset, k),
                                            "rsir.dataset_digest": manifest.digest,
                                            "rsir.checkpoint": student.checkpoint},
                                      file_name=student.name or None)

    def _log_results(self, child: str, result: Iteration, row: IterationRow) -> str:
        """Everything of iteration k on its child run and its metrics on the parent at step k;
        ends the child run; returns θ_k's model id."""
        tracker, k, student, evaluation = self.tracker, result.k, result.student, result.evaluation
        manifest = self.store.manifest(self.dataset, k)
        for point in student.curve:
            tracker.log_metrics(child, {f"train/{key}": v for key, v in point.items() if key != "epoch"},
                                step=int(point["epoch"]))
        model_id = self._log_theta(child, result)
        scores = {**{f"valid/{key}": v for key, v in evaluation.valid.items()},
                  **{f"test/{key}": v for key, v in evaluation.test.items()}}
        tracker.log_metrics(child, scores, step=k, model_id=model_id,
                            dataset=(dataset_name(self.dataset, k), manifest.digest))
        rest = {**{f"data/{key}": v for key, v in manifest.stats.metrics().items()},
                **{f"time/{key}": v for key, v in result.times.items()},
                "train/epochs": student.epochs,
                "train/best_epoch": student.best_epoch,
                "train/synthetic_position_share": student.synthetic_position_share,
                "train/synthetic_weight_share": student.synthetic_weight_share}
        if result.next is not None:
            rest.update({f"generation/{key}": v for key, v in result.filtered.counts.model_dump().items()})
            if result.generation is not None:  # the sequences of D_k it generated from (max_sources)
                rest["generation/sources"] = result.generation.sources
        rest.update(_fidelity_metrics(result))
        tracker.log_metrics(child, rest, step=k)
        tracker.log_metrics(self.parent, {**scores, **rest}, step=k)  # the trend over k
        # The device θ_k trained on, resolved (the run's `device` parameter may say only "auto"):
        # its seconds are only comparable with runs on the same kind of device, and its weights
        # bit-identical only with θ trained on the same hardware (a reused θ's: where it trained).
        tracker.set_tags(child, {"rsir.device": student.device,
                                 **({"rsir.hardware": student.hardware} if student.hardware else {})})
        tracker.log_artifact(child, student.checkpoint, "checkpoint", name=student.name or None)
        tracker.log_artifact(child, evaluation.ranks_path, "ranks")  # per-user ranks: paired tests across runs
        if result.next is not None:
            self._log_version(child, result.next.version, "output")
            if result.generator.checkpoint != student.checkpoint:  # weak-to-strong
                tracker.log_artifact(child, result.generator.checkpoint, "generator_checkpoint",
                                     name=result.generator.name or None)
        tracker.log_dict(child, row.model_dump(mode="json"), ROW_FILE)  # last: a finished child has it
        tracker.end_run(child)
        return model_id

    def _row(self, result: Iteration) -> IterationRow:
        """Iteration k's row of the run's table (the summary's `iterations`)."""
        stats = self.store.manifest(self.dataset, result.k).stats
        counts = stats.filter_counts  # what the filter gave D_k (None for D_0)
        return IterationRow(
            iteration=result.k, version=result.k, sequences=stats.sequences,
            synthetic_sequences=stats.synthetic_sequences, interactions=stats.interactions, density=stats.density,
            item_entropy=stats.item_entropy, acceptance_rate=counts.acceptance_rate if counts else None,
            mean_new_length=counts.mean_accepted_length if counts else None,
            valid=result.evaluation.valid, test=result.evaluation.test, epochs=result.student.epochs,
            checkpoint=result.student.checkpoint, train_seconds=result.student.seconds_total,
            reused=result.student.reused, stats=stats, times=result.times,
            tau=result.tau.tau if result.tau else None,
            leakage_proxy=result.leakage.proxy if result.leakage else None)


def _fidelity_metrics(result: Iteration) -> dict[str, float]:
    """Adaptive fidelity at step k: `generation/tau` (τ_k), `generation/leakage_proxy` (measured
    at iteration k, tasks/leakage.py) with the items it ranked, and for the validation schedule
    each candidate's validation score (`generation/tau_valid_<τ>`)."""
    out: dict[str, float] = {}
    if result.leakage is not None:
        out.update({"generation/leakage_proxy": result.leakage.proxy,
                    "generation/leakage_ranked": result.leakage.ranked,
                    "generation/leakage_tau": result.leakage.tau})
    if result.tau is not None:
        out["generation/tau"] = result.tau.tau
        out.update({f"generation/tau_valid_{tau}": value for tau, value in result.tau.valid.items()})
    return out


def _profile(stats: VersionStats) -> dict[str, Any]:
    """The statistics MLflow shows as a dataset's profile (those the version records)."""
    return stats.model_dump(include={"sequences", "synthetic_sequences", "interactions", "density"})


# ---------------------------------------------------------------- the tables it reports
TABLE_METRICS = ("ndcg@10", "ndcg@20", "recall@10", "recall@20")


def table_rows(rows: list[IterationRow]) -> list[dict[str, Any]]:
    """The per-iteration table as people read it (the Prefect table artifact `rsir-iterations`,
    the summary's markdown, the CLI's table): one flat row per iteration, rounded; column name ->
    cell."""
    return [{"k": r.iteration, "sequences": r.sequences, "interactions": r.interactions,
             "density": round(r.density, 5), "entropy": round(r.item_entropy, 4),
             "acceptance": None if r.acceptance_rate is None else round(r.acceptance_rate, 4),
             "leakage": None if r.leakage_proxy is None else round(r.leakage_proxy, 4), "tau": r.tau,
             **{f"valid {m}": round(r.valid[m], 4) for m in TABLE_METRICS},
             **{f"test {m}": round(r.test[m], 4) for m in TABLE_METRICS}} for r in rows]


def champion_line(summary: RunSummary) -> str:
    """Which θ this run registered, and whether it took the champion alias."""
    c = summary.champion
    if c.version is None:
        return (f"iteration {c.iteration}, trained in another workspace (restored from an archive, which keeps no "
                f"models): not registered")
    registered = f"iteration {c.iteration} registered as {c.registered_model} v{c.version}"
    if summary.resubmitted:
        registered = f"identical to a finished run, nothing registered: its {registered}"
    if c.champion_version in (None, c.version):
        return f"{registered} @{c.alias}"
    # A summary logged before it recorded its metric was chosen on ndcg@10 (Champion.metric's default).
    return (f"{registered}; @{c.alias} stays on v{c.champion_version} (better or equal valid "
            f"{c.metric} on the same D_0)")


def summary_markdown(summary: RunSummary) -> str:
    """The run's Prefect markdown artifact (`rsir-summary`): the MLflow run's link (model-training
    view), the champion and the per-iteration table."""
    c = summary.champion
    if summary.mlflow_url:
        run = f"[{summary.mlflow_run_id}]({summary.mlflow_url})"
    else:  # a database, no server: the page's address under any server over it
        run = (f"`{summary.mlflow_run_id}` in `{summary.tracking_uri}`: start `rsir serve --only mlflow` "
               f"over this store and open `{summary.mlflow_path}` on its URL")
    model = f"[{c.model_id}]({c.model_url})" if c.model_url else f"`{c.model_id}`" if c.model_id else "none here"
    rows = table_rows(summary.iterations)
    cols = list(rows[0])
    lines = [f"## RSIR on {summary.dataset}: {summary.model}, K = {summary.K}", "",
             f"- **MLflow run**: {run}",
             f"- **Champion**: {champion_line(summary)} (θ_{c.iteration}: logged model {model})",
             f"- **Data**: the run's fork `{summary.run_dataset}`, versions 0..{summary.K}",
             *([f"- **Stopped**: {summary.stopped}"] if summary.stopped else []), "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join("" if r[col] is None else str(r[col]) for col in cols) + " |" for r in rows]
    return "\n".join(lines)
