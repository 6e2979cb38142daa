"""FashionMNIST (and MNIST) from IDX files → a validated, content-addressed data version.

Input: the four official files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (each raw or ``.gz``) in a folder or
S3 prefix, either directly or in torchvision's layout (``FashionMNIST/raw/``, ``MNIST/raw/``).

Output: ``<root>/data/fashion-mnist/<hash>/{train,valid,test}.npz`` plus ``manifest.json``.
Images are stored as uint8 and normalised at load time with the training split's mean/std
(kept in the manifest): uint8 is 4x smaller than float32, and the statistics come from the
training images only so that nothing about valid/test leaks into the model.

The hash covers the decompressed file contents and the split settings, so the same data
gives the same version whether it arrives gzipped or raw, from a folder or from S3.
"""

from __future__ import annotations

import gzip
import io
import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow.fs as pafs

from tuning_core.config import FashionData
from tuning_core.errors import DataError, TunepipeError, storage_failure
from tuning_core.results import DataVersion
from tuning_core.versioning import hash_bytes, read_manifest, version_exists, write_version

logger = logging.getLogger(__name__)

DATASET = "fashion-mnist"
SCHEMA = "idx"
NUM_CLASSES = 10
SPLITS = ("train", "valid", "test")
# Bump when the stored format or the split rule changes: a new format must not reuse old hashes.
FORMAT_VERSION = 1

IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension

# role → the official base name; the sibling spelling with a dot ("train-images.idx3-ubyte") is
# how several mirrors ship the same files, so it is accepted too.
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
LAYOUTS = ("", "FashionMNIST/raw", "MNIST/raw")

# IDX type byte → numpy dtype (big-endian, as the format specifies).
_IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


# --------------------------------------------------------------------------- parsing


def _join(folder: str, name: str) -> str:
    return f"{folder.rstrip('/')}/{name}" if folder else name


def _failure(what: str, err: OSError) -> TunepipeError:
    """``what (first line of the error)``: a StorageError, or retryable when the store is unreachable."""
    return storage_failure(f"{what} ({str(err).splitlines()[0] if str(err) else type(err).__name__})", err)


def _read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    try:
        # compression=None: pyarrow would otherwise gunzip by file name and hide corrupt-gzip
        # errors behind a generic read error; _decompress reports them by name instead.
        with fs.open_input_stream(path, compression=None) as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"IDX file {path}: not found") from None
    except OSError as err:
        raise _failure(f"IDX file {path}: cannot be read", err) from None


def _decompress(raw: bytes, path: str) -> bytes:
    """Gunzip when the bytes are gzip (by content, not by name: a renamed file still reads)."""
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except EOFError:
        raise DataError(f"IDX file {path}: truncated gzip stream (the download is incomplete)") from None
    except (gzip.BadGzipFile, zlib.error, OSError) as err:
        raise DataError(f"IDX file {path}: corrupt gzip data ({err})") from None


