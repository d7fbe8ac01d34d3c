"""Backbone registry: a new backbone is one module here (a `SequentialRecommender`, see
models/base.py for the declared interface) plus one line in `_registry`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from pydantic import BaseModel

if TYPE_CHECKING:  # annotations only: models.config's validators import the registry (no circle)
    from models.base import SequenceModel, SequentialRecommender
    from models.config import ModelConfig

__all__ = ["Backbone", "SequenceModel", "SequentialRecommender", "backbone_names", "build_model", "get_backbone"]


@dataclass(frozen=True)
class Backbone:
    name: str
    options: type[BaseModel]
    build: Callable[[ModelConfig, int], SequentialRecommender]


def _registry() -> dict[str, Backbone]:
    from models import cl4srec, hstu, sasrec

    return {
        "sasrec": Backbone("sasrec", sasrec.SASRecOptions, sasrec.SASRec),
        "cl4srec": Backbone("cl4srec", cl4srec.CL4SRecOptions, cl4srec.CL4SRec),
        "hstu": Backbone("hstu", hstu.HSTUOptions, hstu.HSTU),
    }


def backbone_names() -> list[str]:
    return sorted(_registry())


def get_backbone(name: str) -> Backbone:
    registry = _registry()
    if name not in registry:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(sorted(registry))}")
    return registry[name]


def build_model(config: ModelConfig, num_items: int) -> SequentialRecommender:
    """Instantiate the backbone named by `config` (a ModelConfig) for items 1..num_items."""
    if num_items < 1:
        raise ValueError(f"num_items must be >= 1, got {num_items}")
    return get_backbone(config.name).build(config, num_items)


def __getattr__(name: str):
    """The interface types on first use (PEP 562): importing `models` (ModelConfig does, and so
    every CLI command's option list) must not import torch, which costs seconds `rsir --help`
    need not pay."""
    if name in ("SequenceModel", "SequentialRecommender"):
        from models import base

        return getattr(base, name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")
