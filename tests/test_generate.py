"""The vectorized generator against the one-rollout-at-a-time oracle (tests/oracle.py)."""

from __future__ import annotations

import sys
import zlib
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
import torch
from pydantic import ValidationError

import oracle
from core.errors import RsirError
from models import SequentialRecommender, build_model
from models.config import ModelConfig
from tasks.generate import extend_sequences, generate_rollouts
from tasks.ragged import Ragged
from tasks.rollout import (
    EXTEND_REASONS,
    MAX_LEN,
    NO_REAL_ITEM,
    STOP_REASONS,
    GenerationParams,
    pool_uniform,
    stop_reason_counts,
)

MAX_LEN_MODEL = 12


pytestmark = pytest.mark.usefixtures("one_thread")


def ragged(seqs: list[list[int]]) -> Ragged:
    return Ragged.from_series(pl.Series(seqs, dtype=pl.List(pl.Int64)))


def row(r: Ragged, i: int) -> list[int]:
    return r.values[r.offsets[i]:r.offsets[i + 1]].tolist()


def random_sources(num_items: int, count: int, seed: int, max_len: int = 14) -> list[list[int]]:
    """Random sequences, repeats allowed (a user may consume an item twice), one very short."""
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(1, num_items + 1, size=rng.integers(2, max_len)).tolist() for _ in range(count)]
    return seqs + [[int(rng.integers(1, num_items + 1))]]


def case_seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode()) % 1000  # stable across processes, unlike hash()


