"""Any table as a data version: CSV or Parquet files (a file, a glob, a folder, an S3 prefix) with a label
column named in the config.

What the data stage decides, and why:

* **The task** (binary, multiclass, regression) is read from the label unless stated: strings and
  booleans are classes; numbers with two values are binary, whole numbers with at most
  ``MAX_AUTO_CLASSES`` values are classes, anything else is a regression target.
* **Features** are every other column but ``drop_columns`` and ``time_column`` (a time stamp orders the
  split; as a feature it would only tell the model how late a row is). Numbers and booleans become
  float64, strings become pandas categories (XGBoost's ``enable_categorical``) with the category set of
  the whole table, the same in every split. Other types (dates, lists, binary) are refused by name.
* **Rows without a label** are dropped and counted; a label that is missing everywhere, or a classifier's
  label with one class, is refused before anything is written.
* **The version** is a content hash of the prepared rows and the options that shaped them, written with
  ``tuning_core.versioning`` (manifest last: a folder without one is not a version).
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import json
import logging
import posixpath
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pyarrow.types as pat

from tuning_core.errors import DataError, TunepipeError, storage_failure
from tuning_core.results import DataVersion
from tuning_core.sources import DataSource
from tuning_core.versioning import hash_bytes, read_manifest, version_exists, write_version

log = logging.getLogger(__name__)

DATASET = "tabular"
SPLITS = ("train", "valid", "test")
FORMAT_VERSION = 1
CSV_SUFFIXES = (".csv", ".csv.gz", ".csv.bz2", ".csv.zst")
PARQUET_SUFFIXES = (".parquet", ".pq")
MAX_AUTO_CLASSES = 20
TASKS = ("binary", "multiclass", "regression")


@dataclass(frozen=True)
class LabelInfo:
    """What the label column says: the task, the classes (classification), and how many are missing."""

    task: str
    classes: list[Any]
    rows: int
    missing: int


def _short(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


def _failure(source: DataSource, err: OSError, doing: str) -> TunepipeError:
    return storage_failure(f"{source.uri}: cannot {doing} ({_short(err)})", err)


# --------------------------------------------------------------------------- files
def _is_table_file(path: str) -> bool:
    name = posixpath.basename(path).lower()
    return not name.startswith((".", "_")) and name.endswith(CSV_SUFFIXES + PARQUET_SUFFIXES)


def resolve_files(fs: pafs.FileSystem, source: DataSource) -> list[str]:
    """The table files a source names: a file, a glob's matches, or every CSV/Parquet file below a folder."""
    try:
        if source.glob:
            parts = source.path.split("/")
            first = next(i for i, p in enumerate(parts) if any(c in p for c in "*?["))
            base = "/".join(parts[:first]) or "/"
            if fs.get_file_info(base).type != pafs.FileType.Directory:
                raise DataError(f"{source.uri}: glob matched no files (folder {base} not found)")
            infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
            files = sorted(i.path for i in infos if i.type == pafs.FileType.File
                           and fnmatch.fnmatchcase(i.path, source.path.replace("**/", "*")))
            if not files:
                raise DataError(f"{source.uri}: glob matched no files")
            return files
        info = fs.get_file_info(source.path)
        if info.type == pafs.FileType.File:
            return [source.path]
        if info.type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(source.path, recursive=True))
            files = sorted(i.path for i in infos if i.type == pafs.FileType.File and _is_table_file(i.path))
            if not files:
                raise DataError(f"{source.uri}: folder holds no table files (expected names ending "
                                f"{', '.join(CSV_SUFFIXES + PARQUET_SUFFIXES)})")
            return files
        raise DataError(f"{source.uri}: no such file or folder")
    except OSError as err:
        raise _failure(source, err, "list the source") from None


def _is_parquet(path: str) -> bool:
    return path.lower().endswith(PARQUET_SUFFIXES)


def read_table(fs: pafs.FileSystem, source: DataSource, columns: list[str] | None = None) -> pa.Table:
    """Every file of the source as one table (column types unified across files)."""
    tables = []
    for file in resolve_files(fs, source):
        where = file if not source.is_s3 else f"s3://{file}"
        try:
            if _is_parquet(file):
                tables.append(pq.read_table(file, filesystem=fs, columns=columns))
            else:
                with fs.open_input_stream(file, compression="detect") as stream:
                    convert = pacsv.ConvertOptions(include_columns=columns) if columns else None
                    tables.append(pacsv.read_csv(stream, convert_options=convert))
        except pa.ArrowInvalid as err:
            raise DataError(f"{where}: not a readable {'Parquet' if _is_parquet(file) else 'CSV'} table "
                            f"({_short(err)})") from None
        except OSError as err:
            raise _failure(source, err, f"read {where}") from None
    try:
        table = pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise DataError(f"{source.uri}: the files' columns do not agree ({_short(err)})") from None
    if table.num_rows == 0:
        raise DataError(f"{source.uri}: no data rows")
    return table


