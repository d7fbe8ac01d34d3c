"""Training and evaluation throughput per backbone on ml-100k (2-core CPU unless --device).

Prints sequences/s and positions/s of training (one epoch = every training window once) and
users/s of full-ranking evaluation; the last line is one JSON object with the figures.

    .venv/bin/python benchmarks/train_speed.py [--models sasrec] [--epochs 2] [--device auto]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import bench_workspace, peak_rss_mib, print_json_last, print_table  # noqa: E402
from models import backbone_names, build_model  # noqa: E402
from storage.dataset import dataset_store
from tasks.builtin import fetch_builtin  # noqa: E402
from tasks.config import TrainConfig  # noqa: E402
from tasks.evaluate import rank_users  # noqa: E402
from tasks.runtime import resolve_device, seed_everything  # noqa: E402
from tasks.split import TargetWeights, leave_one_out, training_windows  # noqa: E402
from tasks.train import epoch_batches, plan_epoch  # noqa: E402


def bench_model(name: str, split, num_items: int, epochs: int, device: torch.device, stride: int | None = None) -> dict:
    cfg = TrainConfig(dataset="ml-100k", model={"name": name}, progress=False, stride=stride)
    seed_everything(0)
    model = build_model(cfg.model, num_items).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    windows = training_windows(split.train, cfg.model.max_len, cfg.window_stride)
    weights = TargetWeights.of(windows, split.train_synthetic, cfg.synthetic_weight)
    rng = np.random.default_rng(0)
    model.train()
    start = time.perf_counter()
    for _ in range(epochs):
        plan = plan_epoch(windows, weights, cfg, rng)
        for inputs, targets, w in epoch_batches(split, windows, weights, plan):
            loss = model.loss(inputs.to(device), targets.to(device), w.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    rank_users(model, split.valid_input, split.valid_target, cfg.model.max_len, cfg.eval_batch_size,
               True, device)
    eval_s = time.perf_counter() - start
    return {
        "model": name,
        "stride": cfg.window_stride,
        "seconds_per_epoch": train_s / epochs,
        "sequences_per_s": len(windows) * epochs / train_s,
        "positions_per_s": windows.positions * epochs / train_s,
        "eval_users_per_s": split.num_users / eval_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=backbone_names())
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--strides", type=int, nargs="+", default=[None],
                        help="training-window strides to compare (default: the trainer's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    ws = bench_workspace()
    fetch_builtin(ws, "ml-100k")
    store = dataset_store(ws)
    manifest = store.manifest("ml-100k")
    split = leave_one_out(store.load("ml-100k"), manifest.num_items)
    rows = [bench_model(m, split, manifest.num_items, args.epochs, device, s) for m in args.models for s in args.strides]
    print_table(f"training / evaluation throughput on ml-100k, device {device}, "
                f"{torch.get_num_threads()} threads", rows)
    print_json_last({"benchmark": "train_speed", "device": str(device), "threads": torch.get_num_threads(),
                     "dataset": "ml-100k", "epochs": args.epochs, "peak_rss_mib": peak_rss_mib(),
                     "results": rows})


if __name__ == "__main__":
    main()
