"""storage.checkpoints: round trip, weights_only loading, clear errors naming the file."""

from __future__ import annotations

import pytest
import torch

from models import build_model
from models.config import ModelConfig
from core.errors import RsirError
from storage.checkpoints import CHECKPOINT_FORMAT, read_checkpoint
from tasks.checkpoints import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

N = 30


def trained_model(cfg: ModelConfig):
    torch.manual_seed(0)
    model = build_model(cfg, N)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)  # move away from the init
    seqs = torch.randint(1, N + 1, (4, 6))
    for _ in range(3):
        loss = model.loss(seqs, torch.roll(seqs, -1, 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@pytest.fixture
def cfg() -> ModelConfig:
    return ModelConfig(hidden=16, layers=1, heads=2, max_len=10, dropout=0.1, options={"ffn_mult": 2})


@pytest.fixture
def saved(tmp_path, cfg):
    model = trained_model(cfg)
    path = save_checkpoint(tmp_path / "nested" / "dir" / "m.pt", model, cfg, N,
                           {"dataset": "toy", "version": 3, "valid": {"ndcg@10": 0.25}})
    return path, model


def test_round_trip_gives_identical_scores(saved, cfg):
    path, model = saved
    assert path.is_file()
    loaded, payload = load_checkpoint(path, num_items=N, backbone="sasrec")
    assert type(loaded) is type(model)
    assert loaded.config == cfg
    assert loaded.num_items == N
    assert payload["meta"] == {"dataset": "toy", "version": 3, "valid": {"ndcg@10": 0.25}}
    model.eval()
    loaded.eval()
    seqs = torch.tensor([[0, 0, 0, 4, 5, 6], [1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 0, 9]])
    with torch.no_grad():
        assert torch.equal(loaded.score_last(seqs), model.score_last(seqs))
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    # defaults: no num_items / backbone check
    again, _ = load_checkpoint(str(path))
    assert torch.equal(again.item_emb.weight, model.item_emb.weight)


def test_loads_with_weights_only(saved, cfg):
    path, _ = saved
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == CHECKPOINT_FORMAT
    assert payload["backbone"] == "sasrec"
    assert payload["num_items"] == N
    assert ModelConfig.model_validate(payload["model_config"]) == cfg
    assert all(t.device.type == "cpu" for t in payload["state_dict"].values())
    assert read_checkpoint(path)["num_items"] == N


def test_save_is_atomic_and_overwrites(tmp_path, cfg):
    model = trained_model(cfg)
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, cfg, N, {"v": 1})
    save_checkpoint(path, model, cfg, N, {"v": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temp file left behind
    assert read_checkpoint(path)["meta"] == {"v": 2}


def test_wrong_num_items(saved):
    path, _ = saved
    with pytest.raises(RsirError) as err:
        load_checkpoint(path, num_items=N + 1)
    assert str(path) in str(err.value) and str(N) in str(err.value)


def test_wrong_backbone(saved):
    path, _ = saved
    with pytest.raises(RsirError) as err:
        load_checkpoint(path, backbone="gru4rec")
    assert str(path) in str(err.value) and "gru4rec" in str(err.value)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(RsirError) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)
    with pytest.raises(RsirError):
        load_checkpoint(tmp_path)  # a directory is not a checkpoint


@pytest.mark.parametrize("content", [b"", b"garbage" * 100, b"PK\x03\x04 not really a zip"])
def test_garbage_file(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(RsirError) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_truncated_checkpoint(saved, tmp_path):
    path, _ = saved
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(RsirError) as err:
        load_checkpoint(cut)
    assert str(cut) in str(err.value)


@pytest.mark.parametrize("payload", [{"a": torch.zeros(2)}, [1, 2], {"format": 999}])
def test_not_an_rsir_checkpoint(tmp_path, payload):
    path = tmp_path / "other.pt"
    torch.save(payload, path)
    with pytest.raises(RsirError) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)


def test_mismatched_state_dict(saved, tmp_path):
    path, _ = saved
    payload = torch.load(path, weights_only=True)
    payload["model_config"]["hidden"] = 32  # config no longer matches the weights
    bad = tmp_path / "bad_state.pt"
    torch.save(payload, bad)
    with pytest.raises(RsirError) as err:
        load_checkpoint(bad)
    assert str(bad) in str(err.value)
    payload["model_config"]["heads"] = 3  # invalid config
    torch.save(payload, bad)
    with pytest.raises(RsirError) as err:
        load_checkpoint(bad)
    assert str(bad) in str(err.value)


@pytest.mark.parametrize("edit, needle", [
    (lambda p: p.pop("num_items"), "lacks 'num_items'"),
    (lambda p: p.pop("backbone"), "lacks 'backbone'"),
    (lambda p: p.update(num_items=True), "'num_items' must be a positive integer"),
    (lambda p: p.update(num_items=0), "'num_items' must be a positive integer"),
    (lambda p: p.update(model_config="sasrec"), "'model_config' must be a dict"),
    (lambda p: p.update(state_dict=[1, 2]), "'state_dict' must be a dict of tensors, got a list"),
    (lambda p: p.update(state_dict={"w": [1.0]}), "'state_dict' must map parameter names to tensors"),
])
def test_incomplete_checkpoint_names_the_field(saved, tmp_path, edit, needle):
    path, _ = saved
    payload = torch.load(path, weights_only=True)
    edit(payload)
    bad = tmp_path / "incomplete.pt"
    torch.save(payload, bad)
    for read in (read_checkpoint, load_checkpoint):
        with pytest.raises(RsirError) as err:
            read(bad)
        assert str(bad) in str(err.value) and needle in str(err.value) and "\n" not in str(err.value)
