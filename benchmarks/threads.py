"""Seconds of one fixed small training with 1, 2 and torch's default CPU threads, on an idle and
on a loaded machine (what chose `threads`' default of 1 in tasks/config.py).

The training: SASRec with its default settings on ml-100k, the first `--batches` batches of an
epoch (same seed, same batches for every setting). Each measurement is a fresh process (torch
keeps its thread pool for the life of a process); settings are interleaved, `--repeats` times,
so that a change of the machine's load during the run touches every setting alike. "Loaded"
adds one busy-loop process per core for the duration of the measurement (on top of whatever
already runs: the script prints the load average). Ratios are to 1 thread in the same condition.

    .venv/bin/python benchmarks/threads.py [--repeats 3] [--batches 40]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DEFAULT = 0  # the setting "torch's default": set_num_threads is never called


def train_seconds(threads: int, batches: int) -> dict:
    """In this (fresh) process: `batches` training batches of the default SASRec on ml-100k."""
    import numpy as np
    import torch

    from benchmarks._common import bench_workspace
    from models import build_model
    from storage.dataset import dataset_store
    from tasks.builtin import fetch_builtin
    from tasks.config import TrainConfig
    from tasks.runtime import seed_everything
    from tasks.split import TargetWeights, leave_one_out, training_windows
    from tasks.train import epoch_batches, plan_epoch

    if threads != DEFAULT:
        torch.set_num_threads(threads)
    ws = bench_workspace()
    fetch_builtin(ws, "ml-100k")
    store = dataset_store(ws)
    manifest = store.manifest("ml-100k")
    split = leave_one_out(store.load("ml-100k"), manifest.num_items)
    cfg = TrainConfig(dataset="ml-100k", progress=False)
    seed_everything(0)
    model = build_model(cfg.model, manifest.num_items)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    windows = training_windows(split.train, cfg.model.max_len, cfg.window_stride)
    weights = TargetWeights.of(windows, split.train_synthetic, cfg.synthetic_weight)
    plan = plan_epoch(windows, weights, cfg, np.random.default_rng(0))
    model.train()
    start = time.perf_counter()
    for i, (inputs, targets, w) in enumerate(epoch_batches(split, windows, weights, plan)):
        if i == batches:
            break
        loss = model.loss(inputs, targets, w)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return {"threads": torch.get_num_threads(), "seconds": time.perf_counter() - start}


def measure(threads: int, batches: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", str(threads), "--batches", str(batches)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def busy_loops(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(train_seconds(args.worker, args.batches)))
        return
    cores = len(os.sched_getaffinity(0))
    settings = {"1": 1, "2": 2, "default": DEFAULT}
    measure(1, 1)  # warm the dataset (fetched once) and the file cache
    results: dict[str, dict[str, list[float]]] = {"idle": {}, "loaded": {}}
    resolved: dict[str, int] = {}
    for condition in results:
        print(f"{condition}: load average {os.getloadavg()[0]:.2f} on {cores} cores before", flush=True)
        for _ in range(args.repeats):
            for name, threads in settings.items():
                load = busy_loops(cores) if condition == "loaded" else []
                try:
                    got = measure(threads, args.batches)
                finally:
                    for proc in load:
                        proc.kill()
                        proc.wait()
                resolved[name] = got["threads"]
                results[condition].setdefault(name, []).append(got["seconds"])
                print(f"  {condition:<6} threads={name:<7} ({got['threads']}) {got['seconds']:.2f} s", flush=True)
    print(f"\nmedian seconds for {args.batches} training batches (SASRec, ml-100k), {args.repeats} repeats; "
          f"torch's default here = {resolved['default']} threads")
    print(f"{'condition':<9} " + " ".join(f"{n:>16}" for n in settings))
    summary = {}
    for condition, by_setting in results.items():
        medians = {n: statistics.median(v) for n, v in by_setting.items()}
        summary[condition] = {n: {"median_s": m, "ratio_to_1": m / medians["1"]} for n, m in medians.items()}
        print(f"{condition:<9} " + " ".join(f"{m:>8.2f} s ({m / medians['1']:.2f}x)" for m in medians.values()))
    print(json.dumps({"benchmark": "threads", "cores": cores, "batches": args.batches, "repeats": args.repeats,
                      "default_threads": resolved["default"], "results": summary, "raw": results}))


if __name__ == "__main__":
    main()
