"""Experiment suites: many RSIR configurations ("arms") run as `rsir` sub-flows, each tracked in
one MLflow experiment, and found again there (never from memory) by their labels.

    main         K = 0 vs RSIR K = 1..3 with and without fidelity control, SASRec, 2 datasets
    sensitivity  τ sweep at p = 0.5, then a p sweep at the best τ (chosen on validation), K = 1
    backbones    K = 0 vs K = 1 for CL4SRec and HSTU, and weak-to-strong (SASRec → HSTU)
    faithful     K = 0 vs K = 1 under three trainers (batch-weighted loss, position-weighted loss,
                 the authors' release recipe), then K = 3 with and without fidelity under the
                 trainer whose θ_0 validation prefers (issue 10)
    paper        the paper's own data (issue 22): a trainer grid on amazon-beauty validation (the
                 "strong" trainer), Table 1 (θ_0 and RSIR K = 1 under the release recipe and
                 under the strong trainer, four datasets), a control of Table 1's release-bce
                 gain (that θ_0 with early stopping's patience 100), Table 2 on amazon-sports (K = 3 with
                 and without fidelity under the trainer validation prefers, |D_0| generation
                 sources per iteration in both) and weak-to-strong
                 (SASRec → HSTU) on amazon-beauty; Beauty and Sports first
    tune         self-tuning RSIR (issue 26): per dataset an Optuna study of τ, p, m, λ and the
                 generation budget on validation (first seed), then on every seed K = 1 at the
                 study's best settings ("tuned"), K = 1 at the paper's fixed setting ("fixed") and
                 K auto with the leakage τ schedule ("adaptive"), each against θ_0

Re-running a suite skips every arm whose MLflow run finished (same lineage key, same K), and an
interrupted arm resumes inside the `rsir` flow from its committed versions and checkpoints; with an
archive, also in another workspace, from its finished iterations (tasks/archive.py).
Arms that share data and configuration share work: θ_0 is trained once per (dataset, seed,
backbone) through the content-addressed checkpoint store, and the τ sweep generates once per
seed at the largest τ and re-filters at every smaller one (equivalent by the fidelity trace).

A suite's knobs are ExperimentConfig's (tasks/experiment_config.py, with the suites' datasets and
the paper grid they name): the flow's parameters, the deployment's and `rsir experiment`'s options
derive from it.
"""

from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from prefect import flow, get_run_logger
from pydantic import BaseModel, Field

from core.config import with_parameters
from core.errors import RsirError
from core.workspace import Workspace
from flows.boundary import boundary, check_environment, naming_service
from flows.rsir import rsir
from reporting.results import best_on_validation, collect_runs, finished_lineages, study_outcome
from storage.dataset import dataset_store
from storage.tracking import Tracker, redact_uri, resolve_tracking_uri
from tasks.archive import archive_runs, archive_trials, archived_trials, has_archived_fork, restore_fork, restore_runs
from tasks.builtin import fetch_builtin_task
from tasks.config import RunConfig
from tasks.experiment_config import PAPER_GRID, ExperimentConfig, experiment_parameters
from tasks.tune import StudyOutcome, TuneConfig, export_trials, import_trials, study_ended, study_settled

