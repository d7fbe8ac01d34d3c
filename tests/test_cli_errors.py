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
    (["--model", "gru4rec"], ["model.name", "gru4rec"]),
    (["--epochs", "0"], ["epochs"]),
    (["--dropout", "1.0"], ["model.dropout"]),
    (["--dropout", "-0.1"], ["model.dropout"]),
    (["--max-len", "1"], ["model.max_len"]),
    (["--heads", "3"], ["heads=3", "hidden=64"]),
    (["--layers", "0"], ["model.layers"]),
    (["--lr", "0"], ["lr"]),
    (["--device", "tpu"], ["device"]),
    (["--option", "nope=1"], ["nope"]),
])
def test_invalid_hyper_parameters(args, needles, cli, ws):
    # The dataset does not exist either: the config must be rejected first, before any data is read.
    _assert_clean_failure(cli("train", "--dataset", "nope", *args), ws, *needles)


def test_help_everywhere(cli):
    for cmd in (["--help"], ["data", "--help"], ["data", "fetch", "--help"], ["data", "import", "--help"],
                ["data", "list", "--help"], ["train", "--help"], ["evaluate", "--help"]):
        result = cli(*cmd)
        assert result.code == 0 and "Usage" in result.out, cmd
