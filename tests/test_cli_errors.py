"""Bad input: one clear line naming the file/column/value, non-zero exit, nothing half-written."""

from __future__ import annotations

import pytest

from tests.conftest import workspace_files, write

HEADER = "user_id,item_id,timestamp\n"
GOOD_ROWS = "1,10,1\n1,11,2\n1,12,3\n2,10,1\n2,11,2\n2,12,3\n"


def _assert_clean_failure(result, ws, *needles):
    assert result.code != 0, result.out
    lines = [line for line in result.err.strip().splitlines() if line]
    assert len(lines) == 1, result.err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not [f for f in workspace_files(ws) if "datasets" in f or "checkpoints" in f], workspace_files(ws)
    assert not (ws.staging.exists() and any(ws.staging.iterdir()))


CSV_CASES = {
    "null id": (HEADER + "1,10,1\n,11,2\n", "'user_id'", "null"),
    "negative id": (HEADER + "1,10,1\n1,-11,2\n", "'item_id'", "negative", "-11"),
    "non-integer id": (HEADER + "1,10,1\n1,abc,2\n", "'item_id'", "non-integer", "abc"),
    "float id": (HEADER + "1,10,1\n1,2.5,2\n", "'item_id'", "non-integer", "2.5"),
    "bad timestamp": (HEADER + "1,10,1\n1,11,yesterday\n", "'timestamp'", "unparsable", "yesterday"),
    "header only": (HEADER, "no interactions"),
    "one usable user": (HEADER + "1,10,1\n1,11,2\n1,12,3\n2,10,1\n", "only 1 usable user"),
}


@pytest.mark.parametrize("case", sorted(CSV_CASES))
def test_bad_csv_content(case, cli, ws, tmp_path):
    text, *needles = CSV_CASES[case]
    path = write(tmp_path / "bad.csv", text)
    result = cli("data", "import", path, "--name", "bad", "--format", "csv")
    _assert_clean_failure(result, ws, str(path), *needles)


def test_empty_file(cli, ws, tmp_path):
    path = write(tmp_path / "empty.csv", "")
    _assert_clean_failure(cli("data", "import", path, "--name", "e", "--format", "csv"), ws, "empty file", str(path))


def test_missing_file(cli, ws, tmp_path):
    path = tmp_path / "nope.csv"
    _assert_clean_failure(cli("data", "import", path, "--name", "n", "--format", "csv"), ws, "not found", str(path))


def test_unknown_format(cli, ws, tmp_path):
    path = write(tmp_path / "ok.csv", HEADER + GOOD_ROWS)
    _assert_clean_failure(cli("data", "import", path, "--name", "n", "--format", "xlsx"), ws, "'xlsx'")


def test_misnamed_columns(cli, ws, tmp_path):
    path = write(tmp_path / "cols.csv", "uid,iid,ts\n" + GOOD_ROWS)
    result = cli("data", "import", path, "--name", "c", "--format", "csv", "--user-col", "uid")
    _assert_clean_failure(result, ws, str(path), "'item_id'", "'timestamp'", "'iid'")


