"""storage.checkpoints: round trip, weights_only loading, clear errors naming the file."""

from __future__ import annotations

import pytest
import torch

from core.errors import RsirError
from models import build_model
from models.config import ModelConfig
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


# --------------------------------------------------------------------------- issue 21: item tables
# Two datasets with the same 12 items under the same internal ids, except that dataset `renamed`
# calls item 12 by raw id 99: its sequences are bit for bit those of `base`, so only the item
# table tells that id 12 is another item there.
ITEMS = 12


def _csv(path, last_raw_id: int):
    rows = ["user_id,item_id,timestamp"]
    for user in range(30):
        for j in range(6):
            item = (user + j) % ITEMS + 1
            rows.append(f"{user},{last_raw_id if item == ITEMS else item},{j}")
    path.write_text("\n".join(rows) + "\n")
    return path


def _expected_digest(raw_ids: list[int]) -> str:
    """The documented identity: SHA-256 of the raw ids as text, in internal order, as JSON."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps([str(r) for r in raw_ids]).encode()).hexdigest()


BASE_DIGEST = _expected_digest(list(range(1, ITEMS + 1)))
RENAMED_DIGEST = _expected_digest([*range(1, ITEMS), 99])


@pytest.fixture(scope="module")
def two_tables(tmp_path_factory):
    """A workspace with `base` and `renamed`, and a checkpoint trained on `base`."""
    from core.workspace import Workspace
    from tasks.config import TrainConfig
    from tasks.ingest import ImportSpec, import_dataset
    from tasks.train import train_model

    root = tmp_path_factory.mktemp("items")
    ws = Workspace.at(root / "workspace")
    import_dataset(ws, ImportSpec(path=_csv(root / "base.csv", ITEMS), name="base", format="csv"))
    import_dataset(ws, ImportSpec(path=_csv(root / "renamed.csv", 99), name="renamed", format="csv"))
    cfg = TrainConfig(dataset="base", epochs=1, model=ModelConfig(hidden=8, layers=1, heads=1, max_len=5),
                      device="cpu", threads=1, progress=False)
    result = train_model(cfg, ws, checkpoint=root / "base.pt")
    return ws, result.checkpoint


def test_the_item_table_digest_is_the_raw_ids_in_internal_order(two_tables):
    from storage.dataset import dataset_store

    ws, checkpoint = two_tables
    store = dataset_store(ws)
    assert store.item_table(store.manifest("base")).digest == BASE_DIGEST
    assert store.item_table(store.manifest("renamed")).digest == RENAMED_DIGEST
    assert store.manifest("renamed").num_items == store.manifest("base").num_items == ITEMS
    assert read_checkpoint(checkpoint)["items_digest"] == BASE_DIGEST


def _one_line(result) -> str:
    lines = [line for line in result.err.strip().splitlines() if line]
    assert len(lines) == 1, result.err
    return lines[0]


@pytest.mark.parametrize("command", ["evaluate", "generate"])
def test_a_checkpoint_is_refused_on_another_item_table(two_tables, cli, command):
    from tests.conftest import workspace_files

    ws, checkpoint = two_tables
    before = workspace_files(ws)
    result = cli(command, "--checkpoint", checkpoint, "--dataset", "renamed", "--device", "cpu", "--home", ws.root)
    assert result.code == 2 and result.out == ""
    assert _one_line(result) == (
        f"rsir: error: checkpoint {checkpoint} was trained on another item table (digest {BASE_DIGEST[:12]}) "
        f"than dataset 'renamed' v0 (digest {RENAMED_DIGEST[:12]}): the same {ITEMS} ids denote other items; "
        f"use the dataset it was trained on")
    assert workspace_files(ws) == before


def test_a_checkpoint_is_accepted_on_its_own_table_and_its_expansions(two_tables, cli):
    ws, checkpoint = two_tables
    home = ("--home", ws.root, "--device", "cpu")
    on_base = cli("evaluate", "--checkpoint", checkpoint, "--dataset", "base", "--json", *home)
    assert on_base.code == 0 and on_base.err == "" and on_base.json()["version"] == 0
    # D_1 (synthetic sequences over the same items) and a fork share the base's table.
    grown = cli("generate", "--checkpoint", checkpoint, "--dataset", "base", "--m", "1", "--json", *home)
    assert grown.code == 0 and grown.err == "" and grown.json()["version"] == 1, grown.err
    from storage.dataset import dataset_store

    store = dataset_store(ws)
    store.fork("base", "base-fork")
    for name, version in (("base", 1), ("base-fork", 0)):
        assert store.manifest(name, version).items_digest == BASE_DIGEST
        result = cli("evaluate", "--checkpoint", checkpoint, "--dataset", name, "--version", version, *home)
        assert result.code == 0 and result.err == "", result.err


def test_a_checkpoint_without_a_digest_is_accepted_with_a_warning(two_tables, cli, tmp_path):
    ws, checkpoint = two_tables
    payload = torch.load(checkpoint, weights_only=True)
    del payload["items_digest"]  # as written before checkpoints recorded their item table
    legacy = tmp_path / "legacy.pt"
    torch.save(payload, legacy)
    result = cli("evaluate", "--checkpoint", legacy, "--dataset", "renamed", "--device", "cpu", "--json",
                 "--home", ws.root)
    assert result.code == 0 and result.json()["checkpoint"] == str(legacy)
    assert _one_line(result) == (
        f"rsir: warning: checkpoint {legacy} records no item-table digest (written before rsir recorded one): "
        f"cannot check that its item ids denote the items of dataset 'renamed' v0 (item table "
        f"{RENAMED_DIGEST[:12]}); using it as trained on that table")
