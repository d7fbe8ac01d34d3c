"""`rsir tune`'s search, apart from the runs it scores: the typed study config (every range
declared once, here), the settings a trial draws, the Optuna study (TPE sampler, median pruner,
RDB storage: SQLite in the workspace or PostgreSQL, so several workers add trials to one study),
the pruner's epoch reports and the study's outcome. The flow (flows/tune.py) runs each trial as
`rsir` runs at K = 1, one per seed, scored on the validation NDCG@10 of θ_1 (never test).

Ranges (defaults, chosen from the paper's settings and our sweeps, docs/results/sensitivity):

    tau               1..100 log     fidelity rank threshold τ (integers; the paper's grid 1..100)
    p                 0..1 step 0.25 probability of the local pool (the sensitivity suite's grid)
    m                 1..10          rollouts per source sequence (the paper uses m <= 10)
    synthetic_weight  0.1..1 log     λ: a synthetic target position weighs λ times a real one; 1 is
                                     the paper's, and at 1 every fixed setting we measured lowered
                                     test NDCG@10 (issue 26), so the search looks below it
    source_share      0.25..1 step 0.25  the generation budget: max_sources = share × D_0's
                                     sequences, rounded; 1 = every sequence (the paper)

p and the budget move in steps so that trials agree on them often: trials that agree on p, m and
the budget share one generation (every trial generates at the range's largest τ and filters at its
own, equivalent by the fidelity trace), and every trial shares θ_0 (content-addressed checkpoints).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import zlib
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.config import ConfigError, Parameter, Seed, bare, parse_config
from core.errors import RsirError
from core.hashing import json_digest
from models.config import ModelConfig
from storage.manifest import Record
from tasks.config import CpuThreads, RunConfig, TrainConfig

if TYPE_CHECKING:  # tasks.runlog imports Prefect, which `rsir tune`'s options must not
    from tasks.runlog import IterationRow, RunSummary

# The run settings a study searches, and those that are integers.
TUNED = ("tau", "p", "m", "synthetic_weight", "source_share")
_INTEGER = {"tau", "m"}
# What the study sets in every trial's run itself: given in run_params they would be overridden.
_SET_BY_STUDY = {*TUNED, "max_sources", "generation_tau", "K", "seed", "labels", "dataset", "model", "home",
                 "threads", "progress", "fidelity"}
METRIC = "ndcg@10"  # the objective: validation NDCG@10 of θ_1 (mean over the seeds)
# MLflow tags of a study's run (STUDY_TAG) and of its trials' runs (all four; flows/tune.py).
STUDY_TAG, TRIAL_TAG, SEED_TAG, STATE_TAG = "rsir.tune_study", "rsir.tune_trial", "rsir.tune_seed", "rsir.tune_state"
# A trial's user attribute: stopped by an interrupt (Ctrl-C, SIGTERM, a deadline), not by its own
# fault. Optuna records it FAIL; it counts as no ended trial, so a resumed study runs another.
INTERRUPTED_ATTR = "interrupted"
# A study's user attribute: made by `import_trials` from an archive, so no creating worker will
# make its MLflow run (a joining worker need not wait for one).
IMPORTED_ATTR = "imported_trials"
_RANGE_TEXT = re.compile(r"^\s*(?P<low>[^\s]+?)(?:\s*\.\.\s*(?P<high>[^\s]+))?"
                         r"(?:\s+(?P<log>log)|\s+step\s+(?P<step>[^\s]+))?\s*$")


class Range(BaseModel):
    """A setting's search range [low, high], drawn on a log scale or in steps of `step`; low ==
    high fixes the setting. Written `LOW..HIGH`, `LOW..HIGH log`, `LOW..HIGH step S` or `VALUE`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    low: float = Field(allow_inf_nan=False)
    high: float = Field(allow_inf_nan=False)
    log: bool = False
    step: float | None = Field(None, gt=0, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _text(cls, data: Any) -> Any:
        if isinstance(data, (int, float)) and not isinstance(data, bool):  # one value: the setting fixed
            return {"low": data, "high": data}
        if not isinstance(data, str):
            return data
        found = _RANGE_TEXT.match(data)
        if found is None:
            raise ValueError(f"{data!r} is not a range: write LOW..HIGH, LOW..HIGH log, LOW..HIGH step S or VALUE")
        low = found["low"]
        return {"low": low, "high": found["high"] or low, "log": bool(found["log"]), "step": found["step"]}

    @model_validator(mode="after")
    def _consistent(self) -> "Range":
        if self.low > self.high:
            raise ValueError(f"range {self}: low is above high")
        if self.log and self.step is not None:
            raise ValueError(f"range {self}: log and step exclude each other")
        if self.log and self.low <= 0:
            raise ValueError(f"range {self}: a log range needs low > 0")
        if self.step is not None and not _whole((self.high - self.low) / self.step):
            raise ValueError(f"range {self}: high - low is not a multiple of the step")
        return self

    def __str__(self) -> str:
        text = f"{self.low:g}..{self.high:g}"
        return text + (" log" if self.log else f" step {self.step:g}" if self.step else "")


def _whole(x: float) -> bool:
    return abs(x - round(x)) < 1e-9


@dataclass(frozen=True)
class TrialSettings:
    """What one trial runs with (its draw from the ranges)."""

    tau: int
    p: float
    m: int
    synthetic_weight: float
    source_share: float

    def max_sources(self, sequences: int) -> int | None:
        """The generation budget for D_0 with `sequences` training sequences (None: all)."""
        return None if self.source_share >= 1 else max(1, round(self.source_share * sequences))


def _range(default: str, description: str) -> Any:
    return Field(Range.model_validate(default), description=f"{description} (default {default})")


class TuneConfig(CpuThreads):
    """One worker of a study: what it searches (the ranges), with what (the run settings every
    trial shares), where the study lives, and how many trials this worker adds."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field("ml-100k", description="dataset name (built-ins are fetched when missing)")
    model: str = Field(ModelConfig.model_fields["name"].default, description="student backbone (and generator)")
    seeds: list[Seed] = Field([0], min_length=1, max_length=100, description="seeds of every trial: one rsir run "
                              "per seed, the objective is their mean validation NDCG@10 of θ_1")
    trials: int = Field(20, ge=1, le=100_000, description="trials this worker runs (workers of one study add theirs)")
    study_trials: int | None = Field(None, ge=1, le=100_000, description="and no trial once the study holds this "
                                     "many, every worker's counted, running ones too (Optuna's MaxTrialsCallback): "
                                     "several workers share one budget; default: no cap")
    storage: str | None = Field(None, description="Optuna storage: sqlite:////ABSOLUTE/PATH or "
                                "postgresql://USER@HOST:PORT/DB (default: SQLite WORKSPACE/optuna.db)")
    study: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$",
                              description="study name (default: rsir-tune-DATASET-BACKBONE-seedsS1-S2...)")
    tau: Range = _range("1..100 log", "range of τ, the fidelity rank threshold (integers)")
    p: Range = _range("0..1 step 0.25", "range of p, the probability of the local pool")
    m: Range = _range("1..10", "range of m, rollouts per source sequence (integers)")
    synthetic_weight: Range = _range("0.1..1 log", "range of λ, the weight of a synthetic target position")
    source_share: Range = _range("0.25..1 step 0.25", "range of the generation budget: max_sources = share "
                                 "x D_0's sequences (1 = all, the paper)")
    prune: bool = Field(True, description="stop a trial's θ_1 training when its validation NDCG@10 at an epoch "
                        "is below the median of earlier trials' at that epoch (Optuna's MedianPruner)")
    startup_trials: int = Field(5, ge=0, le=1000, description="trials drawn at random before TPE models the "
                                "results, and completed before the pruner stops any")
    warmup_epochs: int = Field(2, ge=0, le=100_000, description="the first epoch of θ_1 at which the pruner "
                               "may stop it (Optuna's n_warmup_steps: earlier epochs are never judged)")
    sampler_seed: int | None = Field(None, ge=0, le=2 ** 32 - 1, description="TPE sampler's seed (default: "
                                     "random) of the worker that creates the study; a joining worker's is "
                                     "derived from it and its host:pid, so workers never draw alike")
    heartbeat_seconds: int = Field(60, ge=1, le=3600, description="seconds between a running trial's beats in "
                                   "the study's storage; a trial whose last beat is older than twice this (its "
                                   "worker killed: SIGKILL, a lost machine) is marked FAIL when a worker of the "
                                   "study starts its next trial (Optuna's heartbeat)")
    run_params: dict[str, Any] = Field(default_factory=dict, description="every trial's other run settings: "
                                       "rsir run parameters (epochs, patience, recipe, model_params, device, "
                                       "tracking_uri, experiment...)")
    home: str | None = Field(None, description="workspace directory (default $RSIR_HOME or ./workspace)")

    @field_validator(*TUNED)
    @classmethod
    def _within_run_bounds(cls, r: Range, info: Any) -> Range:
        """Both ends must be settings a run accepts (RunConfig declares the bounds), integers
        where the setting is one."""
        name = info.field_name
        if name in _INTEGER and not (_whole(r.low) and _whole(r.high) and (r.step is None or _whole(r.step))):
            raise ValueError(f"range {r}: {name} takes integers")
        if name == "source_share":
            if r.low <= 0 or r.high > 1:
                raise ValueError(f"range {r}: a share of the sequences is in (0, 1]")
            return r
        for end in (r.low, r.high):
            try:
                RunConfig.model_validate({name: int(end) if name in _INTEGER else end})
            except ValidationError as exc:
                raise ValueError(f"range {r}: {name} {exc.errors()[0]['msg'].lower()}") from None
        return r

    @field_validator("storage")
    @classmethod
    def _storage_url(cls, url: str | None) -> str | None:
        if url is None:
            return url
        scheme = url.split("://", 1)[0].split("+", 1)[0] if "://" in url else ""
        if scheme == "sqlite" and url.startswith("sqlite:////"):
            return url
        if scheme == "postgresql" and len(url.split("://", 1)[1].strip("/")) > 0:
            return url
        raise ValueError("the Optuna storage must be sqlite:////ABSOLUTE/PATH or postgresql://USER@HOST:PORT/DB")

    @field_validator("run_params")
    @classmethod
    def _not_set_by_study(cls, params: dict[str, Any]) -> dict[str, Any]:
        overridden = sorted(set(params) & _SET_BY_STUDY)
        if overridden:
            raise ValueError(f"may not set {', '.join(overridden)}: the study sets it")
        return params

    @model_validator(mode="after")
    def _run_settings(self) -> "TuneConfig":
        try:
            self.run_config(self.seeds[0], self.corner())  # every other run setting checked before any trial
        except ConfigError as exc:
            if exc.parameter not in self.run_params:
                raise
            # What run_params gave: named as run_params' key (the CLI shows `--run-params KEY=VALUE`).
            key = (exc.parameter, *exc.key)
            shown = "" if isinstance(exc.value, dict) else f" (got {exc.value!r})"
            raise ConfigError(f"invalid parameter 'run_params.{'.'.join(map(str, key))}': {exc.reason}{shown}",
                              exc.reason, exc.value, "run_params", key, config=TuneConfig) from None
        return self

    # ------------------------------------------------------------ derived
    @property
    def study_name(self) -> str:
        """One study per (dataset, backbone, seed set), unless named."""
        return self.study or f"rsir-tune-{self.dataset}-{self.model}-seeds{'-'.join(map(str, self.seeds))}"

    def storage_url(self, workspace_root: Any) -> str:
        return self.storage or f"sqlite:///{workspace_root / 'optuna.db'}"

    def digest(self) -> str:
        """What makes trials comparable: the ranges and every trial's run settings."""
        return json_digest(self.model_dump(mode="json", include={"dataset", "model", "seeds", *TUNED,
                                                                 "run_params"}))[:16]

    def corner(self) -> TrialSettings:
        """The ranges' low ends: a valid draw, to check run settings before any trial."""
        return TrialSettings(**{name: int(getattr(self, name).low) if name in _INTEGER else getattr(self, name).low
                                for name in TUNED})

    def run_parameters(self, seed: int, settings: TrialSettings, sequences: int | None,
                       labels: dict[str, str]) -> dict[str, Any]:
        """The flat `rsir` flow parameters of one trial's run at `seed` (K = 1, generation at the
        largest τ of the range, filtered at the trial's)."""
        return {**self.run_params, "dataset": self.dataset, "model": self.model, "K": 1, "seed": seed,
                "tau": settings.tau, "generation_tau": int(self.tau.high), "p": settings.p, "m": settings.m,
                "synthetic_weight": settings.synthetic_weight,
                "max_sources": None if sequences is None else settings.max_sources(sequences),
                "threads": self.threads, "home": self.home, "labels": labels}

    def run_config(self, seed: int, settings: TrialSettings) -> RunConfig:
        return RunConfig.from_parameters(self.run_parameters(seed, settings, None, {}))

    @classmethod
    def from_parameters(cls, params: dict[str, Any]) -> "TuneConfig":
        """Flat parameters (tune_parameters(): the flow's, the deployment's, `rsir tune`'s) -> one
        typed config; None means the default. A bad value is one line naming the parameter."""
        return parse_config(cls, {k: v for k, v in params.items() if v is not None})


def tune_parameters() -> list[Parameter]:
    """The flat parameters of a tuning worker, derived from TuneConfig: a range travels as its
    text (`1..100 log`) or as one number (the setting fixed: what a deployment's `--param m=5`
    sends), None = the declared range."""
    out = []
    fields = TuneConfig.model_fields
    for name in [*(n for n in fields if n not in ("threads", "home")), "threads", "home"]:
        field = fields[name]
        if field.annotation is Range:
            out.append(Parameter(name, Optional[Union[str, float]], None, field.description or ""))
            continue
        default = None if field.default_factory is not None or field.default is None else field.default
        kind = bare(field.annotation)  # seeds: list[Seed] -> list[int] (the config checks the bounds)
        annotation = Optional[kind] if default is None else kind
        out.append(Parameter(name, annotation, default, field.description or ""))
    return out


# ---------------------------------------------------------------- the study
def suggest(trial: Any, cfg: TuneConfig) -> TrialSettings:
    """A trial's settings, drawn by the study's sampler from the config's ranges."""
    drawn: dict[str, int | float] = {}
    for name in TUNED:
        r: Range = getattr(cfg, name)
        if name in _INTEGER:
            drawn[name] = trial.suggest_int(name, int(r.low), int(r.high), step=int(r.step or 1), log=r.log)
        else:
            drawn[name] = trial.suggest_float(name, r.low, r.high, step=r.step, log=r.log)
    return TrialSettings(**drawn)


@dataclass(frozen=True)
class OpenedStudy:
    study: Any  # optuna.Study
    created: bool  # this worker created it (and so makes its MLflow run)


def check_storage(url: str) -> None:
    """Connect to the study's storage and leave it as it was (no table is made): refuses, in one
    line without the password, a server that does not answer or a database that does not open."""
    from sqlalchemy import create_engine, text

    from storage.tracking import redact_uri

    opened, probe, args = url, "select 1", {"connect_timeout": 5}
    if url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///")
        if not os.path.exists(path):  # made by the study's first worker: nothing to check, nothing written
            return
        # Read-only, and a query that reads the file (a file that is no database fails here).
        opened, probe, args = f"sqlite:///file:{path}?mode=ro&uri=true", "select count(*) from sqlite_master", {}
    try:
        engine = create_engine(opened, connect_args=args)
        try:
            with engine.connect() as connection:
                connection.execute(text(probe))
        finally:
            engine.dispose()
    except Exception as exc:  # SQLAlchemy and the drivers raise many types
        reason = redact_uri((str(exc).strip().splitlines() or [type(exc).__name__])[0])[:200]
        raise RsirError(f"Optuna storage {redact_uri(url)!r} is unreachable or invalid: {reason}") from None


def _interrupted(trial: Any) -> bool:
    return trial.state.name == "FAIL" and bool(trial.user_attrs.get(INTERRUPTED_ATTR))


def study_ended(cfg: TuneConfig, url: str) -> int:
    """How many trials of the study at `url` have ended (COMPLETE, PRUNED or FAIL by a fault:
    what the tune suite's budget counts); 0 before a worker creates it. Running trials are left
    out (a worker that joins while others run must not count theirs twice), and so are trials
    an interrupt stopped (INTERRUPTED_ATTR: a resumed study replaces them)."""
    return sum(t.state.name in ("COMPLETE", "PRUNED", "FAIL") and not _interrupted(t) for t in _trials(cfg, url))


def study_settled(cfg: TuneConfig, url: str) -> int:
    """How many trials of the study at `url` are no longer running (ended or interrupted): what
    Optuna's MaxTrialsCallback counts beside the running ones."""
    return sum(t.state.name not in ("RUNNING", "WAITING") for t in _trials(cfg, url))


def _trials(cfg: TuneConfig, url: str) -> list[Any]:
    import optuna

    try:
        return optuna.load_study(study_name=cfg.study_name, storage=url).get_trials(deepcopy=False)
    except KeyError:  # Optuna's "no such study"
        return []


def export_trials(cfg: TuneConfig, url: str) -> list[dict[str, Any]]:
    """Every trial of the study at `url`, in trial order, as JSON records that `import_trials`
    reads: state, value, params with their distributions (Optuna's JSON), intermediate values
    (step -> validation NDCG@10) and user attributes. A trial still RUNNING or WAITING (its
    worker stopped before closing it) is recorded FAIL and interrupted. [] without the study."""
    from optuna.distributions import distribution_to_json

    records = []
    for t in _trials(cfg, url):
        state, attrs = t.state.name, dict(t.user_attrs)
        if state in ("RUNNING", "WAITING"):
            state, attrs = "FAIL", {**attrs, INTERRUPTED_ATTR: True}
        records.append({"number": t.number, "state": state, "value": t.value if state != "FAIL" else None,
                        "params": dict(t.params),
                        "distributions": {k: distribution_to_json(d) for k, d in t.distributions.items()},
                        "intermediate_values": {str(k): v for k, v in t.intermediate_values.items()},
                        "user_attrs": attrs})
    return records


def import_trials(cfg: TuneConfig, url: str, records: list[dict[str, Any]]) -> int:
    """Make the study at `url` from archived trials (`export_trials`' records, in order: the
    trials keep their numbers), so that a study resumed in another workspace keeps its budget's
    count and its TPE sampler and median pruner see every earlier trial. Only the call that
    creates the study adds them (a study that exists has its own trials, or another worker is
    adding these); returns how many it added. Raises RsirError (one line) for a storage that
    cannot be reached, or a record Optuna refuses (its trial number and why). Source: Optuna's
    `Study.add_trials` and `optuna.trial.create_trial` (optuna.readthedocs.io, "Study.add_trial")."""
    import optuna
    from optuna.distributions import json_to_distribution
    from optuna.trial import TrialState

    if not records:
        return 0
    opened = open_study(cfg, url)
    if not opened.created:
        return 0
    opened.study.set_user_attr(IMPORTED_ATTR, len(records))
    trials = []
    for r in sorted(records, key=lambda r: r["number"]):
        try:
            trials.append(optuna.trial.create_trial(
                state=TrialState[r["state"]], value=r["value"], params=r["params"],
                distributions={k: json_to_distribution(d) for k, d in r["distributions"].items()},
                user_attrs=r["user_attrs"], intermediate_values={int(k): v for k, v in r["intermediate_values"].items()}))
        except (KeyError, TypeError, ValueError) as exc:
            raise RsirError(f"archived trial {r.get('number')} of study {cfg.study_name!r} cannot be restored: "
                            f"{(str(exc).splitlines() or [type(exc).__name__])[0][:200]}") from None
    opened.study.add_trials(trials)
    return len(trials)


def worker_id() -> str:
    """This worker as its trials name it (user attribute `worker`): host:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


def joining_seed(seed: int | None) -> int | None:
    """The sampler seed of a worker that joins a study: the study's seed moved by this worker's
    id (CRC-32 of `worker_id`), so that no two workers draw alike; None (random) stays None."""
    return None if seed is None else (seed + zlib.crc32(worker_id().encode())) % 2 ** 32


def open_study(cfg: TuneConfig, url: str) -> OpenedStudy:
    """Create the study at `url` (maximise; TPE sampler; median pruner unless `prune` is off), or
    join it when another worker made it. Raises RsirError (one line, the URL without password)
    when the storage cannot be reached or was made with other ranges or run settings."""
    import optuna

    from storage.tracking import redact_uri

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # a trial's line is rsir's, not Optuna's
    _quiet_interrupted_trials()
    # constant_liar: a worker treats the trials others are running as done at a bad value, so two
    # workers do not draw the same settings at once.
    def sampler(seed: int | None) -> Any:
        return optuna.samplers.TPESampler(n_startup_trials=cfg.startup_trials, seed=seed, constant_liar=True)

    pruner = (optuna.pruners.MedianPruner(n_startup_trials=cfg.startup_trials, n_warmup_steps=cfg.warmup_epochs)
              if cfg.prune else optuna.pruners.NopPruner())
    try:
        storage = _rdb_storage(url, cfg.heartbeat_seconds)
        try:
            study = optuna.create_study(storage=storage, sampler=sampler(cfg.sampler_seed), pruner=pruner,
                                        study_name=cfg.study_name,
                                        direction="maximize")
            created = True
            study.set_user_attr("config_digest", cfg.digest())
            study.set_user_attr("config", cfg.model_dump(mode="json", include={"dataset", "model", "seeds", *TUNED,
                                                                               "run_params"}))
        except optuna.exceptions.DuplicatedStudyError:
            # A joining worker seeds its own sampler: with the creator's seed its startup (random)
            # trials would repeat the creator's settings one for one (constant_liar does not
            # reach random draws; two GPU workers of one study did so, session 15).
            study = optuna.load_study(study_name=cfg.study_name, storage=storage, pruner=pruner,
                                      sampler=sampler(joining_seed(cfg.sampler_seed)))
            created = False
    except RsirError:
        raise
    except Exception as exc:  # SQLAlchemy and the drivers raise many types for a bad URL or server
        reason = redact_uri((str(exc).strip().splitlines() or [type(exc).__name__])[0])[:200]
        raise RsirError(f"Optuna storage {redact_uri(url)!r} is unreachable or invalid: {reason}") from None
    if not created:
        _require_same_config(study, cfg)
    return OpenedStudy(study, created)


class _InterruptedTrialLines(logging.Filter):
    """Optuna logs a trial stopped by an interrupt (Ctrl-C) as two warnings, the first with the
    whole traceback; the stop is said once, by the worker (flows/tune.py) and `rsir tune`'s line.
    Drops both; a trial that failed by an error keeps Optuna's lines."""

    def __init__(self) -> None:
        super().__init__()
        self.interrupted: set[str] = set()  # "Trial N" whose second line is still to come

    def filter(self, record: logging.LogRecord) -> bool:
        trial = record.getMessage().split(" failed with ", 1)[0]
        if record.exc_info and record.exc_info[1] is not None and not isinstance(record.exc_info[1], Exception):
            self.interrupted.add(trial)
            return False
        if trial in self.interrupted and record.getMessage().startswith(f"{trial} failed with value "):
            self.interrupted.discard(trial)
            return False
        return True


def _quiet_interrupted_trials() -> None:
    logger = logging.getLogger("optuna.study._optimize")  # where Optuna logs a failed trial
    if not any(isinstance(f, _InterruptedTrialLines) for f in logger.filters):
        logger.addFilter(_InterruptedTrialLines())


def _rdb_storage(url: str, heartbeat_seconds: int, attempts: int = 5) -> Any:
    """Optuna's RDB storage at `url`, with its heartbeat: a trial beats every `heartbeat_seconds`
    and is stale after two (a worker that dies without running its handlers, SIGKILL, leaves its
    trial RUNNING; `Study.optimize` marks every stale trial FAIL before each trial it starts;
    Optuna docs, RDBStorage heartbeat_interval / grace_period). Workers starting together on a new
    database race to create its tables (PostgreSQL: a unique violation in pg_type for the loser):
    the loser tries again, and then finds them."""
    import time
    import warnings

    import optuna

    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():  # the heartbeat is "experimental" since Optuna 2.9: said once, here
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True},
                                                  heartbeat_interval=heartbeat_seconds,
                                                  grace_period=2 * heartbeat_seconds)
        except Exception as exc:
            text = str(exc).lower()
            if attempt + 1 == attempts or not ("unique" in text or "already exists" in text):
                raise
            time.sleep(0.5 * (attempt + 1))


