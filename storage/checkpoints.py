"""Checkpoint files: state dict + model config + item count + the identity of the item table
(`items_digest`, see storage.manifest.ItemTable), loadable with weights_only=True.

Files and fields only: turning a payload into a model is tasks/checkpoints.py's job (storage
knows no torch modules, only tensors)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from core.errors import RsirError, warn
from storage.files import Location, create_bytes, exists, location, read_bytes, write_bytes
from storage.manifest import ItemTable

CHECKPOINT_FORMAT = 1


def write_checkpoint(path: Location, state_dict: dict[str, torch.Tensor], model_config: dict[str, Any],
                     num_items: int, meta: dict[str, Any], if_absent: bool = False,
                     items_digest: str | None = None) -> bool:
    """Write atomically (temp file + rename, or one PUT) so a crash never leaves a truncated checkpoint.
    `model_config` is the backbone's config as JSON data, its name under "name". `items_digest`
    identifies the item table the weights were trained on (ItemTable.digest); None only for a
    model that never saw a dataset. With `if_absent`, write only where no checkpoint is yet
    (put-if-absent) and return False if another writer was first."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "backbone": model_config["name"],
        "model_config": model_config,
        "num_items": num_items,
        "items_digest": items_digest,
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
        "meta": meta,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    if if_absent:
        return create_bytes(path, buffer.getvalue())
    write_bytes(path, buffer.getvalue())
    return True


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = location(path)
    if not exists(path):
        raise RsirError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(io.BytesIO(read_bytes(path)), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        # torch's own first line can be as cryptic as "pop from empty list": say what was expected.
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RsirError(f"cannot read checkpoint {path}: not a complete torch file ({reason})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise RsirError(f"{path} is not an rsir checkpoint (format {CHECKPOINT_FORMAT})")
    _check_fields(path, payload)
    return payload


# What every reader relies on, checked once here so that a damaged or hand-made file fails with
# one line naming the field instead of a KeyError or TypeError deep inside model building.
_FIELDS: dict[str, tuple[type, str]] = {
    "backbone": (str, "a backbone name"),
    "model_config": (dict, "a dict"),
    "num_items": (int, "a positive integer"),
    "state_dict": (dict, "a dict of tensors"),
}


def _check_fields(path: Location, payload: dict[str, Any]) -> None:
    for key, (kind, wanted) in _FIELDS.items():
        if key not in payload:
            raise RsirError(f"checkpoint {path} lacks {key!r} (an rsir checkpoint holds "
                            f"{', '.join(map(repr, _FIELDS))})")
        value = payload[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise RsirError(f"checkpoint {path}: {key!r} must be {wanted}, got a {type(value).__name__}")
    if payload["num_items"] < 1:
        raise RsirError(f"checkpoint {path}: 'num_items' must be a positive integer, got {payload['num_items']}")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload["state_dict"].items()):
        raise RsirError(f"checkpoint {path}: 'state_dict' must map parameter names to tensors")
    # Optional: checkpoints written before it was recorded have none (check_compatible warns).
    digest = payload.get("items_digest")
    if digest is not None and not isinstance(digest, str):
        raise RsirError(f"checkpoint {path}: 'items_digest' must be a string, got a {type(digest).__name__}")


def check_compatible(path: Location, payload: dict[str, Any], num_items: int | None = None,
                     backbone: str | None = None, items: ItemTable | None = None) -> None:
    """Refuse a checkpoint for another backbone, another item count or, with `items` (the item
    table of the dataset version it is applied to), another item table: the same count with
    other raw ids behind the ids would score other items, silently. A checkpoint that records
    no table (written before rsir recorded one) is accepted with a one-line warning.
    Raises RsirError (one line naming the checkpoint, and for tables both digests)."""
    if backbone is not None and payload["backbone"] != backbone:
        raise RsirError(f"checkpoint {path} holds a {payload['backbone']!r} model, not {backbone!r}")
    if items is not None:
        num_items = items.num_items
    if num_items is not None and payload["num_items"] != num_items:
        raise RsirError(f"checkpoint {path} was trained on {payload['num_items']} items, "
                        f"but the dataset has {num_items}")
    if items is None:
        return
    recorded = payload.get("items_digest")
    where = f"dataset {items.dataset!r} v{items.version}"
    if recorded is None:
        warn(f"checkpoint {path} records no item-table digest (written before rsir recorded one): "
             f"cannot check that its item ids denote the items of {where} (item table {items.digest[:12]}); "
             f"using it as trained on that table")
    elif recorded != items.digest:
        raise RsirError(f"checkpoint {path} was trained on another item table (digest {recorded[:12]}) than "
                        f"{where} (digest {items.digest[:12]}): the same {items.num_items} ids denote other "
                        f"items; use the dataset it was trained on")
