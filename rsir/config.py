"""The typed configuration that travels from the CLI / deployment parameters down to the tasks."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from models.config import ModelConfig
from rsir.errors import RsirError

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")


def _check_device(value: str) -> str:
    if not _DEVICE_RE.match(value):
        raise ValueError("device must be auto, cpu, cuda, cuda:N or mps")
    return value


Device = Annotated[str, AfterValidator(_check_device)]


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset: str = "ml-100k"
    version: int | None = Field(None, ge=0, description="dataset version; latest when omitted")
    model: ModelConfig = Field(default_factory=ModelConfig)
    epochs: int = Field(200, ge=1, description="maximum epochs")
    patience: int = Field(10, ge=1, description="epochs without validation NDCG@10 gain before stopping")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(128, ge=1)
    eval_batch_size: int = Field(512, ge=1)
    seed: int = 0
    device: Device = "auto"
    threads: int | None = Field(None, ge=1, description="torch CPU threads; torch's default when omitted")
    exclude_history: bool = True
    progress: bool = True



def parse_config(cls: type[BaseModel], data: dict) -> BaseModel:
    """Validate `data` as `cls`; turn the first validation error into a one-line RsirError
    that names the parameter and the offending value."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise RsirError(describe_validation_error(exc)) from None


def describe_validation_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "config"
    msg = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"invalid parameter {where!r}: {msg}{shown}"


class RunConfig(BaseModel):
    """Everything an RSIR run depends on; built from the flow's (deployment's) parameters."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = "ml-100k"
    K: int = Field(3, ge=0, le=100, description="self-improving iterations")
    model: ModelConfig = Field(default_factory=ModelConfig, description="the student: trained and evaluated")
    generator: ModelConfig | None = Field(None, description="generator backbone (weak-to-strong); default: the student")
    epochs: int = Field(200, ge=1)
    patience: int = Field(10, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(128, ge=1)
    tau: int = Field(10, ge=1, description="fidelity rank threshold")
    p: float = Field(0.5, ge=0.0, le=1.0, description="probability of the local pool")
    m: int = Field(5, ge=1, description="rollouts per source sequence")
    min_len: int = Field(3, ge=2)
    fidelity: bool = True
    generation_tau: int | None = Field(None, ge=1, description="generate at this looser threshold and filter at "
                                       "tau (equivalent, by the fidelity trace): lets runs that differ only "
                                       "in tau share one generation")
    max_sources: int | None = Field(None, ge=1, description="generate from at most this many training "
                                    "sequences per iteration (seeded sample); None = all, as the paper")
    gen_batch_size: int = Field(1024, ge=1)
    seed: int = 0
    device: Device = "auto"
    threads: int | None = Field(None, ge=1)
    home: str | None = Field(None, description="workspace directory (default $RSIR_HOME or ./workspace)")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (default: SQLite in the workspace)")
    experiment: str = "rsir"
    labels: dict[str, str] = Field(default_factory=dict, description="MLflow tags rsir.label.<key> on the "
                                   "parent run (experiment suites use them to find their arms)")
    progress: bool = False

    @model_validator(mode="after")
    def _generation_tau(self) -> "RunConfig":
        if self.generation_tau is not None:
            if not self.fidelity:
                raise ValueError("generation_tau needs fidelity control on")
            if self.generation_tau < self.tau:
                raise ValueError(f"generation_tau={self.generation_tau} must be >= tau={self.tau}")
        return self

    @property
    def generation_threshold(self) -> int | None:
        """The rank threshold the generator runs with (None: fidelity off)."""
        return (self.generation_tau or self.tau) if self.fidelity else None

    @property
    def generator_model(self) -> ModelConfig:
        return self.generator or self.model

    def train_config(self, dataset: str, version: int, model: ModelConfig) -> TrainConfig:
        return TrainConfig(dataset=dataset, version=version, model=model, epochs=self.epochs,
                           patience=self.patience, lr=self.lr, weight_decay=self.weight_decay,
                           batch_size=self.batch_size, seed=self.seed, device=self.device, threads=self.threads,
                           progress=self.progress)

    def lineage_key(self) -> str:
        """What determines the generated data (not K: a K=2 run is the prefix of a K=3 run)."""
        keep = self.model_dump(mode="json", include={
            "dataset", "model", "generator", "epochs", "patience", "lr", "weight_decay", "batch_size", "tau",
            "p", "m", "min_len", "fidelity", "generation_tau", "max_sources", "seed"})
        keep["generator"] = self.generator_model.model_dump(mode="json")
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()