def tiny_sasrec(num_items: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = ModelConfig(hidden=16, layers=1, heads=1, max_len=MAX_LEN_MODEL, dropout=0.0)
    return build_model(cfg, num_items)


class TieModel(torch.nn.Module):
    """Integer scores in 0..3 from the last item, the real length and the item id: many exact ties."""

    def __init__(self, num_items: int, max_len: int = MAX_LEN_MODEL):
        super().__init__()
        self.num_items = num_items
        self.config = SimpleNamespace(max_len=max_len)

    def score_last(self, seqs: torch.Tensor) -> torch.Tensor:
        last = seqs[:, -1:]
        n = (seqs != 0).sum(dim=1, keepdim=True)
        ids = torch.arange(self.num_items + 1, device=seqs.device)[None, :]
        scores = ((last * 7 + ids * 3 + n * 5 + (ids * last) % 5) % 4).float()
        scores[:, 0] = float("-inf")
        return scores


class SparseModel(TieModel):
    """Like TieModel, but most items score -inf: exercises pools whose every score is -inf."""

    def score_last(self, seqs: torch.Tensor) -> torch.Tensor:
        scores = super().score_last(seqs)
        ids = torch.arange(self.num_items + 1, device=seqs.device)[None, :]
        return scores.masked_fill((ids + seqs[:, -1:]) % 4 != 0, float("-inf"))


def tiny_model(name: str, num_items: int, seed: int, **options) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = ModelConfig(name=name, hidden=16, layers=2, heads=2, max_len=MAX_LEN_MODEL, dropout=0.0, options=options)
    return build_model(cfg, num_items)


class IntScores(SequentialRecommender):
    """Integer hidden states and item vectors: every score an exact small integer, so exact ties
    everywhere, on any chunking of the items. Hidden state = the sum of the items' vectors."""

    def __init__(self, num_items: int, seed: int):
        super().__init__(ModelConfig(hidden=3, layers=1, heads=1, max_len=MAX_LEN_MODEL, dropout=0.0), num_items)
        g = torch.Generator().manual_seed(seed)
        self.item_emb.weight.data = torch.randint(-2, 3, (num_items + 1, 3), generator=g).float()
        self.item_emb.weight.data[0] = 0  # padding adds nothing to the sums

    def encode(self, seqs: torch.Tensor) -> torch.Tensor:
        return self.item_emb(seqs).cumsum(dim=1)


MODELS = {
    "sasrec": lambda: (tiny_sasrec(30, 0), 30),
    "sasrec-40": lambda: (tiny_sasrec(40, 1), 40),
    "ties": lambda: (TieModel(20), 20),
    "sparse": lambda: (SparseModel(12), 12),
    # Incremental decoding: SASRec and HSTU with positions from the oldest item, HSTU with the
    # relative bias alone (cosine scores); SASRec with positions from the newest item cannot reuse
    # a cache (the full forward runs).
    "sasrec-2l": lambda: (tiny_model("sasrec", 30, 2), 30),
    "hstu": lambda: (tiny_model("hstu", 30, 3, positions="oldest"), 30),
    "hstu-rel": lambda: (tiny_model("hstu", 30, 4, abs_pos=False, l2_norm=True), 30),
    "sasrec-newest": lambda: (tiny_model("sasrec", 30, 5, positions="newest"), 30),
    "int": lambda: (IntScores(25, 6), 25),
}
_cache: dict = {}


def model_named(name: str):
    if name not in _cache:
        _cache[name] = MODELS[name]()
    return _cache[name]


def assert_same_as_oracle(model, seqs, rollouts, m, tau, p, max_len, seed):
    expected = oracle.generate(model, seqs, m, tau, p, max_len, seed)
    assert len(rollouts) == len(expected) == len(seqs) * m
    for k, (items, reason, trace) in enumerate(expected):
        got = (row(rollouts.items, k), STOP_REASONS[rollouts.stop_reason[k]], row(rollouts.trace, k))
        assert got == (items, reason, trace), f"rollout {k}"
    return expected


# --------------------------------------------------------------------------- pool draws
def _splitmix_reference(seed: int, rid: int, step: int) -> float:
    mask = (1 << 64) - 1

    def mix(x: int) -> int:
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        return x ^ (x >> 31)

    x = mix((rid * 0x9E3779B97F4A7C15 + seed * 0x94D049BB133111EB) & mask)
    x = mix((x + (step + 1) * 0x9E3779B97F4A7C15) & mask)
    return (x >> 11) / 2.0 ** 53


def test_pool_uniform_is_splitmix64_with_logical_shifts():
    ids = torch.tensor([0, 1, 2, 17, 2**40 + 3, 2**62 + 5])
    for seed, step in [(0, 0), (7, 3), (-5, 11), (2**70 + 1, 0)]:
        got = pool_uniform(seed, ids, step).tolist()
        assert got == [_splitmix_reference(seed, int(r), step) for r in ids]


def test_pool_uniform_independent_of_batching_and_uniform():
    ids = torch.arange(20000)
    u = pool_uniform(3, ids, 4)
    assert u.dtype == torch.float64 and 0.0 <= float(u.min()) and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.01
    assert torch.equal(pool_uniform(3, ids[[5, 17, 9]], 4), u[[5, 17, 9]])
    assert not torch.equal(pool_uniform(4, ids, 4), u)
    assert not torch.equal(pool_uniform(3, ids, 5), u)


# --------------------------------------------------------------------------- oracle equivalence
@pytest.mark.parametrize("name", ["sasrec", "ties", "sparse"])
@pytest.mark.parametrize("tau", [1, 3, 10, None])
@pytest.mark.parametrize("p,m", [(0.0, 1), (0.5, 3), (1.0, 3), (0.5, 1)])
def test_generation_matches_oracle(name, tau, p, m):
    model, num_items = model_named(name)
    seqs = random_sources(num_items, 5, seed=case_seed(name, tau, p, m))
    seed = 11
    expected = None
    for batch_size in (1, 4, 1024):
        params = GenerationParams(m=m, tau=tau, p=p, seed=seed, batch_size=batch_size)
        rollouts = generate_rollouts(model, ragged(seqs), params)
        if expected is None:
            expected = assert_same_as_oracle(model, seqs, rollouts, m, tau, p, MAX_LEN_MODEL, seed)
        else:
            assert [row(rollouts.items, k) for k in range(len(rollouts))] == [e[0] for e in expected]
            assert [STOP_REASONS[c] for c in rollouts.stop_reason] == [e[1] for e in expected]
            assert [row(rollouts.trace, k) for k in range(len(rollouts))] == [e[2] for e in expected]


@pytest.mark.parametrize("name", ["sasrec-40", "ties"])
def test_shorter_max_len_and_other_seed_match_oracle(name):
    model, num_items = model_named(name)
    seqs = random_sources(num_items, 6, seed=5)
    params = GenerationParams(m=2, tau=None, p=0.5, seed=123, max_len=5, batch_size=3)
    rollouts = generate_rollouts(model, ragged(seqs), params)
    assert_same_as_oracle(model, seqs, rollouts, 2, None, 0.5, 5, 123)
    assert rollouts.items.lengths.max() <= 5
    assert rollouts.params.max_len == 5


def test_structure_of_rollouts():
    model, num_items = model_named("sasrec-40")
    seqs = random_sources(num_items, 8, seed=3)
    params = GenerationParams(m=3, tau=10, p=0.5, batch_size=5)
    r = generate_rollouts(model, ragged(seqs), params)
    assert r.rollout_id.tolist() == list(range(len(seqs) * 3))
    assert r.source_index.tolist() == [i for i in range(len(seqs)) for _ in range(3)]
    assert r.params.max_len == MAX_LEN_MODEL  # filled from the model
    counts = stop_reason_counts(r)
    assert set(counts) == set(STOP_REASONS) and sum(counts.values()) == len(r)
    for k in range(len(r)):
        items, trace, reason = row(r.items, k), row(r.trace, k), STOP_REASONS[r.stop_reason[k]]
        src = seqs[r.source_index[k]]
        assert items[0] == src[0] and len(set(items)) == len(items)
        assert len(trace) == len(items) - (reason == "max_len")  # check t had t+1 items
        assert all(0 < v <= 10 for v in trace[:-1])  # every check but the last passed
        if reason == "exhausted":
            assert trace[-1] == NO_REAL_ITEM and set(src) <= set(items)
        elif reason == "fidelity":
            assert trace[-1] > 10
        elif reason == "max_len":
            assert len(items) == MAX_LEN_MODEL and 0 < trace[-1] <= 10


def test_p_one_stays_inside_the_source_items():
    model, num_items = model_named("sasrec")
    seqs = random_sources(num_items, 6, seed=9)
    r = generate_rollouts(model, ragged(seqs), GenerationParams(m=2, tau=None, p=1.0))
    for k in range(len(r)):
        assert set(row(r.items, k)) <= set(seqs[r.source_index[k]])
    # With p = 1 the m rollouts of a source are identical (no random choice is left).
    assert all(row(r.items, 2 * i) == row(r.items, 2 * i + 1) for i in range(len(seqs)))


def test_generation_uses_eval_mode_and_restores_training_flag():
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden=16, layers=1, heads=1, max_len=MAX_LEN_MODEL, dropout=0.5), 30)
    seqs = random_sources(30, 5, seed=1)
    params = GenerationParams(m=2, tau=None, p=0.5)
    model.eval()
    ref = generate_rollouts(model, ragged(seqs), params)
    model.train()
    again = generate_rollouts(model, ragged(seqs), params)
    assert model.training
    assert np.array_equal(ref.items.values, again.items.values)
    assert np.array_equal(ref.trace.values, again.trace.values)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    model, num_items = model_named("ties")  # integer scores: exact on any device
    seqs = random_sources(num_items, 8, seed=12)
    for tau in (3, None):
        params = GenerationParams(m=3, tau=tau, p=0.5, batch_size=7)
        cpu = generate_rollouts(model, ragged(seqs), params)
        gpu = generate_rollouts(model, ragged(seqs), params.model_copy(update={"device": "cuda"}))
        assert np.array_equal(cpu.items.values, gpu.items.values)
        assert np.array_equal(cpu.trace.values, gpu.trace.values)
        assert np.array_equal(cpu.stop_reason, gpu.stop_reason)
        ext_params = params.model_copy(update={"device": "cuda"})
        ext = extend_sequences(model, ragged(seqs), ext_params, 1)
        assert_extensions_match_oracle(model, seqs, ext, 1, 3, tau, 0.5, MAX_LEN_MODEL, 0)