def _require_same_config(study: Any, cfg: TuneConfig, wait_seconds: float = 60.0) -> None:
    """A worker joins a study only with the ranges and run settings its trials were made with
    (else their values would not compare). The creator writes them just after creating it."""
    import time

    deadline = time.monotonic() + wait_seconds
    while "config_digest" not in study.user_attrs and time.monotonic() < deadline:
        time.sleep(0.5)
    found = study.user_attrs.get("config_digest")
    if found is not None and found != cfg.digest():
        raise RsirError(f"study {cfg.study_name!r} was made with other ranges or run settings "
                        f"({study.user_attrs.get('config')}); give the same ones or another --study")


class EpochPruner:
    """Watches θ_1's training (dataset version 1) in one trial's run: reports its validation
    NDCG@10 at each epoch to the trial (step = seed index x epochs + epoch, so every trial's
    seed i, epoch e is one step) and stops the training when the pruner says so."""

    def __init__(self, trial: Any, offset: int):
        self.trial, self.offset = trial, offset

    def __call__(self, cfg: TrainConfig, point: dict[str, float]) -> None:
        import optuna

        if cfg.version != 1:  # θ_0 (shared by every trial) and the generator: not the objective
            return
        step = self.offset + int(point["epoch"])
        self.trial.report(point[f"valid_{METRIC}"], step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"trial {self.trial.number}: θ_1's validation {METRIC} "
                                     f"{point[f'valid_{METRIC}']:.4f} at epoch {int(point['epoch'])} is below the median")


