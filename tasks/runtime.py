"""Runtime set-up shared by training, evaluation and generation: device and seeds."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Generic, ParamSpec, TypeVar

import numpy as np
import torch

from core.errors import RsirError


def resolve_device(spec: str) -> torch.device:
    """'auto' = CUDA when present, else CPU; an explicit CUDA device must exist."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RsirError(f"invalid parameter 'device': {spec!r} requested but CUDA is not available")
    return device


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run a block on `threads` CPU threads (None: leave torch's setting), restored afterwards
    so that one training's setting never leaks into the rest of the process."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


P = ParamSpec("P")
T = TypeVar("T")


@dataclass(frozen=True)
class Timed(Generic[T]):
    """A task's result and the seconds its step took (the flow's orchestration overhead is
    measured against the sum of these), kept beside the result rather than inside it."""

    value: T
    seconds: float


def timed(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> Timed[T]:
    started = time.perf_counter()
    value = fn(*args, **kwargs)
    return Timed(value, time.perf_counter() - started)