def test_empty_sources():
    model, _ = model_named("ties")
    r = generate_rollouts(model, ragged([]), GenerationParams())
    assert len(r) == 0 and len(r.items) == 0 and stop_reason_counts(r)["exhausted"] == 0


# --------------------------------------------------------------------------- extension mode
def assert_extensions_match_oracle(model, seqs, ext, h, m, tau, p, window, seed):
    eligible = [i for i, s in enumerate(seqs) if len(s) > h]
    assert ext.source_index.tolist() == eligible
    for k, i in enumerate(eligible):
        items, reason, trace = oracle.extend(model, seqs[i], i, h, m, tau, p, window, seed)
        got = (row(ext.items, k), EXTEND_REASONS[ext.stop_reason[k]], row(ext.trace, k))
        assert got == (items, reason, trace), f"source {i}"
        assert items[: len(seqs[i]) - h] == seqs[i][:-h] and ext.prefix_len[k] == len(seqs[i]) - h


@pytest.mark.parametrize("name", ["sasrec", "ties", "sparse"])
@pytest.mark.parametrize("tau", [1, 3, None])
@pytest.mark.parametrize("p,m,h", [(0.0, 1, 1), (0.5, 4, 2), (1.0, 4, 1), (0.5, 3, 1)])
def test_extension_matches_oracle(name, tau, p, m, h):
    model, num_items = model_named(name)
    seqs = random_sources(num_items, 7, seed=case_seed(name, tau, p, m, h), max_len=20)
    for batch_size in (1, 3, 1024):
        params = GenerationParams(m=m, tau=tau, p=p, seed=5, batch_size=batch_size)
        ext = extend_sequences(model, ragged(seqs), params, h)
        assert_extensions_match_oracle(model, seqs, ext, h, m, tau, p, MAX_LEN_MODEL, 5)


