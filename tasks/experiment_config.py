"""The experiment suites' typed config (`ExperimentConfig`): every knob of a suite invocation,
declared once, here. The `rsir-experiment` flow (flows/experiments.py), its deployment
(prefect.yaml `experiment`) and `rsir experiment` take the flat parameters `experiment_parameters`
derives from it, as `rsir` and `rsir tune` take RunConfig's and TuneConfig's. No Prefect here: the
command checks a value (one line, exit 2) before a Prefect server starts.

The suites' data and grids a knob names are here too (the suite names, their datasets, the paper
suite's trainer grid, the tuned backbone settings, the smoke models); what the suites do with them
is in flows/experiments.py."""

from __future__ import annotations

import copy
import fnmatch
import inspect
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from core.config import (
    DEVICES,
    Device,
    Epochs,
    Parameter,
    Probability,
    Rank,
    Rollouts,
    Seed,
    SequenceCount,
    Threads,
    bare,
    error_reason,
    like,
    parse_config,
)
from models import get_backbone
from models.config import ModelConfig
from tasks.config import CpuThreads, GenerationParams

SuiteName = Literal["main", "sensitivity", "backbones", "faithful", "paper", "tune"]
SUITE_DATASETS: dict[str, list[str]] = {"main": ["ml-100k-sparse", "ml-100k"], "sensitivity": ["ml-100k-sparse"],
                                        "backbones": ["ml-100k-sparse"],
                                        "faithful": ["ml-100k", "ml-100k-last50", "ml-100k-sparse"],
                                        "paper": ["amazon-beauty", "amazon-sports", "amazon-toys", "yelp"],
                                        "tune": ["ml-100k-sparse", "amazon-beauty", "amazon-sports"]}
# The backbones each suite's arms train (the paper's weak-to-strong student is HSTU): the suite's
# model parameters are checked against each before any arm computes.
SUITE_BACKBONES: dict[str, list[str]] = {"main": ["sasrec"], "sensitivity": ["sasrec"],
                                         "backbones": ["sasrec", "cl4srec", "hstu"], "faithful": ["sasrec"],
                                         "paper": ["sasrec", "hstu"], "tune": ["sasrec"]}
# Chosen on ml-100k-sparse validation NDCG@10 (issue 5): InfoNCE between cosine similarities at
# temperature 0.5 and dropout 0.5; the dot-product / temperature-1 default let the contrastive
# term dominate (valid 0.026 against 0.043). HSTU's defaults won its grid.
TUNED_BACKBONES: dict[str, dict[str, Any]] = {
    "cl4srec": {"dropout": 0.5, "options": {"cl_similarity": "cosine", "cl_temperature": 0.5}}}
# Our default trainer's settings were chosen on ml-100k: on the paper's sparse data each is varied
# alone (one factor at a time, validation NDCG@10 of θ_0, first seed), then the factors that beat
# the default alone are combined. The best of all is the suite's "strong" trainer.
PAPER_GRID: dict[str, dict[str, Any]] = {
    "default": {},
    "dropout=0.5": {"model_params": {"dropout": 0.5}},
    "hidden=128": {"model_params": {"hidden": 128}},
    "max_len=20": {"model_params": {"max_len": 20}},
    "loss=sampled": {"model_params": {"loss": "sampled", "negatives": 256}},
    "stride=5": {"stride": 5},
}
# Tiny models for --smoke: the machinery, not the numbers, is under test.
SMOKE_MODEL = {"hidden": 16, "layers": 1, "max_len": 20}
# The budget --smoke gives every arm unless the caller gave it (`smoke_config`): these fields are
# left unset (None) in the flat parameters, so that "given" and "left to the suite" stay apart.
SMOKE_BUDGET: dict[str, int] = {"epochs": 2, "patience": 1, "trials": 2}


def _check_model(name: str, params: dict[str, Any]) -> None:
    """Backbone `name` accepts these model parameters (every backbone a suite trains is checked, so
    a typo is one line before the suite starts, not a failed arm); ValueError naming the key."""
    try:
        ModelConfig(name=name, **params)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"]))
        reason = error_reason(first, ModelConfig)
        raise ValueError(f"{name}'s model parameters{f' ({where})' if where else ''}: {reason}") from None


