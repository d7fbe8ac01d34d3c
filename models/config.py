"""Hyper-parameters shared by every backbone; backbone-specific ones live in `options`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("sasrec", description="backbone: sasrec, cl4srec or hstu")
    max_len: int = Field(50, ge=2, le=4096, description="longest input sequence; longer ones are windowed (RecBole default: 50)")
    hidden: int = Field(64, ge=1, le=8192, description="hidden size")
    layers: int = Field(2, ge=1, le=64, description="number of blocks")
    heads: int = Field(1, ge=1, le=256, description="attention heads")
    dropout: float = Field(0.2, ge=0.0, lt=1.0, description="dropout in [0, 1)")
    loss: Literal["ce", "sampled", "bce"] = Field("ce", description="training loss: full softmax (ce), sampled "
                                                  "softmax over `negatives` (sampled) or binary cross-entropy (bce)")
    negatives: int = Field(256, ge=1, le=2 ** 20, description="loss=sampled: uniform negatives per sequence, shared by "
                           "its positions")
    negatives_exclude_input: bool = Field(False, description="loss=sampled: never draw an item of the "
                                          "position's input sequence as a negative (the RSIR release)")
    options: dict[str, Any] = Field(default_factory=dict, validate_default=True, description="backbone-specific options")

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        from models import get_backbone  # late import: the registry imports the backbones

        get_backbone(name)
        return name

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if self.hidden % self.heads != 0:
            raise ValueError(f"heads={self.heads} must divide hidden={self.hidden}")
        return self

    @field_validator("options")
    @classmethod
    def _backbone_options(cls, options: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """Normalised through the backbone's own schema (fills defaults, rejects unknown keys); a
        field validator, so that a refused option's path is `options.KEY` (a model validator's
        lost the `options`)."""
        from models import get_backbone

        if "name" not in info.data:  # the name's own error is the one to show
            return options
        return get_backbone(info.data["name"]).options(**options).model_dump()
