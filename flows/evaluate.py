"""The `rsir-evaluate` flow (deployment `evaluate`): evaluate one stored checkpoint on a dataset
version. Wiring only: tasks/evaluate.py's task does the work and refuses a checkpoint trained on
another item table."""

from __future__ import annotations

from prefect import flow

from core.workspace import Workspace
from flows.boundary import boundary
from tasks.evaluate import Evaluation, evaluate_task


@flow(name="rsir-evaluate", log_prints=True)
def evaluate(checkpoint: str, dataset: str = "ml-100k", version: int | None = None, device: str = "auto",
             home: str | None = None) -> Evaluation:
    """Validation and test metrics of `checkpoint` (a path or URL written by `rsir train` or a
    run) on `dataset` v`version` (default: the latest), and its per-user ranks file under
    runs/<dataset>/v<version>/. Prints one line: the model, the dataset version, test NDCG@10
    and Recall@10."""
    from storage.dataset import dataset_store

    with boundary():  # a fault the user can fix: the flow run fails with its one line
        ws = Workspace.at(home)
        version = dataset_store(ws).manifest(dataset, version).version
        result = evaluate_task(ws.home, checkpoint, dataset, version, device).value
    print(f"{result.model} on {dataset} v{version}: test ndcg@10 {result.test['ndcg@10']:.4f} "
          f"recall@10 {result.test['recall@10']:.4f} ({result.checkpoint})")
    return result
