"""`-K auto`: iterations that stop when validation stops improving (tasks/stopping.py), the
champion kept by validation, and the summary saying why the run stopped."""

from __future__ import annotations

import pytest

from tasks.config import RunConfig
from tasks.stopping import stop_reason
from tests.conftest import TINY_FLOW, make_tiny_home


def _auto(**given) -> RunConfig:
    return RunConfig.from_parameters({"K": "auto", **given})


def test_a_fixed_k_stops_after_theta_k_whatever_validation_does():
    cfg = RunConfig.from_parameters({"K": 2})
    assert stop_reason(cfg, [0.5]) is None and stop_reason(cfg, [0.5, 0.1]) is None
    assert stop_reason(cfg, [0.5, 0.1, 0.9]) == "ran the K=2 iterations asked"
    assert stop_reason(RunConfig.from_parameters({"K": 0}), [0.5]) == "ran the K=0 iterations asked"


def test_auto_goes_on_while_validation_beats_the_best_by_more_than_the_tolerance():
    cfg = _auto(k_max=3, k_tolerance=0.01)
    assert stop_reason(cfg, [0.05]) is None  # θ_0 always gets a θ_1
    assert stop_reason(cfg, [0.05, 0.0506]) is None  # +1.2%
    assert stop_reason(cfg, [0.05, 0.0504]) == ("stopped after k=1: validation ndcg@10 0.0504 did not improve "
                                                "on 0.0500 (k=0) by more than 1%")
    assert stop_reason(_auto(k_max=3), [0.06, 0.06]).startswith("stopped after k=1")  # a tie is no gain
    # compared with the best so far, not the last: θ_2 beats θ_0 but not θ_1
    assert stop_reason(_auto(k_max=3), [0.06, 0.07, 0.065]) == ("stopped after k=2: validation ndcg@10 0.0650 "
                                                                "did not improve on 0.0700 (k=1) by more than 0%")
    assert stop_reason(cfg, [0.05, 0.06, 0.07, 0.08]) == "reached the maximum K=3"


def test_auto_reads_the_early_stopping_metric_and_a_tolerance_of_minus_one_never_stops():
    assert stop_reason(_auto(early_stop="recall@20"), [0.2, 0.1]).startswith(
        "stopped after k=1: validation recall@20 0.1000")
    never = _auto(k_max=2, k_tolerance=-1)
    assert stop_reason(never, [0.5, 0.0]) is None
    assert stop_reason(never, [0.5, 0.0, 0.0]) == "reached the maximum K=2"
    with pytest.raises(ValueError):
        stop_reason(never, [])


def test_auto_keys_its_runs_apart_and_leaves_fixed_k_keys_alone():
    fixed, auto = RunConfig.from_parameters({"K": 5}), _auto()
    assert auto.lineage_key() == fixed.lineage_key()  # K is not in the lineage: the same data
    keys = {fixed.run_key("d0"), auto.run_key("d0"), _auto(k_max=3).run_key("d0"),
            _auto(k_tolerance=0.005).run_key("d0")}
    assert len(keys) == 4
    assert RunConfig.from_parameters({"K": "5"}).run_key("d0") == fixed.run_key("d0")
    assert auto.max_iterations == 5 and fixed.max_iterations == 5 and _auto(k_max=2).max_iterations == 2


# ------------------------------------------------------------------ the flow on tiny data
# Junk data for θ_1: no fidelity control, every rollout item from the global pool (p = 0) and the
# synthetic positions weighted 1000 times a real one, so θ_1 learns the rollouts, not the users.
JUNK = dict(fidelity=False, p=0.0, m=5, synthetic_weight=1000.0)