# ---------------------------------------------------------------- outcomes
@dataclass(frozen=True)
class SeedRun:
    """One trial's run at one seed, as the study keeps it (a trial's user attribute): θ_1's and
    θ_0's validation NDCG@10, the MLflow parent run, and what the run reused: θ_0 (its training's
    seconds when trained, the task's seconds now) and the generation (its content key). A run
    the pruner stopped in θ_1's training is kept too (`pruned`): its θ_0 and generation count in
    what the study shared (a pruned run may be the one that trained θ_0), but it has no θ_1
    score (`valid`) and no wall time (None)."""

    seed: int
    valid: float | None
    theta0_valid: float
    mlflow_run_id: str
    theta0_reused: bool
    theta0_train_seconds: float
    theta0_task_seconds: float
    generation_key: str
    generate_seconds: float
    wall_seconds: float | None
    pruned: bool = False

    @classmethod
    def of(cls, seed: int, summary: RunSummary, generation_key: str) -> "SeedRun":
        zero, one = summary.iterations[0], summary.iterations[1]
        return cls(seed, one.valid[METRIC], zero.valid[METRIC], summary.mlflow_run_id, zero.reused,
                   zero.train_seconds, zero.times["train"], generation_key, zero.times["generate"],
                   summary.wall_seconds)

    @classmethod
    def of_pruned(cls, seed: int, run_id: str, theta0: IterationRow, generation_key: str) -> "SeedRun":
        """A pruned run, from its iteration 0 as logged (θ_0's row; D_1 was made before θ_1)."""
        return cls(seed, None, theta0.valid[METRIC], run_id, theta0.reused, theta0.train_seconds,
                   theta0.times["train"], generation_key, theta0.times["generate"], None, pruned=True)

    def to_json(self) -> dict[str, float | int | str | bool | None]:
        """The trial's user attribute (Optuna keeps JSON)."""
        return asdict(self)


