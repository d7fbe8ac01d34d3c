"""The authors' generator (benchmarks/authors_generator.py), the speed benchmark's peer, gives
exactly the oracle's rollouts: the benchmark's speed-ups compare equal outputs."""

from __future__ import annotations

import pytest

import oracle
from benchmarks import authors_generator
from test_generate import MAX_LEN_MODEL, case_seed, model_named, random_sources


@pytest.mark.parametrize("name", ["sasrec", "hstu", "ties", "sparse"])
@pytest.mark.parametrize("tau,p,m", [(3, 0.5, 3), (None, 0.5, 2), (1, 0.0, 1), (10, 1.0, 2)])
def test_authors_generator_matches_oracle(name, tau, p, m):
    model, num_items = model_named(name)
    seqs = random_sources(num_items, 6, seed=case_seed("authors", name, tau, p, m))
    expected = oracle.generate(model, seqs, m, tau, p, MAX_LEN_MODEL, 9)
    for batch_size in (1, 4, 1024):
        assert authors_generator.generate(model, seqs, m, tau, p, MAX_LEN_MODEL, 9, batch_size) == expected


def test_authors_generator_stops_at_max_len():
    model, num_items = model_named("ties")
    got = authors_generator.generate(model, [list(range(1, 16))], 1, None, 1.0, 4, 0)
    assert got == oracle.generate(model, [list(range(1, 16))], 1, None, 1.0, 4, 0)
    assert got[0][1] == "max_len" and len(got[0][0]) == 4
