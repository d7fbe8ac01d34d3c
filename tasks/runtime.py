"""Runtime set-up shared by training, evaluation and generation: device and seeds."""

from __future__ import annotations

import random
import time
from typing import Any, Callable

import numpy as np
import torch

from rsir.errors import RsirError


def resolve_device(spec: str) -> torch.device:
    """'auto' = CUDA when present, else CPU; an explicit CUDA device must exist."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RsirError(f"invalid parameter 'device': {spec!r} requested but CUDA is not available")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def timed(fn: Callable[..., dict[str, Any]], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Run a step and add its own duration as `task_seconds` (the flow's overhead is measured
    against the sum of these)."""
    started = time.perf_counter()
    out = fn(*args, **kwargs)
    return {**out, "task_seconds": time.perf_counter() - started}
