"""MLflow tracking adapter: explicit run ids (no fluent active-run state), so tasks running
in Prefect worker threads can log to the run they are given.

Lineage: every iteration's child run logs D_k as a dataset input (context "training"), θ_k as
an MLflow 3 logged model (its output; the model's metrics name D_k, so the model page links its
training data) and D_{k+1} as a dataset with context "output" (MLflow 3.17 has dataset inputs
only; `log_outputs` is for models), each with the manifest digest and URI.

Champion: `register_champion` registers a logged model and moves the alias by `champion_rule`:
only to a version that beats the current champion on the validation metric on the same D_0.

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

from pydantic import BaseModel, ConfigDict, Field

from core.errors import RsirError
from core.hashing import short_digest
from core.interrupts import stop_status
from storage.files import file_lock, location, read_bytes


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
                      "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
                      # MLflow's own "View run … at" lines link the GenAI view (no workflowType in
                      # the URL); rsir prints and publishes `Tracker.run_url`, the model-training view.
                      "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
                      # MLflow's telemetry thread read the environment while runs changed it (1 of 12
                      # concurrent deployment runs failed with KeyError '_MLFLOW_TELEMETRY_SESSION_ID');
                      # rsir sends no usage data: off unless the user sets it (MLflow 3.17's variable).
                      "MLFLOW_DISABLE_TELEMETRY": "true"}


def mlflow_environment_defaults(environ: dict[str, str]) -> None:
    """Fill `environ` (os.environ, or a child process's environment) with MLFLOW_ENVIRONMENT
    where the caller has not set a value."""
    for key, value in MLFLOW_ENVIRONMENT.items():
        environ.setdefault(key, value)


def mlflow_logger() -> logging.Logger:
    """MLflow's logger as MLflow sets it up when first imported (its own console handler), for a
    caller that adjusts its handlers: importing MLflow later would set them up anew."""
    import mlflow  # noqa: F401  (the import configures the logger)

    return logging.getLogger("mlflow")


# Without this tag MLflow's UI guesses the experiment's kind and opens it in the GenAI view
# (traces, evaluation runs); rsir's experiments are model training.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


# What a person reads in the UI: MLflow 3.17 opens its GenAI view (traces, evaluation runs) unless
# the URL asks for the model-training one (checked in headless Chromium, tests/test_mlflow_ui.py).
TRAINING_VIEW = "?workflowType=machine_learning"

# Tags of a parent run: what a re-submission and a resume look it up by.
RUN_KEY_TAG = "rsir.run_key"
RESUMES_TAG = "rsir.resumes"
# Tags of a registered version that the champion rule reads.
BASE_DIGEST_TAG = "rsir.base_digest"
METRIC_TAG = "rsir.metric"
MODEL_VERSIONS_TAG = "mlflow.modelVersions"  # MLflow's: a logged model's registered versions

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


# Archives (tasks/archive.py) keep a suite's finished runs across workspaces: a restored run
# names the run it was archived from, so archiving it again or restoring twice adds nothing.
ARCHIVED_ID_TAG = "rsir.archived_run_id"
# MLflow's own tags worth keeping: the run's place in the tree and its name. Others (source,
# user, logged-model history) describe the original process, not the result.
KEPT_MLFLOW_TAGS = ("mlflow.parentRunId", "mlflow.runName")


class ArchivedRun(BaseModel):
    """One finished MLflow run as archived by `Tracker.export_run` (JSON on disk)."""

    model_config = ConfigDict(extra="forbid")

    run_id: str
    name: str
    status: str
    start_time: int
    end_time: int | None
    tags: dict[str, str]
    params: dict[str, str]
    metrics: list[tuple[str, float, int, int]] = Field(description="(key, value, timestamp ms, step)")
    documents: dict[str, dict[str, Any]] = Field(default_factory=dict, description="small JSON artifacts "
                                                 "by file name (an iteration's row: what resumes a run)")

    @property
    def archived_id(self) -> str:
        """The id of the run first archived (a restored run archived again keeps it)."""
        return self.tags.get(ARCHIVED_ID_TAG, self.run_id)


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

        lock: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        if tracking_uri.startswith("sqlite:///"):
            db = Path(tracking_uri.removeprefix("sqlite:///"))
            db.parent.mkdir(parents=True, exist_ok=True)
            # MLflow creates a new database's tables on first use, unguarded: runs starting
            # together on a new workspace raced ("table latest_metrics already exists").
            lock = file_lock(db.with_name(db.name + ".lock"))
        try:
            with lock:
                client = MlflowClient(tracking_uri)
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

    @staticmethod
    def experiment_names(tracking_uri: str) -> list[str]:
        """The names of the tracking store's active experiments."""
        from mlflow import MlflowClient

        return [e.name for e in MlflowClient(tracking_uri).search_experiments()]

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

    # ------------------------------------------------------------ archives
    def export_run(self, run: Any) -> "ArchivedRun":
        """A finished run as a plain record: name, status, times (ms since the epoch), tags,
        params and every metric's full history (key, value, timestamp in ms, step)."""
        history = [(m.key, m.value, m.timestamp, m.step) for key in sorted(run.data.metrics)
                   for m in self._client.get_metric_history(run.info.run_id, key)]
        tags = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.") or k in KEPT_MLFLOW_TAGS}
        return ArchivedRun(run_id=run.info.run_id, name=run.info.run_name or "", status=run.info.status,
                           start_time=run.info.start_time, end_time=run.info.end_time, tags=tags,
                           params=dict(run.data.params), metrics=history)

    def import_run(self, record: "ArchivedRun", parent: str | None) -> str:
        """Recreate an archived run in this experiment (new run id, the archived one kept in the
        tag ARCHIVED_ID_TAG) with its times, tags, params and metric histories; `parent` is the
        new id of its parent run. Returns the new run id."""
        from mlflow.entities import Metric, Param, RunTag

        tags = {k: v for k, v in record.tags.items() if k != "mlflow.parentRunId"}
        tags[ARCHIVED_ID_TAG] = record.run_id
        if parent:
            tags["mlflow.parentRunId"] = parent
        run_id = self._client.create_run(self.experiment_id, start_time=record.start_time, run_name=record.name,
                                         tags=tags).info.run_id
        params = [Param(k, v) for k, v in record.params.items()]
        metrics = [Metric(k, v, t, s) for k, v, t, s in record.metrics]
        for lo in range(0, max(len(params), len(metrics)), 100):
            self._client.log_batch(run_id, metrics=metrics[lo:lo + 100], params=params[lo:lo + 100],
                                   tags=[RunTag(ARCHIVED_ID_TAG, record.run_id)] if lo == 0 else [])
        self._client.set_terminated(run_id, status=record.status, end_time=record.end_time)
        return run_id

    # ------------------------------------------------------------ runs
    def start_run(self, name: str, tags: dict[str, str] | None = None, parent: str | None = None) -> str:
        tags = dict(tags or {})
        if parent:
            tags["mlflow.parentRunId"] = parent
        return self._client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self._client.set_terminated(run_id, status=status)

    def status(self, run_id: str) -> str:
        """The run's status: RUNNING, FINISHED, FAILED, KILLED or SCHEDULED."""
        return self._client.get_run(run_id).info.status

    def runs_with_key(self, run_key: str) -> list[Any]:
        """The parent runs tagged with `run_key` (RUN_KEY_TAG), newest first."""
        return sorted(self.search_runs(f"tags.`{RUN_KEY_TAG}` = '{run_key}'"), key=lambda r: -r.info.start_time)

    def reopen(self, run_id: str, tags: dict[str, str]) -> int:
        """Set a stopped (KILLED or FAILED) run RUNNING again, with fresh `tags` (its new owner,
        Prefect flow run...), and count the resume in RESUMES_TAG; returns that count. MLflow keeps
        the run's first start time, so its duration spans every attempt."""
        resumes = int(self._client.get_run(run_id).data.tags.get(RESUMES_TAG, "0")) + 1
        self._client.update_run(run_id, status="RUNNING")
        self.set_tags(run_id, {**tags, RESUMES_TAG: str(resumes)})
        return resumes

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self._client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def child_run(self, parent: str, name: str, tags: dict[str, str]) -> tuple[str, str]:
        """The child run `name` of `parent`: an existing one (a resumed parent's, reopened unless it
        finished) or a new one. Returns (run id, status before: "" when new, "FINISHED" when its
        work is logged and done)."""
        found = self.find_child(parent, name)
        if found is None:
            return self.start_run(name, tags, parent=parent), ""
        run_id, status = found
        if status != "FINISHED":
            self._client.update_run(run_id, status="RUNNING")
        return run_id, status

    def find_child(self, parent: str, name: str) -> tuple[str, str] | None:
        """The newest child run `name` of `parent` as (run id, status), or None."""
        found = self.search_runs(f"tags.`mlflow.parentRunId` = '{parent}' and attributes.run_name = '{name}'")
        if not found:
            return None
        run = max(found, key=lambda r: r.info.start_time)
        return run.info.run_id, run.info.status

    def output_models(self, run_id: str) -> list[str]:
        """Ids of the logged models the run lists as outputs."""
        outputs = self._client.get_run(run_id).outputs
        return [m.model_id for m in (outputs.model_outputs if outputs else [])]

    def output_model(self, run_id: str, name: str) -> str | None:
        """The id of the run's output model named `name`, or None (a run restored from an archive
        lists none: an archive keeps no models)."""
        for model_id in self.output_models(run_id):
            if self._client.get_logged_model(model_id).name == name:
                return model_id
        return None

    def load_dict(self, run_id: str, path: str) -> dict[str, Any]:
        """A JSON artifact of the run (as `log_dict` wrote it)."""
        with tempfile.TemporaryDirectory() as tmp:
            return json.loads(self.download_artifact(run_id, path, tmp).read_text())

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

    def kill(self, run_id: str, status: str = "KILLED") -> None:
        """End a run that stopped (a dead process: KILLED; a failed block: FAILED) and its RUNNING
        child runs (the iteration it cut short) with `status`."""
        for child in self.search_runs(f"tags.`mlflow.parentRunId` = '{run_id}' and attributes.status = 'RUNNING'"):
            self.end_run(child.info.run_id, status)
        self.end_run(run_id, status)

    @contextlib.contextmanager
    def heartbeat(self, run_id: str, every: float = HEARTBEAT_SECONDS) -> Iterator[None]:
        """While the block runs, refresh the run's heartbeat tag every `every` seconds (a daemon
        thread: a step may take longer than `STALE_AFTER_SECONDS`, the process is alive all the
        same). A block that raises ends the run and the iteration it cut short FAILED, or KILLED
        when it was interrupted (Ctrl-C, Prefect's cancellation, or any exception after a signal:
        core/interrupts.py), so only a killed process leaves a run RUNNING. A failed beat is
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
            status = stop_status(exc)
            with contextlib.suppress(Exception):  # the block's own error is the one to report
                if self._client.get_run(run_id).info.status == "RUNNING":
                    self.kill(run_id, status)  # the iteration it cut short too
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

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0, model_id: str | None = None,
                    dataset: tuple[str, str] | None = None) -> None:
        """Numeric values of `metrics` (nested dicts flattened with '.') at `step`; with `model_id`
        also the logged model's metrics, measured on `dataset` (MLflow name, digest), which the
        model page lists as its data (`digest` in full: shown as `log_dataset` shows it)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        name, digest = (dataset[0], short_digest(dataset[1])) if dataset else (None, None)
        batch = [Metric(_clean(k), float(v), now, step, model_id=model_id, dataset_name=name, dataset_digest=digest)
                 for k, v in _flatten(metrics).items() if isinstance(v, (int, float)) and v is not None]
        for lo in range(0, len(batch), 500):
            self._client.log_batch(run_id, metrics=batch[lo:lo + 500])

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None,
                     name: str | None = None) -> None:
        """Log a local file, or a copy of a remote one (MLflow uploads local files only), as
        `name` (default: its own file name; a local file renamed travels as a link, not a copy).
        An OSError that names no file (a full disk under the artifact store) gets the destination."""
        source = location(str(path))
        name = name or str(source).rsplit("/", 1)[-1]
        try:
            if isinstance(source, Path) and name == source.name:
                self._client.log_artifact(run_id, str(source), artifact_path)
                return
            with tempfile.TemporaryDirectory() as tmp:
                local = Path(tmp) / name
                if isinstance(source, Path):
                    local.symlink_to(source.resolve())  # MLflow's uploads read through the link
                else:
                    local.write_bytes(read_bytes(source))
                self._client.log_artifact(run_id, str(local), artifact_path)
        except OSError as exc:
            if exc.filename is not None or exc.errno is None:
                raise
            target = self.artifact_uri(run_id, f"{artifact_path}/{name}" if artifact_path else name)
            raise type(exc)(exc.errno, exc.strerror or str(exc), target) from exc

    def log_dict(self, run_id: str, obj: dict[str, Any], file_name: str) -> None:
        self._client.log_dict(run_id, obj, file_name)

    def log_dataset(self, run_id: str, name: str, version: int, digest: str, uri: str, context: str,
                    profile: dict[str, Any]) -> tuple[str, str]:
        """Log dataset version `version` as an input of the run; returns its MLflow (name, digest)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(name=dataset_name(name, version), digest=short_digest(digest), source_type="rsir-store",
                          source=json.dumps({"uri": uri, "version": version, "digest": digest}),
                          schema="", profile=json.dumps(profile, default=float))
        self._client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])])
        return dataset.name, dataset.digest

    def log_model(self, run_id: str, name: str, path: str | Path, step: int, model_type: str,
                  params: dict[str, Any], tags: dict[str, str], file_name: str | None = None) -> str:
        """Log the file at `path` (a checkpoint) as an MLflow 3 logged model named `name`, made by
        run `run_id` at `step` (its output), READY once its file is stored (as `file_name`,
        default its own name); returns the model id. A run that already lists an output model
        of that name (a resumed iteration) keeps it."""
        from mlflow.entities import LoggedModelOutput

        logged = self.output_model(run_id, name)
        if logged is not None:
            return logged
        model = self._client.create_logged_model(
            self.experiment_id, name=name, source_run_id=run_id, model_type=model_type,
            params={k: str(v)[:6000] for k, v in _flatten(params).items()}, tags=tags)
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "model"
            local.mkdir()
            source = location(str(path))
            target = local / (file_name or str(source).rsplit("/", 1)[-1])
            target.write_bytes(source.read_bytes() if isinstance(source, Path) else read_bytes(source))
            self._client.log_model_artifacts(model.model_id, str(local))
        self._client.finalize_logged_model(model.model_id, "READY")
        self._client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step)])
        return model.model_id

    def run_url(self, run_id: str) -> str | None:
        """The run's page in the tracking server's UI, in its model-training view (MLflow 3.17
        opens the GenAI view unless the URL asks otherwise); None without a server."""
        return self._url(self.run_path(run_id))

    def run_path(self, run_id: str) -> str:
        """The run page's address relative to any server over this store (`rsir serve --only
        mlflow` for a SQLite or PostgreSQL store): what to append to the server's URL."""
        return f"#/experiments/{self.experiment_id}/runs/{run_id}{TRAINING_VIEW}"

    def model_url(self, model_id: str) -> str | None:
        """The logged model's page (its metrics, datasets, source run and registered versions)."""
        return self._url(f"#/experiments/{self.experiment_id}/models/{model_id}{TRAINING_VIEW}")

    def _url(self, path: str) -> str | None:
        if not self.uri.startswith(("http://", "https://")):
            return None
        return f"{redact_uri(self.uri).rstrip('/')}/{path}"

    def artifact_uri(self, run_id: str, artifact_path: str) -> str:
        return f"{self._client.get_run(run_id).info.artifact_uri}/{artifact_path}"

    def register_champion(self, model_name: str, run_id: str, model_id: str, tags: dict[str, Any],
                          metric: str, base_digest: str, alias: str = "champion") -> "Registration":
        """Register logged model `model_id` (made by `run_id`) as a new version of `model_name`,
        tagged with `tags` (what a person reads in the registry; they must hold `valid_<metric>`),
        the validation metric and the digest of D_0; then point `alias` where `champion_rule` says.

        Raises MlflowException when the registry refuses."""
        from mlflow.exceptions import MlflowException

        try:
            self._client.create_registered_model(model_name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        tags = {**{k: str(v) for k, v in tags.items()}, METRIC_TAG: metric, BASE_DIGEST_TAG: base_digest}
        # The source `models:/<id>` is what links the version to its logged model (MLflow's SQL
        # registry keeps no model id of its own).
        with _global_tracking_uri(self.uri):
            created = self._client.create_model_version(model_name, source=f"models:/{model_id}", run_id=run_id,
                                                        tags=tags, model_id=model_id)
        version = int(created.version)
        # The model's page lists its registered versions from this tag (as mlflow.register_model sets it).
        model = self._client.get_logged_model(model_id)
        listed = [*json.loads(model.tags.get(MODEL_VERSIONS_TAG, "[]")),
                  {"name": model_name, "version": created.version}]
        self._client.set_logged_model_tags(model_id, {MODEL_VERSIONS_TAG: json.dumps(listed)})
        # Runs may register at once: decide again until no version appeared meanwhile, so the last
        # to decide saw every version (each decision alone is a pure function of the versions).
        seen: set[int] = set()
        while True:
            versions = self._client.search_model_versions(f"name = '{model_name}'")
            if {int(v.version) for v in versions} == seen:
                break
            seen = {int(v.version) for v in versions}
            current = self.alias_version(model_name, alias)
            holder = champion_rule([VersionScore.of(v, metric) for v in versions], current, base_digest)
            if holder is not None and holder != current:
                self._set_alias(model_name, alias, holder)
        return Registration(version, self.alias_version(model_name, alias))

    def model_versions(self, model_name: str) -> list[Any]:
        """The registered versions of `model_name` (none when it is not registered)."""
        return list(self._client.search_model_versions(f"name = '{model_name}'"))

    def alias_version(self, model_name: str, alias: str) -> int | None:
        from mlflow.exceptions import MlflowException

        try:
            return int(self._client.get_model_version_by_alias(model_name, alias).version)
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
            return None

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



# ---------------------------------------------------------------- the champion
@dataclass(frozen=True)
class Registration:
    """What `register_champion` did: the version it registered, the version holding the alias."""

    version: int
    champion: int | None


@dataclass(frozen=True)
class VersionScore:
    """A registered version as the champion rule sees it: its number, the digest of the D_0 its
    run started from, and its validation score on the metric being compared (None: not recorded)."""

    version: int
    base_digest: str | None
    score: float | None

    @classmethod
    def of(cls, version: Any, metric: str) -> "VersionScore":
        try:
            score = float(version.tags[f"valid_{_clean(metric)}"])
        except (KeyError, ValueError):
            score = None
        return cls(int(version.version), version.tags.get(BASE_DIGEST_TAG), score)


def champion_rule(versions: list[VersionScore], current: int | None, base_digest: str) -> int | None:
    """Which version the champion alias names after a registration on D_0 `base_digest`.

    Comparable versions are those trained from the same D_0 (same digest) with a score on the
    metric. The alias stays where it is unless a comparable version scores strictly higher than
    the current champion (ties keep it); it moves to the comparable best (the earliest of equals)
    when the current champion is not comparable (another D_0: the base data was replaced; or a
    version from before this rule) or there is none. None: nothing comparable."""
    comparable = [v for v in versions if v.base_digest == base_digest and v.score is not None]
    if not comparable:
        return current
    best = max(comparable, key=lambda v: (v.score, -v.version))
    held = next((v for v in comparable if v.version == current), None)
    if held is not None and held.score >= best.score:
        return current
    return best.version


_GLOBAL_URI_LOCK = threading.Lock()


@contextlib.contextmanager
def _global_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow 3.17's SQL registry looks a `models:/<id>` source up through the process's global
    tracking URI, not the client's (a TODO in its create_model_version): make it this store's for
    the call, then restore the global value and $MLFLOW_TRACKING_URI exactly. A server resolves
    it on its own side."""
    if uri.startswith(("http://", "https://")):
        yield
        return
    from mlflow.tracking._tracking_service import utils

    with _GLOBAL_URI_LOCK:
        before, env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
        utils.set_tracking_uri(uri)
        try:
            yield
        finally:
            utils._tracking_uri = before
            if env is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = env


def dataset_name(name: str, version: int) -> str:
    """A dataset version's name in MLflow (run inputs, metrics, model pages)."""
    return f"{name}@v{version}"


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
    client's local folder would mean nothing to the server or to other machines. Without a root,
    a SQLite store keeps its artifacts beside its database (`mlartifacts/`, as a workspace does),
    never in MLflow's default `./mlruns` of whatever directory the caller ran in."""
    if tracking_uri.startswith(("http://", "https://")):
        return None
    if root is None:
        if not tracking_uri.startswith("sqlite:///"):
            return None
        root = Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts"
    return root if isinstance(root, str) else root.resolve().as_uri()


def redact_uri(uri: str) -> str:
    """The URI with its password (``user:password@``) replaced by ``***``: safe to print and log."""
    return _PASSWORD_RE.sub(r"\1:***@", uri)


_PASSWORD_RE = re.compile(r"(?<=://)([^/@:]*):[^/@]*@")
