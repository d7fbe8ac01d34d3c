"""How much of the training objective synthetic sequences carry, under each trainer (no training).

For a dataset version with synthetic sequences (D_k, k >= 1): the share of the epoch's target
positions that are synthetic, and the share of the gradient weight they get under each batching
and loss weighting (mean over 5 epochs' batchings). An analysis script, not a speed benchmark;
the last line is one JSON object.

    RSIR_HOME=workspace .venv/bin/python benchmarks/synthetic_shares.py --dataset D --version 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import bench_workspace, print_json_last, print_table  # noqa: E402
from storage.dataset import dataset_store  # noqa: E402
from tasks.split import (  # noqa: E402
    BATCHINGS,
    TargetWeights,
    batch_scales,
    leave_one_out,
    synthetic_position_share,
    synthetic_weight_share,
    training_windows,
)

# (label, batching, weighting, stride, batch size)
TRAINERS = [
    ("old trainer (batch weighting, length batches, disjoint windows)", "length", "batch", 50, 128),
    ("default (position weighting, length batches, stride 25)", "length", "position", 25, 128),
    ("batch weighting, length batches, stride 25", "length", "batch", 25, 128),
    ("position weighting, random batches of 256 (release recipe)", "random", "position", 25, 256),
    ("batch weighting, random batches of 256", "random", "batch", 25, 256),
]


def shares(split, batching: str, weighting: str, stride: int, batch_size: int, max_len: int, epochs: int = 5
           ) -> dict:
    windows = training_windows(split.train, max_len, stride)
    weights = TargetWeights.of(windows, split.train_synthetic, 1.0)
    got = []
    for epoch in range(epochs):
        batches = BATCHINGS[batching](windows, batch_size, np.random.default_rng(epoch))
        position = synthetic_position_share(windows, weights)
        weight = synthetic_weight_share(windows, weights, batches, batch_scales(windows, weights, batches, weighting))
        mostly = np.mean([weights.synthetic[b].mean() > 0.5 for b in batches])
        got.append((position, weight, mostly))
    position, weight, mostly = np.mean(got, axis=0)
    return {"synthetic_position_share": round(float(position), 4), "synthetic_weight_share": round(float(weight), 4),
            "batches_mostly_synthetic": round(float(mostly), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--version", type=int, default=None)
    parser.add_argument("--max-len", type=int, default=50)
    args = parser.parse_args()
    store = dataset_store(bench_workspace())
    manifest = store.manifest(args.dataset, args.version)
    split = leave_one_out(store.load(args.dataset, manifest.version), manifest.num_items)
    rows = [{"trainer": label, **shares(split, *spec, max_len=args.max_len)} for label, *spec in TRAINERS]
    print_table(f"synthetic shares on {args.dataset} v{manifest.version}", rows)
    print_json_last({"benchmark": "synthetic_shares", "dataset": args.dataset, "version": manifest.version,
                     "digest": manifest.digest, "results": rows})


if __name__ == "__main__":
    main()
