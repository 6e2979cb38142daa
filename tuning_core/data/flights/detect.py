"""How one file is read: its header names a schema, or it is a headerless export of a known layout.

``read_header`` probes the first MiB of a file; ``detect`` turns that into a ``Plan``: the schema, the
column of each role, and the pyarrow options that read only those columns with the right types.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs

from tuning_core.config import FlightsData
from tuning_core.data.flight_features import NULL_VALUES, STRING_ROLES, RawSchema, expected_schemas, match_schema
from tuning_core.data.flights.sources import open_bytes, uri_of
from tuning_core.errors import DataError

# Bytes of CSV per record batch: the per-batch Python overhead is already negligible at this size,
# and bigger blocks only raise the peak memory of the reader (measured with benchmarks/data_stage.py).
_BLOCK_SIZE = 4 << 20
_HEADER_PROBE = 1 << 20

_DICT = pa.dictionary(pa.int32(), pa.string())


# Headerless files: database exports of a schema's full table write its columns in this order and no
# header line. Some columns' values have a recognisable shape (a regex; missing values always pass
# unless the column is required), which is how such a file is told from a header of unknown names.
_INT, _NUM, _TIME = r"-?\d+(?:\.0*)?", r"-?\d+(?:\.\d*)?", r"\d{1,4}(?:\.0*)?"
_YEAR, _MONTH, _DAY = r"(?:19|20|21)\d\d", r"0?[1-9]|1[0-2]", r"0?[1-9]|[12]\d|3[01]"
_CARRIER, _AIRPORT = r"[A-Z0-9]{2,3}", r"[A-Z]{3}"
# How many lines of the probe are checked, and the share that must fit (ragged rows may be among them).
_LAYOUT_LINES, _LAYOUT_SHARE = 50, 0.9


@dataclass(frozen=True)
class Layout:
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


def _layout(schema: str, columns: str, required: str, **shapes: str) -> Layout:
    return Layout(schema, tuple(columns.split(",")), {k: re.compile(v) for k, v in shapes.items()},
                   frozenset(required.split(",")))


HEADERLESS: dict[str, Layout] = {
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
class Header:
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


def read_header(fs: pafs.FileSystem, path: str) -> Header:
    src = uri_of(fs, path)
    with open_bytes(fs, path) as stream:
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
    return Header(names=_split(line), encoding=encoding, line=line, has_rows=bool(rest and rest[0].strip()),
                   lines=lines)


@dataclass(frozen=True)
class Plan:
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


def detect(header: Header, src: str, need_label: bool, cfg: FlightsData | None = None) -> Plan:
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
            return Plan(schema, columns)
    if header_mode != "present":
        layout = _headerless_layout(header, wanted, src, forced=header_mode == "absent")
        if layout is not None:
            found = match_schema(layout.columns, need_label)
            assert found is not None, layout.schema  # each layout holds its schema's columns
            how = "data.schema" if header_mode == "absent" and wanted != "auto" else "its column count and values"
            return Plan(found[0], found[1], layout.columns,
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


def _headerless_layout(header: Header, wanted: str, src: str, forced: bool) -> Layout | None:
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
