"""Configuration machinery every layer shares: one-line validation errors and common field types.
Each layer declares its own typed config with these (models/config.py, tasks/config.py,
flows/experiments.py); a parameter is declared once, in the config of the layer that uses it."""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ValidationError

from core.errors import RsirError

T = TypeVar("T")

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


@dataclass(frozen=True)
class Parameter:
    """One flat parameter of an entry point (a flow, a CLI command), derived from a typed config."""

    name: str
    annotation: Any
    default: Any
    help: str


def with_parameters(fn: Callable[..., T], parameters: list[Parameter]) -> Callable[..., T]:
    """Give `fn(**params)` the keyword-only signature `parameters` declare, with their help in an
    "Args:" section of its docstring: what Prefect reads for a flow's parameter schema (and the
    UI's descriptions) and Typer for a command's options."""
    fn.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(p.name, inspect.Parameter.KEYWORD_ONLY, default=p.default, annotation=p.annotation)
         for p in parameters], return_annotation=inspect.signature(fn).return_annotation)
    fn.__annotations__ = {p.name: p.annotation for p in parameters} | {"return": fn.__annotations__.get("return")}
    args = "".join(f"    {p.name}: {p.help}\n" for p in parameters if p.help)
    fn.__doc__ = inspect.cleandoc(fn.__doc__ or "") + (f"\n\nArgs:\n{args}" if args else "")
    return fn
