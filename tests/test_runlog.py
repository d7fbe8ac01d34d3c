"""The run log's champion: the best θ by the configured early-stopping metric, the first of
equals (the registry's rule), not by a fixed metric."""

from __future__ import annotations

from tasks.config import RunConfig
from tasks.runlog import IterationRow, Logged, RunLog


def _log(early_stop: str, valid: list[dict[str, float]]) -> RunLog:
    log = RunLog(None, RunConfig(early_stop=early_stop), None, "tiny--0123456789", "0" * 64)
    log.logged = [Logged(k, f"run-{k}", f"model-{k}", IterationRow.model_construct(valid=scores)) for k, scores in enumerate(valid)]
    return log


def test_the_champion_follows_the_early_stopping_metric():
    valid = [{"ndcg@10": 0.30, "recall@20": 0.40}, {"ndcg@10": 0.20, "recall@20": 0.50},
             {"ndcg@10": 0.25, "recall@20": 0.45}]
    assert _log("ndcg@10", valid).champion().k == 0
    assert _log("recall@20", valid).champion().k == 1


def test_the_first_of_equals_is_the_champion():
    valid = [{"ndcg@20": 0.1}, {"ndcg@20": 0.3}, {"ndcg@20": 0.3}]
    assert _log("ndcg@20", valid).champion().k == 1
