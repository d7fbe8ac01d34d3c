"""Intermediate run artifacts (rollouts, accepted sequences) as single Parquet files written
atomically, with their parameters in the file's key-value metadata. Tasks pass their paths."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from core.errors import RsirError
from storage.files import atomic_path

_META_KEY = b"rsir"


def write_table(path: Path, table: pa.Table, meta: dict[str, Any]) -> Path:
    table = table.replace_schema_metadata({_META_KEY: json.dumps(meta, default=str).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return path


def read_table(path: str | Path) -> tuple[pa.Table, dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise RsirError(f"artifact not found: {path}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise RsirError(f"corrupt artifact {path}: {str(exc).splitlines()[0]}") from None
    meta = json.loads((table.schema.metadata or {}).get(_META_KEY, b"{}"))
    return table, meta
