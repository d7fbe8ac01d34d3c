"""What people read (issue 23's smaller frictions): a mistyped dataset fails in one line before a
Prefect server starts; the run table (no `None`, one precision per column, the fork's name, a wall
time that counts the server's start); `rsir data list` aligned with forks; digests at one length;
`rsir serve`'s hints only for the services it runs, and where their logs are. A new user's: every
option's value named for people (not `<list[str]>`), figures rounded where people read them."""

from __future__ import annotations

import json
import re
import time

import pytest

from core.config import parse_config
from core.hashing import SHOWN_DIGITS
from deployments.serve import ServeConfig, ready_lines
from rsir.cli import format_table
from storage.dataset import dataset_store
from tests.conftest import make_tiny_home


def test_an_unknown_dataset_fails_in_one_line_before_any_prefect_server(cli, ws, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    started = time.monotonic()
    result = cli("run", "--dataset", "ml-100k-sprase", "--home", ws.root)
    assert result.code == 2 and time.monotonic() - started < 30
    assert result.err.count("\n") == 1 and "'ml-100k-sprase'" in result.err and "ml-100k-sparse" in result.err
    assert not (ws.root / "prefect").exists()  # no Prefect home, no server, no database


def _row(k: int, acceptance: float | None) -> dict:
    metrics = {"ndcg@10": 0.05, "ndcg@20": 0.0712345, "recall@10": 0.1, "recall@20": 0.2}
    return {"iteration": k, "version": k, "sequences": 100 + k, "synthetic_sequences": k, "interactions": 1000,
            "density": 0.05, "item_entropy": 7.5, "acceptance_rate": acceptance, "mean_new_length": None,
            "valid": metrics, "test": metrics, "epochs": 3, "checkpoint": "x.pt", "train_seconds": 1.0,
            "reused": False, "stats": {}, "times": {"train": 1.0}}


SUMMARY = {"dataset": "tiny", "run_dataset": "tiny--0123456789", "model": "sasrec", "generator": "sasrec", "K": 1,
           "iterations": [_row(0, 0.25), _row(1, None)],
           "wall_seconds": 40.0, "step_seconds": 30.0, "overhead_fraction": 0.25,
           "champion": {"iteration": 0, "registered_model": "rsir-tiny-sasrec", "version": 1, "alias": "champion",
                        "champion_version": 1},
           "mlflow_run_id": "abc", "tracking_uri": "sqlite:///x"}


def test_the_run_table_has_one_precision_per_column_and_no_none():
    lines = format_table({**SUMMARY, "command_seconds": 65.0, "server_start_seconds": 25.0}).splitlines()
    header, first, last = lines[0].split(), lines[1].split(), lines[2].split()
    assert "None" not in "\n".join(lines)
    column = header.index("acceptance")
    assert first[column] == "0.2500" and last[column] == "-"  # no generation after the last iteration
    assert first[header.index("density")] == "0.05000" and first[header.index("entropy")] == "7.5000"
    assert {len(cell.split(".")[1]) for cell in first[header.index("ndcg@10"):]} == {4}  # "valid ndcg@10"...
    assert len({len(line) for line in lines[:3]}) == 1  # the columns line up
    assert "wall 65.0 s (Prefect server start 25.0 s, flow 40.0 s)" in lines[3]
    assert "dataset tiny--0123456789, this run's fork of tiny" in lines[4]
    assert lines[5].startswith("champion: iteration 0 registered as rsir-tiny-sasrec v1 @champion; MLflow run abc")


def test_data_list_aligns_forks_and_digests_have_one_length(cli, tiny_csv, tmp_path):
    ws = make_tiny_home(tmp_path / "workspace", tiny_csv)
    dataset_store(ws).fork("tiny", "tiny--0123456789abcdef0123")  # longer than the old 24-character column
    lines = cli("data", "list", "--home", ws.root).out.splitlines()
    assert len(lines) == 2 and len({line.index(" v0 ") for line in lines}) == 1, lines
    assert len({line.index("interactions") for line in lines}) == 1, lines
    shown = re.search(r"  ([0-9a-f]+)$", cli("versions", "--dataset", "tiny", "--home", ws.root).out.splitlines()[1])
    assert shown and len(shown.group(1)) == SHOWN_DIGITS


def test_serve_hints_only_for_its_services_and_names_the_log_folder(tmp_path):
    only_mlflow = ready_lines(parse_config(ServeConfig, {"services": ["mlflow"]}), tmp_path / "logs")
    assert not any("PREFECT_API_URL" in line for line in only_mlflow)
    assert only_mlflow[0].endswith(f"service logs in {tmp_path / 'logs'}/")
    assert any("MLflow UI: http://127.0.0.1:5000/" in line for line in only_mlflow)
    both = ready_lines(parse_config(ServeConfig, {"services": ["prefect", "worker"], "port": 4321}), tmp_path)
    assert any("PREFECT_API_URL=http://127.0.0.1:4321/api prefect deployment run" in line for line in both)
    assert not any("MLflow" in line for line in both)


# ------------------------------------------------------------------ a new user's findings: metavars, figures
# Typer names an option's value by its Python type (`<int>`, `<list[str]>`); every option of every
# command, derived from a typed config or declared by hand, is named for people instead.
COMMANDS = [("run",), ("train",), ("experiment",), ("tune",), ("report",), ("generate",), ("evaluate",),
            ("versions",), ("serve",), ("data", "import"), ("data", "fetch"), ("data", "view"), ("data", "list")]
PYTHON_TYPE = re.compile(r"<(list\[|int>|str>|float>|bool>|path>|Optional|Union)|Optional\[|list\[")


def _click_command(path: tuple[str, ...]):
    import typer

    from rsir.cli import app

    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return command


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_every_option_names_its_value_for_people(path, cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # one line per option
    out = cli(*path, "--help").out
    assert "Usage" in out and not PYTHON_TYPE.search(out), PYTHON_TYPE.search(out)
    command = _click_command(path)
    for param in command.get_params(command.make_context(path[-1], ["--help"], resilient_parsing=True)):
        if param.param_type_name != "option":
            continue
        shown = param.display_type_rich(ctx=None)
        assert shown == "" if param.is_flag else re.fullmatch(r"[A-Z][A-Z=]*(\|[A-Za-z0-9]+)*", shown), \
            (param.opts, shown)
        if param.multiple:  # a repeatable option is named by its element, and says it repeats once
            assert "list" not in shown and (param.help or "").count("repeatable") == 1, (param.opts, param.help)


def test_the_options_a_new_user_read_are_named_by_their_element(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    out = " ".join(cli("experiment", "--help").out.replace("│", " ").split())
    for shown in ("--arm TEXT", "--seed INTEGER", "--dataset TEXT", "--ps FLOAT", "--model-params KEY=VALUE"):
        assert shown in out, shown
    out = " ".join(cli("run", "--help").out.replace("│", " ").split())
    assert "-K TEXT" in out and "(INTEGER | auto)" in out and "--tau-candidates INTEGER" in out


def test_data_import_rounds_what_people_read_and_json_keeps_every_digit(cli, ws, tmp_path):
    path = tmp_path / "thirds.csv"  # users of 3, 3 and 4 interactions: mean length 10/3
    path.write_text("user_id,item_id,timestamp\n" + "".join(
        f"{u},{i},{i}\n" for u, n in ((1, 3), (2, 3), (3, 4)) for i in range(10, 10 + n)))
    human = cli("data", "import", path, "--name", "thirds", "--format", "csv", "--home", ws.root)
    assert human.code == 0 and "mean length 3.33 " in human.out and "333333" not in human.out, human.out
    as_json = cli("data", "import", path, "--name", "thirds", "--format", "csv", "--force", "--home", ws.root,
                  "--json")
    assert json.loads(as_json.out)["stats"]["mean_length"] == 10 / 3


def test_no_rendering_for_people_prints_a_raw_float(capsys):
    # Every statistic and metric a renderer shows, a float with many digits: none reaches the screen raw.
    from rsir import cli
    from storage.manifest import VersionStats

    third = 1 / 3
    stats = {name: (third if "float" in str(field.annotation) else 3) for name, field in VersionStats.model_fields.items()
             if "dict" not in str(field.annotation) and "Counts" not in str(field.annotation)}
    stats.update(acceptance_rate=third, mean_new_length=third)
    ingest = {"dataset": "d", "version": 0, "digest": "0" * 64, "stats": stats, "users": 3, "items": 4,
              "dropped_short_users": 0}
    metrics = {"ndcg@10": third, "recall@10": third}
    cli._render_ingest(ingest)
    cli._render_list({"datasets": [{"dataset": "d", "version": 0, "digest": "0" * 64, **stats}]})
    cli._render_version({**ingest, "parent_version": 0})
    cli._render_versions({"dataset": "d", "versions": [{"version": 0, "parent_version": None, "digest": "0" * 64,
                                                         "stats": stats}]})
    cli._render_train({"model": "sasrec", "dataset": "d", "version": 0, "digest": "0" * 64, "seed": 0,
                       "device": "cpu", "valid": metrics, "test": metrics, "epochs": 3, "best_epoch": 2,
                       "seconds_per_epoch": third, "seconds_total": third, "checkpoint": "x.pt"})
    cli._render_eval({"model": "sasrec", "dataset": "d", "version": 0, "valid": metrics, "test": metrics})
    out = capsys.readouterr().out
    assert "0.333" in out and "333333" not in out, out
