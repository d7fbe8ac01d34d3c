"""Issue 24: faults end in one line. For each kind of fault the issue lists (out-of-range numbers,
failures to write, broken service state, bad environment values, a cause inside a task, a fork
that links into the base dataset, an unreadable dataset, first use by runs started together, a
killed worker, MLflow's telemetry): one line on stderr naming the value, path or URL, exit 2,
and the workspace as it was (a digest of its files before and after).

Fast by design: tiny data and models, the session's Prefect server, in-process commands where
the terminal does not matter, and a subprocess only where it does (what Prefect's engines print
for a failed task is the point there).
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from core.workspace import Workspace
from storage.dataset import dataset_store
from tests.conftest import CliResult, make_tiny_home

REPO = Path(__file__).resolve().parent.parent
TINY_RUN = ["run", "--dataset", "tiny", "--seed", "0", "--threads", "1", "--model-params", "hidden=16",
            "--model-params", "max_len=20", "--json", "-K", "1", "--epochs", "1"]
# What a run may print on stderr besides its error: Prefect's and MLflow's INFO lines.
_LOG_LINE = re.compile(r"^(\d\d:\d\d:\d\d\.\d{3} \| (INFO|WARNING) |\d{4}/\d\d/\d\d \d\d:\d\d:\d\d INFO |See https://docs\.prefect\.io)")
# Service state and logs change with every command (Prefect's and MLflow's databases, the log
# file, the first-use locks); "the workspace as it was" is about the data.
_SERVICE_STATE = ("prefect", "logs", "mlflow.db", "mlartifacts")


def digest(ws: Workspace, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """SHA-256 of every file of the workspace (by its path, links not followed) but service
    state, downloads and `skip` (path prefixes)."""
    out = {}
    if not ws.root.exists():
        return out
    for path in sorted(ws.root.rglob("*")):
        rel = path.relative_to(ws.root).as_posix()
        if rel.startswith(_SERVICE_STATE + ("downloads",) + skip) or path.is_dir() or path.is_symlink():
            continue
        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def one_error_line(err: str) -> str:
    """The only line of stderr that is not an INFO log line; fails unless there is exactly one
    and it is rsir's error line."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and not _LOG_LINE.match(line)]
    assert len(lines) == 1, "\n".join(lines)
    assert lines[0].startswith("rsir: error: "), lines[0]
    return lines[0]


def assert_refused(result, ws: Workspace, before: dict[str, str], *needles: str, skip: tuple[str, ...] = ()) -> str:
    assert result.code == 2, (result.code, result.out, result.err)
    line = one_error_line(result.err)
    for needle in needles:
        assert needle in line, (needle, line)
    assert digest(ws, skip) == before
    return line


@pytest.fixture
def tiny(tiny_csv, tmp_path) -> Workspace:
    """A workspace ($RSIR_HOME) with the tiny dataset."""
    return make_tiny_home(tmp_path / "workspace", tiny_csv)


