"""Does the rank rule of issue 21 (ties count against the target, tasks/ranking.py) move a figure
that was measured under the old one (1 + #strictly higher)? The two differ only where another
item's score equals the target's (or, in generation, the best remaining real item's), so this
script trains each backbone the way the published runs did (the default recipe, fewer epochs)
and counts, on validation and test, the users whose rank differs and the metrics under both
rules; then it generates with both rules and compares the rollouts and fidelity traces.

    python benchmarks/rank_rule.py --dataset ml-100k --epochs 10 --threads 1

No figure printed by the reports changes iff every 'differing' count is 0 (metrics are printed
to 4 digits; a difference would have to come from ties)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tasks.decoding as decoding  # noqa: E402
from benchmarks._common import bench_workspace, print_json_last, print_table  # noqa: E402
from models import build_model  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from storage.dataset import dataset_store  # noqa: E402
from tasks.builtin import fetch_builtin  # noqa: E402
from tasks.config import TrainConfig  # noqa: E402
from tasks.evaluate import metrics_from_ranks  # noqa: E402
from tasks.generate import generate_rollouts  # noqa: E402
from tasks.ragged import Ragged  # noqa: E402
from tasks.rollout import GenerationParams  # noqa: E402
from tasks.runtime import torch_threads  # noqa: E402
from tasks.split import leave_one_out  # noqa: E402
from tasks.train import fit  # noqa: E402


def strict_ranks(model, split, which: str, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(old rank 1 + #higher, new rank 1 + #others at least as high) of every user's target."""
    inputs, targets = (split.valid_input, split.valid_target) if which == "valid" else (split.test_input,
                                                                                        split.test_target)
    old, new = [], []
    model.eval()
    with torch.no_grad():
        for lo in range(0, len(targets), 512):
            rows = np.arange(lo, min(lo + 512, len(targets)))
            scores = model.score_last(inputs.tails(rows, max_len)).float()
            scores[:, 0] = float("-inf")
            r, c = (torch.from_numpy(a) for a in inputs.pairs(rows))
            t = torch.from_numpy(targets[rows])
            target = scores.gather(1, t[:, None])
            scores[r, c] = float("-inf")
            scores.scatter_(1, t[:, None], float("-inf"))
            old.append((1 + (scores > target).sum(1)).numpy())
            new.append((1 + (scores >= target).sum(1)).numpy())
    return np.concatenate(old), np.concatenate(new)


def strict_best_rank(scores, top, tile=None):
    return 1 + (scores > top[:, None]).sum(dim=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="ml-100k")
    ap.add_argument("--backbones", nargs="+", default=["sasrec", "cl4srec", "hstu"])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--sources", type=int, default=300, help="generation sources (users) compared")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch_threads(args.threads)
    ws = bench_workspace()
    store = dataset_store(ws)
    if args.dataset not in store.names():
        fetch_builtin(ws, args.dataset)
    manifest = store.manifest(args.dataset)
    split = leave_one_out(store.load(args.dataset, manifest.version), manifest.num_items)
    rows, summary = [], {}
    for backbone in args.backbones:
        cfg = TrainConfig(dataset=args.dataset, model=ModelConfig(name=backbone), epochs=args.epochs,
                          patience=args.epochs, seed=0, progress=False, threads=args.threads)
        torch.manual_seed(0)
        model = build_model(cfg.model, manifest.num_items)
        fit(model, split, cfg, torch.device("cpu"))
        for which in ("valid", "test"):
            old, new = strict_ranks(model, split, which, cfg.model.max_len)
            m_old, m_new = metrics_from_ranks(old), metrics_from_ranks(new)
            rows.append({"backbone": backbone, "split": which, "users": len(old),
                         "differing": int((old != new).sum()),
                         "ndcg@10 old": f"{m_old['ndcg@10']:.4f}", "ndcg@10 new": f"{m_new['ndcg@10']:.4f}",
                         "recall@10 old": f"{m_old['recall@10']:.4f}", "recall@10 new": f"{m_new['recall@10']:.4f}"})
        n = min(args.sources, len(split.train))
        sources = Ragged(split.train.values[: split.train.offsets[n]], split.train.offsets[: n + 1])
        params = GenerationParams(m=5, tau=10, p=0.5, seed=0)
        new_out = generate_rollouts(model, sources, params)
        saved = decoding.best_rank
        decoding.best_rank = strict_best_rank  # the old rule, FullStep only (catalogues < item_chunk)
        try:
            old_out = generate_rollouts(model, sources, params)
        finally:
            decoding.best_rank = saved
        same = (np.array_equal(new_out.items.values, old_out.items.values)
                and np.array_equal(new_out.trace.values, old_out.trace.values)
                and np.array_equal(new_out.stop_reason, old_out.stop_reason))
        summary[backbone] = {"rollouts": len(new_out), "identical_generation": same}
    print_table(f"rank rule, old (strict) vs new (ties against), {args.dataset}, {args.epochs} epochs", rows)
    print_table("generation (tau=10, p=0.5, m=5)", [{"backbone": b, **v} for b, v in summary.items()])
    print_json_last({"ranks": rows, "generation": summary})


if __name__ == "__main__":
    main()