def test_extension_windows_long_prefixes():
    model, num_items = model_named("sasrec")
    seqs = random_sources(num_items, 4, seed=2, max_len=30)  # longer than the model's max_len
    params = GenerationParams(m=3, tau=3, p=0.5, max_len=6, batch_size=2)
    ext = extend_sequences(model, ragged(seqs), params, 2)
    assert_extensions_match_oracle(model, seqs, ext, 2, 3, 3, 0.5, 6, 0)


def test_extension_memory_does_not_grow_with_the_longest_prefix(monkeypatch):
    """A 3,000-interaction source among short ones: extension's buffers are at most
    max_len + m (the model's window) or N (distinct items) wide, and the result matches the
    oracle, which sees the whole prefix."""
    import tasks.ragged
    import tasks.rollout

    model, num_items = model_named("sasrec")
    seqs = random_sources(num_items, 5, seed=8, max_len=12)
    seqs[1] = np.random.default_rng(8).integers(1, num_items + 1, size=3_000).tolist()
    params = GenerationParams(m=3, tau=3, p=0.5, max_len=6, batch_size=3, seed=8)
    real_aligned, real_gather = tasks.ragged.left_aligned, tasks.ragged.gather_padded

    def aligned(values, starts, lengths, width):
        assert width <= params.max_len + params.m, f"a buffer {width} wide"
        return real_aligned(values, starts, lengths, width)

    def gathered(values, starts, lengths, shift=0):
        assert int(lengths.max(initial=0)) <= num_items, "a tensor as wide as the longest prefix"
        return real_gather(values, starts, lengths, shift)

    monkeypatch.setattr(tasks.rollout, "left_aligned", aligned)
    monkeypatch.setattr(tasks.ragged, "gather_padded", gathered)
    ext = extend_sequences(model, ragged(seqs), params, 2)
    assert 1 in ext.source_index.tolist()
    assert_extensions_match_oracle(model, seqs, ext, 2, 3, 3, 0.5, 6, 8)