# The trainers the faithful suite compares (issue 10): the loss as it was (each batch's mean, so
# short synthetic sequences in batches of their own weigh several times a real position), the
# position-faithful loss, and that loss under the authors' release recipe.
TRAINERS: dict[str, dict[str, Any]] = {
    "batch-weighted": {"weighting": "batch"},
    "position-weighted": {"weighting": "position"},
    "release": {"recipe": "release", "weighting": "position"},
}
# The paper suite (issue 22). Its datasets have roles: the grid and weak-to-strong run on the first
# (Beauty), Table 2 on the second (Sports, as the paper's), and the two complete first.
PAPER_GRID_DATASET, PAPER_TABLE2_DATASET = "amazon-beauty", "amazon-sports"
# Table 1's baselines besides the strong trainer. `release`: the authors' release as shipped
# (sampled softmax over 256 negatives). `release-bce`: the same with SASRec's original loss (BCE,
# one uniform negative), the default of the team's earlier framework (USTC-StarTeam/DR4SR) and the
# loss of both SASRec checkpoints it published; the team's Beauty checkpoint scores Recall@10 0.060
# under the release's evaluation, near the paper's 0.0557, where the sampled softmax gives 0.085
# (issue 22's note): the likeliest recipe behind the paper's baseline numbers.
PAPER_RELEASE_TRAINERS: dict[str, dict[str, Any]] = {
    "release": {"recipe": "release"},
    "release-bce": {"recipe": "release", "model_params": {"loss": "bce"}},
}
# Table 2 iterates under whichever of these validation prefers (the release as shipped or ours).
PAPER_TABLE2_TRAINERS = ("release", "strong")
# The control of Table 1's release-bce gain (issue 22's note: Beauty's θ_1 trained 160 epochs, its
# θ_0 84): θ_0 again with early stopping's patience 100 instead of the recipe's 20, so it trains at
# least its best epoch + 100 epochs, more than θ_1 took. θ_1 beating this θ_0 too rules out the
# longer training as the source of the gain.
PAPER_CONTROL_TRAINER, PAPER_CONTROL_PATIENCE = "release-bce", 100
class StageNotReady(RsirError):
    """A stage chooses on validation results that are not all finished yet (another shard's arms)."""


class Arm(BaseModel):
    """One RSIR configuration of a suite: `rsir` flow parameters plus the labels that find it."""

    arm: str
    dataset: str
    seed: int
    params: dict[str, Any]
    labels: dict[str, str] = Field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.dataset}/{self.arm}/seed{self.seed}"


class Study(BaseModel):
    """A tuning study a suite runs before the arms that use its outcome (the tune suite): the
    `rsir tune` flow's parameters (tasks/tune.py TuneConfig) but its trial count, and its budget."""

    dataset: str
    params: dict[str, Any]
    budget: int

    @property
    def id(self) -> str:
        return f"{self.dataset}/study"

    @property
    def name(self) -> str:
        return self.params["study"]


def _arm(cfg: ExperimentConfig, name: str, dataset: str, seed: int, labels: dict[str, str] | None = None,
         model: str = "sasrec", generator: str | None = None, model_params: dict[str, Any] | None = None,
         **params: Any) -> Arm:
    """An arm; `model_params` are laid over the suite's settings of the student backbone."""
    student = {**cfg.model(model), **(model_params or {})}
    base = dict(dataset=dataset, seed=seed, model=model, model_params=student, tau=cfg.tau, p=cfg.p,
                m=cfg.m, max_sources=cfg.max_sources,
                **{k: v for k, v in dict(epochs=cfg.epochs, patience=cfg.patience).items() if v is not None})
    if generator is not None:
        base.update(generator=generator, generator_params=cfg.model(generator))
    all_labels = {"suite": cfg.suite, "arm": name, "dataset": dataset, "seed": str(seed), **(labels or {})}
    return Arm(arm=name, dataset=dataset, seed=seed, params={**base, **params}, labels=all_labels)


# ------------------------------------------------------------------ suites
@dataclass(frozen=True)
class Finished:
    """What a stage chooses from, read from the suite's tracker before the stage: the finished
    arms' rows (reporting/results.py collect_runs: one per arm and iteration) and, by name, the
    outcome of a study (the tune suite's), from the tracker the suite already holds."""

    rows: list[dict[str, Any]]
    tracker: Tracker

    def study(self, name: str) -> StudyOutcome | None:
        return study_outcome(self.tracker, name)


# A suite is a list of stages; a stage sees what has finished so far and returns arms. Only the
# sensitivity suite needs two: its p sweep runs at the τ chosen on validation. A stage may also
# return studies (the tune suite), run before any arm.
Stage = Callable[[ExperimentConfig, Finished], list[Arm] | list[Study]]


