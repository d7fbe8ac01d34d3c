"""A suite's arm cut short resumes in another workspace from its finished iterations
(tasks/archive.py; flows/rsir.py reads a finished iteration instead of running it): a real
`rsir experiment main --smoke` process stopped by SIGINT in iteration 1 of a K = 2 arm, a real
Prefect test server, MLflow on SQLite, real data (tiny, from ml-100k-sparse). The resumed arm
ends with the numbers and dataset digests of an uninterrupted run; a damaged archived version is
one line and commits nothing."""

from __future__ import annotations

import json
import shutil
import signal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.errors import RsirError
from storage.dataset import dataset_store
from storage.tracking import ARCHIVED_ID_TAG, Tracker
from tasks.archive import FORKS_FOLDER, archive_fork, restore_fork
from tests.conftest import interrupt_command, make_tiny_home

pytestmark = pytest.mark.prefect

# One arm with K = 2 (the smoke's K), trainings long enough to be cut in.
SUITE = dict(suite="main", smoke=True, datasets=["tiny"], seeds=[0], arms=["fidelity"], epochs=30, patience=30,
             device="cpu", threads=1)
ARGS = ["experiment", "main", "--smoke", "--dataset", "tiny", "--seed", "0", "--arm", "fidelity", "--epochs", "30",
        "--patience", "30", "--threads", "1", "--device", "cpu"]


