"""Generation speed and memory: the vectorized generator against the per-rollout oracle.

    python benchmarks/generation_speed.py [--checkpoint PATH] [--epochs 3] [--oracle-sources 40]
                                          [--synthetic-sources 20000] [--batch-size 1024] [--threads N]

Phases (one process): ml-100k in the workspace ($RSIR_HOME, default /tmp/rsir-bench); a SASRec
(from --checkpoint, or trained for a few epochs); all real users' training parts as sources;
generation over all of them (m=5, tau=10, p=0.5); the oracle (tests/oracle.py) on the first
--oracle-sources sources; a plain batched scoring pass over the same sequences; then a synthetic
data set (200,000 random sequences over 20,000 items, untrained SASRec) to show that memory is
bounded by batch_size x items, not by the number of rollouts. Peak RSS is measured per phase
(Linux: VmHWM after resetting it through /proc/self/clear_refs). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the project and tests/oracle.py

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

import oracle  # noqa: E402
from models import build_model  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from tasks.config import TrainConfig  # noqa: E402
from core.workspace import Workspace  # noqa: E402
from tasks.checkpoints import load_checkpoint  # noqa: E402
from tasks.filter import filter_rollouts  # noqa: E402
from tasks.generate import STOP_REASONS, GenerationParams, generate_rollouts, stop_reason_counts  # noqa: E402
from tasks.ingest import fetch_builtin  # noqa: E402
from storage.dataset import dataset_store
from tasks.split import Ragged, leave_one_out  # noqa: E402
from tasks.train import train_model  # noqa: E402

MiB = 2 ** 20


# ------------------------------------------------------------------ memory
def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB, lifetime peak


def rss_mib() -> float:
    return psutil.Process().memory_info().rss / MiB


def measured(fn, *args, **kwargs):
    """(result, wall seconds, RSS before in MiB, peak RSS during in MiB)."""
    before = rss_mib()
    reset_peak_rss()
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0, before, peak_rss_mib()


# ------------------------------------------------------------------ phases
def best_of(repeat: int, fn, *args, **kwargs):
    """The fastest of `repeat` timed runs (same for the generator and the oracle)."""
    runs = [measured(fn, *args, **kwargs) for _ in range(max(repeat, 1))]
    return min(runs, key=lambda r: r[1])


def get_model(ws: Workspace, checkpoint: str | None, epochs: int, num_items: int):
    if checkpoint is None:
        cfg = TrainConfig(dataset="ml-100k", epochs=epochs, progress=False, device="cpu")
        t0 = time.perf_counter()
        result = train_model(cfg, ws)
        checkpoint = result.checkpoint
        print(f"trained SASRec for {result.epochs} epochs in {time.perf_counter() - t0:.1f} s "
              f"(valid NDCG@10 {result.valid['ndcg@10']:.4f}) -> {checkpoint}", flush=True)
    model, _ = load_checkpoint(checkpoint, num_items=num_items)
    return model.eval(), checkpoint


@torch.no_grad()
def scoring_pass(model, sources: Ragged, max_len: int, batch_size: int) -> int:
    model.eval()
    for lo in range(0, len(sources), batch_size):
        rows = np.arange(lo, min(lo + batch_size, len(sources)))
        model.score_last(sources.tails(rows, max_len))
    return len(sources)


def run_oracle(model, sources: Ragged, count: int, params: GenerationParams):
    seqs = [sources.values[sources.offsets[i]:sources.offsets[i + 1]].tolist() for i in range(count)]
    return oracle.generate(model, seqs, params.m, params.tau, params.p, params.max_len, params.seed)


def row(r: Ragged, i: int) -> list[int]:
    return r.values[r.offsets[i]:r.offsets[i + 1]].tolist()


def synthetic_sources(num_seqs: int, num_items: int, seed: int = 0) -> Ragged:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, 51, size=num_seqs)
    offsets = np.zeros(num_seqs + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return Ragged(rng.integers(1, num_items + 1, size=offsets[-1]).astype(np.int64), offsets)


def subset(r: Ragged, count: int) -> Ragged:
    return Ragged(r.values[: r.offsets[count]], r.offsets[: count + 1])


def generation_figures(rollouts, seconds: float) -> dict:
    appended = int((rollouts.items.lengths - 1).sum())
    checks = int(rollouts.trace.lengths.sum())  # one model call per check
    return {
        "rollouts": len(rollouts), "seconds": round(seconds, 3),
        "rollouts_per_s": round(len(rollouts) / seconds, 1),
        "generated_items": appended, "generated_items_per_s": round(appended / seconds, 1),
        "scored_steps_per_s": round(checks / seconds, 1),
        "mean_len": round(float(rollouts.items.lengths.mean()), 2) if len(rollouts) else 0.0,
        "stop_reasons": stop_reason_counts(rollouts),
    }


# ------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="SASRec checkpoint for ml-100k; default: train one")
    ap.add_argument("--epochs", type=int, default=3, help="training epochs when no checkpoint is given")
    ap.add_argument("--oracle-sources", type=int, default=40)
    ap.add_argument("--synthetic-seqs", type=int, default=200_000)
    ap.add_argument("--synthetic-items", type=int, default=20_000)
    ap.add_argument("--synthetic-sources", type=int, default=20_000,
                    help="sources of the synthetic set actually generated from (runtime)")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3, help="timed repetitions; the fastest is reported")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, help="torch CPU threads; torch's default when omitted")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    load_start = os.getloadavg()
    ws = Workspace.at(os.environ.get("RSIR_HOME", "/tmp/rsir-bench"))
    fetch_builtin(ws, "ml-100k")
    store = dataset_store(ws)
    num_items = store.manifest("ml-100k").num_items
    split = leave_one_out(store.load("ml-100k"), num_items)
    sources = split.valid_input  # real users' training parts only
    model, checkpoint = get_model(ws, args.checkpoint, args.epochs, num_items)
    model = model.to(args.device)
    params = GenerationParams(m=5, tau=10, p=0.5, min_len=3, batch_size=args.batch_size, device=args.device,
                              max_len=model.config.max_len)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}; "
          f"ml-100k: {len(sources)} sources, {num_items} items, mean length {sources.lengths.mean():.1f}",
          flush=True)

    # Vectorized generation over all of ml-100k.
    generate_rollouts(model, subset(sources, 8), params)  # warm-up (allocator, kernels)
    rollouts, gen_s, rss_before, gen_peak = best_of(args.repeat, generate_rollouts, model, sources, params)
    vec = generation_figures(rollouts, gen_s)
    existing = Ragged.from_series(store.load("ml-100k")["items"])  # the current dataset D_k
    filter_rollouts(rollouts, 10, 3, True, existing)  # warm-up: polars' first call pays its set-up
    accepted, filter_s, _, _ = measured(filter_rollouts, rollouts, 10, 3, True, existing)
    vec.update(full_pass_seconds=round(gen_s, 3), peak_rss_mib=round(gen_peak, 1),
               rss_before_mib=round(rss_before, 1), filter_seconds=round(filter_s, 4),
               accepted=accepted.counts["accepted"], acceptance_rate=round(accepted.counts["acceptance_rate"], 4))

    # Oracle on a subset.
    n_or = min(args.oracle_sources, len(sources))
    torch_threads = torch.get_num_threads()
    cpu_params = params.model_copy(update={"device": "cpu"})
    expected, or_s, _, _ = best_of(args.repeat, run_oracle, model.cpu(), sources, n_or, cpu_params)
    model = model.to(args.device)
    same = sum((row(rollouts.items, k), STOP_REASONS[rollouts.stop_reason[k]], row(rollouts.trace, k)) == e
               for k, e in enumerate(expected))
    orc = {"sources": n_or, "rollouts": len(expected), "seconds": round(or_s, 3),
           "rollouts_per_s": round(len(expected) / or_s, 2),
           "generated_items_per_s": round(sum(len(e[0]) - 1 for e in expected) / or_s, 2),
           "identical_to_vectorized": f"{same}/{len(expected)}"}
    speedup = vec["rollouts_per_s"] / orc["rollouts_per_s"]

    # Plain scoring pass over the same sequences.
    scoring_pass(model, subset(sources, 8), params.max_len, args.batch_size)  # warm-up
    scored, score_s, _, _ = measured(scoring_pass, model, sources, params.max_len, args.batch_size)
    score = {"sequences": scored, "seconds": round(score_s, 3), "sequences_per_s": round(scored / score_s, 1),
             "mean_scored_len": round(float(np.minimum(sources.lengths, params.max_len).mean()), 1)}

    # Synthetic: 200k sequences, 20k items, untrained SASRec; generate from a subset.
    syn_all = synthetic_sources(args.synthetic_seqs, args.synthetic_items)
    torch.manual_seed(0)
    syn_model = build_model(ModelConfig(), args.synthetic_items).eval().to(args.device)
    syn_runs = []
    quarter = max(args.synthetic_sources // 4, 1)
    # Same batch, 4x the sources: the peak should not move. A quarter of the batch: it should drop.
    for count, batch in [(quarter, args.batch_size), (args.synthetic_sources, args.batch_size),
                         (quarter, max(args.batch_size // 4, 1))]:
        count = min(count, len(syn_all))
        run_params = params.model_copy(update={"batch_size": batch})
        r, s, before, peak = measured(generate_rollouts, syn_model, subset(syn_all, count), run_params)
        syn_runs.append({"sources": count, "batch_size": batch, **generation_figures(r, s),
                         "rss_before_mib": round(before, 1), "peak_rss_mib": round(peak, 1),
                         "peak_over_before_mib": round(peak - before, 1)})
        del r
    per_batch = args.batch_size * (args.synthetic_items + 1) * 4 / MiB  # one float32 score row each
    synthetic = {"sequences": len(syn_all), "items": args.synthetic_items,
                 "dataset_mib": round(syn_all.values.nbytes / MiB, 1),
                 "score_rows_mib_per_batch": round(per_batch, 1), "runs": syn_runs}

    # ------------------------------------------------------------------ report
    print()
    print(f"{'phase':<34}{'rollouts':>10}{'seconds':>10}{'rollouts/s':>12}{'items/s':>12}{'peak RSS MiB':>14}")
    print(f"{'vectorized, all ml-100k':<34}{vec['rollouts']:>10}{gen_s:>10.2f}{vec['rollouts_per_s']:>12.1f}"
          f"{vec['generated_items_per_s']:>12.1f}{gen_peak:>14.1f}")
    print(f"{f'oracle, {n_or} sources':<34}{orc['rollouts']:>10}{or_s:>10.2f}{orc['rollouts_per_s']:>12.2f}"
          f"{orc['generated_items_per_s']:>12.2f}{'':>14}")
    for run in syn_runs:
        label = f"synthetic, {run['sources']} src, batch {run['batch_size']}"
        print(f"{label:<34}{run['rollouts']:>10}{run['seconds']:>10.2f}{run['rollouts_per_s']:>12.1f}"
              f"{run['generated_items_per_s']:>12.1f}{run['peak_rss_mib']:>14.1f}")
    print()
    print(f"speedup_vs_oracle (rollouts/s)      {speedup:.1f}x   (oracle identical to vectorized: "
          f"{orc['identical_to_vectorized']})")
    print(f"ml-100k full pass                   {gen_s:.2f} s, mean rollout length {vec['mean_len']}, "
          f"stops {vec['stop_reasons']}")
    print(f"filter (tau 10, min_len 3)          {filter_s * 1000:.1f} ms, accepted {vec['accepted']} "
          f"({vec['acceptance_rate']:.1%})")
    print(f"plain scoring pass                  {score['sequences_per_s']:.0f} sequences/s "
          f"(mean length {score['mean_scored_len']}); generation: {vec['scored_steps_per_s']:.0f} scored "
          f"steps/s, {vec['generated_items_per_s']:.0f} generated items/s "
          f"= {vec['generated_items_per_s'] / score['sequences_per_s']:.2f} x scoring throughput")
    print(f"synthetic ({len(syn_all)} seqs)       peak RSS over baseline: "
          + ", ".join(f"{r['peak_over_before_mib']:.0f} MiB ({r['sources']} src, batch {r['batch_size']})"
                      for r in syn_runs)
          + f"; score rows per batch {per_batch:.0f} MiB; data set {synthetic['dataset_mib']} MiB")
    print(f"load average at start / end         {load_start} / {os.getloadavg()}")
    figures = {
        "device": args.device, "threads": torch_threads, "cpus": os.cpu_count(),
        "load_average_start": load_start, "load_average_end": os.getloadavg(),
        "checkpoint": checkpoint, "batch_size": args.batch_size,
        "params": {"m": 5, "tau": 10, "p": 0.5, "max_len": params.max_len},
        "vectorized": vec, "oracle": orc, "speedup_vs_oracle": round(speedup, 1), "scoring": score,
        "generated_items_per_s_over_scoring_seq_per_s":
            round(vec["generated_items_per_s"] / score["sequences_per_s"], 3),
        "synthetic": synthetic,
    }
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
