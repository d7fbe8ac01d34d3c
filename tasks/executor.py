"""Where the shards of a step run: in this process (`local`) or on a Ray cluster (`ray`).

A step (generation, evaluation) cuts its work into shards whose results do not depend on which
process computes them (global rollout ids, counter-based randomness, users in order), hands a
picklable *shard worker* (a callable holding the model and the inputs) to `map_shards`, and gets
the results back in shard order. Locally that is a loop; on Ray the worker is put in the object
store once and each of W tasks (one CPU, or one GPU, each) runs a contiguous group of shards.
Prefect tasks stay coarse: one task per step, whatever the number of shards.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from core.errors import RsirError

S = TypeVar("S")
R = TypeVar("R")

# The object store Ray reserves by default is a share of RAM (7 GB here, in /dev/shm); shards
# move models and a few arrays, so a local cluster starts with this much.
LOCAL_OBJECT_STORE_BYTES = 512 * 1024 ** 2


class Executor(BaseModel):
    """Small and typed: travels from the flow's parameters into the tasks."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["local", "ray"] = "local"
    address: str | None = Field(None, description="Ray cluster to join (ray://… or HOST:PORT); "
                                                  "None: a local one, started on first use")
    workers: int | None = Field(None, ge=1, le=4096, description="Ray tasks per sharded step (default: the cluster's CPUs, "
                                                        "or GPUs when the step runs on CUDA)")


LOCAL = Executor()


def map_shards(executor: Executor, worker: Callable[[S], R], shards: Sequence[S], gpu: bool = False) -> list[R]:
    """`[worker(s) for s in shards]`, on `executor`. With `gpu`, each Ray task holds one GPU."""
    if executor.kind == "local" or not shards:
        return [worker(s) for s in shards]
    return _ray_map(executor, worker, shards, gpu)


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RsirError("executor 'ray' needs Ray: pip install -c requirements.lock -e '.[dist]' "
                        "(ray and prefect-ray, pinned)") from None
    return ray


def connect(executor: Executor) -> Any:
    """Join the cluster at `executor.address`, or start a local one (once per process). Workers
    get the Prefect API URL and the tracking and storage endpoints: without the URL each would
    start its own temporary Prefect server."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    # Endpoints and settings, never secrets: a cluster's nodes hold their own credentials (a local
    # cluster inherits this process's environment anyway).
    passed = {k: v for k, v in os.environ.items()
              if k.startswith(("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MLFLOW_HTTP_", "RSIR_"))
              or k in ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION")}
    options: dict[str, Any] = {"runtime_env": {"env_vars": passed}, "include_dashboard": False,
                               "log_to_driver": False}
    if executor.address is None:
        options["object_store_memory"] = LOCAL_OBJECT_STORE_BYTES
    try:
        ray.init(address=executor.address, **options)
    except ConnectionError as exc:
        raise RsirError(f"cannot reach the Ray cluster at {executor.address!r}: {str(exc).splitlines()[0]}") from None
    return ray


def run_group(worker: Callable[[S], R], shards: Sequence[S], threads: int) -> list[R]:
    """A Ray task's body: one group of consecutive shards through one copy of the worker."""
    import torch

    torch.set_num_threads(threads)
    return [worker(s) for s in shards]


def _ray_map(executor: Executor, worker: Callable[[S], R], shards: Sequence[S], gpu: bool) -> list[R]:
    """One task per worker slot, each with a contiguous group of shards: the worker (the model)
    is deserialized once per group, and Ray's warm worker processes keep torch imported
    between steps. Results are concatenated in shard order."""
    import numpy as np

    ray = connect(executor)
    resources = ray.cluster_resources()
    unit = "GPU" if gpu else "CPU"
    available = int(resources.get(unit, 0))
    if available < 1:
        raise RsirError(f"the Ray cluster has no {unit} for this step (resources: {resources})")
    count = min(executor.workers or available, available, len(shards))
    task = ray.remote(run_group).options(num_cpus=1, num_gpus=1 if gpu else 0)
    shared = ray.put(worker)  # shipped once, not once per group
    groups = [[shards[i] for i in idx] for idx in np.array_split(np.arange(len(shards)), count)]
    done = ray.get([task.remote(shared, group, 1) for group in groups])
    return [result for group in done for result in group]


def run_data_parallel(executor: Executor, loop: Callable[[dict[str, Any]], None], config: dict[str, Any],
                      workers: int, gpu: bool, storage: str) -> bytes:
    """Run `loop(config)` in `workers` processes with torch.distributed set up (Ray Train's
    TorchTrainer: gloo on CPUs, NCCL on GPUs); return the bytes rank 0 passed to
    `report_result`. Ray Train keeps its run state under `storage` (shared by every node)."""
    if executor.kind != "ray":
        raise RsirError("train_workers > 1 needs executor 'ray' (data-parallel training runs on Ray)")
    connect(executor)
    import ray.train
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(loop, train_loop_config=config,
                           scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=gpu,
                                                                  resources_per_worker={"CPU": 1}),
                           run_config=ray.train.RunConfig(storage_path=storage))
    result = trainer.fit()
    if result.checkpoint is None:
        raise RsirError(f"data-parallel training ended without a result: {result.error}")
    with result.checkpoint.as_directory() as folder:
        return (Path(folder) / _RESULT_FILE).read_bytes()


_RESULT_FILE = "result.pt"


def report_result(rank: int, result: Any) -> None:
    """Inside a data-parallel loop: rank 0 hands `result` (torch-saveable) to the driver; every
    rank must call this (Ray Train's report is collective)."""
    import tempfile

    import ray.train
    import torch

    if rank != 0:
        ray.train.report({"rank": rank})
        return
    with tempfile.TemporaryDirectory() as folder:
        torch.save(result, Path(folder) / _RESULT_FILE)
        ray.train.report({"rank": rank}, checkpoint=ray.train.Checkpoint.from_directory(folder))