def test_corrupt_parquet(cli, ws, tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1" + b"\x00garbage" * 50)
    _assert_clean_failure(cli("data", "import", path, "--name", "p", "--format", "parquet"), ws, str(path))


def test_existing_dataset_is_not_overwritten(cli, ws, tmp_path):
    path = write(tmp_path / "ok.csv", HEADER + GOOD_ROWS)
    assert cli("data", "import", path, "--name", "ok", "--format", "csv").code == 0
    before = workspace_files(ws)
    result = cli("data", "import", path, "--name", "ok", "--format", "csv")
    assert result.code != 0 and "already exists" in result.err
    assert workspace_files(ws) == before
    assert cli("data", "import", path, "--name", "ok", "--format", "csv", "--force").code == 0


def test_unknown_builtin_dataset(cli, ws):
    _assert_clean_failure(cli("data", "fetch", "ml-20m"), ws, "'ml-20m'")


def test_unknown_dataset_for_training(cli, ws):
    _assert_clean_failure(cli("train", "--dataset", "nope"), ws, "unknown dataset 'nope'")


@pytest.mark.parametrize("args, needles", [
    (["--model", "gru4rec"], ["--model gru4rec: ", "gru4rec"]),
    (["--epochs", "0"], ["--epochs 0: "]),
    (["--dropout", "1.0"], ["--dropout 1.0: "]),
    (["--dropout", "-0.1"], ["--dropout -0.1: "]),
    (["--max-len", "1"], ["--max-len 1: "]),
    (["--heads", "3"], ["heads=3", "hidden=64"]),
    (["--layers", "0"], ["--layers 0: "]),
    (["--lr", "0"], ["--lr 0.0: "]),  # the value as read (a float)
    (["--device", "tpu"], ["--device tpu: "]),
    (["--option", "nope=1"], ["--option nope=1: "]),
])
def test_invalid_hyper_parameters(args, needles, cli, ws):
    # The dataset does not exist either: the config must be rejected first, before any data is read.
    _assert_clean_failure(cli("train", "--dataset", "nope", *args), ws, *needles)


@pytest.mark.parametrize("notes, needle", [("missing.md", "--notes missing.md: not a file"),
                                           ("notes text " * 500, "--notes notes text notes text")])
def test_report_notes_must_be_a_file_before_any_work(notes, needle, cli, ws, tmp_path):
    """--notes takes a path: a missing one, or the notes' text given instead (which made is_file
    raise 'File name too long' with the text echoed), is one short line before the archive is read."""
    result = cli("report", "paper", "--notes", notes, "--archive", tmp_path / "no-archive", "--home", ws.root)
    _assert_clean_failure(result, ws, needle)
    assert len(result.err) < 200 and not (ws.root / "mlflow.db").exists()


@pytest.mark.parametrize("command, args, needles", [
    # options take KEY=VALUE pairs: a scalar was a TypeError traceback, alone and beside --option.
    ("run", ["--model-params", "options=3"], ["--model-params options=3: "]),
    ("run", ["--model-params", "options=3", "--option", "positions=newest"], ["--model-params options=3: ",
                                                                             "KEY=VALUE"]),
    ("experiment", ["paper", "--shard", "3/2"], ["--shard 3/2: ", "below N"]),
    # A suite's model parameters are checked against every backbone it trains, before any arm runs
    # (they failed inside the flow, after a Prefect server had started).
    ("experiment", ["paper", "--model-params", "loss=nope"], ["--model-params", "sasrec's", "(loss)"]),
    ("experiment", ["backbones", "--backbone-option", "hstu.options.nope=1"], ["--backbone-option", "hstu's"]),
])
def test_malformed_values_are_one_line_on_every_command(command, args, needles, cli, ws):
    result = cli(command, "--dataset", "nope", *args) if command != "experiment" else cli(command, *args)
    _assert_clean_failure(result, ws, *needles)


def test_help_everywhere(cli):
    for cmd in (["--help"], ["data", "--help"], ["data", "fetch", "--help"], ["data", "import", "--help"],
                ["data", "list", "--help"], ["train", "--help"], ["evaluate", "--help"]):
        result = cli(*cmd)
        assert result.code == 0 and "Usage" in result.out, cmd


# --------------------------------------------------------------------------- issue 12: names and paths
def _import_ok(cli, tmp_path, name: str = "ok") -> None:
    path = write(tmp_path / f"{name}.csv", HEADER + GOOD_ROWS)
    assert cli("data", "import", path, "--name", name, "--format", "csv").code == 0


def _assert_unchanged(result, ws, before, *needles):
    """One line naming the fault, exit status 2, the workspace exactly as it was."""
    assert result.code == 2, (result.out, result.err)
    lines = [line for line in result.err.strip().splitlines() if line]
    assert len(lines) == 1, result.err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert workspace_files(ws) == before
    assert not (ws.staging.exists() and any(ws.staging.iterdir()))


@pytest.mark.parametrize("args", [
    ["train", "--dataset", "../datasets/ok"],
    ["versions", "--dataset", "../../x"],
    ["versions", "--dataset", "ok/../ok"],
    ["versions", "--dataset", "ok\n"],
    ["evaluate", "--dataset", "..", "--checkpoint", "m.pt"],
    ["generate", "--dataset", "...", "--checkpoint", "m.pt"],
    ["data", "view", "../ok", "--name", "v", "--last", "3"],
], ids=["train", "versions-up", "versions-dotdot-inside", "versions-newline", "evaluate", "generate", "view"])
def test_dataset_names_are_checked_on_every_entry_point(args, cli, ws, tmp_path):
    _import_ok(cli, tmp_path)
    before = workspace_files(ws)
    name = args[args.index("--dataset") + 1] if "--dataset" in args else args[2]
    _assert_unchanged(cli(*args), ws, before, f"invalid dataset name {name!r}")


def _point_entry_elsewhere(ws, name: str, target: str) -> None:
    import json

    path = ws.datasets / name / "manifests" / "v00000.json"
    manifest = json.loads(path.read_text())
    manifest["items"]["path"] = target
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("target", ["../other/items.parquet", "ABS"])
def test_manifest_entries_must_stay_inside_the_dataset(target, cli, ws, tmp_path):
    _import_ok(cli, tmp_path, "ok")
    _import_ok(cli, tmp_path, "other")  # same content: checksums would match a stray read
    if target == "ABS":
        target = str(ws.datasets / "other" / "items.parquet")
    _point_entry_elsewhere(ws, "ok", target)
    before = workspace_files(ws)
    for args in (["versions", "--dataset", "ok"], ["train", "--dataset", "ok", "--epochs", "1"]):
        _assert_unchanged(cli(*args), ws, before, "dataset 'ok' v0", repr(target), "outside")


# --------------------------------------------------------------------------- issue 12: disk errors
def _no_space(*args, **kwargs):
    import errno

    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_staging_an_import(cli, ws, tmp_path, monkeypatch):
    monkeypatch.setattr("storage.dataset.pq.write_table", _no_space)
    path = write(tmp_path / "ok.csv", HEADER + GOOD_ROWS)
    result = cli("data", "import", path, "--name", "ok", "--format", "csv")
    _assert_clean_failure(result, ws, "dataset 'ok'", "staging", "No space left on device")


def test_disk_full_while_committing_a_replacement(cli, ws, tmp_path, monkeypatch):
    _import_ok(cli, tmp_path)
    before = workspace_files(ws)
    shown = cli("versions", "--dataset", "ok", "--json").json()
    other = write(tmp_path / "other.csv", HEADER + GOOD_ROWS + "3,10,1\n3,11,2\n3,12,3\n")
    with monkeypatch.context() as patch:
        patch.setattr("storage.files.os.fsync", _no_space)
        result = cli("data", "import", other, "--name", "ok", "--format", "csv", "--force")
    _assert_unchanged(result, ws, before, "dataset 'ok'", "committing", "No space left on device")
    assert cli("versions", "--dataset", "ok", "--json").json() == shown  # the previous version, intact


# --------------------------------------------------------------------------- issue 12: data list
def test_data_list_reports_a_corrupt_manifest_and_lists_the_rest(cli, ws, tmp_path):
    _import_ok(cli, tmp_path, "ok")
    broken = ws.datasets / "broken" / "manifests"
    broken.mkdir(parents=True)
    (broken / "v00000.json").write_text("{not json")
    result = cli("data", "list")
    assert result.code == 0, result.err
    lines = result.out.strip().splitlines()
    assert len(lines) == 2 and lines[1].startswith("ok ")
    assert lines[0].startswith("broken ") and "error:" in lines[0] and "v00000.json" in lines[0]
    rows = cli("data", "list", "--json").json()["datasets"]
    assert [r["dataset"] for r in rows] == ["broken", "ok"]
    assert "v00000.json" in rows[0]["error"] and "error" not in rows[1] and rows[1]["version"] == 0


# --------------------------------------------------------------------------- issue 12: import
def _parquet(path, **columns):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path


def test_multi_character_separator(cli, ws, tmp_path):
    path = write(tmp_path / "ok.csv", HEADER + GOOD_ROWS)
    result = cli("data", "import", path, "--name", "s", "--format", "csv", "--sep", ";;")
    _assert_clean_failure(result, ws, "--sep ;;: ", "one character")


def test_parquet_float_id_out_of_int64_range(cli, ws, tmp_path):
    path = _parquet(tmp_path / "big.parquet", user_id=[1, 1, 1, 2, 2, 2], item_id=[10.0, 1e20, 12.0, 10.0, 11.0, 12.0],
                    timestamp=[1, 2, 3, 1, 2, 3])
    result = cli("data", "import", path, "--name", "p", "--format", "parquet")
    _assert_clean_failure(result, ws, str(path), "'item_id'", "out of range", "row 2", "1e+20")


@pytest.mark.parametrize("column", ["user_id", "timestamp"])
def test_parquet_list_typed_column(column, cli, ws, tmp_path):
    columns = dict(user_id=[1, 1, 1, 2, 2, 2], item_id=[10, 11, 12, 10, 11, 12], timestamp=[1, 2, 3, 1, 2, 3])
    columns[column] = [[v] for v in columns[column]]
    path = _parquet(tmp_path / "lists.parquet", **columns)
    result = cli("data", "import", path, "--name", "p", "--format", "parquet")
    _assert_clean_failure(result, ws, str(path), repr(column), "list")


def test_duplicated_header_column(cli, ws, tmp_path):
    path = write(tmp_path / "dup.csv", "user_id,item_id,timestamp,item_id\n" + "".join(
        f"{row},{row.split(',')[1]}\n" for row in GOOD_ROWS.splitlines()))
    result = cli("data", "import", path, "--name", "d", "--format", "csv")
    _assert_clean_failure(result, ws, str(path), "'item_id'", "more than once")


@pytest.mark.parametrize("args", [
    ["data", "list"], ["data", "import", "x.csv", "--name", "x", "--format", "csv"], ["data", "fetch", "ml-100k"],
    ["data", "view", "a", "--name", "b", "--last", "3"], ["train"], ["versions", "--dataset", "x"],
    ["evaluate", "--checkpoint", "m.pt"], ["generate", "--dataset", "x", "--checkpoint", "m.pt"],
], ids=lambda a: "-".join(a[:2]))
def test_home_is_a_regular_file(args, cli, tmp_path):
    home = write(tmp_path / "home", "not a directory")
    for where in (home, home / "below"):
        result = cli(*args, "--home", where)
        assert result.code == 2, (result.out, result.err)
        lines = result.err.strip().splitlines()
        assert len(lines) == 1 and str(where) in lines[0] and "not a directory" in lines[0], result.err
    assert home.read_text() == "not a directory"


# --------------------------------------------------------------------------- issue 12: checkpoints
def _checkpoint(tmp_path, edit) -> str:
    import torch

    from models import build_model
    from models.config import ModelConfig
    from tasks.checkpoints import save_checkpoint

    cfg = ModelConfig(hidden=8, layers=1, heads=1, max_len=5)
    path = save_checkpoint(tmp_path / "m.pt", build_model(cfg, 3), cfg, 3, {})
    payload = torch.load(path, weights_only=True)
    edit(payload)
    torch.save(payload, path)
    return str(path)


CHECKPOINT_CASES = {
    "no num_items": (lambda p: p.pop("num_items"), "lacks 'num_items'"),
    "num_items not an int": (lambda p: p.update(num_items="3"), "'num_items'", "integer"),
    "state not a dict": (lambda p: p.update(state_dict=[1, 2]), "'state_dict'", "list"),
    "no model_config": (lambda p: p.pop("model_config"), "lacks 'model_config'"),
}


@pytest.mark.parametrize("command", ["evaluate", "generate"])
@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_malformed_checkpoint(case, command, cli, ws, tmp_path):
    edit, *needles = CHECKPOINT_CASES[case]
    _import_ok(cli, tmp_path)
    path = _checkpoint(tmp_path, edit)
    before = workspace_files(ws)
    _assert_unchanged(cli(command, "--checkpoint", path, "--dataset", "ok"), ws, before, path, *needles)


def test_checkpoint_that_is_not_a_torch_file(cli, ws, tmp_path):
    _import_ok(cli, tmp_path)
    path = write(tmp_path / "ratings.pt", HEADER + GOOD_ROWS)
    before = workspace_files(ws)
    for command in ("evaluate", "generate"):
        _assert_unchanged(cli(command, "--checkpoint", path, "--dataset", "ok"), ws, before, str(path), "cannot read",
                          "not a complete torch file")


# --------------------------------------------------------------------------- issue 21/22: import
@pytest.mark.parametrize("text, needles", [
    # Blank lines are no rows, but they are counted: the null id is in the file's 4th row.
    (HEADER + "1,10,1\n\n1,11,2\n,12,3\n2,10,1\n", ["'user_id'", "null id at row 4 (value None)"]),
    (HEADER + "1,10,1\n1,11,2020-01-01\n1,12,3\n", ["'timestamp'", "mixes numbers and date/times",
                                                     "row 1 (value '1') is a number", "row 2 (value '2020-01-01')"]),
    (HEADER + "1,10,1\n1,11,1e-39\n1,12,3\n", ["'timestamp'", "more than 38 digits", "row 2 (value '1e-39')"]),
    (HEADER + "1,10,1\n1,11,12345678901234567890.1234567890123456789\n1,12,3\n",
     ["'timestamp'", "more than 38 digits", "row 2"]),
    (HEADER + "1,10,2020-01-01\n1,11,2020-01-02\n1,12,01/03/2020\n", ["'timestamp'", "unparsable",
                                                                       "row 3 (value '01/03/2020')"]),
], ids=["null id after a blank line", "numbers and dates", "exponent too fine", "too many digits", "two formats"])
def test_bad_rows_are_named_by_their_row_in_the_file(text, needles, cli, ws, tmp_path):
    path = write(tmp_path / "bad.csv", text)
    _assert_clean_failure(cli("data", "import", path, "--name", "bad", "--format", "csv"), ws, str(path), *needles)


def test_sequences_format_errors(cli, ws, tmp_path):
    path = write(tmp_path / "s.txt", "1 10 11 12\n\n2 10 x 12\n")
    _assert_clean_failure(cli("data", "import", path, "--name", "s", "--format", "sequences"), ws, str(path),
                          "'item'", "non-integer id at row 3 (value 'x')")
    _assert_clean_failure(cli("data", "import", path, "--name", "s", "--format", "sequences", "--sep", ","), ws,
                          "sep", "whitespace")
    path.write_bytes(b"1 10 11 12\n2 \xff 11\n")
    _assert_clean_failure(cli("data", "import", path, "--name", "s", "--format", "sequences"), ws, str(path),
                          "not UTF-8")


def test_time_column_options(cli, ws, tmp_path):
    path = write(tmp_path / "n.csv", "user_id,item_id\n1,10\n1,11\n1,12\n2,10\n2,11\n2,12\n")
    _assert_clean_failure(cli("data", "import", path, "--name", "n", "--format", "csv"), ws, str(path),
                          "missing column(s) 'timestamp'", "--no-time")
    _assert_clean_failure(cli("data", "import", path, "--name", "n", "--format", "csv", "--no-time", "--time-col",
                              "ts"), ws, "--no-time", "'ts'")


@pytest.fixture
def beauty_copy(tmp_path):
    from tests.test_ingest import MIRROR

    if MIRROR is None:
        pytest.skip("the benchmark mirror shared/data is absent")
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    data = bytearray((MIRROR / "Beauty.txt").read_bytes())
    data[100] = ord("9") if data[100] != ord("9") else ord("8")  # one digit changed
    (mirror / "Beauty.txt").write_bytes(bytes(data))
    return mirror


def test_benchmark_checksum_mismatch(cli, ws, beauty_copy, monkeypatch):
    import hashlib

    from tasks.builtin import BENCHMARKS

    path = beauty_copy / "Beauty.txt"
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    expected = BENCHMARKS["amazon-beauty"].sha256
    result = cli("data", "fetch", "amazon-beauty", "--from", beauty_copy)
    assert result.code == 2
    _assert_clean_failure(result, ws, f"{path}: sha256 {actual}, expected {expected}")
    assert workspace_files(ws) == []
    monkeypatch.setenv("RSIR_DATA_MIRROR", str(beauty_copy))  # the same through the variable
    _assert_clean_failure(cli("data", "fetch", "amazon-beauty"), ws, f"{path}: sha256 {actual}, expected {expected}")


def test_benchmark_mirror_errors(cli, ws, tmp_path):
    _assert_clean_failure(cli("data", "fetch", "yelp", "--from", tmp_path), ws, str(tmp_path / "Yelp.txt"),
                          "not found in the data mirror")
    _assert_clean_failure(cli("data", "fetch", "yelp", "--from", tmp_path / "nope"), ws, str(tmp_path / "nope"),
                          "not a directory")
    _assert_clean_failure(cli("data", "fetch", "ml-100k", "--from", tmp_path), ws, "--from", "amazon-beauty",
                          "recbole")


def test_train_refuses_two_disagreeing_spellings_of_one_setting(cli, ws):
    result = cli("train", "--positions", "newest", "--option", "positions=oldest", "--home", ws.root)
    assert result.code == 2 and result.err.strip() == \
        "rsir: error: --positions newest and --option positions=oldest disagree; give one"
    assert not ws.checkpoints.exists() or not any(ws.checkpoints.rglob("*.pt"))


# --------------------------------------------------------------------------- a new user's finding: the option typed
# A value a command's typed config refuses is named as the user gave it (the option, the KEY=VALUE
# pair, the list's element), not by its path in the config (`seeds.0`, `model.loss`); the flows
# and the API, which take the parameters by name, keep the paths.
@pytest.mark.parametrize("args, line", [
    (["experiment", "faithful", "--seed", "1", "--seed", "-1"], "--seed -1: "),
    (["experiment", "faithful", "--shard", "3/2"], "--shard 3/2: "),
    (["tune", "--dataset", "tiny", "--seeds", "-1"], "--seeds -1: "),
    (["tune", "--dataset", "tiny", "--tau", "1..x"], "--tau 1..x: "),
    (["run", "--dataset", "tiny", "--seed", "-1"], "--seed -1: "),
    (["run", "--dataset", "tiny", "-K", "abc"], "-K abc: "),
    (["run", "--dataset", "tiny", "--model-params", "loss=nope"], "--model-params loss=nope: "),
    # A key no config declares: "unknown setting" and the nearest name (pydantic's "Extra inputs
    # are not permitted" named neither), on every entry point that takes KEY=VALUE pairs.
    (["run", "--dataset", "tiny", "--model-params", "hiden=3"], "--model-params hiden=3: unknown setting (did you "
                                                                "mean hidden?)"),
    (["run", "--dataset", "tiny", "--model-params", "nope=3"], "--model-params nope=3: unknown setting (known: "),
    (["tune", "--dataset", "tiny", "--run-params", "epocs=3"], "--run-params epocs=3: unknown setting (did you mean "
                                                               "epochs?)"),
    # A model setting given as a run setting: it was `invalid parameter 'loss'`, no option named.
    (["tune", "--dataset", "tiny", "--run-params", "loss=bce"], "--run-params loss=bce: unknown setting"),
    (["tune", "--dataset", "tiny", "--run-params", "model_params.hiden=3"], "--run-params model_params.hiden=3: "
                                                                            "unknown setting (did you mean hidden?)"),
    (["tune", "--dataset", "tiny", "--run-params", "epochs=0"], "--run-params epochs=0: "),
    (["experiment", "paper", "--model-params", "hiden=3"], "--model-params: sasrec's model parameters (hiden): "
                                                           "unknown setting (did you mean hidden?)"),
    (["run", "--dataset", "tiny", "--model-params", "options.positions=x"], "--model-params options.positions=x: "),
    (["run", "--dataset", "tiny", "--generator-params", "hidden=-3"], "--generator-params hidden=-3: "),
    (["train", "--dataset", "tiny", "--loss", "nope"], "--loss nope: "),
    # Options a command folds into another parameter are named as typed, not as where they went.
    (["train", "--dataset", "tiny", "--positions", "sideways"], "--positions sideways: "),
    (["train", "--dataset", "tiny", "--option", "positions=sideways"], "--option positions=sideways: "),
    (["run", "--dataset", "tiny", "--option", "positions=sideways"], "--option positions=sideways: "),
    (["run", "--dataset", "tiny", "--option", "nope=1"], "--option nope=1: unknown setting"),
    (["run", "--dataset", "tiny", "--model-params", "options.nope=1"], "--model-params options.nope=1: "),
    (["generate", "--dataset", "tiny", "--checkpoint", "x.pt", "--tau", "0"], "--tau 0: "),
    (["report", "nope"], "SUITE nope: "),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_a_refused_value_is_named_as_the_option_typed(args, line, cli, ws, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))  # the CLI sets it only when unset
    result = cli(*args)
    _assert_clean_failure(result, ws)
    assert result.code == 2 and result.err.startswith(f"rsir: error: {line}"), result.err
    assert "invalid parameter" not in result.err


def test_data_import_names_its_options_too(cli, ws, tmp_path):
    path = write(tmp_path / "ok.csv", HEADER + GOOD_ROWS)
    result = cli("data", "import", path, "--name", "k", "--format", "csv", "--kcore", "-1")
    _assert_clean_failure(result, ws, "--kcore -1: ")
    result = cli("data", "import", path, "--name", "k", "--format", "csv", "--id-type", "float")
    _assert_clean_failure(result, ws, "--id-type float: ")


def test_flows_and_the_api_keep_the_parameter_names():
    from core.errors import RsirError
    from tasks.config import RunConfig, TrainConfig
    from tasks.experiment_config import ExperimentConfig
    from tasks.tune import TuneConfig

    with pytest.raises(RsirError, match=r"^invalid parameter 'seeds.0': .* \(got -1\)$"):
        ExperimentConfig.from_parameters({"suite": "faithful", "seeds": [-1]})
    with pytest.raises(RsirError, match=r"^invalid parameter 'model.loss': "):
        RunConfig.from_parameters({"dataset": "tiny", "model_params": {"loss": "nope"}})
    with pytest.raises(RsirError, match=r"^invalid parameter 'model.loss': "):
        TrainConfig.from_parameters({"dataset": "tiny", "loss": "nope"})
    with pytest.raises(RsirError, match=r"^invalid parameter 'model.options.nope': unknown setting \(got 1\)$"):
        RunConfig.from_parameters({"dataset": "tiny", "model_params": {"options": {"nope": 1}}})
    with pytest.raises(RsirError, match=r"^invalid parameter 'run_params.loss': unknown setting \(got 'bce'\)$"):
        TuneConfig.from_parameters({"dataset": "tiny", "run_params": {"loss": "bce"}})
