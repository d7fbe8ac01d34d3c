"""Configuration machinery every layer shares: one-line validation errors and common field types.
Each layer declares its own typed config with these (models/config.py, tasks/config.py,
tasks/experiment_config.py); a parameter is declared once, in the config of the layer that uses it."""

from __future__ import annotations

import difflib
import inspect
import re
import types
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal, TypeVar, Union, get_args, get_origin

from pydantic import AfterValidator, BaseModel, Field, ValidationError

from core.errors import RsirError

T = TypeVar("T")

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")
DEVICES = "auto, cpu, cuda, cuda:N or mps"  # what a device may be: the validator's message and every help


def _check_device(value: str) -> str:
    if not _DEVICE_RE.match(value):
        raise ValueError(f"device must be {DEVICES}")
    return value


Device = Annotated[str, AfterValidator(_check_device)]


# Bounds of every numeric knob, declared once: a value outside them would reach numpy or torch as
# an array size or an index type it cannot hold (`--m 1000000000` asked numpy for 6.86 TiB, `--tau
# 1e30` overflowed an int64 conversion), so the typed configs refuse it first, in one line naming
# the parameter. The ceilings are far above any sensible setting and below what the arrays hold.
INT32_MAX = 2 ** 31 - 1
# numpy's legacy generators and many libraries take 32-bit seeds; training seeds torch with
# seed * 1_000_003 + rank and generation uses seed + k, which then stay far below torch's 2**63.
Seed = Annotated[int, Field(ge=0, le=2 ** 32 - 1)]
# A rank among the items: item ids are int32 in every partition, so no rank is above INT32_MAX
# (a threshold at or above the item count means "any rank").
Rank = Annotated[int, Field(ge=1, le=INT32_MAX)]
# Rollouts per source sequence: the generator holds sources x m rollouts of max_len int64 items
# (943 ml-100k users x 1000 x 50 is 377 MB); the paper uses m <= 10.
Rollouts = Annotated[int, Field(ge=1, le=1000)]
# Rows scored or trained together: each holds at least max_len x hidden floats, and a generation
# batch batch x item_chunk scores; 2**20 rows is GiBs at the smallest model.
BatchSize = Annotated[int, Field(ge=1, le=2 ** 20)]
# Items scored at once (generation): a step holds batch_size x item_chunk float32 scores.
ItemChunk = Annotated[int, Field(ge=2, le=2 ** 24)]
# Training passes and early-stopping patience: loops, not arrays, but the curve keeps one row
# per epoch; the release recipe's 1000 epochs is the most any recipe asks.
Epochs = Annotated[int, Field(ge=1, le=100_000)]
# Sequence lengths: attention holds max_len x max_len scores per head and row.
SequenceLength = Annotated[int, Field(ge=2, le=4096)]
# Counts of sequences (generation sources): int32, as the item ids.
SequenceCount = Annotated[int, Field(ge=1, le=INT32_MAX)]
# Dataset versions: manifests are named v00000.json..v99999.json.
Version = Annotated[int, Field(ge=0, le=99_999)]
# Seconds between saves of a training's resumable state (at most a day: a bigger value is a typo).
SaveSeconds = Annotated[float, Field(ge=0, le=86_400, allow_inf_nan=False)]
# CPU threads or parallel workers of one process or cluster.
Workers = Annotated[int, Field(ge=1, le=4096)]
# A process's torch CPU threads: 0 leaves torch's own setting (one per core).
Threads = Annotated[int, Field(ge=0, le=4096)]
# A probability (the local pool's p).
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
# A real number that must be finite (NaN and infinity pass ge/gt bounds in pydantic).
Finite = Annotated[float, Field(allow_inf_nan=False)]


Metric = Literal["ndcg@5", "ndcg@10", "ndcg@20", "recall@5", "recall@10", "recall@20", "mrr@20"]


# What enters a content key (checkpoint, generation and lineage keys) is declared on the field:
# every field does unless its Field says otherwise with one of these (json_schema_extra), and
# `key_fields` is the one rule that reads them.
def unkeyed() -> dict[str, Any]:
    """The field changes where or how fast the work runs, or names it, not what comes out."""
    return {"keyed": False}


def keyed_unless(value: Any) -> dict[str, Any]:
    """A field added after keys existed, keyed only when not at `value` (the behaviour before
    it): keys made before it stay valid."""
    return {"keyed_unless": value}


def key_fields(config: BaseModel, **replace: Any) -> dict[str, Any]:
    """The fields of `config` that enter its content keys, as JSON values (nested configs whole),
    `replace` laid over them: every field but those marked `unkeyed()`, and one marked
    `keyed_unless(v)` only when its value is not v."""
    data = {**config.model_dump(mode="json"), **replace}
    out = {}
    for name, field in type(config).model_fields.items():
        mark = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if mark.get("keyed") is False or ("keyed_unless" in mark and data[name] == mark["keyed_unless"]):
            continue
        out[name] = data[name]
    return out