# A trial's settings as the study keeps them: TUNED's names (a trial interrupted while drawing
# them has fewer); the best trial's add max_sources, None for every sequence.
Settings = dict[str, Union[int, float, None]]


class _Typed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrialRow(_Typed):
    """One trial of the study as the summary lists it."""

    number: int
    state: str  # COMPLETE, PRUNED, FAIL, RUNNING, WAITING
    interrupted: bool = False  # FAIL by an interrupt (INTERRUPTED_ATTR), not by the trial's fault
    value: float | None  # mean validation NDCG@10 of θ_1 (complete trials only)
    settings: Settings
    worker: str  # host:pid of the process that ran it
    runs: list[SeedRun]
    last_report: tuple[int, float] | None  # (step, θ_1's validation NDCG@10): where a pruned trial stopped


class TrialCounts(_Typed):
    """The study's trials by state, and how many this worker ran."""

    this_worker: int
    total: int
    complete: int
    pruned: int
    fail: int  # by a fault
    running: int
    interrupted: int  # FAIL by an interrupt: not ended, a resumed study replaces them


class BestTrial(_Typed):
    """The best complete trial: its settings, its objective against θ_0's (mean over the seeds)."""

    model_config = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)

    trial: int
    settings: Settings
    valid: float = Field(alias=f"valid_{METRIC}")
    theta0_valid: float = Field(alias=f"theta0_valid_{METRIC}")
    gain: float  # valid - theta0_valid
    beats_theta0: bool