def parse_idx(data: bytes, path: str = "<bytes>") -> np.ndarray:
    """Parse IDX bytes (already decompressed) into an array shaped as the header says.

    Raises:
        DataError: bad magic number, unknown type, or a body that does not match the header.
    """
    if len(data) < 4:
        raise DataError(f"IDX file {path}: {len(data)} bytes, too short for an IDX header")
    zero, dtype_code, ndim = int.from_bytes(data[:2], "big"), data[2], data[3]
    if zero != 0 or dtype_code not in _IDX_DTYPES or ndim == 0:
        magic = int.from_bytes(data[:4], "big")
        raise DataError(f"IDX file {path}: bad magic number {magic}, expected an IDX header "
                        f"({IMAGES_MAGIC} for images, {LABELS_MAGIC} for labels)")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataError(f"IDX file {path}: truncated header ({len(data)} bytes, expected {header_len})")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[dtype_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    body = len(data) - header_len
    if body != expected:
        what = "truncated" if body < expected else "has trailing bytes"
        raise DataError(f"IDX file {path}: {what}: header says shape {list(shape)} ({expected} bytes), "
                        f"found {body} bytes")
    arr = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(shape)
    # Native byte order so that downstream code (torch) never sees a big-endian array.
    return arr.astype(dtype.newbyteorder("="), copy=False)


def read_idx(fs: pafs.FileSystem, path: str) -> np.ndarray:
    """Read one IDX file (raw or gzip) from ``fs``; works unchanged on the full official files.

    Raises:
        DataError: missing, corrupt, truncated or not an IDX file (one line naming the file).
        StorageError: the filesystem cannot be read.
    """
    return parse_idx(_decompress(_read_bytes(fs, path), path), path)


def _magic(data: bytes) -> int:
    return int.from_bytes(data[:4], "big") if len(data) >= 4 else -1


# --------------------------------------------------------------------------- locating the files


def _candidates(folder: str, base: str) -> list[str]:
    dotted = base.replace("-idx", ".idx")
    return [_join(folder, n) for n in (base, base + ".gz", dotted, dotted + ".gz")]


def locate_files(fs: pafs.FileSystem, source_path: str) -> tuple[str, dict[str, str]]:
    """Find the four IDX files under ``source_path`` (plain folder or torchvision layout).

    Returns:
        The folder that holds them and role → file path.

    Raises:
        DataError: none or only some of the files exist; the message lists what is expected where.
    """
    folders = [_join(source_path, sub) if sub else source_path.rstrip("/") for sub in LAYOUTS]
    present: set[str] = set()
    try:
        # One listing per candidate folder (3 requests on S3) rather than a HEAD per candidate name.
        for folder in folders:
            infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
            present |= {_join(folder, i.base_name) for i in infos if i.type == pafs.FileType.File}
    except OSError as err:
        raise _failure(f"IDX source {source_path}: cannot be listed", err) from None
    expected = ", ".join(f"{b}[.gz]" for b in FILES.values())
    partial: tuple[str, list[str]] | None = None
    for folder in folders:
        found: dict[str, str] = {}
        for role, base in FILES.items():
            hit = next((p for p in _candidates(folder, base) if p in present), None)
            if hit:
                found[role] = hit
        if len(found) == len(FILES):
            return folder, found
        if found and partial is None:
            partial = (folder, [FILES[r] for r in FILES if r not in found])
    if partial:
        folder, missing = partial
        raise DataError(f"IDX source {folder}: missing {', '.join(m + '[.gz]' for m in missing)}; "
                        f"expected all of {expected} in one folder")
    where = " or ".join(folders)
    raise DataError(f"IDX source {source_path}: no IDX files found; expected {expected} in {where}")


# --------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class _Pair:
    images: np.ndarray
    labels: np.ndarray
    digest: bytes


def _read_pair(fs: pafs.FileSystem, images_path: str, labels_path: str) -> _Pair:
    img_bytes = _decompress(_read_bytes(fs, images_path), images_path)
    lab_bytes = _decompress(_read_bytes(fs, labels_path), labels_path)
    if _magic(img_bytes) != IMAGES_MAGIC:
        raise DataError(f"IDX file {images_path}: bad magic number {_magic(img_bytes)}, "
                        f"expected {IMAGES_MAGIC} (uint8 images, 3 dimensions)")
    if _magic(lab_bytes) != LABELS_MAGIC:
        raise DataError(f"IDX file {labels_path}: bad magic number {_magic(lab_bytes)}, "
                        f"expected {LABELS_MAGIC} (uint8 labels, 1 dimension)")
    images = parse_idx(img_bytes, images_path)
    labels = parse_idx(lab_bytes, labels_path)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"IDX files {images_path} and {labels_path}: {images.shape[0]} images but "
                        f"{labels.shape[0]} labels, expected equal counts")
    if images.shape[0] == 0:
        raise DataError(f"IDX file {images_path}: no images")
    if labels.max() >= NUM_CLASSES:
        bad = int(np.argmax(labels >= NUM_CLASSES))
        raise DataError(f"IDX file {labels_path}: label {int(labels[bad])} at index {bad}, "
                        f"expected labels 0..{NUM_CLASSES - 1}")
    return _Pair(images, labels.astype(np.int64), hash_bytes(img_bytes, lab_bytes).encode())