def read_schema(fs: pafs.FileSystem, source: DataSource) -> pa.Schema:
    """The columns and types of the source, from each file's header block or Parquet footer (cheap)."""
    schemas = []
    for file in resolve_files(fs, source):
        try:
            if _is_parquet(file):
                schemas.append(pq.read_schema(file, filesystem=fs))
            else:
                with fs.open_input_stream(file, compression="detect") as stream:
                    schemas.append(pacsv.open_csv(stream).schema)
        except pa.ArrowInvalid as err:
            raise DataError(f"{file}: not a readable table ({_short(err)})") from None
        except OSError as err:
            raise _failure(source, err, f"read {file}") from None
    return pa.unify_schemas(schemas, promote_options="permissive")


# --------------------------------------------------------------------------- columns and label
def _kind(t: pa.DataType) -> str | None:
    """"number", "category", or None (a type the workload cannot use as a feature)."""
    if pat.is_dictionary(t):
        t = t.value_type
    if pat.is_integer(t) or pat.is_floating(t) or pat.is_boolean(t) or pat.is_decimal(t) or pat.is_null(t):
        return "number"
    if pat.is_string(t) or pat.is_large_string(t):
        return "category"
    return None


def feature_columns(schema: pa.Schema, label: str, time_column: str | None, drop: list[str],
                    src: str) -> dict[str, str]:
    """Feature name → "number" or "category"; names a missing column or an unusable type in one line."""
    names = schema.names
    for what, name in (("data.label", label), ("data.time_column", time_column),
                       *(("data.drop_columns", d) for d in drop)):
        if name is not None and name not in names:
            shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
            raise DataError(f"{what} {name!r}: no such column in {src}; its columns are [{shown}]")
    out = {}
    for field in schema:
        if field.name in (label, time_column) or field.name in drop:
            continue
        kind = _kind(field.type)
        if kind is None:
            raise DataError(f"{src}: column {field.name!r} has type {field.type}, which the tabular workload "
                            "cannot use as a feature; expected numbers, booleans or strings (leave it out with "
                            "data.drop_columns, or name a time stamp data.time_column)")
        out[field.name] = kind
    if not out:
        raise DataError(f"{src}: no feature columns besides the label {label!r}")
    return out


# A string column with at most this many distinct values is a category whatever its share of distinct
# values: small tables have few rows, and categories of ~100 values are common (states, product lines).
_MIN_IDENTIFIER_VALUES = 100


def identifier_columns(table: pa.Table, features: dict[str, str], max_unique_fraction: float,
                       src: str, quiet: bool = False) -> dict[str, int]:
    """String columns that look like identifiers (more than ``_MIN_IDENTIFIER_VALUES`` distinct values,
    and more than ``max_unique_fraction`` of their values distinct): name → distinct values.

    As categories they would give XGBoost one category per row (nothing to learn, a model schema listing
    every id) and make the served model refuse any id it has not seen. Left out, logged unless ``quiet``.
    Raises DataError when no feature would be left.
    """
    found = {}
    for name, kind in features.items():
        if kind != "category" or max_unique_fraction >= 1:
            continue
        column = table.column(name)
        values = len(column) - column.null_count
        distinct = pc.count_distinct(column).as_py()
        if distinct > _MIN_IDENTIFIER_VALUES and distinct > max_unique_fraction * values:
            found[name] = int(distinct)
    if found and not quiet:
        log.warning("%s: column(s) %s look like identifiers (distinct values: %s), not categories; left out of the "
                    "features (data.max_unique_fraction %g; set 1 to keep them, or list them in data.drop_columns)",
                    src, sorted(found), found, max_unique_fraction)
    if found and len(found) == len(features):
        raise DataError(f"{src}: every feature column looks like an identifier ({sorted(found)}); expected at least "
                        f"one number or category column (raise data.max_unique_fraction to keep them)")
    return found


