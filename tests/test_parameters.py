"""Run parameters are declared once (tasks/config.py RunConfig): the `rsir` flow's signature,
its Prefect parameter schema and `rsir run`'s options derive from it."""

from __future__ import annotations

import inspect
import json
import os
import re

import pytest

from core.errors import RsirError
from flows.rsir import rsir
from rsir.cli import _nested_pairs
from tasks.config import RunConfig, TrainConfig, TrainingSettings, run_parameters

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


@pytest.mark.parametrize("args, where", [(("run", "--seed", "-1"), "--seed -1: "),
                                         (("train", "--seed", "-1"), "--seed -1: "),
                                         (("experiment", "faithful", "--seed", "-1"), "--seed -1: ")])
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


def _command_flags(name: str) -> set[str]:
    """Every switch of an `rsir` command, as Click holds them (the help truncates long ones)."""
    import typer

    from rsir.cli import app

    command = typer.main.get_command(app).commands[name]
    return {flag for param in command.params for flag in (*param.opts, *param.secondary_opts)}


def test_rsir_train_takes_every_train_config_field(cli, monkeypatch):
    # One training's knobs are declared once (TrainConfig, the backbone's ModelConfig): `rsir
    # train`'s options derive from them (tasks/config.py train_parameters), as `rsir run`'s do.
    from models.config import ModelConfig
    from rsir.cli import _TRAIN_FLAGS
    from tasks.config import MODEL_SETTINGS, TrainConfig, train_parameters

    names = [p.name for p in train_parameters()]
    assert len(names) == len(set(names))
    assert set(names) == set(TrainConfig.model_fields) | set(MODEL_SETTINGS)  # `model`: the backbone's name
    assert set(MODEL_SETTINGS) == set(ModelConfig.model_fields) - {"name"}
    flags = _command_flags("train")
    for name in names:
        for flag in _TRAIN_FLAGS.get(name, "--" + name.replace("_", "-")).split("/"):
            assert flag in flags, flag
    # The spellings the README and the tests use.
    assert {"--include-history", "--negatives-any", "--option", "--positions", "--no-progress",
            "--checkpoint", "--home", "--json"} <= flags
    monkeypatch.setenv("COLUMNS", "400")  # each help on one line: a narrow box folds and cuts long words
    out = _flat_help(cli("train", "--help").out)
    for name, field in {**TrainConfig.model_fields, **ModelConfig.model_fields}.items():
        if name != "model":
            assert field.description and " ".join(field.description.split()) in out, name


def test_rsir_train_hands_every_option_to_the_training(cli, tmp_path, monkeypatch):
    # The options become one TrainConfig (the backbone's settings nested); the training itself is
    # replaced here (tests/test_train.py trains).
    import tasks.train
    from tasks.executor import LOCAL
    from tasks.train import TrainResult

    got = []

    def train_model(cfg, ws, checkpoint=None, executor=LOCAL):
        got.append((cfg, executor, checkpoint))
        return TrainResult(valid={}, test={}, epochs=1, best_epoch=1, seconds_per_epoch=0.0, seconds_total=0.0,
                           checkpoint="c.pt", dataset=cfg.dataset, version=0, digest="d" * 64, device="cpu")

    monkeypatch.setattr(tasks.train, "train_model", train_model)
    args = ["--home", tmp_path / "ws", "--json"]
    res = cli("train", "--dataset", "tiny", "--version", "2", "--model", "sasrec", "--recipe", "release",
              "--patience", "5", "--weight-decay", "0.01", "--hidden", "32", "--heads", "4", "--negatives-any",
              "--option", "ffn_mult=2", "--positions", "newest", "--resume-seconds", "5",
              "--eval-batch-size", "64", "--include-history", "--no-progress", "--threads", "2",
              "--seed", "7", "--device", "cpu", "--checkpoint", tmp_path / "c.pt", *args)
    assert res.code == 0, res.err
    assert json.loads(res.out)["seed"] == 7
    (cfg, executor, checkpoint), = got
    assert (cfg.dataset, cfg.version, cfg.recipe, cfg.patience, cfg.weight_decay, cfg.resume_seconds) == (
        "tiny", 2, "release", 5, 0.01, 5.0)
    assert (cfg.eval_batch_size, cfg.exclude_history, cfg.progress, cfg.threads, cfg.seed, cfg.device) == (
        64, False, False, 2, 7, "cpu")
    assert (cfg.model.hidden, cfg.model.heads, cfg.model.negatives_exclude_input, cfg.model.options["ffn_mult"],
            cfg.model.options["positions"]) == (32, 4, False, 2, "newest")
    # What was left unset is the recipe's: the release's batch, loss and dropout.
    assert (cfg.batch_size, cfg.epochs, cfg.model.loss, cfg.model.dropout) == (256, 1000, "sampled", 0.5)
    assert executor == LOCAL and str(checkpoint).endswith("c.pt")
    got.clear()
    assert cli("train", "--dataset", "tiny", "--train-workers", "2", *args).code == 0
    (cfg, executor, _), = got
    assert cfg.train_workers == 2 and executor.kind == "ray"  # data-parallel needs Ray; rsir train starts one
    assert (cfg.exclude_history, cfg.resume_seconds) == (True, TrainConfig.model_fields["resume_seconds"].default)
    res = cli("train", "--dataset", "tiny", "--resume-seconds", "-1", *args)
    assert res.code == 2 and "--resume-seconds -1.0: " in res.err and len(res.err.strip().splitlines()) == 1


