"""Models in and out of checkpoint files: the one place that joins storage (files, tensors) and
models (torch modules)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from core.errors import RsirError
from models import build_model
from models.config import ModelConfig
from storage.checkpoints import check_compatible, read_checkpoint, write_checkpoint
from storage.files import Location
from storage.manifest import ItemTable
from tasks.ranking import require_finite


def save_checkpoint(path: Location, model: torch.nn.Module, config: ModelConfig, num_items: int,
                    meta: dict[str, Any], items_digest: str | None = None) -> Location:
    """`items_digest`: the item table the model was trained on (ItemTable.digest)."""
    write_checkpoint(path, model.state_dict(), config.model_dump(mode="json"), num_items, meta,
                     items_digest=items_digest)
    return path


def commit_checkpoint(path: Location, model: torch.nn.Module, config: ModelConfig, num_items: int,
                      meta: dict[str, Any], items_digest: str | None = None) -> bool:
    """Save only if no checkpoint is at `path` yet; False when another writer committed one first."""
    return write_checkpoint(path, model.state_dict(), config.model_dump(mode="json"), num_items, meta,
                            if_absent=True, items_digest=items_digest)


def load_checkpoint(path: str | Path, num_items: int | None = None, backbone: str | None = None,
                    device: torch.device | str = "cpu", items: ItemTable | None = None
                    ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model; refuse a checkpoint for another item count or another backbone, and
    with `items` (the item table of the dataset it will be applied to) for another item table
    (storage.checkpoints.check_compatible). Every caller applying a checkpoint to a dataset
    passes `items`."""
    payload = read_checkpoint(path)
    check_compatible(path, payload, num_items, backbone, items)
    try:
        config = ModelConfig.model_validate(payload["model_config"])
    except (ValidationError, ValueError) as exc:
        raise RsirError(f"checkpoint {path} has an invalid model config: {exc}") from None
    model = build_model(config, payload["num_items"])
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise RsirError(f"checkpoint {path} does not match backbone {config.name!r}: "
                        f"{str(exc).splitlines()[0]}") from None
    _require_finite_weights(path, payload["state_dict"])
    return model.to(device), payload


def _require_finite_weights(path: str | Path, state: dict[str, torch.Tensor]) -> None:
    """A NaN or infinite weight makes every score NaN or alike: refuse it here, naming it, rather
    than rank its scores (tasks/ranking.py)."""
    for name, value in state.items():
        if value.is_floating_point():
            require_finite(value, f"checkpoint {path}: weight {name!r}")
