"""The typed configuration of trainings and RSIR runs: declared once here, it travels from the
CLI and the flow's (deployment's) parameters down to the tasks."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core.config import (
    DEVICES,
    INT32_MAX,
    BatchSize,
    Device,
    Epochs,
    Finite,
    ItemChunk,
    Metric,
    Parameter,
    Probability,
    Rank,
    Rollouts,
    SaveSeconds,
    Seed,
    SequenceCount,
    SequenceLength,
    Threads,
    Version,
    Workers,
    bare,
    key_fields,
    keyed_unless,
    like,
    parse_config,
    unkeyed,
)
from core.hashing import json_digest
from models.config import ModelConfig
from storage.manifest import FilterParams
from tasks.executor import Executor

_DEFAULT_BACKBONE: str = ModelConfig.model_fields["name"].default
Recipe = Literal["default", "release", "sparse"]
Batching = Literal["length", "random"]
Weighting = Literal["position", "batch"]
TauSchedule = Literal["fixed", "leakage", "validation"]

# Named presets of the training settings. A preset fills only what the caller left unset, so
# `--recipe release --patience 5` is the release recipe with patience 5.
RECIPES: dict[str, dict[str, Any]] = {
    "default": {},
    # The authors' release (USTC-StarTeam/RSIR, configs/basemodel.yaml and model/basemodel.py;
    # see ../shared/docs/rsir-method.md §4): sampled softmax over 256 negatives drawn outside
    # the input sequence, batch 256, plain random batches, early stopping on validation
    # NDCG@20 with patience 20 (up to 1000 epochs); SASRec as RecBole's: 2 heads, dropout 0.5,
    # FFN 4d (256 for d = 64), positions from the oldest item.
    "release": {
        "batch_size": 256, "batching": "random", "early_stop": "ndcg@20", "patience": 20, "epochs": 1000,
        "model": {"loss": "sampled", "negatives": 256, "negatives_exclude_input": True, "heads": 2,
                  "dropout": 0.5, "options": {"ffn_mult": 4, "positions": "oldest"}},
    },
    # Our default with the settings that won on the paper's sparse data: the paper suite's grid
    # (tasks/experiment_config.py PAPER_GRID) varied dropout, hidden size, max_len, loss and stride
    # one at a time on amazon-beauty; only hidden 128 beat the default on validation NDCG@10 (0.0717
    # against 0.0703, seed 0; the test split was not used). docs/results/paper/report.md.
    "sparse": {"model": {"hidden": 128}},
}


def apply_recipe(data: Any, model_keys: tuple[str, ...]) -> Any:
    """Fill the settings the caller did not give from the named recipe (raw input dicts only;
    a validated ModelConfig is taken as it is). Options a backbone does not know are skipped."""
    if not isinstance(data, dict):
        return data
    preset = RECIPES.get(data.get("recipe", "default"), {})
    out = {**{k: v for k, v in preset.items() if k != "model"}, **data}
    for key in model_keys:
        given = out.get(key, {} if key == "model" else None)
        if isinstance(given, dict):
            out[key] = _recipe_model(preset.get("model", {}), given)
    return out


def _recipe_model(preset: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    from models import get_backbone  # late: the registry imports torch, which `rsir --help` need not

    name = given.get("name", _DEFAULT_BACKBONE)
    try:
        known = get_backbone(name).options.model_fields
    except ValueError:
        return given  # the model's own validation names the unknown backbone
    options = {k: v for k, v in preset.get("options", {}).items() if k in known}
    merged = {**{k: v for k, v in preset.items() if k != "options"}, **given}
    if isinstance(given.get("options", {}), dict):  # else the model's validation names the bad value
        merged["options"] = {**options, **given.get("options", {})}
    return merged


class TrainingSettings(BaseModel):
    """How a model learns from a dataset version: every setting here can change θ. Declared once;
    TrainConfig (one training) and RunConfig (every training of an RSIR run) both carry it."""

    model_config = ConfigDict(extra="forbid")

    recipe: Recipe = Field("default", json_schema_extra=unkeyed(), description="preset that fills the settings left unset: default "
                           "(ours, chosen on ml-100k), release (the authors' RSIR release) or sparse (ours "
                           "with the settings that won on the paper's sparse data)")
    epochs: Epochs = Field(200, description="maximum epochs")
    patience: Epochs = Field(10, description="epochs without a gain of the early-stopping metric before stopping")
    early_stop: Metric = Field("ndcg@10", description="validation metric of early stopping and model selection")
    lr: Finite = Field(1e-3, gt=0, description="Adam learning rate")
    weight_decay: Finite = Field(0.0, ge=0, description="Adam weight decay")
    batch_size: BatchSize = Field(128, description="training batch size (windows)")
    batching: Batching = Field(
        "length", description="length: windows of similar length batched together (less padding); "
        "random: plain random batches (the release)")
    weighting: Weighting = Field(
        "position", description="position: every target position of an epoch weighs the same, whatever "
        "batch it falls in (the paper's objective); batch: each batch's own mean (a batch of short "
        "sequences weighs as much as one of long ones)")
    synthetic_weight: Finite = Field(1.0, ge=0.0, description="λ: weight of a synthetic target position "
                                    "relative to a real one (1 = alike, the paper's L_k + λ·L_gen by counts)")
    stride: int | None = Field(None, ge=1, le=4096, description="pairs between overlapping training windows of long "
                               "sequences (a window predicts only its newest `stride` targets, so each target "
                               "keeps >= max_len - stride items of context): unset = max_len // 2 (half a "
                               "window; no recipe sets it), max_len = disjoint windows")

    train_workers: int = Field(1, ge=1, le=256, json_schema_extra=keyed_unless(1), description="data-parallel training processes on Ray (each "
                               "computes the gradient of its share of every batch; the gradients are summed, "
                               "so the global batch stays batch_size); 1 = this process")

    @model_validator(mode="before")
    @classmethod
    def _recipe(cls, data: Any) -> Any:
        return apply_recipe(data, ("model", "generator"))

    @classmethod
    def names(cls) -> set[str]:
        return set(TrainingSettings.model_fields)

    def check_stride(self, model: ModelConfig) -> None:
        if self.stride is not None and self.stride > model.max_len:
            raise ValueError(f"stride={self.stride} exceeds the {model.name} model's max_len={model.max_len}")


class CpuThreads(BaseModel):
    """The torch CPU threads of a process that trains, evaluates or generates (not a training
    setting: it changes the speed, not θ)."""

    # Why 1 (benchmarks/threads.py; figures in README, "Threads"): torch's default is one thread
    # per core, and on busy cores its threads wait for each other.
    threads: Threads = Field(1, json_schema_extra=unkeyed(), description="torch CPU threads; 0 = torch's default (one per core). "
                         "Default 1: on 2 busy cores torch's default trained 6-7 times slower than one "
                         "thread (benchmarks/threads.py)")


class TrainConfig(CpuThreads, TrainingSettings):
    """One training: a dataset version, a backbone, the training settings and the runtime."""

    # The data's digest keys a training, not its name.
    dataset: str = Field("ml-100k", json_schema_extra=unkeyed(), description="dataset name")
    version: Version | None = Field(None, json_schema_extra=unkeyed(), description="dataset version; latest when omitted")
    model: ModelConfig = Field(default_factory=ModelConfig)
    eval_batch_size: BatchSize = Field(512, json_schema_extra=unkeyed(), description="users scored together "
                                       "when evaluating (full ranking: each row holds the item count's scores)")
    seed: Seed = Field(0, description="random seed (numpy's generators take non-negative seeds)")
    device: Device = Field("auto", description=DEVICES, json_schema_extra=unkeyed())
    exclude_history: bool = Field(True, description="evaluation ranks only the items outside the user's "
                                  "history (off: the history items are ranked too)")
    progress: bool = Field(True, json_schema_extra=unkeyed(), description="progress bars on stderr")
    resume_seconds: SaveSeconds = Field(60.0, json_schema_extra=unkeyed(), description="seconds "
                                  "between saves of an unfinished training's state (weights, Adam's moments, the "
                                  "random generators, the curve), from which the same training continues after "
                                  "an interrupt, to the same weights; 0 = after every epoch")

    @property
    def window_stride(self) -> int:
        """The stride training uses: half the window unless set (chosen on ml-100k validation:
        disjoint windows left targets after each window boundary with almost no context)."""
        return self.stride or max(1, self.model.max_len // 2)

    @model_validator(mode="after")
    def _stride(self) -> "TrainConfig":
        self.check_stride(self.model)
        return self

    @classmethod
    def from_parameters(cls, params: dict[str, Any]) -> "TrainConfig":
        """Flat training parameters (train_parameters(): `rsir train`'s options) -> one typed
        config, the backbone's name and settings nested as its ModelConfig; None means the
        default (a training or model setting's: the recipe's). A bad value fails with a one-line
        message naming the parameter (`model.hidden` for a model setting)."""
        given = {k: v for k, v in params.items() if v is not None}
        model = {"name": given.pop("model", _DEFAULT_BACKBONE),
                 **{k: given.pop(k) for k in MODEL_SETTINGS if k in given}}
        # Where a refused value came from: each setting its own parameter, the backbone's name
        # `model`, and what else ModelConfig refuses (its options' keys, checked as its own) `options`.
        nested = {("model",): ("options",), ("model", "name"): ("model",),
                  **{("model", k): (k,) for k in MODEL_SETTINGS}}
        return parse_config(cls, {**given, "model": model}, nested)


class GenerationParams(BaseModel):
    """The generator's parameters (tasks/rollout.py runs them; tasks/generate.py stores them with
    the rollouts). Declared once here: a run (RunConfig), the suites (flows/experiments.py) and
    `rsir generate` take their generation knobs, defaults and help from these fields."""

    model_config = ConfigDict(extra="forbid")

    m: Rollouts = Field(5, description="rollouts per source sequence (extension mode: most items added)")
    # None: fidelity off (no threshold), the one encoding below the command line's --no-fidelity.
    tau: Rank | None = Field(10, description="fidelity rank threshold: a rollout ends at its first check with a "
                             "rank above tau")
    p: Probability = Field(0.5, description="probability of the local pool (the user's own items)")
    min_len: SequenceLength = Field(3, description="shortest synthetic sequence kept (by the filter)")
    max_len: SequenceLength | None = Field(None, description="longest rollout (default: the model's max_len)")
    seed: Seed = Field(0, description="seed of the pool choices")
    batch_size: BatchSize = Field(1024, description="rollouts scored together", json_schema_extra=unkeyed())
    device: Device = Field("cpu", description=DEVICES, json_schema_extra=unkeyed())
    max_sources: SequenceCount | None = Field(None, description="generate from at most this many training "
                                              "sequences, a uniform sample seeded by `seed`; None = all (the paper)")
    incremental: bool = Field(True, description="cache each layer's keys and values and encode only the newest "
                              "item per step (models whose positions allow it); off: the full forward every step")
    item_chunk: ItemChunk = Field(2 ** 18, description="items scored at once: a step holds batch_size x "
                                  "item_chunk scores (more items: two passes over the item table)")
    retrieval: Literal["exact", "ivf"] = Field("exact", description="exact: score every item; ivf: approximate "
                                               "candidates from a faiss index (extra 'ann'), re-scored exactly")
    candidates: Rank = Field(256, description="retrieval ivf: candidates per step, re-scored exactly")
    nprobe: Workers = Field(16, description="retrieval ivf: inverted lists searched per query")

    @model_validator(mode="after")
    def _lengths(self) -> "GenerationParams":
        if self.max_len is not None and self.min_len > self.max_len:
            raise ValueError(f"min_len={self.min_len} exceeds max_len={self.max_len}")
        if self.retrieval != "exact" and self.tau is not None and self.tau > self.candidates:
            raise ValueError(f"tau={self.tau} exceeds candidates={self.candidates}: ranks above the candidates "
                             f"are not known with retrieval={self.retrieval!r}")
        return self


class RunConfig(CpuThreads, TrainingSettings):
    """Everything an RSIR run depends on; built from the flow's (deployment's) parameters."""

    dataset: str = Field("ml-100k", description="dataset name (built-ins are fetched when missing)")
    K: int | Literal["auto"] = Field(
        3, json_schema_extra=unkeyed(), description="self-improving iterations, or auto: iterate while θ_k's "
        "validation early_stop metric beats the best θ before it by more than k_tolerance, up to k_max")
    k_max: int = Field(5, ge=1, le=100, json_schema_extra=unkeyed(), description="K auto: the most iterations")
    # Default 0: any gain continues; the champion rule (best validation, θ_0 on ties) keeps what a
    # noise-level gain costs to one iteration's time, never a worse θ.
    k_tolerance: float = Field(0.0, ge=-1.0, le=1.0, json_schema_extra=unkeyed(), description="K auto: the "
                               "relative gain over the best validation so far that earns another iteration "
                               "(0: any gain; 0.005: more than 0.5%; -1: never stop before k_max)")
    model: ModelConfig = Field(default_factory=ModelConfig, description="the student: trained and evaluated")
    generator: ModelConfig | None = Field(None, description="generator backbone (weak-to-strong); default: the student")
    tau: Rank = like(GenerationParams, "tau")  # fidelity off is `fidelity`, not tau None
    p: Probability = like(GenerationParams, "p")
    m: Rollouts = like(GenerationParams, "m")
    min_len: SequenceLength = like(GenerationParams, "min_len")
    fidelity: bool = Field(True, description="fidelity control (off: the paper's ablation)")
    generation_tau: Rank | None = Field(None, description="generate at this looser threshold and filter at "
                                       "tau (equivalent, by the fidelity trace): lets runs that differ only "
                                       "in tau share one generation")
    max_sources: SequenceCount | None = like(GenerationParams, "max_sources", description="generate from at most "
                                             "this many training sequences per iteration (seeded sample); None = "
                                             "all, as the paper")
    # Adaptive fidelity (issue 26): added after keys existed, so each is keyed only away from the
    # behaviour before it (a fixed tau), and the two knobs only under the schedule that reads them
    # (lineage_key): fixed-tau runs keep their lineage, run keys and dataset digests.
    tau_schedule: TauSchedule = Field(
        "fixed", json_schema_extra=keyed_unless("fixed"), description="how the fidelity threshold τ_k of "
        "iteration k is chosen: fixed (tau every iteration); leakage (τ_0 = tau, then halved whenever the "
        "leakage proxy of the synthetic data θ_k was trained on exceeds leakage_max); validation (each "
        "iteration, the threshold of tau_candidates whose θ_{k+1} scores best on validation)")
    # Why a knob and why 0.5: the paper's bound E(θ_{k+1}) <= (1-λ)E_0 + λ[(1-p̃)ρE(θ_k) + p̃E_max]
    # (../shared/docs/rsir-method.md §6) breaks down at a leakage p̃* that depends on ρ and E_max,
    # neither of which a run can measure; 0.5 says "more synthetic items the next model ranks
    # outside τ than inside", the point past which the data teaches more noise than preference.
    leakage_max: float = Field(
        0.5, ge=0.0, le=1.0, allow_inf_nan=False, json_schema_extra=keyed_unless(0.5),
        description="tau_schedule leakage: the breakdown leakage p̃* of the paper's error bound (a share of "
        "synthetic items, 0..1); τ is halved when the proxy exceeds it (ρ and E_max of the bound are unknown, "
        "so p̃* is a knob)")
    tau_candidates: list[Rank] | None = Field(
        None, min_length=1, max_length=16, json_schema_extra=keyed_unless(None),
        description="tau_schedule validation: the thresholds tried at every iteration, one θ_{k+1} trained per "
        "threshold (repeatable; default: tau // 3, tau and 3 tau)")
    gen_batch_size: BatchSize = like(GenerationParams, "batch_size", json_schema_extra=unkeyed())
    retrieval: Literal["exact", "ivf"] = like(GenerationParams, "retrieval", json_schema_extra=keyed_unless("exact"))
    seed: Seed = Field(0, description="random seed of training and generation (iteration k uses seed + k)")
    device: Device = Field("auto", description=DEVICES, json_schema_extra=unkeyed())
    executor: Literal["local", "ray"] = Field("local", json_schema_extra=unkeyed(), description="where generation and evaluation shards run: "
                                             "this process, or a Ray cluster (identical results)")
    ray_address: str | None = Field(None, json_schema_extra=unkeyed(), description="executor ray: the cluster to join (default: start a local one)")
    ray_workers: Workers | None = Field(None, json_schema_extra=unkeyed(), description="executor ray: parallel tasks per step (default: the cluster's CPUs)")
    home: str | None = Field(None, json_schema_extra=unkeyed(), description="workspace directory (default $RSIR_HOME or ./workspace)")
    tracking_uri: str | None = Field(None, json_schema_extra=unkeyed(), description="MLflow tracking URI (default: SQLite in the workspace)")
    experiment: str = Field("rsir", json_schema_extra=unkeyed(), description="MLflow experiment")
    labels: dict[str, str] = Field(default_factory=dict, json_schema_extra=unkeyed(), description="MLflow tags rsir.label.<key> on the "
                                   "parent run (experiment suites use them to find their arms)")
    progress: bool = Field(False, json_schema_extra=unkeyed(), description="progress bars on stderr")
    resume_seconds: SaveSeconds = like(TrainConfig, "resume_seconds", json_schema_extra=unkeyed())

    @field_validator("K", mode="before")
    @classmethod
    def _k(cls, value: Any) -> Any:
        """K as text (the CLI's) or a number: a whole number from 0 to 100, or auto; one message
        for every bad value (the union's own would name its branches)."""
        if isinstance(value, str) and value.strip() == "auto":
            return "auto"
        try:
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise ValueError
            number = int(value)
        except ValueError:
            raise ValueError("K must be a whole number from 0 to 100 or auto") from None
        if not 0 <= number <= 100:
            raise ValueError("K must be a whole number from 0 to 100 or auto")
        return number

    @model_validator(mode="after")
    def _generation_tau(self) -> "RunConfig":
        for model in (self.model, self.generator_model):
            self.check_stride(model)
        if self.train_workers > 1 and self.executor != "ray":
            raise ValueError("train_workers > 1 trains data-parallel on Ray: set executor to 'ray'")
        if self.tau_schedule != "fixed" and not self.fidelity:
            raise ValueError(f"tau_schedule {self.tau_schedule!r} chooses a fidelity threshold: it needs "
                             f"fidelity control on")
        if self.generation_tau is not None:
            if not self.fidelity:
                raise ValueError("generation_tau needs fidelity control on")
            if self.generation_tau < max(self.taus_tried):
                raise ValueError(f"generation_tau={self.generation_tau} must be >= tau={max(self.taus_tried)}")
        return self

    @property
    def taus_tried(self) -> list[int]:
        """The thresholds an iteration may filter at, ascending: the validation schedule's
        candidates (tau_candidates, or tau // 3, tau and 3 tau), else [tau] (the leakage schedule
        only ever lowers tau)."""
        if self.tau_schedule != "validation":
            return [self.tau]
        given = self.tau_candidates or [max(1, self.tau // 3), self.tau, min(3 * self.tau, INT32_MAX)]
        return sorted(set(given))

    @property
    def generation_threshold(self) -> int | None:
        """The rank threshold the generator runs with at the loosest tau an iteration may filter
        at (None: fidelity off)."""
        return (self.generation_tau or max(self.taus_tried)) if self.fidelity else None

    def generation_params(self, k: int, tau: int | None = None) -> GenerationParams:
        """The generator's parameters at iteration k (seed + k; the threshold it runs with,
        `generation_threshold`, or `tau` (τ_k of the leakage schedule) when given and no
        generation_tau is set); the rest are GenerationParams' defaults."""
        threshold = self.generation_threshold
        if tau is not None and self.fidelity and self.generation_tau is None:
            threshold = tau
        return GenerationParams(m=self.m, tau=threshold, p=self.p, min_len=self.min_len,
                                seed=self.seed + k, batch_size=self.gen_batch_size, device=self.device,
                                max_sources=self.max_sources, retrieval=self.retrieval)

    def filter_params(self, tau: int | None = None) -> FilterParams:
        """The filter's parameters: `tau` (τ_k of a schedule; default tau) when fidelity control
        is on, else None (fidelity off)."""
        return FilterParams(tau=(tau or self.tau) if self.fidelity else None, min_len=self.min_len)

    def executor_spec(self) -> Executor:
        return Executor(kind=self.executor, address=self.ray_address, workers=self.ray_workers)

    @property
    def generator_model(self) -> ModelConfig:
        return self.generator or self.model

    def train_config(self, dataset: str, version: int, model: ModelConfig) -> TrainConfig:
        settings = self.model_dump(include=TrainingSettings.names())
        return TrainConfig(**settings, dataset=dataset, version=version, model=model, seed=self.seed,
                           device=self.device, threads=self.threads, progress=self.progress,
                           resume_seconds=self.resume_seconds)

    def lineage_key(self) -> str:
        """What determines the generated data: the fields that enter keys (core.config.key_fields;
        not K: a K=2 run is the prefix of a K=3 run; not the recipe's name, only the settings it
        resolved to), the generator's backbone as resolved."""
        # A schedule's knob is keyed only under the schedule that reads it: at its default (so,
        # by keyed_unless, out of the key) otherwise.
        idle = {name: RunConfig.model_fields[name].default for name, schedule in
                (("leakage_max", "leakage"), ("tau_candidates", "validation")) if self.tau_schedule != schedule}
        return json_digest(key_fields(self, generator=self.generator_model.model_dump(mode="json"), **idle))

    @property
    def run_dataset(self) -> str:
        """The run's own fork of its dataset, named by its lineage: a re-run resumes in it."""
        return f"{self.dataset}--{self.lineage_key()[:10]}"

    def run_key(self, base_digest: str) -> str:
        """What makes two runs the same run: the lineage, K (with k_max and k_tolerance when
        auto), the labels and the content of D_0 (`base_digest`, so a replaced base dataset is a
        new run). A finished run with this key is
        the answer to a re-submission; a stopped one is resumed."""
        key = {"lineage": self.lineage_key(), "K": self.K, "labels": self.labels, "base": base_digest}
        if self.K == "auto":  # a fixed K's key as before: its runs are found again
            key.update(k_max=self.k_max, k_tolerance=self.k_tolerance)
        return json_digest(key)

    @property
    def max_iterations(self) -> int:
        """The most iterations the run may make: K, or k_max when K is auto."""
        return self.k_max if self.K == "auto" else self.K

    @classmethod
    def from_parameters(cls, params: dict[str, Any]) -> "RunConfig":
        """Flat run parameters (run_parameters(): the flow's, the deployment's, `rsir run`'s) ->
        one typed config; None means the default (a training setting's: the recipe's). A bad
        value fails with a one-line message naming the parameter."""
        given = {k: v for k, v in params.items() if v is not None}
        model = {"name": given.pop("model", _DEFAULT_BACKBONE), **given.pop("model_params", {})}
        gen_name, gen_params = given.pop("generator", None), given.pop("generator_params", None)
        if gen_name or gen_params:
            given["generator"] = {"name": gen_name or model["name"], **(gen_params or {})}
        # Where a refused value came from: the backbone's name, else a key of its dict, one of
        # its options where the dict gave it so (ModelConfig names an option's fault by its key).
        nested: dict[tuple[str, ...], tuple[str, ...]] = {}
        for backbone, pairs in (("model", "model_params"), ("generator", "generator_params")):
            options = (model if backbone == "model" else given.get("generator", {})).get("options")
            nested |= {(backbone,): (pairs,), (backbone, "name"): (backbone,),
                       **{(backbone, k): (pairs, "options", k) for k in (options if isinstance(options, dict) else {})
                          if k not in MODEL_SETTINGS}}
        return parse_config(cls, {**given, "model": model}, nested)


# The backbones travel flat as a name plus a dict of ModelConfig settings (hidden, loss, options...).
_BACKBONE_PARAMETERS = [
    Parameter("model", str, _DEFAULT_BACKBONE, "student backbone (trained and evaluated)"),
    Parameter("model_params", Optional[dict[str, Any]], None, "student settings: ModelConfig fields, "
              "backbone options under 'options'"),
    Parameter("generator", Optional[str], None, "generator backbone (weak-to-strong); default: the student"),
    Parameter("generator_params", Optional[dict[str, Any]], None, "generator settings, as model_params"),
]


# One training's backbone travels flat: its name (`model`), then each ModelConfig setting under
# its own name (`rsir train --hidden 32 --option positions=oldest`); none is a TrainConfig field's
# name. A run's two backbones travel as a name plus a dict each (_BACKBONE_PARAMETERS).
MODEL_SETTINGS: tuple[str, ...] = tuple(n for n in ModelConfig.model_fields if n != "name")


def _recipe_default(default: Any) -> str:
    """The help's note on a setting the recipe decides: the field's default is the default
    recipe's (a None default is explained by the field's description)."""
    return " (default: the recipe's)" if default is None else f" (default: the recipe's, else {default})"


def train_parameters() -> list[Parameter]:
    """The flat parameters of one training (`rsir train`'s options), derived from TrainConfig:
    the dataset and its version, the backbone's name and its ModelConfig settings in place of
    the nested model, then the other fields in their order. A training or model setting defaults
    to None, the recipe's value (its help states the field's default, the default recipe's)."""
    fields = TrainConfig.model_fields
    recipe_decides = TrainingSettings.names() - {"recipe"}
    models = ModelConfig.model_fields
    out = [_flat(name, fields[name], False) for name in ("dataset", "version")]
    out.append(Parameter("model", str, models["name"].default, models["name"].description or ""))
    for name in MODEL_SETTINGS:
        field = models[name]
        if field.default_factory is not None:  # options: a dict, none given = the backbone's defaults
            out.append(Parameter(name, Optional[dict[str, Any]], None, field.description or ""))
        else:
            out.append(Parameter(name, Optional[bare(field.annotation)], None,
                                 (field.description or "") + _recipe_default(field.default)))
    out += [_flat(name, field, name in recipe_decides) for name, field in fields.items()
            if name not in ("dataset", "version", "model")]
    return out


def _flat(name: str, field: Any, recipe_decides: bool) -> Parameter:
    """A field as a flat parameter: its type without bounds (the config checks them), its
    default, or None when the recipe decides."""
    default = None if recipe_decides else field.default
    annotation = Optional[bare(field.annotation)] if default is None else bare(field.annotation)
    help_ = (field.description or "") + (_recipe_default(field.default) if recipe_decides else "")
    return Parameter(name, annotation, default, help_)


def run_parameters() -> list[Parameter]:
    """The flat parameters of an RSIR run, derived from RunConfig: every field but the two
    backbones, which come first as a name and a dict. Training settings default to None, the
    recipe's value; so do fields with a computed default."""
    recipe_decides = TrainingSettings.names() - {"recipe"}
    fields = dict(RunConfig.model_fields)
    order = ["dataset", *_BACKBONE_PARAMETERS, *(n for n in fields if n not in ("dataset", "model", "generator"))]
    out = []
    for item in order:
        if isinstance(item, Parameter):
            out.append(item)
            continue
        name, field = item, fields[item]
        unset = name in recipe_decides or field.default_factory is not None
        default = None if unset else field.default
        annotation = Optional[bare(field.annotation)] if default is None else bare(field.annotation)
        out.append(Parameter(name, annotation, default, (field.description or "") + (
            " (default: the recipe's)" if name in recipe_decides else "")))
    return out