def test_rsir_report_names_the_suite_as_the_experiment_config_does(cli, tmp_path, monkeypatch):
    # The options that name a suite's invocation (the suite, its smoke run, the tracking URI, the
    # MLflow experiment, the archive) are ExperimentConfig's fields, as `rsir experiment`'s are.
    import reporting.report
    import storage.tracking
    import tasks.archive
    from tasks.experiment_config import ExperimentConfig

    flags = _command_flags("report")
    assert {"--smoke", "--tracking-uri", "--experiment", "--archive", "--out", "--command", "--notes"} <= flags
    monkeypatch.setenv("COLUMNS", "400")
    out = _flat_help(cli("report", "--help").out)
    for name in ("smoke", "tracking_uri", "experiment"):
        assert " ".join(ExperimentConfig.model_fields[name].description.split()) in out, name
    # The archive's meaning is the config's; what a report does with it is its own (no stage runs).
    archive = " ".join(ExperimentConfig.model_fields["archive"].description.split()).split(":")[0]
    assert f"{archive}: restored into MLflow before the report is written" in out and "first stage" not in out
    assert ", ".join(ExperimentConfig.model_fields["suite"].annotation.__args__) in out  # tune too
    opened, restored, written = [], [], []
    monkeypatch.setattr(storage.tracking.Tracker, "open", classmethod(
        lambda cls, uri, experiment, root=None: opened.append((uri, experiment)) or "tracker"))
    monkeypatch.setattr(tasks.archive, "restore_runs", lambda tracker, folder: restored.append(folder) or [])
    monkeypatch.setattr(reporting.report, "write_report", lambda tracker, suite, folder, command=None, notes=None:
                        written.append((suite, folder, command)) or {"report": "r.md", "figures": [],
                                                                     "mlflow_run_id": "x"})
    ws = tmp_path / "ws"
    res = cli("report", "tune", "--smoke", "--tracking-uri", f"sqlite:///{tmp_path}/t.db", "--archive",
              tmp_path / "archive", "--command", "rsir experiment tune --smoke", "--home", ws, "--json")
    assert res.code == 0, res.err
    assert opened == [(f"sqlite:///{tmp_path}/t.db", "experiment-tune-smoke")]
    assert restored == [tmp_path / "archive"]
    assert written == [("tune", ws / "reports" / "experiment-tune-smoke", "rsir experiment tune --smoke")]
    assert cli("report", "main", "--experiment", "mine", "--home", ws).code == 0
    assert opened[-1][1] == "mine" and written[-1][1] == ws / "reports" / "mine" and len(restored) == 1
    res = cli("report", "nope", "--home", ws)
    assert res.code == 2 and "SUITE nope: " in res.err and len(res.err.strip().splitlines()) == 1


# ------------------------------------------------------------------ the experiment suites
def _offers(help_text: str, flag: str) -> bool:
    """`flag` is an option of the help (not a prefix of another: --tau of --taus, --p of --ps)."""
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text) is not None


def test_the_suite_flow_and_the_command_take_every_experiment_config_field(cli):
    # Suite knobs are declared once (tasks/experiment_config.py ExperimentConfig): the flow's
    # signature, its Prefect schema (the deployment's) and `rsir experiment`'s options derive from it.
    from flows.experiments import experiment
    from rsir.cli import _EXPERIMENT_FLAGS
    from tasks.experiment_config import ExperimentConfig, experiment_parameters

    names = [p.name for p in experiment_parameters()]
    assert names == list(ExperimentConfig.model_fields)
    assert list(inspect.signature(experiment.fn).parameters) == names
    schema = experiment.parameters.model_dump()
    assert list(schema["properties"]) == names and schema["required"] == ["suite"]
    for name, field in ExperimentConfig.model_fields.items():
        assert field.description and field.description in schema["properties"][name]["description"], name
    assert schema["properties"]["suite"]["enum"] == list(ExperimentConfig.model_fields["suite"].annotation.__args__)
    out = _flat_help(cli("experiment", "--help").out)
    for name in names:
        if name not in ("suite", "home"):  # the command's argument; the CLI's workspace option
            flag = _EXPERIMENT_FLAGS.get(name, "--" + name.replace("_", "-"))
            assert _offers(out, flag), flag
    assert _offers(out, "-K") and "SUITE" in out.upper()
    # What a deployment's `--param` sends (text) is coerced by the schema and read by the config.
    cfg = ExperimentConfig.from_parameters(experiment.validate_parameters(
        {"suite": "sensitivity", "seeds": ["4"], "K": "2", "taus": ["3", "7"], "tau": "5", "p": "0.25"}))
    assert (cfg.seeds, cfg.K, cfg.taus, cfg.tau, cfg.p) == ([4], 2, [3, 7], 5, 0.25)


