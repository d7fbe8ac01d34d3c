"""A suite's finished runs, kept in a folder that outlives the workspace (a git checkout, say).

An experiment suite runs for days on a small machine, in sittings whose workspaces do not all
survive; its MLflow database is the system of record while it runs. `archive_runs` writes every
finished run of the experiment to a folder, one JSON file per run (tags, params, metric
histories; `storage.tracking.ArchivedRun`) plus the per-user ranks that paired statistics need
(`ranks/`, Parquet); `restore_runs` recreates them in another workspace's experiment, so the
suite skips the arms that finished and its report reads them as if they had run there. Both add
only what is missing: runs are named by the id of the run first archived.

Checkpoints and datasets are not archived (hundreds of MB): an arm that needs a finished arm's
θ_0 trains it again, to the same weights, from the same seed.

A tuning study's trials are archived as they end, so that a study cut short (a deadline, a lost
machine) resumes in another workspace: each finished trial's run, also while its study's run is
open or was killed (then as a run of its own, without the parent), and the Optuna study itself
(`STUDY.trials.jsonl`: `archive_trials`, `archived_trials`; tasks/tune.py makes and reads the
records).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from core.errors import RsirError
from storage.tracking import ARCHIVED_ID_TAG, ArchivedRun, Tracker
from tasks.tune import STATE_TAG

RANKS_FOLDER = "ranks"  # the only artifacts archived: what the reports' paired statistics read
TRIALS_SUFFIX = ".trials.jsonl"  # a study's Optuna trials, one JSON record per line (not *.json: no run)


def archive_runs(tracker: Tracker, folder: Path) -> list[str]:
    """Write every FINISHED run of the tracker's experiment that `folder` lacks; return the
    archived ids written. A child run is archived only with its parent finished (an
    interrupted arm is redone whole), except a tuning trial's run (tag rsir.tune_state): a
    trial is whole by itself, and is archived without its unfinished study run as parent.
    Report runs are left out (a report is rewritten).
    Raises RsirError when the folder cannot be written."""
    runs = tracker.search_runs("attributes.status = 'FINISHED'")
    archived_id = {r.info.run_id: r.data.tags.get(ARCHIVED_ID_TAG, r.info.run_id) for r in runs}
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RsirError(f"cannot create the archive folder {folder}: {exc.strerror or exc}") from None
    written = []
    for run in runs:
        tags = run.data.tags
        parent = tags.get("mlflow.parentRunId")
        if "rsir.report" in tags or (parent and parent not in archived_id and STATE_TAG not in tags):
            continue
        name = archived_id[run.info.run_id]
        target = folder / f"{name}.json"
        if target.exists():
            continue
        record = tracker.export_run(run)
        record.run_id = name
        if parent in archived_id:
            record.tags["mlflow.parentRunId"] = archived_id[parent]
        else:  # a trial whose study run is open or was killed: restored as a run of its own
            record.tags.pop("mlflow.parentRunId", None)
        record.tags.pop(ARCHIVED_ID_TAG, None)
        try:
            for path in tracker.artifact_files(run.info.run_id, RANKS_FOLDER):
                with tempfile.TemporaryDirectory() as tmp:
                    _write_compact(tracker.download_artifact(run.info.run_id, path, tmp),
                                   folder / f"{name}.{Path(path).name}")
            # The JSON last: it is what marks the run archived.
            staged = target.with_suffix(".json.tmp")
            staged.write_text(record.model_dump_json(indent=1) + "\n")
            staged.replace(target)
        except OSError as exc:
            raise RsirError(f"cannot write the archive of MLflow run {name} in {folder}: "
                            f"{exc.strerror or exc}") from None
        written.append(name)
    return written


def archive_trials(folder: Path, study: str, records: list[dict[str, Any]]) -> Path:
    """Write a study's trial records (tasks/tune.py `export_trials`) as `folder/STUDY.trials.jsonl`,
    replacing the file whole (written beside it, then renamed: never half a file). Raises
    RsirError when the folder cannot be written."""
    target = Path(folder) / f"{study}{TRIALS_SUFFIX}"
    staged = target.with_name(target.name + ".tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staged.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
        staged.replace(target)
    except OSError as exc:
        raise RsirError(f"cannot write the archive of study {study} in {folder}: {exc.strerror or exc}") from None
    return target


def archived_trials(folder: Path, study: str) -> list[dict[str, Any]]:
    """A study's archived trial records ([] when it has none). Raises RsirError naming the file
    and line of a record that is no JSON object."""
    path = Path(folder) / f"{study}{TRIALS_SUFFIX}"
    if not path.is_file():
        return []
    records = []
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise RsirError(f"archived trials {path} cannot be read: {exc.strerror or exc}") from None
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise RsirError(f"archived trials {path} line {number}: no JSON ({str(exc)[:120]})") from None
        if not isinstance(record, dict):
            raise RsirError(f"archived trials {path} line {number}: no JSON object")
        records.append(record)
    return records


def _write_compact(source: Path, target: Path) -> None:
    """The same ranks table, a third of the size: ranks as int32 (at most the catalogue's size;
    a cast that would overflow raises), every column delta-encoded, zstd. Lossless: the report
    reads the same per-user ranks from either file."""
    table = pq.read_table(source)
    schema = pa.schema([pa.field(f.name, pa.int32() if f.name.endswith("_rank") else f.type, metadata=f.metadata)
                        for f in table.schema], metadata=table.schema.metadata)
    pq.write_table(table.cast(schema, safe=True), target, compression="zstd", compression_level=19,
                   use_dictionary=False, column_encoding={n: "DELTA_BINARY_PACKED" for n in schema.names})


def restore_runs(tracker: Tracker, folder: Path) -> list[str]:
    """Recreate in the tracker's experiment every archived run it lacks (parents before their
    children, with their ranks); return the archived ids restored. A folder that does not exist
    restores nothing. Raises RsirError naming the file for an unreadable or invalid record."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    records = {}
    for path in sorted(folder.glob("*.json")):
        try:
            record = ArchivedRun.model_validate(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            reason = str(exc).splitlines()[0][:200]
            raise RsirError(f"archived run {path} cannot be read: {reason}") from None
        records[record.run_id] = record
    present = {r.data.tags.get(ARCHIVED_ID_TAG, r.info.run_id): r.info.run_id for r in tracker.search_runs()}
    restored = []
    def depth(record: ArchivedRun) -> int:
        """Ancestors archived above the run (a tuning study nests trial runs, which nest iterations)."""
        parent, seen = record.tags.get("mlflow.parentRunId"), 0
        while parent in records and seen <= len(records):
            parent, seen = records[parent].tags.get("mlflow.parentRunId"), seen + 1
        return seen + (parent is not None)

    # Ancestors first, at any depth: a child names its parent's new id.
    for record in sorted(records.values(), key=depth):
        if record.run_id in present:
            continue
        parent = record.tags.get("mlflow.parentRunId")
        if parent and parent not in present:
            raise RsirError(f"archived run {folder / (record.run_id + '.json')} names parent {parent}, "
                            f"which is neither archived in {folder} nor in MLflow experiment {tracker.experiment_name!r}")
        new_id = tracker.import_run(record, present.get(parent) if parent else None)
        for ranks in sorted(folder.glob(f"{record.run_id}.*.parquet")):
            with tempfile.TemporaryDirectory() as tmp:
                local = Path(tmp) / ranks.name.removeprefix(f"{record.run_id}.")
                shutil.copyfile(ranks, local)
                tracker.log_artifact(new_id, local, RANKS_FOLDER)
        present[record.run_id] = new_id
        restored.append(record.run_id)
    return restored