@pytest.mark.prefect
def test_auto_stops_at_k1_and_keeps_theta_0_when_validation_falls(prefect_api, tiny_csv, tmp_path):
    from flows.rsir import rsir

    ws = make_tiny_home(tmp_path / "workspace", tiny_csv)
    uri = f"sqlite:///{ws.root / 'mlflow.db'}"
    summary = rsir(K="auto", k_max=4, home=str(ws.root), tracking_uri=uri, **{**TINY_FLOW, **JUNK})
    rows = summary["iterations"]
    valid = [r["valid"]["ndcg@10"] for r in rows]
    assert [r["iteration"] for r in rows] == [0, 1] and summary["K"] == 1, valid
    assert valid[1] < valid[0]
    assert summary["champion"]["iteration"] == 0
    assert summary["stopped"] == (f"stopped after k=1: validation ndcg@10 {valid[1]:.4f} did not improve on "
                                  f"{valid[0]:.4f} (k=0) by more than 0%")
    from storage.dataset import dataset_store

    assert dataset_store(ws).versions(summary["run_dataset"]) == [0, 1]  # nothing generated after θ_1
    again = rsir(K="auto", k_max=4, home=str(ws.root), tracking_uri=uri, **{**TINY_FLOW, **JUNK})
    assert again["resubmitted"] and again["stopped"] == summary["stopped"]
    assert again["mlflow_run_id"] == summary["mlflow_run_id"]


@pytest.mark.prefect
def test_auto_with_tolerance_minus_one_reaches_the_maximum(prefect_api, tiny_csv, tmp_path):
    from flows.rsir import rsir
    from rsir.cli import format_table

    ws = make_tiny_home(tmp_path / "workspace", tiny_csv)
    uri = f"sqlite:///{ws.root / 'mlflow.db'}"
    summary = rsir(K="auto", k_max=2, k_tolerance=-1.0, home=str(ws.root), tracking_uri=uri,
                   **{**TINY_FLOW, **JUNK})
    assert [r["iteration"] for r in summary["iterations"]] == [0, 1, 2] and summary["K"] == 2
    assert summary["stopped"] == "reached the maximum K=2"
    valid = [r["valid"]["ndcg@10"] for r in summary["iterations"]]
    assert summary["champion"]["iteration"] == max(range(3), key=lambda k: (valid[k], -k))
    assert "stopped: reached the maximum K=2" in format_table(summary)


@pytest.mark.prefect
def test_a_killed_auto_run_resumes_to_the_same_stop(prefect_api, tiny_csv, tmp_path):
    """Killed once D_1 is committed, re-run: the reused θ_k score as before, so the rule stops
    where the uninterrupted run stopped, on the same data."""
    from flows.rsir import rsir
    from storage.dataset import dataset_store
    from tests.conftest import kill_after_first_expansion

    params = dict(K="auto", k_max=2, k_tolerance=-1.0, **{**TINY_FLOW, **JUNK})
    clean = make_tiny_home(tmp_path / "clean", tiny_csv)
    reference = rsir(home=str(clean.root), tracking_uri=f"sqlite:///{clean.root / 'mlflow.db'}", **params)
    ws = make_tiny_home(tmp_path / "crash", tiny_csv)
    tracking = f"sqlite:///{ws.root / 'mlflow.db'}"
    name = reference["run_dataset"]
    kill_after_first_expansion(ws, tracking, params, prefect_api, name)
    resumed = rsir(home=str(ws.root), tracking_uri=tracking, **params)
    digests = [[store.manifest(name, v).digest for v in store.versions(name)]
               for store in (dataset_store(clean), dataset_store(ws))]
    assert digests[0] == digests[1] and len(digests[0]) == 3
    assert [r["valid"] for r in resumed["iterations"]] == [r["valid"] for r in reference["iterations"]]
    assert resumed["stopped"] == reference["stopped"] == "reached the maximum K=2"
    assert resumed["iterations"][0]["reused"] and not resumed.get("resubmitted")


@pytest.mark.parametrize("args,needle", [(("-K", "often"), "K must be a whole number from 0 to 100 or auto"),
                                         (("-K", "auto", "--k-tolerance", "2"), "--k-tolerance 2.0: "),
                                         (("-K", "auto", "--k-max", "0"), "--k-max 0: ")])
def test_a_bad_k_is_one_line_before_anything_runs(cli, ws, args, needle):
    result = cli("run", "--dataset", "ml-100k-sparse", *args, "--home", ws.root)
    lines = [line for line in result.err.strip().splitlines() if line]
    assert result.code == 2 and len(lines) == 1 and needle in lines[0], result.err
    datasets = ws.root / "datasets"
    assert not datasets.exists() or not any(datasets.iterdir())  # nothing fetched or written
