"""Runtime set-up shared by training, evaluation and generation: device and seeds."""

from __future__ import annotations

import contextlib
import platform
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


def hardware(device: torch.device) -> str:
    """What computes on `device`, as a run records it: the accelerator's name, or the CPU's model
    and the instruction set torch's kernels use, with torch's version. Why: the same seed gives
    bit-identical weights only on the same kind of hardware (float kernels differ across CPUs),
    so two sittings' θ may differ in their 5th digit; this says where each came from."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}; torch {torch.__version__}"
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as info:  # Linux: the model name platform does not give
            model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), model)
    return f"{model} ({torch.backends.cpu.get_cpu_capability()}); torch {torch.__version__}"


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