class Registered(_Typed):
    """The model version the best trial's θ_1 was registered as, and the version @champion names."""

    model: str
    version: int
    trial: int
    champion_version: int | str | None


class Reuse(_Typed):
    """What the study's runs shared (reuse_figures)."""

    runs: int
    theta0_trained: int
    theta0_reused: int
    theta0_seconds_saved: float
    generations: int
    generation_seconds: float


class TuneSummary(Record):
    """A tuning worker's result: the study as it stands after this worker's trials. Its JSON
    (`model_dump(mode="json")`) is the flow's result, the study run's tune_summary.json and
    `rsir tune --json`; command_seconds is written only when `rsir tune` adds it."""

    study: str
    storage: str  # the URL without password
    dataset: str
    model: str
    seeds: list[int]
    metric: str
    trials: TrialCounts
    best: BestTrial | None
    registered: Registered | None
    reuse: Reuse
    rows: list[TrialRow]
    mlflow_run_id: str  # the study's run
    tracking_uri: str
    mlflow_url: str | None
    wall_seconds: float  # this worker's flow
    command_seconds: float | None = None  # `rsir tune`: the flow and the Prefect server's start


def trial_rows(study: Any) -> list[TrialRow]:
    """Every trial of the study. Optuna gives a pruned trial its last report as value; here only
    a complete trial has one (a pruned θ_1 was never scored at its best epoch)."""
    rows = []
    for t in study.trials:
        last = max(t.intermediate_values, default=None)
        rows.append(TrialRow(number=t.number, state=t.state.name,
                             value=t.value if t.state.name == "COMPLETE" else None, settings=dict(t.params),
                             interrupted=_interrupted(t), worker=t.user_attrs.get("worker", ""),
                             runs=[SeedRun(**v) for k, v in sorted(t.user_attrs.items()) if k.startswith("seed_")],
                             last_report=None if last is None else (last, t.intermediate_values[last])))
    return rows


