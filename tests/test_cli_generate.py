"""`rsir generate` and `rsir versions` on tiny real data: one expansion step through the CLI,
statistics in the manifest, and bad parameters refused before any compute."""

from __future__ import annotations

import pytest
import torch

from models import build_model
from models.config import ModelConfig
from storage.dataset import dataset_store
from tasks.checkpoints import save_checkpoint
from tests.conftest import make_tiny_home

TINY_MODEL = ["--hidden", "16", "--layers", "1", "--max-len", "20"]


@pytest.fixture
def trained(cli, tiny_csv, tmp_path):
    ws = make_tiny_home(tmp_path / "workspace", tiny_csv)
    ckpt = tmp_path / "tiny.pt"
    result = cli("train", "--dataset", "tiny", "--epochs", "2", *TINY_MODEL, "--home", ws.root,
                 "--checkpoint", ckpt, "--no-progress", "--threads", "1")
    assert result.code == 0, result.err
    return ws, ckpt


def test_generate_then_versions(cli, trained):
    ws, ckpt = trained
    out = cli("generate", "--dataset", "tiny", "--checkpoint", ckpt, "--home", ws.root, "--json")
    assert out.code == 0, out.err
    new = out.json()
    assert new["version"] == 1 and new["parent_version"] == 0
    stats = new["stats"]
    assert stats["synthetic_sequences"] == stats["accepted"] > 0
    assert 0 < stats["acceptance_rate"] <= 1 and stats["mean_new_length"] >= 3
    assert set(stats["stop_reasons"]) <= {"fidelity", "exhausted", "no_candidate", "max_len"}
    for key in ("density", "pair_density", "item_entropy", "item_entropy_normalised", "item_gini", "apen_synthetic"):
        assert key in stats
    listing = cli("versions", "--dataset", "tiny", "--home", ws.root, "--json").json()
    assert [v["version"] for v in listing["versions"]] == [0, 1]
    assert listing["versions"][1]["generation"]["params"]["tau"] == 10
    seqs = dataset_store(ws).load("tiny", 1)
    synthetic = seqs.filter(seqs["origin"] == "synthetic")
    assert synthetic.height == stats["synthetic_sequences"] and synthetic["parent_seq_id"].null_count() == 0
    assert set(synthetic["iteration"].to_list()) == {1}

    # Expanding again continues the chain; an older version cannot be expanded.
    assert cli("generate", "--dataset", "tiny", "--checkpoint", ckpt, "--home", ws.root).code == 0
    stale = cli("generate", "--dataset", "tiny", "--version", "0", "--checkpoint", ckpt, "--home", ws.root)
    assert stale.code == 2 and "not the latest" in stale.err


def test_a_shared_generation_expands_the_dataset_asked_for(cli, trained):
    """Generations are shared between datasets of equal content: the second dataset must get its
    own version, and the first must stay as it was."""
    ws, ckpt = trained
    store = dataset_store(ws)
    store.fork("tiny", "copy")
    first = cli("generate", "--dataset", "tiny", "--checkpoint", ckpt, "--home", ws.root, "--json")
    second = cli("generate", "--dataset", "copy", "--checkpoint", ckpt, "--home", ws.root, "--json")
    assert first.code == 0 and second.code == 0, second.err
    assert second.json()["dataset"] == "copy" and second.json()["version"] == 1
    assert store.versions("tiny") == [0, 1] and store.versions("copy") == [0, 1]
    assert store.manifest("copy", 1).digest == store.manifest("tiny", 1).digest  # the same generation, reused


def test_fidelity_off_accepts_more_and_longer(cli, trained, tmp_path):
    ws, ckpt = trained
    store = dataset_store(ws)
    store.fork("tiny", "tiny-off")
    on = cli("generate", "--dataset", "tiny", "--checkpoint", ckpt, "--home", ws.root, "--json").json()["stats"]
    off = cli("generate", "--dataset", "tiny-off", "--checkpoint", ckpt, "--home", ws.root, "--no-fidelity",
              "--json").json()["stats"]
    assert off["mean_new_length"] > on["mean_new_length"]
    assert off["synthetic_interactions"] > on["synthetic_interactions"]
    assert "fidelity" not in off["stop_reasons"]


@pytest.mark.parametrize("args, needle", [
    (["--tau", "0"], "--tau 0: "), (["--p", "1.5"], "--p 1.5: "), (["--p", "-0.1"], "--p -0.1: "),
    (["--m", "0"], "--m 0: "),
    (["--min-len", "1"], "--min-len 1: "), (["--mode", "beam"], "mode"),
])
def test_bad_generation_parameters(cli, trained, args, needle):
    ws, ckpt = trained
    result = cli("generate", "--dataset", "tiny", "--checkpoint", ckpt, "--home", ws.root, *args)
    assert result.code == 2 and needle in result.err, result.err
    assert dataset_store(ws).versions("tiny") == [0]


def test_checkpoint_for_other_items_and_unknown_dataset(cli, trained, tmp_path):
    ws, _ = trained
    other = tmp_path / "other.pt"
    config = ModelConfig(hidden=16, layers=1, max_len=20)
    n = dataset_store(ws).manifest("tiny").num_items
    save_checkpoint(other, build_model(config, n + 7), config, n + 7, {})
    result = cli("generate", "--dataset", "tiny", "--checkpoint", other, "--home", ws.root)
    assert result.code == 2 and f"{n + 7} items" in result.err and str(other) in result.err
    missing = cli("generate", "--dataset", "nope", "--checkpoint", other, "--home", ws.root)
    assert missing.code == 2 and "unknown dataset 'nope'" in missing.err
    assert dataset_store(ws).versions("tiny") == [0]


def test_generate_and_evaluate_run_on_the_threads_asked(cli, trained, monkeypatch):
    """Every command that runs torch takes --threads, default 1 (tasks/config.py CpuThreads), and
    leaves the process's setting as it found it; a bad value is one line before any compute."""
    import tasks.evaluate
    import tasks.generate

    seen: list[int] = []
    for module, name in ((tasks.generate, "generate_step"), (tasks.evaluate, "evaluate_checkpoint")):
        real = getattr(module, name)

        def spy(*args, _real=real, **kwargs):
            seen.append(torch.get_num_threads())
            return _real(*args, **kwargs)
        monkeypatch.setattr(module, name, spy)
    ws, ckpt = trained
    before = torch.get_num_threads()
    for command in ("evaluate", "generate"):
        for threads in (["--threads", "3"], []):
            result = cli(command, "--dataset", "tiny", "--checkpoint", ckpt, "--home", ws.root, *threads)
            assert result.code == 0, result.err
    assert seen == [3, 1, 3, 1] and torch.get_num_threads() == before
    bad = cli("generate", "--dataset", "tiny", "--checkpoint", ckpt, "--home", ws.root, "--threads", "-1")
    assert bad.code == 2 and "--threads -1: " in bad.err and len(bad.err.strip().splitlines()) == 1, bad.err
    assert seen == [3, 1, 3, 1] and dataset_store(ws).versions("tiny") == [0, 1, 2]