def main_arms(cfg: ExperimentConfig, _: Finished) -> list[Arm]:
    # K = 0 is iteration 0 of every arm (the same θ_0, trained once); K = j is iteration j.
    return [a for ds in cfg.suite_datasets() for s in cfg.seeds for a in (
        _arm(cfg, "fidelity", ds, s, K=cfg.K, fidelity=True),
        _arm(cfg, "no-fidelity", ds, s, K=cfg.K, fidelity=False))]


def tau_arms(cfg: ExperimentConfig, _: Finished) -> list[Arm]:
    top = max(cfg.taus)
    return [_arm(cfg, f"tau={t}", ds, s, {"sweep": "tau", "tau": str(t), "p": str(cfg.p)}, K=1, tau=t,
                 generation_tau=top) for ds in cfg.suite_datasets() for s in cfg.seeds for t in cfg.taus]


def p_arms(cfg: ExperimentConfig, done: Finished) -> list[Arm]:
    arms = []
    for ds in cfg.suite_datasets():
        t = int(best_on_validation(done.rows, ds, "tau"))
        arms += [_arm(cfg, f"p={p:g}", ds, s, {"sweep": "p", "tau": str(t), "p": f"{p:g}"}, K=1, tau=t, p=p)
                 for s in cfg.seeds for p in cfg.ps]
    return arms


def backbone_arms(cfg: ExperimentConfig, _: Finished) -> list[Arm]:
    return [a for ds in cfg.suite_datasets() for s in cfg.seeds for a in (
        _arm(cfg, "cl4srec", ds, s, {"student": "cl4srec", "generator": "cl4srec"}, model="cl4srec", K=1),
        _arm(cfg, "hstu", ds, s, {"student": "hstu", "generator": "hstu"}, model="hstu", K=1),
        _arm(cfg, "sasrec-to-hstu", ds, s, {"student": "hstu", "generator": "sasrec"}, model="hstu",
             generator="sasrec", K=1))]


def trainer_arms(cfg: ExperimentConfig, _: Finished) -> list[Arm]:
    return [_arm(cfg, f"trainer={name}", ds, s, {"stage": "trainer", "trainer": name}, K=1, **params)
            for ds in cfg.suite_datasets() for s in cfg.seeds for name, params in TRAINERS.items()]


def long_run_arms(cfg: ExperimentConfig, done: Finished) -> list[Arm]:
    """K = 3 with and without fidelity under the trainer with the best mean validation NDCG@10 of
    θ_0 (the model trained on real data only: the choice does not look at RSIR's effect)."""
    arms = []
    for ds in cfg.suite_datasets():
        name = best_on_validation([r for r in done.rows if r.get("stage") == "trainer"], ds, "trainer", k=0)
        arms += [_arm(cfg, f"{name}/{'fidelity' if fid else 'no-fidelity'}", ds, s,
                      {"stage": "long", "trainer": name, "fidelity": str(fid)}, K=cfg.K, fidelity=fid,
                      **TRAINERS[name])
                 for s in cfg.seeds for fid in (True, False)]
    return arms


def _paper_datasets(cfg: ExperimentConfig, first: bool) -> list[str]:
    """The suite's datasets that complete first (the grid's and Table 2's), or the others."""
    lead = (PAPER_GRID_DATASET, PAPER_TABLE2_DATASET)
    return [ds for ds in cfg.suite_datasets() if (ds in lead) == first]


def arms_named(head: str) -> Callable[[Stage], Stage]:
    """Declares the first part of every arm name a stage lists (`table2` of table2/strong/fidelity),
    so that while the stage waits (StageNotReady) a suite can tell whether `--arm` could select
    its arms at all; a stage without it is taken to be selectable."""
    def mark(stage: Stage) -> Stage:
        stage.arm_head = head  # type: ignore[attr-defined]
        return stage
    return mark


