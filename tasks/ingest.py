"""Data ingest: users' own files, and the import path that the built-in datasets
(tasks/builtins.py) go through too.

Every source goes through one path: `read_interactions` (file -> (user, item, ts) in file order)
then `build_sequences` and `publish`. Preprocessing follows the literature: exact duplicate
events (same user, item and timestamp) collapsed to one (counted), optional k-core filter,
stable chronological order (ties keep file order), contiguous item ids from 1 (0 is padding),
users with fewer than `min_seq_len` interactions dropped (and counted).

Timestamps are kept exactly, in the column's own type, because they only order and compare
events of one file: integers of any width and decimals as they are, floats as they are, numbers
written as text as exact decimals (up to 38 significant digits), date/time text to the
nanosecond (to the microsecond outside 1677..2262, the span of a 64-bit nanosecond count),
Parquet dates, datetimes (any unit and time zone), times and durations as they are. A file
without a time column (`time_col=None`, the `sequences` format) is in time order: the position
in the file is the time, so no two of its rows are the same event.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import polars as pl
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core.errors import RsirError
from core.workspace import Workspace
from storage.dataset import DatasetStore, check_name, dataset_store
from storage.files import file_sha256
from tasks.statistics import version_statistics

Format = Literal["csv", "parquet", "recbole", "amazon", "sequences"]
FORMATS: tuple[str, ...] = ("csv", "parquet", "recbole", "amazon", "sequences")
# Formats read as text, where a blank line (nothing but spaces, tabs or separators) is no row.
TEXT_FORMATS = ("csv", "recbole", "amazon", "sequences")



# Numbers written as text are compared as exact decimals; polars' Decimal holds 38 digits.
DECIMAL_DIGITS = 38
NUMBER = r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$"
# The widest span, in microseconds from 1970, that a 64-bit count of nanoseconds can hold.
NS_SPAN_US = (2**63 - 1) // 1000


class ImportSpec(BaseModel):
    """How to read and preprocess one interaction file."""

    model_config = ConfigDict(extra="forbid")

    path: Path
    name: str
    format: Format
    user_col: str = "user_id"
    item_col: str = "item_id"
    time_col: str | None = Field("timestamp", description="None: the file has no time column; the row "
                                 "order within a user is the time order (always so for sequences)")
    sep: str | None = Field(None, description="field separator, one character; default ',' (csv, amazon) "
                            "or tab (recbole); sequences are split at any whitespace")
    id_type: Literal["int", "str"] | None = Field(None, description="default 'str' for amazon, else 'int'. "
                                                  "int: ids are integers, so '007' and '7' are one id; "
                                                  "str: ids are kept as written, '007' and '7' differ")
    kcore: int | None = Field(None, ge=0, le=2 ** 31 - 1, description="k-core filter; default 5 for amazon, 0 (off) otherwise")
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
        if self.format == "sequences":
            if self.sep is not None:
                raise ValueError("sequences are split at any whitespace; --sep does not apply")
            # One line per user: the user id, then the items in time order (no time column).
            self.user_col, self.item_col, self.time_col = "user", "item", None
        elif self.sep is None:
            self.sep = "\t" if self.format == "recbole" else ","
        if self.id_type is None:
            self.id_type = "str" if amazon else "int"
        if self.kcore is None:
            self.kcore = 5 if amazon else 0
        if amazon:  # the distributed files have no header and a fixed column order
            self.user_col, self.item_col, self.time_col = "user", "item", "timestamp"
        return self


# ------------------------------------------------------------------ reading and validation
@dataclass(frozen=True)
class RawTable:
    """A file's rows as read, blank lines left out.

    `table`: the file's columns, one row per interaction (for `sequences`, one per item of a
    line). `rows`: for each of them its row in the file, from 1, counted as the file is written
    (a CSV's header is not a row; blank lines are), so that a message names the row to look at.
    """

    table: pl.DataFrame
    rows: pl.Series


def read_interactions(spec: ImportSpec) -> pl.DataFrame:
    """Read a file into (user: str, item: str, ts) in file order; every fault names file, column
    and value. `ts` keeps the time column's exact value in its own type (module docstring), or is
    the position in the file (Int64) when the file has no time column."""
    path = spec.path
    if not path.exists():
        raise RsirError(f"file not found: {path}")
    if not path.is_file():
        raise RsirError(f"not a file: {path}")
    if path.stat().st_size == 0:
        raise RsirError(f"empty file: {path}")
    raw = _read_table(spec)
    wanted = [c for c in (spec.user_col, spec.item_col, spec.time_col) if c is not None]
    missing = [c for c in wanted if c not in raw.table.columns]
    if missing:
        raise RsirError(f"{path}: missing column(s) {', '.join(map(repr, missing))}; "
                        f"columns found: {', '.join(map(repr, raw.table.columns))} "
                        f"(set them with --user-col/--item-col/--time-col, or --no-time for a file "
                        f"without a time column)")
    if raw.table.height == 0:
        raise RsirError(f"{path}: no interactions (no rows besides a header and blank lines)")
    table = raw.table
    return pl.DataFrame({
        "user": _parse_ids(table[spec.user_col], raw.rows, spec, spec.user_col),
        "item": _parse_ids(table[spec.item_col], raw.rows, spec, spec.item_col),
        # Without a time column the file order is the time order: the position is the time.
        "ts": (pl.int_range(table.height, dtype=pl.Int64, eager=True) if spec.time_col is None
               else _parse_timestamps(table[spec.time_col], raw.rows, spec)),
    })


def _read_table(spec: ImportSpec) -> RawTable:
    path = spec.path
    try:
        if spec.format == "parquet":
            table = pl.read_parquet(path)
            return RawTable(table, pl.int_range(1, table.height + 1, dtype=pl.Int64, eager=True))
        if spec.format == "sequences":
            return _read_sequences(path)
        if spec.format == "amazon":
            # A schema, not names: the width is then fixed, not taken from the first line,
            # which may be blank; a short line gets empty fields (then named as missing values).
            table = pl.read_csv(path, has_header=False, separator=spec.sep, missing_columns="insert",
                                schema={c: pl.String for c in ("user", "item", "rating", "timestamp")})
        else:
            table = pl.read_csv(path, separator=spec.sep, infer_schema=False, quote_char='"')
            _check_unique_header(table.columns, path)
            if spec.format == "recbole":  # header fields are "name:type"
                table = table.rename({c: c.split(":", 1)[0] for c in table.columns})
        return _without_blank_rows(table)
    except pl.exceptions.NoDataError:
        raise RsirError(f"empty file: {path}") from None
    except (pl.exceptions.ComputeError, pl.exceptions.PolarsError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RsirError(f"cannot read {path} as {spec.format}: {first}") from None


def _without_blank_rows(table: pl.DataFrame) -> RawTable:
    """The CSV reader turns a blank line into a row of empty fields; such a row (every field
    empty or spaces: a blank line, or only separators, as spreadsheets write empty rows) holds
    no interaction and is left out. A row with any field filled is kept, so an empty id in it
    is still refused, under its own row number."""
    rows = pl.int_range(1, table.height + 1, dtype=pl.Int64, eager=True)
    # infer_schema=False: every column is a string column.
    blank = table.select(pl.all_horizontal(pl.all().str.strip_chars().fill_null("") == "")).to_series()
    if not blank.any():
        return RawTable(table, rows)
    return RawTable(table.filter(~blank), rows.filter(~blank))


def _read_sequences(path: Path) -> RawTable:
    """`sequences`: one user per line, whitespace-separated, the user id then the item ids in time
    order -> one row (user, item) per item, in file order; blank lines have no items."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RsirError(f"cannot read {path} as sequences: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    tokens = pl.Series("tokens", text.split("\n")).str.extract_all(r"\S+")
    lines = pl.DataFrame({"row": pl.int_range(1, tokens.len() + 1, dtype=pl.Int64, eager=True),
                          "user": tokens.list.first(), "item": tokens.list.slice(1)})
    # A line with a user id and no items has no interaction; a blank line not even a user.
    long = lines.filter(pl.col("item").list.len() > 0).explode("item")
    return RawTable(long.select("user", "item"), long["row"])


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


def _first_bad(series: pl.Series, bad: pl.Series, rows: pl.Series) -> str:
    """'row R (value V)' for the first true entry of `bad`; R is the row in the file."""
    idx = int(bad.arg_true()[0])
    return f"row {rows[idx]} (value {series[idx]!r})"


def _parse_ids(series: pl.Series, rows: pl.Series, spec: ImportSpec, col: str) -> pl.Series:
    where = f"{spec.path}: column {col!r}"
    _check_scalar(series, where, "ids")
    if spec.id_type == "str":
        text = series.cast(pl.String).str.strip_chars()
        bad = text.is_null() | (text == "")
        if bad.any():
            raise RsirError(f"{where} has a null or empty id at {_first_bad(series, bad, rows)}")
        return text
    if series.null_count():
        raise RsirError(f"{where} has a null id at {_first_bad(series, series.is_null(), rows)}")
    if series.dtype.is_integer() or series.dtype.is_float():
        if series.dtype.is_float():
            bad = series.is_nan() | (series != series.round(0))
            if bad.any():
                raise RsirError(f"{where} has a non-integer id at {_first_bad(series, bad, rows)}")
        ids = series.cast(pl.Int64, strict=False)  # null where it does not fit (1e20, a large uint64)
        if ids.null_count():
            raise RsirError(f"{where} has an id out of range (ids are 64-bit integers) at "
                            f"{_first_bad(series, ids.is_null(), rows)} (use --id-type str for such ids)")
    else:
        ids = series.cast(pl.String).str.strip_chars().cast(pl.Int64, strict=False)
        if ids.null_count():
            raise RsirError(f"{where} has a non-integer id at {_first_bad(series, ids.is_null(), rows)} "
                            f"(use --id-type str for string ids)")
    if (ids < 0).any():
        raise RsirError(f"{where} has a negative id at {_first_bad(series, ids < 0, rows)}")
    return ids.cast(pl.String)


def _parse_timestamps(series: pl.Series, rows: pl.Series, spec: ImportSpec) -> pl.Series:
    """The time column as an exact, sortable series (rules in the module docstring): never
    through float64 or whole seconds, which would tie or swap events that are apart."""
    where = f"{spec.path}: column {spec.time_col!r}"
    _check_scalar(series, where, "timestamps")
    if series.null_count():
        raise RsirError(f"{where} has a null timestamp at {_first_bad(series, series.is_null(), rows)}")
    dtype = series.dtype
    if dtype.is_temporal() or dtype.is_integer() or dtype.is_decimal():
        return series  # compared in their own type, exactly
    if dtype.is_float():
        bad = series.is_nan() | series.is_infinite()
        if bad.any():
            raise RsirError(f"{where} has an unparsable timestamp at {_first_bad(series, bad, rows)}")
        return series
    text = series.cast(pl.String).str.strip_chars()
    is_number = text.str.contains(NUMBER)
    if is_number.all():
        return _exact_numbers(text, series, rows, where)
    moments = _datetimes(text)
    if moments.null_count() == 0:
        return moments
    neither = ~is_number & moments.is_null()
    if neither.any():
        raise RsirError(f"{where} has an unparsable timestamp at {_first_bad(series, neither, rows)}")
    raise RsirError(f"{where} mixes numbers and date/times: {_first_bad(series, is_number, rows)} is a number, "
                    f"{_first_bad(series, moments.is_not_null(), rows)} a date/time; use one kind")


def _exact_numbers(text: pl.Series, series: pl.Series, rows: pl.Series, where: str) -> pl.Series:
    """Numbers written as text (each matching NUMBER) -> Decimal with the smallest scale that
    holds every one of them exactly; a column that needs more than 38 digits is refused."""
    decimals = text.str.extract(r"\.(\d*)", 1).str.len_chars().fill_null(0).cast(pl.Int64)
    exponent_text = text.str.extract(r"[eE]([+-]?\d+)$", 1)
    exponent = exponent_text.cast(pl.Int64, strict=False).fill_null(0)
    scale = (decimals - exponent).clip(lower_bound=0)
    too_fine = (scale > DECIMAL_DIGITS) | (exponent_text.is_not_null() & (exponent.abs() > DECIMAL_DIGITS))
    if too_fine.any():
        raise RsirError(f"{where} has a timestamp that needs more than {DECIMAL_DIGITS} digits to be compared "
                        f"exactly at {_first_bad(series, too_fine, rows)}")
    exact = text.str.to_decimal(scale=int(scale.max()))
    if exact.null_count():  # the integer part and the column's scale do not fit in 38 digits
        raise RsirError(f"{where} has a timestamp that needs more than {DECIMAL_DIGITS} digits to be compared "
                        f"exactly at {_first_bad(series, exact.is_null(), rows)}")
    return exact


def _datetimes(text: pl.Series) -> pl.Series:
    """Date/time text -> Datetime in nanoseconds (time zones converted to UTC), or microseconds
    when a value lies outside the nanosecond span (polars would wrap it around silently); null
    where a value does not parse in the format of the column's first value."""
    try:
        micro = text.str.to_datetime(strict=False, time_unit="us")
    except pl.exceptions.PolarsError:  # no date/time format fits the first value
        return pl.Series(values=[None] * text.len(), dtype=pl.Datetime("us"))
    if micro.null_count() or (micro.to_physical().abs() > NS_SPAN_US).any():
        return micro
    return text.str.to_datetime(strict=False, time_unit="ns")


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
    """(user, item, ts) in file order (ts of any sortable type) -> (sequences, item map
    (item_id, raw_id), report).

    An event that occurs twice, same user, item and timestamp, is one event written twice: kept
    once (its first row), counted in `duplicates_removed`, before the k-core filter counts it.
    Otherwise the same event could be both a user's validation and test target. The same item
    at another time is another interaction and stays.
    """
    report: dict[str, Any] = {"input_interactions": df.height, "input_users": df["user"].n_unique(),
                              "input_items": df["item"].n_unique(), "kcore": kcore}
    df = df.with_row_index("_row")
    distinct = df.unique(subset=["user", "item", "ts"], keep="first", maintain_order=True)
    report["duplicates_removed"] = df.height - distinct.height
    df = kcore_filter(distinct, kcore)
    report["kcore_removed_interactions"] = distinct.height - df.height
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
    # What the import removed belongs with the data's statistics: a reader of the manifest sees
    # that the interactions counted are distinct events.
    stats = version_statistics(pl.from_arrow(seqs), items.height).model_copy(
        update={"duplicates_removed": report["duplicates_removed"]})
    manifest = store.create(name, seqs, items.to_arrow(), source={**source, "report": report},
                            stats=stats, replace=replace)
    return {"dataset": name, "version": manifest.version, "digest": manifest.digest, **report,
            "stats": stats.model_dump()}


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