def _stratified_split(labels: np.ndarray, valid_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/valid indices with the same class mix in both (matters on small samples)."""
    rng = np.random.default_rng(seed)
    valid: list[np.ndarray] = []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        n_valid = int(round(len(idx) * valid_fraction))
        valid.append(rng.permutation(idx)[:n_valid])
    valid_idx = np.sort(np.concatenate(valid)) if valid else np.array([], dtype=np.int64)
    mask = np.ones(len(labels), dtype=bool)
    mask[valid_idx] = False
    return np.flatnonzero(mask), valid_idx


def _npz_writer(images: np.ndarray, labels: np.ndarray) -> Callable[[io.BufferedIOBase], None]:
    def write(out: io.BufferedIOBase) -> None:
        buf = io.BytesIO()  # zipfile wants a seekable stream; S3 output streams are not
        np.savez_compressed(buf, images=images, labels=labels)
        out.write(buf.getvalue())

    return write


def _counts(labels: np.ndarray) -> list[int]:
    return np.bincount(labels, minlength=NUM_CLASSES).astype(int).tolist()


def _uri(fs: pafs.FileSystem, path: str) -> str:
    return f"s3://{path}" if isinstance(fs, pafs.S3FileSystem) else path


def _to_version(fs: pafs.FileSystem, folder: str, manifest: dict) -> DataVersion:
    return DataVersion(dataset=DATASET, version=manifest["version"], uri=_uri(fs, folder), path=folder,
                       schema_name=SCHEMA, rows=dict(manifest["rows"]), manifest=manifest)


# --------------------------------------------------------------------------- public API


def _read_source(source_fs: pafs.FileSystem, source_path: str) -> tuple[str, dict[str, str], _Pair, _Pair]:
    folder, paths = locate_files(source_fs, source_path)
    train = _read_pair(source_fs, paths["train_images"], paths["train_labels"])
    test = _read_pair(source_fs, paths["test_images"], paths["test_labels"])
    if train.images.shape[1:] != test.images.shape[1:]:
        raise DataError(f"IDX files in {folder}: train images are {list(train.images.shape[1:])} but test "
                        f"images are {list(test.images.shape[1:])}, expected the same size")
    return folder, paths, train, test


def check_source(source_fs: pafs.FileSystem, source_path: str) -> None:
    """Validate the IDX files at ``source_path`` without writing anything (a pre-run check).

    IDX files are small enough to read whole, so this is every check ``prepare`` makes on the input.

    Raises:
        DataError: files missing, corrupt or inconsistent.
        StorageError, ServiceUnavailable: the source cannot be read (the latter: unreachable, retryable).
    """
    _read_source(source_fs, source_path)


def prepare(cfg: FashionData, source_fs: pafs.FileSystem, source_path: str, fs: pafs.FileSystem,
            root: str) -> DataVersion:
    """Validate the IDX files at ``source_path`` and write a train/valid/test data version.

    Everything is read and validated before anything is written, so a bad input leaves the
    storage root untouched. Preparing the same input twice returns the existing version.

    Args:
        cfg: source URI (recorded), valid fraction, split seed, optional cap on training images.
        source_fs: filesystem holding the IDX files (local or S3).
        source_path: folder inside ``source_fs``.
        fs: storage filesystem to write the version into.
        root: storage root inside ``fs``.

    Returns:
        The data version (``dataset="fashion-mnist"``, ``schema_name="idx"``).

    Raises:
        DataError: files missing, corrupt or inconsistent.
        StorageError: a filesystem cannot be read or written.
    """
    folder, paths, train, test = _read_source(source_fs, source_path)
    images, labels = train.images, train.labels
    if cfg.max_train is not None and cfg.max_train < len(labels):
        images, labels = images[: cfg.max_train], labels[: cfg.max_train]
    train_idx, valid_idx = _stratified_split(labels, cfg.valid_fraction, cfg.seed)
    if len(train_idx) == 0 or len(valid_idx) == 0:
        raise DataError(f"IDX source {folder}: {len(labels)} training images cannot be split with "
                        f"valid_fraction={cfg.valid_fraction}; expected at least one image per split")

    settings = {"valid_fraction": cfg.valid_fraction, "seed": cfg.seed, "max_train": cfg.max_train}
    version = hash_bytes(train.digest, test.digest, repr(sorted(settings.items())).encode(),
                         f"format={FORMAT_VERSION}".encode())
    target = f"{root.rstrip('/')}/data/{DATASET}/{version}"
    try:
        exists = version_exists(fs, target)
    except OSError as err:
        raise _failure(f"data version {_uri(fs, target)}: cannot be checked", err) from None
    if exists:
        logger.info("data version %s already exists at %s; reusing it", version, target)
        return _to_version(fs, target, read_manifest(fs, target))

    splits = {
        "train": (images[train_idx], labels[train_idx]),
        "valid": (images[valid_idx], labels[valid_idx]),
        "test": (test.images, test.labels),
    }
    pixels = splits["train"][0].astype(np.float64) / 255.0
    manifest = {
        "dataset": DATASET,
        "schema": SCHEMA,
        "version": version,
        "format_version": FORMAT_VERSION,
        "source": cfg.source,
        "source_folder": folder,
        "source_files": {role: p.rsplit("/", 1)[-1] for role, p in paths.items()},
        "settings": settings,
        "image_shape": [int(d) for d in train.images.shape[1:]],
        "num_classes": NUM_CLASSES,
        # Normalisation statistics of the training split, in [0, 1] pixel units (applied at load time).
        "normalisation": {"mean": float(pixels.mean()), "std": float(pixels.std())},
        "rows": {name: int(len(lab)) for name, (_, lab) in splits.items()},
        "class_counts": {name: _counts(lab) for name, (_, lab) in splits.items()},
        "source_rows": {"train": int(len(train.labels)), "test": int(len(test.labels))},
        "dropped": {"max_train": int(len(train.labels) - len(labels))},
        "files": [f"{s}.npz" for s in SPLITS],
    }
    files = {f"{name}.npz": _npz_writer(img, lab) for name, (img, lab) in splits.items()}
    try:
        write_version(fs, target, files, manifest)
    except OSError as err:
        raise _failure(f"data version {_uri(fs, target)}: cannot be written", err) from None
    logger.info("wrote data version %s (%s) from %s", version, manifest["rows"], folder)
    return _to_version(fs, target, manifest)


def load_split(fs: pafs.FileSystem, version_path: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Load one split of a data version, normalised with the manifest's training statistics.

    Returns:
        float32 images shaped N×1×H×W and int64 labels.

    Raises:
        DataError: unknown split, or a folder that is not a complete data version.
    """
    if split not in SPLITS:
        raise DataError(f"split {split!r}: expected one of {list(SPLITS)}")
    if not version_exists(fs, version_path):
        raise DataError(f"data version {version_path}: no manifest.json, not a complete data version")
    manifest = read_manifest(fs, version_path)
    raw = _read_bytes(fs, f"{version_path}/{split}.npz")
    with np.load(io.BytesIO(raw)) as npz:
        images, labels = npz["images"], npz["labels"]
    norm = manifest["normalisation"]
    x = images.astype(np.float32) / 255.0
    x = (x - np.float32(norm["mean"])) / np.float32(norm["std"] or 1.0)
    return x[:, None, :, :], labels.astype(np.int64)
