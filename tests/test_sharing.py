"""Work shared between runs: trainings of the same data and config (content-addressed checkpoints),
one generation re-filtered at several τ, a generation used by another fork of the same data, and
a seeded source budget per iteration."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core.errors import RsirError
from storage.artifacts import read_table
from storage.dataset import dataset_store
from storage.manifest import FilterParams
from tasks.config import RunConfig, TrainConfig
from tasks.expand import expand_step
from tasks.filter import filter_step
from tasks.generate import generate_step, sample_sources
from tasks.rollout import GenerationParams
from tasks.train import train_model
from tests.conftest import TINY_FLOW, make_tiny_home

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = {"name": "sasrec", "hidden": 16, "layers": 1, "max_len": 20}


@pytest.fixture
def home(tiny_csv, tmp_path):
    ws = make_tiny_home(tmp_path / "workspace", tiny_csv)
    store = dataset_store(ws)
    store.fork("tiny", "fork-a")
    store.fork("tiny", "fork-b")
    return ws


def _cfg(dataset: str, **kw) -> TrainConfig:
    return TrainConfig(dataset=dataset, version=0, model=TINY, epochs=2, patience=1, device="cpu",
                       progress=False, **kw)


def test_same_data_and_config_trains_once(home):
    a = train_model(_cfg("fork-a"), home, reuse=True)
    b = train_model(_cfg("fork-b"), home, reuse=True)
    assert not a.reused and b.reused
    assert b.dataset == "fork-b" and b.checkpoint == a.checkpoint  # one stored copy, by content key
    assert len(list((home.checkpoints / "by-content").glob("*.pt"))) == 1
    assert list(home.checkpoints.rglob("*.pt")) == list((home.checkpoints / "by-content").glob("*.pt"))
    assert a.name.startswith("sasrec-v0-seed0-") and a.name.endswith(f"-{Path(a.checkpoint).stem}.pt")
    assert b.valid == a.valid and b.curve == a.curve
    other_seed = train_model(_cfg("fork-b", seed=1), home, reuse=True)
    assert not other_seed.reused
    assert not train_model(_cfg("fork-b"), home, reuse=False).reused  # reuse is opt-in


def test_generation_is_shared_across_forks_and_checked_against_the_data(home):
    ckpt = train_model(_cfg("fork-a"), home, reuse=True).checkpoint
    params = GenerationParams(tau=10, seed=0, device="cpu")
    first = generate_step(str(home.root), "fork-a", 0, ckpt, params)
    again = generate_step(str(home.root), "fork-b", 0, ckpt, params)
    assert again.reused and again.path == first.path and again.dataset == "fork-b"
    accepted = filter_step(str(home.root), "fork-b", 0, first, FilterParams(tau=10, min_len=3))
    assert accepted.dataset == "fork-b" and "/fork-b/" in accepted.path
    assert read_table(accepted.path)[1]["generation"]["dataset"] == "fork-b"
    # Other data (fork-b v1 = v0 plus the accepted sequences) is refused, naming both digests.
    assert expand_step(str(home.root), accepted).version == 1
    with pytest.raises(RsirError, match="was made from data .* not from 'fork-b' v1"):
        filter_step(str(home.root), "fork-b", 1, first, FilterParams(tau=10, min_len=3))


def test_source_budget_is_a_seeded_sample(home):
    assert np.array_equal(sample_sources(5, None, 0), np.arange(5))
    assert np.array_equal(sample_sources(5, 9, 0), np.arange(5))
    s0, s0b, s1 = sample_sources(100, 10, 0), sample_sources(100, 10, 0), sample_sources(100, 10, 1)
    assert np.array_equal(s0, s0b) and not np.array_equal(s0, s1)
    assert len(np.unique(s0)) == 10 and np.all(np.diff(s0) > 0)
    ckpt = train_model(_cfg("fork-a"), home, reuse=True).checkpoint
    out = generate_step(str(home.root), "fork-a", 0, ckpt, GenerationParams(tau=10, seed=3, max_sources=12,
                                                                             device="cpu"))
    table, meta = read_table(out.path)
    sources = np.unique(table.column("source_index").to_numpy())
    assert meta["sources"] == 12 and np.array_equal(sources, sample_sources(150, 12, 3))
    seq_ids = dataset_store(home).load("fork-a", 0).sort("seq_id")["seq_id"].to_numpy()
    assert np.array_equal(np.unique(table.column("parent_seq_id").to_numpy()), seq_ids[sources])


def test_generation_tau_is_validated():
    with pytest.raises(ValueError, match="generation_tau needs fidelity"):
        RunConfig(fidelity=False, generation_tau=50)
    with pytest.raises(ValueError, match="must be >= tau"):
        RunConfig(tau=10, generation_tau=5)
    assert RunConfig(tau=3, generation_tau=50).generation_threshold == 50
    assert RunConfig(fidelity=False).generation_threshold is None
    assert RunConfig(tau=3).lineage_key() != RunConfig(tau=3, generation_tau=50).lineage_key()


@pytest.mark.prefect
def test_generating_at_a_looser_tau_then_filtering_gives_the_same_dataset(prefect_api, tiny_csv, tmp_path):
    """The trace makes generation at τ_max + re-filter at τ equivalent to generating at τ."""
    from flows.rsir import rsir

    ws = make_tiny_home(tmp_path / "workspace", tiny_csv)
    uri = f"sqlite:///{ws.root / 'mlflow.db'}"
    direct = rsir(K=1, tau=3, home=str(ws.root), tracking_uri=uri, **TINY_FLOW)
    loose = rsir(K=1, tau=3, generation_tau=100, home=str(ws.root), tracking_uri=uri, **TINY_FLOW)
    store = dataset_store(ws)
    assert direct["run_dataset"] != loose["run_dataset"]
    d1, l1 = store.manifest(direct["run_dataset"], 1), store.manifest(loose["run_dataset"], 1)
    assert l1.generation.params["tau"] == 100 and d1.generation.params["tau"] == 3
    assert d1.digest == l1.digest
    assert direct["iterations"][1]["test"] == loose["iterations"][1]["test"]  # θ_1: the same training
