"""Canonical rows → the model's features: a prepared split for training, raw files for batch scoring.

The conversion itself is ``tuning_core.data.flight_features.to_features``, the code a registered model
ships with; here it gets the version's categories and its errors become ``DataError``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import pandas as pd
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from tuning_core.data.flight_features import FEATURES, FeatureError
from tuning_core.data.flight_features import to_features as _to_features
from tuning_core.data.flights.convert import LABEL
from tuning_core.data.flights.read import read_source
from tuning_core.data.flights.sources import is_s3, storage_error, uri_of
from tuning_core.data.flights.split import SPLITS
from tuning_core.errors import DataError
from tuning_core.versioning import read_manifest, version_exists

logger = logging.getLogger(__name__)


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
            raise DataError(f"{uri_of(fs, folder)}: not a flights data version (no manifest.json)")
        manifest = read_manifest(fs, folder)
        table = pq.read_table(f"{folder}/{split}.parquet", filesystem=fs)
    except OSError as err:
        raise storage_error(fs, folder, err, f"read split {split}") from None
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
    read = _read_raw(source_fs, source_path, None)
    return read.table.select(FEATURES).to_pandas(), "+".join(sorted(set(read.schemas)))


def read_canonical_parts(source_fs: pafs.FileSystem | None, source_path: str,
                         consume: Callable[[pd.DataFrame], None]) -> str:
    """``read_canonical`` one file at a time (batch scoring with one file held): ``consume`` gets each
    file's canonical feature rows, in input order, as they are read; returns the detected schema name.
    The checks that need every file (too many malformed rows, no row at all) raise after the last one, so
    a caller writing what it is handed keeps it aside until this returns."""
    read = _read_raw(source_fs, source_path, lambda table: consume(table.select(FEATURES).to_pandas()))
    return "+".join(sorted(set(read.schemas)))


def _read_raw(source_fs: pafs.FileSystem | None, source_path: str,
              consume: Callable[[Any], None] | None) -> Any:
    fs = source_fs or pafs.LocalFileSystem()
    path = source_path.removeprefix("s3://").strip("/") if is_s3(fs) else os.path.abspath(source_path)
    read = read_source(fs, path, cfg=None, consume=consume)
    if read.dropped.get("missing_schedule"):
        logger.warning("%s: %d rows without a valid date or scheduled time dropped",
                       uri_of(fs, path), read.dropped["missing_schedule"])
    return read
