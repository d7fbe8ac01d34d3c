"""Results of experiment arms, read back from MLflow (the system of record), and the paired
statistics the report needs: per-user ranks from each iteration's `ranks/` artifact, and a
bootstrap over users of the relative change between two models."""

from __future__ import annotations

import tempfile
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from storage.tracking import Tracker
from tasks.tune import STATE_TAG, STUDY_TAG, StudyOutcome

LABEL = "rsir.label."


def _finished(tracker: Tracker, filter_string: str = "") -> list[Any]:
    query = "attributes.status = 'FINISHED'" + (f" and {filter_string}" if filter_string else "")
    return tracker.search_runs(query)


def finished_lineages(tracker: Tracker) -> set[tuple[str, str]]:
    """(lineage key prefix, K as its tag holds it: "3", or "auto") of every finished `rsir` parent
    run of the experiment."""
    return {(r.data.tags["rsir.lineage"], r.data.tags["rsir.K"]) for r in _finished(tracker)
            if "rsir.lineage" in r.data.tags and "rsir.K" in r.data.tags}


# The RSIR settings a report names an arm by (RunConfig's fields, as the `rsir` run logs them).
RUN_SETTINGS = ("K", "tau", "p", "m", "synthetic_weight", "max_sources", "tau_schedule")


def collect_runs(tracker: Tracker) -> list[dict[str, Any]]:
    """One row per (arm, iteration k): the arm's labels, k, the iteration's MLflow metrics (keys as
    logged, '@' restored) and run ids. Where an arm finished more than once, the latest run wins."""
    runs = _finished(tracker)
    parents: dict[tuple, Any] = {}
    for r in runs:
        labels = {k.removeprefix(LABEL): v for k, v in r.data.tags.items() if k.startswith(LABEL)}
        if "arm" not in labels:
            continue
        key = tuple(sorted(labels.items()))
        if key not in parents or r.info.start_time > parents[key][0].info.start_time:
            parents[key] = (r, labels)
    children: dict[str, list[Any]] = {}
    for r in runs:
        parent = r.data.tags.get("mlflow.parentRunId")
        if parent:
            children.setdefault(parent, []).append(r)
    rows = []
    for parent, labels in parents.values():
        for child in children.get(parent.info.run_id, []):
            metrics = {k.replace("_at_", "@"): v for k, v in child.data.metrics.items()}
            rows.append({**labels, "k": int(child.data.tags.get("rsir.iteration", -1)), "run_id": child.info.run_id,
                         "parent_run_id": parent.info.run_id,
                         "arm_wall_seconds": parent.data.metrics.get("wall_seconds"),
                         # resolved where the run logged it (tag rsir.device), else as requested
                         "device": child.data.tags.get("rsir.device") or parent.data.params.get("device"),
                         "max_epochs": _number(parent.data.params.get("epochs")),
                         "patience": _number(parent.data.params.get("patience")),
                         # the arm's RSIR settings as its run logged them (text, as MLflow keeps params)
                         "settings": {k: parent.data.params[k] for k in RUN_SETTINGS if k in parent.data.params},
                         **metrics})
    return sorted(rows, key=lambda r: (r["dataset"], r["arm"], int(r["seed"]), r["k"]))


def _number(text: str | None) -> float | None:
    return float(text) if text is not None and _is_number(text) else None


def best_on_validation(rows: list[dict[str, Any]], dataset: str, sweep: str, k: int = 1) -> str:
    """The value of label `sweep` ('tau', 'p', 'trainer') whose iteration-k rows have the highest
    validation NDCG@10 averaged over seeds; the smallest value (numbers) or the first name wins
    a tie. The test split is never used."""
    scores: dict[str, list[float]] = {}
    for r in rows:
        if sweep in r and r.get("sweep", sweep) == sweep and r["dataset"] == dataset and r["k"] == k:
            scores.setdefault(r[sweep], []).append(r["valid/ndcg@10"])
    if not scores:
        raise ValueError(f"no finished {sweep} arm on {dataset!r} to choose the best {sweep} from")
    ordered = sorted(scores, key=lambda v: (float(v), v) if _is_number(v) else (float("inf"), v))
    return max(ordered, key=lambda v: sum(scores[v]) / len(scores[v]))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def user_ranks(tracker: Tracker, run_id: str, split: str = "test") -> np.ndarray:
    """Per-user target ranks an iteration logged under `ranks/` (users in seq_id order)."""
    files = tracker.artifact_files(run_id, "ranks")
    if len(files) != 1:
        raise ValueError(f"MLflow run {run_id} has {len(files)} files under ranks/, expected 1")
    with tempfile.TemporaryDirectory() as tmp:
        return pq.read_table(tracker.download_artifact(run_id, files[0], tmp)).column(f"{split}_rank").to_numpy()


def paired_bootstrap(arm: np.ndarray, base: np.ndarray, resamples: int = 2000, seed: int = 0
                     ) -> dict[str, float]:
    """Relative change mean(arm)/mean(base) - 1 over users, with a 95% percentile bootstrap
    interval from resampling users (pairs kept together). Inputs: (users,) per-user metrics,
    already averaged over seeds when there are several."""
    arm, base = np.asarray(arm, dtype=np.float64), np.asarray(base, dtype=np.float64)
    if arm.shape != base.shape or arm.ndim != 1 or len(arm) == 0:
        raise ValueError(f"paired metrics need equal non-empty 1-d shapes, got {arm.shape} and {base.shape}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(arm), size=(resamples, len(arm)))
    a, b = arm[idx].mean(axis=1), base[idx].mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(b > 0, a / b - 1.0, np.nan)
    point = arm.mean() / base.mean() - 1.0 if base.mean() > 0 else float("nan")
    lo, hi = np.nanpercentile(rel, [2.5, 97.5]) if np.isfinite(rel).any() else (float("nan"), float("nan"))
    return {"relative_change": float(point), "ci_low": float(lo), "ci_high": float(hi),
            "diff": float(arm.mean() - base.mean())}


def study_outcome(tracker: Tracker, study: str | None = None, dataset: str | None = None) -> StudyOutcome | None:
    """A tuning study's outcome as its MLflow run logged it last, found by the study's name or by
    the dataset it tuned on (its run's `dataset` parameter; a suite's study is found so before any
    arm used it); of several runs, the one whose trials ended most (a study restarted in a new
    workspace starts a new run). None before any worker finished."""
    if (study is None) == (dataset is None):
        raise ValueError("study_outcome takes a study name or a dataset, one of them")
    found = f"tags.`{STUDY_TAG}` = '{study}'" if study is not None else \
        f"params.dataset = '{dataset}' and tags.`{STUDY_TAG}` LIKE '%'"
    # Its trials' runs carry the tag too (and a trial archived without its study run has no parent).
    outcomes = [StudyOutcome.of(r) for r in _finished(tracker, found)
                if "mlflow.parentRunId" not in r.data.tags and STATE_TAG not in r.data.tags]
    return max(outcomes, key=lambda o: o.ended, default=None)
