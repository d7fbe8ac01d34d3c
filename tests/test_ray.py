"""The `ray` executor on a real local Ray cluster: sharded generation and evaluation give exactly
what one process gives, for several shard counts (batch sizes), with fidelity on and off; and a
whole K = 1 flow run with executor=ray commits the same dataset digests as the local executor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.errors import RsirError
from models import build_model
from models.config import ModelConfig
from tasks.evaluate import rank_users
from tasks.executor import Executor, map_shards
from tasks.generate import extend_sequences, generate_rollouts
from tasks.rollout import GenerationParams
from tests.conftest import TINY_FLOW, make_tiny_home
from tests.test_generate import ragged, random_sources

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(name: str, num_items: int = 40) -> torch.nn.Module:
    torch.manual_seed(3)
    return build_model(ModelConfig(name=name, hidden=16, layers=1, heads=1, max_len=12, dropout=0.0), num_items)


def _same(a, b) -> None:
    assert np.array_equal(a.items.values, b.items.values) and np.array_equal(a.items.offsets, b.items.offsets)
    assert np.array_equal(a.trace.values, b.trace.values) and np.array_equal(a.trace.offsets, b.trace.offsets)
    assert np.array_equal(a.stop_reason, b.stop_reason) and np.array_equal(a.rollout_id, b.rollout_id)


@pytest.mark.parametrize("backbone", ["sasrec", "hstu"])
def test_sharded_generation_equals_one_process(ray_cluster, backbone):
    model = _model(backbone)
    sources = ragged(random_sources(40, 30, seed=5, max_len=10))
    for tau in (3, None):
        for batch_size in (7, 32, 1000):  # 22, 5 and 1 shards of 155 rollouts
            params = GenerationParams(m=5, tau=tau, p=0.5, seed=11, batch_size=batch_size)
            local = generate_rollouts(model, sources, params)
            for workers in (1, 2):
                _same(generate_rollouts(model, sources, params, Executor(kind="ray", workers=workers)), local)


def test_sharded_extension_mode_equals_one_process(ray_cluster):
    model = _model("sasrec")
    sources = ragged(random_sources(40, 30, seed=6, max_len=10))
    for tau in (3, None):
        params = GenerationParams(m=4, tau=tau, p=0.5, seed=2, batch_size=8)
        local = extend_sequences(model, sources, params, holdout_h=1)
        sharded = extend_sequences(model, sources, params, holdout_h=1, executor=Executor(kind="ray", workers=2))
        assert np.array_equal(sharded.items.values, local.items.values)
        assert np.array_equal(sharded.items.offsets, local.items.offsets)
        assert np.array_equal(sharded.trace.values, local.trace.values)
        assert np.array_equal(sharded.stop_reason, local.stop_reason)
        assert np.array_equal(sharded.source_index, local.source_index)


def test_sharded_evaluation_equals_one_process(ray_cluster):
    model = _model("sasrec")
    seqs = random_sources(40, 50, seed=8, max_len=10)
    inputs = ragged([s[:-1] or s for s in seqs])
    targets = np.array([s[-1] for s in seqs], dtype=np.int64)
    local = rank_users(model, inputs, targets, 12, batch_size=8)
    for workers in (1, 2):
        sharded = rank_users(model, inputs, targets, 12, batch_size=8, executor=Executor(kind="ray", workers=workers))
        assert np.array_equal(sharded, local)  # user order kept, ranks equal


def test_an_unreachable_cluster_is_one_clear_error(monkeypatch):
    import tasks.executor as executor

    class NoRay:  # a process that never joined a cluster
        @staticmethod
        def is_initialized():
            return False

        @staticmethod
        def init(**_):
            raise ConnectionError("could not connect to 10.255.255.1:6379\nmore detail")

    monkeypatch.setattr(executor, "import_ray", lambda: NoRay)
    with pytest.raises(RsirError, match="cannot reach the Ray cluster at '10.255.255.1:6379'"):
        map_shards(Executor(kind="ray", address="10.255.255.1:6379"), abs, [1])


@pytest.mark.prefect
def test_flow_on_ray_commits_the_same_digests_as_local(ray_cluster, prefect_api, tiny_csv, tmp_path):
    from flows.rsir import rsir
    from storage.dataset import dataset_store

    digests = {}
    for executor in ("local", "ray"):
        ws = make_tiny_home(tmp_path / executor, tiny_csv)
        summary = rsir(K=1, home=str(ws.root), tracking_uri=f"sqlite:///{ws.root / 'mlflow.db'}",
                       executor=executor, **TINY_FLOW)
        store = dataset_store(ws)
        digests[executor] = [store.manifest(summary["run_dataset"], v).digest for v in (0, 1)]
        digests[executor + "-metrics"] = [row["test"] for row in summary["iterations"]]
    assert digests["ray"] == digests["local"]
    assert digests["ray-metrics"] == digests["local-metrics"]


def test_data_parallel_training_checkpoints_and_evaluates(ray_cluster, ws, tiny_csv):
    """2 processes (gloo) train a tiny SASRec: a checkpoint and metrics come back; the number of
    processes enters the content key; one process and two start from the same weights and end
    close (same gradients, summed in another order; their own dropout draws)."""
    from tasks.config import TrainConfig
    from tasks.ingest import ImportSpec, import_dataset
    from tasks.train import content_key, train_model

    import_dataset(ws, ImportSpec(path=tiny_csv, name="tiny", format="csv"))
    base = dict(dataset="tiny", epochs=2, patience=2, seed=0, device="cpu", threads=1,
                model={"hidden": 16, "layers": 1, "max_len": 20, "dropout": 0.0})
    one = train_model(TrainConfig(**base), ws)
    two = train_model(TrainConfig(**base, train_workers=2), ws, executor=Executor(kind="ray"))
    assert two.epochs == 2 and len(two.curve) == 2 and two.checkpoint != one.checkpoint
    assert content_key(TrainConfig(**base, train_workers=2), "d") != content_key(TrainConfig(**base), "d")
    assert two.curve[0]["loss"] == pytest.approx(one.curve[0]["loss"], rel=1e-4)  # same weights, same data
    assert two.valid["ndcg@10"] == pytest.approx(one.valid["ndcg@10"], abs=0.02)


def test_data_parallel_training_needs_the_ray_executor():
    from tasks.config import RunConfig

    with pytest.raises(RsirError, match="train_workers > 1 trains data-parallel on Ray"):
        RunConfig.from_parameters({"train_workers": 2})


def test_a_gpu_step_on_a_cluster_without_gpus_is_refused(ray_cluster):
    with pytest.raises(RsirError, match="has no GPU for this step"):
        map_shards(Executor(kind="ray"), abs, [1, 2], gpu=True)


GPU_PLACEMENT = """
import json, os, ray
from tasks.executor import Executor, map_shards
ray.init(num_cpus=2, num_gpus=2, object_store_memory=128 * 1024 ** 2, include_dashboard=False, log_to_driver=False)
def where(shard):
    return shard, [str(g) for g in ray.get_gpu_ids()], os.environ.get("CUDA_VISIBLE_DEVICES")
print(json.dumps(map_shards(Executor(kind="ray"), where, list(range(6)), gpu=True)))
"""


def test_gpu_steps_hold_one_logical_gpu_each():
    """Ray's logical GPUs (declared, no hardware): each of the 2 tasks holds exactly one GPU,
    the two hold different ones, and the shards come back in order."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, "-c", GPU_PLACEMENT], cwd=Path(__file__).resolve().parent.parent,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    placed = json.loads(done.stdout.strip().splitlines()[-1])
    assert [shard for shard, _, _ in placed] == list(range(6))
    assert all(len(ids) == 1 and visible == ids[0] for _, ids, visible in placed)
    assert {ids[0] for _, ids, _ in placed} == {"0", "1"}