class ExperimentConfig(BaseModel):
    """One suite invocation. Every arm of a suite gets the same training budget and rule."""

    model_config = ConfigDict(extra="forbid")

    suite: SuiteName = Field(description="the suite to run: " + ", ".join(SuiteName.__args__))
    datasets: list[str] | None = Field(None, description="override the suite's datasets")
    seeds: list[Seed] = Field([0, 1, 2], min_length=1, description="seeds: every arm runs once per seed")
    K: int = Field(3, ge=1, le=100, description="iterations of the suites' multi-iteration arms (main, faithful's "
                   "long runs, paper's Table 2; the tune suite's K auto stops by then)")
    taus: list[Rank] = Field([1, 3, 5, 10, 20, 50, 100], min_length=1,
                             description="the sensitivity suite's τ sweep (at the suite's p)")
    ps: list[Probability] = Field([0.0, 0.25, 0.5, 0.75, 1.0], min_length=1,
                                  description="the sensitivity suite's p sweep (at the τ validation prefers)")
    grid: list[str] = Field(list(PAPER_GRID), min_length=1, description="the paper suite's trainer grid "
                            "(names of PAPER_GRID; the first is the reference the others must beat)")
    tau: Rank = like(GenerationParams, "tau", description="fidelity rank threshold of every arm but the "
                     "sensitivity suite's sweeps")
    p: Probability = like(GenerationParams, "p")
    m: Rollouts = like(GenerationParams, "m")
    epochs: Epochs | None = Field(None, description="maximum epochs per training, every arm (None: the recipe's)")
    patience: Epochs | None = Field(None, description="early-stopping patience, every arm (None: the recipe's)")
    max_sources: SequenceCount | None = Field(None, description="generation sources per iteration, every arm "
                                              "(None: all; the paper suite's Table 2: as many as D_0 has)")
    shard: str | None = Field(None, pattern=r"^\d+/[1-9]\d*$", description="I/N: run only every N-th arm of each "
                              "stage from the I-th (0-based), so N processes share a suite; a stage that needs "
                              "another shard's unfinished arms fails with one line (run it again later)")
    arms: list[str] | None = Field(None, min_length=1, description="run only the arms whose name matches one of "
                                   "these shell patterns (e.g. 'table1/strong', 'table1/release*'); stages still read "
                                   "every finished arm, and --shard splits what is selected")
    model_params: dict[str, Any] = Field(default_factory=dict, description="model parameters applied to every "
                                         "backbone (e.g. hidden, dropout, options.KEY)")
    backbone_options: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: dict(TUNED_BACKBONES), description="per-backbone model parameters over model_params, "
        "as BACKBONE.KEY or BACKBONE.options.KEY (default: the tuned CL4SRec settings; giving any replaces them)")
    device: Device = Field("auto", description=f"every run's device: {DEVICES}")
    # None: each run's own default (CpuThreads: 1), so a suite and a run agree without a second constant.
    threads: Threads | None = like(CpuThreads, "threads", default=None)
    home: str | None = Field(None, description="workspace directory (default $RSIR_HOME or ./workspace)")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (default: SQLite in the workspace)")
    experiment: str | None = Field(None, description="MLflow experiment (default: experiment-<suite>, "
                                   "experiment-<suite>-smoke with smoke)")
    archive: str | None = Field(None, description="folder that keeps the suite's finished runs across workspaces "
                                "(e.g. in git; tasks/archive.py): restored into MLflow before the first stage, each "
                                "finished arm written there")
    trials: int = Field(12, ge=1, le=10_000, description="the tune suite's study budget: trials per dataset")
    smoke: bool = Field(False, description="trimmed suite: 2 seeds, short grids, K <= 2, 2 epochs (patience 1), "
                        "2 trials, tiny models; a budget given explicitly is kept")

    @field_validator("model_params")
    @classmethod
    def _models_take_them(cls, params: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        for name in SUITE_BACKBONES.get(info.data.get("suite"), []):
            _check_model(name, params)
        return params

    @field_validator("backbone_options")
    @classmethod
    def _known_backbones(cls, options: dict[str, dict[str, Any]], info: ValidationInfo) -> dict[str, dict[str, Any]]:
        for name in options:
            get_backbone(name)  # a clear error naming the unknown backbone
        if "model_params" in info.data:  # else model_params' own error is the one to show
            for name in SUITE_BACKBONES.get(info.data.get("suite"), []):
                _check_model(name, {**info.data["model_params"], **options.get(name, {})})
        return options

    @field_validator("shard")
    @classmethod
    def _shard(cls, shard: str | None) -> str | None:
        if shard is not None and int(shard.split("/")[0]) >= int(shard.split("/")[1]):
            raise ValueError(f"I/N with I below N (I counts from 0), not {shard}")
        return shard

    @field_validator("grid")
    @classmethod
    def _known_grid(cls, names: list[str]) -> list[str]:
        unknown = [n for n in names if n not in PAPER_GRID]
        if unknown:
            raise ValueError(f"unknown grid entries {unknown} (known: {', '.join(PAPER_GRID)})")
        return names

    def in_shard(self, index: int) -> bool:
        if self.shard is None:
            return True
        i, n = map(int, self.shard.split("/"))
        return index % n == i

    def selects(self, arm: str) -> bool:
        """Whether `--arm` selects an arm by name (fnmatch, case-sensitive; all without it)."""
        return self.arms is None or any(fnmatch.fnmatchcase(arm, pattern) for pattern in self.arms)

    def may_select(self, head: str | None) -> bool:
        """Whether `--arm` could select an arm whose name starts with `head/` (or is `head`) before
        the stage that lists it can say which (flows/experiments.py arms_named): a pattern whose
        first part has a wildcard is taken to reach every stage; None (undeclared) reaches all."""
        if self.arms is None or head is None:
            return True
        return any(any(c in first for c in "*?[") or first == head
                   for first in (pattern.split("/", 1)[0] for pattern in self.arms))

    @property
    def experiment_name(self) -> str:
        return self.experiment or f"experiment-{self.suite}{'-smoke' if self.smoke else ''}"

    def suite_datasets(self) -> list[str]:
        return self.datasets or SUITE_DATASETS[self.suite]

    def model(self, name: str) -> dict[str, Any]:
        return {**self.model_params, **self.backbone_options.get(name, {})}

    @classmethod
    def from_parameters(cls, params: dict[str, Any]) -> "ExperimentConfig":
        """Flat parameters (experiment_parameters(): the flow's, the deployment's, `rsir
        experiment`'s) -> the typed config, trimmed by `smoke_config` when smoke is set; None
        means the default (for the smoke budget: --smoke's). A bad value is one line (RsirError)
        naming the parameter."""
        cfg = parse_config(cls, {k: v for k, v in params.items() if v is not None})
        return smoke_config(cfg) if cfg.smoke else cfg


def smoke_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The trimmed suite the test suite runs: 2 seeds, short grids, 2 epochs, 2 trials, tiny
    models. A budget given explicitly (epochs, patience, trials) is kept: the smoke trims only
    what the caller left to the suite."""
    budget = {k: v for k, v in SMOKE_BUDGET.items() if k not in cfg.model_fields_set}
    return cfg.model_copy(update={"seeds": cfg.seeds[:2], "K": min(cfg.K, 2), "taus": [1, 10], "ps": [0.0, 1.0],
                                  "grid": cfg.grid[:2], **budget,
                                  "model_params": {**SMOKE_MODEL, **cfg.model_params}, "smoke": True})


def experiment_parameters() -> list[Parameter]:
    """The flat parameters of a suite invocation, derived from ExperimentConfig in its field
    order: the `rsir-experiment` flow's (and its deployment's) and, through rsir/cli.py, `rsir
    experiment`'s options. A field with a computed default (a dict) and the smoke budget default
    to None: the config's default (under smoke, SMOKE_BUDGET's unless given)."""
    out = []
    for name, field in ExperimentConfig.model_fields.items():
        if field.is_required():  # the suite: no default
            out.append(Parameter(name, bare(field.annotation), inspect.Parameter.empty, field.description or ""))
            continue
        unset = field.default_factory is not None or name in SMOKE_BUDGET
        default = None if unset else copy.deepcopy(field.default)  # a list default is not shared
        kind = bare(field.annotation)  # seeds: list[Seed] -> list[int] (the config checks the bounds)
        annotation = Optional[kind] if default is None else kind
        help_ = field.description or ""
        if name in SMOKE_BUDGET:
            declared = "" if field.default is None else f"default {field.default}; "
            help_ += f" ({declared}--smoke: {SMOKE_BUDGET[name]} unless given)"
        out.append(Parameter(name, annotation, default, help_))
    return out
