"""Intermediate run artifacts (rollouts, accepted sequences) as single Parquet files written
atomically, with their parameters in the file's key-value metadata. Tasks pass their paths."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from core.errors import RsirError
from storage.files import Location, exists, location, open_read, write_bytes

_META_KEY = b"rsir"


def write_table(path: Location, table: pa.Table, meta: dict[str, Any]) -> Location:
    """Write atomically at a local path or a URL."""
    table = table.replace_schema_metadata({_META_KEY: json.dumps(meta, default=str).encode()})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    write_bytes(path, sink.getvalue().to_pybytes())
    return path


def read_table(path: str | Path) -> tuple[pa.Table, dict[str, Any]]:
    path = location(path)
    if not exists(path):
        raise RsirError(f"artifact not found: {path}")
    try:
        with open_read(path) as fh:
            table = pq.read_table(fh)
    except (pa.ArrowInvalid, OSError) as exc:
        raise RsirError(f"corrupt artifact {path}: {str(exc).splitlines()[0]}") from None
    meta = json.loads((table.schema.metadata or {}).get(_META_KEY, b"{}"))
    return table, meta