@arms_named("grid")
def grid_arms(cfg: ExperimentConfig, _: Finished) -> list[Arm]:
    """θ_0 only (K = 0) of every grid trainer, on the grid dataset, first seed."""
    if PAPER_GRID_DATASET not in cfg.suite_datasets():
        return []
    return [_arm(cfg, f"grid/{name}", PAPER_GRID_DATASET, cfg.seeds[0], {"stage": "grid", "trainer": name}, K=0,
                 **PAPER_GRID[name]) for name in cfg.grid]


def _grid_winners(cfg: ExperimentConfig, rows: list[dict[str, Any]]) -> list[str]:
    """The grid entries whose θ_0 beat the reference (the first entry) on validation NDCG@10."""
    grid = {r["trainer"]: r["valid/ndcg@10"] for r in rows
            if r.get("stage") == "grid" and r["dataset"] == PAPER_GRID_DATASET and r["k"] == 0}
    missing = [n for n in cfg.grid if n not in grid]
    if missing:
        raise StageNotReady(f"the paper suite's trainer grid on {PAPER_GRID_DATASET} has not finished {missing}: run "
                        f"`rsir experiment paper --dataset {PAPER_GRID_DATASET}` first (it chooses the strong trainer)")
    return [n for n in cfg.grid[1:] if grid[n] > grid[cfg.grid[0]]]


def _merged(names: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in names:
        for key, value in PAPER_GRID[name].items():
            out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) else value
    return out


@arms_named("grid")
def combined_arms(cfg: ExperimentConfig, done: Finished) -> list[Arm]:
    """The grid's winners together, when more than one factor won alone."""
    if PAPER_GRID_DATASET not in cfg.suite_datasets():
        return []
    winners = _grid_winners(cfg, done.rows)
    if len(winners) < 2:
        return []
    return [_arm(cfg, "grid/combined", PAPER_GRID_DATASET, cfg.seeds[0],
                 {"stage": "grid", "trainer": "combined", "combines": "+".join(winners)}, K=0, **_merged(winners))]


