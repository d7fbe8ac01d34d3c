"""MLflow tracking adapter: explicit run ids (no fluent active-run state), so tasks running
in Prefect worker threads can log to the run they are given.

Lineage: every iteration's child run logs D_k as a dataset input (context "training"), its
checkpoint θ_k as an artifact, and D_{k+1} as a dataset with context "output" (MLflow 3.17 has
dataset inputs only; `log_outputs` is for models), each with the manifest digest and URI.

Ownership: a run started with `owner_tags()` names the process that runs it (host, process
table, pid, start time) and carries a heartbeat that `Tracker.heartbeat` refreshes; `dead_runs`
uses them to tell a run whose process was killed from one that still runs elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from core.errors import RsirError
from core.hashing import short_digest
from storage.files import location, read_bytes


def default_tracking_uri(db: Path) -> str:
    """MLflow 3.17 refuses file stores: SQLite at an absolute path."""
    return f"sqlite:///{db.resolve()}"


def resolve_tracking_uri(given: str | None, db: Path) -> str:
    """The tracking URI a command or flow logs to: the one it was given, else MLflow's own
    $MLFLOW_TRACKING_URI (what `rsir serve` sets for its workers), else SQLite in the workspace."""
    return given or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(db)


# Fail fast instead of MLflow's minutes of HTTP retries against an unreachable server (7 retries,
# backoff factor 2), but ride out a transient error: with no retry at all, one dropped connection
# or one slow answer under load failed a run (seen once in CI with the MLflow UI open). Here a dead
# server fails in about 7 s (sleeps 0, 2, 4 s plus jitter; MLflow's factor is an integer). MLflow
# reads these from the environment at request time: the front doors (CLI, `rsir serve`) set them.
MLFLOW_ENVIRONMENT = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                      "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
                      "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


def mlflow_environment_defaults(environ: dict[str, str]) -> None:
    """Fill `environ` (os.environ, or a child process's environment) with MLFLOW_ENVIRONMENT
    where the caller has not set a value."""
    for key, value in MLFLOW_ENVIRONMENT.items():
        environ.setdefault(key, value)


# Without this tag MLflow's UI guesses the experiment's kind and opens it in the GenAI view
# (traces, evaluation runs); rsir's experiments are model training.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


# Run ownership (RunOwner, dead_reason below).
OWNER_TAGS = ("rsir.host", "rsir.machine", "rsir.pid", "rsir.pid_started")
HEARTBEAT_TAG = "rsir.heartbeat"
# A running flow refreshes its parent run's heartbeat every HEARTBEAT_SECONDS; a run on another
# machine is dead once its heartbeat is STALE_AFTER_SECONDS old: twenty missed beats, so a slow
# or briefly unreachable tracking server, or clocks minutes apart, never close a live run. (A run
# of the lineage started sooner leaves such a run RUNNING; a later one closes it.)
HEARTBEAT_SECONDS = 30.0
STALE_AFTER_SECONDS = 600.0
# psutil's start times of one process agree to the clock tick (10 ms); a pid reused by another
# process cannot also have started within the same second.
_START_TOLERANCE_SECONDS = 1.0

_log = logging.getLogger(__name__)


class Tracker:
    """One MLflow experiment behind explicit run ids; the only module that talks to MLflow's
    client. `Tracker.open` connects (and creates the experiment); the constructor only stores."""

    def __init__(self, client: Any, uri: str, experiment_name: str, experiment_id: str):
        self._client = client
        self.uri = uri
        self.experiment_name = experiment_name
        self.experiment_id = experiment_id

    @classmethod
    def open(cls, tracking_uri: str, experiment: str, artifact_root: Path | str | None = None) -> "Tracker":
        from mlflow import MlflowClient

        if tracking_uri.startswith("sqlite:///"):
            Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        client = MlflowClient(tracking_uri)
        try:
            found = client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else _create_experiment(
                client, experiment, _artifact_location(tracking_uri, artifact_root))
            if found and not EXPERIMENT_KIND.items() <= found.tags.items():  # created by an older rsir
                for key, value in EXPERIMENT_KIND.items():
                    client.set_experiment_tag(experiment_id, key, value)
        except Exception as exc:  # MLflow raises many types for a bad URI or a dead server
            reason = redact_uri(str(exc).splitlines()[0])[:200]  # MLflow's message repeats the URI
            raise RsirError(f"MLflow tracking URI {redact_uri(tracking_uri)!r} is unreachable or invalid: "
                            f"{reason}") from None
        return cls(client, tracking_uri, experiment, experiment_id)

    # ------------------------------------------------------------ queries
    def search_runs(self, filter_string: str = "") -> list[Any]:
        """Every run of the experiment matching an MLflow filter string (all pages)."""
        runs, token = [], None
        while True:
            page = self._client.search_runs([self.experiment_id], filter_string, max_results=1000, page_token=token)
            runs += list(page)
            token = page.token
            if not token:
                return runs

    def tag_experiment(self, key: str, value: str) -> None:
        self._client.set_experiment_tag(self.experiment_id, key, value)

    def artifact_files(self, run_id: str, folder: str) -> list[str]:
        return [f.path for f in self._client.list_artifacts(run_id, folder)]

    def download_artifact(self, run_id: str, path: str, folder: str) -> Path:
        return Path(self._client.download_artifacts(run_id, path, folder))

    # ------------------------------------------------------------ runs
    def start_run(self, name: str, tags: dict[str, str] | None = None, parent: str | None = None) -> str:
        tags = dict(tags or {})
        if parent:
            tags["mlflow.parentRunId"] = parent
        return self._client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self._client.set_terminated(run_id, status=status)

    # ------------------------------------------------------------ ownership
    def dead_runs(self, filter_string: str) -> list["DeadRun"]:
        """The RUNNING runs matching `filter_string` whose process is gone (`dead_reason`): what
        a killed process left open. A run that may still be running is never among them."""
        here, now = RunOwner.current(), time.time()
        dead = []
        for run in self.search_runs(f"attributes.status = 'RUNNING' and {filter_string}"):
            tags = dict(run.data.tags)
            reason = dead_reason(tags, run.info.start_time / 1000, here, now)
            if reason is not None:
                dead.append(DeadRun(run.info.run_id, tags, reason))
        return dead

    def kill(self, run_id: str) -> None:
        """End a dead run and its RUNNING child runs (an iteration cut short) as KILLED."""
        for child in self.search_runs(f"tags.`mlflow.parentRunId` = '{run_id}' and attributes.status = 'RUNNING'"):
            self.end_run(child.info.run_id, "KILLED")
        self.end_run(run_id, "KILLED")

    @contextlib.contextmanager
    def heartbeat(self, run_id: str, every: float = HEARTBEAT_SECONDS) -> Iterator[None]:
        """While the block runs, refresh the run's heartbeat tag every `every` seconds (a daemon
        thread: a step may take longer than `STALE_AFTER_SECONDS`, the process is alive all the
        same). A block that raises ends the run FAILED, or KILLED when it was interrupted (Ctrl-C,
        Prefect's cancellation), so only a killed process leaves a run RUNNING. A failed beat is
        logged and retried at the next one: tracking trouble must not fail the run."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(every):
                try:
                    self._client.set_tag(run_id, HEARTBEAT_TAG, _utc_now())
                except Exception as exc:  # MLflow raises many types; the next beat may get through
                    reason = (str(exc).splitlines() or [""])[0][:200]
                    _log.warning("heartbeat of MLflow run %s failed: %s", run_id, reason)

        thread = threading.Thread(target=beat, name=f"rsir-heartbeat-{run_id[:8]}", daemon=True)
        thread.start()
        try:
            yield
        except BaseException as exc:
            stop.set()
            status = "FAILED" if isinstance(exc, Exception) else "KILLED"
            with contextlib.suppress(Exception):  # the block's own error is the one to report
                if self._client.get_run(run_id).info.status == "RUNNING":
                    self.end_run(run_id, status)
            raise
        finally:
            stop.set()
            thread.join(timeout=1.0)  # a beat stuck on a slow server finishes on its own

    # ------------------------------------------------------------ logging
    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self._client.get_run(run_id).data.params
        fresh = [Param(k, str(v)[:6000]) for k, v in _flatten(params).items() if k not in existing]
        for lo in range(0, len(fresh), 100):
            self._client.log_batch(run_id, params=fresh[lo:lo + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        batch = [Metric(_clean(k), float(v), now, step) for k, v in _flatten(metrics).items()
                 if isinstance(v, (int, float)) and v is not None]
        for lo in range(0, len(batch), 500):
            self._client.log_batch(run_id, metrics=batch[lo:lo + 500])

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        """Log a local file, or a copy of a remote one (MLflow uploads local files only)."""
        source = location(str(path))
        if isinstance(source, Path):
            self._client.log_artifact(run_id, str(source), artifact_path)
            return
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / source.rsplit("/", 1)[-1]
            local.write_bytes(read_bytes(source))
            self._client.log_artifact(run_id, str(local), artifact_path)

    def log_dict(self, run_id: str, obj: dict[str, Any], file_name: str) -> None:
        self._client.log_dict(run_id, obj, file_name)

    def log_dataset(self, run_id: str, name: str, version: int, digest: str, uri: str, context: str,
                    profile: dict[str, Any]) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(name=f"{name}@v{version}", digest=short_digest(digest), source_type="rsir-store",
                          source=json.dumps({"uri": uri, "version": version, "digest": digest}),
                          schema="", profile=json.dumps(profile, default=float))
        self._client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])])

    def run_url(self, run_id: str) -> str | None:
        """The run's page in the tracking server's UI, in its model-training view (MLflow 3.17
        opens the GenAI view unless the URL asks otherwise); None without a server."""
        if not self.uri.startswith(("http://", "https://")):
            return None
        return (f"{redact_uri(self.uri).rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run_id}"
                f"?workflowType=machine_learning")

    def artifact_uri(self, run_id: str, artifact_path: str) -> str:
        return f"{self._client.get_run(run_id).info.artifact_uri}/{artifact_path}"

    def register_champion(self, model_name: str, run_id: str, artifact_path: str, tags: dict[str, Any],
                          alias: str = "champion") -> int:
        """Register the checkpoint artifact of `run_id` as a new version of `model_name` (with
        `tags`: what a person reads in the registry) and point `alias` at it."""
        from mlflow.exceptions import MlflowException

        try:
            self._client.create_registered_model(model_name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = self._client.create_model_version(model_name, source=self.artifact_uri(run_id, artifact_path),
                                                    run_id=run_id, tags={k: str(v) for k, v in tags.items()})
        # The alias names the newest registration, also when runs register at once: point it at the
        # newest version seen, and again if a newer one appeared meanwhile (its run may have set the
        # alias before this one did).
        newest = 0
        while (latest := self._newest_version(model_name)) != newest:
            newest = latest
            self._set_alias(model_name, alias, newest)
        return int(version.version)

    def _set_alias(self, model_name: str, alias: str, version: int, attempts: int = 5) -> None:
        """MLflow's SQL store inserts an alias after reading that there is none, so two runs setting
        it at once can both insert and one gets a unique-key error (seen on PostgreSQL in CI). The
        alias then exists: setting it again updates it."""
        from mlflow.exceptions import MlflowException

        for attempt in range(attempts):
            try:
                self._client.set_registered_model_alias(model_name, alias, str(version))
                return
            except MlflowException as exc:
                message = str(exc).lower()
                if attempt + 1 == attempts or "unique" not in message or "alias" not in message:
                    raise

    def _newest_version(self, model_name: str) -> int:
        return max(int(v.version) for v in self._client.search_model_versions(f"name = '{model_name}'"))


# ---------------------------------------------------------------- run ownership
@dataclass(frozen=True)
class RunOwner:
    """The process that runs an MLflow run, as the run's tags record it.

    `machine` names the process table a pid belongs to: on Linux the kernel's boot id and the pid
    namespace (containers on one kernel share the boot id, not the namespace), elsewhere the boot
    time. `started` (the process's start time, epoch seconds) tells the process from a later
    one that reuses its pid."""

    host: str
    machine: str
    pid: int
    started: float

    @classmethod
    def current(cls) -> "RunOwner":
        import psutil

        return cls(socket.gethostname(), _machine(), os.getpid(), psutil.Process().create_time())

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> "RunOwner | None":
        """The owner a run's tags name; None for a run without them (an older rsir) or with
        unreadable ones."""
        try:
            return cls(tags["rsir.host"], tags["rsir.machine"], int(tags["rsir.pid"]), float(tags["rsir.pid_started"]))
        except (KeyError, ValueError):
            return None

    def tags(self) -> dict[str, str]:
        return dict(zip(OWNER_TAGS, (self.host, self.machine, str(self.pid), f"{self.started:.3f}")))

    def shares_process_table(self, other: "RunOwner") -> bool:
        return (self.host, self.machine) == (other.host, other.machine)

    def running(self) -> bool:
        """Whether this process still exists (not a zombie). Meaningful only on its own machine
        (`shares_process_table`); a process this user may not inspect counts as running."""
        import psutil

        try:
            proc = psutil.Process(self.pid)
            return (abs(proc.create_time() - self.started) < _START_TOLERANCE_SECONDS
                    and proc.status() != psutil.STATUS_ZOMBIE)
        except psutil.NoSuchProcess:  # ZombieProcess included
            return False
        except psutil.AccessDenied:
            return True

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host}"


