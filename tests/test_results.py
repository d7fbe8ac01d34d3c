"""The report's statistics: per-user metrics from ranks, the paired bootstrap, and verdicts."""

from __future__ import annotations

import numpy as np
import pytest

from reporting.report import seconds, verdict
from reporting.results import paired_bootstrap
from tasks.evaluate import metric_names, metrics_from_ranks, per_user_metric


def test_per_user_metrics_average_to_the_reported_metrics():
    ranks = np.random.default_rng(0).integers(1, 60, size=500)
    reported = metrics_from_ranks(ranks)
    for metric in metric_names():
        assert per_user_metric(ranks, metric).mean() == pytest.approx(reported[metric])
    # By hand: ranks 1, 3, 30 -> ndcg@10 = (1 + 1/log2(4) + 0) / 3, mrr@20 = (1 + 1/3 + 0) / 3.
    by_hand = metrics_from_ranks(np.array([1, 3, 30]))
    assert by_hand["ndcg@10"] == pytest.approx((1 + 0.5) / 3) and by_hand["mrr@20"] == pytest.approx((4 / 3) / 3)
    with pytest.raises(ValueError, match="unknown metric"):
        per_user_metric(ranks, "map@10")


def test_paired_bootstrap_interval():
    rng = np.random.default_rng(1)
    base = rng.random(2000)
    same = paired_bootstrap(base, base)
    assert same["relative_change"] == 0 and same["ci_low"] == 0 and same["ci_high"] == 0
    better = paired_bootstrap(base * 1.1, base)
    assert better["relative_change"] == pytest.approx(0.1)
    assert 0 < better["ci_low"] <= 0.1 <= better["ci_high"]
    noisy = paired_bootstrap(base + rng.normal(0, 0.5, 2000), base)  # pure noise: the interval covers 0
    assert noisy["ci_low"] < 0 < noisy["ci_high"]
    assert paired_bootstrap(base * 1.1, base) == better  # seeded: reproducible
    with pytest.raises(ValueError, match="equal non-empty"):
        paired_bootstrap(base[:10], base[:11])


@pytest.mark.parametrize("ci, seeds, direction, expected", [
    ((0.01, 0.2), [0.05, 0.1, 0.02], 1, "**held**"),
    ((0.01, 0.2), [0.05, -0.1, 0.02], 1, "seeds disagree"),
    ((-0.1, 0.2), [0.05, 0.1, 0.02], 1, "no significant change"),
    ((-0.3, -0.1), [-0.2, -0.1, -0.3], 1, "**contradicted**"),
    ((-0.3, -0.1), [-0.2, -0.1, -0.3], -1, "**held**"),  # a claimed loss (collapse) that happened
    ((0.1, 0.3), [0.2, 0.1, 0.3], -1, "**contradicted**"),
])
def test_verdict_needs_the_interval_and_every_seed(ci, seeds, direction, expected):
    c = {"relative_change": float(np.mean(ci)), "ci_low": ci[0], "ci_high": ci[1], "per_seed": seeds}
    assert expected in verdict(c, direction)


def test_epoch_column_counts_only_trainings_the_cap_cut():
    from reporting.report import _epochs

    def row(epochs, best, cap=30, patience=10):
        return {"train/epochs": epochs, "train/best_epoch": best, "max_epochs": cap, "patience": patience}

    # Cut: ran to the cap, best epoch within patience. Not cut: early stopping fired exactly at
    # the cap (best 20, patience 10), or well before it.
    assert _epochs([row(30, 28), row(30, 20), row(15, 5)]) == "25 (best 18; cut 1/3)"
    assert _epochs([{**row(30, 28), "max_epochs": None}]) == "30 (best 28)"  # arms logged without a cap
    assert _epochs([]) == "–"


def test_train_seconds_are_never_averaged_across_devices():
    """A table's seconds column keeps CPU and GPU runs apart: one mean per device, named."""
    rows = [{"device": "cpu", "time/train": 1000.0}, {"device": "cpu", "time/train": 1200.0},
            {"device": "cuda", "time/train": 40.0}, {"device": "cuda", "time/train": None}]
    assert seconds(rows) == "1100 ± 141 (cpu); 40 ± 0 (cuda)"
    assert seconds([{"device": "auto", "time/train": 37.4}]) == "37 ± 0 (auto)"
    assert seconds([{"device": "cpu"}]) == "–"


def test_tau_per_iteration_falls_back_to_the_runs_fixed_tau():
    from reporting.report import _arm_settings, _taus

    fixed = {"tau": "10", "p": "0.5", "m": "5", "K": "1", "max_sources": "None"}  # logged before tau_schedule
    rows = [{"k": 0, "settings": fixed}, {"k": 1, "settings": fixed}]
    assert _taus(rows) == [10.0]  # only k = 0 generated
    chosen = [{"k": 0, "generation/tau": 3.0, "settings": {**fixed, "tau_schedule": "leakage"}},
              {"k": 1, "settings": {**fixed, "tau_schedule": "leakage"}}]
    assert _taus(chosen) == [3.0]
    unknown = [{"k": 0, "settings": {**fixed, "tau_schedule": "validation"}}, {"k": 1, "settings": fixed}]
    assert _taus(unknown) == []  # a chosen τ is never guessed from the parameter
    # A run before the knob and one after it, at the same settings, are one arm's settings.
    assert _arm_settings("fixed", rows + [{"k": 0, "settings": {**fixed, "tau_schedule": "fixed"}}], None) \
        == "tau=10, p=0.5, m=5"
    assert _arm_settings("fixed", [{"k": 0, "settings": fixed}, {"k": 0, "settings": {**fixed, "m": "6"}}],
                         None) == "differ by seed"