def test_extension_only_uses_given_sources():
    """Items never seen in the sources (e.g. validation/test items) stay out of the local pool."""
    model, num_items = model_named("sasrec")
    seqs = random_sources(num_items, 6, seed=4)
    ext = extend_sequences(model, ragged(seqs), GenerationParams(m=4, tau=None, p=1.0), 1)
    for k, i in enumerate(ext.source_index):
        assert set(row(ext.items, k)) <= set(seqs[i])


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize("field,value", [
    ("tau", 0), ("tau", -3), ("p", -0.1), ("p", 1.5), ("m", 0), ("min_len", 1), ("max_len", 1),
    ("batch_size", 0), ("device", "gpu"), ("seed", "x"),
])
def test_invalid_params_name_the_parameter(field, value):
    with pytest.raises(ValidationError, match=field):
        GenerationParams(**{field: value})


def test_params_reject_unknown_and_inconsistent_fields():
    with pytest.raises(ValidationError, match="rollouts"):
        GenerationParams(rollouts=3)
    with pytest.raises(ValidationError, match="min_len"):
        GenerationParams(min_len=6, max_len=5)
    assert GenerationParams(tau=None).tau is None


def test_model_dependent_errors_before_compute():
    model, num_items = model_named("ties")
    src = ragged([[1, 2, 3]])
    with pytest.raises(RsirError, match="max_len"):
        generate_rollouts(model, src, GenerationParams(max_len=MAX_LEN_MODEL + 1))
    with pytest.raises(RsirError, match="sources"):
        generate_rollouts(model, ragged([[1, num_items + 1]]), GenerationParams())
    with pytest.raises(RsirError, match="sources"):
        generate_rollouts(model, ragged([[1, 2], []]), GenerationParams())
    with pytest.raises(RsirError, match="holdout_h"):
        extend_sequences(model, src, GenerationParams(), 0)


def test_max_len_stop_code():
    model, num_items = model_named("ties")
    r = generate_rollouts(model, ragged([list(range(1, 16))]), GenerationParams(m=1, tau=None, p=1.0, max_len=4))
    assert r.stop_reason.tolist() == [MAX_LEN] and r.items.lengths.tolist() == [4]
    assert r.trace.lengths.tolist() == [3]


def test_long_sources_do_not_widen_the_item_lists(monkeypatch):
    """A source of 3,000 interactions among short ones: the per-source item lists hold each
    distinct item once (width <= N), not one column per interaction; rollouts are unchanged."""
    import tasks.ragged
    from tasks.ragged import membership, sorted_rows

    model, num_items = model_named("ties")
    seqs = random_sources(num_items, 6, seed=21)
    seqs[2] = np.random.default_rng(21).integers(1, num_items + 1, size=3_000).tolist()
    real_gather = tasks.ragged.gather_padded

    def bounded(values, starts, lengths, shift=0):
        assert int(lengths.max(initial=0)) <= num_items, "a tensor as wide as the longest source"
        return real_gather(values, starts, lengths, shift)

    monkeypatch.setattr(tasks.ragged, "gather_padded", bounded)
    sources, index = ragged(seqs), np.array([2, 0, 5, 2])
    own = sorted_rows(sources, index, torch.device("cpu"))
    assert own.shape[1] <= num_items
    for b, i in enumerate(index):
        distinct = sorted(set(seqs[i]))
        assert own[b].tolist() == [0] * (own.shape[1] - len(distinct)) + distinct
    mask = membership(sources, index, num_items, torch.device("cpu"))
    assert [set(np.flatnonzero(r).tolist()) for r in mask.numpy()] == [set(seqs[i]) for i in index]
    params = GenerationParams(m=2, tau=3, p=0.5, seed=4, batch_size=5)
    assert_same_as_oracle(model, seqs, generate_rollouts(model, sources, params), 2, 3, 0.5, MAX_LEN_MODEL, 4)


# --------------------------------------------------------------------------- decoding: cache, chunks
DECODERS = {"incremental": {}, "full-forward": {"incremental": False}, "chunks-of-7": {"item_chunk": 7},
            "chunks-of-16": {"item_chunk": 16, "incremental": False}}


