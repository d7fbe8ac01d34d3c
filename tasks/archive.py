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

An `rsir` run stopped before its end (a deadline's SIGINT, Ctrl-C: its MLflow run KILLED) keeps
its finished iterations: its run, each finished iteration's run with its row
(tasks/runlog.py ROW_FILE, kept in the record's `documents`) and ranks, and the versions of its
fork it will continue from (`forks/FORK/vNNNNN.json` and `.parquet`, or `.pMMM.parquet` parts
below PART_BYTES each: each D_{k+1}'s synthetic sequences, 0.1-0.4 MB per version with fidelity,
MBs without, never the real data). `restore_fork` commits those versions again in
another workspace, checked against their digests, and the run, reopened there, reads its finished
iterations instead of running them (flows/rsir.py). No checkpoint travels: the resumed run trains
from its first unfinished iteration, and a best θ restored this way is not registered. The run's
record is rewritten while it has not finished; once it has, its fork's versions leave the archive.

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

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.errors import RsirError
from storage.dataset import SEQUENCE_SCHEMA, DatasetStore
from storage.manifest import Manifest
from storage.tracking import ARCHIVED_ID_TAG, RUN_KEY_TAG, ArchivedRun, Tracker
from tasks.runlog import ROW_FILE
from tasks.tune import STATE_TAG

RANKS_FOLDER = "ranks"  # the only artifacts archived: what the reports' paired statistics read
TRIALS_SUFFIX = ".trials.jsonl"  # a study's Optuna trials, one JSON record per line (not *.json: no run)
FORKS_FOLDER = "forks"  # the versions a stopped run continues from, per fork
# A version's Parquet larger than this is written in row ranges below it: the repository keeps
# its files under 2 MiB (a version without fidelity is several MB).
PART_BYTES = 1_800_000
ARM_TAG = "rsir.label.arm"  # an `rsir` run that is a suite's arm (its labels, tasks/runlog.py)


def archive_runs(tracker: Tracker, folder: Path, store: DatasetStore | None = None) -> list[str]:
    """Write every FINISHED run of the tracker's experiment that `folder` lacks; return the
    archived ids written. A child run is archived only with its parent finished, except a
    tuning trial's run (tag rsir.tune_state): a trial is whole by itself, and is archived
    without its unfinished study run as parent; and the finished iterations of an `rsir` run
    that is a suite's arm and stopped (KILLED or FAILED), with that run, rewritten while it has not finished, and with
    `store` the versions of its fork it continues from (`archive_fork`). Report runs are left
    out (a report is rewritten).
    Raises RsirError when the folder cannot be written."""
    every = tracker.search_runs()
    finished = [r for r in every if r.info.status == "FINISHED"]
    # A suite's arm (what a suite resumes; a tuning trial cut short is replaced, not resumed).
    stopped = {r.info.run_id: r for r in every if r.info.status in ("KILLED", "FAILED")
               and ARM_TAG in r.data.tags and "mlflow.parentRunId" not in r.data.tags}
    # A stopped run's iterations worth keeping: finished, with the row a resumed run reads.
    resumable: dict[str, list[Any]] = {}
    for r in finished:
        parent = r.data.tags.get("mlflow.parentRunId")
        if parent in stopped and ROW_FILE in tracker.artifact_files(r.info.run_id, ""):
            resumable.setdefault(parent, []).append(r)
    runs = [r for r in finished if r.data.tags.get("mlflow.parentRunId") not in stopped
            or r in resumable.get(r.data.tags["mlflow.parentRunId"], [])] + [stopped[p] for p in resumable]
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
        # Kept as archived, unless it is a run that had not finished when it was archived.
        if target.exists() and run.info.run_id not in stopped and (parent or _archived_status(target) == "FINISHED"):
            continue
        record = tracker.export_run(run)
        record.run_id = name
        if parent in archived_id:
            record.tags["mlflow.parentRunId"] = archived_id[parent]
        else:  # a trial whose study run is open or was killed: restored as a run of its own
            record.tags.pop("mlflow.parentRunId", None)
        record.tags.pop(ARCHIVED_ID_TAG, None)
        text = record.model_dump_json(indent=1) + "\n"
        fork = run.data.params.get("run_dataset") if not parent and RUN_KEY_TAG in tags else None
        try:
            if fork and store is not None and run.info.run_id in stopped:  # what the archive lacks, first
                done = max(int(c.data.tags.get("rsir.iteration", -1)) for c in resumable[run.info.run_id])
                archive_fork(store, folder, fork, done + 1)
            if target.exists() and run.info.run_id in stopped and _same_record(target, text):
                continue
            if parent and ROW_FILE in tracker.artifact_files(run.info.run_id, ""):
                record.documents[ROW_FILE] = tracker.load_dict(run.info.run_id, ROW_FILE)
                text = record.model_dump_json(indent=1) + "\n"
            for path in tracker.artifact_files(run.info.run_id, RANKS_FOLDER):
                with tempfile.TemporaryDirectory() as tmp:
                    _write_compact(tracker.download_artifact(run.info.run_id, path, tmp),
                                   folder / f"{name}.{Path(path).name}")
            # The JSON last: it is what marks the run archived.
            staged = target.with_suffix(".json.tmp")
            staged.write_text(text)
            staged.replace(target)
            if fork and run.info.status == "FINISHED":  # its versions are needed no more
                shutil.rmtree(folder / FORKS_FOLDER / fork, ignore_errors=True)
        except OSError as exc:
            raise RsirError(f"cannot write the archive of MLflow run {name} in {folder}: "
                            f"{exc.strerror or exc}") from None
        written.append(name)
    return written


def _archived_status(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("status")
    except (OSError, ValueError):
        return None


def _same_record(path: Path, text: str) -> bool:
    """The archived record of a stopped run says what `text` says (its documents aside)."""
    try:
        return {k: v for k, v in json.loads(path.read_text()).items() if k != "documents"} == \
            {k: v for k, v in json.loads(text).items() if k != "documents"}
    except (OSError, ValueError):
        return False


def archive_fork(store: DatasetStore, folder: Path, fork: str, last: int) -> list[int]:
    """Write versions 1..`last` of dataset `fork` that `folder` lacks (`folder/forks/FORK/`):
    each version's new partition (its synthetic sequences, Parquet) and then its manifest (what
    marks it archived). Version 0, the real data, never: `restore_fork` forks it again from the
    dataset. Returns the versions written."""
    target, written = Path(folder) / FORKS_FOLDER / fork, []
    for version in [v for v in store.versions(fork) if 1 <= v <= last]:
        manifest_path = target / f"v{version:05d}.json"
        if manifest_path.exists():
            continue
        manifest = store.manifest(fork, version)
        table = store.scan(fork, version, iterations=[version]).collect().drop("iteration").to_arrow()
        target.mkdir(parents=True, exist_ok=True)
        _write_parts(table.select(SEQUENCE_SCHEMA.names).cast(SEQUENCE_SCHEMA), manifest_path)
        staged = manifest_path.with_suffix(".json.tmp")
        staged.write_text(manifest.model_dump_json(indent=1) + "\n")
        staged.replace(manifest_path)
        written.append(version)
    return written


def _write_parts(table: pa.Table, manifest_path: Path, part_bytes: int | None = None) -> list[Path]:
    """The version's sequences as `vNNNNN.parquet`, or, when that file would exceed `part_bytes`
    (PART_BYTES), as consecutive row ranges `vNNNNN.pMMM.parquet`, each below it: a version
    without fidelity (MBs) stays in a git archive whose files must stay small. Returns the files."""
    limit = PART_BYTES if part_bytes is None else part_bytes
    parts = 1
    while True:
        bounds = np.linspace(0, table.num_rows, parts + 1).astype(int)
        buffers = []
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            sink = pa.BufferOutputStream()
            pq.write_table(table.slice(lo, hi - lo), sink, compression="zstd", compression_level=19)
            buffers.append(sink.getvalue())
        if max(b.size for b in buffers) <= limit or parts >= table.num_rows:
            break
        parts = max(parts + 1, int(np.ceil(parts * max(b.size for b in buffers) / limit)))
    names = ([manifest_path.with_suffix(".parquet")] if parts == 1 else
             [manifest_path.with_name(f"{manifest_path.stem}.p{i:03d}.parquet") for i in range(parts)])
    for name, buffer in zip(names, buffers):
        name.write_bytes(buffer.to_pybytes())
    return names


def _read_parts(manifest_path: Path) -> pa.Table:
    """The sequences `_write_parts` wrote for this manifest, in their order."""
    whole = manifest_path.with_suffix(".parquet")
    parts = sorted(manifest_path.parent.glob(f"{manifest_path.stem}.p[0-9][0-9][0-9].parquet"))
    if whole.exists() or not parts:
        return pq.read_table(whole)
    return pa.concat_tables([pq.read_table(p) for p in parts])


def has_archived_fork(folder: Path, fork: str) -> bool:
    return (Path(folder) / FORKS_FOLDER / fork).is_dir()


def restore_fork(store: DatasetStore, folder: Path, source: str, fork: str) -> list[int]:
    """Commit in `store` the archived versions of `fork` it lacks, on a fork of `source` (which
    the caller has fetched): each checked, before it is written, to give the digest its archived
    manifest names. Returns the versions committed. Raises RsirError naming the archived file
    of a version that is unreadable or gives another digest (nothing of it is committed), or
    whose predecessor is missing."""
    target = Path(folder) / FORKS_FOLDER / fork
    paths = sorted(target.glob("v*.json")) if target.is_dir() else []
    if not paths:
        return []
    store.fork(source, fork)
    committed = []
    for path in paths:
        try:
            archived = Manifest.model_validate_json(path.read_text())
            table = _read_parts(path)
        except (OSError, ValueError, pa.ArrowException) as exc:
            raise RsirError(f"archived version {path} cannot be read: {str(exc).splitlines()[0][:200]}") from None
        version = archived.version
        have = store.versions(fork)
        if version in have:
            if store.manifest(fork, version).digest != archived.digest:
                raise RsirError(f"archived version {path}: dataset {fork!r} v{version} exists here with digest "
                                f"{store.manifest(fork, version).digest[:12]}, the archive's is {archived.digest[:12]}")
            continue
        if version - 1 not in have:
            raise RsirError(f"archived version {path}: dataset {fork!r} has no version {version - 1} to add it to")
        parent = store.manifest(fork, version - 1)
        digest = store.append_digest(parent, table)
        if digest != archived.digest:
            raise RsirError(f"archived version {path}: its sequences give digest {digest[:12]} on this {fork!r} "
                            f"v{version - 1}, its manifest names {archived.digest[:12]} (modified?); not restored")
        store.append(fork, parent, table, generation=archived.generation, stats=archived.stats)
        committed.append(version)
    return committed


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
        for name, document in record.documents.items():
            tracker.log_dict(new_id, document, name)
        for ranks in sorted(folder.glob(f"{record.run_id}.*.parquet")):
            with tempfile.TemporaryDirectory() as tmp:
                local = Path(tmp) / ranks.name.removeprefix(f"{record.run_id}.")
                shutil.copyfile(ranks, local)
                tracker.log_artifact(new_id, local, RANKS_FOLDER)
        present[record.run_id] = new_id
        restored.append(record.run_id)
    return restored
