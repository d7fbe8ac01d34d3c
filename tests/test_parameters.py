"""Run parameters are declared once (tasks/config.py RunConfig): the `rsir` flow's signature,
its Prefect parameter schema and `rsir run`'s options derive from it."""

from __future__ import annotations

import inspect
import os

import pytest

from core.errors import RsirError
from flows.rsir import rsir
from rsir.cli import _nested_pairs
from tasks.config import RunConfig, TrainingSettings, run_parameters

BACKBONES = {"model", "model_params", "generator", "generator_params"}


def test_the_flow_takes_every_run_config_field_flat():
    names = [p.name for p in run_parameters()]
    assert len(names) == len(set(names))
    assert set(names) == (set(RunConfig.model_fields) - {"model", "generator"}) | BACKBONES
    assert list(inspect.signature(rsir.fn).parameters) == names


def test_prefect_schema_has_each_parameter_with_its_description_and_default():
    schema = rsir.parameters.model_dump()["properties"]
    assert set(schema) == {p.name for p in run_parameters()}
    for name, field in RunConfig.model_fields.items():
        if name in ("model", "generator"):
            continue
        assert field.description and field.description in schema[name]["description"], name
    assert schema["tau"]["default"] == RunConfig.model_fields["tau"].default == 10
    # Training settings are left to the recipe: None unless given.
    for name in TrainingSettings.names() - {"recipe"}:
        assert schema[name]["default"] is None, name


def test_prefect_validates_and_coerces_flow_parameters():
    assert rsir.validate_parameters({"K": "2", "tau": "5"})["K"] == 2
    with pytest.raises(Exception, match="bogus"):
        rsir.validate_parameters({"bogus": 1})


def test_flat_parameters_become_one_typed_config():
    cfg = RunConfig.from_parameters({"K": 1, "weighting": "batch", "model_params": {"hidden": 32},
                                     "generator": "hstu", "epochs": None})
    assert (cfg.K, cfg.weighting, cfg.model.hidden, cfg.generator.name) == (1, "batch", 32, "hstu")
    assert cfg.epochs == TrainingSettings.model_fields["epochs"].default
    release = RunConfig.from_parameters({"recipe": "release", "patience": 5})
    assert (release.patience, release.batch_size, release.model.loss) == (5, 256, "sampled")
    with pytest.raises(RsirError, match="invalid parameter 'tau'"):
        RunConfig.from_parameters({"tau": 0})


def test_cli_key_value_pairs_nest_and_parse_values():
    assert _nested_pairs(["hidden=32", "options.positions=newest", "dropout=0.5"], "--model-params") == {
        "hidden": 32, "options": {"positions": "newest"}, "dropout": 0.5}
    assert _nested_pairs(None, "--x") is None
    with pytest.raises(RsirError, match="--model-params expects KEY=VALUE, got 'hidden'"):
        _nested_pairs(["hidden"], "--model-params")


def test_rsir_run_offers_every_flow_parameter(cli):
    out = cli("run", "--help").out
    for p in run_parameters():
        if p.name not in ("home", "progress"):  # the CLI sets these itself
            flag = "-K" if p.name == "K" else "--" + p.name.replace("_", "-")
            assert flag in out, flag


def test_rsir_run_rejects_a_bad_value_in_one_line(cli):
    res = cli("run", "--dataset", "ml-100k-sparse", "--model-params", "options.positions=sideways")
    assert res.code == 2 and "positions" in res.err and len(res.err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, where", [(("run", "--seed", "-1"), "'seed'"),
                                         (("train", "--seed", "-1"), "'seed'"),
                                         (("experiment", "faithful", "--seed", "-1"), "'seeds.0'")])
def test_a_negative_seed_is_one_line_before_any_compute(cli, args, where, tmp_path, monkeypatch):
    # numpy's generators refuse negative seeds: it used to fail inside the first training.
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))  # the CLI sets it only when unset
    res = cli(*args)
    assert res.code == 2 and where in res.err and len(res.err.strip().splitlines()) == 1


def test_a_new_workspace_gets_its_prefect_home_before_prefect_starts(tmp_path, monkeypatch):
    # Prefect's temporary server cannot create its database in a folder that does not exist:
    # `rsir experiment` in a new workspace failed with a long traceback.
    from core.workspace import Workspace
    from rsir.cli import _local_prefect

    monkeypatch.setenv("PREFECT_HOME", "recorded, so that teardown restores the session's value")
    monkeypatch.delenv("PREFECT_HOME")
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    ws = Workspace.at(tmp_path / "new")
    _local_prefect(ws)
    assert (tmp_path / "new" / "prefect").is_dir()
    assert os.environ["PREFECT_HOME"] == str(tmp_path / "new" / "prefect")


def _flat_help(text: str) -> str:
    """Typer's help boxes as one line of words (wrapped help text joined again)."""
    return " ".join(text.replace("│", " ").split())


def test_rsir_train_states_the_stride_the_training_uses(cli):
    from models.config import ModelConfig
    from tasks.config import TrainConfig

    train_help = _flat_help(cli("train", "--help").out)
    # The default the help states is the one training uses: half the window.
    assert "unset = max_len // 2 (half a window; no recipe sets it)" in train_help
    assert "(default max_len)" not in train_help
    for recipe in ("default", "release"):
        assert TrainConfig(recipe=recipe, model=ModelConfig(max_len=20)).window_stride == 10
        assert TrainConfig(recipe=recipe, model=ModelConfig(max_len=7)).window_stride == 3
    # Each training setting `train` shares with `run` has one help text, the field's description.
    run_help = _flat_help(cli("run", "--help").out)
    for name in ("recipe", "synthetic_weight", "batching", "weighting", "stride", "early_stop"):
        description = " ".join(TrainingSettings.model_fields[name].description.split())
        assert description in train_help and description in run_help, name
