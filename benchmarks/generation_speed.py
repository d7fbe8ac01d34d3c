"""Generation speed and memory: our generator against the authors' and the per-rollout oracle.

    python benchmarks/generation_speed.py [--threads 2] [--checkpoint PATH] [--epochs 3]
        [--catalogues 100000,1000000] [--peer-sources 200] [--oracle-sources 40] [--batch-size 1024]

One process. Every run's peak RSS is measured (Linux: VmHWM, reset through /proc/self/clear_refs)
and given over the RSS before it. Outputs of the peers are checked equal to ours on the sources
they share. Last line: one JSON object.

1. ml-100k (1,682 items): a SASRec (--checkpoint, or trained --epochs epochs; positions from the
   oldest item, the default); all real users' training parts as sources (m=5, tau=10, p=0.5).
   Runs: ours (cached keys/values, the default), ours with the full forward every step, the
   authors' generator (benchmarks/authors_generator.py) on the first --peer-sources sources and
   the oracle (tests/oracle.py) on the first --oracle-sources.
2. Large catalogues (--catalogues): N items of which the first --head-items are a clustered
   head (clusters of 20; a user's sequence walks one cluster in its order, long-tailed lengths,
   mean ~9); a SASRec is trained on the head for --head-steps steps (full softmax over the head),
   then the trained weights go into a model of N items whose other rows keep their
   initialisation (items never seen in training). So rollouts have realistic lengths (an
   untrained model stops after about one item) while every step still scans all N items.
   Runs: ours (item chunks of 2^18: a step holds batch x chunk scores), ours on whole score rows
   (batch x (N+1)), and the authors' generator and the oracle on fewer sources.
3. Approximate retrieval on the same large catalogues: exact against a faiss IVF index (256
   candidates, nprobe 16 and 64): identical rollouts, acceptance rate, accepted length, speed.
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
from benchmarks import authors_generator  # noqa: E402
from benchmarks._common import print_table  # noqa: E402
from core.workspace import Workspace  # noqa: E402
from models import build_model  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from storage.dataset import dataset_store  # noqa: E402
from storage.manifest import ItemTable  # noqa: E402
from tasks.builtin import fetch_builtin  # noqa: E402
from tasks.checkpoints import load_checkpoint  # noqa: E402
from tasks.config import TrainConfig  # noqa: E402
from tasks.filter import filter_rollouts  # noqa: E402
from tasks.generate import generate_rollouts  # noqa: E402
from tasks.ragged import Ragged  # noqa: E402
from tasks.rollout import STOP_REASONS, GenerationParams  # noqa: E402
from tasks.split import leave_one_out  # noqa: E402
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


def best_of(repeat: int, fn, *args, **kwargs):
    """The fastest of `repeat` timed runs (the same rule for every generator)."""
    runs = [measured(fn, *args, **kwargs) for _ in range(max(repeat, 1))]
    return min(runs, key=lambda r: r[1])


# ------------------------------------------------------------------ data and models
def subset(r: Ragged, count: int) -> Ragged:
    return Ragged(r.values[: r.offsets[count]], r.offsets[: count + 1])


def as_lists(r: Ragged, count: int) -> list[list[int]]:
    return [r.values[r.offsets[i]:r.offsets[i + 1]].tolist() for i in range(min(count, len(r)))]


def ml100k_model(ws: Workspace, checkpoint: str | None, epochs: int, items: ItemTable):
    if checkpoint is None:
        cfg = TrainConfig(dataset="ml-100k", epochs=epochs, progress=False, device="cpu")
        t0 = time.perf_counter()
        result = train_model(cfg, ws)
        checkpoint = result.checkpoint
        print(f"trained SASRec for {result.epochs} epochs in {time.perf_counter() - t0:.1f} s "
              f"(valid NDCG@10 {result.valid['ndcg@10']:.4f}) -> {checkpoint}", flush=True)
    model, _ = load_checkpoint(checkpoint, items=items)  # a --checkpoint of another table is refused
    return model.eval(), checkpoint


CLUSTER = 20


def clustered_sources(n: int, head_items: int, seed: int) -> Ragged:
    """n sequences over items 1..head_items in clusters of CLUSTER consecutive ids: a sequence
    picks a cluster and a start and walks it in order (wrapping), so the next item is learnable.
    Lengths long-tailed (discretised log-normal, mean ~9), between 3 and CLUSTER."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(mean=1.9, sigma=0.75, size=n)), 3, CLUSTER).astype(np.int64)
    base = rng.integers(0, head_items // CLUSTER, size=n) * CLUSTER
    start = rng.integers(0, CLUSTER, size=n)
    which = np.repeat(np.arange(n), lengths)
    step = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    values = 1 + base[which] + (start[which] + step) % CLUSTER
    return Ragged(values.astype(np.int64), np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))


