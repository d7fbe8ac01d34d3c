"""One content hash for every key the project derives from parameters (checkpoint, generation
and lineage keys): SHA-256 of canonical JSON (sorted keys; non-JSON values by their str)."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def json_digest(obj: Any) -> str:
    """64 hex digits; callers that shorten it say so where they cut."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


SHOWN_DIGITS = 12  # a digest as people see it (CLI output, MLflow's dataset column): one length everywhere


def short_digest(digest: str) -> str:
    """The first SHOWN_DIGITS hex digits of a digest, for people (machines keep all 64)."""
    return digest[:SHOWN_DIGITS]