def strong_trainer(cfg: ExperimentConfig, rows: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """(name, run parameters) of the grid's best θ_0 on validation NDCG@10, the combination included."""
    winners = _grid_winners(cfg, rows)
    if len(winners) >= 2:
        _require_finished(rows, PAPER_GRID_DATASET, "grid", {("combined", cfg.seeds[0])},
                          f"--dataset {PAPER_GRID_DATASET}")
    name = best_on_validation([r for r in rows if r.get("stage") == "grid"], PAPER_GRID_DATASET, "trainer", k=0)
    return name, _merged(winners) if name == "combined" else PAPER_GRID[name]


def _require_finished(rows: list[dict[str, Any]], dataset: str, stage: str, wanted: set[tuple[str, int]],
                      command: str) -> None:
    """A choice made on validation reads every (trainer, seed) θ_0 it compares, never a subset."""
    have = {(r["trainer"], int(r["seed"])) for r in rows
            if r.get("stage") == stage and r["dataset"] == dataset and r["k"] == 0}
    missing = sorted(wanted - have)
    if missing:
        raise StageNotReady(f"the paper suite's {stage} stage on {dataset} has not finished {missing} (trainer, seed): "
                        f"run `rsir experiment paper {command}` (again) once they have")


def _paper_trainers(cfg: ExperimentConfig, rows: list[dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], str]:
    """(Table 1's trainers: PAPER_RELEASE_TRAINERS then 'strong' → parameters, the strong trainer's grid name)."""
    name, params = strong_trainer(cfg, rows)
    return {**PAPER_RELEASE_TRAINERS, "strong": params}, name


@arms_named("table1")
def table1_arms(cfg: ExperimentConfig, done: Finished, first: bool = True) -> list[Arm]:
    """θ_0 and RSIR K = 1 under the release recipe and under the strong trainer."""
    datasets = _paper_datasets(cfg, first)
    if not datasets:
        return []
    trainers, strong = _paper_trainers(cfg, done.rows)
    return [_arm(cfg, f"table1/{name}", ds, s, {"stage": "table1", "trainer": name, "strong": strong}, K=1,
                 **params) for ds in datasets for s in cfg.seeds for name, params in trainers.items()]


@arms_named("control")
def control_arms(cfg: ExperimentConfig, _: Finished) -> list[Arm]:
    """θ_0 of the control trainer with a longer patience, on the datasets that complete first."""
    params = PAPER_RELEASE_TRAINERS[PAPER_CONTROL_TRAINER]
    return [_arm(cfg, f"control/{PAPER_CONTROL_TRAINER}-patience{PAPER_CONTROL_PATIENCE}", ds, s,
                 {"stage": "control", "trainer": PAPER_CONTROL_TRAINER}, K=0, patience=PAPER_CONTROL_PATIENCE,
                 **params) for ds in _paper_datasets(cfg, True) for s in cfg.seeds]


@arms_named("table2")
def table2_arms(cfg: ExperimentConfig, done: Finished) -> list[Arm]:
    """K iterations with and without fidelity on the Table 2 dataset, under the Table 1 trainer with
    the best mean validation NDCG@10 of θ_0 there (its K = 1 arm is the prefix of the fidelity arm)."""
    if PAPER_TABLE2_DATASET not in cfg.suite_datasets():
        return []
    trainers, strong = _paper_trainers(cfg, done.rows)
    trainers = {t: trainers[t] for t in PAPER_TABLE2_TRAINERS}
    _require_finished(done.rows, PAPER_TABLE2_DATASET, "table1", {(t, s) for t in trainers for s in cfg.seeds},
                      f"--dataset {PAPER_TABLE2_DATASET}")
    stage1 = [r for r in done.rows if r.get("stage") == "table1" and r["trainer"] in trainers]
    name = best_on_validation(stage1, PAPER_TABLE2_DATASET, "trainer", k=0)
    sources = cfg.max_sources or _d0_sequences(stage1, PAPER_TABLE2_DATASET)
    return [_arm(cfg, f"table2/{name}/{'fidelity' if fid else 'no-fidelity'}", PAPER_TABLE2_DATASET, s,
                 {"stage": "table2", "trainer": name, "strong": strong, "fidelity": str(fid),
                  "sources": str(sources)}, K=cfg.K,
                 fidelity=fid, max_sources=sources, **trainers[name]) for s in cfg.seeds for fid in (True, False)]


def _d0_sequences(rows: list[dict[str, Any]], dataset: str) -> int:
    """Table 2's generation budget: as many sources per iteration as D_0 has training sequences
    (one per real user), drawn from D_k's sequences (tasks/generate.py sample_sources), the same
    for both arms. Issue 22 asks for the same sources per iteration in every arm; generating from
    every sequence of D_k instead lets the arm without fidelity feed on its own growth (on Sports
    its D_1 is 7 times D_0, so its 2nd iteration would generate from 5 times the other arm's
    sources). At k = 0 the budget is every sequence, so the fidelity arm's θ_1 is Table 1's."""
    found = {int(r["data/sequences"]) for r in rows
             if r["dataset"] == dataset and r["k"] == 0 and r.get("data/sequences") is not None}
    if len(found) != 1:  # every θ_0 of a dataset trains on the same D_0
        raise RsirError(f"the paper suite's Table 2 budget: {dataset}'s finished Table 1 arms disagree on the "
                        f"number of training sequences of D_0 ({sorted(found)}); was the dataset replaced?")
    return found.pop()


@arms_named("sasrec-to-hstu")
def weak_to_strong_arms(cfg: ExperimentConfig, done: Finished) -> list[Arm]:
    """HSTU trained on data that SASRec (under the strong trainer) generated, against HSTU's θ_0."""
    if PAPER_GRID_DATASET not in cfg.suite_datasets():
        return []
    trainers, strong = _paper_trainers(cfg, done.rows)
    settings = {k: v for k, v in trainers["strong"].items() if k != "model_params"}
    sasrec = {**cfg.model("sasrec"), **trainers["strong"].get("model_params", {})}
    arms = [_arm(cfg, "sasrec-to-hstu", PAPER_GRID_DATASET, s, {"stage": "weak-to-strong", "strong": strong},
                 model="hstu", generator="sasrec", K=1, **settings) for s in cfg.seeds]
    for arm in arms:
        arm.params["generator_params"] = sasrec
    return arms


# ------------------------------------------------------------------ the tune suite (issue 26)
def _study_name(cfg: ExperimentConfig, dataset: str) -> str:
    return f"{cfg.experiment_name}-{dataset}"


def study_stage(cfg: ExperimentConfig, _: Finished) -> list[Study]:
    """One study per dataset on the first seed (validation only), its trials' runs in the suite's
    MLflow experiment (they carry no arm label: the tables never read them)."""
    run_params = {"model_params": cfg.model("sasrec"), "device": cfg.device, "experiment": cfg.experiment_name,
                  **({"tracking_uri": cfg.tracking_uri} if cfg.tracking_uri else {}),
                  **{k: v for k, v in dict(epochs=cfg.epochs, patience=cfg.patience).items() if v is not None}}
    return [Study(dataset=ds, budget=cfg.trials, params={
        "dataset": ds, "model": "sasrec", "seeds": [cfg.seeds[0]], "study": _study_name(cfg, ds), "sampler_seed": 0,
        "startup_trials": min(5, max(1, cfg.trials // 2)), "run_params": run_params})
        for ds in cfg.suite_datasets()]


def tune_arms(cfg: ExperimentConfig, done: Finished) -> list[Arm]:
    """On every seed: K = 1 at the paper's setting, K = 1 at the study's best settings, and K auto
    (up to K iterations) from the paper's setting with τ_k chosen by the leakage rule
    (tasks/tau_schedule.py); θ_0 is iteration 0 of each (trained once).
    The tuned arm generates at its own τ (the study's runs generate at the range's largest): its
    lineage is not a trial's, so it runs, and reports, as an arm of the suite."""
    arms = []
    for ds in cfg.suite_datasets():
        outcome = done.study(_study_name(cfg, ds))
        if outcome is None or outcome.ended < cfg.trials:
            raise StageNotReady(f"the tune suite's study on {ds} has not finished its {cfg.trials} trials: run "
                                f"`rsir experiment tune` (again)")
        for s in cfg.seeds:
            # τ, p and m are the suite's (cfg.tau, cfg.p, cfg.m: the paper's 10, 0.5 and 5 by default).
            arms.append(_arm(cfg, "fixed", ds, s, {"stage": "fixed"}, K=1))
            if outcome.best_trial is not None:
                # Labels enter the run key, so they hold no run id: a restored archive gives runs
                # new ids, and a cut arm must find its stopped run again in another workspace.
                arms.append(_arm(cfg, "tuned", ds, s, {"stage": "tuned", "study": outcome.study,
                                                       "trial": str(outcome.best_trial)},
                                 K=1, **outcome.best_settings))
            arms.append(_arm(cfg, "adaptive", ds, s, {"stage": "adaptive"}, K="auto", k_max=cfg.K,
                             tau_schedule="leakage"))
    return arms


@arms_named("table1")
def table1_rest_arms(cfg: ExperimentConfig, done: Finished) -> list[Arm]:
    """Table 1 on the datasets that complete last (Toys, Yelp): after every other stage."""
    return table1_arms(cfg, done, first=False)


SUITES: dict[str, list[Stage]] = {"main": [main_arms], "sensitivity": [tau_arms, p_arms], "backbones": [backbone_arms],
                                  "faithful": [trainer_arms, long_run_arms],
                                  "paper": [grid_arms, combined_arms, table1_arms, control_arms, table2_arms, weak_to_strong_arms,
                                            table1_rest_arms],
                                  "tune": [study_stage, tune_arms]}


# ------------------------------------------------------------------ the flow
def _experiment(**params: Any) -> dict[str, Any]:
    """Run every arm of a suite that has not finished yet; return what ran and what was skipped.

    The parameters are ExperimentConfig's (tasks/experiment_config.py), flat; None means the
    config's default, and `smoke` trims the suite (`smoke_config`)."""
    with boundary():  # a fault the user can fix: the flow run fails with its one line
        return run_suite(ExperimentConfig.from_parameters(params))


# The flow's signature (what Prefect shows, validates and deploys) is derived from ExperimentConfig.
experiment = flow(name="rsir-experiment", flow_run_name="experiment-{suite}", log_prints=True)(
    with_parameters(_experiment, experiment_parameters()))


def run_suite(cfg: ExperimentConfig) -> dict[str, Any]:
    logger = get_run_logger()
    started = time.perf_counter()
    ws = Workspace.at(cfg.home)
    check_environment(ws, cfg.tracking_uri)
    uri = resolve_tracking_uri(cfg.tracking_uri, ws.mlflow_db)
    naming_service(f"MLflow tracking store {redact_uri(uri)}")
    tracker = Tracker.open(uri, cfg.experiment_name, ws.mlartifacts)
    tracker.tag_experiment("rsir.suite", cfg.suite)
    store = dataset_store(ws)
    if cfg.archive:
        restored = restore_runs(tracker, Path(cfg.archive))
        logger.info("restored %d finished runs from %s", len(restored), cfg.archive)
    ran, skipped, pending = [], [], []
    names: set[str] = set()  # every arm name the stages listed, to check --arm against
    for stage in SUITES[cfg.suite]:
        try:
            # --arm selects by name before --shard splits, so N shards share what was selected.
            listed = stage(cfg, Finished(collect_runs(tracker), tracker))
            names.update(item.arm for item in listed if isinstance(item, Arm))
            studies, arms = this_shard(cfg, listed)
        except StageNotReady as waiting:  # another shard (or invocation) has not finished what it reads
            logger.warning("%s", waiting)
            if cfg.may_select(getattr(stage, "arm_head", None)):  # else not what this invocation asked for
                pending.append(str(waiting))
            continue
        for study in studies:
            (ran if _run_study(cfg, tracker, ws, study) else skipped).append(study.id)
        done = finished_lineages(tracker)
        # Validate every arm's configuration before the first one computes anything.
        planned = []
        for arm in arms:
            params = {**arm.params, "device": cfg.device, "threads": cfg.threads, "home": ws.home,
                      "tracking_uri": uri, "experiment": cfg.experiment_name, "labels": arm.labels}
            planned.append((arm, params, RunConfig.from_parameters(params)))
        for arm, params, run_cfg in planned:
            if (run_cfg.lineage_key()[:16], str(run_cfg.K)) in done:
                skipped.append(arm.id)
                continue
            logger.info("arm %s", arm.id)
            if cfg.archive and has_archived_fork(Path(cfg.archive), run_cfg.run_dataset):
                # An arm stopped in another workspace: its versions here, then its run reads the
                # iterations that finished (restored above) and continues.
                fetch_builtin_task(run_cfg.dataset, ws.home)
                versions = restore_fork(store, Path(cfg.archive), run_cfg.dataset, run_cfg.run_dataset)
                logger.info("arm %s: versions %s of %s restored from %s", arm.id, versions, run_cfg.run_dataset,
                            cfg.archive)
            try:
                rsir.with_options(flow_run_name=f"{cfg.suite}-{arm.id.replace('/', '-')}")(**params)
            finally:  # at once, also when stopped: the next sitting may start from another workspace
                if cfg.archive:
                    archive_runs(tracker, Path(cfg.archive), store)
            ran.append(arm.id)
    wall = time.perf_counter() - started
    suite_run = tracker.start_run(f"suite-{cfg.suite}", {"rsir.suite_run": "1", "rsir.smoke": str(cfg.smoke),
                                                         "rsir.code_version": code_version()})
    tracker.log_params(suite_run, cfg.model_dump(mode="json", exclude={"home", "tracking_uri"}))
    tracker.log_metrics(suite_run, {"wall_seconds": wall, "arms_run": len(ran), "arms_skipped": len(skipped)})
    tracker.end_run(suite_run)
    if cfg.archive:
        archive_runs(tracker, Path(cfg.archive), store)
    if pending and not ran:
        raise StageNotReady(pending[0])
    unmatched = [p for p in cfg.arms or [] if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched and ran:
        logger.warning("--arm %s matched no arm of the %s suite", ", ".join(unmatched), cfg.suite)
    if unmatched and not ran:
        raise RsirError(f"--arm {unmatched[0]} matches no arm of the {cfg.suite} suite on these datasets "
                        f"(its arms: {', '.join(sorted(names)) or 'none'})")
    return {"suite": cfg.suite, "pending": pending, "experiment": cfg.experiment_name, "tracking_uri": redact_uri(uri), "ran": ran,
            "skipped": skipped, "wall_seconds": wall}


def this_shard(cfg: ExperimentConfig, listed: list[Arm] | list[Study]) -> tuple[list[Study], list[Arm]]:
    """What this invocation runs of a stage's list: every study (the shards are workers of each
    study and share its budget: `_run_study` caps it), and the arms `--arm` selects, split by
    `--shard` (every shard lists the same arms in the same order)."""
    studies = [item for item in listed if isinstance(item, Study)]
    selected = [item for item in listed if isinstance(item, Arm) and cfg.selects(item.arm)]
    return studies, [arm for i, arm in enumerate(selected) if cfg.in_shard(i)]


def _run_study(cfg: ExperimentConfig, tracker: Tracker, ws: Workspace, study: Study) -> bool:
    """Add the trials a study lacks to its budget (the `rsir tune` flow, one worker); False when
    it had them all. Its configuration is checked before any trial. With an archive, a study
    that another workspace began is first made from its archived trials (`import_trials`), and
    the study's trials and their runs are archived when this worker stops, also by an
    interrupt: the next sitting resumes it (tasks/archive.py)."""
    outcome = study_outcome(tracker, study.name)
    if outcome is not None and outcome.ended >= study.budget:  # before any Optuna storage is made
        return False
    from flows.tune import tune

    tune_cfg = TuneConfig.from_parameters({**study.params, "trials": study.budget, "threads": cfg.threads,
                                           "home": ws.home})
    url, folder = tune_cfg.storage_url(ws.root), Path(cfg.archive) if cfg.archive else None
    if folder is not None:
        added = import_trials(tune_cfg, url, archived_trials(folder, study.name))
        if added:
            get_run_logger().info("study %s: %d trials restored from %s", study.name, added, folder)
    # The budget counts ended trials (interrupted ones are replaced), from the Optuna storage or,
    # for a study archived before its trials were (its storage lost), from its MLflow run.
    missing = study.budget - max(study_ended(tune_cfg, url), outcome.ended if outcome else 0)
    if missing <= 0:
        return False
    # Shards run one study at once as its workers and share its budget: Optuna's count of the
    # study's trials (running and interrupted ones too) may reach its settled trials plus the
    # missing ones.
    params = {**study.params, "trials": missing, "threads": cfg.threads, "home": ws.home,
              "study_trials": study_settled(tune_cfg, url) + missing}
    get_run_logger().info("study %s: %d of %d trials to run", study.name, missing, study.budget)
    try:
        tune.with_options(flow_run_name=f"{cfg.suite}-{study.id.replace('/', '-')}")(**params)
    finally:  # an interrupt too: what ended is kept
        if folder is not None:
            archive_trials(folder, study.name, export_trials(tune_cfg, url))
            archive_runs(tracker, folder, dataset_store(ws))
    return True


def code_version() -> str:
    """The git commit of this code (with '+dirty' for uncommitted changes), or 'unknown'."""
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")
