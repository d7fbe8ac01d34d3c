"""The built-in datasets: MovieLens-100K from the recbole wheel, the RSIR paper's four benchmark
files (S3-Rec's preprocessed Amazon Beauty/Sports/Toys and Yelp) and the built-in views of
ml-100k (ml-100k-sparse, ml-100k-last50). Each is fetched once, checksum verified, and goes
through the import path of tasks/ingest.py (or the view derivation of tasks/views.py).
Their names and checksums: tasks/catalog.py (which the CLI reads before Prefect is imported).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import polars as pl
from prefect import task

from core.errors import RsirError
from core.workspace import Workspace
from storage.dataset import DatasetStore, dataset_store
from storage.files import file_sha256
from storage.manifest import VersionRef
from tasks.catalog import BENCHMARKS, BUILTIN, BUILTIN_VIEWS, BenchmarkFile, check_builtin
from tasks.ingest import ImportSpec, build_sequences, publish, read_interactions
from tasks.views import derive_view, lineage_fields

ML100K_WHEEL = "recbole==1.2.1"
PIP_DOWNLOAD_TIMEOUT_S = 300
ML100K_INTER_SHA256 = "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff"
ML100K_MEMBER = "recbole/dataset_example/ml-100k/"

# The paper's benchmarks as the sequential-recommendation literature shares them (S3-Rec,
# CL4SRec, DuoRec, ...): aHuiWang/CIKM2020-S3Rec, folder data/, at one commit (the files and
# their SHA-256: tasks/catalog.py BENCHMARKS).
S3REC_REPOSITORY = "aHuiWang/CIKM2020-S3Rec"
S3REC_COMMIT = "49a890dcb516c9ed3126564495234ea74d5cd566"
S3REC_URL = f"https://raw.githubusercontent.com/{S3REC_REPOSITORY}/{S3REC_COMMIT}/data/"
DOWNLOAD_TIMEOUT_S = 60
MIRROR_ENV = "RSIR_DATA_MIRROR"  # a local directory holding the benchmark files (a mirror of data/)


# ------------------------------------------------------------------ MovieLens-100K
def download_ml100k(ws: Workspace) -> Path:
    """Extract ml-100k.inter/.item from the recbole wheel (downloaded, never installed)."""
    target = ws.downloads / "ml-100k"
    inter = target / "ml-100k.inter"
    if inter.exists() and file_sha256(inter) == ML100K_INTER_SHA256:
        return target
    ws.downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ws.downloads) as tmp:
        # A wheel only (an sdist would run its build code), and bounded waits: a registry that
        # does not answer fails in minutes with one line, not never.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--only-binary=:all:", "--timeout", "30", "--retries", "2", "-q", ML100K_WHEEL, "-d", tmp]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_DOWNLOAD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise RsirError(f"could not download {ML100K_WHEEL}: no answer from the package index within "
                            f"{PIP_DOWNLOAD_TIMEOUT_S} s") from None
        wheels = list(Path(tmp).glob("recbole-*.whl"))
        if done.returncode != 0 or not wheels:
            raise RsirError(f"could not download {ML100K_WHEEL}: {done.stderr.strip()[-300:]}")
        staged = Path(tmp) / "ml-100k"
        staged.mkdir()
        with zipfile.ZipFile(wheels[0]) as zf:
            for member in ("ml-100k.inter", "ml-100k.item"):
                (staged / member).write_bytes(zf.read(ML100K_MEMBER + member))
        got = file_sha256(staged / "ml-100k.inter")
        if got != ML100K_INTER_SHA256:
            raise RsirError(f"ml-100k.inter from {wheels[0].name} has sha256 {got}, "
                            f"expected {ML100K_INTER_SHA256}")
        shutil.rmtree(target, ignore_errors=True)
        staged.replace(target)
    return target


def ml100k_item_table(item_file: Path, item_map: pl.DataFrame) -> pl.DataFrame:
    raw = pl.read_csv(item_file, separator="\t", infer_schema=False, quote_char=None)
    raw = raw.rename({c: c.split(":", 1)[0] for c in raw.columns})
    meta = raw.select(
        pl.col("item_id").alias("raw_id"), pl.col("movie_title").alias("title"),
        pl.col("release_year").cast(pl.Int32, strict=False).alias("year"),
        pl.col("class").str.split(" ").alias("genres"),
    )
    return item_map.join(meta, on="raw_id", how="left").sort("item_id")


def fetch_ml100k(ws: Workspace, replace: bool = False) -> dict[str, Any]:
    store = dataset_store(ws)
    if store.versions("ml-100k") and not replace:
        return existing_result(store, "ml-100k")
    folder = download_ml100k(ws)
    spec = ImportSpec(path=folder / "ml-100k.inter", name="ml-100k", format="recbole")
    seqs, item_map, report = build_sequences(read_interactions(spec), 0, spec.min_seq_len, str(spec.path))
    items = ml100k_item_table(folder / "ml-100k.item", item_map)
    source = {"format": "recbole", "origin": ML100K_WHEEL, "sha256": ML100K_INTER_SHA256}
    return publish(store, "ml-100k", seqs, items, source, report, replace)


# ------------------------------------------------------------------ the paper's benchmarks
def data_mirror(mirror: Path | None) -> Path | None:
    """The local mirror of the benchmark files: `mirror` (`--from`), else $RSIR_DATA_MIRROR, else
    None (download from the public source)."""
    if mirror is None and os.environ.get(MIRROR_ENV):
        mirror = Path(os.environ[MIRROR_ENV])
    if mirror is None:
        return None
    mirror = mirror.expanduser()
    if not mirror.is_dir():
        raise RsirError(f"data mirror {mirror} is not a directory (--from DIR or ${MIRROR_ENV})")
    return mirror


def _check_sha256(path: Path, bench: BenchmarkFile) -> None:
    got = file_sha256(path)
    if got != bench.sha256:
        raise RsirError(f"{path}: sha256 {got}, expected {bench.sha256} ({S3REC_REPOSITORY} at "
                        f"{S3REC_COMMIT[:12]}, data/{bench.file}); nothing was imported")


def benchmark_file(ws: Workspace, bench: BenchmarkFile, mirror: Path | None) -> tuple[Path, str]:
    """The benchmark file, checksum verified, and where it was read from (a mirror path or the
    URL). From the mirror when there is one (a file missing there is an error, not a reason to
    go online), else downloaded into the workspace's download cache, which is reused while its
    digest is right. A download is staged and kept only once its digest is verified."""
    if mirror is not None:
        path = mirror / bench.file
        if not path.is_file():
            raise RsirError(f"{path}: not found in the data mirror {mirror} (--from DIR or ${MIRROR_ENV})")
        _check_sha256(path, bench)
        return path, str(path.resolve())
    url = S3REC_URL + bench.file
    target = ws.downloads / "s3rec" / bench.file
    if target.is_file() and file_sha256(target) == bench.sha256:
        return target, url
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        staged = Path(tmp) / bench.file
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as answer, staged.open("wb") as out:
                shutil.copyfileobj(answer, out)
        except (urllib.error.URLError, OSError) as exc:  # no network, HTTP error, timeout
            reason = getattr(exc, "reason", None) or exc
            raise RsirError(f"could not download {url}: {reason} (a local copy: --from DIR or "
                            f"${MIRROR_ENV})") from None
        _check_sha256(staged, bench)
        staged.replace(target)
    return target, url


def fetch_benchmark(ws: Workspace, name: str, replace: bool = False, mirror: Path | None = None
                    ) -> dict[str, Any]:
    """One of BENCHMARKS as version 0: the `sequences` file through the import path (no k-core:
    the files are 5-core already; the position on the line is the time)."""
    store = dataset_store(ws)
    if store.versions(name) and not replace:
        return existing_result(store, name)
    bench = BENCHMARKS[name]
    path, read_from = benchmark_file(ws, bench, data_mirror(mirror))
    spec = ImportSpec(path=path, name=name, format="sequences")
    seqs, item_map, report = build_sequences(read_interactions(spec), spec.kcore, spec.min_seq_len, str(path))
    source = {"format": "sequences", "origin": S3REC_URL + bench.file, "read_from": read_from,
              "sha256": bench.sha256}
    return publish(store, name, seqs, item_map, source, report, replace)


# ------------------------------------------------------------------ built-ins
def existing_result(store: DatasetStore, name: str) -> dict[str, Any]:
    """What a fetch reports for a dataset that is already present."""
    m = store.manifest(name, 0)
    return {"dataset": name, "status": "exists", "version": m.version, "digest": m.digest,
            **m.source.get("report", {}), "stats": m.stats.model_dump()}


def fetch_builtin(ws: Workspace, name: str, replace: bool = False, mirror: Path | None = None) -> dict[str, Any]:
    """Build a built-in dataset's version 0 (or report the one present). `mirror`: a local
    directory with the benchmark files (only BENCHMARKS are read from one)."""
    check_builtin(name)
    if name in BENCHMARKS:
        return fetch_benchmark(ws, name, replace, mirror)
    if mirror is not None:
        raise RsirError(f"--from (a data mirror) applies to {', '.join(BENCHMARKS)}; {name} comes from "
                        f"the {ML100K_WHEEL} wheel")
    if name == "ml-100k":
        return fetch_ml100k(ws, replace)
    return fetch_builtin_view(ws, name, replace)


def fetch_builtin_view(ws: Workspace, name: str, replace: bool = False) -> dict[str, Any]:
    """A built-in view; its source is fetched first when missing."""
    source, make_view = BUILTIN_VIEWS[name]
    store = dataset_store(ws)
    if store.versions(name) and not replace:
        return {**existing_result(store, name), **lineage_fields(store.manifest(name, 0).source)}
    if not store.versions(source):
        fetch_builtin(ws, source)
    return derive_view(ws, source, name, make_view(), replace)


@task(name="fetch-dataset", task_run_name="fetch-{name}", retries=2, retry_delay_seconds=5)
def fetch_builtin_task(name: str, home: str) -> VersionRef:
    """Prefect wrapper: make sure a built-in dataset exists (no-op for datasets that are present
    or not built in; the benchmarks come from $RSIR_DATA_MIRROR when it is set); returns its
    latest version."""
    ws = Workspace.at(home)
    if name in BUILTIN:
        fetch_builtin(ws, name)
    return dataset_store(ws).manifest(name).ref()
