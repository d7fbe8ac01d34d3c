"""Configuration machinery every layer shares: one-line validation errors and common field types.
Each layer declares its own typed config with these (models/config.py, tasks/config.py,
flows/experiments.py); a parameter is declared once, in the config of the layer that uses it."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ValidationError

from core.errors import RsirError

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")


def _check_device(value: str) -> str:
    if not _DEVICE_RE.match(value):
        raise ValueError("device must be auto, cpu, cuda, cuda:N or mps")
    return value


Device = Annotated[str, AfterValidator(_check_device)]


Metric = Literal["ndcg@5", "ndcg@10", "ndcg@20", "recall@5", "recall@10", "recall@20", "mrr@20"]


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
