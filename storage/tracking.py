"""MLflow tracking adapter: explicit run ids (no fluent active-run state), so tasks running
in Prefect worker threads can log to the run they are given.

Lineage: every iteration's child run logs D_k as a dataset input (context "training"), its
checkpoint θ_k as an artifact, and D_{k+1} as a dataset with context "output" (MLflow 3.17 has
dataset inputs only; `log_outputs` is for models), each with the manifest digest and URI.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from core.errors import RsirError
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

        dataset = Dataset(name=f"{name}@v{version}", digest=digest[:36], source_type="rsir-store",
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