def _python(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def inspect_label(values: pa.ChunkedArray | pa.Array, label: str, task: str, src: str) -> LabelInfo:
    """The task (detected unless stated) and classes of a label column.

    Raises:
        DataError: every value missing, one class only, more classes than a binary task allows, or a
            regression target that is not numeric.
    """
    values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    if pat.is_dictionary(values.type):
        values = values.dictionary_decode()
    rows, missing = len(values), values.null_count
    if rows == missing:
        raise DataError(f"data.label {label!r}: all {rows} values are missing in {src}")
    present = values.drop_null()
    numeric = pat.is_integer(values.type) or pat.is_floating(values.type) or pat.is_decimal(values.type)
    if not numeric and not (pat.is_string(values.type) or pat.is_large_string(values.type)
                            or pat.is_boolean(values.type)):
        raise DataError(f"data.label {label!r}: type {values.type} in {src}; expected numbers, booleans or strings")
    uniques = sorted(_python(v) for v in present.unique().to_pylist())
    if task == "auto":
        if not numeric:
            task = "binary" if len(uniques) <= 2 else "multiclass"
        else:
            whole = all(float(v).is_integer() for v in uniques)
            task = ("binary" if len(uniques) <= 2 else
                    "multiclass" if whole and len(uniques) <= MAX_AUTO_CLASSES else "regression")
    if task == "regression":
        if not numeric:
            raise DataError(f"data.label {label!r}: task regression needs a numeric label, found {values.type} "
                            f"in {src}")
        return LabelInfo(task=task, classes=[], rows=rows, missing=missing)
    if len(uniques) < 2:
        raise DataError(f"data.label {label!r}: one class only ({uniques[0]!r}) in {src}; a classifier needs at "
                        "least two")
    if task == "binary" and len(uniques) > 2:
        raise DataError(f"data.label {label!r}: task binary, but {len(uniques)} classes in {src} "
                        f"(e.g. {uniques[:5]}); set data.task multiclass or auto")
    classes = [int(v) if numeric and float(v).is_integer() else v for v in uniques]
    return LabelInfo(task=task, classes=classes, rows=rows, missing=missing)


# --------------------------------------------------------------------------- prepare
def _split(frame: pd.DataFrame, cfg: Any, src: str) -> dict[str, pd.DataFrame]:
    n = len(frame)
    n_test, n_valid = max(1, int(round(n * cfg.test_fraction))), max(1, int(round(n * cfg.valid_fraction)))
    if n - n_test - n_valid < 1:
        raise DataError(f"{src}: {n} labelled rows are too few to split into train, valid and test")
    if cfg.split == "time":
        order = np.argsort(frame["__time"].to_numpy(), kind="stable")
    else:
        order = np.random.default_rng(cfg.seed).permutation(n)
    cut = n - n_valid - n_test
    parts = {"train": order[:cut], "valid": order[cut:cut + n_valid], "test": order[cut + n_valid:]}
    return {name: frame.iloc[idx].reset_index(drop=True) for name, idx in parts.items()}


def _times(column: pa.ChunkedArray, name: str, src: str) -> np.ndarray:
    """A time column as sortable numbers: time stamps and dates as they are, numbers too, text parsed."""
    series = column.to_pandas()
    if pd.api.types.is_numeric_dtype(series) or pd.api.types.is_datetime64_any_dtype(series):
        return pd.to_datetime(series).to_numpy() if not pd.api.types.is_numeric_dtype(series) else series.to_numpy()
    try:
        return pd.to_datetime(series, format="mixed").to_numpy()
    except (ValueError, TypeError):
        raise DataError(f"data.time_column {name!r}: values in {src} are not dates or times "
                        f"(e.g. {series.dropna().iloc[0]!r})") from None


def prepare(cfg: Any, source: DataSource, source_fs: pafs.FileSystem, fs: pafs.FileSystem, root: str,
            task: str) -> DataVersion:
    """Read, check, encode, split and store a table as a content-addressed data version.

    Args:
        cfg: the tabular data options (``TabularData``).
        source: the parsed source; ``source_fs`` reads it.
        fs: filesystem of the storage root; ``root`` the root inside it.
        task: "auto" or the stated task.

    Raises:
        DataError: no such column, an unusable column type, a label all missing or with one class,
            too few rows. Raised before anything is written.
    """
    src = source.uri
    table = read_table(fs=source_fs, source=source)
    features = feature_columns(table.schema, cfg.label, cfg.time_column, list(cfg.drop_columns), src)
    identifiers = identifier_columns(table, features, cfg.max_unique_fraction, src)
    features = {name: kind for name, kind in features.items() if name not in identifiers}
    info = inspect_label(table.column(cfg.label), cfg.label, task, src)
    frame = pd.DataFrame({name: _feature_values(table.column(name), kind) for name, kind in features.items()})
    labels = table.column(cfg.label).to_pandas()
    labelled = labels.notna().to_numpy()
    keep = labelled.copy()
    if cfg.split == "time":  # a row without a time cannot be placed before or after the others
        frame["__time"] = _times(table.column(cfg.time_column), cfg.time_column, src)
        keep &= pd.notna(frame["__time"]).to_numpy()
    if info.task == "regression":
        frame[cfg.label] = labels.astype("float64")
    else:
        codes = {value: i for i, value in enumerate(info.classes)}
        frame[cfg.label] = labels.map(lambda v: codes.get(_class_key(v, info.classes), -1) if pd.notna(v) else -1)
    frame = frame[keep].reset_index(drop=True)
    dropped = {"no_label": int((~labelled).sum()), "no_time": int((labelled & ~keep).sum()), "max_rows": 0}
    if cfg.max_rows is not None and len(frame) > cfg.max_rows:
        dropped["max_rows"] = len(frame) - cfg.max_rows
        frame = frame.iloc[: cfg.max_rows]
    categories = {name: sorted(str(v) for v in frame[name].dropna().unique())
                  for name, kind in features.items() if kind == "category"}
    splits = _split(frame, cfg, src)
    for name in splits:
        splits[name] = splits[name].drop(columns=["__time"], errors="ignore")

    shaped_by = {"format_version": FORMAT_VERSION, "task": info.task, "classes": info.classes,
                 "label": cfg.label, "features": features, "categories": categories,
                 # The task counts as detected (above), not as written: "auto" and its answer are one version.
                 "options": cfg.model_dump(mode="json", exclude={"source", "task"})}
    digest = hash_bytes(*(pd.util.hash_pandas_object(splits[s], index=False).to_numpy().tobytes() for s in SPLITS),
                        json.dumps(shaped_by, sort_keys=True, default=str).encode())
    folder = f"{root.rstrip('/')}/data/{DATASET}/{digest}"
    uri = f"s3://{folder}" if fs.type_name == "s3" else folder
    try:
        if version_exists(fs, folder):
            log.info("tabular data version %s exists at %s; not rewriting", digest, uri)
            return _version(digest, uri, folder, read_manifest(fs, folder))
    except OSError as err:
        raise storage_failure(f"{uri}: cannot read the storage root ({_short(err)})", err) from None
    manifest = {
        "dataset": DATASET, "hash": digest, "schema": "tabular", "source": src,
        "files": resolve_files(source_fs, source)[:100], **shaped_by,
        "rows": {name: len(part) for name, part in splits.items()}, "dropped": dropped,
        "identifier_columns": identifiers,
        "label_rate": ({name: float(part[cfg.label].mean()) for name, part in splits.items()}
                       if info.task == "binary" else None),
        "null_rates": {name: round(float(frame[name].isna().mean()), 6) for name in features},
        "split": {"method": cfg.split, "time_column": cfg.time_column},
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    files = {f"{name}.parquet": _parquet_writer(part) for name, part in splits.items()}
    try:
        write_version(fs, folder, files, manifest)
    except OSError as err:
        raise storage_failure(f"{uri}: cannot write the data version ({_short(err)})", err) from None
    log.info("tabular data version %s written to %s (%s)", digest, uri, manifest["rows"])
    return _version(digest, uri, folder, manifest)


def _class_key(value: Any, classes: list[Any]) -> Any:
    """A label value as the classes list holds it (whole numbers as int)."""
    value = _python(value)
    if isinstance(value, float) and value.is_integer() and int(value) in classes:
        return int(value)
    return value


def _feature_values(column: pa.ChunkedArray, kind: str) -> pd.Series:
    if pat.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    if kind == "category":
        return column.to_pandas().astype("string").astype(object).where(lambda s: s.notna(), None)
    return column.cast(pa.float64()).to_pandas()


def _parquet_writer(frame: pd.DataFrame):
    def write(out: Any) -> None:
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), out, compression="zstd")

    return write