def _arm_run(uri: str, experiment: str) -> tuple[dict, dict[int, dict]]:
    """The finished arm's summary and its iteration runs by k (tags, metrics)."""
    tracker = Tracker.open(uri, experiment)
    (parent,) = [r for r in tracker.search_runs("attributes.status = 'FINISHED'")
                 if r.data.tags.get("rsir.label.arm") == "fidelity"]
    children = {int(r.data.tags["rsir.iteration"]): r
                for r in tracker.search_runs(f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")}
    return tracker.load_dict(parent.info.run_id, "summary.json"), children


def _resume(archive, fresh) -> tuple:
    """The arm run again in workspace `fresh` from `archive`: (fresh, its summary, its runs by k,
    the tracker they are in)."""
    from flows.experiments import experiment

    uri = f"sqlite:///{fresh.root / 'mlflow.db'}"
    resumed = experiment(home=str(fresh.root), tracking_uri=uri, archive=str(archive), **SUITE)
    assert resumed["ran"] == ["tiny/fidelity/seed0"]
    summary, runs = _arm_run(uri, resumed["experiment"])
    assert [r["iteration"] for r in summary["iterations"]] == [0, 1, 2]
    return fresh, summary, runs, Tracker.open(uri, resumed["experiment"])


def _assert_as_uninterrupted(uninterrupted, fresh, summary: dict, runs: dict, fork: str) -> None:
    """The same run as the uninterrupted one: every metric of every iteration, and D_2's digest."""
    whole_ws, (whole, whole_runs) = uninterrupted
    for k, row in enumerate(summary["iterations"]):
        assert row["valid"] == whole["iterations"][k]["valid"] and row["test"] == whole["iterations"][k]["test"]
        assert runs[k].data.metrics["test/ndcg_at_10"] == whole_runs[k].data.metrics["test/ndcg_at_10"]
    assert dataset_store(fresh).manifest(fork, 2).digest == dataset_store(whole_ws).manifest(fork, 2).digest


@pytest.fixture(scope="module")
def uninterrupted(prefect_api, tiny_csv, tmp_path_factory):
    """The same arm run whole, in a workspace of its own: what a resumed arm must equal."""
    from flows.experiments import experiment

    ws = make_tiny_home(tmp_path_factory.mktemp("whole") / "ws", tiny_csv)
    uri = f"sqlite:///{ws.root / 'mlflow.db'}"
    result = experiment(home=str(ws.root), tracking_uri=uri, **SUITE)
    return ws, _arm_run(uri, result["experiment"])


@pytest.fixture(scope="module")
def cut(tiny_csv, tmp_path_factory):
    """The arm stopped by a real SIGINT in iteration 1: (its archive, the first workspace), the
    archive left as the stopped process wrote it (tests resume from copies)."""
    root = tmp_path_factory.mktemp("cut")
    archive, first = root / "archive", make_tiny_home(root / "first", tiny_csv)
    seen = interrupt_command([*ARGS, "--home", str(first.root), "--archive", str(archive)], signal.SIGINT,
                             lambda lines: any("Beginning subflow run 'iteration-1'" in line for line in lines))
    assert seen.returncode == 130, "".join(seen.after[-30:])
    return archive, first


def test_an_arm_cut_in_iteration_1_resumes_elsewhere_as_if_never_cut(uninterrupted, cut, tiny_csv, tmp_path):
    archive, first = tmp_path / "archive", cut[1]
    shutil.copytree(cut[0], archive)
    # What the cut arm left: its run (KILLED), iteration 0 with its row, D_1's synthetic sequences.
    records = [json.loads(p.read_text()) for p in archive.glob("*.json")]
    (stopped,) = [r for r in records if r["tags"].get("rsir.label.arm") == "fidelity"]
    assert stopped["status"] == "KILLED"
    children = [r for r in records if r["tags"].get("mlflow.parentRunId") == stopped["run_id"]]
    assert [(r["name"], r["status"]) for r in children] == [("iteration-0", "FINISHED")]
    assert children[0]["documents"]["iteration.json"]["iteration"] == 0
    fork = stopped["params"]["run_dataset"]
    assert sorted(p.name for p in (archive / FORKS_FOLDER / fork).iterdir()) == ["v00001.json", "v00001.parquet"]
    assert pq.read_table(archive / FORKS_FOLDER / fork / "v00001.parquet").column("origin").unique().to_pylist() == [
        "synthetic"]  # never the real data

    fresh, summary, runs, _ = _resume(archive, make_tiny_home(tmp_path / "second", tiny_csv))
    rows = summary["iterations"]
    # θ_0 was read from the archive, not trained here; θ_1 and θ_2 were trained here.
    assert ARCHIVED_ID_TAG in runs[0].data.tags and ARCHIVED_ID_TAG not in runs[1].data.tags
    assert rows[0]["checkpoint"].startswith(str(first.root)) and rows[1]["checkpoint"].startswith(str(fresh.root))
    # Its wall time counts θ_0's steps, run in the first sitting, beside this sitting's.
    assert summary["restored_seconds"] == pytest.approx(sum(rows[0]["times"].values()))
    assert summary["wall_seconds"] > summary["restored_seconds"] > 0
    _assert_as_uninterrupted(uninterrupted, fresh, summary, runs, fork)
    # The finished arm is archived whole, and its versions leave the archive.
    final = json.loads((archive / f"{stopped['run_id']}.json").read_text())
    assert final["status"] == "FINISHED" and not (archive / FORKS_FOLDER / fork).exists()
    champion = summary["champion"]
    assert (champion["version"] is None) == (champion["iteration"] == 0)  # θ_0's weights stayed in `first`


def test_a_finished_iteration_whose_version_is_not_archived_runs_again(uninterrupted, cut, tiny_csv, tmp_path):
    """The archive kept iteration 0's run but not the D_1 it generated (a version too large for
    git, say): iteration 0 is trained and generates again here, and the arm still ends as the
    uninterrupted one (every metric, D_2's digest)."""
    archive = tmp_path / "archive"
    shutil.copytree(cut[0], archive)
    (forks,) = list((archive / FORKS_FOLDER).iterdir())
    shutil.rmtree(forks)
    fresh, summary, runs, tracker = _resume(archive, make_tiny_home(tmp_path / "fresh", tiny_csv))
    assert all(r["checkpoint"].startswith(str(fresh.root)) for r in summary["iterations"])  # θ_0 too: trained here
    assert summary["restored_seconds"] == 0
    # Iteration 0's run was redone, not duplicated: one run, finished, its row the new one.
    assert runs[0].info.status == "FINISHED"
    assert tracker.load_dict(runs[0].info.run_id, "iteration.json")["checkpoint"].startswith(str(fresh.root))
    _assert_as_uninterrupted(uninterrupted, fresh, summary, runs, forks.name)


def test_a_damaged_archived_version_is_one_line_and_commits_nothing(uninterrupted, tiny_csv, tmp_path):
    whole_ws, _ = uninterrupted
    source = dataset_store(whole_ws)
    (fork,) = [n for n in source.names() if n.startswith("tiny--")]
    assert archive_fork(source, tmp_path, fork, 2) == [1, 2]
    assert archive_fork(source, tmp_path, fork, 2) == []  # only what the archive lacks
    store = dataset_store(make_tiny_home(tmp_path / "target", tiny_csv))
    # v2's sequences altered (one item more in its first sequence): no longer its manifest's digest.
    path = tmp_path / FORKS_FOLDER / fork / "v00002.parquet"
    table = pq.read_table(path)
    items = table.column("items").to_pylist()
    items[0] = [*items[0], items[0][0]]
    column = table.schema.get_field_index("items")
    pq.write_table(table.set_column(column, "items", pa.array(items, table.schema.field("items").type)), path)
    with pytest.raises(RsirError) as raised:
        restore_fork(store, tmp_path, "tiny", fork)
    message = str(raised.value)
    assert "\n" not in message and str(path.with_suffix(".json")) in message and "not restored" in message
    assert store.versions(fork) == [0, 1]  # v1 is sound and committed; v2 is not
    assert store.manifest(fork, 1).digest == source.manifest(fork, 1).digest


def test_a_version_larger_than_a_part_is_archived_in_parts_and_restored_whole(uninterrupted, tiny_csv, tmp_path,
                                                                            monkeypatch):
    """A version over PART_BYTES (a no-fidelity D_1 is MBs; the repository keeps files under
    2 MiB) is archived as row ranges each below it, and restored to the same digest."""
    import tasks.archive as archive

    whole_ws, _ = uninterrupted
    source = dataset_store(whole_ws)
    (fork,) = [n for n in source.names() if n.startswith("tiny--")]
    archive_fork(source, tmp_path / "one", fork, 2)
    size = (tmp_path / "one" / FORKS_FOLDER / fork / "v00002.parquet").stat().st_size
    monkeypatch.setattr(archive, "PART_BYTES", size * 3 // 4)
    assert archive_fork(source, tmp_path / "parts", fork, 2) == [1, 2]
    folder = tmp_path / "parts" / FORKS_FOLDER / fork
    parts = sorted(p.name for p in folder.glob("v00002.p*.parquet"))
    assert len(parts) >= 2 and not (folder / "v00002.parquet").exists(), sorted(p.name for p in folder.iterdir())
    assert all((folder / p).stat().st_size <= size * 3 // 4 for p in parts)
    store = dataset_store(make_tiny_home(tmp_path / "target", tiny_csv))
    assert restore_fork(store, tmp_path / "parts", "tiny", fork) == [1, 2]
    assert [store.manifest(fork, v).digest for v in (1, 2)] == [source.manifest(fork, v).digest for v in (1, 2)]


def test_a_stopped_arm_without_a_kept_row_is_left_out_and_redone(tmp_path):
    """An arm stopped with an iteration logged by a version that kept no rows: nothing of it is
    archived (a resumed arm could not read that iteration), and the rest is archived as before."""
    from storage.tracking import RUN_KEY_TAG
    from tasks.archive import archive_runs

    tracker = Tracker.open(f"sqlite:///{tmp_path / 'mlflow.db'}", "arms")
    parent = tracker.start_run("rsir-tiny", {"rsir.label.arm": "fidelity", RUN_KEY_TAG: "k"})
    child = tracker.start_run("iteration-0", {"rsir.iteration": "0"}, parent=parent)
    tracker.end_run(child)
    tracker.end_run(parent, "KILLED")
    whole = tracker.start_run("rsir-tiny", {"rsir.label.arm": "other", RUN_KEY_TAG: "j"})
    tracker.end_run(whole)
    assert archive_runs(tracker, tmp_path / "archive") == [whole]
