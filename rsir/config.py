"""The typed configuration that travels from the CLI / deployment parameters down to the tasks."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

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
