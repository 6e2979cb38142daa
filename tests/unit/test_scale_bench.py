"""The scale benchmark's measures (benchmarks/scale.py): growth exponents, peak memory, seconds per round.

The benchmark itself needs minutes at 8M rows; these check the parts its figures come from.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks import scale


def test_exponent_is_the_log_log_slope():
    rows = [1e5, 1e6, 1e7]
    assert scale.exponent(rows, [2.0, 20.0, 200.0]) == pytest.approx(1.0)
    assert scale.exponent(rows, [1.0, 100.0, 10_000.0]) == pytest.approx(2.0)
    assert scale.exponent(rows, [5.0, 5.0, 5.0]) == pytest.approx(0.0)
    assert scale.exponent([1e5], [1.0]) is None


def test_peak_memory_sees_a_child_of_the_session_grow_and_names_it():
    # A child that holds ~200 MB for a moment, in its own session like the benchmark's subprocesses.
    code = "import time; b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(1.5)"
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    with scale.PeakMemory(proc.pid, interval_s=0.05) as mem:
        proc.wait()
    assert mem.largest() > 200 * 2**20
    assert mem.largest("python") == mem.largest() and mem.largest("no such title") == 0
    assert mem.tree_peak >= mem.largest()


def test_seconds_per_round_leaves_out_what_happened_before_the_first_report(tmp_path):
    trial = tmp_path / "trial_x_00000"
    trial.mkdir()
    # The first report comes after a 5 s matrix build; then 0.5 s per round.
    rows = [{"training_iteration": i, "time_total_s": 5.0 + 0.5 * i} for i in range(1, 11)]
    (trial / "result.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert scale._seconds_per_round(tmp_path) == pytest.approx(0.5)
    (trial / "result.json").write_text(json.dumps(rows[-1]) + "\n")
    with pytest.raises(RuntimeError, match="one report only"):
        scale._seconds_per_round(tmp_path)


def test_year_files_repeat_the_packaged_table_with_each_year(tmp_path):
    import pandas as pd

    files = scale.year_files(tmp_path, 2)
    assert [f.name for f in files] == ["flights-2013.csv", "flights-2012.csv"]
    a, b = (pd.read_csv(f) for f in files)
    assert len(a) == len(b) == 336_776
    assert set(a["year"]) == {2013} and set(b["year"]) == {2012}
    assert a.drop(columns="year").equals(b.drop(columns="year"))
    stamp = files[0].stat().st_mtime_ns
    assert scale.year_files(tmp_path, 1) == files[:1] and files[0].stat().st_mtime_ns == stamp  # written once
