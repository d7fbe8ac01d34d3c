"""Helpers shared by the benchmark scripts (not part of the installed package)."""

from __future__ import annotations

import json
import os
import resource
from typing import Any

from core.workspace import Workspace


def bench_workspace() -> Workspace:
    return Workspace.at(os.environ.get("RSIR_HOME", "/tmp/rsir-bench"))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    print(title)
    if not rows:
        return
    cols = list(rows[0])
    widths = [max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(_fmt(r[c]).ljust(w) for c, w in zip(cols, widths)))


def _fmt(v: Any) -> str:
    if not isinstance(v, float):
        return str(v)
    return f"{v:,.1f}" if abs(v) >= 1 else f"{v:.3f}"  # shares and fractions keep their digits


def print_json_last(obj: dict[str, Any]) -> None:
    print(json.dumps(obj))
