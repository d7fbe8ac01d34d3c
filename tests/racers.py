"""Workers for the concurrency tests: module-level (picklable) functions that several spawned
processes run at the same moment, each reporting what it saw instead of raising."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from core.errors import RsirError
from storage.dataset import SEQUENCE_SCHEMA, DatasetStore

ITEMS = pa.table({"item_id": pa.array([1, 2, 3, 4, 5], pa.int32()), "raw_id": ["a", "b", "c", "d", "e"]})


def sequences(variant: int, first_seq_id: int = 0, origin: str = "real") -> pa.Table:
    """Three sequences whose content differs by `variant` (equal variants: equal tables)."""
    items = [[1, 2, 3 + variant % 3], [2, 3, 5, variant % 5 + 1], [5, 4, 3, 2, 1, 1 + variant % 4]]
    users = ["u1", "u2", "u3"] if origin == "real" else [None, None, None]
    return pa.table({"seq_id": [first_seq_id + i for i in range(3)], "user_id": users, "items": items,
                     "origin": [origin] * 3, "parent_seq_id": [None] * 3}, schema=SEQUENCE_SCHEMA)


def _outcome(call) -> tuple[str, str]:
    try:
        return "ok", call().digest
    except RsirError as exc:
        return "error", str(exc)


def race_create(root: str, staging: str, name: str, variant: int, replace: bool, barrier: Any) -> tuple[str, str]:
    store = DatasetStore(root, Path(staging))
    barrier.wait()
    return _outcome(lambda: store.create(name, sequences(variant), ITEMS, source={"variant": variant},
                                         replace=replace))


def race_append(root: str, staging: str, name: str, variant: int, barrier: Any) -> tuple[str, str]:
    store = DatasetStore(root, Path(staging))
    parent = store.manifest(name, 0)
    barrier.wait()
    return _outcome(lambda: store.append(name, parent, sequences(variant, 100, "synthetic"),
                                         generation={"variant": variant, "key": f"inputs-{variant}"}))


def race_train(home: str, dataset: str, barrier: Any) -> dict[str, Any]:
    from core.workspace import Workspace
    from tasks.config import TrainConfig
    from tasks.train import train_model

    cfg = TrainConfig(dataset=dataset, version=0, model={"name": "sasrec", "hidden": 16, "layers": 1, "max_len": 20},
                      epochs=2, patience=1, device="cpu", threads=1, progress=False)
    barrier.wait()
    result = train_model(cfg, Workspace.at(home), reuse=True)
    return {"checkpoint": result.checkpoint, "valid": result.valid, "reused": result.reused}