def trial_counts(rows: list[TrialRow], this_worker: int) -> TrialCounts:
    return TrialCounts(this_worker=this_worker, total=len(rows), interrupted=sum(r.interrupted for r in rows),
                       **{state.lower(): sum(r.state == state and not r.interrupted for r in rows)
                          for state in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")})


def reuse_figures(rows: list[TrialRow]) -> Reuse:
    """What the study's runs shared: θ_0 trainings run against reused (and the seconds the reuse
    saved: the training's own seconds minus the reusing task's), generations made against runs.
    Pruned runs count (SeedRun.of_pruned): one of them may be the run that trained θ_0."""
    runs = [run for row in rows for run in row.runs]
    reused = [r for r in runs if r.theta0_reused]
    return Reuse(runs=len(runs), theta0_trained=len(runs) - len(reused), theta0_reused=len(reused),
                 theta0_seconds_saved=sum(max(r.theta0_train_seconds - r.theta0_task_seconds, 0.0) for r in reused),
                 generations=len({r.generation_key for r in runs}),
                 generation_seconds=sum(r.generate_seconds for r in runs))


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


@dataclass(frozen=True)
class StudyOutcome:
    """A study as its MLflow run records it after its last worker (flows/tune.py `_finish`): how
    many trials ended, and the best complete trial's run settings. Read from the run's tags and
    metrics, not from the Optuna storage, so that a suite archived and restored into another
    workspace (tasks/archive.py keeps tags and metrics) finds it."""

    study: str
    run_id: str
    ended: int  # trials COMPLETE, PRUNED or FAIL by a fault (not the interrupted)
    best_trial: int | None
    best_settings: dict[str, float | int | None]  # tau, p, m, synthetic_weight, max_sources (None: all)

    @classmethod
    def of(cls, run: Any) -> "StudyOutcome":
        """From a study's MLflow run (an mlflow Run: its tags and latest metrics)."""
        tags, metrics = run.data.tags, run.data.metrics
        ended = int(sum(metrics.get(f"trials_{state}", 0) for state in ("complete", "pruned", "fail")))
        best = tags.get("rsir.tune_best_trial")
        settings = json.loads(tags.get("rsir.tune_best_settings", "{}"))
        return cls(tags[STUDY_TAG], run.info.run_id, ended, None if best is None else int(best),
                   {k: v for k, v in settings.items() if k != "source_share"})