def train_head(sources: Ragged, head_items: int, steps: int, batch: int, seed: int) -> torch.nn.Module:
    """A SASRec over the head items, trained `steps` Adam steps on random batches (full softmax)."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig(max_len=50), head_items).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for _ in range(steps):
        seqs = sources.tails(rng.integers(0, len(sources), size=batch), 51)
        loss = model.loss(seqs[:, :-1], seqs[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"trained the head SASRec ({head_items} items) for {steps} steps in {time.perf_counter() - t0:.1f} s, "
          f"last loss {loss.item():.3f}", flush=True)
    return model.eval()


def with_catalogue(head: torch.nn.Module, num_items: int, seed: int) -> torch.nn.Module:
    """A model of num_items items: the head model's weights, its item rows first; the other rows
    keep build_model's initialisation (items never seen in training)."""
    torch.manual_seed(seed)
    model = build_model(head.config, num_items)
    state = {k: v for k, v in head.state_dict().items() if k != "item_emb.weight"}
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        model.item_emb.weight[: head.num_items + 1] = head.item_emb.weight
    return model.eval()


# ------------------------------------------------------------------ runs
def figures(name: str, rollouts: list | object, seconds: float, before: float, peak: float) -> dict:
    """rollouts: our Rollouts, or the peers' list of (items, reason, trace)."""
    if isinstance(rollouts, list):
        n, appended = len(rollouts), sum(len(r[0]) - 1 for r in rollouts)
        mean_len = sum(len(r[0]) for r in rollouts) / max(n, 1)
    else:
        n, appended = len(rollouts), int((rollouts.items.lengths - 1).sum())
        mean_len = float(rollouts.items.lengths.mean()) if n else 0.0
    return {"run": name, "rollouts": n, "seconds": round(seconds, 3), "rollouts_per_s": round(n / seconds, 2),
            "items_per_s": round(appended / seconds, 1), "mean_len": round(mean_len, 2),
            "peak_over_before_mib": round(peak - before, 1), "peak_rss_mib": round(peak, 1)}


def as_tuples(rollouts, count: int) -> list[tuple[list[int], str, list[int]]]:
    def row(r: Ragged, i: int) -> list[int]:
        return r.values[r.offsets[i]:r.offsets[i + 1]].tolist()

    return [(row(rollouts.items, k), STOP_REASONS[rollouts.stop_reason[k]], row(rollouts.trace, k))
            for k in range(count)]


def compare(model, sources: Ragged, params: GenerationParams, repeat: int, peer_sources: int,
            oracle_sources: int, variants: dict[str, dict]) -> dict:
    """Ours (each variant of the parameters) on every source, the authors' generator and the
    oracle on the first sources; outputs checked equal on the shared sources."""
    generate_rollouts(model, subset(sources, 4), params)  # warm-up (allocator, kernels)
    rows, outputs = [], {}
    for name, update in variants.items():
        out, s, before, peak = best_of(repeat, generate_rollouts, model, sources, params.model_copy(update=update))
        rows.append(figures(name, out, s, before, peak))
        outputs[name] = as_tuples(out, len(out))
    ours = outputs[next(iter(variants))]
    same = {name: out == ours for name, out in outputs.items()}
    args = (params.m, params.tau, params.p, params.max_len, params.seed)
    for name, count, run in [("authors", peer_sources, lambda seqs: authors_generator.generate(
                                  model, seqs, *args, batch_size=params.batch_size)),
                             ("oracle", oracle_sources, lambda seqs: oracle.generate(model, seqs, *args))]:
        seqs = as_lists(sources, count)
        out, s, before, peak = best_of(repeat, run, seqs)  # the same rule as ours
        rows.append(figures(f"{name} ({len(seqs)} sources)", out, s, before, peak))
        same[name] = out == ours[: len(out)]
    first = rows[0]
    for r in rows:
        r["ours_speedup"] = round(first["rollouts_per_s"] / r["rollouts_per_s"], 1)
    return {"rows": rows, "identical_to_ours": same}


def accepted_figures(rollouts, params: GenerationParams, existing: Ragged) -> dict:
    kept = filter_rollouts(rollouts, params.tau, params.min_len, existing)
    return {"acceptance_rate": round(kept.counts["acceptance_rate"], 4),
            "mean_accepted_len": round(float(kept.items.lengths.mean()) if len(kept.items) else 0.0, 2)}


def retrieval_agreement(model, sources: Ragged, params: GenerationParams, settings: list[dict]) -> list[dict]:
    """Exact generation against approximate retrieval (candidates re-scored exactly): share of
    identical rollouts (items, stop reason, trace), acceptance rate and mean accepted length after
    the filter, mean rollout length, speed (index build included) and peak memory."""
    exact, s, before, peak = measured(generate_rollouts, model, sources, params)
    rows = [{"retrieval": "exact", **figures("exact", exact, s, before, peak), "identical": 1.0,
             "same_items_and_stop": 1.0,
             **accepted_figures(exact, params, sources)}]
    reference = as_tuples(exact, len(exact))
    for setting in settings:
        approx, s, before, peak = measured(generate_rollouts, model, sources,
                                           params.model_copy(update={"retrieval": "ivf", **setting}))
        pairs = list(zip(as_tuples(approx, len(approx)), reference))
        same = sum(a == b for a, b in pairs) / max(len(reference), 1)
        # A trace value above the candidates is a lower bound: compare items and stop reasons too.
        same_items = sum(a[:2] == b[:2] for a, b in pairs) / max(len(reference), 1)
        rows.append({"retrieval": f"ivf {setting}", **figures("ivf", approx, s, before, peak),
                     "identical": round(same, 4), "same_items_and_stop": round(same_items, 4),
                     **accepted_figures(approx, params, sources)})
    return rows