def test_the_smoke_trims_only_what_the_flat_parameters_left_unset():
    from flows.experiments import experiment
    from tasks.experiment_config import SMOKE_BUDGET, SMOKE_MODEL, ExperimentConfig

    left = ExperimentConfig.from_parameters(experiment.validate_parameters({"suite": "tune", "smoke": True}))
    assert {k: getattr(left, k) for k in SMOKE_BUDGET} == SMOKE_BUDGET and left.experiment_name == \
        "experiment-tune-smoke"
    assert left.model_params == SMOKE_MODEL and left.seeds == [0, 1]
    given = ExperimentConfig.from_parameters(experiment.validate_parameters(
        {"suite": "tune", "smoke": True, "trials": 7, "epochs": 30}))
    assert (given.trials, given.epochs, given.patience) == (7, 30, SMOKE_BUDGET["patience"])
    full = ExperimentConfig.from_parameters(experiment.validate_parameters({"suite": "tune"}))
    assert (full.trials, full.epochs, full.smoke) == (ExperimentConfig.model_fields["trials"].default, None, False)


def test_rsir_experiment_hands_its_options_to_the_flow(cli, tmp_path, monkeypatch):
    # The command's options become the flow's parameters (KEY=VALUE pairs nested), checked as one
    # typed config first; the flow itself is replaced here (the suites run in test_experiments.py).
    import flows.experiments
    import rsir.cli
    from tasks.experiment_config import ExperimentConfig

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    got: list[dict] = []

    def flow(**params):
        got.append(params)
        return {"suite": params["suite"], "ran": [], "skipped": [], "pending": [], "wall_seconds": 0.0,
                "experiment": "x", "tracking_uri": "y"}

    monkeypatch.setattr(flows.experiments, "experiment", flow)
    monkeypatch.setattr(rsir.cli, "_before_flow", lambda ws, uri, datasets, check=None: None)
    monkeypatch.setattr(rsir.cli, "_run_flow", lambda ws, call, started, tracking, closing=None: (call(), 0.0))
    res = cli("experiment", "backbones", "--dataset", "ml-100k", "--seed", "3", "--seed", "4", "-K", "2",
              "--tau", "5", "--p", "0.25", "--m", "3", "--taus", "2", "--taus", "8", "--trials", "7",
              "--backbone-option", "hstu.dropout=0.3", "--backbone-option", "cl4srec.options.cl_weight=0.05",
              "--model-params", "hidden=32", "--shard", "1/2", "--device", "cpu", "--threads", "2",
              "--experiment", "mine", "--archive", str(tmp_path / "archive"), "--smoke",
              "--home", str(tmp_path / "ws"), "--json")
    assert res.code == 0, res.err
    assert json.loads(res.out)["suite"] == "backbones"
    (params,) = got
    assert params["backbone_options"] == {"hstu": {"dropout": 0.3}, "cl4srec": {"options": {"cl_weight": 0.05}}}
    assert params["model_params"] == {"hidden": 32} and params["home"] == str(tmp_path / "ws")
    cfg = ExperimentConfig.from_parameters(params)
    assert (cfg.datasets, cfg.seeds, cfg.K, cfg.tau, cfg.p, cfg.m, cfg.taus, cfg.trials, cfg.epochs) == (
        ["ml-100k"], [3, 4], 2, 5, 0.25, 3, [1, 10], 7, 2)  # --smoke: its sweep and epochs, the given trials
    assert (cfg.shard, cfg.device, cfg.threads, cfg.experiment_name, cfg.archive) == (
        "1/2", "cpu", 2, "mine", str(tmp_path / "archive"))
    assert cfg.model("hstu") == {"hidden": 32, "layers": 1, "max_len": 20, "dropout": 0.3}


@pytest.mark.parametrize("args, where", [
    (("experiment", "nope"), "SUITE nope: "),
    (("experiment", "main", "-K", "0"), "-K 0: "),
    (("experiment", "sensitivity", "--taus", "0"), "--taus 0: "),
    (("experiment", "main", "--p", "2"), "--p 2.0: "),
    (("experiment", "paper", "--grid", "bogus"), "unknown grid entries"),
    (("experiment", "main", "--shard", "2/2"), "--shard 2/2: "),
    (("experiment", "main", "--backbone-option", "sasrek.dropout=0.5"), "unknown backbone 'sasrek'"),
    (("experiment", "main", "--backbone-option", "dropout=0.5"), "--backbone-option expects BACKBONE.KEY=VALUE"),
    (("experiment", "main", "--model-params", "hidden"), "--model-params expects KEY=VALUE"),
    (("experiment", "tune", "--trials", "0"), "--trials 0: "),
])
def test_a_bad_suite_value_is_one_line_before_prefect_starts(cli, args, where, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    res = cli(*args, "--home", str(tmp_path / "ws"))
    assert res.code == 2 and where in res.err and len(res.err.strip().splitlines()) == 1, res.err
    assert not (tmp_path / "prefect").exists()  # no Prefect server (nor its home) was started