def like(model: type[BaseModel], name: str, **change: Any) -> Any:
    """The field `name` of `model` (its default and description, unless `change` says otherwise)
    for another config that carries the same knob: a knob's default and meaning are declared once,
    in the config of the layer that uses it. The bounds travel with the annotation (core types
    such as Rank), which the carrying config may narrow (Rank where `model` takes Rank | None)."""
    field = model.model_fields[name]
    given = {"default": field.default, "description": field.description}
    if field.default_factory is not None:
        given = {"default_factory": field.default_factory, "description": field.description}
    return Field(**{**given, **change})


class ConfigError(RsirError):
    """A value a typed config refused. The message names it by its path in the config (what flows
    and API callers pass: `seeds.0`, `model.loss`); `parameter` is the flat parameter that carried
    it (an entry point's, `from_parameters`'), `key` the path inside that parameter (a list's
    index, a dict's keys), so that the CLI can name the option the user typed instead; None where
    no one parameter is at fault (a rule across fields, a config that a validator parses)."""

    def __init__(self, message: str, reason: str, value: Any, parameter: str | None, key: tuple = (),
                 config: type | None = None):
        super().__init__(message)
        self.reason, self.value, self.parameter, self.key = reason, value, parameter, key
        self.config = config  # set by a validator that names its own config's `parameter` (parse_config)


def parse_config(cls: type[BaseModel], data: dict,
                 nested: dict[tuple[str, ...], tuple[str, ...]] | None = None) -> BaseModel:
    """Validate `data` as `cls`; turn the first validation error into a one-line ConfigError
    that names the parameter and the offending value. `nested`: where `data` nests flat
    parameters, a config path -> the parameter that fills it and the key it fills there
    (("model",) -> ("model_params",)); the longest that starts the error's path names its
    parameter, else the path's first field does."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(err["loc"])
        reason, value = error_reason(err, cls), err.get("input")
        prefix = max((p for p in (nested or {}) if loc[:len(p)] == p), key=len, default=None)
        if prefix is not None and prefix == loc and isinstance(value, dict):
            parameter, key = None, ()  # a nested config's rule across its fields: no one parameter
        elif prefix is not None:
            parameter, key = nested[prefix][0], nested[prefix][1:] + loc[len(prefix):]
        else:
            parameter, key = (str(loc[0]), loc[1:]) if loc else (None, ())
        raise ConfigError(describe_validation_error(exc, cls), reason, value, parameter, key) from None
    except ConfigError as exc:  # a config this one's validators parse: its path is not one of `cls`'s,
        if exc.config is cls:  # unless the validator named one of `cls`'s parameters (`ConfigError.config`)
            raise
        raise ConfigError(str(exc), exc.reason, exc.value, None) from None


def describe_validation_error(exc: ValidationError, cls: type[BaseModel] | None = None) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "config"
    msg = error_reason(err, cls)
    value = err.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"invalid parameter {where!r}: {msg}{shown}"


def error_reason(err: Any, cls: type[BaseModel] | None = None) -> str:
    """Why pydantic refused a value (one entry of `ValidationError.errors()`), in our words: a key
    no config declares is an "unknown setting", with the closest name `cls` declares at that place
    (difflib) or, where there are few, the names it knows (pydantic says "Extra inputs are not
    permitted", which names neither)."""
    loc = tuple(err["loc"])
    if err["type"] != "extra_forbidden" or not loc:
        return err["msg"].removeprefix("Value error, ")
    names = _declared_at(cls, loc[:-1]) if cls is not None else []
    close = difflib.get_close_matches(str(loc[-1]), names, n=1)
    if close:
        return f"unknown setting (did you mean {close[0]}?)"
    return f"unknown setting (known: {', '.join(names)})" if 0 < len(names) <= 12 else "unknown setting"


def _declared_at(cls: type[BaseModel], path: tuple) -> list[str]:
    """The field names of the config that `path` (a validation error's location) leads to inside
    `cls`; [] where it leads into a dict or list rather than a config."""
    for step in path:
        field = cls.model_fields.get(step) if isinstance(step, str) else None
        inner = None if field is None else next(
            (a for a in (field.annotation, *get_args(field.annotation))
             if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if inner is None:
            return []
        cls = inner
    return list(cls.model_fields)


def bare(annotation: Any) -> Any:
    """The annotation without its Annotated bounds (`Seed | None` -> `int | None`, also inside a
    list): what an entry point declares for a parameter; the typed config checks the bounds, in
    one line."""
    if get_origin(annotation) is Annotated:
        return bare(get_args(annotation)[0])
    if get_origin(annotation) in (Union, types.UnionType):
        return Union[tuple(bare(a) for a in get_args(annotation))]
    if get_origin(annotation) is list:  # list[Rank] -> list[int]
        return list[bare(get_args(annotation)[0])]
    return annotation


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
