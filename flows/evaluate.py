"""The `rsir-evaluate` flow: evaluate one stored checkpoint on a dataset version."""

from __future__ import annotations

from typing import Any

from prefect import flow

from core.workspace import Workspace
from tasks.evaluate import evaluate_task


@flow(name="rsir-evaluate", log_prints=True)
def evaluate(checkpoint: str, dataset: str = "ml-100k", version: int | None = None, device: str = "auto",
             home: str | None = None) -> dict[str, Any]:
    from storage.dataset import dataset_store

    ws = Workspace.at(home)
    version = dataset_store(ws).manifest(dataset, version).version
    result = evaluate_task(ws.home, checkpoint, dataset, version, device)
    print(f"{result['model']} on {dataset} v{version}: test ndcg@10 {result['test']['ndcg@10']:.4f} "
          f"recall@10 {result['test']['recall@10']:.4f}")
    return result
