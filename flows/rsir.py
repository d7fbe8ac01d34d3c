"""The `rsir` flow. Today: train and evaluate one backbone on one dataset (the main job of the
foundation); the RSIR loop over K iterations extends it."""

from __future__ import annotations

from prefect import flow

from rsir.config import TrainConfig
from rsir.workspace import resolve_home
from tasks.ingest import fetch_builtin_task
from tasks.train import train_task


@flow(name="rsir", log_prints=True)
def rsir(config: TrainConfig = TrainConfig(), home: str | None = None) -> dict:
    workspace = str(resolve_home(home))
    fetch_builtin_task(config.dataset, workspace)
    result = train_task(config, workspace)
    print(f"{config.model.name} on {config.dataset}: test ndcg@10 {result['test']['ndcg@10']:.4f} "
          f"recall@10 {result['test']['recall@10']:.4f}")
    return result