@pytest.mark.parametrize("name", ["sasrec-2l", "hstu", "hstu-rel", "sasrec-newest", "int"])
@pytest.mark.parametrize("decoder", list(DECODERS))
@pytest.mark.parametrize("tau,p,m", [(3, 0.5, 3), (None, 0.5, 2), (10, 0.0, 1), (2, 1.0, 2)])
def test_every_decoder_matches_oracle(name, decoder, tau, p, m):
    """Cached keys/values (SASRec, HSTU) or the full forward, whole or chunked scores: the same
    rollouts, stop reasons and traces as the one-rollout-at-a-time oracle, for any batch size."""
    model, num_items = model_named(name)
    seqs = random_sources(num_items, 6, seed=case_seed(name, decoder, tau, p, m))
    for batch_size in (1, 5, 1024):
        params = GenerationParams(m=m, tau=tau, p=p, seed=7, batch_size=batch_size, **DECODERS[decoder])
        assert_same_as_oracle(model, seqs, generate_rollouts(model, ragged(seqs), params), m, tau, p,
                              MAX_LEN_MODEL, 7)


@pytest.mark.parametrize("name", ["hstu", "int", "sparse"])
@pytest.mark.parametrize("decoder", ["full-forward", "chunks-of-7"])
def test_extension_with_chunked_scores_matches_oracle(name, decoder):
    model, num_items = model_named(name)
    seqs = random_sources(num_items, 7, seed=case_seed(name, decoder), max_len=20)
    for tau, p, m, h in [(3, 0.5, 4, 2), (None, 0.5, 3, 1), (1, 1.0, 4, 1)]:
        params = GenerationParams(m=m, tau=tau, p=p, seed=5, batch_size=3, **DECODERS[decoder])
        ext = extend_sequences(model, ragged(seqs), params, h)
        assert_extensions_match_oracle(model, seqs, ext, h, m, tau, p, MAX_LEN_MODEL, 5)


def test_which_models_decode_incrementally():
    from tasks.decoding import Decoder

    cpu = torch.device("cpu")
    expected = {"sasrec-2l": True, "hstu": True, "hstu-rel": True, "sasrec-newest": False, "ties": False}
    for name, incremental in expected.items():
        model = model_named(name)[0]
        assert Decoder(model, 4, cpu, True, 2 ** 18).incremental is incremental, name
        assert not Decoder(model, 4, cpu, False, 2 ** 18).incremental
    # HSTU's default positions count from the newest item: no cache.
    assert not tiny_model("hstu", 30, 0).decodes_incrementally()


def test_incremental_hidden_states_equal_the_full_forward():
    """decode_next, item by item, gives encode()'s last hidden state of every prefix, for every
    backbone that caches (CL4SRec is SASRec's encoder)."""
    seqs = torch.randint(1, 31, (6, MAX_LEN_MODEL), generator=torch.Generator().manual_seed(0))
    for model in [model_named("sasrec-2l")[0], model_named("hstu")[0], model_named("hstu-rel")[0],
                  tiny_model("cl4srec", 30, 1)]:
        model.eval()
        with torch.no_grad():
            cache = model.new_cache(len(seqs), torch.device("cpu"))
            for t in range(MAX_LEN_MODEL):
                step = model.decode_next(seqs[:, t], cache)
                torch.testing.assert_close(step, model.last_hidden(seqs[:, : t + 1]), rtol=1e-5, atol=1e-5)
            with pytest.raises(ValueError, match="max_len"):
                model.decode_next(seqs[:, 0], cache)
        model.train()
        with pytest.raises(RuntimeError, match="eval mode"):
            model.decode_next(seqs[:, 0], model.new_cache(len(seqs), torch.device("cpu")))