def owner_tags() -> dict[str, str]:
    """Tags that make a new run this process's: its owner and a first heartbeat."""
    return {**RunOwner.current().tags(), HEARTBEAT_TAG: _utc_now()}


@dataclass(frozen=True)
class DeadRun:
    """A RUNNING run whose process is gone: its id, tags and why it is known to be dead."""

    run_id: str
    tags: dict[str, str]
    reason: str


def dead_reason(tags: dict[str, str], start_time: float, here: RunOwner, now: float) -> str | None:
    """Why a RUNNING run with these tags (started at `start_time`, epoch seconds) is dead, or
    None while it may still run.

    On this machine the answer is its process: dead iff no process with its pid and start time
    exists (a killed process cannot leave that stale). Elsewhere, or for a run without owner tags,
    it is the heartbeat (the run's start for an older rsir that wrote none): dead once
    `STALE_AFTER_SECONDS` old. MLflow's RUNNING and Prefect's Running are what a killed process
    leaves behind, so they decide nothing."""
    owner = RunOwner.from_tags(tags)
    if owner is not None and owner.shares_process_table(here):
        return None if owner.running() else f"process {owner} is gone"
    beat = _parse_utc(tags.get(HEARTBEAT_TAG, "")) or start_time
    age = now - beat
    if age <= STALE_AFTER_SECONDS:
        return None
    return f"{owner or 'its process'} sent no heartbeat for {age / 60:.0f} min"