def _version(digest: str, uri: str, folder: str, manifest: dict[str, Any]) -> DataVersion:
    return DataVersion(dataset=DATASET, version=digest, uri=uri, path=folder, schema_name=manifest["schema"],
                       rows=manifest["rows"], manifest=manifest)


def load_split(fs: pafs.FileSystem, version: DataVersion, split: str) -> pd.DataFrame:
    """One split: the features (numbers as float64, strings as the version's categories) and the label
    (class codes 0..k-1, or the regression target)."""
    if split not in SPLITS:
        raise DataError(f"tabular split {split!r}: expected one of {list(SPLITS)}")
    manifest = version.manifest
    try:
        table = pq.read_table(f"{version.path}/{split}.parquet", filesystem=fs)
    except OSError as err:
        raise storage_failure(f"{version.uri}: cannot read split {split} ({_short(err)})", err) from None
    df = table.to_pandas()
    out = typed_features(df, manifest)
    label = manifest["label"]
    out[label] = df[label].astype("float64" if manifest["task"] == "regression" else "int64").to_numpy()
    return out


def typed_features(df: pd.DataFrame, manifest: dict[str, Any]) -> pd.DataFrame:
    """The version's feature columns in order, typed as in training (the served model does the same)."""
    out = pd.DataFrame(index=df.index)
    for name, kind in manifest["features"].items():
        if kind == "category":
            values = df[name].map(lambda v: None if pd.isna(v) else str(v))
            out[name] = pd.Categorical(values, categories=manifest["categories"][name])
        else:
            out[name] = pd.to_numeric(df[name], errors="coerce").astype("float64")
    return out