def test_chunked_scores_never_exceed_batch_times_chunk(monkeypatch):
    """With item_chunk < N+1 no step scores more than item_chunk items at once; the rollouts stay
    those of whole-catalogue scoring."""
    model, num_items = model_named("hstu")
    seqs = random_sources(num_items, 8, seed=3)
    whole = generate_rollouts(model, ragged(seqs), GenerationParams(m=2, tau=5, p=0.5, batch_size=4))
    widths = []
    real = type(model).item_scores

    def recorded(self, hidden, emb=None, first=0, out=None):
        scores = real(self, hidden, emb, first, out)
        widths.append(scores.shape[-1])
        return scores

    monkeypatch.setattr(type(model), "item_scores", recorded)
    chunked = generate_rollouts(model, ragged(seqs), GenerationParams(m=2, tau=5, p=0.5, batch_size=4, item_chunk=8))
    assert widths and max(widths) <= 8 and sum(w == 8 for w in widths) > 0
    assert np.array_equal(whole.items.values, chunked.items.values)
    assert np.array_equal(whole.trace.values, chunked.trace.values)
    assert np.array_equal(whole.stop_reason, chunked.stop_reason)


# --------------------------------------------------------------------------- approximate retrieval
@pytest.mark.parametrize("name", ["sasrec-2l", "hstu-rel", "int"])
def test_retrieval_that_proposes_every_item_is_exact(name):
    """An IVF index over 30 items has one list: every item is a candidate, so the approximate
    path must reproduce the oracle exactly (rollouts, stop reasons, traces), extension mode too."""
    model, num_items = model_named(name)
    seqs = random_sources(num_items, 6, seed=case_seed(name, "ivf"))
    for tau, p, m in [(3, 0.5, 3), (None, 0.5, 2), (10, 0.0, 1)]:
        params = GenerationParams(m=m, tau=tau, p=p, seed=3, batch_size=4, retrieval="ivf", candidates=64)
        assert_same_as_oracle(model, seqs, generate_rollouts(model, ragged(seqs), params), m, tau, p,
                              MAX_LEN_MODEL, 3)
        ext = extend_sequences(model, ragged(seqs), params, 1)
        assert_extensions_match_oracle(model, seqs, ext, 1, m, tau, p, MAX_LEN_MODEL, 3)


def test_retrieval_reads_only_candidates_and_listed_items():
    """1,000 items, 16 candidates: a step gathers the vectors of its candidates and the user's
    items, never a score row over all items; the pool picks stay valid (unused, in range)."""
    torch.manual_seed(0)
    model = tiny_model("sasrec", 1000, 9)
    seqs = random_sources(1000, 20, seed=4)
    calls = []
    real = type(model).item_scores

    def counted(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    type(model).item_scores = counted
    try:
        r = generate_rollouts(model, ragged(seqs), GenerationParams(m=2, tau=8, p=0.5, retrieval="ivf",
                                                                     candidates=16, nprobe=2))
    finally:
        type(model).item_scores = real
    assert not calls
    for k in range(len(r)):
        items = row(r.items, k)
        assert len(set(items)) == len(items) and all(1 <= i <= 1000 for i in items)


def test_retrieval_parameters_are_checked_before_compute(monkeypatch):
    with pytest.raises(ValidationError, match="tau=300 exceeds candidates=256"):
        GenerationParams(tau=300, retrieval="ivf")
    ties, num_items = model_named("ties")
    with pytest.raises(RsirError, match="'retrieval'"):
        generate_rollouts(ties, ragged([[1, 2]]), GenerationParams(retrieval="ivf"))
    monkeypatch.setitem(sys.modules, "faiss", None)  # as if the extra were not installed
    with pytest.raises(RsirError, match=r"needs faiss: pip install .*\[ann\]"):
        generate_rollouts(model_named("sasrec-2l")[0], ragged([[1, 2]]), GenerationParams(retrieval="ivf"))


def test_rank_counts_are_exact_through_any_tile():
    """count_at_least sums 0/1 floats block by block: equal to counting booleans, ties included,
    whatever the tile's size."""
    from tasks.ranking import count_at_least

    g = torch.Generator().manual_seed(0)
    scores = torch.randint(-3, 4, (7, 1001), generator=g).float()  # many exact ties
    scores[:, 0] = float("-inf")
    top = scores[:, 5].clone()
    top[0] = float("-inf")
    expected = (scores >= top[:, None]).sum(dim=1)
    for tile in (7, 50, 7 * 1001, 10 ** 5):
        assert torch.equal(count_at_least(scores, top, torch.empty(tile)), expected)