SPEED_COLUMNS = ["run", "rollouts", "seconds", "rollouts_per_s", "items_per_s", "mean_len", "peak_over_before_mib",
                 "ours_speedup"]
AGREEMENT_COLUMNS = ["retrieval", "identical", "same_items_and_stop", "acceptance_rate", "mean_accepted_len",
                     "mean_len", "rollouts_per_s", "peak_over_before_mib"]


def print_columns(title: str, rows: list[dict], columns: list[str]) -> None:
    print()
    print_table(title, [{c: r[c] for c in columns} for r in rows])


# ------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="SASRec checkpoint for ml-100k; default: train one")
    ap.add_argument("--epochs", type=int, default=3, help="ml-100k training epochs when no checkpoint is given")
    ap.add_argument("--peer-sources", type=int, default=200, help="ml-100k sources for the authors' generator")
    ap.add_argument("--oracle-sources", type=int, default=40)
    ap.add_argument("--catalogues", default="100000,1000000", help="large catalogue sizes; '' = none")
    ap.add_argument("--head-items", type=int, default=10_000)
    ap.add_argument("--head-sequences", type=int, default=50_000)
    ap.add_argument("--head-steps", type=int, default=300)
    ap.add_argument("--large-sources", type=int, default=200, help="sources per large catalogue (ours)")
    ap.add_argument("--large-peer-sources", type=int, default=40)
    ap.add_argument("--large-oracle-sources", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=5, help="timed repetitions of every ml-100k run; the fastest "
                    "is reported (this machine's speed varies by 1.5x between minutes)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, help="torch CPU threads; torch's default when omitted")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    report: dict = {"device": args.device, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "batch_size": args.batch_size}

    ws = Workspace.at(os.environ.get("RSIR_HOME", "/tmp/rsir-bench"))
    fetch_builtin(ws, "ml-100k")
    store = dataset_store(ws)
    items = store.item_table(store.manifest("ml-100k"))
    num_items = items.num_items
    sources = leave_one_out(store.load("ml-100k"), num_items).valid_input  # real users' training parts
    model, checkpoint = ml100k_model(ws, args.checkpoint, args.epochs, items)
    model = model.to(args.device)
    params = GenerationParams(m=5, tau=10, p=0.5, min_len=3, batch_size=args.batch_size, device=args.device,
                              max_len=model.config.max_len)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}; ml-100k: "
          f"{len(sources)} sources, {num_items} items, mean length {sources.lengths.mean():.1f}", flush=True)
    small = compare(model, sources, params, args.repeat, args.peer_sources, args.oracle_sources,
                    {"ours (cached keys/values)": {}, "ours (full forward per step)": {"incremental": False}})
    print_columns(f"ml-100k, {num_items} items, {len(sources)} sources x m=5", small["rows"], SPEED_COLUMNS)
    print(f"identical to ours: {small['identical_to_ours']}", flush=True)
    report.update(checkpoint=checkpoint, ml100k=small)

    catalogues = [int(c) for c in args.catalogues.split(",") if c]
    if catalogues:
        data = clustered_sources(args.head_sequences, args.head_items, seed=0)
        head = train_head(data, args.head_items, args.head_steps, 128, seed=0)
        large_sources = subset(data, args.large_sources)
    for n in catalogues:
        big = with_catalogue(head, n, seed=1).to(args.device)
        whole = {"item_chunk": n + 1}
        big_params = params.model_copy(update={"max_len": big.config.max_len})
        result = compare(big, large_sources, big_params, 1, args.large_peer_sources, args.large_oracle_sources,
                         {"ours (chunks of 2^18 items)": {}, "ours (whole score rows)": whole})
        scores_mib = {"chunked": args.batch_size * min(n + 1, big_params.item_chunk) * 4 / MiB,
                      "whole": args.batch_size * (n + 1) * 4 / MiB}
        print_columns(f"{n} items ({args.head_items} trained), {len(large_sources)} sources x m=5", result["rows"],
                      SPEED_COLUMNS)
        print(f"identical to ours: {result['identical_to_ours']}; one step's scores: "
              f"{scores_mib['chunked']:.0f} MiB chunked, {scores_mib['whole']:.0f} MiB whole", flush=True)
        agreement = retrieval_agreement(big, large_sources, big_params,
                                        [{"candidates": 256, "nprobe": 16}, {"candidates": 256, "nprobe": 64}])
        print_columns(f"approximate retrieval, {n} items, {len(large_sources)} sources x m=5", agreement,
                      AGREEMENT_COLUMNS)
        report[f"items_{n}"] = {**result, "score_mib_per_step": scores_mib, "retrieval": agreement,
                                "item_table_mib": round(big.item_emb.weight.numel() * 4 / MiB, 1)}
        del big
    report.update(load_average_start=load_start, load_average_end=os.getloadavg())
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