@pytest.fixture
def local_prefect(tiny, monkeypatch):
    """`rsir run` in this process keeps Prefect's state in the workspace, as it does for a user."""
    monkeypatch.setenv("PREFECT_HOME", str(tiny.root / "prefect"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    return tiny


def rsir_process(ws: Workspace, args: list[str], prefect_api: str, timeout: float = 600) -> CliResult:
    """`rsir ARGS` in its own process, as a user types it, on the session's Prefect server."""
    env = {**os.environ, "RSIR_HOME": str(ws.root), "PREFECT_API_URL": prefect_api, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "rsir.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    return CliResult(done.returncode, done.stdout, done.stderr)


# ------------------------------------------------------------------ 1. out-of-range numbers
@pytest.mark.parametrize("args, needles", [
    (["-K", "1", "--epochs", "1", "--m", "1000000000"], ["--m 1000000000: ", "less than or equal to 1000"]),
    (["--tau", "3000000000"], ["--tau 3000000000: ", "2147483647"]),
    (["--tau", "1e30"], ["--tau", "integer"]),  # Typer's usage error, in one line too
    (["--seed", str(2 ** 40)], [f"--seed {2 ** 40}: "]),
    (["--gen-batch-size", str(2 ** 30)], [f"--gen-batch-size {2 ** 30}: "]),
    (["--lr", "inf"], ["--lr inf: "]),
    (["--model-params", "max_len=100000"], ["--model-params max_len=100000: "]),
])
def test_out_of_range_numbers_are_refused_before_work(args, needles, cli, tiny):
    before = digest(tiny)
    assert_refused(cli("run", "--dataset", "tiny", *args), tiny, before, *needles)


def test_out_of_range_numbers_other_commands(cli, tiny):
    before = digest(tiny)
    assert_refused(cli("train", "--dataset", "tiny", "--batch-size", str(2 ** 30)), tiny, before, f"--batch-size {2 ** 30}: ")
    assert_refused(cli("generate", "--dataset", "tiny", "--checkpoint", "x.pt", "--m", "5000"), tiny, before, "--m 5000: ")
    assert_refused(cli("generate", "--dataset", "tiny", "--checkpoint", "x.pt", "--item-chunk", str(2 ** 40)),
                   tiny, before, f"--item-chunk {2 ** 40}: ")
    assert_refused(cli("experiment", "main", "--seed", "-1"), tiny, before, "--seed -1: ")


def test_the_flow_and_the_deployment_refuse_a_parameter_by_name(tiny):
    """The deployment's parameters reach the flow's entry, which validates them first: tau=1e99
    fails the flow run with one line naming tau (no task has run: the workspace is unchanged)."""
    from core.errors import RsirError
    from flows.rsir import _rsir

    before = digest(tiny)
    with pytest.raises(RsirError, match=r"invalid parameter 'tau'"):
        _rsir(dataset="tiny", home=str(tiny.root), tau=1e99)
    with pytest.raises(RsirError, match=r"invalid parameter 'm'"):
        _rsir(dataset="tiny", home=str(tiny.root), m=10 ** 9)
    assert digest(tiny) == before


def test_a_suite_flow_run_fails_with_one_line(tiny, tmp_path, prefect_api):
    """The `rsir-experiment` flow, called as its deployment calls it, ends a fault the user can
    fix in one line naming the path and the operation, as the `rsir` and `rsir-tune` flows do:
    a tracking database below a regular file fails inside storage with an OSError (no RsirError
    of its own) before any arm runs."""
    from core.errors import RsirError
    from flows.experiments import experiment

    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the tracking database's folder should be")
    before = digest(tiny)
    state = experiment(suite="main", smoke=True, home=str(tiny.root), tracking_uri=f"sqlite:///{blocker}/mlflow.db",
                       return_state=True)
    assert state.is_failed()
    with pytest.raises(RsirError) as caught:
        state.result()
    line = str(caught.value)
    assert line == f"storage.tracking.open failed on {blocker}: File exists [EEXIST]"
    assert line in state.message and len(state.message.splitlines()) == 1
    assert digest(tiny) == before and blocker.read_text().startswith("a file")


# ------------------------------------------------------------------ 2. failures to write
def test_train_on_a_full_disk(cli, tiny, monkeypatch, one_thread):
    """The checkpoint's write fails with ENOSPC, as a write to a full disk does (an OSError
    without a file name): one line naming the checkpoint file and the operation; nothing is
    left behind."""
    write_bytes = Path.write_bytes

    def full(path, data):
        if tiny.checkpoints in path.parents:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_bytes(path, data)

    before = digest(tiny)
    monkeypatch.setattr(Path, "write_bytes", full)
    result = cli("train", "--dataset", "tiny", "--epochs", "1", "--hidden", "16", "--max-len", "20", "--threads", "1",
                 "--no-progress")
    monkeypatch.undo()
    line = assert_refused(result, tiny, before, "No space left on device [ENOSPC]", str(tiny.checkpoints / "by-content"),
                          "storage.files")
    assert ".pt" in line


def test_train_into_a_checkpoints_path_that_is_a_file(cli, tiny, one_thread):
    tiny.checkpoints.write_text("not a folder")
    before = digest(tiny)
    assert_refused(cli("train", "--dataset", "tiny", "--epochs", "1", "--hidden", "16", "--max-len", "20",
                       "--threads", "1", "--no-progress"), tiny, before, str(tiny.checkpoints), "[ENOTDIR]")


@pytest.mark.prefect
def test_run_whose_task_cannot_write(tiny, prefect_api):
    """The train task's checkpoint write fails (checkpoints/ is a file): one line, no Prefect task
    or flow traceback on the terminal (they are in the workspace's log), the MLflow parent run
    closed FAILED at once. The base dataset is untouched (the run's own fork stays, to resume)."""
    from mlflow import MlflowClient

    tiny.checkpoints.write_text("not a folder")
    before = digest(tiny, skip=("datasets/tiny--", "staging"))
    result = rsir_process(tiny, TINY_RUN, prefect_api)
    assert_refused(result, tiny, before, str(tiny.checkpoints), "[ENOTDIR]", "storage.files",
                   skip=("datasets/tiny--", "staging"))
    assert "Traceback" in (tiny.root / "logs" / "rsir.log").read_text()  # kept, out of the terminal
    client = MlflowClient(f"sqlite:///{tiny.mlflow_db}")
    runs = client.search_runs([client.get_experiment_by_name("rsir").experiment_id])
    assert runs and {r.info.status for r in runs} == {"FAILED"}
    assert not any((tiny.staging).iterdir())


# ------------------------------------------------------------------ 3. broken service state, bad environment
@pytest.mark.parametrize("fault, needles", [
    ("prefect_db", ["Prefect database", "prefect.db"]),
    ("mlflow_db", ["MLflow tracking database", "mlflow.db"]),
    ("tracking_uri", ["MLFLOW_TRACKING_URI", "'garbage:///x'", "unknown scheme 'garbage'"]),
    ("prefect_api", ["PREFECT_API_URL", "http://127.0.0.1:1/api", "unreachable"]),
])
def test_broken_service_state_is_refused_before_work(fault, needles, cli, local_prefect, monkeypatch):
    ws = local_prefect
    if fault == "prefect_db":
        (ws.root / "prefect").mkdir()
        (ws.root / "prefect" / "prefect.db").write_bytes(b"garbage " * 1000)
    elif fault == "mlflow_db":
        ws.mlflow_db.write_bytes(b"garbage " * 1000)
    elif fault == "tracking_uri":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "garbage:///x")
    else:
        monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:1/api")
    before = digest(ws)
    files = sorted(p for p in ws.root.rglob("*") if p.is_file())
    assert_refused(cli(*TINY_RUN), ws, before, *needles)
    assert sorted(p for p in ws.root.rglob("*") if p.is_file()) == files  # no database was created either


def test_bad_workspace_url_and_s3_endpoint(cli, monkeypatch):
    monkeypatch.setenv("RSIR_HOME", "foo://bar/x")
    result = cli("data", "list")
    assert result.code == 2 and one_error_line(result.err).endswith(
        "workspace URL 'foo://bar/x': unknown scheme 'foo'; use a directory or an fsspec URL such as "
        "s3://bucket/prefix (from --home or $RSIR_HOME)")
    monkeypatch.setenv("RSIR_HOME", "s3://bucket/x")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    result = cli(*TINY_RUN)
    assert result.code == 2 and "S3 endpoint (from $AWS_ENDPOINT_URL) http://127.0.0.1:1 is unreachable" in \
        one_error_line(result.err)


# ------------------------------------------------------------------ 4. a named cause inside a task
@pytest.mark.prefect
def test_a_cause_inside_a_task_is_the_one_line(tiny, prefect_api):
    """A truncated part file of the run's fork: the train task's read names it; Prefect's task
    and flow tracebacks stay out of the terminal."""
    run_dataset = _fork_of_tiny(tiny)
    part = next((tiny.datasets / run_dataset / "sequences").rglob("*.parquet"))
    part.write_bytes(part.read_bytes()[:100])
    before = digest(tiny)
    result = rsir_process(tiny, TINY_RUN, prefect_api)
    assert_refused(result, tiny, before, part.name)


def _fork_of_tiny(ws: Workspace) -> str:
    """Create the fork `rsir run TINY_RUN` works on (its name is the lineage key of the parameters)."""
    from tasks.config import RunConfig

    cfg = RunConfig.from_parameters({"dataset": "tiny", "seed": 0, "threads": 1, "K": 1, "epochs": 1,
                                     "model_params": {"hidden": 16, "max_len": 20}})
    name = cfg.run_dataset
    dataset_store(ws).fork("tiny", name)
    return name


# ------------------------------------------------------------------ 5. a fork that links into the base dataset
def test_a_fork_that_links_into_the_base_dataset_is_refused(tiny):
    from core.errors import RsirError

    base = dataset_store(tiny)
    link = tiny.datasets / "tiny--linked"
    link.symlink_to(tiny.datasets / "tiny", target_is_directory=True)
    before = digest(tiny)
    with pytest.raises(RsirError, match=r"dataset 'tiny--linked': its directory .* resolves to .*/datasets/tiny, "
                                        r"inside another dataset"):
        base.fork("tiny", "tiny--linked")
    with pytest.raises(RsirError, match="inside another dataset"):
        base.append("tiny--linked", base.manifest("tiny"), base.load("tiny").to_arrow(), {"key": "x"})
    assert digest(tiny) == before and base.versions("tiny") == [0]


def test_a_write_through_a_link_inside_a_dataset_is_refused(tiny):
    """A link inside the fork (its `sequences` pointing into the base dataset) cannot lead a write there."""
    from core.errors import RsirError

    store = dataset_store(tiny)
    store.fork("tiny", "fork")
    fork_seqs = tiny.datasets / "fork" / "sequences"
    import shutil

    shutil.rmtree(fork_seqs)
    fork_seqs.symlink_to(tiny.datasets / "tiny" / "sequences", target_is_directory=True)
    before = digest(tiny)
    parent = store.manifest("fork")
    with pytest.raises(RsirError, match="outside the dataset's directory"):
        store.append("fork", parent, store.load("tiny").head(3).to_arrow().drop_columns(["iteration"]), {"key": "x"})
    assert digest(tiny) == before and store.versions("tiny") == [0]


@pytest.mark.prefect
def test_run_whose_fork_is_a_link_to_the_base_dataset(tiny, prefect_api):
    """The issue's input: the run's dataset directory replaced by a link to the base dataset."""
    name = _fork_of_tiny(tiny)
    import shutil

    shutil.rmtree(tiny.datasets / name)
    (tiny.datasets / name).symlink_to(tiny.datasets / "tiny", target_is_directory=True)
    before = digest(tiny)
    result = rsir_process(tiny, TINY_RUN, prefect_api)
    assert_refused(result, tiny, before, f"dataset {name!r}", "inside another dataset")
    assert dataset_store(tiny).versions("tiny") == [0]


# ------------------------------------------------------------------ 6. an unreadable dataset is listed
def test_data_list_reports_every_dataset_it_cannot_read(cli, tiny, tiny_csv):
    assert cli("data", "import", tiny_csv, "--name", "other", "--format", "csv").code == 0
    import shutil

    manifests = tiny.datasets / "other" / "manifests"
    shutil.rmtree(manifests)
    manifests.write_text("a file")
    (tiny.datasets / "linked").symlink_to(tiny.datasets / "tiny", target_is_directory=True)
    before = digest(tiny)
    result = cli("data", "list")
    assert result.code == 0 and digest(tiny) == before
    lines = result.out.splitlines()
    assert [line.split()[0] for line in lines] == ["linked", "other", "tiny"]
    assert f"error: dataset 'other': cannot list its manifests {manifests}: not a directory" in lines[1]
    assert "error: dataset 'linked'" in lines[0] and "inside another dataset" in lines[0]
    rows = {d["dataset"]: d for d in cli("data", "list", "--json").json()["datasets"]}
    assert "error" in rows["other"] and "error" in rows["linked"] and rows["tiny"]["version"] == 0


# ------------------------------------------------------------------ 7. first use by runs started together
def test_runs_started_together_initialise_the_tracking_database_once(tmp_path):
    """Three processes open a new workspace's MLflow database at once: all succeed (MLflow creates
    the tables unguarded; the lock makes that happen once)."""
    db = tmp_path / "new" / "mlflow.db"
    script = ("import sys; from storage.tracking import Tracker; "
              f"Tracker.open('sqlite:///{db}', 'rsir').start_run('r' + sys.argv[1]); print('ok')")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(i)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(3)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in results]
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    assert len(client.search_runs([client.get_experiment_by_name("rsir").experiment_id])) == 3


# ------------------------------------------------------------------ 8. a killed worker's runs are closed
def test_the_liveness_sweep_closes_runs_whose_process_died(tiny, capsys):
    """A run whose process is gone (a worker killed with its flow-run process) is closed KILLED by
    `python -m flows.liveness`, by the same rule as a resumed run uses; a live run stays RUNNING."""
    import psutil

    from flows.liveness import main as sweep_main
    from storage.tracking import RunOwner, Tracker, owner_tags

    tracker = Tracker.open(f"sqlite:///{tiny.mlflow_db}", "rsir")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    started = psutil.Process(gone.pid).create_time()
    gone.wait()
    here = RunOwner.current()
    dead_owner = RunOwner(here.host, here.machine, gone.pid, started)
    dead = tracker.start_run("dead", {"rsir.lineage": "abc", **owner_tags(), **dead_owner.tags()})
    child = tracker.start_run("iteration-0", {"rsir.iteration": "0"}, parent=dead)
    live = tracker.start_run("live", {"rsir.lineage": "abc", **owner_tags()})
    capsys.readouterr()
    sweep_main(["--home", str(tiny.root)])
    out = capsys.readouterr().out
    assert f"closed MLflow run {dead}" in out and live not in out
    status = {r: tracker._client.get_run(r).info.status for r in (dead, child, live)}
    assert status == {dead: "KILLED", child: "KILLED", live: "RUNNING"}
    tracker.end_run(live)


def test_rsir_serve_sweeps_at_start_then_periodically(tmp_path, monkeypatch):
    """`rsir serve` runs the sweep at once (what an earlier serve left), then every SWEEP_SECONDS,
    one at a time, with the workers' environment; and to the end when a worker died."""
    from deployments import serve

    started = []

    class Done:
        def poll(self):
            return 0

        def wait(self, timeout=None):
            return 0

    def start(cmd, env, log):
        started.append((cmd, env))
        return Done()

    monkeypatch.setattr(serve, "start_process", start)
    services = serve.Services(Workspace.at(tmp_path / "ws"), serve.ServeConfig(tracking_uri="sqlite:////x/mlflow.db"))
    services.sweep_dead_runs()
    services.sweep_dead_runs()  # within SWEEP_SECONDS: nothing new
    assert len(started) == 1
    cmd, env = started[0]
    assert cmd[1:] == ["-m", "flows.liveness", "--home", str(tmp_path / "ws")]
    assert env["PREFECT_API_URL"].startswith("http://127.0.0.1:") and env["MLFLOW_DISABLE_TELEMETRY"] == "true"
    services.sweep_dead_runs(wait=True)  # a worker died: sweep now
    assert len(started) == 2
    monkeypatch.setattr(serve.time, "monotonic", lambda: 10 ** 9)
    services.sweep_dead_runs()
    assert len(started) == 3 and 0 < serve.SWEEP_SECONDS <= 300


# ------------------------------------------------------------------ 9. MLflow's telemetry is off
def test_mlflow_telemetry_is_off_unless_the_user_turns_it_on(monkeypatch, tmp_path):
    from deployments.serve import ServeConfig, serve_env
    from rsir.cli import main

    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY", raising=False)
    main(["data", "list", "--help"])
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    from mlflow.environment_variables import MLFLOW_DISABLE_TELEMETRY

    assert MLFLOW_DISABLE_TELEMETRY.get() is True  # what MLflow's telemetry client reads
    assert serve_env(Workspace.at(tmp_path), ServeConfig())["MLFLOW_DISABLE_TELEMETRY"] == "true"
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "false")  # the user's choice wins
    main(["data", "list", "--help"])
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "false"
    assert serve_env(Workspace.at(tmp_path), ServeConfig())["MLFLOW_DISABLE_TELEMETRY"] == "false"
