"""Data ingest: MovieLens-100K from the recbole wheel, users' own files; built-in views
(ml-100k-sparse, ml-100k-last50) are derived in tasks.views.

Preprocessing follows the literature: optional k-core filter, stable chronological order
(ties keep file order), contiguous item ids from 1 (0 is padding), users with fewer than
`min_seq_len` interactions dropped (and counted).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Literal

import polars as pl
import pyarrow as pa
from prefect import task
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core.errors import RsirError
from core.workspace import Workspace
from storage.dataset import DatasetStore, check_name, dataset_store
from storage.files import file_sha256
from storage.manifest import VersionRef
from tasks.statistics import version_statistics

Format = Literal["csv", "parquet", "recbole", "amazon"]
FORMATS: tuple[str, ...] = ("csv", "parquet", "recbole", "amazon")

ML100K_WHEEL = "recbole==1.2.1"
PIP_DOWNLOAD_TIMEOUT_S = 300
ML100K_INTER_SHA256 = "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff"
ML100K_MEMBER = "recbole/dataset_example/ml-100k/"
# ml-100k and the built-in views of it (tasks.views.BUILTIN_VIEWS defines them).
BUILTIN = ("ml-100k", "ml-100k-sparse", "ml-100k-last50")


class ImportSpec(BaseModel):
    """How to read and preprocess one interaction file."""

    model_config = ConfigDict(extra="forbid")

    path: Path
    name: str
    format: Format
    user_col: str = "user_id"
    item_col: str = "item_id"
    time_col: str = "timestamp"
    sep: str | None = Field(None, description="field separator, one character; default ',' (csv, amazon) "
                            "or tab (recbole)")
    id_type: Literal["int", "str"] | None = Field(None, description="default 'str' for amazon, else 'int'. "
                                                  "int: ids are integers, so '007' and '7' are one id; "
                                                  "str: ids are kept as written, '007' and '7' differ")
    kcore: int | None = Field(None, ge=0, description="k-core filter; default 5 for amazon, 0 (off) otherwise")
    min_seq_len: int = Field(3, ge=3)

    @field_validator("sep")
    @classmethod
    def _one_character(cls, sep: str | None) -> str | None:
        # The CSV reader splits on one byte; anything else would fail inside it with a traceback.
        if sep is not None and len(sep.encode()) != 1:
            raise ValueError("must be one character (a single byte, e.g. ',' ';' or a tab)")
        return sep

    @model_validator(mode="after")
    def _defaults(self) -> "ImportSpec":
        amazon = self.format == "amazon"
        if self.sep is None:
            self.sep = "\t" if self.format == "recbole" else ","
        if self.id_type is None:
            self.id_type = "str" if amazon else "int"
        if self.kcore is None:
            self.kcore = 5 if amazon else 0
        if amazon:  # the distributed files have no header and a fixed column order
            self.user_col, self.item_col, self.time_col = "user", "item", "timestamp"
        return self


# ------------------------------------------------------------------ reading and validation
def read_interactions(spec: ImportSpec) -> pl.DataFrame:
    """Read a file into (user, item, ts) in file order; every fault names file, column and value."""
    path = spec.path
    if not path.exists():
        raise RsirError(f"file not found: {path}")
    if not path.is_file():
        raise RsirError(f"not a file: {path}")
    if path.stat().st_size == 0:
        raise RsirError(f"empty file: {path}")
    raw = _read_table(spec)
    missing = [c for c in (spec.user_col, spec.item_col, spec.time_col) if c not in raw.columns]
    if missing:
        raise RsirError(f"{path}: missing column(s) {', '.join(map(repr, missing))}; "
                        f"columns found: {', '.join(map(repr, raw.columns))} "
                        f"(set them with --user-col/--item-col/--time-col)")
    if raw.height == 0:
        raise RsirError(f"{path}: no interactions (the file has a header but no rows)")
    return pl.DataFrame({
        "user": _parse_ids(raw[spec.user_col], spec, spec.user_col),
        "item": _parse_ids(raw[spec.item_col], spec, spec.item_col),
        "ts": _parse_timestamps(raw[spec.time_col], spec),
    })


def _read_table(spec: ImportSpec) -> pl.DataFrame:
    path = spec.path
    try:
        if spec.format == "parquet":
            return pl.read_parquet(path)
        if spec.format == "amazon":
            return pl.read_csv(path, has_header=False, separator=spec.sep, infer_schema=False,
                               new_columns=["user", "item", "rating", "timestamp"])
        table = pl.read_csv(path, separator=spec.sep, infer_schema=False, quote_char='"')
        _check_unique_header(table.columns, path)
        if spec.format == "recbole":  # header fields are "name:type"
            table = table.rename({c: c.split(":", 1)[0] for c in table.columns})
        return table
    except pl.exceptions.NoDataError:
        raise RsirError(f"empty file: {path}") from None
    except (pl.exceptions.ComputeError, pl.exceptions.PolarsError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RsirError(f"cannot read {path} as {spec.format}: {first}") from None


def _check_unique_header(columns: list[str], path: Path) -> None:
    """polars renames a repeated header name to NAME_duplicated_K and reads on: which of the
    columns was meant would be a guess, so refuse the file."""
    for col in columns:
        found = re.fullmatch(r"(.*)_duplicated_\d+", col)
        if found and found.group(1) in columns:
            raise RsirError(f"{path}: column {found.group(1)!r} appears more than once in the header")


def _check_scalar(series: pl.Series, where: str, what: str) -> None:
    """Ids and timestamps are single values: a list, struct or binary column is refused by name
    (a cast would fail inside polars with a traceback)."""
    if series.dtype.is_nested() or series.dtype in (pl.Binary, pl.Object):
        raise RsirError(f"{where} has type {series.dtype}; {what} must be single numbers or strings, not a "
                        f"{type(series.dtype).__name__.lower()}")


def _first_bad(series: pl.Series, bad: pl.Series) -> str:
    idx = int(bad.arg_true()[0])
    return f"row {idx + 1} (value {series[idx]!r})"


def _parse_ids(series: pl.Series, spec: ImportSpec, col: str) -> pl.Series:
    where = f"{spec.path}: column {col!r}"
    _check_scalar(series, where, "ids")
    if spec.id_type == "str":
        text = series.cast(pl.String).str.strip_chars()
        bad = text.is_null() | (text == "")
        if bad.any():
            raise RsirError(f"{where} has a null or empty id at {_first_bad(series, bad)}")
        return text
    if series.null_count():
        raise RsirError(f"{where} has a null id at {_first_bad(series, series.is_null())}")
    if series.dtype.is_integer() or series.dtype.is_float():
        if series.dtype.is_float():
            bad = series.is_nan() | (series != series.round(0))
            if bad.any():
                raise RsirError(f"{where} has a non-integer id at {_first_bad(series, bad)}")
        ids = series.cast(pl.Int64, strict=False)  # null where it does not fit (1e20, a large uint64)
        if ids.null_count():
            raise RsirError(f"{where} has an id out of range (ids are 64-bit integers) at "
                            f"{_first_bad(series, ids.is_null())} (use --id-type str for such ids)")
    else:
        ids = series.cast(pl.String).str.strip_chars().cast(pl.Int64, strict=False)
        if ids.null_count():
            raise RsirError(f"{where} has a non-integer id at {_first_bad(series, ids.is_null())} "
                            f"(use --id-type str for string ids)")
    if (ids < 0).any():
        raise RsirError(f"{where} has a negative id at {_first_bad(series, ids < 0)}")
    return ids.cast(pl.String)


def _parse_timestamps(series: pl.Series, spec: ImportSpec) -> pl.Series:
    """Numbers are taken as they are (any monotone unit); strings as numbers or ISO datetimes."""
    where = f"{spec.path}: column {spec.time_col!r}"
    _check_scalar(series, where, "timestamps")
    if series.null_count():
        raise RsirError(f"{where} has a null timestamp at {_first_bad(series, series.is_null())}")
    if series.dtype.is_numeric():
        ts = series.cast(pl.Float64)
    elif series.dtype == pl.Datetime or series.dtype == pl.Date:
        ts = series.cast(pl.Datetime("us")).dt.epoch("s").cast(pl.Float64)
    else:
        text = series.cast(pl.String).str.strip_chars()
        ts = text.cast(pl.Float64, strict=False)
        if ts.null_count():
            try:
                as_dt = text.str.to_datetime(strict=False, time_unit="us")
                ts = ts.fill_null(as_dt.dt.epoch("s").cast(pl.Float64))
            except pl.exceptions.ComputeError:  # no datetime format fits any value
                pass
        if ts.null_count():
            raise RsirError(f"{where} has an unparsable timestamp at {_first_bad(series, ts.is_null())}")
    if ts.is_nan().any() or ts.is_infinite().any():
        raise RsirError(f"{where} has an unparsable timestamp at {_first_bad(series, ts.is_nan() | ts.is_infinite())}")
    return ts


# ------------------------------------------------------------------ preprocessing
def kcore_filter(df: pl.DataFrame, k: int) -> pl.DataFrame:
    """Repeat until every user and every item has at least k interactions."""
    if k <= 1:
        return df
    while True:
        before = df.height
        df = df.filter(pl.len().over("user") >= k)
        df = df.filter(pl.len().over("item") >= k)
        if df.height == before:
            return df


def _natural_order(values: pl.Series) -> pl.Series:
    """Sort ids numerically when they all are integers, else lexicographically."""
    as_int = values.cast(pl.Int64, strict=False)
    if as_int.null_count() == 0:
        return values.gather(as_int.arg_sort())
    return values.sort()


def build_sequences(df: pl.DataFrame, kcore: int, min_seq_len: int, where: str
                    ) -> tuple[pa.Table, pl.DataFrame, dict[str, Any]]:
    """(user, item, ts) in file order -> (sequences, item map (item_id, raw_id), report)."""
    report: dict[str, Any] = {"input_interactions": df.height, "input_users": df["user"].n_unique(),
                              "input_items": df["item"].n_unique(), "kcore": kcore}
    df = df.with_row_index("_row")
    df = kcore_filter(df, kcore)
    report["kcore_removed_interactions"] = report["input_interactions"] - df.height
    short = pl.len().over("user") < min_seq_len
    report["dropped_short_users"] = df.filter(short)["user"].n_unique()
    df = df.filter(~short)
    users = df["user"].n_unique()
    if users < 2:
        raise RsirError(f"{where}: only {users} usable user(s) remain after preprocessing "
                        f"(k-core={kcore}, min length {min_seq_len}); at least 2 are needed")
    item_map = pl.DataFrame({"raw_id": _natural_order(df["item"].unique())}).with_row_index(
        "item_id", offset=1).with_columns(pl.col("item_id").cast(pl.Int32))
    user_order = pl.DataFrame({"user": _natural_order(df["user"].unique())}).with_row_index("seq_id")
    seqs = (
        df.join(item_map, left_on="item", right_on="raw_id")
        .sort(["user", "ts", "_row"], maintain_order=True)  # ties keep file order
        .group_by("user", maintain_order=True).agg(pl.col("item_id").alias("items"))
        .join(user_order, on="user").sort("seq_id")
        .select(pl.col("seq_id").cast(pl.Int64), pl.col("user").alias("user_id"), "items",
                pl.lit("real").alias("origin"), pl.lit(None, dtype=pl.Int64).alias("parent_seq_id"))
    )
    report.update(users=seqs.height, items=item_map.height, interactions=df.height)
    return seqs.to_arrow(), item_map, report


def publish(store: DatasetStore, name: str, seqs: pa.Table, items: pl.DataFrame,
            source: dict[str, Any], report: dict[str, Any], replace: bool) -> dict[str, Any]:
    stats = version_statistics(pl.from_arrow(seqs), items.height)
    manifest = store.create(name, seqs, items.to_arrow(), source={**source, "report": report},
                            stats=stats, replace=replace)
    return {"dataset": name, "version": manifest.version, "digest": manifest.digest, **report,
            "stats": stats}


def import_dataset(ws: Workspace, spec: ImportSpec, replace: bool = False) -> dict[str, Any]:
    """`rsir data import`: read, validate, preprocess and publish version 0."""
    check_name(spec.name)
    store = dataset_store(ws)
    if store.versions(spec.name) and not replace:
        raise RsirError(f"dataset {spec.name!r} already exists in {store.root}; pass --force to replace it")
    df = read_interactions(spec)
    seqs, item_map, report = build_sequences(df, spec.kcore, spec.min_seq_len, str(spec.path))
    source = {"format": spec.format, "path": str(spec.path.resolve()),
              "sha256": file_sha256(spec.path),
              "spec": spec.model_dump(mode="json")}
    return publish(store, spec.name, seqs, item_map, source, report, replace)


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


def existing_result(store: DatasetStore, name: str) -> dict[str, Any]:
    """What a fetch reports for a dataset that is already present."""
    m = store.manifest(name, 0)
    return {"dataset": name, "status": "exists", "version": m.version, "digest": m.digest,
            **m.source.get("report", {}), "stats": m.stats}


def fetch_builtin(ws: Workspace, name: str, replace: bool = False) -> dict[str, Any]:
    if name == "ml-100k":
        return fetch_ml100k(ws, replace)
    if name in BUILTIN:
        from tasks.views import fetch_builtin_view  # late: tasks.views builds on this module

        return fetch_builtin_view(ws, name, replace)
    raise RsirError(f"unknown built-in dataset {name!r}; available: {', '.join(BUILTIN)}")


@task(name="fetch-dataset", task_run_name="fetch-{name}", retries=2, retry_delay_seconds=5)
def fetch_builtin_task(name: str, home: str) -> VersionRef:
    """Prefect wrapper: make sure a built-in dataset exists (no-op for datasets that are present
    or not built in); returns its latest version."""
    ws = Workspace.at(home)
    if name in BUILTIN:
        fetch_builtin(ws, name)
    return dataset_store(ws).manifest(name).ref()
