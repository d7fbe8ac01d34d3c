"""Scale benchmark: generation and evaluation throughput of the local executor against Ray with
1 and 2 workers, on a generated dataset of the size users have.

    .venv/bin/python benchmarks/scale.py [--sequences 1000000] [--items 100000] [--sources 4000]

Data: `--sequences` user sequences over `--items` items; lengths from a discretised log-normal
(long-tailed like Amazon's, mean ~9, at least 3), items from a Zipf-like popularity (exponent
1.1). Model: SASRec (d = 64, 2 layers, max_len 50) with random weights; generation runs with
fidelity off (tau = None), so rollouts go on until the user's items are used up or max_len,
the lengths a trained model's accepted rollouts reach, instead of stopping at the first check
as an untrained model's would. Timed: generation from the first `--sources` sequences (m = 5)
and evaluation of `--users` users, each on the local executor (one process, torch's threads)
and on a local Ray cluster with 1 and 2 tasks (one thread each); outputs are checked equal.
Reported: rollouts/s, items/s, users/s, peak RSS of the driver and of each Ray worker, and
Ray's start-up time. Run it alone: other load distorts the ratios."""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models import build_model  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from tasks.evaluate import rank_users  # noqa: E402
from tasks.executor import Executor, map_shards  # noqa: E402
from tasks.generate import generate_rollouts  # noqa: E402
from tasks.ragged import Ragged  # noqa: E402
from tasks.rollout import GenerationParams  # noqa: E402


def synthetic_sequences(n: int, items: int, seed: int) -> Ragged:
    """n sequences, long-tailed lengths (mean ~9, >= 3), Zipf-like item popularity."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(mean=1.9, sigma=0.75, size=n)), 3, 500).astype(np.int64)
    popularity = 1.0 / np.arange(1, items + 1) ** 1.1
    values = rng.choice(np.arange(1, items + 1), size=int(lengths.sum()), p=popularity / popularity.sum())
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return Ragged(values.astype(np.int64), offsets)


def head(rows: Ragged, n: int) -> Ragged:
    return Ragged(rows.values[: rows.offsets[n]], rows.offsets[: n + 1])


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_peak(_: int) -> float:
    """Run inside a Ray worker: that process's peak RSS so far."""
    return peak_rss_mib()


def timed(fn):
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--sources", type=int, default=4000, help="generation sources timed")
    parser.add_argument("--users", type=int, default=50_000, help="users evaluated")
    parser.add_argument("--batch-size", type=int, default=512)
    args = parser.parse_args()

    data, build_s = timed(lambda: synthetic_sequences(args.sequences, args.items, seed=0))
    lengths = np.diff(data.offsets)
    print(f"data: {args.sequences:,} sequences over {args.items:,} items, mean length {lengths.mean():.2f}, "
          f"max {lengths.max()}, {len(data.values):,} interactions (built in {build_s:.1f} s)")
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="sasrec", hidden=64, layers=2, heads=2, max_len=50, dropout=0.0),
                        args.items)
    sources = head(data, args.sources)
    params = GenerationParams(m=5, tau=None, p=0.5, seed=0, batch_size=args.batch_size, max_len=50)
    users = min(args.users, args.sequences)
    first = data.values[: data.offsets[users]]  # each user's input: the sequence without its last item
    inputs = Ragged(np.delete(first, data.offsets[1:users + 1] - 1), data.offsets[: users + 1] - np.arange(users + 1))
    targets = data.values[data.offsets[1:users + 1] - 1]

    import ray

    rows = []
    reference = None
    for label, executor in (("local", Executor()), ("ray x1", Executor(kind="ray", workers=1)),
                            ("ray x2", Executor(kind="ray", workers=2))):
        if executor.kind == "ray" and not ray.is_initialized():
            _, start_s = timed(lambda: ray.init(num_cpus=2, object_store_memory=512 * 1024 ** 2,
                                                include_dashboard=False, log_to_driver=False))
            print(f"ray start-up: {start_s:.1f} s")
        gen, gen_s = timed(lambda: generate_rollouts(model, sources, params, executor))
        ranks, eval_s = timed(lambda: rank_users(model, inputs, targets, 50, batch_size=args.batch_size,
                                                 executor=executor))
        if reference is None:
            reference = (gen, ranks)
        else:
            assert np.array_equal(gen.items.values, reference[0].items.values), label
            assert np.array_equal(ranks, reference[1]), label
        workers = (map_shards(executor, worker_peak, list(range(executor.workers)))
                   if executor.kind == "ray" else [])
        rows.append((label, len(gen) / gen_s, len(gen.items.values) / gen_s, users / eval_s,
                     peak_rss_mib(), max(workers) if workers else float("nan")))
    print(f"generation from {args.sources:,} sources (m = 5, {len(reference[0]):,} rollouts, "
          f"mean length {len(reference[0].items.values) / len(reference[0]):.2f}); evaluation of {users:,} users; "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads locally")
    print(f"{'executor':<8} {'rollouts/s':>11} {'items/s':>9} {'users/s':>9} {'driver MiB':>11} {'worker MiB':>11}")
    for label, rps, ips, ups, driver, worker in rows:
        print(f"{label:<8} {rps:>11.0f} {ips:>9.0f} {ups:>9.0f} {driver:>11.0f} {worker:>11.0f}")
    print("outputs equal across executors: yes")


if __name__ == "__main__":
    main()