def _machine() -> str:
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/pidns-{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:  # not Linux
        import psutil

        return f"boot-{psutil.boot_time():.0f}"


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _parse_utc(text: str) -> float | None:
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def _create_experiment(client: Any, name: str, artifact_location: str | None) -> str:
    """Create the experiment; if another process created it first (two flows starting at once
    on one tracking server), use theirs."""
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(name, artifact_location=artifact_location, tags=EXPERIMENT_KIND)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def _clean(key: str) -> str:
    # MLflow keys allow alphanumerics, _ - . / and spaces; '@' is common in our metric names.
    return key.replace("@", "_at_")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def _artifact_location(tracking_uri: str, root: Path | str | None) -> str | None:
    """MLflow's artifact location for a new experiment: a file URI, or the home's URL as is
    (s3://… is uploaded with boto3, which reads the standard AWS environment). Behind a tracking
    server the server decides (`mlflow server --artifacts-destination`, proxied uploads): a
    client's local folder would mean nothing to the server or to other machines."""
    if root is None or tracking_uri.startswith(("http://", "https://")):
        return None
    return root if isinstance(root, str) else root.resolve().as_uri()


def redact_uri(uri: str) -> str:
    """The URI with its password (``user:password@``) replaced by ``***``: safe to print and log."""
    return _PASSWORD_RE.sub(r"\1:***@", uri)


_PASSWORD_RE = re.compile(r"(?<=://)([^/@:]*):[^/@]*@")
