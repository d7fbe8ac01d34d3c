"""Adaptive fidelity (`--tau-schedule`): the leakage proxy (tasks/leakage.py), the two schedules
(tasks/tau_schedule.py), what a run logs of them, and the keys of fixed-τ runs left alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from core.config import key_fields
from core.errors import RsirError
from core.hashing import json_digest
from models import SequentialRecommender
from models.config import ModelConfig
from tasks.checkpoints import load_checkpoint
from tasks.config import RunConfig
from tasks.evaluate import evaluate_split
from tasks.leakage import Leakage, next_item_ranks
from tasks.ragged import Ragged
from tasks.split import leave_one_out
from tasks.tau_schedule import best_on_validation, leakage_tau
from tasks.train import checkpoint_path, content_key
from tests.conftest import TINY_FLOW, make_tiny_home

NEW_KNOBS = ("tau_schedule", "leakage_max", "tau_candidates")


# ------------------------------------------------------------------ keys
def test_a_fixed_schedule_keeps_the_keys_of_runs_made_before_it():
    fixed = RunConfig.from_parameters({"K": 2})
    assert not set(NEW_KNOBS) & set(key_fields(fixed))
    # The lineage key as code without the schedule computed it: the fields before, nothing more.
    before = {k: v for k, v in fixed.model_dump(mode="json").items() if k in key_fields(fixed)}
    assert fixed.lineage_key() == json_digest({**before, "generator": fixed.generator_model.model_dump(mode="json")})
    # A schedule's knob left idle changes nothing; a schedule keys its run apart, with its own knob only.
    idle = RunConfig.from_parameters({"K": 2, "leakage_max": 0.1, "tau_candidates": [1, 2]})
    assert idle.lineage_key() == fixed.lineage_key() and idle.run_key("d0") == fixed.run_key("d0")
    leakage = RunConfig.from_parameters({"tau_schedule": "leakage"})
    validation = RunConfig.from_parameters({"tau_schedule": "validation"})
    assert len({fixed.lineage_key(), leakage.lineage_key(), validation.lineage_key()}) == 3
    assert RunConfig.from_parameters({"tau_schedule": "leakage", "tau_candidates": [3]}).lineage_key() == \
        leakage.lineage_key()
    assert RunConfig.from_parameters({"tau_schedule": "leakage", "leakage_max": 0.2}).lineage_key() != \
        leakage.lineage_key()
    assert fixed.generation_params(0) == RunConfig.from_parameters({"K": 2}).generation_params(0, None)


def test_the_validation_schedule_generates_once_at_its_loosest_candidate():
    cfg = RunConfig.from_parameters({"tau_schedule": "validation", "tau": 12})
    assert cfg.taus_tried == [4, 12, 36] and cfg.generation_params(3).tau == 36
    given = RunConfig.from_parameters({"tau_schedule": "validation", "tau_candidates": [30, 3, 3, 10]})
    assert given.taus_tried == [3, 10, 30]
    with pytest.raises(RsirError, match="generation_tau=20 must be >= tau=30"):
        RunConfig.from_parameters({"tau_schedule": "validation", "tau_candidates": [3, 30], "generation_tau": 20})
    leakage = RunConfig.from_parameters({"tau_schedule": "leakage"})
    assert leakage.generation_params(1, 5).tau == 5 and leakage.filter_params(5).tau == 5


# ------------------------------------------------------------------ the proxy on a known model
class Transitions(SequentialRecommender):
    """Scores after item i = row i of a table written by hand (item vectors = the identity)."""

    def __init__(self, table: torch.Tensor, max_len: int = 10):
        n = table.shape[0] - 1
        super().__init__(ModelConfig(hidden=n + 1, max_len=max_len), n)
        self.table = table
        with torch.no_grad():
            self.item_emb.weight.copy_(torch.eye(n + 1))

    def encode(self, seqs: torch.Tensor) -> torch.Tensor:
        return self.table[seqs]


def _five_items() -> Transitions:
    table = torch.zeros(6, 6)
    table[1] = torch.tensor([0.0, 1, 5, 4, 3, 2])  # after 1: item 2 ranks 1st, item 5 4th
    table[2] = torch.tensor([0.0, 4, 3, 0, 2, 1])  # after 2: item 3 ranks last (5th)
    table[5] = torch.tensor([0.0, 1, 1, 1, 1, 1])  # after 5: all tie, so every item ranks 5th
    return Transitions(table)


def test_the_proxy_ranks_each_next_item_given_the_items_before_it():
    seqs = Ragged(np.array([1, 2, 3, 1, 5, 1, 5, 4]), np.array([0, 3, 5, 5, 8]))  # [1,2,3] [1,5] [] [1,5,4]
    ranks = next_item_ranks(_five_items(), seqs, batch_size=2)
    assert ranks.tolist() == [1, 5, 4, 4, 5]  # 2|1, 3|2, 5|1, 5|1, 4|5 (ties count against the target)
    assert int((ranks > 4).sum()) == 2 and int((ranks > 3).sum()) == 4
    # Longer than max_len: ranked on its newest max_len items (here [2, 3]: one position).
    assert next_item_ranks(Transitions(_five_items().table, max_len=2), seqs.take(np.array([0]))).tolist() == [5]
    assert next_item_ranks(_five_items(), Ragged(np.zeros(0, np.int64), np.array([0]))).tolist() == []


# ------------------------------------------------------------------ the rules
def test_the_leakage_rule_halves_tau_past_the_breakdown_and_keeps_it_below():
    cfg = RunConfig.from_parameters({"tau_schedule": "leakage", "tau": 10, "leakage_max": 0.5})
    assert leakage_tau(cfg, None).tau == 10  # iteration 0: no synthetic data yet
    assert leakage_tau(cfg, Leakage(version=1, tau=10, ranked=10, worse=6)).tau == 5
    assert leakage_tau(cfg, Leakage(version=2, tau=5, ranked=10, worse=5)).tau == 5  # 0.5 is not past 0.5
    assert leakage_tau(cfg, Leakage(version=3, tau=1, ranked=10, worse=10)).tau == 1  # never below 1
    assert leakage_tau(cfg, Leakage(version=1, tau=10, ranked=0, worse=0)).tau == 10  # nothing accepted
    # Fidelity off (the paper's ablation): no threshold is chosen, whatever tau says.
    assert leakage_tau(RunConfig.from_parameters({"fidelity": False}), None) is None
    fixed = RunConfig.from_parameters({"tau": 7, "leakage_max": 0.0})
    assert leakage_tau(fixed, Leakage(version=1, tau=7, ranked=10, worse=10)).tau == 7


def test_the_validation_rule_takes_the_best_candidate_and_the_tighter_of_equals():
    cfg = RunConfig.from_parameters({"tau_schedule": "validation"})
    assert best_on_validation(cfg, {3: 0.10, 10: 0.12, 30: 0.11}).tau == 10
    assert best_on_validation(cfg, {3: 0.12, 10: 0.12, 30: 0.11}).tau == 3
    with pytest.raises(ValueError):
        best_on_validation(cfg, {})


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("args,needle", [(("--tau-schedule", "sometimes"), "--tau-schedule sometimes: "),
                                         (("--leakage-max", "1.5"), "--leakage-max 1.5: "),
                                         (("--leakage-max", "-0.1"), "--leakage-max -0.1: "),
                                         (("--tau-schedule", "validation", "--tau-candidates", "0"), "--tau-candidates 0: "),
                                         (("--tau-schedule", "leakage", "--no-fidelity"), "fidelity control on")])
def test_a_bad_schedule_is_one_line_before_anything_runs(cli, ws, args, needle):
    result = cli("run", "--dataset", "ml-100k-sparse", *args, "--home", ws.root)
    lines = [line for line in result.err.strip().splitlines() if line]
    assert result.code == 2 and len(lines) == 1 and needle in lines[0], result.err
    datasets = ws.root / "datasets"
    assert not datasets.exists() or not any(datasets.iterdir())


def test_no_candidates_is_refused():
    with pytest.raises(RsirError, match="invalid parameter 'tau_candidates'"):
        RunConfig.from_parameters({"tau_schedule": "validation", "tau_candidates": []})


# ------------------------------------------------------------------ the flow on tiny data
def _history(uri: str, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in MlflowClient(uri).get_metric_history(run_id, key)}


@pytest.mark.prefect
@pytest.mark.parametrize("leakage_max,taus", [(0.0, [10, 5]), (1.0, [10, 10])])
def test_the_leakage_schedule_halves_tau_when_the_proxy_exceeds_the_maximum(prefect_api, tiny_csv, tmp_path,
                                                                             leakage_max, taus):
    from flows.rsir import rsir
    from rsir.cli import format_table
    from storage.dataset import dataset_store

    ws = make_tiny_home(tmp_path / "workspace", tiny_csv)
    uri = f"sqlite:///{ws.root / 'mlflow.db'}"
    summary = rsir(K=2, tau_schedule="leakage", leakage_max=leakage_max, home=str(ws.root), tracking_uri=uri,
                   **TINY_FLOW)
    rows = summary["iterations"]
    proxies = [r["leakage_proxy"] for r in rows]
    assert proxies[0] is None and all(0.0 < p <= 1.0 for p in proxies[1:]), proxies
    assert [r["tau"] for r in rows] == [*taus, None]
    store = dataset_store(ws)
    assert [store.manifest(summary["run_dataset"], v).generation.filter.tau for v in (1, 2)] == taus
    parent = summary["mlflow_run_id"]
    assert _history(uri, parent, "generation/tau") == {0: taus[0], 1: taus[1]}
    assert _history(uri, parent, "generation/leakage_proxy") == pytest.approx({1: proxies[1], 2: proxies[2]})
    assert _history(uri, parent, "generation/leakage_tau") == {1: taus[0], 2: taus[1]}
    header = format_table(summary).splitlines()[0].split()
    assert "tau" in header and "leakage" in header


@pytest.mark.prefect
def test_the_validation_schedule_keeps_the_candidate_that_validates_best(prefect_api, tiny_csv, tmp_path):
    from flows.rsir import rsir
    from storage.dataset import dataset_store

    ws = make_tiny_home(tmp_path / "workspace", tiny_csv)
    uri = f"sqlite:///{ws.root / 'mlflow.db'}"
    params = dict(tau_schedule="validation", tau_candidates=[1, 40], **TINY_FLOW)
    summary = rsir(K=1, home=str(ws.root), tracking_uri=uri, **params)
    rows, parent, store = summary["iterations"], summary["mlflow_run_id"], dataset_store(ws)
    run_cfg = RunConfig.from_parameters(params)
    # Each candidate's score, evaluated afresh from its scratch fork's θ_1 (the rule read its curve).
    scores = {}
    for tau in (1, 40):
        scratch = f"{summary['run_dataset']}--k0-tau{tau}"
        assert store.versions(scratch) == [0, 1]
        manifest = store.manifest(scratch, 1)
        cfg = run_cfg.train_config(scratch, 1, run_cfg.model)
        model, _ = load_checkpoint(str(checkpoint_path(ws, content_key(cfg, manifest.digest))),
                                   items=store.item_table(manifest))
        split = leave_one_out(store.load(scratch, 1), manifest.num_items)
        scores[tau] = evaluate_split(model, split, "valid", cfg.model.max_len)["ndcg@10"]
        assert _history(uri, parent, f"generation/tau_valid_{tau}") == pytest.approx({0: scores[tau]}, abs=1e-6)
    assert store.manifest(f"{summary['run_dataset']}--k0-tau1", 1).digest != store.manifest(
        f"{summary['run_dataset']}--k0-tau40", 1).digest  # the candidates' data differ: a real choice
    best = max((1, 40), key=lambda t: (scores[t], -t))
    assert rows[0]["tau"] == best and _history(uri, parent, "generation/tau") == {0: best}
    # The run's D_1 is the winner's scratch D_1, and θ_1 is the winner's checkpoint, not a new training.
    assert store.manifest(summary["run_dataset"], 1).digest == store.manifest(
        f"{summary['run_dataset']}--k0-tau{best}", 1).digest
    assert store.versions(summary["run_dataset"]) == [0, 1] and rows[1]["reused"]
    assert rows[1]["leakage_proxy"] is not None
